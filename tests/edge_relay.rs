//! The relay as an edge operator runs HAProxy, nginx `stream` or stunnel:
//! upstream pools (weights, backups, a server killed under load and
//! brought back), health checks, routes by SNI and ALPN, TLS passed
//! through untouched to servers that terminate it themselves (OpenSSL's
//! s_server and rustls, client certificates end to end), client access
//! lists and rates, session tickets shared by two relay processes, and
//! `tlsrelay status` with a drain.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tlsrelay_tests::smtp_client::tcp_from;
use tlsrelay_tests::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A plain TCP server that greets each connection with its name and a
/// newline, then echoes; it counts its connections and can be killed and
/// started again on its port.
struct Named {
    name: &'static str,
    addr: SocketAddr,
    count: Arc<AtomicUsize>,
    task: Option<JoinHandle<()>>,
}

impl Named {
    async fn start(name: &'static str) -> Named {
        Named::start_at(name, "127.0.0.1:0".parse().unwrap()).await
    }

    async fn start_at(name: &'static str, address: SocketAddr) -> Named {
        let listener = TcpListener::bind(address).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut named = Named {
            name,
            addr,
            count: Arc::default(),
            task: None,
        };
        named.serve(listener);
        named
    }

    fn serve(&mut self, listener: TcpListener) {
        let (name, count) = (self.name, self.count.clone());
        self.task = Some(tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                held.push(tokio::spawn(async move {
                    let _ = tcp.write_all(format!("{name}\n").as_bytes()).await;
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = tcp.read(&mut buf).await {
                        if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }));
            }
        }));
    }

    /// Stops listening (connections to its port are refused from when
    /// this returns).
    async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    async fn restart(&mut self) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(self.addr).unwrap();
        self.serve(socket.listen(128).unwrap());
    }

    fn sessions(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The end-entity certificate of a PEM chain, DER.
fn first_cert(chain: &std::path::Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(chain)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// One session through `relay` in plaintext: the name of the server
/// that answered.
async fn who(relay: SocketAddr) -> std::io::Result<String> {
    let tcp = TcpStream::connect(relay).await?;
    first_line(tcp).await
}

async fn first_line<S: tokio::io::AsyncRead + Unpin>(stream: S) -> std::io::Result<String> {
    let mut line = String::new();
    tokio::time::timeout(patience(), BufReader::new(stream).read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::other("no greeting"))??;
    Ok(line.trim().to_string())
}

/// Waits until `holds` is true of the pool's view of `upstream`.
async fn until_pool(
    relay: &TestRelay,
    upstream: &str,
    what: &str,
    holds: impl Fn(&tlsrelay::upstreams::UpstreamView) -> bool,
) {
    let deadline = Instant::now() + patience();
    loop {
        let view = relay.pools.find(upstream).expect("the pool").view();
        if holds(&view) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {view:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pool_toml(servers: &str, extra: &str) -> String {
    format!(
        r#"
ebpf.enabled = false
[limits]
max_connections_per_client = 10000

[[listeners]]
name = "in"
address = "127.0.0.1:0"
upstream = "web"
tls.mode = "off"

[[upstreams]]
name = "web"
servers = [{servers}]
tls.policy = "plain"
{extra}
"#
    )
}

/// Three servers, one killed under load: no session fails (each connect
/// refused moves to the next server), the server is taken out by its
/// checks within fall x interval, and it takes sessions again once the
/// checks see it back (rise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_under_load_costs_no_session_and_comes_back_after_rise() {
    let pki = Pki::new();
    let mut servers = Vec::new();
    for name in ["a", "b", "c"] {
        servers.push(Named::start(name).await);
    }
    let list: Vec<String> = servers.iter().map(|s| format!("\"{}\"", s.addr)).collect();
    let toml = pool_toml(
        &list.join(", "),
        "check = { interval = \"200ms\", rise = 2, fall = 2 }",
    );
    let relay = TestRelay::start(&toml, pki.dir()).await;
    let listener = relay.addr("in");
    // Load: four clients making sessions back to back.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Each failure with when its session started and when it failed.
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, failures, done) = (stop.clone(), failures.clone(), done.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let started = Instant::now();
                match who(listener).await {
                    Ok(name) if ["a", "b", "c"].contains(&name.as_str()) => {
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    other => failures.lock().unwrap().push((
                        started,
                        Instant::now(),
                        format!("{other:?}"),
                    )),
                }
            }
        }));
    }
    let wait_done = |n: usize| {
        let done = done.clone();
        async move {
            let deadline = Instant::now() + patience();
            while done.load(Ordering::SeqCst) < n {
                assert!(Instant::now() < deadline, "the load stalled");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_done(200).await;
    let b = servers[1].addr.to_string();
    let killing = Instant::now();
    servers[1].kill().await;
    let killed = Instant::now();
    until_pool(&relay, "web", "b taken out", |v| {
        v.servers.iter().any(|s| s.address == b && !s.up)
    })
    .await;
    let out_after = killed.elapsed();
    let before = done.load(Ordering::SeqCst);
    wait_done(before + 300).await;
    let b_then = servers[1].sessions();
    servers[1].restart().await;
    until_pool(&relay, "web", "b back", |v| {
        v.servers.iter().any(|s| s.address == b && s.up)
    })
    .await;
    let before = done.load(Ordering::SeqCst);
    wait_done(before + 300).await;
    stop.store(true, Ordering::SeqCst);
    for task in load {
        task.await.unwrap();
    }
    // A session under way when b died (connected into its accept queue)
    // may fail with it; every session begun after, none; and nothing
    // failed before b was killed.
    let failures = failures.lock().unwrap();
    let after: Vec<&String> = failures
        .iter()
        .filter(|(started, _, _)| *started >= killed)
        .map(|(_, _, what)| what)
        .collect();
    assert!(after.is_empty(), "new sessions failed: {after:?}");
    assert!(
        failures.iter().all(|(_, failed, _)| *failed >= killing),
        "failures before the kill: {failures:?}"
    );
    assert!(
        out_after < Duration::from_secs(5),
        "taken out after {out_after:?} (checks every 200 ms, fall 2; or 3 failed connects)"
    );
    assert!(servers[1].sessions() > b_then, "b takes sessions again");
}

/// Weights hold over 10,000 sessions (within 5 %), and a backup serves
/// only while every other server is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_hold_over_ten_thousand_sessions_and_backups_wait() {
    const SESSIONS: usize = 10_000;
    let pki = Pki::new();
    let (a, b, c) = (
        Named::start("a").await,
        Named::start("b").await,
        Named::start("c").await,
    );
    let mut backup = Named::start("backup").await;
    let toml = pool_toml(
        &format!(
            "{{ address = \"{}\", weight = 1 }}, {{ address = \"{}\", weight = 2 }}, {{ address = \"{}\", weight = 3 }}, {{ address = \"{}\", backup = true }}",
            a.addr, b.addr, c.addr, backup.addr
        ),
        "",
    );
    let relay = TestRelay::start(&toml, pki.dir()).await;
    let listener = relay.addr("in");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        tasks.spawn(async move {
            for _ in 0..SESSIONS / 16 {
                who(listener).await.unwrap();
            }
        });
    }
    while let Some(t) = tasks.join_next().await {
        t.unwrap();
    }
    let total = (a.sessions() + b.sessions() + c.sessions()) as f64;
    assert_eq!(total as usize, SESSIONS);
    for (server, weight) in [(&a, 1.0), (&b, 2.0), (&c, 3.0)] {
        let share = server.sessions() as f64 / total;
        let want = weight / 6.0;
        assert!(
            (share - want).abs() / want < 0.05,
            "{}: {share:.4} of the sessions, weight says {want:.4}",
            server.name
        );
    }
    assert_eq!(backup.sessions(), 0, "the backup waits");
    for mut server in [a, b, c] {
        server.kill().await;
    }
    // Every primary gone (refused connects eject them): the backup serves.
    for _ in 0..12 {
        assert_eq!(who(listener).await.unwrap(), "backup");
    }
    backup.kill().await;
}

/// A name server on loopback that answers every A question with one
/// address and TTL (changeable), NODATA to the rest, and counts the
/// questions per name.
struct MovingDns {
    addr: SocketAddr,
    answers: Arc<std::sync::Mutex<HashMap<String, (std::net::Ipv4Addr, u32)>>>,
    asked: Arc<std::sync::Mutex<HashMap<String, usize>>>,
    task: JoinHandle<()>,
}

impl MovingDns {
    async fn start() -> MovingDns {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let answers: Arc<std::sync::Mutex<HashMap<String, (std::net::Ipv4Addr, u32)>>> =
            Arc::default();
        let asked: Arc<std::sync::Mutex<HashMap<String, usize>>> = Arc::default();
        let (answers_in, asked_in) = (answers.clone(), asked.clone());
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                if let Some(reply) = dns_reply(&buf[..n], &answers_in, &asked_in) {
                    let _ = socket.send_to(&reply, from).await;
                }
            }
        });
        MovingDns {
            addr,
            answers,
            asked,
            task,
        }
    }

    fn answer(&self, name: &str, ip: &str, ttl: u32) {
        let mut answers = self.answers.lock().unwrap();
        answers.insert(name.to_string(), (ip.parse().unwrap(), ttl));
    }

    fn asked(&self, name: &str) -> usize {
        self.asked.lock().unwrap().get(name).copied().unwrap_or(0)
    }
}

