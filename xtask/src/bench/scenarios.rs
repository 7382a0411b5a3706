//! The bench's scenarios: what each cell's client, relay and sinks do,
//! and the load generator runs that measure them.

use super::*;

/// A stream scenario: what the client speaks and what the upstream speaks.
/// One SMTP cell's load: `senders` at once, each opening `sessions`
/// sessions one after the other, `messages` of `size` bytes in each.
pub(super) struct SmtpWork {
    pub(super) senders: usize,
    pub(super) sessions: usize,
    pub(super) messages: usize,
    pub(super) size: usize,
    pub(super) bdat: bool,
    pub(super) starttls: bool,
}

pub(super) struct Scenario {
    pub(super) name: &'static str,
    pub(super) tls_in: bool,
    pub(super) tls_out: bool,
}

pub(super) const STREAMS: [Scenario; 4] = [
    Scenario {
        name: "plaintext relay",
        tls_in: false,
        tls_out: false,
    },
    Scenario {
        name: "TLS termination",
        tls_in: true,
        tls_out: false,
    },
    Scenario {
        name: "TLS origination",
        tls_in: false,
        tls_out: true,
    },
    Scenario {
        name: "TLS bridge",
        tls_in: true,
        tls_out: true,
    },
];

pub(super) const TERMINATION: &Scenario = &STREAMS[1];

/// A certificate every relay in a run is configured with.
pub(super) struct Certs {
    pub(super) label: &'static str,
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
    /// Certificate and key in one file (haproxy, socat).
    pub(super) pem: PathBuf,
}

impl Certs {
    pub(super) fn new(dir: &Path, stem: &str, label: &'static str) -> Self {
        Certs {
            label,
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
            pem: dir.join(format!("{stem}.pem")),
        }
    }
}

/// A plaintext and a TLS sink of one kind (discarding or echoing).
#[derive(Clone, Copy)]
pub(super) struct SinkPair {
    pub(super) plain: SocketAddr,
    pub(super) tls: SocketAddr,
}

/// One relay's work: the protocol on each side and the sinks behind it.
pub(super) struct Job<'a> {
    pub(super) s: &'a Scenario,
    pub(super) sinks: SinkPair,
    pub(super) certs: &'a Certs,
}

