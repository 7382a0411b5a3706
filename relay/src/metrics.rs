//! Prometheus exposition: counters kept from every finished session's
//! report (by listener, upstream or connector, TLS version each way,
//! outcome, downgrade reason, data path, MX delivery policy and result),
//! handshake and session duration
//! summaries from hdrhistogram, and the eBPF wire counters mirrored from
//! their pinned maps at scrape time. `/metrics` is served over plain HTTP
//! on the configured address.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use tlsrelay_core::report::{LegSecurity, Outcome, SessionReport, Side};
use tlsrelay_core::smtp::address::Cidr;

/// Label names and values of one series.
type Labels = Vec<(&'static str, String)>;

/// Everything counted so far.
pub struct Metrics {
    inner: Mutex<Inner>,
    /// The eBPF maps to mirror, when the wire counters are on (read
    /// through the maps held since start, not their pinned paths, which
    /// the relay may no longer open once it gave up root).
    wire: Option<Arc<tlsrelay_sys::bpf::WireCounters>>,
    /// The upstream pools, when the relay serves any.
    pools: std::sync::OnceLock<crate::upstreams::Pools>,
    /// Each listener's plan as it is now (reloads replace it): the
    /// certificates it serves.
    listeners: std::sync::OnceLock<Vec<tokio::sync::watch::Receiver<crate::plan::Listening>>>,
}

struct Inner {
    accepted: BTreeMap<String, u64>,
    refused: BTreeMap<Labels, u64>,
    sessions: BTreeMap<Labels, u64>,
    downgrades: BTreeMap<Labels, u64>,
    key_exchange: BTreeMap<Labels, u64>,
    tls_handshakes: BTreeMap<Labels, u64>,
    transactions: BTreeMap<Labels, u64>,
    tls_deferrals: BTreeMap<Labels, u64>,
    /// Transactions carried over a reused idle next-hop connection.
    reused: BTreeMap<Labels, u64>,
    path_sessions: BTreeMap<Labels, u64>,
    path_bytes: BTreeMap<Labels, u64>,
    /// MX hosts tried or ruled out, by policy type and TLS-RPT result.
    mx_policy: BTreeMap<Labels, u64>,
    /// Microseconds.
    handshake: Histogram<u64>,
    duration: Histogram<u64>,
}

fn version(leg: &Option<LegSecurity>) -> String {
    match leg {
        None => "none".into(),
        Some(LegSecurity::Plaintext) => "plaintext".into(),
        Some(LegSecurity::Tls { negotiated, .. }) => negotiated.version.clone(),
    }
}

impl Inner {
    /// Key exchange groups and full or resumed handshakes, per TLS leg.
    fn count_tls_legs(&mut self, r: &SessionReport) {
        let m = self;
        // A reused outbound connection had its handshake in another session.
        let outbound = if r.outbound_reused {
            &None
        } else {
            &r.outbound
        };
        for (leg, security) in [("inbound", &r.inbound), ("outbound", outbound)] {
            if let Some(LegSecurity::Tls { negotiated, .. }) = security {
                let group = negotiated.group.clone().unwrap_or_else(|| "unknown".into());
                *m.key_exchange
                    .entry(vec![
                        ("listener", r.listener.clone()),
                        ("leg", leg.into()),
                        ("group", group),
                    ])
                    .or_default() += 1;
                let kind = if negotiated.resumed {
                    "resumed"
                } else {
                    "full"
                };
                *m.tls_handshakes
                    .entry(vec![
                        ("listener", r.listener.clone()),
                        ("leg", leg.into()),
                        ("kind", kind.into()),
                    ])
                    .or_default() += 1;
            }
        }
    }
}

impl Metrics {
    pub fn new(wire: Option<Arc<tlsrelay_sys::bpf::WireCounters>>) -> Metrics {
        let histogram = || Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
        Metrics {
            inner: Mutex::new(Inner {
                accepted: BTreeMap::new(),
                refused: BTreeMap::new(),
                sessions: BTreeMap::new(),
                downgrades: BTreeMap::new(),
                key_exchange: BTreeMap::new(),
                tls_handshakes: BTreeMap::new(),
                transactions: BTreeMap::new(),
                tls_deferrals: BTreeMap::new(),
                reused: BTreeMap::new(),
                path_sessions: BTreeMap::new(),
                path_bytes: BTreeMap::new(),
                mx_policy: BTreeMap::new(),
                handshake: histogram(),
                duration: histogram(),
            }),
            wire,
            pools: std::sync::OnceLock::new(),
            listeners: std::sync::OnceLock::new(),
        }
    }

    /// Exposes the certificates each listener serves now.
    pub fn watch_listeners(
        &self,
        listeners: Vec<tokio::sync::watch::Receiver<crate::plan::Listening>>,
    ) {
        let _ = self.listeners.set(listeners);
    }

    /// Exposes the pools' servers and checks too.
    pub fn watch_pools(&self, pools: crate::upstreams::Pools) {
        let _ = self.pools.set(pools);
    }

    /// A connection closed at accept because it was over `limit`.
    pub fn refused(&self, listener: &str, limit: &'static str) {
        let mut m = self.inner.lock().expect("not poisoned");
        *m.refused
            .entry(vec![("listener", listener.into()), ("limit", limit.into())])
            .or_default() += 1;
    }

    pub fn accepted(&self, listener: &str) {
        let mut m = self.inner.lock().expect("not poisoned");
        *m.accepted.entry(listener.to_string()).or_default() += 1;
    }

    /// Counts one finished session.
    pub fn record(&self, r: &SessionReport) {
        let mut m = self.inner.lock().expect("not poisoned");
        let outcome = match &r.outcome {
            Outcome::Relayed { .. } => "relayed",
            Outcome::Refused { .. } => "refused",
            Outcome::Failed { .. } => "failed",
        };
        let (inbound, outbound) = match &r.passthrough {
            Some(_) => ("passthrough".to_string(), "passthrough".to_string()),
            None => (version(&r.inbound), version(&r.outbound)),
        };
        *m.sessions
            .entry(vec![
                ("listener", r.listener.clone()),
                ("upstream", r.upstream.clone()),
                ("inbound", inbound),
                ("outbound", outbound),
                ("outcome", outcome.into()),
            ])
            .or_default() += 1;
        for d in &r.downgrades {
            *m.downgrades
                .entry(vec![
                    ("listener", r.listener.clone()),
                    ("leg", d.leg.to_string()),
                    ("reason", d.class.to_string()),
                ])
                .or_default() += 1;
        }
        m.count_tls_legs(r);
        for t in &r.transactions {
            let reply = t
                .result
                .as_deref()
                .and_then(|s| s.chars().next())
                .map_or("none".to_string(), |c| format!("{c}xx"));
            *m.transactions
                .entry(vec![
                    ("listener", r.listener.clone()),
                    ("connector", t.connector.clone().unwrap_or_default()),
                    ("outbound", version(&t.outbound)),
                    ("reply", reply),
                ])
                .or_default() += 1;
            // 451 4.7.5: the TLS a connector (or DANE, or an enforced
            // MTA-STS policy) requires could not be had; the sender retries.
            let deferred = t.result.iter().chain(&t.refused);
            for _ in deferred.filter(|r| r.starts_with("451 4.7.5")) {
                *m.tls_deferrals
                    .entry(vec![
                        ("listener", r.listener.clone()),
                        ("connector", t.connector.clone().unwrap_or_default()),
                    ])
                    .or_default() += 1;
            }
            if t.reused {
                *m.reused
                    .entry(vec![
                        ("listener", r.listener.clone()),
                        ("connector", t.connector.clone().unwrap_or_default()),
                    ])
                    .or_default() += 1;
            }
        }
        for p in &r.policy_sessions {
            *m.mx_policy
                .entry(vec![
                    ("policy_type", p.policy_type.clone()),
                    ("result", p.result.clone()),
                ])
                .or_default() += 1;
        }
        if let Some(path) = r.data_path {
            let path = path.to_string();
            let ktls = match r.ktls.as_slice() {
                [] => "none",
                [Side::Client] => "client",
                [Side::Upstream] => "upstream",
                _ => "both",
            };
            *m.path_sessions
                .entry(vec![("path", path.clone()), ("ktls", ktls.into())])
                .or_default() += 1;
            for (direction, bytes) in [
                ("client_to_upstream", r.bytes_client_to_upstream),
                ("upstream_to_client", r.bytes_upstream_to_client),
            ] {
                *m.path_bytes
                    .entry(vec![
                        ("path", path.clone()),
                        ("direction", direction.into()),
                    ])
                    .or_default() += bytes;
            }
        }
        if matches!(r.outcome, Outcome::Relayed { .. }) {
            let _ = m.handshake.record((r.setup_ms * 1000.0).max(1.0) as u64);
        }
        let _ = m.duration.record((r.duration_ms * 1000.0).max(1.0) as u64);
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        {
            let m = self.inner.lock().expect("not poisoned");
            let accepted: BTreeMap<Labels, u64> = m
                .accepted
                .iter()
                .map(|(l, v)| (vec![("listener", l.clone())], *v))
                .collect();
            let families: [(&str, &str, &BTreeMap<Labels, u64>); 12] = [
                ("tlsrelay_connections_accepted_total", "Connections accepted, by listener.", &accepted),
                ("tlsrelay_connections_refused_total", "Connections closed at accept, by listener and the limit they were over (total, per-client).", &m.refused),
                ("tlsrelay_sessions_total", "Finished sessions by listener, upstream or connector, TLS version each way and outcome.", &m.sessions),
                ("tlsrelay_downgrades_total", "Sessions that went on with less security than they could have had, by leg and reason.", &m.downgrades),
                ("tlsrelay_key_exchange_total", "TLS legs by key exchange group (X25519MLKEM768: post-quantum hybrid).", &m.key_exchange),
                ("tlsrelay_tls_handshakes_total", "TLS legs of finished sessions by kind: full handshake, or resumed from a ticket or session.", &m.tls_handshakes),
                ("tlsrelay_smtp_transactions_total", "SMTP mail transactions by outbound connector, outbound TLS version and the reply class the sender got.", &m.transactions),
                ("tlsrelay_smtp_tls_deferrals_total", "SMTP mail transactions deferred (451 4.7.5) because the TLS their connector, DANE or MTA-STS requires could not be had, by outbound connector.", &m.tls_deferrals),
                ("tlsrelay_smtp_reused_transactions_total", "SMTP mail transactions carried over an idle next-hop connection an earlier session left (connection reuse), by outbound connector.", &m.reused),
                ("tlsrelay_data_path_sessions_total", "Sessions by the data path that moved their bytes (splice or userspace) and the legs whose TLS the kernel held.", &m.path_sessions),
                ("tlsrelay_data_path_bytes_total", "Bytes relayed by data path and direction.", &m.path_bytes),
                ("tlsrelay_mx_policy_sessions_total", "MX hosts tried or ruled out by delivery policy (tlsa, sts, no-policy-found) and TLS-RPT result (success or an RFC 8460 result type).", &m.mx_policy),
            ];
            for (name, help, series) in families {
                counter(&mut out, name, help, series);
            }
            let replaced = BTreeMap::from([(Vec::new(), crate::pump::uring_workers_replaced())]);
            counter(
                &mut out,
                "tlsrelay_uring_workers_replaced_total",
                "io_uring pump workers that stopped (their sessions reset) and were replaced.",
                &replaced,
            );
            summary(
                &mut out,
                "tlsrelay_handshake_seconds",
                "From accept until both legs were ready to relay (relayed sessions).",
                &m.handshake,
            );
            summary(
                &mut out,
                "tlsrelay_session_duration_seconds",
                "Whole session durations.",
                &m.duration,
            );
        }
        if let Some(pools) = self.pools.get() {
            render_pools(&mut out, pools);
        }
        if let Some(listeners) = self.listeners.get() {
            let mut expiries = BTreeMap::new();
            for listening in listeners {
                let listening = listening.borrow();
                for (name, not_after) in listening.certificate_expiries() {
                    let labels = vec![
                        ("listener", listening.name().to_string()),
                        ("certificate", name.clone()),
                    ];
                    expiries.insert(labels, *not_after);
                }
            }
            let name = "tlsrelay_certificate_expiry_timestamp_seconds";
            let _ = writeln!(
                out,
                "# HELP {name} When each certificate a listener serves expires (Unix time).\n# TYPE {name} gauge"
            );
            for (l, v) in &expiries {
                let _ = writeln!(out, "{name}{} {v}", labels(l));
            }
        }
        if let Some(wire) = &self.wire {
            match wire.snapshot() {
                Ok(s) => {
                    let mirror = |counts: &BTreeMap<&'static str, u64>, key: &'static str| {
                        counts
                            .iter()
                            .map(|(k, v)| (vec![(key, k.to_string())], *v))
                            .collect::<BTreeMap<Labels, u64>>()
                    };
                    counter(
                        &mut out,
                        "tlsrelay_wire_negotiated_total",
                        "eBPF: connections by the TLS version seen negotiated on the wire.",
                        &mirror(&s.negotiated.0, "version"),
                    );
                    counter(
                        &mut out,
                        "tlsrelay_wire_downgrades_total",
                        "eBPF: downgrades seen on the wire.",
                        &mirror(&s.downgrades.0, "kind"),
                    );
                    counter(
                        &mut out,
                        "tlsrelay_wire_parser_total",
                        "eBPF: the wire parser's own counters.",
                        &mirror(&s.parser.0, "event"),
                    );
                    let _ = writeln!(out, "# HELP tlsrelay_wire_disagreements Connections where the wire and the relay disagree.\n# TYPE tlsrelay_wire_disagreements gauge\ntlsrelay_wire_disagreements {}", s.disagreements);
                }
                Err(e) => tracing::debug!("eBPF counters not mirrored: {e}"),
            }
        }
        out
    }
}

/// Each upstream server's state and checks.
fn render_pools(out: &mut String, pools: &crate::upstreams::Pools) {
    let mut up = BTreeMap::new();
    let mut sessions = BTreeMap::new();
    let mut checks = BTreeMap::new();
    let mut ejections = BTreeMap::new();
    for pool in pools.live() {
        for server in pool.view().servers {
            let labels = vec![
                ("upstream", pool.name.clone()),
                ("server", server.address.clone()),
            ];
            up.insert(labels.clone(), u64::from(server.up));
            sessions.insert(labels.clone(), server.sessions);
            ejections.insert(labels.clone(), server.ejections);
            for (result, n) in [
                ("passed", server.checks_passed),
                ("failed", server.checks_failed),
            ] {
                let mut l = labels.clone();
                l.push(("result", result.into()));
                checks.insert(l, n);
            }
        }
    }
    for (name, help, series) in [
        (
            "tlsrelay_upstream_server_up",
            "1 while an upstream server takes sessions by its health (an operator's drain aside).",
            &up,
        ),
        (
            "tlsrelay_upstream_server_sessions",
            "Sessions each upstream server holds now.",
            &sessions,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (l, v) in series {
            let _ = writeln!(out, "{name}{} {v}", labels(l));
        }
    }
    counter(
        out,
        "tlsrelay_upstream_checks_total",
        "Active health checks of each upstream server, passed or failed.",
        &checks,
    );
    counter(
        out,
        "tlsrelay_upstream_ejections_total",
        "Upstream servers ejected after consecutive failed connects of real sessions.",
        &ejections,
    );
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(l: &[(&'static str, String)]) -> String {
    if l.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = l
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", parts.join(","))
}

fn counter(out: &mut String, name: &str, help: &str, series: &BTreeMap<Labels, u64>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (l, v) in series {
        let _ = writeln!(out, "{name}{} {v}", labels(l));
    }
}

fn summary(out: &mut String, name: &str, help: &str, h: &Histogram<u64>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} summary");
    for q in [0.5, 0.9, 0.99] {
        let v = if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(q) as f64 / 1e6
        };
        let _ = writeln!(out, "{name}{{quantile=\"{q}\"}} {v}");
    }
    let sum: f64 = h
        .iter_recorded()
        .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
        .sum::<f64>()
        / 1e6;
    let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {}", h.len());
}

/// Scrapes served at once; a connection past them is closed unread. A
/// stranger who can reach the metrics address holds at most this many
/// descriptors, never the mail and relay listeners' share.
pub const MAX_SCRAPES: usize = 8;

/// The whole request head must arrive within this (not each read): a
/// head trickled a byte at a time is cut here.
pub const REQUEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `GET /metrics` on `address` until the task is dropped, to
/// scrapers from `allow_from` (anyone when empty).
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, allow_from: Vec<Cidr>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        let (stream, peer) = crate::accept::backing_off(&listener, "metrics").await;
        if !allow_from.is_empty() && !allow_from.iter().any(|c| c.contains(peer.ip())) {
            tracing::debug!(client = %peer, "not among metrics.allow_from; closing");
            metrics.refused("metrics", "allow-from");
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(client = %peer, "{MAX_SCRAPES} scrapes under way; closing another");
            metrics.refused("metrics", "total");
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(REQUEST_DEADLINE * 2, scrape(stream, &metrics)).await;
        });
    }
}

