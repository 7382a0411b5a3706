//! Test support: a throwaway PKI made with rcgen, echo servers (plain and
//! TLS) on loopback, rustls clients, and a relay started in-process from a
//! TOML text with its session reports collected.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

pub use tlsrelay;
pub mod blocking;
pub mod dns;
pub mod https;
pub mod process;
use tlsrelay::listeners::Listeners;
use tlsrelay::plan::{Plan, SelfSignedSource};
use tlsrelay_core::config::Config;
use tlsrelay_core::report::SessionReport;

/// How long any single wait in a test may take before it fails: 20 s, or
/// TLSRELAY_PATIENCE_SECS where everything runs slower (vmtest's emulated
/// CPU). A deadline for an event, never a sleep: passing runs never wait it.
pub fn patience() -> Duration {
    static SECS: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
        std::env::var("TLSRELAY_PATIENCE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20)
    });
    Duration::from_secs(*SECS)
}

/// A certificate authority and the files it issues, in a temporary directory.
pub struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// PEM of the CA certificate, for `trust_anchors`.
    pub ca_pem: PathBuf,
}

/// What kind of end-entity certificate to issue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeafKind {
    Valid,
    Expired,
    /// Not issued by the CA at all.
    SelfSigned,
}

/// The key a [`LeafSpec`] certificate carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    EcdsaP256,
    Rsa2048,
}

/// A certificate to issue with [`Pki::issue`].
#[derive(Clone, Debug)]
pub struct LeafSpec {
    pub names: Vec<&'static str>,
    pub key: KeyKind,
    /// Days from now until it expires (negative: expired that long ago).
    pub valid_days: i64,
    pub organisation: Option<&'static str>,
    pub unit: Option<&'static str>,
    pub crl: Option<String>,
    pub ocsp: Option<String>,
    pub ca_issuer: Option<String>,
    /// The serial number (for revoking it in a [`Pki::crl`]).
    pub serial: Option<u64>,
}

impl Default for LeafSpec {
    fn default() -> Self {
        LeafSpec {
            names: vec!["mx.relay.test"],
            key: KeyKind::EcdsaP256,
            valid_days: 365,
            organisation: None,
            unit: None,
            crl: None,
            ocsp: None,
            ca_issuer: None,
            serial: None,
        }
    }
}

/// DER of an AuthorityInfoAccess extension value (RFC 5280 4.2.2.1).
fn aia_der(ocsp: Option<&str>, ca_issuer: Option<&str>) -> Option<Vec<u8>> {
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        assert!(content.len() < 128, "short form lengths only");
        [&[tag, content.len() as u8][..], content].concat()
    }
    let mut descriptions = Vec::new();
    for (last_arc, url) in [(1u8, ocsp), (2u8, ca_issuer)] {
        if let Some(url) = url {
            // id-ad-ocsp (1.3.6.1.5.5.7.48.1) or id-ad-caIssuers (…48.2);
            // the location is a uniformResourceIdentifier [6].
            let oid = tlv(0x06, &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x30, last_arc]);
            let location = tlv(0x86, url.as_bytes());
            descriptions.extend(tlv(0x30, &[oid, location].concat()));
        }
    }
    (!descriptions.is_empty()).then(|| tlv(0x30, &descriptions))
}

/// An issued certificate: PEM files plus the parsed form for test servers.
#[derive(Clone)]
pub struct Leaf {
    pub chain: PathBuf,
    pub key: PathBuf,
}

impl Leaf {
    /// The name its files were written under.
    pub fn stem(&self) -> String {
        self.chain
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .to_string()
    }

    pub fn certs(&self) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(&self.chain)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_file(&self.key).unwrap()
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "tlsrelay test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let ca_pem = dir.path().join("ca.pem");
        std::fs::write(&ca_pem, ca.pem()).unwrap();
        Pki { dir, ca, ca_pem }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes the CA's private key (PEM), for tools that sign as the CA.
    pub fn ca_key_pem(&self) -> PathBuf {
        let path = self.dir.path().join("ca.key");
        std::fs::write(&path, self.ca.key().serialize_pem()).unwrap();
        path
    }

