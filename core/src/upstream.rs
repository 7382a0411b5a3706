//! An upstream pool as a machine: its servers with weights and backups,
//! each server's health (active checks with rise and fall, passive
//! ejection after consecutive connect failures), an operator's drain, and
//! which server the next session goes to (the balance). No sockets and no
//! clock: the driver reports connects, check results and session ends,
//! and asks [`Pool::pick`] for a server; every transition comes back as a
//! value to log once.

use std::fmt;
use std::hash::{Hash, Hasher};

/// How sessions are spread over a pool's servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balance {
    /// Smooth weighted round robin (nginx's): weight 3 gets 3 of every
    /// 4 sessions beside weight 1, interleaved.
    RoundRobin,
    /// The server with the fewest sessions per unit of weight.
    LeastConnections,
    /// The first server (in configured order) that is up: failover only.
    First,
    /// Consistent by the client's address: the same client keeps its
    /// server while the pool's membership holds (rendezvous hashing,
    /// weighted), and only the clients of a server that leaves move.
    HashClient,
    /// The same by the name the client asked for (SNI).
    HashSni,
}
keywords!(Balance, "balance", {
    RoundRobin => "round-robin",
    LeastConnections => "least-connections",
    First => "first",
    HashClient => "hash-client",
    HashSni => "hash-sni",
});

/// One server as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSpec {
    pub address: HostPort,
    /// Relative share of sessions (1-256).
    pub weight: u32,
    /// Used only while no other server is up.
    pub backup: bool,
}

/// When health changes a server's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthRules {
    /// Consecutive good checks that bring a down server up.
    pub rise: u32,
    /// Consecutive failed checks that take an up server down.
    pub fall: u32,
    /// Consecutive failed connects of real sessions that eject a server
    /// (brought back by the active check, or after the driver's ejection
    /// time when there is none).
    pub eject_after: u32,
}

impl Default for HealthRules {
    fn default() -> Self {
        HealthRules {
            rise: 2,
            fall: 3,
            eject_after: 3,
        }
    }
}

/// What an operator set (HAProxy's `set server state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admin {
    Ready,
    /// No new sessions; those under way go on.
    Drain,
}

impl fmt::Display for Admin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Admin::Ready => "ready",
            Admin::Drain => "drain",
        })
    }
}

/// A change of a server's state, to log once and count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub server: usize,
    pub up: bool,
    /// What did it: `"check"`, `"ejected after 3 failed connects"`, …
    pub why: String,
}

#[derive(Clone, Debug)]
struct Server {
    spec: ServerSpec,
    up: bool,
    admin: Admin,
    /// Consecutive good checks while down, failed checks while up.
    streak: u32,
    /// Consecutive failed connects of real sessions.
    connect_failures: u32,
    /// Sessions under way.
    active: u64,
    /// Smooth weighted round robin's running weight.
    current: i64,
    ejections: u64,
}

/// A server as the status view shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerView {
    pub address: String,
    pub weight: u32,
    pub backup: bool,
    pub up: bool,
    pub admin: Admin,
    pub active: u64,
    pub ejections: u64,
}

#[derive(Clone, Debug)]
pub struct Pool {
    servers: Vec<Server>,
    balance: Balance,
    rules: HealthRules,
}

