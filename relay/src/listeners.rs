//! The listeners: bind a [`Plan`]'s addresses, run the accept loops with
//! connection limits (in all and per client address; one task per
//! session), switch plans on reload, and drain on shutdown.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::legs::{client_address, ClientAddress};
use crate::plan::{ConnectionLimits, Listening, Plan};
use crate::session;
use tlsrelay_core::access::Denied;
use tlsrelay_core::report::Outcome;
use tlsrelay_core::report::SessionReport;
use tlsrelay_sys::bpf::WireCounters;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("listener {listener}: cannot listen on {address}: {source}")]
    Bind {
        listener: String,
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Bound listeners, ready to serve. They are bound before the runtime
/// starts (and before the relay gives up root), and handed to the
/// runtime when served.
pub struct Listeners {
    listeners: Vec<(std::net::TcpListener, Arc<watch::Sender<Listening>>)>,
    limit: Arc<Semaphore>,
    limits: ConnectionLimits,
    reports: Option<mpsc::UnboundedSender<SessionReport>>,
    wire: Option<Arc<WireCounters>>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// Binds a listener whose accept queue takes a burst of clients: up to
/// `limits.max_connections` (the kernel caps it at net.core.somaxconn).
/// The runtime's default, 128, overflows when hundreds of clients connect
/// at once while the pump keeps the cores busy, and every SYN dropped
/// costs its client a one-second retransmission.
fn bind_listener(address: SocketAddr, backlog: u32) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(backlog as i32)?;
    Ok(socket.into())
}

impl Listeners {
    pub fn bind(plan: Plan) -> Result<Listeners, ListenError> {
        let mut listeners = Vec::new();
        let backlog = plan.limits.total.clamp(128, 65535) as u32;
        for (address, lp) in plan.listeners {
            let socket = bind_listener(address, backlog).map_err(|source| ListenError::Bind {
                listener: lp.name().to_string(),
                address,
                source,
            })?;
            listeners.push((socket, Arc::new(watch::Sender::new(lp))));
        }
        Ok(Listeners {
            listeners,
            limit: Arc::new(Semaphore::new(plan.limits.total)),
            limits: plan.limits,
            reports: None,
            wire: None,
            metrics: None,
        })
    }

    /// Where each listener actually listens (port 0 resolved).
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|(s, p)| Some((p.borrow().name().to_string(), s.local_addr().ok()?)))
            .collect()
    }

    /// The switch that puts a reloaded plan in place.
    pub fn plan_switch(&self) -> PlanSwitch {
        PlanSwitch {
            listeners: self
                .listeners
                .iter()
                .filter_map(|(s, p)| Some((s.local_addr().ok()?, p.clone())))
                .collect(),
        }
    }

    /// Records each session's view of its sockets in the eBPF maps.
    pub fn record_wire_views(&mut self, wire: Arc<WireCounters>) {
        self.wire = Some(wire);
    }

    /// Counts every connection and session report into `metrics`.
    pub fn count_into(&mut self, metrics: Arc<crate::metrics::Metrics>) {
        metrics.watch_listeners(
            self.listeners
                .iter()
                .map(|(_, tx)| tx.subscribe())
                .collect(),
        );
        self.metrics = Some(metrics);
    }

    /// Also sends every session report to `tx` (tests, the demo).
    pub fn send_reports_to(&mut self, tx: mpsc::UnboundedSender<SessionReport>) {
        self.reports = Some(tx);
    }

    /// Accepts and serves until `shutdown` resolves; then stops accepting
    /// and lets sessions under way finish for up to `drain`. Past that,
    /// SMTP sessions answer 421 4.3.2 and close (TCP sessions end with the
    /// process).
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()>,
        drain: std::time::Duration,
    ) {
        let ids = Arc::new(AtomicU64::new(1));
        let (closing_tx, closing) = watch::channel(false);
        let mut accept_loops = tokio::task::JoinSet::new();
        let per_client = Arc::new(PerClient::new(self.limits.per_client));
        for (socket, plan) in self.listeners {
            plan.borrow().start_checks();
            let socket = match TcpListener::from_std(socket) {
                Ok(socket) => socket,
                Err(e) => {
                    tracing::error!(listener = %plan.borrow().name(), "cannot serve: {e}");
                    continue;
                }
            };
            accept_loops.spawn(accept_loop(
                socket,
                plan,
                Admission {
                    total: self.limit.clone(),
                    per_client: per_client.clone(),
                },
                ids.clone(),
                Sinks {
                    reports: self.reports.clone(),
                    wire: self.wire.clone(),
                    metrics: self.metrics.clone(),
                    closing: closing.clone(),
                },
            ));
        }
        shutdown.await;
        accept_loops.shutdown().await;
        let (limit, max) = (self.limit, self.limits.total);
        let active = || max - limit.available_permits();
        let settle = |until: tokio::time::Instant| async move {
            while active() > 0 && tokio::time::Instant::now() < until {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        };
        if active() > 0 {
            tracing::info!(
                "stopped accepting; {} sessions may finish within {drain:?}",
                active()
            );
            settle(tokio::time::Instant::now() + drain).await;
        }
        if active() > 0 {
            tracing::info!(
                "drain time is up: closing {} sessions (SMTP clients get 421 4.3.2)",
                active()
            );
            let _ = closing_tx.send(true);
            settle(tokio::time::Instant::now() + std::time::Duration::from_secs(2)).await;
        }
    }
}

