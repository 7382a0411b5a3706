//! Chaos load: an SMTP next hop that records every message it accepted
//! (killed and restarted by the harness), SMTP senders with a retry queue
//! as an MTA has, and TCP clients that check every byte of their echo.
//! Both sides keep journals; `cargo xtask chaos` reconciles them.

use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Recipients with this local part are refused by the store (550 at
/// RCPT): the sender must bounce them and the store must hold none.
pub const REFUSED_LOCAL_PART: &str = "refuse";

/// A journal appended to with one write(2) per line (so a line is there or
/// not, whenever the process is killed), and a listener.
type Journal = Arc<Mutex<std::fs::File>>;

fn journalled(
    listen: SocketAddr,
    journal: &Path,
    what: &str,
) -> anyhow::Result<(tokio::net::TcpListener, Journal)> {
    let listener = crate::load::listener(listen)
        .with_context(|| format!("{what} cannot listen on {listen}"))?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(journal)?;
    println!("{what} listening on {listen}");
    Ok((listener, Arc::new(Mutex::new(file))))
}

/// An SMTP next hop that appends `<message-id> <attempt>` to `journal`
/// for each message it accepts, in one write(2) before its 250: a copy is
/// "stored" exactly when that line exists, even if the process is killed
/// a moment later.
pub async fn store(listen: SocketAddr, journal: &Path) -> anyhow::Result<()> {
    let (listener, journal) = journalled(listen, journal, "SMTP store")?;
    loop {
        let (tcp, _) = listener.accept().await?;
        let journal = journal.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let _ = store_session(tcp, &journal).await;
        });
    }
}

async fn store_session(tcp: TcpStream, journal: &Mutex<std::fs::File>) -> std::io::Result<()> {
    let mut s = BufReader::new(tcp);
    s.write_all(b"220 store.chaos.test ESMTP\r\n").await?;
    let mut line = Vec::new();
    let mut refused = false;
    loop {
        line.clear();
        if s.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let upper = String::from_utf8_lossy(&line).to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            b"250-store.chaos.test\r\n250-8BITMIME\r\n250 SIZE 104857600\r\n"
        } else if upper.starts_with("MAIL") {
            refused = false;
            b"250 2.1.0 Ok\r\n"
        } else if upper.starts_with("RCPT") {
            if upper.contains(&format!("<{}@", REFUSED_LOCAL_PART.to_ascii_uppercase())) {
                refused = true;
                b"550 5.1.1 No such user\r\n"
            } else {
                b"250 2.1.5 Ok\r\n"
            }
        } else if upper.starts_with("DATA") {
            s.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                .await?;
            let mut id = None;
            let mut attempt = None;
            loop {
                line.clear();
                if s.read_until(b'\n', &mut line).await? == 0 {
                    return Ok(()); // cut mid-message: nothing stored
                }
                if line == b".\r\n" {
                    break;
                }
                let text = String::from_utf8_lossy(&line);
                if let Some(v) = text.strip_prefix("Message-Id: ") {
                    id = Some(v.trim().to_string());
                } else if let Some(v) = text.strip_prefix("X-Attempt: ") {
                    attempt = Some(v.trim().to_string());
                }
            }
            if refused {
                b"554 5.5.1 No valid recipients\r\n"
            } else {
                let record = format!(
                    "{} {}\n",
                    id.as_deref().unwrap_or("-"),
                    attempt.as_deref().unwrap_or("-")
                );
                journal
                    .lock()
                    .expect("not poisoned")
                    .write_all(record.as_bytes())?;
                b"250 2.0.0 Ok: stored\r\n"
            }
        } else if upper.starts_with("QUIT") {
            s.write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(());
        } else {
            b"250 2.0.0 Ok\r\n"
        };
        s.write_all(reply).await?;
    }
}

#[derive(clap::Args)]
pub struct Senders {
    /// The relay's SMTP listener.
    #[arg(long)]
    pub smtp: SocketAddr,
    /// Messages under way at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// One JSON line per delivery attempt.
    #[arg(long)]
    pub journal: PathBuf,
    /// TCP listeners in front of the `tcp-peer` to check transfers
    /// through (downloads and uploads, plaintext and TLS, on each).
    #[arg(long)]
    pub tcp: Vec<SocketAddr>,
    /// Bytes per transfer.
    #[arg(long, default_value_t = 1 << 20)]
    pub tcp_bytes: usize,
    /// Seconds to go on with what is still queued after standard input
    /// closes (no new messages from then on).
    #[arg(long, default_value_t = 120.0)]
    pub drain: f64,
}