impl Pool {
    /// Every server starts up (as HAProxy's do): the first `fall` failed
    /// checks or `eject_after` failed connects take it down.
    pub fn new(specs: Vec<ServerSpec>, balance: Balance, rules: HealthRules) -> Pool {
        Pool {
            servers: specs
                .into_iter()
                .map(|spec| Server {
                    spec,
                    up: true,
                    admin: Admin::Ready,
                    streak: 0,
                    connect_failures: 0,
                    active: 0,
                    current: 0,
                    ejections: 0,
                })
                .collect(),
            balance,
            rules,
        }
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    pub fn balance(&self) -> Balance {
        self.balance
    }

    /// What the pool was built from: two pools with the same fingerprint
    /// are the same pool (a reload keeps its state).
    pub fn fingerprint(&self) -> String {
        let specs: Vec<&ServerSpec> = self.servers.iter().map(|s| &s.spec).collect();
        format!("{specs:?} {} {:?}", self.balance, self.rules)
    }

    pub fn address(&self, server: usize) -> &HostPort {
        &self.servers[server].spec.address
    }

    /// The server of this address (`host:port` as configured).
    pub fn find(&self, address: &str) -> Option<usize> {
        self.servers
            .iter()
            .position(|s| s.spec.address.to_string() == address)
    }

    /// The server for the next session: one that is up and ready and not
    /// in `tried` (servers this session already failed to connect to),
    /// non-backups first; `key` is the client address or the SNI for the
    /// hash balances. `None`: no server can take it.
    pub fn pick(&mut self, key: Option<&[u8]>, tried: &[usize]) -> Option<usize> {
        let usable = |s: &Server, i: usize| s.up && s.admin == Admin::Ready && !tried.contains(&i);
        let primary: Vec<usize> = (0..self.servers.len())
            .filter(|&i| usable(&self.servers[i], i) && !self.servers[i].spec.backup)
            .collect();
        let candidates = if primary.is_empty() {
            (0..self.servers.len())
                .filter(|&i| usable(&self.servers[i], i) && self.servers[i].spec.backup)
                .collect()
        } else {
            primary
        };
        if candidates.is_empty() {
            return None;
        }
        let chosen = match (self.balance, key) {
            (Balance::First, _) => candidates[0],
            (Balance::LeastConnections, _) => *candidates
                .iter()
                .min_by(|&&a, &&b| {
                    let (a, b) = (&self.servers[a], &self.servers[b]);
                    // active / weight, compared without division.
                    (u128::from(a.active) * u128::from(b.spec.weight))
                        .cmp(&(u128::from(b.active) * u128::from(a.spec.weight)))
                })
                .expect("candidates are not empty"),
            (Balance::HashClient | Balance::HashSni, Some(key)) => {
                self.rendezvous(&candidates, key)
            }
            (_, _) => self.round_robin(&candidates),
        };
        Some(chosen)
    }

    /// nginx's smooth weighted round robin over `candidates`.
    fn round_robin(&mut self, candidates: &[usize]) -> usize {
        let total: i64 = candidates
            .iter()
            .map(|&i| i64::from(self.servers[i].spec.weight))
            .sum();
        let mut best = candidates[0];
        for &i in candidates {
            let s = &mut self.servers[i];
            s.current += i64::from(s.spec.weight);
            if s.current > self.servers[best].current {
                best = i;
            }
        }
        self.servers[best].current -= total;
        best
    }

    /// Weighted rendezvous hashing: each server scores `key`; the highest
    /// wins. A server leaving moves only its own keys.
    fn rendezvous(&self, candidates: &[usize], key: &[u8]) -> usize {
        let score = |i: usize| {
            let s = &self.servers[i];
            let mut h = Fnv::default();
            key.hash(&mut h);
            s.spec.address.to_string().hash(&mut h);
            // A uniform (0, 1]; -w / ln(u) is the weighted HRW score.
            let u = ((h.finish() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
            -f64::from(s.spec.weight) / u.ln()
        };
        *candidates
            .iter()
            .max_by(|&&a, &&b| score(a).total_cmp(&score(b)))
            .expect("candidates are not empty")
    }

    /// A session's connect to `server` worked: it holds a session now.
    pub fn connected(&mut self, server: usize) {
        let s = &mut self.servers[server];
        s.connect_failures = 0;
        s.active += 1;
    }

    /// A session that [`Pool::connected`] to `server` ended.
    pub fn released(&mut self, server: usize) {
        let s = &mut self.servers[server];
        s.active = s.active.saturating_sub(1);
    }

    /// A session could not connect to `server` (refused, reset, timed
    /// out): past `eject_after` in a row, it is ejected.
    pub fn connect_failed(&mut self, server: usize) -> Option<Transition> {
        let eject_after = self.rules.eject_after;
        let s = &mut self.servers[server];
        s.connect_failures += 1;
        if s.up && eject_after > 0 && s.connect_failures >= eject_after {
            s.up = false;
            s.streak = 0;
            s.ejections += 1;
            return Some(Transition {
                server,
                up: false,
                why: format!("ejected after {} failed connects", s.connect_failures),
            });
        }
        None
    }

    /// An active check's result.
    pub fn checked(&mut self, server: usize, ok: bool, detail: &str) -> Option<Transition> {
        let rules = self.rules;
        let s = &mut self.servers[server];
        if ok == s.up {
            s.streak = 0;
            if ok {
                s.connect_failures = 0;
            }
            return None;
        }
        s.streak += 1;
        let needed = if ok { rules.rise } else { rules.fall };
        if s.streak < needed.max(1) {
            return None;
        }
        s.up = ok;
        s.streak = 0;
        s.connect_failures = 0;
        Some(Transition {
            server,
            up: ok,
            why: format!(
                "{} {} check{} {}",
                needed.max(1),
                if ok { "good" } else { "failed" },
                if needed > 1 { "s" } else { "" },
                detail
            )
            .trim_end()
            .to_string(),
        })
    }

    /// Brings an ejected server back without a check (a pool with no
    /// active checks, after the driver's ejection time).
    pub fn readmit(&mut self, server: usize) -> Option<Transition> {
        let s = &mut self.servers[server];
        if s.up {
            return None;
        }
        s.up = true;
        s.connect_failures = 0;
        Some(Transition {
            server,
            up: true,
            why: "readmitted after its ejection time".into(),
        })
    }

    pub fn set_admin(&mut self, server: usize, admin: Admin) {
        self.servers[server].admin = admin;
    }

    pub fn is_up(&self, server: usize) -> bool {
        self.servers[server].up
    }

    pub fn view(&self) -> Vec<ServerView> {
        self.servers
            .iter()
            .map(|s| ServerView {
                address: s.spec.address.to_string(),
                weight: s.spec.weight,
                backup: s.spec.backup,
                up: s.up,
                admin: s.admin,
                active: s.active,
                ejections: s.ejections,
            })
            .collect()
    }
}

/// FNV-1a: a fixed hash, the same in every process of a fleet (std's
/// SipHash is keyed per process).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        // A final mix, so nearby keys spread.
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A `host:port` pair whose host may be a DNS name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for HostPort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid address '{s}', expected host:port or [ipv6]:port");
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let host = match host.strip_prefix('[') {
            Some(inner) => inner.strip_suffix(']').ok_or_else(bad)?,
            None if host.contains(':') => return Err(bad()),
            None => host,
        };
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(HostPort {
            host: host.to_string(),
            port,
        })
    }
}

impl<'de> serde::Deserialize<'de> for HostPort {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <String as serde::Deserialize>::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

string_schema!(
    HostPort,
    "HostPort",
    "A host name or IP address and a port: \"mx.example.org:25\", \"[2001:db8::1]:443\"."
);

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(port: u16, weight: u32, backup: bool) -> ServerSpec {
        ServerSpec {
            address: HostPort {
                host: "127.0.0.1".into(),
                port,
            },
            weight,
            backup,
        }
    }

