//! Soak load: many TLS and SMTP sessions held open through the relay, each
//! with traffic every `interval` (1 KiB echoed, or a 2 KiB message
//! delivered), while a probe opens a fresh TLS session every 100 ms to
//! time handshakes under the load. Prints `{"ready": …}` once every
//! session is up and one summary line at the end.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::smtp::{expect, send};

#[derive(clap::Args)]
pub struct Soak {
    /// A TCP listener terminating TLS in front of an echo server.
    #[arg(long)]
    pub tcp: SocketAddr,
    /// An SMTP listener offering STARTTLS, relaying to a sink.
    #[arg(long)]
    pub smtp: SocketAddr,
    #[arg(long, default_value_t = 10_000)]
    pub connections: usize,
    #[arg(long, default_value_t = 600.0)]
    pub seconds: f64,
    /// Seconds between one session's turns of traffic.
    #[arg(long, default_value_t = 30.0)]
    pub interval: f64,
}

/// Failures by kind, and the traffic that went through.
#[derive(Default)]
struct Tally {
    errors: BTreeMap<String, u64>,
    exchanges: u64,
    messages: u64,
}

impl Tally {
    fn error(&mut self, what: &str, e: &anyhow::Error) {
        // The kind, not the text: one line per distinct failure.
        let kind = format!("{what}: {}", e.root_cause());
        *self.errors.entry(kind).or_default() += 1;
    }
}

type Shared = Arc<Mutex<Tally>>;

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// A held session, once set up.
enum Session {
    /// TLS to the echo, proven by one round.
    Echo(Tls),
    /// SMTP over STARTTLS, after the second EHLO.
    Smtp(BufReader<Tls>),
}

async fn tls_to(tcp: TcpStream) -> anyhow::Result<Tls> {
    let name = rustls::pki_types::ServerName::try_from("soak.test")?;
    Ok(crate::load::connector().connect(name, tcp).await?)
}

/// `request` out, the same back.
async fn echo_round(tls: &mut Tls, request: &[u8]) -> anyhow::Result<()> {
    let mut back = vec![0u8; request.len()];
    tls.write_all(request).await?;
    tls.flush().await?;
    tls.read_exact(&mut back).await?;
    anyhow::ensure!(back == request, "echo differs");
    Ok(())
}

impl Session {
    async fn open(to: SocketAddr, smtp: bool, request: &[u8]) -> anyhow::Result<Session> {
        let tcp = TcpStream::connect(to).await?;
        tcp.set_nodelay(true)?;
        if !smtp {
            let mut tls = tls_to(tcp).await?;
            echo_round(&mut tls, request).await?;
            return Ok(Session::Echo(tls));
        }
        let mut s = BufReader::new(tcp);
        expect(&mut s, b'2').await?;
        send(&mut s, b"EHLO soak.client.test\r\n", b'2').await?;
        send(&mut s, b"STARTTLS\r\n", b'2').await?;
        let mut s = BufReader::new(tls_to(s.into_inner()).await?);
        send(&mut s, b"EHLO soak.client.test\r\n", b'2').await?;
        Ok(Session::Smtp(s))
    }

    /// One turn's traffic: an echo round, or a message delivered.
    async fn turn(&mut self, request: &[u8], message: &[u8], tally: &Shared) -> anyhow::Result<()> {
        match self {
            Session::Echo(tls) => {
                echo_round(tls, request).await?;
                tally.lock().expect("not poisoned").exchanges += 1;
            }
            Session::Smtp(s) => {
                send(s, b"MAIL FROM:<soak@client.test>\r\n", b'2').await?;
                send(s, b"RCPT TO:<sink@soak.test>\r\n", b'2').await?;
                send(s, b"DATA\r\n", b'3').await?;
                s.get_mut().write_all(message).await?;
                send(s, b".\r\n", b'2').await?;
                tally.lock().expect("not poisoned").messages += 1;
            }
        }
        Ok(())
    }

    async fn close(self) -> anyhow::Result<()> {
        match self {
            Session::Echo(mut tls) => Ok(tls.shutdown().await?),
            Session::Smtp(mut s) => send(&mut s, b"QUIT\r\n", b'2').await,
        }
    }
}

/// The run's clock: when sessions are up, and each one's turns.
struct Hold {
    sessions: usize,
    up: std::sync::atomic::AtomicUsize,
    /// When the last session came up: the hold's start.
    started: tokio::sync::watch::Sender<Option<Instant>>,
    interval: Duration,
    length: Duration,
}

impl Hold {
    /// One more session is up (or failed to open).
    fn ready(&self) {
        let n = self.up.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if n == self.sessions {
            self.started.send_replace(Some(Instant::now()));
        }
    }