/// TCP transfers under way at once.
const TCP_LANES: usize = 4;

/// A queued message: its number, the next attempt, when it is due.
struct Queued {
    n: usize,
    attempt: u32,
    due: Instant,
}

/// What one delivery attempt ended with, as the sender saw it.
fn outcome(result: &anyhow::Result<String>) -> String {
    match result {
        // The relay's 4xx texts are classes (which next-hop failure).
        Ok(reply) if reply.starts_with('4') => reply.clone(),
        Ok(reply) => reply.chars().take(3).collect(),
        Err(e) => {
            let io = e.downcast_ref::<std::io::Error>().map(|e| e.kind());
            match io {
                Some(kind) => format!("no reply ({kind:?})"),
                None => format!("no reply ({})", e.root_cause()),
            }
        }
    }
}

fn message_id(n: usize) -> String {
    format!("<chaos-{n}@sender.chaos.test>")
}

fn recipient(n: usize) -> String {
    // One in twenty is refused by the next hop.
    if n % 20 == 7 {
        format!("{REFUSED_LOCAL_PART}@chaos.test")
    } else {
        format!("user{n}@chaos.test")
    }
}

/// Reads one reply (the last line of a multi-line one) within 30 s.
async fn reply<S: tokio::io::AsyncRead + Unpin>(s: &mut BufReader<S>) -> anyhow::Result<String> {
    let mut line = String::new();
    loop {
        line.clear();
        let n = tokio::time::timeout(Duration::from_secs(30), s.read_line(&mut line))
            .await
            .map_err(|_| anyhow::anyhow!("timed out"))??;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(line.trim_end().to_string());
        }
    }
}

/// One delivery attempt; the reply that decided it (a refusal at any
/// step is final for this attempt).
async fn attempt(to: SocketAddr, n: usize, attempt: u32) -> anyhow::Result<String> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(to))
        .await
        .map_err(|_| anyhow::anyhow!("connect timed out"))??;
    tcp.set_nodelay(true)?;
    let mut s = BufReader::new(tcp);
    let greeting = reply(&mut s).await?;
    if !greeting.starts_with('2') {
        return Ok(greeting);
    }
    let rcpt = recipient(n);
    for command in [
        "EHLO sender.chaos.test".to_string(),
        "MAIL FROM:<mta@sender.chaos.test>".to_string(),
        format!("RCPT TO:<{rcpt}>"),
        "DATA".to_string(),
    ] {
        s.get_mut()
            .write_all(format!("{command}\r\n").as_bytes())
            .await?;
        let r = reply(&mut s).await?;
        if !(r.starts_with('2') || r.starts_with('3')) {
            return Ok(r);
        }
    }
    let mut body = format!(
        "Message-Id: {}\r\nX-Attempt: {attempt}\r\nFrom: mta@sender.chaos.test\r\nTo: {rcpt}\r\nSubject: chaos {n}\r\n\r\n",
        message_id(n)
    );
    // 32 KiB of body: long enough to be cut mid-DATA.
    let line = format!("{}\r\n", "c".repeat(62));
    while body.len() < 32 * 1024 {
        body += &line;
    }
    body += ".\r\n";
    s.get_mut().write_all(body.as_bytes()).await?;
    let r = reply(&mut s).await?;
    let _ = s.get_mut().write_all(b"QUIT\r\n").await;
    Ok(r)
}