    fn pool(balance: Balance, specs: Vec<ServerSpec>) -> Pool {
        Pool::new(specs, balance, HealthRules::default())
    }

    fn shares(p: &mut Pool, n: usize) -> Vec<usize> {
        let mut count = vec![0; p.len()];
        for _ in 0..n {
            count[p.pick(None, &[]).unwrap()] += 1;
        }
        count
    }

    #[test]
    fn round_robin_follows_the_weights_exactly_and_interleaves() {
        let mut p = pool(
            Balance::RoundRobin,
            vec![spec(1, 5, false), spec(2, 3, false), spec(3, 2, false)],
        );
        assert_eq!(shares(&mut p, 10_000), [5000, 3000, 2000]);
        let order: Vec<usize> = (0..10).map(|_| p.pick(None, &[]).unwrap()).collect();
        assert_eq!(
            order,
            [0, 1, 2, 0, 0, 1, 0, 2, 1, 0],
            "smooth, not 0,0,0,0,0,…"
        );
    }

    #[test]
    fn backups_serve_only_while_every_other_server_is_down() {
        let mut p = pool(
            Balance::RoundRobin,
            vec![spec(1, 1, false), spec(2, 1, false), spec(3, 1, true)],
        );
        assert!(!shares(&mut p, 100).is_empty());
        assert_eq!(shares(&mut p, 100)[2], 0);
        for _ in 0..3 {
            p.connect_failed(0);
        }
        assert_eq!(shares(&mut p, 100)[2], 0, "one primary still up");
        for _ in 0..3 {
            p.connect_failed(1);
        }
        assert_eq!(shares(&mut p, 100), [0, 0, 100]);
        for _ in 0..2 {
            p.checked(1, true, "");
        }
        assert_eq!(shares(&mut p, 100), [0, 100, 0], "back to the primary");
        for _ in 0..3 {
            p.connect_failed(2);
        }
        assert_eq!(p.pick(None, &[]), Some(1));
        p.set_admin(1, Admin::Drain);
        assert_eq!(p.pick(None, &[]), None, "nothing left");
    }