impl Bench {
    /// Runs `tlsrelay-load <command> --to <to> --connections <conns>`
    /// with `extra` arguments; its one JSON line.
    pub(super) fn load(
        &self,
        command: &str,
        to: SocketAddr,
        conns: usize,
        extra: &[&str],
    ) -> anyhow::Result<serde_json::Value> {
        let (to, conns) = (to.to_string(), conns.to_string());
        let out = Command::new(&self.load)
            .args([command, "--to", &to, "--connections", &conns])
            .args(extra)
            .output()?;
        if !out.status.success() {
            bail!(
                "tlsrelay-load {command}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    pub(super) fn throughput(
        &self,
        peer: Peer,
        s: &Scenario,
        conns: usize,
        bytes: u64,
    ) -> anyhow::Result<Option<(Sample, String)>> {
        let job = Job {
            s,
            sinks: self.discard,
            certs: &self.ecdsa,
        };
        let Some(relay) = self.start(peer, &job)? else {
            return Ok(None);
        };
        let counters = relay.counters(&self.dir);
        let (before, machine) = (relay.cpu_seconds()?, machine_cpu_seconds());
        let bytes = bytes.to_string();
        let mut extra = vec!["--bytes", &bytes];
        if s.tls_in {
            extra.push("--tls");
        }
        let r = self.load("blast", relay.listen, conns, &extra)?;
        let cpu = relay.cpu_seconds()? - before;
        let machine = machine_cpu_seconds() - machine;
        let gb = r["bytes"].as_f64().unwrap_or(0.0) / 1e9;
        let mut sample = Sample::from([
            ("gbit_per_s", r["gbit_per_s"].as_f64().unwrap_or(0.0)),
            ("cpu_s_per_gb", cpu / gb),
            ("machine_cpu_s_per_gb", machine / gb),
            ("p99_ms", r["p99_ms"].as_f64().unwrap_or(0.0)),
        ]);
        if let Some(counters) = counters {
            sample.extend(counters.per_mb(gb * 1e9));
        }
        Ok(Some((sample, relay.path())))
    }

    pub(super) fn latency(
        &self,
        peer: Peer,
        s: &Scenario,
        conns: usize,
        seconds: f64,
    ) -> anyhow::Result<Option<(Sample, String)>> {
        let job = Job {
            s,
            sinks: self.echo,
            certs: &self.ecdsa,
        };
        let Some(relay) = self.start(peer, &job)? else {
            return Ok(None);
        };
        let (before, machine) = (relay.cpu_seconds()?, machine_cpu_seconds());
        let secs = seconds.to_string();
        let mut extra = vec!["--seconds", &secs];
        if s.tls_in {
            extra.push("--tls");
        }
        let r = self.load("rr", relay.listen, conns, &extra)?;
        let cpu = relay.cpu_seconds()? - before;
        let machine = machine_cpu_seconds() - machine;
        let mut sample = pick(&r, &["requests_per_s", "p50_us", "p99_us", "p999_us"]);
        let requests = sample["requests_per_s"] * seconds;
        sample.insert("cpu_us_per_req", cpu * 1e6 / requests);
        sample.insert("machine_cpu_us_per_req", machine * 1e6 / requests);
        Ok(Some((sample, relay.path())))
    }

    pub(super) fn handshakes(
        &self,
        peer: Peer,
        certs: &Certs,
        conns: usize,
        seconds: f64,
        resume: bool,
    ) -> anyhow::Result<Option<(Sample, String)>> {
        let job = Job {
            s: TERMINATION,
            sinks: self.echo,
            certs,
        };
        let Some(relay) = self.start(peer, &job)? else {
            return Ok(None);
        };
        let before = relay.cpu_seconds()?;
        let secs = seconds.to_string();
        let mut extra = vec!["--seconds", &secs];
        if resume {
            extra.push("--resume");
        }
        let r = self.load("handshakes", relay.listen, conns, &extra)?;
        let cpu = relay.cpu_seconds()? - before;
        let mut sample = pick(&r, &["handshakes_per_s", "p50_us", "p99_us", "resumed"]);
        sample.insert("resumed", 100.0 * sample["resumed"]);
        sample.insert(
            "cpu_ms_per_handshake",
            cpu * 1000.0 / (sample["handshakes_per_s"] * seconds),
        );
        Ok(Some((sample, relay.path())))
    }

    /// SMTP through tlsrelay (STARTTLS or plaintext both legs), Postfix
    /// relaying through its queue (on tmpfs, counted until it is empty
    /// again), or HAProxy in tcp mode (a blind forward, the floor: the
    /// client's STARTTLS then reaches the sink itself).
    pub(super) fn smtp(
        &self,
        peer: Peer,
        w: &SmtpWork,
    ) -> anyhow::Result<Option<(Sample, String)>> {
        let mut postfix = None;
        let relay = match peer {
            Peer::Tlsrelay => {
                let listen = free_addr()?;
                let config = self.dir.join("smtp.toml");
                let (tls_mode, policy) = if w.starttls {
                    (
                        format!(
                            "opportunistic\"\ntls.certificates = [{{ chain = {:?}, key = {:?} }}]\n",
                            self.ecdsa.cert.display().to_string(),
                            self.ecdsa.key.display().to_string(),
                        ),
                        "required\"\ntls.verify = \"encryption-only\"\n",
                    )
                } else {
                    ("off\"\n".to_string(), "plain\"\n")
                };
                std::fs::write(
                    &config,
                    format!(
                        "ebpf.enabled = false\naccepted_domains = [\"bench.test\"]\n[limits]\nmax_connections = 20000\nmax_connections_per_client = 20000\n\n[[listeners]]\nname = \"mx\"\naddress = \"{listen}\"\nprotocol = \"smtp\"\nhostname = \"relay.bench.test\"\nmax_message_size = {}\ntls.mode = \"{tls_mode}\n[[outbound_connectors]]\nname = \"sink\"\nrecipient_domains = [\"bench.test\"]\nnext_hops = [\"{}\"]\ntls.policy = \"{policy}",
                        64 << 20,
                        self.smtp_sink,
                    ),
                )?;
                let mut child = Guard(
                    own_group(&mut self.tlsrelay(&config))
                        .stdout(Stdio::null())
                        .spawn()
                        .context("starting tlsrelay")?,
                );
                self.groups.borrow_mut().push(child.0.id());
                wait_for_port(listen, &mut child.0, "tlsrelay")?;
                Running {
                    _profile: self.profile(peer, child.0.id())?,
                    child: Some(child),
                    listen,
                    paths: None,
                }
            }
            Peer::Postfix => {
                let listen = free_addr()?;
                postfix = Some(super::postfix::Postfix::start(
                    listen,
                    self.smtp_sink,
                    w.starttls,
                    &self.ecdsa,
                )?);
                Running {
                    _profile: None,
                    child: None,
                    listen,
                    paths: None,
                }
            }
            Peer::Haproxy => {
                let blind = Scenario {
                    name: "smtp",
                    tls_in: false,
                    tls_out: false,
                };
                let job = Job {
                    s: &blind,
                    sinks: SinkPair {
                        plain: self.smtp_sink,
                        tls: self.smtp_sink,
                    },
                    certs: &self.ecdsa,
                };
                let Some(running) = self.start(peer, &job)? else {
                    return Ok(None);
                };
                running
            }
            Peer::Direct => Running {
                _profile: None,
                child: None,
                listen: self.smtp_sink,
                paths: None,
            },
            _ => return Ok(None),
        };
        let cpu = || match &postfix {
            Some(p) => p.cpu_seconds(),
            None => relay.cpu_seconds(),
        };
        let before = cpu()?;
        let (messages, sessions, size) = (
            w.messages.to_string(),
            w.sessions.to_string(),
            w.size.to_string(),
        );
        let mut extra = vec![
            "--messages",
            &messages,
            "--sessions",
            &sessions,
            "--size",
            &size,
        ];
        if w.bdat {
            extra.push("--bdat");
        }
        if !w.starttls {
            extra.push("--plain");
        }
        let r = self.load("smtp", relay.listen, w.senders, &extra)?;
        if let Some(p) = &postfix {
            p.wait_queue_empty()?;
        }
        let cpu = cpu()? - before;
        let mut sample = pick(
            &r,
            &[
                "messages_per_s",
                "gbit_per_s",
                "p50_us",
                "p99_us",
                "p999_us",
            ],
        );
        sample.insert(
            "cpu_s_per_gb",
            cpu / (r["bytes"].as_f64().unwrap_or(0.0) / 1e9),
        );
        sample.insert(
            "cpu_us_per_msg",
            cpu * 1e6 / r["messages"].as_f64().unwrap_or(f64::NAN),
        );
        let path = if peer == Peer::Tlsrelay {
            "userspace (SMTP body)"
        } else {
            ""
        };
        Ok(Some((sample, path.into())))
    }

    /// RSS growth per idle established TLS connection.
    pub(super) fn idle(
        &self,
        peer: Peer,
        count: usize,
    ) -> anyhow::Result<Option<(Sample, String)>> {
        if peer == Peer::Direct || (peer == Peer::Socat && count > 1000) {
            return Ok(None); // socat forks a process per connection
        }
        // The relay, the echo sink and the holder: two descriptors a
        // connection in the relay, one in each of the others.
        if count as u64 * 2 + 200 > self.open_files {
            bail!(
                "{count} idle connections need {} open files, the limit is {}",
                count * 2 + 200,
                self.open_files
            );
        }
        let job = Job {
            s: TERMINATION,
            sinks: self.echo,
            certs: &self.ecdsa,
        };
        let Some(relay) = self.start(peer, &job)? else {
            return Ok(None);
        };
        std::thread::sleep(Duration::from_millis(200));
        let before = relay.rss_bytes();
        let mut holder = Guard(
            Command::new(&self.load)
                .args(["hold", "--tls", "--to", &relay.listen.to_string()])
                .args(["--connections", &count.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()?,
        );
        let stdout = holder.0.stdout.take().context("holder stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let ready = rx
            .recv_timeout(Duration::from_secs(120))
            .context("idle connections not open within 120 s")?;
        if !ready.contains("ready") {
            let mut err = String::new();
            if let Some(mut e) = holder.0.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            bail!("holding {count} connections: {}", err.trim());
        }
        std::thread::sleep(Duration::from_millis(500));
        let after = relay.rss_bytes();
        if let Some(mut stdin) = holder.0.stdin.take() {
            let _ = stdin.flush();
        }
        let _ = holder.0.wait();
        let sample = Sample::from([
            (
                "kib_per_connection",
                (after - before) / count as f64 / 1024.0,
            ),
            ("rss_mib", after / (1 << 20) as f64),
        ]);
        Ok(Some((sample, relay.path())))
    }
}

/// What a routing cell measures.
#[derive(Clone, Copy)]
pub(super) enum Routed {
    Throughput { bytes: u64 },
    Latency { seconds: f64 },
    Handshakes { seconds: f64 },
}

impl Bench {
    /// A router (tlsrelay, HAProxy, nginx) passing TLS for `bench.test`
    /// through to a pool of `servers`; `None` for peers that cannot route
    /// by SNI. The generator alone talks to the first server.
    pub(super) fn start_router(
        &self,
        peer: Peer,
        servers: [SocketAddr; 2],
    ) -> anyhow::Result<Option<Running>> {
        if peer == Peer::Direct {
            return Ok(Some(Running {
                _profile: None,
                child: None,
                listen: servers[0],
                paths: None,
            }));
        }
        let listen = free_addr()?;
        let config = self.dir.join(format!("{}-routing.conf", peer.name()));
        let maxconn = (self.open_files.saturating_sub(200) / 2).min(20000);
        let values = [
            ("listen", listen.to_string()),
            ("server1", servers[0].to_string()),
            ("server2", servers[1].to_string()),
            ("maxconn", maxconn.to_string()),
            ("cert", self.ecdsa.cert.display().to_string()),
            ("key", self.ecdsa.key.display().to_string()),
            ("stream_module", NGINX_STREAM.to_string()),
            ("open_files", self.open_files.to_string()),
            ("dir", self.dir.display().to_string()),
            ("worker_connections", (maxconn * 2).to_string()),
        ];
        let values: Vec<(&str, &str)> = values.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let cmd = match peer {
            Peer::Tlsrelay => {
                std::fs::write(
                    &config,
                    render(include_str!("peers/tlsrelay-routing.toml"), &values),
                )?;
                self.tlsrelay(&config)
            }
            Peer::Haproxy => {
                std::fs::write(
                    &config,
                    render(include_str!("peers/haproxy-routing.cfg"), &values),
                )?;
                self.haproxy(&config)
            }
            Peer::Nginx => {
                std::fs::write(
                    &config,
                    render(include_str!("peers/nginx-routing.conf"), &values),
                )?;
                self.nginx(&config)
            }
            _ => return Ok(None),
        };
        self.spawn(peer, cmd, listen).map(Some)
    }

    /// One routing cell: TLS passed through by SNI to a pool of two sinks.
    pub(super) fn routed(
        &self,
        peer: Peer,
        what: Routed,
        conns: usize,
    ) -> anyhow::Result<Option<(Sample, String)>> {
        let servers = match what {
            Routed::Throughput { .. } => self.routing.discard,
            _ => self.routing.echo,
        };
        let Some(relay) = self.start_router(peer, servers)? else {
            return Ok(None);
        };
        let before = relay.cpu_seconds()?;
        let machine = machine_cpu_seconds();
        let sample = match what {
            Routed::Throughput { bytes } => {
                let bytes = bytes.to_string();
                let r = self.load("blast", relay.listen, conns, &["--tls", "--bytes", &bytes])?;
                let gb = r["bytes"].as_f64().unwrap_or(0.0) / 1e9;
                let cpu = relay.cpu_seconds()? - before;
                Sample::from([
                    ("gbit_per_s", r["gbit_per_s"].as_f64().unwrap_or(0.0)),
                    ("cpu_s_per_gb", cpu / gb),
                    (
                        "machine_cpu_s_per_gb",
                        (machine_cpu_seconds() - machine) / gb,
                    ),
                    ("p99_ms", r["p99_ms"].as_f64().unwrap_or(0.0)),
                ])
            }
            Routed::Latency { seconds } => {
                let secs = seconds.to_string();
                let r = self.load(
                    "rr",
                    relay.listen,
                    conns,
                    &["--tls", "--size", "1024", "--seconds", &secs],
                )?;
                let cpu = relay.cpu_seconds()? - before;
                let mut sample = pick(&r, &["requests_per_s", "p50_us", "p99_us", "p999_us"]);
                let requests = sample["requests_per_s"] * seconds;
                sample.insert("cpu_us_per_req", cpu * 1e6 / requests);
                sample
            }
            Routed::Handshakes { seconds } => {
                let secs = seconds.to_string();
                let r = self.load("handshakes", relay.listen, conns, &["--seconds", &secs])?;
                let cpu = relay.cpu_seconds()? - before;
                let mut sample = pick(&r, &["handshakes_per_s", "p50_us", "p99_us"]);
                sample.insert(
                    "cpu_ms_per_handshake",
                    cpu * 1000.0 / (sample["handshakes_per_s"] * seconds),
                );
                sample
            }
        };
        Ok(Some((sample, relay.path())))
    }

    /// New sessions through a router while one of its two servers is
    /// killed a second into the run: how many failed.
    pub(super) fn failover(
        &self,
        peer: Peer,
        conns: usize,
        seconds: f64,
    ) -> anyhow::Result<Option<(Sample, String)>> {
        if peer == Peer::Direct {
            return Ok(None);
        }
        let mut sinks = Vec::new();
        for _ in 0..2 {
            let addr = free_addr()?;
            let mut cmd = Command::new(&self.load);
            cmd.args(["sink", "--echo", "--listen", &addr.to_string(), "--cert"])
                .arg(&self.ecdsa.cert)
                .arg("--key")
                .arg(&self.ecdsa.key)
                .stdout(Stdio::null());
            let mut child = Guard(own_group(&mut cmd).spawn()?);
            self.groups.borrow_mut().push(child.0.id());
            wait_for_port(addr, &mut child.0, "sink")?;
            sinks.push((addr, child));
        }
        let Some(relay) = self.start_router(peer, [sinks[0].0, sinks[1].0])? else {
            return Ok(None);
        };
        let victim = sinks.pop().expect("two sinks").1;
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            let at = unix_ms();
            drop(victim); // SIGKILL to its group
            at
        });
        let secs = seconds.to_string();
        let r = self.load(
            "handshakes",
            relay.listen,
            conns,
            &["--seconds", &secs, "--count-failures"],
        )?;
        let killed_at = killer.join().expect("the killer thread");
        // Sessions under way when the server died are lost with it by any
        // relay (its TLS state died too); a session begun after is new.
        let started: Vec<u64> = r["failed_started_ms"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
            .unwrap_or_default();
        let new = started.iter().filter(|&&t| t >= killed_at).count();
        let mut sample = pick(&r, &["ok_percent", "handshakes_per_s"]);
        sample.insert("failed_in_flight", (started.len() - new) as f64);
        sample.insert("failed_new", new as f64);
        Ok(Some((sample, relay.path())))
    }
}

/// Milliseconds since the Unix epoch, as the load generator stamps them.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