    /// When every session was up.
    async fn started(&self) -> Instant {
        let mut rx = self.started.subscribe();
        let started = *rx.wait_for(Option::is_some).await.expect("sender in self");
        started.expect("waited for")
    }

    /// Waits for the session's next turn (turns spread evenly over the
    /// interval); `None` when the run is over.
    async fn next_turn(&self, index: usize) -> Option<()> {
        let elapsed = self.started().await.elapsed();
        let offset = self.interval.mul_f64(index as f64 / self.sessions as f64);
        // The first turn at or after now on this session's phase.
        let turns = elapsed.saturating_sub(offset).as_secs_f64() / self.interval.as_secs_f64();
        let next = offset + self.interval.mul_f64(turns.ceil());
        if next >= self.length {
            tokio::time::sleep(self.length.saturating_sub(elapsed)).await;
            return None;
        }
        tokio::time::sleep(next.saturating_sub(elapsed)).await;
        Some(())
    }
}

/// A fresh TLS session every 100 ms until `until`: connect to one echoed
/// byte, timed.
async fn probe(to: SocketAddr, until: Instant, tally: Shared) -> Histogram<u64> {
    let mut h = Histogram::<u64>::new(3).expect("valid histogram");
    while Instant::now() < until {
        let t0 = Instant::now();
        let one = async {
            let tcp = TcpStream::connect(to).await?;
            tcp.set_nodelay(true)?;
            echo_round(&mut tls_to(tcp).await?, b"p").await
        };
        let result = match tokio::time::timeout(Duration::from_secs(30), one).await {
            Ok(result) => result,
            Err(_) => Err(anyhow::anyhow!("no answer within 30 s")),
        };
        match result {
            Ok(()) => {
                let _ = h.record(t0.elapsed().as_micros() as u64);
            }
            Err(e) => tally.lock().expect("not poisoned").error("probe", &e),
        }
        tokio::time::sleep(Duration::from_millis(100).saturating_sub(t0.elapsed())).await;
    }
    h
}

pub async fn soak(opts: Soak) -> anyhow::Result<()> {
    let tally: Shared = Arc::default();
    let hold = Arc::new(Hold {
        sessions: opts.connections,
        up: Default::default(),
        started: tokio::sync::watch::Sender::new(None),
        interval: Duration::from_secs_f64(opts.interval),
        length: Duration::from_secs_f64(opts.seconds),
    });
    // Handshakes in flight at once while the sessions open.
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    let setup = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let opening = Instant::now();
    let message = Arc::new(crate::smtp::message(2048));
    let mut sessions = tokio::task::JoinSet::new();
    for index in 0..opts.connections {
        let (hold, tally, gate, setup) = (hold.clone(), tally.clone(), gate.clone(), setup.clone());
        let message = message.clone();
        let smtp = index % 2 == 1;
        let to = if smtp { opts.smtp } else { opts.tcp };
        let kind = if smtp { "smtp" } else { "tls" };
        sessions.spawn(async move {
            let request: Vec<u8> = (0..1024).map(|i| (i + index) as u8).collect();
            let permit = gate.acquire_owned().await;
            let t0 = Instant::now();
            let opened = Session::open(to, smtp, &request).await;
            let _ = setup
                .lock()
                .expect("not poisoned")
                .record(t0.elapsed().as_micros() as u64);
            drop(permit);
            // A session that failed to open counts as up, so the run starts.
            hold.ready();
            let run = async {
                let mut session = opened?;
                while let Some(()) = hold.next_turn(index).await {
                    session.turn(&request, &message, &tally).await?;
                }
                session.close().await
            };
            if let Err(e) = run.await {
                tally.lock().expect("not poisoned").error(kind, &e);
            }
        });
    }
    // Every session up (or failed): the hold starts.
    let started = hold.started().await;
    {
        let t = tally.lock().expect("not poisoned");
        let setup = setup.lock().expect("not poisoned");
        println!(
            "{}",
            serde_json::json!({
                "ready": opts.connections,
                "opening_s": opening.elapsed().as_secs_f64(),
                "setup": crate::load::percentiles(&setup),
                "errors": t.errors.values().sum::<u64>(),
            })
        );
    }
    let probes = tokio::spawn(probe(opts.tcp, started + hold.length, tally.clone()));
    while sessions.join_next().await.is_some() {}
    let probes = probes.await?;
    let t = tally.lock().expect("not poisoned");
    println!(
        "{}",
        serde_json::json!({
            "sessions": opts.connections,
            "exchanges": t.exchanges,
            "messages": t.messages,
            "errors": t.errors.values().sum::<u64>(),
            "error_kinds": t.errors,
            "probe_handshakes": probes.len(),
            "probe": crate::load::percentiles(&probes),
        })
    );
    Ok(())
}
