//! The peers tlsrelay is measured against and how each is started: its
//! config rendered from a template in `peers/`, its process group.

use super::*;

/// What relays in a run; `Direct` is the generator talking to the sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Peer {
    Tlsrelay,
    /// tlsrelay with `dataplane.pump = "epoll"` (splicing tables only).
    TlsrelayEpoll,
    Stunnel,
    Haproxy,
    Nginx,
    Socat,
    /// Postfix relaying through its queue (SMTP table only).
    Postfix,
    Direct,
}

pub(super) const NGINX_STREAM: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

impl Peer {
    pub(super) const RELAYS: [Peer; 7] = [
        Peer::Tlsrelay,
        Peer::TlsrelayEpoll,
        Peer::Stunnel,
        Peer::Haproxy,
        Peer::Nginx,
        Peer::Socat,
        Peer::Postfix,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Peer::Tlsrelay => "tlsrelay",
            Peer::TlsrelayEpoll => "tlsrelay-epoll",
            Peer::Stunnel => "stunnel",
            Peer::Haproxy => "haproxy",
            Peer::Nginx => "nginx",
            Peer::Socat => "socat",
            Peer::Postfix => "postfix",
            Peer::Direct => "direct",
        }
    }

    /// Debian packages that provide the peer.
    pub(super) fn packages(self) -> &'static [&'static str] {
        match self {
            Peer::Stunnel => &["stunnel4"],
            Peer::Haproxy => &["haproxy"],
            Peer::Nginx => &["nginx", "libnginx-mod-stream"],
            Peer::Socat => &["socat"],
            Peer::Postfix => &["postfix"],
            Peer::Tlsrelay | Peer::TlsrelayEpoll | Peer::Direct => &[],
        }
    }

    pub(super) fn is_tlsrelay(self) -> bool {
        matches!(self, Peer::Tlsrelay | Peer::TlsrelayEpoll)
    }

    pub(super) fn installed(self) -> bool {
        let bin = match self {
            Peer::Tlsrelay | Peer::TlsrelayEpoll | Peer::Direct => return true,
            Peer::Stunnel => "stunnel4",
            Peer::Haproxy => "haproxy",
            Peer::Nginx => "nginx",
            Peer::Socat => "socat",
            Peer::Postfix => "postfix",
        };
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        found && (self != Peer::Nginx || Path::new(NGINX_STREAM).exists())
    }
}

/// Installs the peers Debian has and this machine lacks (as root, with
/// apt-get); otherwise says what is missing and goes on without them.
pub(super) fn install_missing_peers() {
    let missing: Vec<Peer> = Peer::RELAYS
        .into_iter()
        .filter(|p| !p.installed())
        .collect();
    if missing.is_empty() {
        return;
    }
    let packages: Vec<&str> = missing.iter().flat_map(|p| p.packages()).copied().collect();
    if let Err(e) = crate::prereqs::apt_install(&packages) {
        println!("bench: going on without some peers: {e:#}");
    }
}

impl Bench {
    /// Starts recording tlsrelay's process `pid` when this cell is profiled.
    pub(super) fn profile(&self, peer: Peer, pid: u32) -> anyhow::Result<Option<Profile>> {
        match &*self.profiling.borrow() {
            Some(stem) if peer == Peer::Tlsrelay => {
                Ok(Some(Profile::record(pid, &self.dir, stem)?))
            }
            _ => Ok(None),
        }
    }

    /// Starts `peer` for `job`; `None` when the peer cannot do it.
    pub(super) fn start(&self, peer: Peer, job: &Job) -> anyhow::Result<Option<Running>> {
        let (tls_in, tls_out) = (job.s.tls_in, job.s.tls_out);
        let upstream = if tls_out {
            job.sinks.tls
        } else {
            job.sinks.plain
        };
        if peer == Peer::Direct {
            if tls_in && !std::ptr::eq(job.certs, &self.ecdsa) {
                return Ok(None); // the sinks serve the ECDSA certificate
            }
            let listen = if tls_in {
                job.sinks.tls
            } else {
                job.sinks.plain
            };
            return Ok(Some(Running {
                _profile: None,
                child: None,
                listen,
                paths: None,
            }));
        }
        let listen = free_addr()?;
        let Some(cmd) = self.command(peer, job, listen, upstream)? else {
            return Ok(None);
        };
        self.spawn(peer, cmd, listen).map(Some)
    }