    /// An `openssl ca`-style index listing `leaf`'s certificate as `good`
    /// (valid) or `revoked`, for `openssl ocsp` to answer from.
    pub fn ocsp_index(&self, leaf: &Leaf, status: &str) -> PathBuf {
        let stem = leaf.stem();
        let serial = openssl(&[
            "x509".as_ref(),
            "-serial".as_ref(),
            "-noout".as_ref(),
            "-in".as_ref(),
            leaf.chain.as_os_str(),
        ]);
        let serial = serial.trim().trim_start_matches("serial=").to_string();
        let index = self.dir.path().join(format!("{stem}-{status}.index"));
        let line = match status {
            "revoked" => format!("R\t351231000000Z\t251101000000Z\t{serial}\tunknown\t/CN=x\n"),
            _ => format!("V\t351231000000Z\t\t{serial}\tunknown\t/CN=x\n"),
        };
        std::fs::write(&index, line).unwrap();
        index
    }

    /// An OCSP response (DER) from the CA about `leaf`'s certificate, made
    /// with `openssl ocsp`: `good`, or `revoked`.
    pub fn ocsp_response(&self, leaf: &Leaf, status: &str) -> PathBuf {
        let dir = self.dir.path();
        let stem = leaf.stem();
        let os = |s: &str| std::ffi::OsString::from(s);
        let index = self.ocsp_index(leaf, status);
        let request = dir.join(format!("{stem}.ocsp-req"));
        openssl(&[
            &os("ocsp"),
            &os("-no_nonce"),
            &os("-issuer"),
            self.ca_pem.as_os_str(),
            &os("-cert"),
            leaf.chain.as_os_str(),
            &os("-reqout"),
            request.as_os_str(),
        ]);
        let response = dir.join(format!("{stem}-{status}.ocsp"));
        let key = self.ca_key_pem();
        openssl(&[
            &os("ocsp"),
            &os("-index"),
            index.as_os_str(),
            &os("-rsigner"),
            self.ca_pem.as_os_str(),
            &os("-rkey"),
            key.as_os_str(),
            &os("-CA"),
            self.ca_pem.as_os_str(),
            &os("-reqin"),
            request.as_os_str(),
            &os("-respout"),
            response.as_os_str(),
            &os("-ndays"),
            &os("7"),
        ]);
        response
    }

    /// The CA's certificate, DER.
    pub fn ca_der(&self) -> Vec<u8> {
        self.ca.der().to_vec()
    }

    /// A CA-issued certificate valid now for `names`.
    pub fn leaf(&self, stem: &str, names: &[&str]) -> Leaf {
        self.leaf_of_kind(stem, names, LeafKind::Valid)
    }

