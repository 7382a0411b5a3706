//! DNS for delivery by MX: MX, address and TLSA lookups through a
//! validating stub resolver (hickory), each answer with whether DNSSEC
//! proved it. Name servers and trust anchors come from the config (tests
//! serve their own signed zones); by default /etc/resolv.conf and the
//! IANA root keys.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::client::Client;
use hickory_resolver::net::dnssec::DnssecDnsHandle;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::udp::UdpClientStream;
use hickory_resolver::net::xfer::FirstAnswer;
use hickory_resolver::net::{DnsError, DnsHandle, NetError};
use hickory_resolver::proto::dnssec::rdata::DNSSECRData;
use hickory_resolver::proto::dnssec::{Proof, TrustAnchors};
use hickory_resolver::proto::op::{DnsRequestOptions, Message, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::{Resolver, ResolverBuilder, TokioResolver};

use tlsrelay_core::dane::{Answer, DnsFailure, Tlsa};
use tlsrelay_core::smtp::mx::Mx;

/// The relay's resolver (cheap to clone: the cache is shared).
#[derive(Clone)]
pub struct DnsResolver {
    inner: Arc<TokioResolver>,
    anchors: Arc<TrustAnchors>,
    /// The name server asked again about a bogus answer that may be a
    /// wildcard expansion.
    wildcard_server: Option<SocketAddr>,
}

/// A resolver's builder asking `nameservers` (`ip:port`), or those of
/// /etc/resolv.conf when there are none.
pub fn resolver_builder(
    nameservers: &[SocketAddr],
) -> Result<ResolverBuilder<TokioRuntimeProvider>, NetError> {
    let provider = TokioRuntimeProvider::default();
    if nameservers.is_empty() {
        return Resolver::builder(provider);
    }
    let servers = nameservers
        .iter()
        .map(|address| {
            let mut server = NameServerConfig::udp_and_tcp(address.ip());
            for connection in &mut server.connections {
                connection.port = address.port();
            }
            server
        })
        .collect();
    Ok(Resolver::builder_with_config(
        ResolverConfig::from_name_servers(servers),
        provider,
    ))
}

impl DnsResolver {
    /// A validating resolver asking `nameservers` (none: the system's)
    /// and trusting the DNSKEYs in `trust_anchors` (none: the root's).
    pub fn new(nameservers: &[SocketAddr], trust_anchors: Option<&Path>) -> Result<Self, String> {
        let anchors = match trust_anchors {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .parse::<TrustAnchors>()
                .map_err(|e| format!("{}: not DNSKEY records: {e}", path.display()))?,
            None => TrustAnchors::default(),
        };
        let builder =
            resolver_builder(nameservers).map_err(|e| format!("reading /etc/resolv.conf: {e}"))?;
        let anchors_again = anchors.clone();
        let inner = builder
            .with_trust_anchor(Arc::new(anchors))
            .build()
            .map_err(|e| e.to_string())?;
        let wildcard_server = match nameservers.first() {
            Some(server) => Some(*server),
            None => hickory_resolver::system_conf::read_system_conf()
                .ok()
                .and_then(|(config, _)| {
                    let server = config.name_servers().first()?;
                    let port = server.connections.first().map_or(53, |c| c.port);
                    Some(SocketAddr::new(server.ip, port))
                }),
        };
        Ok(DnsResolver {
            inner: Arc::new(inner),
            anchors: Arc::new(anchors_again),
            wildcard_server,
        })
    }

    /// Asks `kind` at `name` again, through a bare validating handle that
    /// returns the whole validated response the caching resolver drops
    /// when it is bogus; its answer stands only as a wildcard expansion
    /// RFC 4035 5.3.4 proves ([`wildcard_expansion_proven`]).
    async fn proven_wildcard_answer<T>(
        &self,
        name: &str,
        kind: RecordType,
        pick: &impl Fn(&RData) -> Option<T>,
    ) -> Option<Answer<T>> {
        let query_name = Name::from_ascii(name).ok()?;
        let stream =
            UdpClientStream::builder(self.wildcard_server?, TokioRuntimeProvider::default())
                .build();
        let (client, background) = Client::<TokioRuntimeProvider>::from_sender(stream);
        let background = tokio::spawn(background);
        let handle = DnssecDnsHandle::with_trust_anchor(client, self.anchors.clone());
        let mut options = DnsRequestOptions::default();
        options.use_edns = true;
        options.edns_set_dnssec_ok = true;
        let result = handle
            .lookup(Query::query(query_name.clone(), kind), options)
            .first_answer()
            .await;
        background.abort();
        match result {
            Err(NetError::Dns(DnsError::Nsec {
                proof: Proof::Bogus,
                response,
                ..
            })) if wildcard_expansion_proven(&query_name, kind, &response) => Some(Answer {
                records: response
                    .answers
                    .iter()
                    .filter(|r| r.record_type() == kind)
                    .filter_map(|r| pick(&r.data))
                    .collect(),
                secure: true,
            }),
            _ => None,
        }
    }

    /// The domain's MX records; `None` when the domain does not exist
    /// (NXDOMAIN), which mail treats as final, unlike an empty answer.
    pub async fn mx(&self, domain: &str) -> Result<Option<Answer<Mx>>, DnsFailure> {
        let (answer, no_such_name) = self
            .lookup_name(domain, RecordType::MX, |data| match data {
                RData::MX(mx) => Some(Mx {
                    preference: mx.preference,
                    exchange: mx.exchange.to_ascii(),
                }),
                _ => None,
            })
            .await?;
        Ok((!no_such_name).then_some(answer))
    }

    /// A and AAAA: secure only when both answers are.
    pub async fn addresses(&self, host: &str) -> Result<Answer<IpAddr>, DnsFailure> {
        let v4 = self.lookup(host, RecordType::A, |data| match data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        });
        let v6 = self.lookup(host, RecordType::AAAA, |data| match data {
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        });
        let (v4, v6) = tokio::join!(v4, v6);
        let (mut v4, v6) = (v4?, v6?);
        v4.records.extend(v6.records);
        v4.secure &= v6.secure;
        Ok(v4)
    }

    /// TXT records, each as one string (its segments joined).
    pub async fn txt(&self, name: &str) -> Result<Answer<String>, DnsFailure> {
        self.lookup(name, RecordType::TXT, |data| match data {
            RData::TXT(txt) => Some(
                txt.txt_data
                    .iter()
                    .map(|segment| String::from_utf8_lossy(segment))
                    .collect(),
            ),
            _ => None,
        })
        .await
    }

    /// The TLSA records for SMTP on `port` at `host` (`_25._tcp.host`).
    pub async fn tlsa(&self, host: &str, port: u16) -> Result<Answer<Tlsa>, DnsFailure> {
        self.lookup(
            &format!("_{port}._tcp.{host}"),
            RecordType::TLSA,
            |data| match data {
                RData::TLSA(t) => Some(Tlsa {
                    usage: t.cert_usage.into(),
                    selector: t.selector.into(),
                    matching: t.matching.into(),
                    data: t.cert_data.clone(),
                }),
                _ => None,
            },
        )
        .await
    }

    /// One lookup of an absolute name; no records is an empty answer,
    /// proven or not as the denial was.
    async fn lookup<T>(
        &self,
        name: &str,
        kind: RecordType,
        pick: impl Fn(&RData) -> Option<T>,
    ) -> Result<Answer<T>, DnsFailure> {
        Ok(self.lookup_name(name, kind, pick).await?.0)
    }

    /// [`Self::lookup`], and whether the name does not exist (NXDOMAIN).
    async fn lookup_name<T>(
        &self,
        name: &str,
        kind: RecordType,
        pick: impl Fn(&RData) -> Option<T>,
    ) -> Result<(Answer<T>, bool), DnsFailure> {
        let absolute = format!("{}.", name.trim_end_matches('.'));
        let what = || format!("{absolute} {kind}");
        match self.inner.lookup(absolute.as_str(), kind).await {
            Ok(lookup) => {
                let answers: Vec<_> = lookup
                    .answers()
                    .iter()
                    .filter(|r| r.record_type() == kind)
                    .collect();
                if answers.iter().any(|r| r.proof == Proof::Bogus) {
                    return Err(DnsFailure::Bogus(what()));
                }
                Ok((
                    Answer {
                        secure: answers.iter().all(|r| r.proof == Proof::Secure),
                        records: answers.iter().filter_map(|r| pick(&r.data)).collect(),
                    },
                    false,
                ))
            }
            // NXDOMAIN or NODATA; any other code (SERVFAIL, REFUSED) is
            // no answer at all.
            Err(NetError::Dns(DnsError::NoRecordsFound(none)))
                if matches!(
                    none.response_code,
                    ResponseCode::NXDomain | ResponseCode::NoError
                ) =>
            {
                Ok((
                    Answer {
                        records: Vec::new(),
                        secure: none.soa.is_some_and(|soa| soa.proof == Proof::Secure),
                    },
                    none.response_code == ResponseCode::NXDomain,
                ))
            }
            Err(NetError::Dns(DnsError::Nsec {
                proof, response, ..
            })) => match proof {
                Proof::Bogus | Proof::Indeterminate => Err(DnsFailure::Bogus(what())),
                proof => Ok((
                    Answer {
                        records: Vec::new(),
                        secure: proof == Proof::Secure,
                    },
                    response.response_code == ResponseCode::NXDomain,
                )),
            },
            // hickory 0.26 finds a wildcard expanded one label below its
            // owner bogus (it wants an NSEC covering the wildcard, which
            // one matches: hickory-dns/hickory-dns#3812); its cache keeps
            // only the verdict, so the response is asked for again.
            Err(NetError::Dns(DnsError::DnssecBogus)) => {
                match self.proven_wildcard_answer(&absolute, kind, &pick).await {
                    Some(answer) => Ok((answer, false)),
                    None => Err(DnsFailure::Bogus(what())),
                }
            }
            Err(e) => {
                tracing::debug!("{} failed: {e}", what());
                Err(DnsFailure::Temporary(what()))
            }
        }
    }
}