    /// Starts `cmd` as `peer` in its own process group and waits until it
    /// listens on `listen`.
    pub(super) fn spawn(
        &self,
        peer: Peer,
        mut cmd: Command,
        listen: SocketAddr,
    ) -> anyhow::Result<Running> {
        let tlsrelay = peer.is_tlsrelay();
        let mut child = Guard(
            own_group(&mut cmd)
                .stdout(if tlsrelay {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", peer.name()))?,
        );
        self.groups.borrow_mut().push(child.0.id());
        wait_for_port(listen, &mut child.0, peer.name())?;
        let paths = if tlsrelay {
            Some(session_paths(
                child.0.stdout.take().context("relay stdout")?,
            ))
        } else {
            None
        };
        Ok(Running {
            _profile: self.profile(peer, child.0.id())?,
            child: Some(child),
            listen,
            paths,
        })
    }

    /// HAProxy in the foreground on `config`.
    pub(super) fn haproxy(&self, config: &Path) -> Command {
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db").arg("-f").arg(config);
        cmd
    }

    /// nginx on `config`, its prefix and error log in the bench directory.
    pub(super) fn nginx(&self, config: &Path) -> Command {
        let mut cmd = Command::new("nginx");
        cmd.arg("-c")
            .arg(config)
            .arg("-p")
            .arg(&self.dir)
            .arg("-e")
            .arg(self.dir.join("nginx.err"));
        cmd
    }

    /// The command that runs `peer` for `job`; `None` when it can't.
    pub(super) fn command(
        &self,
        peer: Peer,
        job: &Job,
        listen: SocketAddr,
        upstream: SocketAddr,
    ) -> anyhow::Result<Option<Command>> {
        let (tls_in, tls_out, f) = (job.s.tls_in, job.s.tls_out, job.certs);
        let config = self.dir.join(format!("{}.conf", peer.name()));
        // Each relayed connection takes two descriptors.
        let maxconn = (self.open_files.saturating_sub(200) / 2).min(20000);
        let cert = f.cert.display().to_string();
        let key = f.key.display().to_string();
        let (listen_s, upstream_s, maxconn_s) = (
            listen.to_string(),
            upstream.to_string(),
            maxconn.to_string(),
        );
        let common = [
            ("listen", listen_s.as_str()),
            ("upstream", upstream_s.as_str()),
            ("maxconn", maxconn_s.as_str()),
            ("cert", cert.as_str()),
            ("key", key.as_str()),
        ];
        let write = |template: &str, extra: &[(&str, &str)]| {
            std::fs::write(&config, render(template, &[&common[..], extra].concat()))
        };
        let cmd = match peer {
            Peer::Direct => unreachable!("no process"),
            Peer::Postfix => return Ok(None), // SMTP only: bench::postfix
            Peer::Tlsrelay | Peer::TlsrelayEpoll => {
                let route = if tls_out {
                    "tls.policy = \"required\"\ntls.verify = \"encryption-only\""
                } else {
                    "tls.policy = \"plain\""
                };
                let pump = if peer == Peer::TlsrelayEpoll {
                    "epoll"
                } else {
                    "io-uring"
                };
                let tls_mode = if tls_in { "implicit" } else { "off" };
                write(
                    include_str!("peers/tlsrelay.toml"),
                    &[("pump", pump), ("tls_mode", tls_mode), ("route", route)],
                )?;
                self.tlsrelay(&config)
            }
            Peer::Socat => {
                let l = if tls_in {
                    format!(
                        "OPENSSL-LISTEN:{},bind=127.0.0.1,fork,reuseaddr,backlog=4096,cert={},verify=0",
                        listen.port(),
                        f.pem.display()
                    )
                } else {
                    format!(
                        "TCP-LISTEN:{},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
                        listen.port()
                    )
                };
                let c = if tls_out {
                    format!("OPENSSL:{upstream},verify=0")
                } else {
                    format!("TCP:{upstream}")
                };
                let mut cmd = Command::new("socat");
                cmd.args([l, c]);
                cmd
            }
            Peer::Stunnel => {
                if tls_in == tls_out {
                    return Ok(None); // one TLS side per service
                }
                let client = if tls_out { "client = yes" } else { "" };
                write(include_str!("peers/stunnel.conf"), &[("client", client)])?;
                let mut cmd = Command::new("stunnel4");
                cmd.arg(&config);
                cmd
            }
            Peer::Haproxy => {
                let bind_ssl = if tls_in {
                    format!(" ssl crt {}", f.pem.display())
                } else {
                    String::new()
                };
                let server_ssl = if tls_out { " ssl verify none" } else { "" };
                write(
                    include_str!("peers/haproxy.cfg"),
                    &[("bind_ssl", &bind_ssl), ("server_ssl", server_ssl)],
                )?;
                self.haproxy(&config)
            }
            Peer::Nginx => {
                let dir = self.dir.display().to_string();
                let certs = if tls_in {
                    format!("ssl_certificate {cert}; ssl_certificate_key {key};")
                } else {
                    String::new()
                };
                write(
                    include_str!("peers/nginx.conf"),
                    &[
                        ("stream_module", NGINX_STREAM),
                        ("open_files", &self.open_files.to_string()),
                        ("dir", &dir),
                        ("worker_connections", &(maxconn * 2).to_string()),
                        ("ssl", if tls_in { " ssl" } else { "" }),
                        ("certs", &certs),
                        ("proxy_ssl", if tls_out { "proxy_ssl on;" } else { "" }),
                    ],
                )?;
                self.nginx(&config)
            }
        };
        Ok(Some(cmd))
    }

    pub(super) fn tlsrelay(&self, config: &Path) -> Command {
        let mut cmd = Command::new(&self.relay_bin);
        cmd.args(["run", "--config"])
            .arg(config)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .env("RUST_LOG", "info");
        cmd
    }
}

/// A peer's config: `{name}` in the template replaced by its value.
pub(super) fn render(template: &str, values: &[(&str, &str)]) -> String {
    values
        .iter()
        .fold(template.to_string(), |text, (name, value)| {
            text.replace(&format!("{{{name}}}"), value)
        })
}