    pub fn leaf_of_kind(&self, stem: &str, names: &[&str], kind: LeafKind) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        let now = time::OffsetDateTime::now_utc();
        if kind == LeafKind::Expired {
            params.not_before = now - time::Duration::days(60);
            params.not_after = now - time::Duration::days(30);
        } else {
            params.not_before = now - time::Duration::days(1);
            params.not_after = now + time::Duration::days(30);
        }
        let key = KeyPair::generate().unwrap();
        let cert = match kind {
            LeafKind::SelfSigned => params.self_signed(&key).unwrap(),
            _ => params.signed_by(&key, &self.ca).unwrap(),
        };
        self.write_leaf(stem, &cert, &key)
    }

    /// A CA-issued certificate as `spec` says (key type, validity,
    /// organisation, revocation and issuer endpoints).
    pub fn issue(&self, stem: &str, spec: &LeafSpec) -> Leaf {
        let names: Vec<String> = spec.names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        let dn = &mut params.distinguished_name;
        dn.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        if let Some(o) = spec.organisation {
            dn.push(DnType::OrganizationName, o);
        }
        if let Some(ou) = spec.unit {
            dn.push(DnType::OrganizationalUnitName, ou);
        }
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(spec.valid_days.abs() + 1);
        params.not_after = now + time::Duration::days(spec.valid_days);
        if let Some(serial) = spec.serial {
            params.serial_number = Some(rcgen::SerialNumber::from(serial));
        }
        if let Some(url) = &spec.crl {
            params.crl_distribution_points = vec![rcgen::CrlDistributionPoint {
                uris: vec![url.clone()],
            }];
        }
        let aia = aia_der(spec.ocsp.as_deref(), spec.ca_issuer.as_deref());
        if let Some(content) = aia {
            params
                .custom_extensions
                .push(rcgen::CustomExtension::from_oid_content(
                    &[1, 3, 6, 1, 5, 5, 7, 1, 1],
                    content,
                ));
        }
        let key = match spec.key {
            KeyKind::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeyKind::Rsa2048 => KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256),
        }
        .unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        self.write_leaf(stem, &cert, &key)
    }

    /// A CRL signed by the CA revoking `serials` (DER).
    pub fn crl(&self, serials: &[u64]) -> Vec<u8> {
        let now = time::OffsetDateTime::now_utc();
        rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update: now + time::Duration::days(7),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|&s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from(s),
                    revocation_time: now - time::Duration::hours(1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&self.ca)
        .unwrap()
        .der()
        .to_vec()
    }

    fn write_leaf(&self, stem: &str, cert: &rcgen::Certificate, key: &KeyPair) -> Leaf {
        let leaf = Leaf {
            chain: self.dir().join(format!("{stem}.crt")),
            key: self.dir().join(format!("{stem}.key")),
        };
        std::fs::write(&leaf.chain, cert.pem()).unwrap();
        std::fs::write(&leaf.key, key.serialize_pem()).unwrap();
        leaf
    }

    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        roots
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Protocol versions a test peer supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Versions {
    Both,
    Tls12Only,
    Tls13Only,
}

impl Versions {
    fn list(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        static TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
        static TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        match self {
            Versions::Both => rustls::ALL_VERSIONS,
            Versions::Tls12Only => TLS12,
            Versions::Tls13Only => TLS13,
        }
    }
}

/// Options for a TLS test server.
pub struct ServerOptions<'a> {
    pub leaf: &'a Leaf,
    pub versions: Versions,
    /// Require a client certificate from this PKI.
    pub client_ca: Option<&'a Pki>,
}

/// A provider offering only `suite` (all suites when `None`).
fn provider_with(suite: Option<rustls::CipherSuite>) -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    if let Some(suite) = suite {
        p.cipher_suites.retain(|s| s.suite() == suite);
    }
    Arc::new(p)
}

pub fn server_config(opts: &ServerOptions<'_>) -> Arc<rustls::ServerConfig> {
    server_config_with_suite(opts, None)
}

/// A server config that negotiates only `suite` (any when `None`).
pub fn server_config_with_suite(
    opts: &ServerOptions<'_>,
    suite: Option<rustls::CipherSuite>,
) -> Arc<rustls::ServerConfig> {
    let builder = rustls::ServerConfig::builder_with_provider(provider_with(suite))
        .with_protocol_versions(opts.versions.list())
        .unwrap();
    let builder = match opts.client_ca {
        Some(pki) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(pki.roots()),
                provider(),
            )
            .build()
            .unwrap(),
        ),
        None => builder.with_no_client_auth(),
    };
    Arc::new(
        builder
            .with_single_cert(opts.leaf.certs(), opts.leaf.private_key())
            .unwrap(),
    )
}

/// Options for a rustls test client.
pub struct ClientOptions<'a> {
    /// Trust this PKI's CA; `None` accepts any certificate.
    pub trust: Option<&'a Pki>,
    pub versions: Versions,
    pub client_cert: Option<&'a Leaf>,
    /// Offer only this cipher suite.
    pub suite: Option<rustls::CipherSuite>,
}

impl Default for ClientOptions<'_> {
    fn default() -> Self {
        ClientOptions {
            trust: None,
            versions: Versions::Both,
            client_cert: None,
            suite: None,
        }
    }
}

