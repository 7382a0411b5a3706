//! Which hosts receive a domain's mail, from its MX answer (RFC 5321
//! 5.1): preference order, a random order among equal preferences, the
//! domain itself when it publishes no MX, and nobody when it publishes a
//! null MX (RFC 7505).

/// One MX record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mx {
    pub preference: u16,
    pub exchange: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MxHosts {
    /// Try these in order.
    Hosts(Vec<String>),
    /// The domain accepts no mail (`MX 0 .`).
    NullMx,
}

/// The hosts to try for `domain`, given its MX records. `pick(n)` returns
/// an index below `n`: it orders hosts of equal preference.
pub fn mx_hosts(domain: &str, records: &[Mx], mut pick: impl FnMut(usize) -> usize) -> MxHosts {
    let name = |host: &str| host.trim_end_matches('.').to_ascii_lowercase();
    if records.is_empty() {
        return MxHosts::Hosts(vec![name(domain)]);
    }
    let mut real: Vec<&Mx> = records
        .iter()
        .filter(|r| !name(&r.exchange).is_empty())
        .collect();
    if real.is_empty() {
        return MxHosts::NullMx;
    }
    real.sort_by_key(|r| r.preference);
    let mut hosts: Vec<String> = Vec::new();
    for group in real.chunk_by(|a, b| a.preference == b.preference) {
        let mut group: Vec<String> = group.iter().map(|r| name(&r.exchange)).collect();
        while !group.is_empty() {
            let host = group.swap_remove(pick(group.len()) % group.len());
            if !hosts.contains(&host) {
                hosts.push(host);
            }
        }
    }
    MxHosts::Hosts(hosts)
}

/// Why MX delivery does not connect to an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unfit {
    /// It is one of the relay's own listeners (or loopback): a mail loop.
    Myself,
    /// A private network: a domain's MX pointing inside would reach
    /// internal services.
    Private,
}

/// Where MX delivery may connect: never to the relay itself, and to
/// loopback or private networks only where a connector allows it.
#[derive(Clone, Debug, Default)]
pub struct MxGuard {
    /// The relay's listener addresses (port 0 ones never match).
    pub own_listeners: Vec<std::net::SocketAddr>,
    pub private: Vec<super::address::Cidr>,
    /// The connector's `allow_private_mx`.
    pub allowed: Vec<super::address::Cidr>,
}

impl MxGuard {
    /// Whether `ip:port` may be delivered to. `is_local` says whether an
    /// address is this host's own (asked only when a listener listens on
    /// every address of the host).
    pub fn check(
        &self,
        ip: std::net::IpAddr,
        port: u16,
        is_local: impl Fn(std::net::IpAddr) -> bool,
    ) -> Result<(), Unfit> {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
            v4 => v4,
        };
        let mine = self.own_listeners.iter().any(|l| {
            l.port() == port
                && port != 0
                && (l.ip() == ip || (l.ip().is_unspecified() && (ip.is_loopback() || is_local(ip))))
        });
        if mine || ip.is_unspecified() {
            return Err(Unfit::Myself);
        }
        if self.allowed.iter().any(|c| c.contains(ip)) {
            return Ok(());
        }
        if ip.is_loopback() {
            return Err(Unfit::Myself);
        }
        if self.private.iter().any(|c| c.contains(ip)) {
            return Err(Unfit::Private);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mx_delivery_keeps_out_of_the_relay_itself_and_private_networks() {
        let cidr = |s: &str| s.parse::<super::super::address::Cidr>().unwrap();
        let guard = MxGuard {
            own_listeners: vec![
                "192.0.2.1:25".parse().unwrap(),
                "0.0.0.0:2525".parse().unwrap(),
            ],
            private: vec![cidr("10.0.0.0/8"), cidr("fc00::/7")],
            allowed: vec![],
        };
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let nowhere = |_| false;
        assert_eq!(
            guard.check(ip("192.0.2.1"), 25, nowhere),
            Err(Unfit::Myself)
        );
        assert_eq!(
            guard.check(ip("::ffff:192.0.2.1"), 25, nowhere),
            Err(Unfit::Myself)
        );
        assert_eq!(
            guard.check(ip("192.0.2.1"), 26, nowhere),
            Ok(()),
            "another port"
        );
        assert_eq!(
            guard.check(ip("127.0.0.1"), 25, nowhere),
            Err(Unfit::Myself)
        );
        assert_eq!(guard.check(ip("::1"), 25, nowhere), Err(Unfit::Myself));
        assert_eq!(guard.check(ip("0.0.0.0"), 25, nowhere), Err(Unfit::Myself));
        assert_eq!(
            guard.check(ip("10.1.2.3"), 25, nowhere),
            Err(Unfit::Private)
        );
        assert_eq!(guard.check(ip("fd00::5"), 25, nowhere), Err(Unfit::Private));
        assert_eq!(guard.check(ip("198.51.100.7"), 25, nowhere), Ok(()));
        // Listening on every address: any of the host's own is the relay.
        let local = |a: std::net::IpAddr| a == ip("198.51.100.7");
        assert_eq!(
            guard.check(ip("198.51.100.7"), 2525, local),
            Err(Unfit::Myself)
        );
        assert_eq!(guard.check(ip("198.51.100.8"), 2525, local), Ok(()));
        // A connector may allow loopback and private networks, never itself.
        let lab = MxGuard {
            allowed: vec![cidr("127.0.0.0/8"), cidr("10.0.0.0/8")],
            ..guard
        };
        assert_eq!(lab.check(ip("127.0.0.7"), 25, nowhere), Ok(()));
        assert_eq!(lab.check(ip("10.1.2.3"), 25, nowhere), Ok(()));
        assert_eq!(
            lab.check(ip("127.0.0.1"), 2525, nowhere),
            Err(Unfit::Myself)
        );
    }

    fn mx(preference: u16, exchange: &str) -> Mx {
        Mx {
            preference,
            exchange: exchange.into(),
        }
    }

    #[test]
    fn hosts_go_by_preference_and_a_domain_without_mx_is_its_own() {
        let records = [
            mx(20, "b.example."),
            mx(10, "A.example."),
            mx(30, "a.example."),
        ];
        assert_eq!(
            mx_hosts("example", &records, |_| 0),
            MxHosts::Hosts(vec!["a.example".into(), "b.example".into()])
        );
        assert_eq!(
            mx_hosts("Example.", &[], |_| 0),
            MxHosts::Hosts(vec!["example".into()])
        );
    }

    #[test]
    fn equal_preferences_are_ordered_by_the_random_pick() {
        let records = [mx(10, "a."), mx(10, "b."), mx(10, "c."), mx(5, "first.")];
        let orders: std::collections::HashSet<Vec<String>> = (0..3)
            .map(|k| match mx_hosts("d", &records, |n| k % n) {
                MxHosts::Hosts(hosts) => hosts,
                MxHosts::NullMx => unreachable!(),
            })
            .collect();
        assert!(orders.len() > 1, "the pick changes the order: {orders:?}");
        for order in orders {
            assert_eq!(order[0], "first");
            assert_eq!(order.len(), 4);
        }
    }

    #[test]
    fn a_null_mx_refuses_the_domain() {
        assert_eq!(mx_hosts("d", &[mx(0, ".")], |_| 0), MxHosts::NullMx);
        assert_eq!(
            mx_hosts("d", &[mx(0, "."), mx(10, "mx.d.")], |_| 0),
            MxHosts::Hosts(vec!["mx.d".into()]),
            "a null MX beside real ones is only ignored"
        );
    }
}