impl Drop for MovingDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The reply to one DNS query (RFC 1035 4.1): the question echoed, one
/// A record for a known name asked for A, no answer otherwise.
fn dns_reply(
    query: &[u8],
    answers: &std::sync::Mutex<HashMap<String, (std::net::Ipv4Addr, u32)>>,
    asked: &std::sync::Mutex<HashMap<String, usize>>,
) -> Option<Vec<u8>> {
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(at)? as usize;
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question = query.get(12..at + 4)?;
    let name = labels.join(".");
    *asked.lock().unwrap().entry(name.clone()).or_default() += qtype.eq(&1) as usize;
    let answer = answers
        .lock()
        .unwrap()
        .get(&name)
        .copied()
        .filter(|_| qtype == 1);
    let mut reply = query[..2].to_vec(); // the query's id
    reply.extend_from_slice(&[0x85, 0x80, 0, 1, 0, u8::from(answer.is_some()), 0, 0, 0, 0]);
    reply.extend_from_slice(question);
    if let Some((ip, ttl)) = answer {
        reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]); // the name, A, IN
        reply.extend_from_slice(&ttl.to_be_bytes());
        reply.extend_from_slice(&[0, 4]);
        reply.extend_from_slice(&ip.octets());
    }
    Some(reply)
}

/// Servers named by DNS: sessions within a name's TTL ask the name server
/// once, and when the name moves to another address, sessions follow it
/// once the old record expires, as nginx's `resolve` and HAProxy's
/// `resolvers` do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_named_by_dns_follow_their_records_ttl() {
    let pki = Pki::new();
    let dns = MovingDns::start().await;
    let first = Named::start("first").await;
    let port = first.addr.port();
    let moved = Named::start_at("moved", SocketAddr::from(([127, 0, 0, 2], port))).await;
    let steady = Named::start("steady").await;
    dns.answer("steady.test", "127.0.0.1", 3600);
    dns.answer("moving.test", "127.0.0.1", 1);
    let toml = format!(
        r#"
ebpf.enabled = false
dns.nameservers = ["{dns}"]

[[listeners]]
name = "steady"
address = "127.0.0.1:0"
upstream = "steady"
tls.mode = "off"

[[listeners]]
name = "moving"
address = "127.0.0.1:0"
upstream = "moving"
tls.mode = "off"

[[upstreams]]
name = "steady"
address = "steady.test:{steady_port}"
tls.policy = "plain"

[[upstreams]]
name = "moving"
address = "moving.test:{port}"
tls.policy = "plain"
"#,
        dns = dns.addr,
        steady_port = steady.addr.port(),
    );
    let relay = TestRelay::start(&toml, pki.dir()).await;
    for _ in 0..20 {
        assert_eq!(who(relay.addr("steady")).await.unwrap(), "steady");
    }
    assert_eq!(dns.asked("steady.test"), 1, "one question for 20 sessions");
    assert_eq!(who(relay.addr("moving")).await.unwrap(), "first");
    dns.answer("moving.test", "127.0.0.2", 1);
    let deadline = Instant::now() + patience();
    loop {
        let server = who(relay.addr("moving")).await.unwrap();
        if server == "moved" {
            break;
        }
        assert_eq!(server, "first");
        assert!(
            Instant::now() < deadline,
            "the relay never followed the name"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(dns.asked("moving.test") >= 2, "asked again after the TTL");
    assert_eq!(moved.sessions(), 1);
}

/// Routes by SNI (exact, wildcard, the rest) and by ALPN, TLS terminated
/// by the relay with the certificate the name asks for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_and_alpn_routes_choose_the_upstream() {
    let pki = Pki::new();
    let leaf = pki.leaf(
        "edge",
        &[
            "api.example.test",
            "*.apps.example.test",
            "www.example.test",
        ],
    );
    let (api, apps, h2, rest) = (
        Named::start("api").await,
        Named::start("apps").await,
        Named::start("h2").await,
        Named::start("rest").await,
    );
    let toml = format!(
        r#"
ebpf.enabled = false

[[listeners]]
name = "edge"
address = "127.0.0.1:0"
upstream = "rest"
tls.mode = "implicit"
tls.certificates = [{{ chain = {chain}, key = {key} }}]

[[listeners.routes]]
sni = ["api.example.test"]
upstream = "api"

[[listeners.routes]]
sni = ["*.apps.example.test"]
upstream = "apps"

[[listeners.routes]]
alpn = ["h2"]
upstream = "h2"

[[upstreams]]
name = "api"
address = "{api}"
tls.policy = "plain"

[[upstreams]]
name = "apps"
address = "{apps}"
tls.policy = "plain"

[[upstreams]]
name = "h2"
address = "{h2}"
tls.policy = "plain"

[[upstreams]]
name = "rest"
address = "{rest}"
tls.policy = "plain"
"#,
        chain = toml_path(&leaf.chain),
        key = toml_path(&leaf.key),
        api = api.addr,
        apps = apps.addr,
        h2 = h2.addr,
        rest = rest.addr,
    );
    let mut relay = TestRelay::start(&toml, pki.dir()).await;
    let edge = relay.addr("edge");
    let opts = ClientOptions {
        trust: Some(&pki),
        ..ClientOptions::default()
    };
    for (sni, alpn, want) in [
        ("api.example.test", None, "api"),
        ("x.apps.example.test", None, "apps"),
        ("y.apps.example.test", Some("http/1.1"), "apps"),
        ("www.example.test", Some("h2"), "h2"),
        ("www.example.test", Some("http/1.1"), "rest"),
        ("www.example.test", None, "rest"),
    ] {
        let mut config = (*client_config(&opts)).clone();
        config.alpn_protocols = alpn.into_iter().map(|p| p.as_bytes().to_vec()).collect();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(edge).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        assert_eq!(first_line(tls).await.unwrap(), want, "{sni} {alpn:?}");
        let report = relay.next_report().await;
        assert_eq!(report.upstream, want, "{report}");
        assert_eq!(
            report.hello.as_ref().and_then(|h| h.server_name.as_deref()),
            Some(sni),
            "{report}"
        );
    }
}