pub fn client_config(opts: &ClientOptions<'_>) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider_with(opts.suite))
        .with_protocol_versions(opts.versions.list())
        .unwrap();
    let builder = match opts.trust {
        Some(pki) => builder.with_root_certificates(pki.roots()),
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything)),
    };
    Arc::new(match opts.client_cert {
        Some(leaf) => builder
            .with_client_auth_cert(leaf.certs(), leaf.private_key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    })
}

/// A client as current browsers and OpenSSL 3.5 are: the post-quantum
/// hybrid X25519MLKEM768 first (a 1,216-byte key share), X25519 second,
/// offering `alpn` (long lists make the hello span more segments).
pub fn post_quantum_client_config(alpn: Vec<Vec<u8>>) -> Arc<rustls::ClientConfig> {
    use rustls::crypto::aws_lc_rs::kx_group;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![kx_group::X25519MLKEM768, kx_group::X25519];
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything))
        .with_no_client_auth();
    config.alpn_protocols = alpn;
    Arc::new(config)
}

/// A verifier for test clients that only care about the relay's behaviour.
#[derive(Debug)]
struct AcceptAnything;

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Connects with TLS to `addr`, sending `sni`.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    opts: &ClientOptions<'_>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(client_config(opts));
    let name = ServerName::try_from(sni.to_string()).unwrap();
    tokio::time::timeout(patience(), connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS connect timed out"))?
}

/// Writes `msg`, half-closes, and reads until the peer closes.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    msg: &[u8],
) -> std::io::Result<Vec<u8>> {
    let work = async {
        stream.write_all(msg).await?;
        stream.flush().await?;
        stream.shutdown().await?;
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await?;
        Ok(back)
    };
    tokio::time::timeout(patience(), work)
        .await
        .map_err(|_| std::io::Error::other("exchange timed out"))?
}

/// Echoes until EOF, then closes its side too.
async fn echo<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        };
        stream.write_all(&buf[..n]).await?;
        stream.flush().await?;
    }
    stream.shutdown().await
}

/// A plaintext echo server that, like a real plaintext service, answers a
/// TLS ClientHello with an error line and hangs up.
pub async fn plain_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                if stream.peek(&mut first).await.is_ok() && first[0] == 0x16 {
                    let _ = stream
                        .write_all(b"-ERR this service does not speak TLS\r\n")
                        .await;
                    return;
                }
                let _ = echo(stream).await;
            });
        }
    });
    addr
}

/// A TLS echo server.
pub async fn tls_echo(opts: ServerOptions<'_>) -> SocketAddr {
    tls_echo_with_suite(opts, None).await
}

/// A TLS acceptor for upstream.test with this PKI's leaf.
fn upstream_acceptor(pki: &Pki, versions: Versions) -> tokio_rustls::TlsAcceptor {
    let leaf = pki.leaf("up", &["upstream.test"]);
    tokio_rustls::TlsAcceptor::from(server_config(&ServerOptions {
        leaf: &leaf,
        versions,
        client_ca: None,
    }))
}

/// A TLS server for upstream.test (this PKI's leaf, TLS 1.2 and 1.3) that
/// takes one connection and hands the stream to `serve`: its address, and
/// the task (await it to see `serve`'s assertions).
pub async fn tls_upstream_once<F, Fut>(
    pki: &Pki,
    serve: F,
) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: FnOnce(tokio_rustls::server::TlsStream<TcpStream>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let acceptor = upstream_acceptor(pki, Versions::Both);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        serve(acceptor.accept(tcp).await.unwrap()).await;
    });
    (addr, task)
}

/// A TLS echo server that negotiates only `suite`.
pub async fn tls_echo_with_suite(
    opts: ServerOptions<'_>,
    suite: Option<rustls::CipherSuite>,
) -> SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config_with_suite(&opts, suite));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(stream).await {
                    let _ = echo(tls).await;
                }
            });
        }
    });
    addr
}