/// The senders: new messages until standard input closes, each retried
/// until it settles (2xx or 5xx); then the rest of the queue, for at most
/// `drain` seconds. TCP checks run meanwhile.
pub async fn senders(opts: Senders) -> anyhow::Result<()> {
    let started = Instant::now();
    let queue: Arc<Mutex<VecDeque<Queued>>> = Arc::default();
    // Messages made so far, and those not yet settled.
    let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (stop_tx, stop) = tokio::sync::watch::channel(None::<Instant>);
    tokio::spawn(async move {
        let mut rest = Vec::new();
        let _ = tokio::io::stdin().read_to_end(&mut rest).await;
        let _ = stop_tx.send(Some(Instant::now()));
        // Keep the channel open until the workers are done.
        std::future::pending::<()>().await;
    });
    let drain = Duration::from_secs_f64(opts.drain);
    let journal = Arc::new(Mutex::new(std::io::BufWriter::new(std::fs::File::create(
        &opts.journal,
    )?)));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..opts.concurrency {
        let (queue, made, pending, journal) = (
            queue.clone(),
            made.clone(),
            pending.clone(),
            journal.clone(),
        );
        let stop = stop.clone();
        let to = opts.smtp;
        workers.spawn(async move {
            loop {
                let stopped = *stop.borrow();
                if stopped.is_some_and(|at| {
                    pending.load(std::sync::atomic::Ordering::SeqCst) == 0 || at.elapsed() > drain
                }) {
                    return anyhow::Ok(());
                }
                let next = {
                    let mut q = queue.lock().expect("not poisoned");
                    let now = Instant::now();
                    match q.iter().position(|m| m.due <= now) {
                        Some(i) => q.remove(i),
                        None if stopped.is_none() => {
                            pending.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            Some(Queued {
                                n: made.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
                                attempt: 1,
                                due: now,
                            })
                        }
                        None => None,
                    }
                };
                let Some(m) = next else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let result = attempt(to, m.n, m.attempt).await;
                let outcome = outcome(&result);
                let settled = outcome.starts_with('2') || outcome.starts_with('5');
                writeln!(
                    journal.lock().expect("not poisoned"),
                    "{}",
                    serde_json::json!({
                        "id": message_id(m.n),
                        "attempt": m.attempt,
                        "outcome": outcome,
                        "reply": result.as_ref().ok(),
                    })
                )?;
                if settled {
                    pending.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                } else {
                    // Retried as an MTA would, sooner: 100 ms per attempt so far.
                    let wait = Duration::from_millis(100 * u64::from(m.attempt.min(20)));
                    queue.lock().expect("not poisoned").push_back(Queued {
                        n: m.n,
                        attempt: m.attempt + 1,
                        due: Instant::now() + wait,
                    });
                }
            }
        });
    }
    // TCP: transfers back to back until the senders are done: each
    // listener in turn, downloads and uploads, plaintext and TLS.
    let (tcp_stop, tcp_stopped) = tokio::sync::watch::channel(false);
    let tally = Arc::new(Mutex::new(std::collections::BTreeMap::<String, u64>::new()));
    let mut transfers = tokio::task::JoinSet::new();
    for lane in 0..TCP_LANES {
        let (targets, bytes) = (opts.tcp.clone(), opts.tcp_bytes);
        let (tally, mut stopped) = (tally.clone(), tcp_stopped.clone());
        transfers.spawn(async move {
            // Every lane goes through every listener, direction and TLS.
            let mut k = 0;
            while !targets.is_empty() && !*stopped.borrow_and_update() {
                let to = targets[k % targets.len()];
                let upload = (k / targets.len()) % 2 == 1;
                let tls = (k / targets.len() / 2) % 2 == 1;
                let seed = (k * TCP_LANES + lane) as u64;
                let result = transfer(to, tls, upload, bytes, seed).await;
                let key = format!(
                    "{to} {} {} {result}",
                    if tls { "tls" } else { "plain" },
                    if upload { "upload" } else { "download" }
                );
                *tally.lock().expect("not poisoned").entry(key).or_default() += 1;
                k += 1;
            }
        });
    }
    drop(tcp_stopped);
    while let Some(done) = workers.join_next().await {
        done??;
    }
    let _ = tcp_stop.send(true);
    journal.lock().expect("not poisoned").flush()?;
    while transfers.join_next().await.is_some() {}
    let tcp = tally.lock().expect("not poisoned").clone();
    println!(
        "{}",
        serde_json::json!({
            "messages": made.load(std::sync::atomic::Ordering::SeqCst),
            "unsettled": pending.load(std::sync::atomic::Ordering::SeqCst),
            "seconds": started.elapsed().as_secs_f64(),
            "tcp": tcp,
        })
    );
    Ok(())
}