/// Passthrough: the ClientHello is read, never terminated, and replayed
/// to the chosen server, which terminates TLS itself: OpenSSL's s_server
/// and a rustls server, each requiring a client certificate. The client
/// sees the backend's own certificate and proves its own to it.
#[cfg_attr(missing_openssl, ignore = "needs openssl")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_hands_the_clients_own_tls_to_openssl_and_rustls_servers() {
    if !have_program("openssl", "version", "openssl") {
        return;
    }
    let relay_pki = Pki::new();
    let backend_pki = Pki::new();
    let client_pki = Pki::new();
    let relay_leaf = relay_pki.leaf("edge", &["edge.example.test"]);
    let rustls_leaf = backend_pki.leaf("rustls", &["rustls.example.test"]);
    let openssl_leaf = backend_pki.leaf("openssl", &["openssl.example.test"]);
    let client_leaf = client_pki.leaf("client", &["client.example.test"]);
    // rustls: an echo that demands a client certificate of client_pki.
    let rustls_backend = tls_echo(ServerOptions {
        leaf: &rustls_leaf,
        versions: Versions::Both,
        client_ca: Some(&client_pki),
    })
    .await;
    // OpenSSL: s_server demanding a client certificate, echoing lines.
    let openssl_port = free_port();
    let mut s_server = std::process::Command::new("openssl")
        .args(["s_server", "-quiet", "-rev", "-accept"])
        .arg(format!("127.0.0.1:{openssl_port}"))
        .arg("-cert")
        .arg(&openssl_leaf.chain)
        .arg("-key")
        .arg(&openssl_leaf.key)
        .args(["-Verify", "1", "-verify_return_error", "-CAfile"])
        .arg(&client_pki.ca_pem)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let openssl_backend: SocketAddr = format!("127.0.0.1:{openssl_port}").parse().unwrap();
    let deadline = Instant::now() + patience();
    while std::net::TcpStream::connect(openssl_backend).is_err() {
        assert!(Instant::now() < deadline, "s_server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let toml = format!(
        r#"
ebpf.enabled = false

[[listeners]]
name = "edge"
address = "127.0.0.1:0"
tls.mode = "implicit"
tls.certificates = [{{ chain = {chain}, key = {key} }}]

[[listeners.routes]]
sni = ["rustls.example.test"]
upstream = "rustls"
passthrough = true

[[listeners.routes]]
sni = ["openssl.example.test"]
upstream = "openssl"
passthrough = true

[[upstreams]]
name = "rustls"
address = "{rustls_backend}"
tls.policy = "plain"

[[upstreams]]
name = "openssl"
address = "{openssl_backend}"
tls.policy = "plain"
"#,
        chain = toml_path(&relay_leaf.chain),
        key = toml_path(&relay_leaf.key),
    );
    let mut relay = TestRelay::start(&toml, relay_pki.dir()).await;
    let edge = relay.addr("edge");
    let opts = ClientOptions {
        trust: Some(&backend_pki),
        client_cert: Some(&client_leaf),
        ..ClientOptions::default()
    };
    for (sni, expect) in [
        ("rustls.example.test", b"ping\n".to_vec()),
        ("openssl.example.test", b"gnip\n".to_vec()),
    ] {
        let mut tls = tls_connect(edge, sni, &opts).await.unwrap();
        let served = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let want = if sni.starts_with("rustls") {
            &rustls_leaf
        } else {
            &openssl_leaf
        };
        assert_eq!(
            served.as_ref(),
            first_cert(&want.chain),
            "the backend's own certificate"
        );
        tls.write_all(b"ping\n").await.unwrap();
        let mut got = vec![0u8; expect.len()];
        tokio::time::timeout(patience(), tls.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, expect, "{sni}");
        drop(tls);
        let report = relay.next_report().await;
        let pass = report
            .passthrough
            .as_ref()
            .expect("reported as passthrough");
        assert_eq!(pass.version.as_deref(), Some("TLSv1.3"), "{report}");
        assert!(
            report.inbound.is_none(),
            "the relay terminated nothing: {report}"
        );
        assert_eq!(
            report.data_path,
            Some(tlsrelay::pump::DataPath::SpliceIoUring)
                .filter(|_| tlsrelay::pump::io_uring_available().is_ok())
                .or(Some(tlsrelay::pump::DataPath::SpliceEpoll)),
            "spliced: {report}"
        );
        assert!(
            report
                .to_string()
                .contains(&format!("sni={sni} passthrough=TLSv1.3")),
            "{report}"
        );
    }
    // Without the client certificate the backend itself refuses it.
    let anonymous = ClientOptions {
        trust: Some(&backend_pki),
        ..ClientOptions::default()
    };
    let refused = async {
        let mut tls = tls_connect(edge, "rustls.example.test", &anonymous).await?;
        tls.write_all(b"ping\n").await?;
        let mut got = [0u8; 5];
        tls.read_exact(&mut got).await
    };
    assert!(
        refused.await.is_err(),
        "the backend demands the certificate"
    );
    let _ = s_server.kill();
    let _ = s_server.wait();
}