/// Where finished sessions' reports go besides the log, and the drain
/// signal sessions hear.
#[derive(Clone)]
struct Sinks {
    reports: Option<mpsc::UnboundedSender<SessionReport>>,
    wire: Option<Arc<WireCounters>>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    closing: watch::Receiver<bool>,
}

/// Puts a new [`Plan`] in place for the listeners already bound: sessions
/// accepted from then on use it (new certificates, connectors, policies);
/// sessions under way keep the plan they started with.
#[derive(Clone)]
pub struct PlanSwitch {
    listeners: Vec<(SocketAddr, Arc<watch::Sender<Listening>>)>,
}

impl PlanSwitch {
    /// Swaps in every listener of `plan` that exists by name; returns what
    /// could not be applied without a restart (new, moved or removed
    /// listeners, a changed connection limit).
    pub fn apply(&self, plan: Plan, limits: ConnectionLimits) -> Vec<String> {
        let mut left = Vec::new();
        // Names the new plan still has, switched in or not.
        let mut kept = Vec::new();
        for (address, listening) in plan.listeners {
            let name = listening.name().to_string();
            let current = self
                .listeners
                .iter()
                .find(|(_, tx)| tx.borrow().name() == name);
            match current {
                Some((bound, tx)) if address.port() == 0 || *bound == address => {
                    listening.start_checks();
                    tx.send_replace(listening);
                }
                Some((bound, _)) => left.push(format!(
                    "listener {name}: moving from {bound} to {address} needs a restart"
                )),
                None => left.push(format!(
                    "listener {name} is new: starting it needs a restart"
                )),
            }
            kept.push(name);
        }
        for (_, tx) in &self.listeners {
            let name = tx.borrow().name().to_string();
            if !kept.contains(&name) {
                left.push(format!(
                    "listener {name} was removed: it keeps serving until a restart"
                ));
            }
        }
        if plan.limits.total != limits.total {
            left.push("limits.max_connections changes on restart".to_string());
        }
        if plan.limits.per_client != limits.per_client {
            left.push("limits.max_connections_per_client changes on restart".to_string());
        }
        left
    }
}

/// The connection limits every accept loop shares.
struct Admission {
    total: Arc<Semaphore>,
    per_client: Arc<PerClient>,
}

/// Why a connection was closed at accept.
#[derive(Clone, Copy, Debug)]
enum OverLimit {
    Total,
    PerClient,
    /// A PROXY protocol listener's connection from an address not among
    /// its balancers.
    ProxySource,
    /// The listener's access list or new-connection rate.
    Access(Denied),
}