/// The bytes a transfer carries: a function of its length and seed.
fn pattern(bytes: u64, seed: u64) -> Vec<u8> {
    (0..bytes)
        .map(|i| ((i.wrapping_mul(31) ^ seed.wrapping_mul(7)) % 251) as u8)
        .collect()
}

/// A TCP upstream for the chaos checks. Each connection starts with a
/// 17-byte request: `D` or `U`, a length, a seed (both u64, big-endian).
/// `D`: the peer sends that many bytes and closes. `U`: it reads that many
/// and answers `ok` - and if the stream ends cleanly (FIN) before they
/// all came, appends `truncated upload …` to `journal`: an upload cut
/// short that looked complete.
pub async fn tcp_peer(listen: SocketAddr, journal: &Path) -> anyhow::Result<()> {
    let (listener, journal) = journalled(listen, journal, "TCP peer")?;
    loop {
        let (mut tcp, _) = listener.accept().await?;
        let journal = journal.clone();
        tokio::spawn(async move {
            let mut head = [0u8; 17];
            if tcp.read_exact(&mut head).await.is_err() {
                return;
            }
            let bytes = u64::from_be_bytes(head[1..9].try_into().expect("8 bytes"));
            let seed = u64::from_be_bytes(head[9..17].try_into().expect("8 bytes"));
            if head[0] == b'D' {
                let _ = tcp.write_all(&pattern(bytes, seed)).await;
                let _ = tcp.shutdown().await;
                return;
            }
            let mut got = Vec::new();
            let end = (&mut tcp).take(bytes).read_to_end(&mut got).await;
            let verdict = match end {
                Err(_) => "reset upload",
                Ok(_) if got.len() as u64 != bytes => "truncated upload",
                Ok(_) if got != pattern(bytes, seed) => "corrupted upload",
                Ok(_) => {
                    let _ = tcp.write_all(b"ok").await;
                    let _ = tcp.shutdown().await;
                    return;
                }
            };
            let line = format!("{verdict} seed {seed}: {} of {bytes} bytes\n", got.len());
            let _ = journal
                .lock()
                .expect("not poisoned")
                .write_all(line.as_bytes());
        });
    }
}

/// One transfer through the relay to the TCP peer: a download of `bytes`
/// or an upload of them, plaintext or TLS. How it ended for the client:
/// `intact`; `reset` (an error: it was told the stream broke); for a
/// download `truncated` (a clean end before all bytes came) or
/// `corrupted`; for an upload `unconfirmed` (ended without the peer's
/// `ok`, which the client can tell: the peer's own journal says whether
/// it took a cut upload for whole).
async fn transfer(
    to: SocketAddr,
    tls: bool,
    upload: bool,
    bytes: usize,
    seed: u64,
) -> &'static str {
    let data = pattern(bytes as u64, seed);
    let mut head = vec![if upload { b'U' } else { b'D' }];
    head.extend_from_slice(&(bytes as u64).to_be_bytes());
    head.extend_from_slice(&seed.to_be_bytes());
    let run = async {
        let tcp = TcpStream::connect(to).await?;
        tcp.set_nodelay(true)?;
        let mut stream: Box<dyn crate::load::Stream> = if tls {
            let name = rustls::pki_types::ServerName::try_from("chaos.test")
                .map_err(std::io::Error::other)?;
            Box::new(crate::load::connector().connect(name, tcp).await?)
        } else {
            Box::new(tcp)
        };
        stream.write_all(&head).await?;
        if upload {
            stream.write_all(&data).await?;
        }
        stream.shutdown().await?;
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await?;
        std::io::Result::Ok(back)
    };
    match tokio::time::timeout(Duration::from_secs(30), run).await {
        Ok(Ok(back)) if upload && back == b"ok" => "intact",
        Ok(Ok(_)) if upload => "unconfirmed",
        Ok(Ok(back)) if back == data => "intact",
        Ok(Ok(back)) if data.starts_with(&back) => "truncated",
        Ok(Ok(_)) => "corrupted",
        Ok(Err(_)) => "reset",
        Err(_) => "stalled",
    }
}
