//! The runtime view: a unix socket in the state directory (its owner's
//! and root's only) where `tlsrelay status` reads the listeners, the
//! upstream pools with each server's health, weight and sessions, and
//! drains or enables a server, as operators script HAProxy's runtime API
//! (`set server … state drain`). One request line per connection:
//! `show`, `show json`, `drain UPSTREAM SERVER`, `enable UPSTREAM SERVER`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use crate::upstreams::{Pools, UpstreamView};
use tlsrelay_core::upstream::Admin;

/// Where the socket is, in a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("status.sock")
}

/// Binds the socket (0600: the relay's user and root), replacing one a
/// previous run left.
pub fn bind(state_dir: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    crate::state::create_dir(state_dir)?;
    let path = socket_path(state_dir);
    if std::fs::symlink_metadata(&path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_socket()
    }) {
        std::fs::remove_file(&path)?;
    }
    let listener = std::os::unix::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// What the view shows.
#[derive(Clone)]
pub struct Source {
    pub pools: Pools,
    pub listeners: Vec<ListenerView>,
    pub started: Instant,
}

#[derive(Clone, Debug, Serialize)]
pub struct ListenerView {
    pub name: String,
    pub address: SocketAddr,
}

#[derive(Serialize)]
struct View<'a> {
    version: &'static str,
    uptime_seconds: u64,
    listeners: &'a [ListenerView],
    upstreams: Vec<UpstreamView>,
}

/// Answers requests on `listener` until the task is dropped.
pub async fn serve(listener: std::os::unix::net::UnixListener, source: Source) {
    let Ok(listener) = UnixListener::from_std(listener) else {
        return;
    };
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let source = source.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(read);
            let read = reader.read_line(&mut line);
            if tokio::time::timeout(std::time::Duration::from_secs(5), read)
                .await
                .is_err()
            {
                return;
            }
            let answer = answer(&source, line.trim());
            let _ = write.write_all(answer.as_bytes()).await;
            let _ = write.shutdown().await;
        });
    }
}

/// The reply to one request line.
fn answer(source: &Source, request: &str) -> String {
    let words: Vec<&str> = request.split_whitespace().collect();
    let view = || View {
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: source.started.elapsed().as_secs(),
        listeners: &source.listeners,
        upstreams: source.pools.live().iter().map(|p| p.view()).collect(),
    };
    match words.as_slice() {
        ["show"] | [] => render(&view()),
        ["show", "json"] => serde_json::to_string_pretty(&view()).unwrap_or_default() + "\n",
        [verb @ ("drain" | "enable"), upstream, server] => {
            let admin = if *verb == "drain" {
                Admin::Drain
            } else {
                Admin::Ready
            };
            let done = source
                .pools
                .find(upstream)
                .ok_or_else(|| format!("no upstream named {upstream}"))
                .and_then(|pool| pool.set_admin(server, admin));
            match done {
                Ok(()) => format!("ok: {upstream} {server} {admin}\n"),
                Err(e) => format!("error: {e}\n"),
            }
        }
        _ => "error: expected show, show json, drain UPSTREAM SERVER or enable UPSTREAM SERVER\n"
            .to_string(),
    }
}

/// The view as an operator reads it.
fn render(view: &View<'_>) -> String {
    let mut out = format!("tlsrelay {} up {} s\n", view.version, view.uptime_seconds);
    for l in view.listeners {
        out += &format!("listener {} on {}\n", l.name, l.address);
    }
    for u in &view.upstreams {
        out += &format!(
            "upstream {} (balance {}, {})\n",
            u.name,
            u.balance,
            if u.checks {
                "active checks"
            } else {
                "no active checks"
            }
        );
        for s in &u.servers {
            out += &format!(
                "  {:<28} {:<4} {:<5} weight {:<3} sessions {:<6} ejections {:<4} checks {}/{}{}\n",
                s.address,
                if s.up { "UP" } else { "DOWN" },
                s.admin,
                s.weight,
                s.sessions,
                s.ejections,
                s.checks_passed,
                s.checks_passed + s.checks_failed,
                if s.backup { " backup" } else { "" }
            );
        }
    }
    out
}

/// `tlsrelay status`: sends one request to the running relay's socket and
/// returns its answer.
pub fn ask(socket: &Path, request: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    stream.write_all(format!("{request}\n").as_bytes())?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}
