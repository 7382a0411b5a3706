//! Who may connect to a listener, and how fast: an allow and a deny list
//! of networks, and a token bucket of new connections per client address,
//! decided before a byte is read. Time comes in as seconds from any fixed
//! start, so every rule is a table test.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::smtp::address::Cidr;

/// A client as limits count it: its address, or for IPv6 its /64 (one
/// site has a whole /64 to pick addresses from); IPv4-mapped IPv6 as IPv4.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

/// Why a connection was turned away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// Not in `allow`, or in `deny`.
    Listed,
    /// Past its new-connection rate.
    Rate,
}

impl Denied {
    /// The metric label.
    pub fn class(self) -> &'static str {
        match self {
            Denied::Listed => "access",
            Denied::Rate => "rate",
        }
    }
}

/// Buckets kept before full ones are forgotten.
const MAX_BUCKETS: usize = 10_000;

/// A listener's access rules and its clients' buckets.
#[derive(Clone, Debug, Default)]
pub struct AccessRules {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
    /// New connections per second, and the burst.
    rate: Option<(f64, f64)>,
    buckets: HashMap<IpAddr, Bucket>,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: f64,
}

impl AccessRules {
    pub fn new(allow: Vec<Cidr>, deny: Vec<Cidr>, rate: Option<f64>, burst: Option<u32>) -> Self {
        AccessRules {
            allow,
            deny,
            rate: rate.map(|r| (r, f64::from(burst.unwrap_or_else(|| default_burst(r))))),
            buckets: HashMap::new(),
        }
    }

    /// Whether any rule is set (a listener without any skips the lock).
    pub fn is_open(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty() && self.rate.is_none()
    }

    /// A new connection from `ip` at `now` (seconds): admitted, or why not.
    pub fn admit(&mut self, ip: IpAddr, now: f64) -> Result<(), Denied> {
        if self.deny.iter().any(|c| c.contains(ip))
            || (!self.allow.is_empty() && !self.allow.iter().any(|c| c.contains(ip)))
        {
            return Err(Denied::Listed);
        }
        let Some((rate, burst)) = self.rate else {
            return Ok(());
        };
        if self.buckets.len() >= MAX_BUCKETS {
            // Forget the clients whose buckets have refilled: they would
            // start full anyway.
            self.buckets
                .retain(|_, b| b.tokens + (now - b.at) * rate < burst);
        }
        let bucket = self.buckets.entry(client_key(ip)).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        bucket.tokens = (bucket.tokens + (now - bucket.at).max(0.0) * rate).min(burst);
        bucket.at = now;
        if bucket.tokens < 1.0 {
            return Err(Denied::Rate);
        }
        bucket.tokens -= 1.0;
        Ok(())
    }
}

/// The burst when none is configured: a second's worth, at least one.
pub fn default_burst(rate: f64) -> u32 {
    rate.ceil().max(1.0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn allow_and_deny_lists() {
        let cidr = |s: &str| s.parse::<Cidr>().unwrap();
        let mut open = AccessRules::default();
        assert!(open.is_open());
        assert_eq!(open.admit(ip("203.0.113.9"), 0.0), Ok(()));
        let mut rules = AccessRules::new(
            vec![cidr("10.0.0.0/8")],
            vec![cidr("10.6.6.0/24")],
            None,
            None,
        );
        assert_eq!(rules.admit(ip("10.1.2.3"), 0.0), Ok(()));
        assert_eq!(rules.admit(ip("::ffff:10.1.2.3"), 0.0), Ok(()));
        assert_eq!(rules.admit(ip("10.6.6.6"), 0.0), Err(Denied::Listed));
        assert_eq!(rules.admit(ip("192.0.2.1"), 0.0), Err(Denied::Listed));
        let mut deny_only = AccessRules::new(vec![], vec![cidr("192.0.2.0/24")], None, None);
        assert_eq!(deny_only.admit(ip("192.0.2.7"), 0.0), Err(Denied::Listed));
        assert_eq!(deny_only.admit(ip("198.51.100.1"), 0.0), Ok(()));
    }

    #[test]
    fn each_client_gets_a_burst_then_its_rate() {
        let mut rules = AccessRules::new(vec![], vec![], Some(2.0), Some(4));
        let a = ip("192.0.2.1");
        let admitted = |rules: &mut AccessRules, at: f64, n: usize| {
            (0..n).filter(|_| rules.admit(a, at).is_ok()).count()
        };
        assert_eq!(admitted(&mut rules, 0.0, 10), 4, "the burst");
        assert_eq!(admitted(&mut rules, 0.4, 10), 0, "0.8 of a token");
        assert_eq!(admitted(&mut rules, 1.0, 10), 2, "two per second");
        assert_eq!(
            admitted(&mut rules, 100.0, 10),
            4,
            "refilled to the burst, no more"
        );
        // Another client has its own bucket; a /64 is one client.
        assert_eq!(rules.admit(ip("192.0.2.2"), 100.0), Ok(()));
        let mut v6 = AccessRules::new(vec![], vec![], Some(1.0), Some(1));
        assert_eq!(v6.admit(ip("2001:db8:1:2::1"), 0.0), Ok(()));
        assert_eq!(v6.admit(ip("2001:db8:1:2::99"), 0.0), Err(Denied::Rate));
        assert_eq!(v6.admit(ip("2001:db8:1:3::1"), 0.0), Ok(()));
    }

    #[test]
    fn buckets_are_forgotten_once_full_again() {
        let mut rules = AccessRules::new(vec![], vec![], Some(1.0), Some(1));
        for i in 0..MAX_BUCKETS as u32 {
            let _ = rules.admit(IpAddr::from(i.to_be_bytes()), 0.0);
        }
        assert_eq!(rules.buckets.len(), MAX_BUCKETS);
        rules.admit(ip("198.51.100.1"), 10.0).unwrap();
        assert_eq!(rules.buckets.len(), 1, "only the new one");
    }
}