impl OverLimit {
    /// The metric label.
    fn class(self) -> &'static str {
        match self {
            OverLimit::Total => "total",
            OverLimit::PerClient => "per-client",
            OverLimit::ProxySource => "proxy-source",
            OverLimit::Access(denied) => denied.class(),
        }
    }
}

/// What a session holds while it runs: a slot in the total and one of
/// its client's (behind a PROXY protocol balancer, taken once the header
/// has named the client).
struct Slots {
    _total: tokio::sync::OwnedSemaphorePermit,
    client: Option<ClientSlot>,
}

impl Admission {
    /// The slots a new connection from `peer` takes, before a byte of it
    /// is read.
    fn admit(&self, plan: &Listening, peer: IpAddr) -> Result<Slots, OverLimit> {
        // Behind a balancer the access rules judge the client its header
        // names, once read (see client_of).
        if plan.proxy_sources().is_none() {
            plan.access().admit(peer).map_err(OverLimit::Access)?;
        }
        let client = match plan.proxy_sources() {
            Some(sources) if !sources.trusts(peer) => return Err(OverLimit::ProxySource),
            Some(_) => None,
            None => Some(self.per_client.claim(peer).ok_or(OverLimit::PerClient)?),
        };
        let total = self.total.clone().try_acquire_owned();
        Ok(Slots {
            _total: total.map_err(|_| OverLimit::Total)?,
            client,
        })
    }
}

/// Connections per client address. IPv6 clients count by /64: one site
/// has a whole /64 to pick addresses from.
struct PerClient {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in [`PerClient`], given back when dropped.
struct ClientSlot {
    table: Arc<PerClient>,
    key: IpAddr,
}

impl PerClient {
    fn new(max: usize) -> PerClient {
        PerClient {
            max,
            open: Mutex::new(HashMap::new()),
        }
    }

