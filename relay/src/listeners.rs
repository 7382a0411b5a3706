//! The listeners: bind a [`Plan`]'s addresses, run the accept loops with a
//! connection limit (one task per session), switch plans on reload, and
//! drain on shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::bpf::WireCounters;
use crate::plan::{Listening, Plan};
use crate::report::SessionReport;
use crate::session;

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

/// Bound listeners, ready to serve.
pub struct Listeners {
    listeners: Vec<(TcpListener, Arc<watch::Sender<Listening>>)>,
    limit: Arc<Semaphore>,
    max_connections: usize,
    reports: Option<mpsc::UnboundedSender<SessionReport>>,
    wire: Option<Arc<WireCounters>>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// Binds a listener whose accept queue takes a burst of clients: up to
/// `limits.max_connections` (the kernel caps it at net.core.somaxconn).
/// The runtime's default, 128, overflowed when 256 clients connected at
/// once while the pump kept both cores busy, and every SYN dropped cost
/// its client a one-second retransmission (the bench's 256-connection
/// cells ran at a third of their speed, p99 1.1 s).
fn bind_listener(address: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(backlog)
}

impl Listeners {
    pub async fn bind(plan: Plan) -> Result<Listeners, ListenError> {
        let mut listeners = Vec::new();
        let backlog = plan.max_connections.clamp(128, 65535) as u32;
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
            limit: Arc::new(Semaphore::new(plan.max_connections)),
            max_connections: plan.max_connections,
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
        for (socket, plan) in self.listeners {
            accept_loops.spawn(accept_loop(
                socket,
                plan,
                self.limit.clone(),
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
        let (limit, max) = (self.limit, self.max_connections);
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
    pub fn apply(&self, plan: Plan, max_connections: usize) -> Vec<String> {
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
        if plan.max_connections != max_connections {
            left.push("limits.max_connections changes on restart".to_string());
        }
        left
    }
}

/// The next connection on `socket`. A failed accept (EMFILE and friends:
/// the condition persists until a descriptor is freed) is logged and
/// retried after a pause instead of in a spinning loop.
pub async fn accept_backing_off(socket: &TcpListener, listener: &str) -> (TcpStream, SocketAddr) {
    loop {
        match socket.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                tracing::warn!(listener, "accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn accept_loop(
    socket: TcpListener,
    plan: Arc<watch::Sender<Listening>>,
    limit: Arc<Semaphore>,
    ids: Arc<AtomicU64>,
    sinks: Sinks,
) {
    loop {
        let name = plan.borrow().name().to_string();
        let (client, peer) = accept_backing_off(&socket, &name).await;
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(listener = %plan.borrow().name(), client = %peer, "connection limit reached; closing");
            drop(client);
            continue;
        };
        let plan = plan.borrow().clone();
        let sinks = sinks.clone();
        if let Some(m) = &sinks.metrics {
            m.accepted(plan.name());
        }
        tokio::spawn(async move {
            // Boxed apart: a task is as large as its largest state, and an
            // SMTP session's (12 KiB) would otherwise be every TCP
            // session's too (4 KiB), idle or not.
            let report = match &plan {
                Listening::Tcp(p) => Box::pin(session::run(id, p, client, peer)).await,
                Listening::Smtp(p) => {
                    let closing = sinks.closing.clone();
                    Box::pin(crate::smtp::session::run(id, p, client, peer, closing)).await
                }
            };
            drop(permit);
            tracing::info!("{report}");
            if let Some(m) = &sinks.metrics {
                m.record(&report);
            }
            if let Some(wire) = &sinks.wire {
                wire.record_session(&report);
            }
            if let Some(tx) = sinks.reports {
                let _ = tx.send(report);
            }
        });
    }
}
