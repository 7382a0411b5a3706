//! Upstream pools at run time: the pool machine
//! ([`tlsrelay_core::upstream::Pool`]) behind a lock, the active health
//! checks as one task per server, passive ejection (and readmission where
//! no check runs), and the registry that keeps a pool's health and
//! sessions across reloads. Sessions take a server with
//! [`PoolState::pick`] and hold a [`Lease`] while they use it.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::names::UpstreamNames;
use crate::tls::UpstreamTls;
use tlsrelay_core::config::HealthCheck;
use tlsrelay_core::upstream::HostPort;
use tlsrelay_core::upstream::{Admin, Pool, ServerView, Transition};

/// How a pool's health is decided: what `Upstream` configured.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    pub check: Option<HealthCheck>,
    pub eject_time: Duration,
    pub connect_timeout: Duration,
    /// Resolves the servers named by DNS (sessions and checks alike).
    pub names: UpstreamNames,
}

/// One upstream's pool, shared by the sessions of every plan that names
/// it while its servers stay the same.
pub struct PoolState {
    pub name: String,
    pool: Mutex<Pool>,
    settings: PoolSettings,
    /// The servers' TLS as the latest plan built it (the checks use it).
    tls: Mutex<Arc<Vec<Option<Arc<UpstreamTls>>>>>,
    checking: AtomicBool,
    /// Per server: checks passed, checks failed.
    checks: Vec<(AtomicU64, AtomicU64)>,
}

/// Which server a session uses; released when dropped.
pub struct Lease {
    state: Arc<PoolState>,
    pub server: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.state.lock().released(self.server);
    }
}

/// A pool's servers as `tlsrelay status` shows them.
#[derive(Clone, Debug, serde::Serialize)]
pub struct UpstreamView {
    pub name: String,
    pub balance: String,
    pub checks: bool,
    pub servers: Vec<ServerStatus>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ServerStatus {
    pub address: String,
    pub weight: u32,
    pub backup: bool,
    pub up: bool,
    pub admin: String,
    pub sessions: u64,
    pub ejections: u64,
    pub checks_passed: u64,
    pub checks_failed: u64,
}

impl PoolState {
    fn new(name: &str, pool: Pool, settings: PoolSettings) -> PoolState {
        let checks = (0..pool.len())
            .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
            .collect();
        PoolState {
            name: name.to_string(),
            pool: Mutex::new(pool),
            settings,
            tls: Mutex::new(Arc::new(Vec::new())),
            checking: AtomicBool::new(false),
            checks,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The server for a session that already tried (and failed) `tried`;
    /// `key` is the client address or SNI for the hash balances.
    pub fn pick(&self, key: Option<&[u8]>, tried: &[usize]) -> Option<usize> {
        self.lock().pick(key, tried)
    }

    /// How the pool's server names are resolved.
    pub fn names(&self) -> &UpstreamNames {
        &self.settings.names
    }

    pub fn address(&self, server: usize) -> HostPort {
        self.lock().address(server).clone()
    }

    /// How many servers it has.
    pub fn servers(&self) -> usize {
        self.lock().len()
    }

    pub fn balance(&self) -> tlsrelay_core::upstream::Balance {
        self.lock().balance()
    }

    /// A session connected to `server`: it is counted until the lease
    /// drops.
    pub fn connected(self: &Arc<Self>, server: usize) -> Lease {
        self.lock().connected(server);
        Lease {
            state: self.clone(),
            server,
        }
    }

    /// A session's connect to `server` failed.
    pub fn connect_failed(self: &Arc<Self>, server: usize) {
        let transition = self.lock().connect_failed(server);
        if let Some(t) = transition {
            self.log(&t);
            // Without active checks nothing would bring it back: try it
            // again after the ejection time.
            if self.settings.check.is_none() {
                let state = Arc::downgrade(self);
                let wait = self.settings.eject_time;
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    if let Some(state) = state.upgrade() {
                        let readmitted = state.lock().readmit(server);
                        if let Some(t) = readmitted {
                            state.log(&t);
                        }
                    }
                });
            }
        }
    }

    fn log(&self, t: &Transition) {
        let server = self.address(t.server);
        if t.up {
            tracing::info!(upstream = %self.name, %server, "server up: {}", t.why);
        } else {
            tracing::warn!(upstream = %self.name, %server, "server down: {}", t.why);
        }
    }

    /// Sets an operator's state for the server named `address`.
    pub fn set_admin(&self, address: &str, admin: Admin) -> Result<(), String> {
        let mut pool = self.lock();
        let server = pool
            .find(address)
            .ok_or_else(|| format!("upstream {} has no server {address}", self.name))?;
        pool.set_admin(server, admin);
        tracing::info!(upstream = %self.name, server = address, "server set to {admin}");
        Ok(())
    }