/// RFC 4035 5.3.4: `response` answers `query` by expanding a wildcard, and
/// proves it may. Its `kind` records at the query name and their RRSIG
/// were verified; the RRSIG's label count, below the query name's, names
/// the wildcard `*.<closest encloser>`; and a verified NSEC covers the
/// next closer name (the closest encloser and one more label of the query
/// name), so neither it nor the query name exists, nor any name between
/// them and the wildcard.
fn wildcard_expansion_proven(query: &Name, kind: RecordType, response: &Message) -> bool {
    let at_query = |r: &&Record| r.name == *query;
    let rrset: Vec<&Record> = response
        .answers
        .iter()
        .filter(at_query)
        .filter(|r| r.record_type() == kind)
        .collect();
    if rrset.is_empty() || rrset.iter().any(|r| r.proof != Proof::Secure) {
        return false;
    }
    let Some(labels) = response
        .answers
        .iter()
        .filter(at_query)
        .filter(|r| r.proof == Proof::Secure)
        .find_map(|r| match &r.data {
            RData::DNSSEC(DNSSECRData::RRSIG(rrsig)) if rrsig.input().type_covered == kind => {
                Some(rrsig.input().num_labels)
            }
            _ => None,
        })
    else {
        return false;
    };
    if labels >= query.num_labels() {
        return false; // not an expansion
    }
    let next_closer = query.trim_to(labels as usize + 1);
    response
        .authorities
        .iter()
        .filter(|r| r.proof == Proof::Secure)
        .any(|r| match &r.data {
            RData::DNSSEC(DNSSECRData::NSEC(nsec)) => {
                let (owner, next) = (&r.name, nsec.next_domain_name());
                // A parent-side NSEC at a zone cut denies nothing below it
                // (RFC 6840 4.1); a next name below the next closer one
                // makes it an empty non-terminal, which exists.
                let denies_below = !(nsec.is_ancestor_delegation() && owner.zone_of(&next_closer));
                let next_closer_is_empty_non_terminal = next_closer.zone_of(next);
                denies_below
                    && !next_closer_is_empty_non_terminal
                    && next_closer > *owner
                    && (next_closer < *next || (next <= owner && next.zone_of(&next_closer)))
            }
            _ => false,
        })
}