/// A relay running in this process, with its session reports.
pub struct TestRelay {
    addrs: HashMap<String, SocketAddr>,
    reports: mpsc::UnboundedReceiver<SessionReport>,
    /// Its upstream pools: each server's health, weight and sessions.
    pub pools: tlsrelay::upstreams::Pools,
    _state: tempfile::TempDir,
}

impl TestRelay {
    /// Starts a relay from TOML text; relative paths resolve against `dir`.
    pub async fn start(toml: &str, dir: &Path) -> TestRelay {
        // The io_uring pump's word on a session it re-tried or timed out
        // goes to the test's output (the rest of the relay's log does not).
        let _ = tracing_subscriber::fmt()
            .with_env_filter("tlsrelay_sys::uring=info")
            .with_test_writer()
            .try_init();
        let config = Config::parse(toml, "test.toml", dir.to_path_buf())
            .unwrap_or_else(|e| panic!("test config invalid: {e}\n{toml}"));
        let state = tempfile::tempdir().unwrap();
        let plan = Plan::build(
            &config,
            SelfSignedSource::StateDir(state.path().to_path_buf()),
        )
        .unwrap_or_else(|e| panic!("test config unusable: {e}\n{toml}"));
        let pools = plan.pools.clone();
        let mut relay = Listeners::bind(plan).unwrap();
        let (tx, reports) = mpsc::unbounded_channel();
        relay.send_reports_to(tx);
        let addrs = relay.local_addrs().into_iter().collect();
        tokio::spawn(relay.serve(std::future::pending(), std::time::Duration::ZERO));
        TestRelay {
            addrs,
            reports,
            pools,
            _state: state,
        }
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.addrs[listener]
    }

    /// The next finished session's report.
    pub async fn next_report(&mut self) -> SessionReport {
        tokio::time::timeout(patience(), self.reports.recv())
            .await
            .expect("a session report within the patience")
            .expect("relay still running")
    }
}

/// Deterministic pseudo-random bytes (so failures reproduce).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// Formats a path for a TOML string.
pub fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// Whether this run must exercise kernel TLS (set by the VM's init); when
/// set, a kernel without kTLS is a failure, not a reason to take the
/// fallback.
pub fn ktls_expected() -> bool {
    std::env::var("TLSRELAY_EXPECT_KTLS").as_deref() == Ok("1")
}

/// `/proc/net/tls_stat` as name -> value (empty without the tls module).
pub fn tls_stat() -> HashMap<String, u64> {
    std::fs::read_to_string("/proc/net/tls_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

pub mod smtp_client;
pub mod smtp_sink;

/// Runs swaks (the real SMTP test client) and returns its exit status and
/// transcript.
pub fn swaks(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("swaks")
        .args(["--timeout", "20", "--hide-informational"])
        .args(args)
        .output()
        .expect("swaks installed (.ci/run installs it)");
    let transcript = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), transcript)
}

/// swaks against the SMTP server at `addr`, with more arguments, on a
/// blocking thread (it is a separate process that waits for replies).
pub async fn swaks_to(addr: SocketAddr, args: &[&str]) -> (bool, String) {
    let mut all = vec![
        "--server".to_string(),
        addr.ip().to_string(),
        "--port".to_string(),
        addr.port().to_string(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        swaks(&refs)
    })
    .await
    .expect("swaks thread")
}

/// Whether swaks is installed; in CI its absence is a failure.
pub fn have_swaks() -> bool {
    have_program("swaks", "--version", "swaks")
}

/// Whether `program` runs (`program version_arg` exits 0); in CI a missing
/// program is a failure, elsewhere the test says it is skipped.
pub fn have_program(program: &str, version_arg: &str, package: &str) -> bool {
    let ok = std::process::Command::new(program)
        .arg(version_arg)
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{program} missing in CI"
        );
        eprintln!("skipped: {program} not installed (apt-get install {package})");
    }
    ok
}

pub mod postfix;