/// A passthrough server that takes the connection but drops the
/// client's hello unanswered is one more to retry past: nothing had
/// reached the client, so the next server answers and no session fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_moves_past_a_server_that_drops_the_hello() {
    let relay_pki = Pki::new();
    let backend_pki = Pki::new();
    let relay_leaf = relay_pki.leaf("edge", &["edge.example.test"]);
    let backend_leaf = backend_pki.leaf("backend", &["backend.example.test"]);
    let good = tls_echo(ServerOptions {
        leaf: &backend_leaf,
        versions: Versions::Both,
        client_ca: None,
    })
    .await;
    // Reads the first bytes of each hello, then closes.
    let mute = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mute_addr = mute.local_addr().unwrap();
    let hellos_dropped = Arc::new(AtomicUsize::new(0));
    let dropped = hellos_dropped.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = mute.accept().await {
            let mut head = [0u8; 5];
            if tcp.read_exact(&mut head).await.is_ok() && head[0] == 22 {
                dropped.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let toml = format!(
        r#"
ebpf.enabled = false

[[listeners]]
name = "edge"
address = "127.0.0.1:0"
tls.mode = "implicit"
tls.certificates = [{{ chain = {chain}, key = {key} }}]

[[listeners.routes]]
sni = ["backend.example.test"]
upstream = "backends"
passthrough = true

[[upstreams]]
name = "backends"
servers = ["{mute_addr}", "{good}"]
balance = "first"
eject_after = 2
tls.policy = "plain"
"#,
        chain = toml_path(&relay_leaf.chain),
        key = toml_path(&relay_leaf.key),
    );
    let mut relay = TestRelay::start(&toml, relay_pki.dir()).await;
    let edge = relay.addr("edge");
    let opts = ClientOptions {
        trust: Some(&backend_pki),
        ..ClientOptions::default()
    };
    for round in 0..4 {
        let mut tls = tls_connect(edge, "backend.example.test", &opts)
            .await
            .unwrap_or_else(|e| panic!("session {round}: {e}"));
        tls.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        tokio::time::timeout(patience(), tls.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"ping");
        drop(tls);
        let report = relay.next_report().await;
        assert_eq!(report.upstream_addr, Some(good), "{report}");
        assert!(report.passthrough.is_some(), "{report}");
    }
    // The first server got the first two hellos (balance first), then
    // was ejected after its second failure.
    assert_eq!(hellos_dropped.load(Ordering::SeqCst), 2);
    until_pool(&relay, "backends", "the mute server ejected", |view| {
        !view.servers[0].up
    })
    .await;
}

/// Access lists and rates are decided before a byte is read: 127.0.0.3
/// is not allowed at all; 127.0.0.2 gets its burst, then is turned away
/// until its rate allows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lists_and_rates_turn_clients_away_at_accept() {
    let pki = Pki::new();
    let server = Named::start("web").await;
    let toml = pool_toml(
        &format!("\"{}\"", server.addr),
        "",
    )
    .replace(
        "tls.mode = \"off\"",
        "tls.mode = \"off\"\naccess.allow = [\"127.0.0.2/32\"]\naccess.rate = 1.0\naccess.burst = 3",
    );
    let relay = TestRelay::start(&toml, pki.dir()).await;
    let listener = relay.addr("in");
    let from = |ip: &str| ip.parse::<IpAddr>().unwrap();
    // Not allowed: closed unread, no greeting from any server.
    let stranger = tcp_from(from("127.0.0.3"), listener).await;
    assert!(first_line(stranger).await.map_or(true, |l| l.is_empty()));
    let mut served = 0;
    let mut turned_away = 0;
    for _ in 0..8 {
        let tcp = tcp_from(from("127.0.0.2"), listener).await;
        match first_line(tcp).await {
            Ok(name) if name == "web" => served += 1,
            _ => turned_away += 1,
        }
    }
    // The burst of 3 (perhaps one more token refilled meanwhile).
    assert!(
        (3..=4).contains(&served),
        "{served} served, {turned_away} turned away"
    );
    assert_eq!(
        server.sessions(),
        served,
        "the turned away never reached it"
    );
}

