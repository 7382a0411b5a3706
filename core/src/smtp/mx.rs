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

#[cfg(test)]
mod tests {
    use super::*;

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
