//! The tables: which figures each has, rows printed as cells finish,
//! and `target/bench/report.json` with the charts at the end.

use super::*;

/// Figures of one run, by name.
pub(super) type Sample = BTreeMap<&'static str, f64>;

/// A table of figures: which ones, and the one ratios are taken of.
pub(super) struct Table {
    pub(super) name: &'static str,
    /// Its bytes go through the splice pump: both pumps get a row.
    pub(super) splices: bool,
    pub(super) x: &'static str,
    pub(super) columns: &'static [(&'static str, &'static str)],
    pub(super) primary: &'static str,
    pub(super) note: &'static str,
}

pub(super) const THROUGHPUT: Table = Table {
    name: "throughput",
    splices: true,
    x: "conns",
    columns: &[
        ("gbit_per_s", "Gbit/s"),
        ("cpu_s_per_gb", "CPU s/GB"),
        ("machine_cpu_s_per_gb", "all CPU s/GB"),
        ("p99_ms", "p99 ms"),
        ("syscalls_per_mb", "calls/MB"),
        ("switches_per_mb", "cswch/MB"),
    ],
    primary: "gbit_per_s",
    note: "Gbit/s pushed through to a discarding sink; CPU s/GB of the relay's process tree, and of the whole machine (generator, relay, sink, kernel); p99 ms = transfer completion time; the relay's system calls and context switches per MB (perf stat; each call by name in report.json)",
};

pub(super) const LATENCY: Table = Table {
    name: "latency",
    splices: true,
    x: "conns",
    columns: &[
        ("requests_per_s", "req/s"),
        ("p50_us", "p50 µs"),
        ("p99_us", "p99 µs"),
        ("p999_us", "p99.9 µs"),
        ("cpu_us_per_req", "CPU µs/req"),
        ("machine_cpu_us_per_req", "all µs/req"),
    ],
    primary: "requests_per_s",
    note: "1 KiB request, 1 KiB echoed response, one outstanding per connection; CPU µs per request of the relay's process tree and of the whole machine",
};

pub(super) const HANDSHAKES: Table = Table {
    name: "handshakes",
    splices: false,
    x: "conns",
    columns: &[
        ("handshakes_per_s", "hs/s"),
        ("cpu_ms_per_handshake", "CPU ms/hs"),
        ("p50_us", "p50 µs"),
        ("p99_us", "p99 µs"),
        ("resumed", "resumed %"),
    ],
    primary: "handshakes_per_s",
    note: "new TLS 1.3 sessions (TLS in, plaintext out), each proven by one echoed byte; full: the client never resumes; resumed: it offers its last session's ticket",
};

pub(super) const SMTP: Table = Table {
    name: "smtp",
    splices: false,
    x: "message",
    columns: &[
        ("messages_per_s", "msg/s"),
        ("gbit_per_s", "Gbit/s"),
        ("cpu_s_per_gb", "CPU s/GB"),
        ("cpu_us_per_msg", "CPU µs/msg"),
        ("p50_us", "p50 µs"),
        ("p99_us", "p99 µs"),
        ("p999_us", "p99.9 µs"),
    ],
    primary: "messages_per_s",
    note: "STARTTLS both legs unless \"plain\"; latency = MAIL to the final reply (the next hop's 250; Postfix's own 250 after queueing); CPU of the relay's processes (Postfix's until its queue is empty again); HAProxy forwards blind in tcp mode (the client's STARTTLS reaches the sink); session per msg: each of 16 senders connects, sends one message and QUITs, 200 times",
};

pub(super) const ROUTING_THROUGHPUT: Table = Table {
    name: "routing throughput",
    splices: false,
    x: "conns",
    columns: &[
        ("gbit_per_s", "Gbit/s"),
        ("cpu_s_per_gb", "CPU s/GB"),
        ("machine_cpu_s_per_gb", "all CPU s/GB"),
        ("p99_ms", "p99 ms"),
    ],
    primary: "gbit_per_s",
    note: "TLS routed by SNI and passed through untouched to a pool of two TLS sinks (tlsrelay routes, HAProxy req.ssl_sni + use_backend + balance roundrobin + check, nginx ssl_preread + map); the relay terminates nothing",
};

pub(super) const ROUTING_LATENCY: Table = Table {
    name: "routing latency",
    splices: false,
    x: "conns",
    columns: &[
        ("requests_per_s", "req/s"),
        ("p50_us", "p50 µs"),
        ("p99_us", "p99 µs"),
        ("p999_us", "p99.9 µs"),
        ("cpu_us_per_req", "CPU µs/req"),
    ],
    primary: "requests_per_s",
    note: "1 KiB request/response over TLS passed through by SNI to a pool of two TLS echo sinks",
};

pub(super) const ROUTING_HANDSHAKES: Table = Table {
    name: "routing handshakes",
    splices: false,
    x: "conns",
    columns: &[
        ("handshakes_per_s", "hs/s"),
        ("cpu_ms_per_handshake", "relay CPU ms/hs"),
        ("p50_us", "p50 µs"),
        ("p99_us", "p99 µs"),
    ],
    primary: "handshakes_per_s",
    note: "new TLS 1.3 sessions through the router (the servers terminate them): the relay reads each ClientHello, picks a server, splices",
};

pub(super) const FAILOVER: Table = Table {
    name: "routing failover",
    splices: false,
    x: "conns",
    columns: &[
        ("ok_percent", "ok %"),
        ("failed_new", "failed new"),
        ("failed_in_flight", "failed in flight"),
        ("handshakes_per_s", "sessions/s"),
    ],
    primary: "ok_percent",
    note: "new TLS sessions through the router while one of the pool's two servers is killed a second in (checks every 1 s, down after 2): sessions that failed, begun after the kill (new) or before it (in flight: their TLS state died with the server, for any relay)",
};

