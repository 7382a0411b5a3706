//! Private Postfix instances for interop tests: a receiving next hop that
//! delivers to a maildir, or a sending server that relays through the
//! relay (relayhost) with its own TLS level. Each lives in a temporary
//! directory with its own config, queue and port, started with
//! `postfix -c DIR start` and stopped on drop.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub struct Postfix {
    dir: tempfile::TempDir,
    pub port: u16,
}

/// How an instance is set up.
pub struct PostfixSetup<'a> {
    pub hostname: &'a str,
    /// Receive for these domains into the maildir.
    pub mailbox_domains: &'a str,
    /// smtpd_tls_security_level (none, may, encrypt) and its certificate.
    pub smtpd_tls: (&'a str, Option<(&'a Path, &'a Path)>),
    /// Send everything through this relayhost, with smtp_tls_security_level
    /// and the CA file to verify it against.
    pub relayhost: Option<(String, &'a str, &'a Path)>,
}

/// Whether Postfix is installed; in CI its absence is a failure.
pub fn have_postfix() -> bool {
    let ok = Path::new("/usr/sbin/postfix").exists() && crate::is_root();
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "postfix (and root) needed in CI"
        );
        eprintln!("skipped: Postfix interop needs postfix installed and root");
    }
    ok
}

fn postfix(conf: &Path, args: &[&str]) -> std::process::Output {
    Command::new("postfix")
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .expect("postfix runs")
}

impl Postfix {
    pub fn start(setup: PostfixSetup<'_>) -> Postfix {
        let dir = tempfile::Builder::new()
            .prefix("postfix")
            .tempdir()
            .unwrap();
        let root = dir.path().to_path_buf();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        for sub in ["etc", "spool", "data", "mail"] {
            std::fs::create_dir(root.join(sub)).unwrap();
        }
        let chown = |path: &Path, owner: &str| {
            assert!(Command::new("chown")
                .arg(owner)
                .arg(path)
                .status()
                .unwrap()
                .success());
        };
        chown(&root.join("data"), "postfix");
        chown(&root.join("mail"), "65534:65534");
        let port = crate::free_port();
        // The stock master.cf, without chroot, smtpd on our port.
        let master = std::fs::read_to_string("/etc/postfix/master.cf").unwrap();
        let mut out = String::new();
        for line in master.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if line.starts_with(|c: char| c.is_whitespace() || c == '#') || fields.len() < 8 {
                out += line;
            } else if fields[0] == "smtp" && fields[1] == "inet" {
                out += &format!("127.0.0.1:{port} inet n - n - - smtpd");
            } else {
                let mut f = fields.clone();
                f[4] = "n";
                out += &f.join(" ");
            }
            out.push('\n');
        }
        std::fs::write(root.join("etc/master.cf"), out).unwrap();
        let (level, cert) = setup.smtpd_tls;
        let mut main = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {q}\n\
             data_directory = {d}\n\
             myhostname = {host}\n\
             mydestination =\n\
             inet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\n\
             mynetworks = 127.0.0.0/8\n\
             smtpd_relay_restrictions = permit_mynetworks, reject\n\
             virtual_mailbox_domains = {domains}\n\
             virtual_mailbox_base = {m}\n\
             virtual_mailbox_maps = static:inbox/\n\
             virtual_uid_maps = static:65534\n\
             virtual_gid_maps = static:65534\n\
             alias_maps =\n\
             alias_database =\n\
             maillog_file = {log}\n\
             maillog_file_prefixes = {prefix}\n\
             smtpd_tls_security_level = {level}\n\
             smtp_dns_support_level = disabled\n\
             minimal_backoff_time = 1s\n\
             maximal_backoff_time = 2s\n\
             queue_run_delay = 1s\n",
            q = root.join("spool").display(),
            d = root.join("data").display(),
            m = root.join("mail").display(),
            log = root.join("maillog").display(),
            prefix = root.display(),
            host = setup.hostname,
            domains = setup.mailbox_domains,
        );
        if let Some((cert, key)) = cert {
            main += &format!(
                "smtpd_tls_cert_file = {}\nsmtpd_tls_key_file = {}\n",
                cert.display(),
                key.display()
            );
        }
        if let Some((relayhost, level, ca)) = &setup.relayhost {
            main += &format!(
                "relayhost = {relayhost}\nsmtp_tls_security_level = {level}\nsmtp_tls_CAfile = {}\nsmtp_tls_verify_cert_match = relay.test\nsmtp_tls_loglevel = 1\n",
                ca.display()
            );
        }
        std::fs::write(root.join("etc/main.cf"), main).unwrap();
        let started = postfix(&root.join("etc"), &["start"]);
        if !started.status.success() {
            let check = postfix(&root.join("etc"), &["check"]);
            // Keep the instance's directory for inspection.
            eprintln!("postfix instance kept in {}", root.display());
            std::mem::forget(dir);
            panic!(
                "postfix start: {}{}\ncheck: {}{}\nlog: {}",
                String::from_utf8_lossy(&started.stdout),
                String::from_utf8_lossy(&started.stderr),
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr),
                std::fs::read_to_string(root.join("maillog")).unwrap_or_default()
            );
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "postfix did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Postfix { dir, port }
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    /// Messages delivered to the maildir, as stored.
    pub fn delivered(&self) -> Vec<String> {
        let new = self.dir.path().join("mail/inbox/new");
        let mut out: Vec<String> = std::fs::read_dir(&new)
            .map(|d| {
                d.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Waits for `n` deliveries.
    pub fn wait_delivered(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.delivered();
            if got.len() >= n || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the instance's log has a line for which `wanted` holds,
    /// and returns that line; panics with the log after 30 s.
    pub fn wait_for_log_line(&self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| wanted(l)) {
                return line.to_string();
            }
            assert!(Instant::now() < deadline, "{what}: not logged\n{log}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `postqueue -p` says the queue is empty (the message
    /// was delivered and its queue file removed).
    pub fn wait_queue_empty(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let queue = self.mailq();
            if queue.contains("Mail queue is empty") {
                return;
            }
            assert!(Instant::now() < deadline, "still queued:\n{queue}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `mailq` for this instance.
    pub fn mailq(&self) -> String {
        let out = Command::new("postqueue")
            .arg("-c")
            .arg(self.conf())
            .arg("-p")
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Sets a main.cf parameter and reloads.
    pub fn reconfigure(&self, setting: &str) {
        assert!(Command::new("postconf")
            .arg("-c")
            .arg(self.conf())
            .args(["-e", setting])
            .status()
            .unwrap()
            .success());
        assert!(postfix(&self.conf(), &["reload"]).status.success());
    }

    /// Attempts delivery of everything queued now (`postqueue -f`).
    pub fn flush(&self) {
        let _ = Command::new("postqueue")
            .arg("-c")
            .arg(self.conf())
            .arg("-f")
            .status();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = postfix(&self.conf(), &["stop"]);
    }
}
