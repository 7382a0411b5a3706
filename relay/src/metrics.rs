//! Prometheus exposition through prometheus-client: counters kept from
//! every finished session's report (by listener, upstream or connector, TLS
//! version each way, outcome, downgrade reason, data path, MX delivery
//! policy and result), handshake and session duration histograms by
//! listener (buckets add up across a fleet), and what is read as it is at
//! scrape time: the upstream servers' health, the certificates' expiry and
//! the eBPF wire counters (a few map reads, whatever the connection count).
//! `/metrics` is served over plain HTTP on the configured address.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeMetric, MetricEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use tlsrelay_core::report::{LegSecurity, Outcome, SessionReport, Side};
use tlsrelay_core::smtp::address::Cidr;

/// Label names and values of one series.
type Labels = Vec<(&'static str, String)>;
type Counters = Family<Labels, Counter>;
type Durations = Family<Labels, Histogram, fn() -> Histogram>;

/// Everything counted so far, and the registry that exposes it.
pub struct Metrics {
    registry: Registry,
    accepted: Counters,
    refused: Counters,
    sessions: Counters,
    downgrades: Counters,
    key_exchange: Counters,
    tls_handshakes: Counters,
    transactions: Counters,
    tls_deferrals: Counters,
    /// Transactions carried over a reused idle next-hop connection.
    reused: Counters,
    path_sessions: Counters,
    path_bytes: Counters,
    /// MX hosts tried or ruled out, by policy type and TLS-RPT result.
    mx_policy: Counters,
    handshake: Durations,
    duration: Durations,
    live: Arc<Live>,
}

/// Handshakes: 0.5 ms to ~16 s, doubling.
fn handshake_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Sessions: 1 ms to ~70 min, quadrupling.
fn duration_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 13))
}

/// A family exposed (HELP and TYPE) before its first series too, so an
/// operator finds every metric at /metrics from the start.
#[derive(Debug)]
struct Shown<M>(M);

impl<M: EncodeMetric> EncodeMetric for Shown<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        self.0.metric_type()
    }

    fn is_empty(&self) -> bool {
        false
    }
}

/// Registers `family` under its exposed name (a counter's with `_total`,
/// which the encoder adds back) and a help text ending in a period (which
/// the registry adds back).
fn register<M: EncodeMetric + Clone + std::fmt::Debug + Send + Sync + 'static>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    family: &M,
) -> M {
    let name = name.strip_suffix("_total").unwrap_or(name);
    let help = help.strip_suffix('.').unwrap_or(help);
    registry.register(name, help, Shown(family.clone()));
    family.clone()
}