/// The `tlsrelay` binary of this workspace, built on first use (this crate's
/// tests are not the binary's package, so cargo does not hand them its
/// path).
pub fn relay_binary() -> &'static str {
    static BINARY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BINARY.get_or_init(|| {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "tlsrelay", "--bin", "tlsrelay"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .status()
            .expect("running cargo build for the tlsrelay binary");
        assert!(status.success(), "cargo build -p tlsrelay failed");
        // target/<profile>/deps/<this test> -> target/<profile>/tlsrelay
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().and_then(Path::parent).unwrap();
        profile_dir.join("tlsrelay").display().to_string()
    })
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `openssl` and returns its standard output; panics with its errors.
pub fn openssl(args: &[&std::ffi::OsStr]) -> String {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Waits until a server the test started listens on `addr`; after 10 s
/// panics with its log file.
pub fn wait_for_listener(addr: SocketAddr, what: &str, log: &Path) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not start: {:?}",
            std::fs::read_to_string(log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A port no address of this host uses at the moment of asking (asked on
/// the wildcard address), and that no other test of this process was
/// given: tests bind it on several loopback addresses (127.0.0.x) while
/// other tests run beside them, and bind(0) may hand out a port again as
/// soon as its asker let it go (CI once met a sink's port taken so).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("0.0.0.0:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// A rustls stream that sends a TLS 1.3 KeyUpdate (asking the peer for
/// one back) before every `every` bytes it writes: a peer that rekeys as
/// hard as Java clients can.
pub struct KeyUpdating<S> {
    inner: S,
    every: usize,
    written: usize,
    /// KeyUpdates sent.
    pub updates: usize,
}

/// The rustls streams [`KeyUpdating`] wraps. A connection that already
/// received a fatal alert (the relay cut the session) cannot update its
/// keys: that is the write's error, as tokio-rustls reports it.
pub trait RefreshKeys {
    fn refresh_keys(&mut self) -> std::io::Result<()>;
}

fn key_update_error(e: rustls::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

impl<IO> RefreshKeys for tokio_rustls::client::TlsStream<IO> {
    fn refresh_keys(&mut self) -> std::io::Result<()> {
        self.get_mut()
            .1
            .refresh_traffic_keys()
            .map_err(key_update_error)
    }
}

impl<IO> RefreshKeys for tokio_rustls::server::TlsStream<IO> {
    fn refresh_keys(&mut self) -> std::io::Result<()> {
        self.get_mut()
            .1
            .refresh_traffic_keys()
            .map_err(key_update_error)
    }
}

impl<S> KeyUpdating<S> {
    pub fn new(inner: S, every: usize) -> Self {
        KeyUpdating {
            inner,
            every,
            written: 0,
            updates: 0,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for KeyUpdating<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + RefreshKeys + Unpin> AsyncWrite for KeyUpdating<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.written >= this.every {
            this.inner.refresh_keys()?;
            this.written = 0;
            this.updates += 1;
        }
        let n = std::task::ready!(std::pin::Pin::new(&mut this.inner)
            .poll_write(cx, &buf[..buf.len().min(this.every - this.written)]))?;
        this.written += n;
        std::task::Poll::Ready(Ok(n))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A TLS 1.3 echo server for upstream.test that sends a KeyUpdate before
/// every `every` bytes it echoes. Its sessions' results (KeyUpdates sent,
/// or the error that ended them) arrive on the returned channel.
pub async fn key_updating_tls_echo(
    pki: &Pki,
    every: usize,
) -> (SocketAddr, mpsc::UnboundedReceiver<std::io::Result<usize>>) {
    let acceptor = upstream_acceptor(pki, Versions::Tls13Only);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let result = match acceptor.accept(stream).await {
                    Ok(tls) => {
                        let (mut r, mut w) = tokio::io::split(KeyUpdating::new(tls, every));
                        match tokio::io::copy(&mut r, &mut w).await {
                            Ok(_) => w.shutdown().await.map(|()| {
                                let stream = r.unsplit(w);
                                stream.updates
                            }),
                            Err(e) => Err(e),
                        }
                    }
                    Err(e) => Err(e),
                };
                let _ = tx.send(result);
            });
        }
    });
    (addr, rx)
}
