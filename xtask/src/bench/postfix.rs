//! Postfix as the SMTP table's store-and-forward peer: a private instance
//! (its own config directory, queue on tmpfs, the stock master.cf without
//! chroot) that relays everything for 127/8 to the bench's SMTP sink, as an
//! operator would put Postfix at a mail edge (`relayhost`). Its time is
//! counted until its queue is empty again, so delivery is in the figure,
//! not only acceptance.

use super::*;

/// A running instance; stopped (`postfix stop`) and its directories
/// removed on drop.
pub(super) struct Postfix {
    conf: PathBuf,
    root: PathBuf,
    master: u32,
}

impl Postfix {
    /// Starts an instance listening on `listen` that relays to `sink`,
    /// STARTTLS both ways when `starttls` (with `certs` towards clients).
    pub(super) fn start(
        listen: SocketAddr,
        sink: SocketAddr,
        starttls: bool,
        certs: &Certs,
    ) -> anyhow::Result<Postfix> {
        // tmpfs, as the comparison ran it: the queue's fsyncs cost
        // little, so what is measured is Postfix's own work.
        let root = PathBuf::from(format!("/dev/shm/tlsrelay-bench-postfix-{}", listen.port()));
        let _ = std::fs::remove_dir_all(&root);
        // Stopped and removed on drop from here on, started or not.
        let mut postfix = Postfix {
            conf: root.join("etc"),
            root: root.clone(),
            master: 0,
        };
        for sub in ["etc", "spool", "data"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        run(
            "chown postfix data",
            Command::new("chown").arg("postfix").arg(root.join("data")),
        )?;
        let master = std::fs::read_to_string("/etc/postfix/master.cf")
            .context("Postfix is not installed (/etc/postfix/master.cf)")?;
        let mut out = String::new();
        for line in master.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if line.starts_with(|c: char| c.is_whitespace() || c == '#') || fields.len() < 8 {
                out += line;
            } else if fields[0] == "smtp" && fields[1] == "inet" {
                out += &format!("{listen} inet n - n - - smtpd");
            } else {
                let mut f = fields.clone();
                f[4] = "n"; // no chroot: the instance lives outside the spool
                out += &f.join(" ");
            }
            out.push('\n');
        }
        std::fs::write(root.join("etc/master.cf"), out)?;
        let (smtpd_tls, smtp_tls) = if starttls {
            ("may", "encrypt")
        } else {
            ("none", "none")
        };
        let main = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {q}\n\
             data_directory = {d}\n\
             myhostname = postfix.bench.test\n\
             mydestination =\n\
             inet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\n\
             mynetworks = 127.0.0.0/8\n\
             smtpd_relay_restrictions = permit_mynetworks, reject\n\
             relayhost = [{host}]:{port}\n\
             message_size_limit = 104857600\n\
             default_process_limit = 512\n\
             alias_maps =\n\
             alias_database =\n\
             maillog_file = {log}\n\
             maillog_file_prefixes = {root}\n\
             smtpd_peername_lookup = no\n\
             smtp_dns_support_level = disabled\n\
             smtpd_tls_security_level = {smtpd_tls}\n\
             smtpd_tls_cert_file = {cert}\n\
             smtpd_tls_key_file = {key}\n\
             smtp_tls_security_level = {smtp_tls}\n",
            q = root.join("spool").display(),
            d = root.join("data").display(),
            log = root.join("maillog").display(),
            root = root.display(),
            host = sink.ip(),
            port = sink.port(),
            cert = certs.cert.display(),
            key = certs.key.display(),
        );
        std::fs::write(root.join("etc/main.cf"), main)?;
        run(
            "postfix start",
            Command::new("postfix")
                .arg("-c")
                .arg(&postfix.conf)
                .arg("start"),
        )?;
        let pid_file = root.join("spool/pid/master.pid");
        postfix.master = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("reading {}", pid_file.display()))?
            .trim()
            .parse()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(listen).is_err() {
            if std::time::Instant::now() > deadline {
                bail!("Postfix did not listen on {listen}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(postfix)
    }

    /// CPU seconds of the master and its processes (those it reaped
    /// included).
    pub(super) fn cpu_seconds(&self) -> anyhow::Result<f64> {
        tree_cpu_seconds(self.master)
    }

    /// Waits until every accepted message has left the queue.
    pub(super) fn wait_queue_empty(&self) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let out = Command::new("postqueue")
                .arg("-c")
                .arg(&self.conf)
                .arg("-j")
                .output()?;
            if out.status.success() && out.stdout.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!("Postfix's queue did not empty in 120 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(&self.conf)
            .arg("stop")
            .output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