    fn claim(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let key = tlsrelay_core::access::client_key(ip);
        let mut open = self.open.lock().expect("not poisoned");
        let n = open.entry(key).or_default();
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            table: self.clone(),
            key,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().expect("not poisoned");
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Closes a connection over a limit; an SMTP client is told 421 first
/// (as Postfix does), so its queue retries later instead of guessing. A
/// stranger on a PROXY protocol listener is told nothing.
fn refuse(
    plan: &Listening,
    client: TcpStream,
    peer: SocketAddr,
    over: OverLimit,
    metrics: Option<&crate::metrics::Metrics>,
) {
    if let Some(m) = metrics {
        m.refused(plan.name(), over.class());
    }
    let why = match over {
        OverLimit::Total => "Too many connections, try again later",
        OverLimit::PerClient => "Too many connections from your address",
        OverLimit::ProxySource => {
            tracing::warn!(listener = %plan.name(), client = %peer, "not a PROXY protocol balancer of this listener (proxy_protocol_from); closing before reading");
            return;
        }
        OverLimit::Access(Denied::Listed) => {
            tracing::info!(listener = %plan.name(), client = %peer, "not allowed by the listener's access list; closing before reading");
            return;
        }
        OverLimit::Access(Denied::Rate) => {
            tracing::info!(listener = %plan.name(), client = %peer, "past its new-connection rate; closing before reading");
            return;
        }
    };
    tracing::warn!(listener = %plan.name(), client = %peer, limit = over.class(), "connection limit reached; closing");
    if let Listening::Smtp(smtp) = plan {
        // Best effort: a fresh socket's send buffer is empty.
        let _ = client.try_write(format!("421 4.7.0 {} {why}\r\n", smtp.hostname).as_bytes());
    }
}

/// Who a connection's client is: the socket's peer, or on a PROXY
/// protocol listener the address the header names, whose per-client
/// slot is taken then. `None`: that client is at its limit (the
/// connection was refused).
async fn client_of(
    plan: &Listening,
    client: &mut TcpStream,
    peer: SocketAddr,
    slots: &mut Slots,
    per_client: &Arc<PerClient>,
) -> Option<Result<ClientAddress, Outcome>> {
    if plan.proxy_sources().is_none() {
        return Some(Ok(ClientAddress::direct(peer)));
    }
    let address = client_address(client, peer, plan.handshake_timeout()).await;
    if let Ok(named) = &address {
        if let Err(denied) = plan.access().admit(named.peer.ip()) {
            return Some(Err(Outcome::Refused {
                leg: tlsrelay_core::report::Direction::Inbound,
                reason: format!(
                    "client {} {}",
                    named.peer.ip(),
                    match denied {
                        Denied::Listed => "not allowed by the listener's access list",
                        Denied::Rate => "past its new-connection rate",
                    }
                ),
                failure: None,
            }));
        }
        match per_client.claim(named.peer.ip()) {
            Some(slot) => slots.client = Some(slot),
            None => return None,
        }
    }
    Some(address)
}

async fn accept_loop(
    socket: TcpListener,
    plan: Arc<watch::Sender<Listening>>,
    admission: Admission,
    ids: Arc<AtomicU64>,
    sinks: Sinks,
) {
    loop {
        let name = plan.borrow().name().to_string();
        let (client, peer) = crate::accept::backing_off(&socket, &name).await;
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let plan = plan.borrow().clone();
        let mut slots = match admission.admit(&plan, peer.ip()) {
            Ok(slots) => slots,
            Err(over) => {
                refuse(&plan, client, peer, over, sinks.metrics.as_deref());
                continue;
            }
        };
        let sinks = sinks.clone();
        if let Some(m) = &sinks.metrics {
            m.accepted(plan.name());
        }
        let per_client = admission.per_client.clone();
        tokio::spawn(async move {
            let mut client = client;
            let metrics = sinks.metrics.as_deref();
            let Some(address) = client_of(&plan, &mut client, peer, &mut slots, &per_client).await
            else {
                refuse(&plan, client, peer, OverLimit::PerClient, metrics);
                return;
            };
            // Boxed apart: a task is as large as its largest state, and an
            // SMTP session's (12 KiB) would otherwise be every TCP
            // session's too (4 KiB), idle or not.
            let report = match &plan {
                Listening::Tcp(p) => Box::pin(session::run(id, p, client, peer, address)).await,
                Listening::Smtp(p) => {
                    let closing = sinks.closing.clone();
                    Box::pin(crate::smtp::session::run(
                        id, p, client, peer, address, closing,
                    ))
                    .await
                }
            };
            drop(slots);
            tracing::info!("{report}");
            if let Some(m) = &sinks.metrics {
                m.record(&report);
            }
            if let Some(wire) = &sinks.wire {
                wire.record_session(&crate::wire_view::views_of(&report));
            }
            if let Some(tx) = sinks.reports {
                let _ = tx.send(report);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_count_by_address_and_ipv6_by_slash_64() {
        let table = Arc::new(PerClient::new(2));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = table.claim(ip("192.0.2.1")).unwrap();
        let _b = table.claim(ip("::ffff:192.0.2.1")).unwrap();
        assert!(
            table.claim(ip("192.0.2.1")).is_none(),
            "a third from one address"
        );
        assert!(
            table.claim(ip("192.0.2.2")).is_some(),
            "another address has its own"
        );
        drop(a);
        assert!(
            table.claim(ip("192.0.2.1")).is_some(),
            "a closed slot is free again"
        );

        let _c = table.claim(ip("2001:db8:1:2::1")).unwrap();
        let _d = table.claim(ip("2001:db8:1:2:ffff::9")).unwrap();
        assert!(
            table.claim(ip("2001:db8:1:2::77")).is_none(),
            "one /64 is one client"
        );
        assert!(table.claim(ip("2001:db8:1:3::1")).is_some());
    }

    #[test]
    fn the_table_forgets_clients_without_connections() {
        let table = Arc::new(PerClient::new(5));
        let slots: Vec<_> = (0..100u8)
            .filter_map(|i| table.claim(IpAddr::from([10, 0, 0, i])))
            .collect();
        assert_eq!(table.open.lock().unwrap().len(), 100);
        drop(slots);
        assert!(table.open.lock().unwrap().is_empty());
    }
}