pub(super) const IDLE: Table = Table {
    name: "idle",
    splices: false,
    x: "idle conns",
    columns: &[("kib_per_connection", "KiB/conn"), ("rss_mib", "RSS MiB")],
    primary: "kib_per_connection",
    note: "RSS growth of the relay's process tree per idle established TLS connection (lower is better)",
};

/// One printed row: a peer's runs of one cell.
pub(super) struct Row {
    pub(super) table: &'static str,
    pub(super) scenario: String,
    pub(super) x: String,
    pub(super) peer: Peer,
    pub(super) runs: Vec<Sample>,
    pub(super) ratios: Vec<f64>,
    pub(super) path: String,
    pub(super) failed: Option<String>,
}

impl Bench {
    /// Prints `t`'s header before its first cell.
    pub(super) fn header(&self, t: &Table) {
        if self.headed.replace(Some(t.name)) == Some(t.name) {
            return;
        }
        print!(
            "\n== {} ({})\n{:<18} {:>12} {:<14}",
            t.name, t.note, "scenario", t.x, "relay"
        );
        for (_, head) in t.columns {
            print!(" {head:>10}");
        }
        println!(" {:>20}  path", "tlsrelay/this");
    }

    pub(super) fn print(&self, t: &Table, row: &Row) {
        print!("{:<18} {:>12} {:<14}", row.scenario, row.x, row.peer.name());
        if let Some(why) = &row.failed {
            println!(" failed: {}", why.lines().next().unwrap_or(""));
            return;
        }
        if row.runs.is_empty() {
            println!(" {:>10}", "n/a");
            return;
        }
        for (key, _) in t.columns {
            let v = median(
                row.runs
                    .iter()
                    .map(|r| r.get(key).copied().unwrap_or(f64::NAN))
                    .collect(),
            );
            if v.is_nan() {
                print!(" {:>10}", "-");
            } else if v >= 100.0 {
                print!(" {v:>10.0}");
            } else {
                print!(" {v:>10.2}");
            }
        }
        let ratio = match row.peer {
            Peer::Tlsrelay => String::new(),
            _ => {
                let r = &row.ratios;
                let (lo, hi) = r
                    .iter()
                    .fold((f64::MAX, 0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                format!("{lo:.2}/{:.2}/{hi:.2}", median(r.clone()))
            }
        };
        println!(" {ratio:>20}  {}", row.path);
    }

    pub(super) fn finish(self) -> anyhow::Result<()> {
        let rows: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "table": r.table, "scenario": r.scenario, "x": r.x, "peer": r.peer.name(),
                    "runs": r.runs, "tlsrelay_over_peer": r.ratios, "path": r.path,
                    "failed": r.failed,
                })
            })
            .collect();
        let report = serde_json::json!({
            "quick": self.quick,
            "rounds": self.rounds,
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "rows": rows,
        });
        let json = self.dir.join("report.json");
        std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
        let charts = crate::chart::write_all(&self.dir, &self.rows_for_charts())?;
        let missing: Vec<&str> = Peer::RELAYS
            .iter()
            .filter(|p| !p.installed())
            .map(|p| p.name())
            .collect();
        println!(
            "\ntlsrelay/this = tlsrelay's figure over this relay's for the table's first column, per round:\n\
             min/median/max over {} round(s), peers run in turn (A B C … A B C …); the other columns are medians.\n\
             direct = the generator straight to the sink. n/a: the relay can't do that scenario.{}\n\
             report: {}\ncharts: {} SVG files in {}",
            self.rounds,
            if missing.is_empty() { String::new() } else { format!("\nNot installed: {}", missing.join(", ")) },
            json.display(),
            charts,
            self.dir.display()
        );
        Ok(())
    }

    /// Per table and scenario: the x labels and each peer's medians of the
    /// table's first column.
    pub(super) fn rows_for_charts(&self) -> Vec<crate::chart::Chart> {
        let mut charts: Vec<crate::chart::Chart> = Vec::new();
        for r in &self.rows {
            let t = [
                &THROUGHPUT,
                &LATENCY,
                &HANDSHAKES,
                &ROUTING_THROUGHPUT,
                &ROUTING_LATENCY,
                &ROUTING_HANDSHAKES,
                &FAILOVER,
                &SMTP,
                &IDLE,
            ]
            .into_iter()
            .find(|t| t.name == r.table)
            .expect("known table");
            let title = format!("{}: {}", t.name, r.scenario);
            let i = match charts.iter().position(|c| c.title == title) {
                Some(i) => i,
                None => {
                    let unit = t.columns[0].1;
                    charts.push(crate::chart::Chart {
                        title,
                        x_label: t.x.to_string(),
                        y_label: unit.to_string(),
                        xs: Vec::new(),
                        series: Vec::new(),
                    });
                    charts.len() - 1
                }
            };
            let c = &mut charts[i];
            let xi = match c.xs.iter().position(|x| *x == r.x) {
                Some(xi) => xi,
                None => {
                    c.xs.push(r.x.clone());
                    c.xs.len() - 1
                }
            };
            let si = match c.series.iter().position(|(n, _)| n == r.peer.name()) {
                Some(si) => si,
                None => {
                    c.series.push((r.peer.name().to_string(), Vec::new()));
                    c.series.len() - 1
                }
            };
            let values = &mut c.series[si].1;
            values.resize(xi + 1, None);
            if !r.runs.is_empty() {
                values[xi] = Some(median(r.runs.iter().map(|s| s[t.primary]).collect()));
            }
        }
        charts
    }
}