/// One scrape: the request head within [`REQUEST_DEADLINE`], then the
/// exposition.
async fn scrape(mut stream: tokio::net::TcpStream, metrics: &Metrics) {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    // The request head only; a scrape has no body.
    let head = async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
            match stream.read(&mut buf).await {
                Ok(n) if n > 0 => request.extend_from_slice(&buf[..n]),
                _ => return false,
            }
        }
        true
    };
    if !matches!(tokio::time::timeout(REQUEST_DEADLINE, head).await, Ok(true)) {
        return;
    }
    let line = String::from_utf8_lossy(&request);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?"))
    {
        ("200 OK", metrics.render())
    } else {
        ("404 Not Found", "see /metrics\n".to_string())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tlsrelay_core::report::{Direction, Downgrade};

    /// A next hop's STARTTLS reply is its own text: it reaches the report,
    /// never a label.
    #[test]
    fn downgrade_labels_are_classes_not_peer_text() {
        let metrics = Metrics::new(None);
        for (n, class) in Downgrade::CLASSES.iter().enumerate() {
            let mut report =
                SessionReport::new(n as u64, "in", "127.0.0.1:1".parse().unwrap(), "up");
            report.downgrades.push(Downgrade {
                leg: Direction::Outbound,
                reason: format!("not offered: 502 peer text {n} \"quoted\""),
                class,
            });
            metrics.record(&report);
        }
        let text = metrics.render();
        assert!(!text.contains("peer text"), "{text}");
        for class in Downgrade::CLASSES {
            assert!(
                text.contains(&format!("leg=\"outbound\",reason=\"{class}\"}} 1")),
                "{class}: {text}"
            );
        }
    }

    /// Forced TLS that could not be had is counted per connector; other
    /// deferrals are not.
    #[test]
    fn forced_tls_deferrals_are_counted_by_connector() {
        let metrics = Metrics::new(None);
        for reply in [
            "451 4.7.5 TLS required by connector partner but TLS not offered: 502",
            "451 4.4.1 No next hop of connector partner is reachable",
            "250 2.0.0 queued",
        ] {
            let mut report = SessionReport::new(1, "mx", "127.0.0.1:1".parse().unwrap(), "");
            // The RCPT that needed the next hop got the reply.
            report
                .transactions
                .push(tlsrelay_core::report::Transaction {
                    connector: Some("partner".into()),
                    refused: vec![reply.into()],
                    ..Default::default()
                });
            metrics.record(&report);
        }
        let text = metrics.render();
        assert!(
            text.contains(
                "tlsrelay_smtp_tls_deferrals_total{listener=\"mx\",connector=\"partner\"} 1\n"
            ),
            "{text}"
        );
    }

    /// A session over a reused next-hop connection made no handshake on
    /// that leg: counted as a reused transaction, not as a TLS leg.
    #[test]
    fn a_reused_outbound_leg_is_no_handshake() {
        let metrics = Metrics::new(None);
        for reused in [false, true] {
            let mut report = SessionReport::new(1, "mx", "127.0.0.1:1".parse().unwrap(), "out");
            report.outbound = Some(LegSecurity::Tls {
                negotiated: tlsrelay_core::report::Negotiated {
                    version: "TLSv1.3".into(),
                    cipher: "TLS13_AES_128_GCM_SHA256".into(),
                    version_code: 0x0304,
                    cipher_code: 0x1301,
                    group: Some("X25519".into()),
                    group_code: 0x001d,
                    resumed: false,
                },
                trust: tlsrelay_core::policy::PeerTrust::Verified,
                server_name: None,
                peer_names: Vec::new(),
            });
            report.outbound_reused = reused;
            report
                .transactions
                .push(tlsrelay_core::report::Transaction {
                    connector: Some("out".into()),
                    reused,
                    ..Default::default()
                });
            metrics.record(&report);
        }
        let text = metrics.render();
        assert!(
            text.contains(
                "tlsrelay_tls_handshakes_total{listener=\"mx\",leg=\"outbound\",kind=\"full\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "tlsrelay_smtp_reused_transactions_total{listener=\"mx\",connector=\"out\"} 1\n"
            ),
            "{text}"
        );
    }
}