/// What a scrape reads as it is now rather than counts as sessions end.
#[derive(Default)]
struct Live {
    /// The eBPF maps, when the wire counters are on (read through the
    /// maps held since start, not their pinned paths, which the relay may
    /// no longer open once it gave up root).
    wire: Option<Arc<tlsrelay_sys::bpf::WireCounters>>,
    /// The upstream pools, when the relay serves any.
    pools: OnceLock<crate::upstreams::Pools>,
    /// Each listener's plan as it is now (reloads replace it): the
    /// certificates it serves.
    listeners: OnceLock<Vec<tokio::sync::watch::Receiver<crate::plan::Listening>>>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

fn version(leg: &Option<LegSecurity>) -> String {
    match leg {
        None => "none".into(),
        Some(LegSecurity::Plaintext) => "plaintext".into(),
        Some(LegSecurity::Tls { negotiated, .. }) => negotiated.version.clone(),
    }
}

/// Adds one to a series.
fn inc(family: &Counters, labels: Labels) {
    family.get_or_create(&labels).inc();
}

impl Metrics {
    pub fn new(wire: Option<Arc<tlsrelay_sys::bpf::WireCounters>>) -> Metrics {
        let mut r = Registry::default();
        let c = Counters::default;
        let accepted = register(
            &mut r,
            "tlsrelay_connections_accepted_total",
            "Connections accepted, by listener.",
            &c(),
        );
        let refused = register(&mut r, "tlsrelay_connections_refused_total", "Connections closed at accept, by listener and the limit they were over (total, per-client).", &c());
        let sessions = register(&mut r, "tlsrelay_sessions_total", "Finished sessions by listener, upstream or connector, TLS version each way and outcome.", &c());
        let downgrades = register(
            &mut r,
            "tlsrelay_downgrades_total",
            "Sessions that went on with less security than they could have had, by leg and reason.",
            &c(),
        );
        let key_exchange = register(
            &mut r,
            "tlsrelay_key_exchange_total",
            "TLS legs by key exchange group (X25519MLKEM768: post-quantum hybrid).",
            &c(),
        );
        let tls_handshakes = register(&mut r, "tlsrelay_tls_handshakes_total", "TLS legs of finished sessions by kind: full handshake, or resumed from a ticket or session.", &c());
        let transactions = register(&mut r, "tlsrelay_smtp_transactions_total", "SMTP mail transactions by outbound connector, outbound TLS version and the reply class the sender got.", &c());
        let tls_deferrals = register(&mut r, "tlsrelay_smtp_tls_deferrals_total", "SMTP mail transactions deferred (451 4.7.5) because the TLS their connector, DANE or MTA-STS requires could not be had, by outbound connector.", &c());
        let reused = register(&mut r, "tlsrelay_smtp_reused_transactions_total", "SMTP mail transactions carried over an idle next-hop connection an earlier session left (connection reuse), by outbound connector.", &c());
        let path_sessions = register(&mut r, "tlsrelay_data_path_sessions_total", "Sessions by the data path that moved their bytes (splice or userspace) and the legs whose TLS the kernel held.", &c());
        let path_bytes = register(
            &mut r,
            "tlsrelay_data_path_bytes_total",
            "Bytes relayed by data path and direction.",
            &c(),
        );
        let mx_policy = register(&mut r, "tlsrelay_mx_policy_sessions_total", "MX hosts tried or ruled out by delivery policy (tlsa, sts, no-policy-found) and TLS-RPT result (success or an RFC 8460 result type).", &c());
        let handshake = register(
            &mut r,
            "tlsrelay_handshake_seconds",
            "From accept until both legs were ready to relay (relayed sessions), by listener.",
            &Durations::new_with_constructor(handshake_buckets),
        );
        let duration = register(
            &mut r,
            "tlsrelay_session_duration_seconds",
            "Whole session durations, by listener.",
            &Durations::new_with_constructor(duration_buckets),
        );
        let live = Arc::new(Live {
            wire,
            ..Live::default()
        });
        r.register_collector(Box::new(live.clone()));
        Metrics {
            registry: r,
            accepted,
            refused,
            sessions,
            downgrades,
            key_exchange,
            tls_handshakes,
            transactions,
            tls_deferrals,
            reused,
            path_sessions,
            path_bytes,
            mx_policy,
            handshake,
            duration,
            live,
        }
    }

    /// Exposes the certificates each listener serves now.
    pub fn watch_listeners(
        &self,
        listeners: Vec<tokio::sync::watch::Receiver<crate::plan::Listening>>,
    ) {
        let _ = self.live.listeners.set(listeners);
    }

    /// Exposes the pools' servers and checks too.
    pub fn watch_pools(&self, pools: crate::upstreams::Pools) {
        let _ = self.live.pools.set(pools);
    }

    /// A connection closed at accept because it was over `limit`.
    pub fn refused(&self, listener: &str, limit: &'static str) {
        inc(
            &self.refused,
            vec![("listener", listener.into()), ("limit", limit.into())],
        );
    }

    pub fn accepted(&self, listener: &str) {
        inc(&self.accepted, vec![("listener", listener.into())]);
    }

    /// Counts one finished session.
    pub fn record(&self, r: &SessionReport) {
        let outcome = match &r.outcome {
            Outcome::Relayed { .. } => "relayed",
            Outcome::Refused { .. } => "refused",
            Outcome::Failed { .. } => "failed",
        };
        let (inbound, outbound) = match &r.passthrough {
            Some(_) => ("passthrough".to_string(), "passthrough".to_string()),
            None => (version(&r.inbound), version(&r.outbound)),
        };
        inc(
            &self.sessions,
            vec![
                ("listener", r.listener.clone()),
                ("upstream", r.upstream.clone()),
                ("inbound", inbound),
                ("outbound", outbound),
                ("outcome", outcome.into()),
            ],
        );
        for d in &r.downgrades {
            inc(
                &self.downgrades,
                vec![
                    ("listener", r.listener.clone()),
                    ("leg", d.leg.to_string()),
                    ("reason", d.class.to_string()),
                ],
            );
        }
        self.count_tls_legs(r);
        self.count_transactions(r);
        for p in &r.policy_sessions {
            inc(
                &self.mx_policy,
                vec![
                    ("policy_type", p.policy_type.clone()),
                    ("result", p.result.clone()),
                ],
            );
        }
        if let Some(path) = r.data_path {
            let path = path.to_string();
            let ktls = match r.ktls.as_slice() {
                [] => "none",
                [Side::Client] => "client",
                [Side::Upstream] => "upstream",
                _ => "both",
            };
            inc(
                &self.path_sessions,
                vec![("path", path.clone()), ("ktls", ktls.into())],
            );
            for (direction, bytes) in [
                ("client_to_upstream", r.bytes_client_to_upstream),
                ("upstream_to_client", r.bytes_upstream_to_client),
            ] {
                let labels = vec![("path", path.clone()), ("direction", direction.into())];
                self.path_bytes.get_or_create(&labels).inc_by(bytes);
            }
        }
        let listener = vec![("listener", r.listener.clone())];
        if matches!(r.outcome, Outcome::Relayed { .. }) {
            self.handshake
                .get_or_create(&listener)
                .observe(r.setup_ms / 1000.0);
        }
        self.duration
            .get_or_create(&listener)
            .observe(r.duration_ms / 1000.0);
    }