/// Writes `text` as `name` in `dir`; its path.
fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `tlsrelay` with these arguments: its output and exit code.
fn tlsrelay(args: &[&str]) -> (String, Option<i32>) {
    let out = std::process::Command::new(relay_binary())
        .args(args)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        out.status.code(),
    )
}

/// Two relay processes read one ticket key file: a client's ticket from
/// the first resumes on the second (no full handshake), as a returning
/// client landing on another relay of a fleet; after `tickets new` the
/// old ticket still resumes; a file whose only key is past its lifetime
/// gives no tickets at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_tickets_resume_across_two_relays_sharing_the_key_file() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let leaf = pki.leaf("edge", &["edge.example.test"]);
    let keys = dir.path().join("tickets.keys");
    let (text, code) = tlsrelay(&["tickets", "new", keys.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{text}");
    let upstream = plain_echo().await;
    let config = |name: &str, keys: &std::path::Path| {
        write(
            dir.path(),
            &format!("{name}.toml"),
            &format!(
                "ebpf.enabled = false\n[[listeners]]\nname = \"edge\"\naddress = \"127.0.0.1:0\"\nupstream = \"echo\"\ntls.mode = \"implicit\"\ntls.certificates = [{{ chain = {}, key = {} }}]\ntls.ticket_keys = {}\n\n[[upstreams]]\nname = \"echo\"\naddress = \"{upstream}\"\ntls.policy = \"plain\"\n",
                toml_path(&leaf.chain),
                toml_path(&leaf.key),
                toml_path(keys)
            ),
        )
    };
    let start = |name: &str, keys: &std::path::Path| {
        let config = config(name, keys);
        process::RelayProcess::start(
            relay_binary(),
            &config,
            &dir.path().join(format!("state-{name}")),
            &[],
            &[],
        )
    };
    let (one, two) = (start("one", &keys), start("two", &keys));
    // One client configuration (its session cache) across both relays.
    let client = client_config(&ClientOptions {
        trust: Some(&pki),
        ..ClientOptions::default()
    });
    let connector = tokio_rustls::TlsConnector::from(client);
    let session = |addr: SocketAddr| {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("edge.example.test").unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            // A round trip, so the TLS 1.3 ticket after the handshake is
            // read into the cache.
            tls.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.unwrap();
            tls.get_ref().1.handshake_kind()
        }
    };
    use rustls::HandshakeKind;
    assert_eq!(session(one.addr("edge")).await, Some(HandshakeKind::Full));
    assert_eq!(
        session(two.addr("edge")).await,
        Some(HandshakeKind::Resumed),
        "the first relay's ticket opens on the second"
    );
    // Rotated: a new key seals, the one before still opens. The relays
    // reload the file when it changes.
    let (text, code) = tlsrelay(&["tickets", "new", keys.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("1 older key(s) kept"), "{text}");
    let mut two = two;
    two.wait_for_log("configuration reloaded (a watched file changed)");
    assert_eq!(
        session(two.addr("edge")).await,
        Some(HandshakeKind::Resumed)
    );
    // A key past its lifetime opens and seals nothing.
    let stale = dir.path().join("stale.keys");
    let old = crate_base64_key();
    std::fs::write(&stale, format!("{} {old}\n", unix_now() - 3 * 86_400)).unwrap();
    let three = start("three", &stale);
    let fresh = tokio_rustls::TlsConnector::from(client_config(&ClientOptions {
        trust: Some(&pki),
        ..ClientOptions::default()
    }));
    for expected in [HandshakeKind::Full, HandshakeKind::Full] {
        let tcp = TcpStream::connect(three.addr("edge")).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("edge.example.test").unwrap();
        let mut tls = fresh.connect(name, tcp).await.unwrap();
        tls.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.unwrap();
        assert_eq!(tls.get_ref().1.handshake_kind(), Some(expected));
    }
}

/// A valid-looking key (48 bytes, base64).
fn crate_base64_key() -> String {
    // 48 bytes of 0x41, base64.
    "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB".to_string()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `tlsrelay status` shows each server's health, weight and sessions;
/// `status drain` takes a server out of new sessions (those under way go
/// on) and `status enable` puts it back, as operators script HAProxy's
/// `set server state drain`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_servers_and_drain_takes_one_out_of_new_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Named::start("a").await, Named::start("b").await);
    let config = write(
        dir.path(),
        "relay.toml",
        &format!(
            "ebpf.enabled = false\n[[listeners]]\nname = \"in\"\naddress = \"127.0.0.1:0\"\nupstream = \"web\"\ntls.mode = \"off\"\n\n[[upstreams]]\nname = \"web\"\nservers = [\"{}\", {{ address = \"{}\", weight = 2 }}]\ncheck = {{ interval = \"1s\" }}\ntls.policy = \"plain\"\n",
            a.addr, b.addr
        ),
    );
    let state = dir.path().join("state");
    let relay = process::RelayProcess::start(relay_binary(), &config, &state, &[], &[]);
    let listener = relay.addr("in");
    // A session under way on b.
    let held = TcpStream::connect(listener).await.unwrap();
    let mut held = BufReader::new(held);
    let mut line = String::new();
    held.read_line(&mut line).await.unwrap();
    let state_arg = state.to_str().unwrap();
    let (text, code) = tlsrelay(&["status", "--state-dir", state_arg]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("upstream web (balance round-robin, active checks)"),
        "{text}"
    );
    assert!(
        text.contains(&format!("{}", a.addr)) && text.contains(&format!("{}", b.addr)),
        "{text}"
    );
    let (json, _) = tlsrelay(&["status", "--state-dir", state_arg, "--json"]);
    let view: serde_json::Value = serde_json::from_str(&json).unwrap();
    let servers = &view["upstreams"][0]["servers"];
    assert_eq!(servers[1]["weight"], 2, "{json}");
    assert_eq!(servers[0]["up"], true, "{json}");
    let busy = if line.trim() == "a" { &a } else { &b };
    let other = if line.trim() == "a" { &b } else { &a };
    let idx = if line.trim() == "a" { 0 } else { 1 };
    assert_eq!(servers[idx]["sessions"], 1, "the held session: {json}");
    // Drain the busy one: new sessions go to the other; the held one goes on.
    let (text, code) = tlsrelay(&[
        "status",
        "--state-dir",
        state_arg,
        "drain",
        "web",
        &busy.addr.to_string(),
    ]);
    assert_eq!(code, Some(0), "{text}");
    let before = busy.sessions();
    for _ in 0..6 {
        assert_eq!(who(listener).await.unwrap(), other.name);
    }
    assert_eq!(
        busy.sessions(),
        before,
        "no new session on the drained server"
    );
    held.get_mut().write_all(b"still here\n").await.unwrap();
    line.clear();
    held.read_line(&mut line).await.unwrap();
    assert_eq!(line, "still here\n", "the session under way goes on");
    let (json, _) = tlsrelay(&["status", "--state-dir", state_arg, "--json"]);
    assert!(json.contains("\"admin\": \"drain\""), "{json}");
    let (text, code) = tlsrelay(&[
        "status",
        "--state-dir",
        state_arg,
        "enable",
        "web",
        &busy.addr.to_string(),
    ]);
    assert_eq!(code, Some(0), "{text}");
    let mut names = Vec::new();
    for _ in 0..6 {
        names.push(who(listener).await.unwrap());
    }
    assert!(names.contains(&busy.name.to_string()), "back: {names:?}");
    // An unknown server is an error, exit 1.
    let (text, code) = tlsrelay(&[
        "status",
        "--state-dir",
        state_arg,
        "drain",
        "web",
        "10.9.9.9:1",
    ]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("no server 10.9.9.9:1"), "{text}");
}