    pub fn view(&self) -> UpstreamView {
        let pool = self.lock();
        UpstreamView {
            name: self.name.clone(),
            balance: pool.balance().to_string(),
            checks: self.settings.check.is_some(),
            servers: pool
                .view()
                .into_iter()
                .zip(&self.checks)
                .map(|(v, (ok, failed)): (ServerView, _)| ServerStatus {
                    address: v.address,
                    weight: v.weight,
                    backup: v.backup,
                    up: v.up,
                    admin: v.admin.to_string(),
                    sessions: v.active,
                    ejections: v.ejections,
                    checks_passed: ok.load(Ordering::Relaxed),
                    checks_failed: failed.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }

    /// The servers' TLS from the plan built last.
    pub fn use_tls(&self, tls: Vec<Option<Arc<UpstreamTls>>>) {
        *self.tls.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(tls);
    }

    /// Starts the active checks, once per pool (on the runtime).
    pub fn ensure_checking(self: &Arc<Self>) {
        let Some(check) = &self.settings.check else {
            return;
        };
        if self.checking.swap(true, Ordering::SeqCst) {
            return;
        }
        for server in 0..self.servers() {
            tokio::spawn(check_loop(Arc::downgrade(self), server, check.clone()));
        }
    }
}

/// A random fraction in [0, 1), for jitter.
fn jitter() -> f64 {
    let h = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// Checks one server every `interval` (plus up to a tenth of it, so the
/// servers of a fleet's relays are not all checked at once) until its
/// pool is gone.
async fn check_loop(state: Weak<PoolState>, server: usize, check: HealthCheck) {
    // The first check comes at a random point of the first interval.
    tokio::time::sleep(check.interval.mul_f64(jitter())).await;
    loop {
        let Some(pool) = state.upgrade() else {
            return;
        };
        let address = pool.address(server);
        let tls = pool.tls.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let tls = tls.get(server).cloned().flatten();
        let names = pool.settings.names.clone();
        let limit = check.timeout.unwrap_or(pool.settings.connect_timeout);
        drop(pool);
        let probe = probe(&address, &names, tls.as_deref(), &check);
        let result = match tokio::time::timeout(limit, probe).await {
            Ok(result) => result,
            Err(_) => Err("timed out".to_string()),
        };
        let Some(pool) = state.upgrade() else {
            return;
        };
        let (ok, failed) = &pool.checks[server];
        match &result {
            Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => failed.fetch_add(1, Ordering::Relaxed),
        };
        let detail = result.as_ref().err().map_or("", String::as_str);
        let transition = pool.lock().checked(server, result.is_ok(), detail);
        if let Some(t) = transition {
            pool.log(&t);
        }
        drop(pool);
        tokio::time::sleep(check.interval.mul_f64(1.0 + 0.1 * jitter())).await;
    }
}

/// One check: connect; the TLS handshake when asked (the upstream's own
/// verification); send; the reply's start.
async fn probe(
    address: &HostPort,
    names: &UpstreamNames,
    tls: Option<&UpstreamTls>,
    check: &HealthCheck,
) -> Result<(), String> {
    let addrs = names
        .resolve(address)
        .await
        .map_err(|_| "name not resolved".to_string())?;
    let tcp = TcpStream::connect(&addrs[..])
        .await
        .map_err(|e| crate::legs::io_class(&e).to_string())?;
    let _ = tcp.set_nodelay(true);
    match (check.tls, tls) {
        (true, Some(tls)) => {
            // A required policy's verifier fails the handshake itself.
            let mut stream = tls
                .connect(tcp)
                .await
                .map_err(|e| format!("TLS: {}", crate::tls::classify_failure(&e)))?;
            converse(&mut stream, check).await
        }
        _ => {
            let mut tcp = tcp;
            converse(&mut tcp, check).await
        }
    }
}

async fn converse<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    check: &HealthCheck,
) -> Result<(), String> {
    if let Some(send) = &check.send {
        let bytes = send.replace("\\r", "\r").replace("\\n", "\n");
        stream
            .write_all(bytes.as_bytes())
            .await
            .map_err(|e| crate::legs::io_class(&e).to_string())?;
    }
    if let Some(expect) = &check.expect {
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while got.len() < expect.len() {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| crate::legs::io_class(&e).to_string())?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        if !got.starts_with(expect.as_bytes()) {
            return Err(format!(
                "expected {expect:?}, got {:?}",
                String::from_utf8_lossy(&got[..got.len().min(64)])
            ));
        }
    }
    Ok(())
}

/// The pools of a process by upstream name: a plan built again (a
/// reload) takes the pool of the same name and the same servers and
/// health settings with its state as it is.
#[derive(Clone, Default)]
pub struct Pools {
    inner: Arc<Mutex<HashMap<String, Registered>>>,
}

/// A pool in the registry: what it was built from, and the pool while
/// any plan uses it.
type Registered = (String, Weak<PoolState>);

impl Pools {
    /// The live pool for `name` built from exactly `pool` and `settings`,
    /// or a new one.
    pub fn get_or_create(&self, name: &str, pool: Pool, settings: PoolSettings) -> Arc<PoolState> {
        let fingerprint = format!("{} {}", pool.fingerprint(), settings_key(&settings));
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((known, weak)) = map.get(name) {
            if *known == fingerprint {
                if let Some(live) = weak.upgrade() {
                    return live;
                }
            }
        }
        let state = Arc::new(PoolState::new(name, pool, settings));
        map.insert(name.to_string(), (fingerprint, Arc::downgrade(&state)));
        state
    }

    /// Every pool still in use, by name.
    pub fn live(&self) -> Vec<Arc<PoolState>> {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut pools: Vec<Arc<PoolState>> =
            map.values().filter_map(|(_, w)| w.upgrade()).collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        pools
    }

    pub fn find(&self, name: &str) -> Option<Arc<PoolState>> {
        self.live().into_iter().find(|p| p.name == name)
    }
}

fn settings_key(s: &PoolSettings) -> String {
    format!("{:?} {:?} {:?}", s.check, s.eject_time, s.names)
}