    /// Key exchange groups and full or resumed handshakes, per TLS leg.
    fn count_tls_legs(&self, r: &SessionReport) {
        // A reused outbound connection had its handshake in another session.
        let outbound = if r.outbound_reused {
            &None
        } else {
            &r.outbound
        };
        for (leg, security) in [("inbound", &r.inbound), ("outbound", outbound)] {
            if let Some(LegSecurity::Tls { negotiated, .. }) = security {
                let group = negotiated.group.clone().unwrap_or_else(|| "unknown".into());
                inc(
                    &self.key_exchange,
                    vec![
                        ("listener", r.listener.clone()),
                        ("leg", leg.into()),
                        ("group", group),
                    ],
                );
                let kind = if negotiated.resumed {
                    "resumed"
                } else {
                    "full"
                };
                inc(
                    &self.tls_handshakes,
                    vec![
                        ("listener", r.listener.clone()),
                        ("leg", leg.into()),
                        ("kind", kind.into()),
                    ],
                );
            }
        }
    }

    /// SMTP mail transactions by reply class, forced-TLS deferrals and
    /// reused next-hop connections.
    fn count_transactions(&self, r: &SessionReport) {
        for t in &r.transactions {
            let connector = t.connector.clone().unwrap_or_default();
            let reply = t
                .result
                .as_deref()
                .and_then(|s| s.chars().next())
                .map_or("none".to_string(), |c| format!("{c}xx"));
            inc(
                &self.transactions,
                vec![
                    ("listener", r.listener.clone()),
                    ("connector", connector.clone()),
                    ("outbound", version(&t.outbound)),
                    ("reply", reply),
                ],
            );
            let by_connector = vec![("listener", r.listener.clone()), ("connector", connector)];
            // 451 4.7.5: the TLS a connector (or DANE, or an enforced
            // MTA-STS policy) requires could not be had; the sender retries.
            let deferred = t.result.iter().chain(&t.refused);
            for _ in deferred.filter(|r| r.starts_with("451 4.7.5")) {
                inc(&self.tls_deferrals, by_connector.clone());
            }
            if t.reused {
                inc(&self.reused, by_connector.clone());
            }
        }
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::warn!("metrics not rendered: {e}");
        }
        out
    }
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let replaced = BTreeMap::from([(Vec::new(), crate::pump::uring_workers_replaced())]);
        counters(
            &mut encoder,
            "tlsrelay_uring_workers_replaced",
            "io_uring pump workers that stopped (their sessions reset) and were replaced.",
            &replaced,
        )?;
        let pipes = tlsrelay_sys::splice::pipe_counts();
        let pipes = BTreeMap::from([
            (
                vec![("state", "in_use".to_string())],
                pipes.live - pipes.pooled,
            ),
            (vec![("state", "pooled".to_string())], pipes.pooled),
        ]);
        gauges(
            &mut encoder,
            "tlsrelay_splice_pipes",
            "Splice pipes: in use by a direction moving bytes, or pooled empty for the next (an idle session holds none).",
            &pipes,
        )?;
        if let Some(pools) = self.pools.get() {
            encode_pools(&mut encoder, pools)?;
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
            gauges(
                &mut encoder,
                "tlsrelay_certificate_expiry_timestamp_seconds",
                "When each certificate a listener serves expires (Unix time).",
                &expiries,
            )?;
        }
        if let Some(wire) = &self.wire {
            match wire.totals() {
                Ok(t) => {
                    let mirror = |counts: &BTreeMap<&'static str, u64>, key: &'static str| {
                        counts
                            .iter()
                            .map(|(k, v)| (vec![(key, k.to_string())], *v))
                            .collect::<BTreeMap<Labels, u64>>()
                    };
                    for (name, help, series) in [
                        ("tlsrelay_wire_negotiated", "eBPF: connections by the TLS version seen negotiated on the wire.", mirror(&t.negotiated.0, "version")),
                        ("tlsrelay_wire_downgrades", "eBPF: downgrades seen on the wire.", mirror(&t.downgrades.0, "kind")),
                        ("tlsrelay_wire_parser", "eBPF: the wire parser's own counters.", mirror(&t.parser.0, "event")),
                        ("tlsrelay_wire_disagreements", "Sockets whose wire record disagreed with the relay's own view, checked as each session ended.", BTreeMap::from([(Vec::new(), t.disagreements)])),
                    ] {
                        counters(&mut encoder, name, help, &series)?;
                    }
                }
                Err(e) => tracing::debug!("eBPF counters not mirrored: {e}"),
            }
        }
        Ok(())
    }
}