    #[test]
    fn a_session_retries_on_another_server_never_the_same_one() {
        let mut p = pool(
            Balance::RoundRobin,
            vec![spec(1, 1, false), spec(2, 1, false)],
        );
        let first = p.pick(None, &[]).unwrap();
        let second = p.pick(None, &[first]).unwrap();
        assert_ne!(first, second);
        assert_eq!(p.pick(None, &[first, second]), None);
    }

    #[test]
    fn least_connections_fills_by_weight() {
        let mut p = pool(
            Balance::LeastConnections,
            vec![spec(1, 1, false), spec(2, 3, false)],
        );
        for _ in 0..8 {
            let s = p.pick(None, &[]).unwrap();
            p.connected(s);
        }
        let active: Vec<u64> = p.view().iter().map(|v| v.active).collect();
        assert_eq!(active, [2, 6]);
        p.released(1);
        p.released(1);
        p.released(1);
        assert_eq!(p.pick(None, &[]), Some(1));
    }

    #[test]
    fn first_is_failover_in_order() {
        let mut p = pool(Balance::First, vec![spec(1, 1, false), spec(2, 1, false)]);
        assert_eq!(shares(&mut p, 10), [10, 0]);
        p.set_admin(0, Admin::Drain);
        assert_eq!(shares(&mut p, 10), [0, 10]);
    }

    #[test]
    fn hashing_keeps_each_client_on_its_server_and_moves_only_the_lost_servers_clients() {
        let specs = vec![spec(1, 1, false), spec(2, 1, false), spec(3, 2, false)];
        let mut p = pool(Balance::HashClient, specs);
        let keys: Vec<Vec<u8>> = (0..4000u32)
            .map(|i| format!("10.0.{}.{}", i / 256, i % 256).into_bytes())
            .collect();
        let before: Vec<usize> = keys.iter().map(|k| p.pick(Some(k), &[]).unwrap()).collect();
        let again: Vec<usize> = keys.iter().map(|k| p.pick(Some(k), &[]).unwrap()).collect();
        assert_eq!(before, again, "sticky");
        let mut count = [0usize; 3];
        for &s in &before {
            count[s] += 1;
        }
        // Weighted 1:1:2 within a few percent.
        for (got, want) in count.iter().zip([1000.0, 1000.0, 2000.0]) {
            assert!((*got as f64 - want).abs() / want < 0.08, "{count:?}");
        }
        for _ in 0..3 {
            p.connect_failed(0);
        }
        for (k, &was) in keys.iter().zip(&before) {
            let now = p.pick(Some(k), &[]).unwrap();
            if was != 0 {
                assert_eq!(now, was, "a client of a live server stays");
            } else {
                assert_ne!(now, 0);
            }
        }
    }

    #[test]
    fn checks_rise_and_fall_and_each_change_is_one_transition() {
        let mut p = Pool::new(
            vec![spec(1, 1, false)],
            Balance::RoundRobin,
            HealthRules {
                rise: 2,
                fall: 3,
                eject_after: 3,
            },
        );
        assert_eq!(p.checked(0, false, ""), None);
        assert_eq!(p.checked(0, false, ""), None);
        assert_eq!(
            p.checked(0, true, ""),
            None,
            "a good check resets the streak"
        );
        assert_eq!(p.checked(0, false, ""), None);
        assert_eq!(p.checked(0, false, ""), None);
        let down = p.checked(0, false, "connection refused").unwrap();
        assert!(!down.up);
        assert_eq!(down.why, "3 failed checks connection refused");
        assert_eq!(p.checked(0, false, ""), None, "said once");
        assert_eq!(p.checked(0, true, ""), None);
        assert!(p.checked(0, true, "").unwrap().up);
        // Passive: three failed connects in a row eject it.
        assert_eq!(p.connect_failed(0), None);
        p.connected(0);
        assert_eq!(
            p.connect_failed(0),
            None,
            "a connect in between restarts the count"
        );
        assert_eq!(p.connect_failed(0), None);
        let ejected = p.connect_failed(0).unwrap();
        assert_eq!(ejected.why, "ejected after 3 failed connects");
        assert_eq!(p.view()[0].ejections, 1);
        assert!(p.readmit(0).unwrap().up);
    }
}
