//! An authoritative DNS server (Debian's nsd) serving DNSSEC-signed test
//! zones on loopback: the zone `test.` signed with a key made per run
//! (ldns-keygen, ldns-signzone), whose DNSKEY is the relay's trust anchor,
//! plus unsigned zones delegated from it without DS (provably insecure).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// A running nsd and the trust anchor file for its signed zone.
pub struct SignedDns {
    pub addr: SocketAddr,
    /// DNSKEY records of `test.`, for `dns.trust_anchors`.
    pub anchors: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

/// What to serve.
pub struct Zones<'a> {
    /// Records of the signed zone `test.` (relative names, zone-file syntax).
    pub signed: &'a str,
    /// Unsigned child zones (`insecure` is `insecure.test.`) with their records.
    pub unsigned: &'a [(&'a str, &'a str)],
    /// Text replaced in the signed zone after signing: a record whose
    /// signature no longer matches (a bogus answer).
    pub tamper: &'a [(&'a str, &'a str)],
}

/// Whether nsd and ldnsutils are installed; in CI their absence fails.
pub fn have_dns_tools() -> bool {
    crate::have_program("ldns-signzone", "-v", "ldnsutils")
        && crate::have_program("/usr/sbin/nsd", "-v", "nsd")
}

const SOA: &str = "@ IN SOA ns.test. admin.test. 1 3600 600 86400 300\n@ IN NS ns.test.\n";

impl SignedDns {
    pub fn start(zones: &Zones<'_>) -> SignedDns {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let run = |cmd: &mut Command| {
            let out = cmd.current_dir(path).output().unwrap();
            assert!(
                out.status.success(),
                "{cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let key = run(Command::new("ldns-keygen").args(["-a", "ECDSAP256SHA256", "-k", "test."]));
        let mut parent = format!(
            "$ORIGIN test.\n$TTL 300\n{SOA}ns IN A 127.0.0.1\n{}\n",
            zones.signed
        );
        let mut config = String::new();
        for (name, records) in zones.unsigned {
            parent += &format!("{name} IN NS ns.test.\n");
            let file = format!("{name}.zone");
            std::fs::write(
                path.join(&file),
                format!("$ORIGIN {name}.test.\n$TTL 300\n{SOA}{records}\n"),
            )
            .unwrap();
            config += &format!("zone:\n  name: \"{name}.test.\"\n  zonefile: \"{file}\"\n");
        }
        std::fs::write(path.join("test.zone"), parent).unwrap();
        run(Command::new("ldns-signzone").args(["test.zone", &key]));
        let mut signed = std::fs::read_to_string(path.join("test.zone.signed")).unwrap();
        for (from, to) in zones.tamper {
            assert!(signed.contains(from), "'{from}' not in the signed zone");
            signed = signed.replace(from, to);
        }
        std::fs::write(path.join("test.zone.signed"), signed).unwrap();
        let anchors = path.join("anchors.key");
        std::fs::copy(path.join(format!("{key}.key")), &anchors).unwrap();

        let port = crate::free_port();
        let dir_text = path.display();
        std::fs::write(
            path.join("nsd.conf"),
            format!(
                "server:\n  ip-address: 127.0.0.1@{port}\n  username: \"\"\n  chroot: \"\"\n  zonesdir: \"{dir_text}\"\n  database: \"\"\n  zonelistfile: \"{dir_text}/zone.list\"\n  xfrdfile: \"{dir_text}/xfrd.state\"\n  pidfile: \"{dir_text}/nsd.pid\"\n  logfile: \"{dir_text}/nsd.log\"\nremote-control:\n  control-enable: no\nzone:\n  name: \"test.\"\n  zonefile: \"test.zone.signed\"\n{config}"
            ),
        )
        .unwrap();
        let child = Command::new("/usr/sbin/nsd")
            .args(["-d", "-c"])
            .arg(path.join("nsd.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        crate::wait_for_listener(addr, "nsd", &path.join("nsd.log"));
        SignedDns {
            addr,
            anchors,
            child,
            _dir: dir,
        }
    }
}

impl Drop for SignedDns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The TLSA association data of a certificate (selector 0) or of its
/// public key (selector 1, from the key file), as hex for a zone file.
pub fn tlsa_data(leaf: &crate::Leaf, selector: u8, matching: u8) -> String {
    let selected = match selector {
        0 => leaf.certs()[0].to_vec(),
        _ => {
            let pem = std::fs::read_to_string(&leaf.key).unwrap();
            use rcgen::PublicKeyData;
            rcgen::KeyPair::from_pem(&pem)
                .unwrap()
                .subject_public_key_info()
        }
    };
    let data = match matching {
        0 => selected,
        1 => aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &selected)
            .as_ref()
            .to_vec(),
        _ => aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA512, &selected)
            .as_ref()
            .to_vec(),
    };
    tlsrelay_core::hex(&data)
}