/// Each upstream server's state and checks.
fn encode_pools(
    encoder: &mut DescriptorEncoder,
    pools: &crate::upstreams::Pools,
) -> Result<(), std::fmt::Error> {
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
    gauges(
        encoder,
        "tlsrelay_upstream_server_up",
        "1 while an upstream server takes sessions by its health (an operator's drain aside).",
        &up,
    )?;
    gauges(
        encoder,
        "tlsrelay_upstream_server_sessions",
        "Sessions each upstream server holds now.",
        &sessions,
    )?;
    counters(
        encoder,
        "tlsrelay_upstream_checks",
        "Active health checks of each upstream server, passed or failed.",
        &checks,
    )?;
    counters(
        encoder,
        "tlsrelay_upstream_ejections",
        "Upstream servers ejected after consecutive failed connects of real sessions.",
        &ejections,
    )
}

/// A gauge family read at scrape time.
fn gauges<N: EncodeGaugeValue + Copy + std::fmt::Debug>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &BTreeMap<Labels, N>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        ConstGauge::new(*v).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

/// A counter family read at scrape time (`name` without `_total`, which
/// the encoder adds).
fn counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &BTreeMap<Labels, u64>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        ConstCounter::new(*v).encode(family.encode_family(labels)?)?;
    }
    Ok(())
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
        "HTTP/1.1 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
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

    /// Durations are histograms by listener: cumulative buckets, a sum and
    /// a count that add up across relays; every family is described before
    /// its first series.
    #[test]
    fn durations_are_histograms_by_listener() {
        let metrics = Metrics::new(None);
        let empty = metrics.render();
        for family in [
            "tlsrelay_sessions_total",
            "tlsrelay_handshake_seconds",
            "tlsrelay_uring_workers_replaced_total",
        ] {
            assert!(
                empty.contains(&format!("# HELP {family} ")),
                "{family}: {empty}"
            );
        }
        assert!(empty.contains("# TYPE tlsrelay_handshake_seconds histogram\n"));
        for (setup_ms, duration_ms) in [(3.0, 40.0), (30.0, 9000.0)] {
            let mut report = SessionReport::new(1, "in", "127.0.0.1:1".parse().unwrap(), "up");
            report.outcome = Outcome::Relayed {
                end: tlsrelay_core::report::PumpEnd::Closed,
            };
            report.setup_ms = setup_ms;
            report.duration_ms = duration_ms;
            metrics.record(&report);
        }
        let text = metrics.render();
        for line in [
            "tlsrelay_handshake_seconds_bucket{listener=\"in\",le=\"0.002\"} 0\n",
            "tlsrelay_handshake_seconds_bucket{listener=\"in\",le=\"0.004\"} 1\n",
            "tlsrelay_handshake_seconds_bucket{listener=\"in\",le=\"0.032\"} 2\n",
            "tlsrelay_handshake_seconds_bucket{listener=\"in\",le=\"+Inf\"} 2\n",
            "tlsrelay_handshake_seconds_count{listener=\"in\"} 2\n",
            "tlsrelay_handshake_seconds_sum{listener=\"in\"} 0.033\n",
            "tlsrelay_session_duration_seconds_bucket{listener=\"in\",le=\"0.064\"} 1\n",
            "tlsrelay_session_duration_seconds_bucket{listener=\"in\",le=\"16.384\"} 2\n",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
    }

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
