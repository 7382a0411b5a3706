//! MTA-STS policies (RFC 8461) as delivery needs them: the `_mta-sts` TXT
//! id looked up, the policy fetched over HTTPS from `mta-sts.<domain>`
//! (certificate verified, no redirects, 64 KiB at most), cached per
//! `max_age` in memory and in the state directory (it survives restarts),
//! and fetched again when the id changes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::RootCertStore;

use crate::dns::DnsResolver;
use crate::http_client::{self, HttpError};
use tlsrelay_core::mta_sts::{parse_policy, txt_policy_id, Policy};

/// A policy file larger than this is refused (RFC 8461 3.3 suggests 64 KiB).
const MAX_POLICY_BYTES: usize = 64 * 1024;

/// Policies held in memory at once (one per recipient domain seen).
const MAX_POLICIES_IN_MEMORY: usize = 10_000;

/// What MTA-STS says about a domain's delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StsLookup {
    /// The domain publishes no policy.
    None,
    Policy(Policy),
    /// A policy is announced but could not be had: delivery goes on as
    /// without one; the RFC 8460 result type says why.
    Failed {
        reason: String,
        result: &'static str,
    },
}

/// Policies, fetched and cached; shared by the sessions of a plan.
pub struct StsPolicies {
    resolver: DnsResolver,
    /// Anchors for the policy host's certificate (the connector's).
    roots: Arc<RootCertStore>,
    /// Where policies are kept across restarts (none for `check`).
    cache_dir: Option<PathBuf>,
    memory: Mutex<HashMap<String, Cached>>,
    limit: Duration,
}

#[derive(Clone)]
struct Cached {
    id: String,
    fetched: i64,
    policy: Policy,
    text: String,
}

impl Cached {
    fn fresh(&self, now: i64) -> bool {
        now < self.fetched.saturating_add(self.policy.max_age as i64)
    }
}

impl StsPolicies {
    pub fn new(
        resolver: DnsResolver,
        roots: Arc<RootCertStore>,
        cache_dir: Option<PathBuf>,
        limit: Duration,
    ) -> StsPolicies {
        StsPolicies {
            resolver,
            roots,
            cache_dir,
            memory: Mutex::new(HashMap::new()),
            limit,
        }
    }

    /// The policy for `domain` (RFC 8461 5.1): a fresh cached one while
    /// the TXT id is unchanged, unavailable or withdrawn; else fetched.
    pub async fn lookup(&self, domain: &str) -> StsLookup {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if !tlsrelay_core::smtp::address::is_hostname(&domain) {
            return StsLookup::None; // it would name a cache file
        }
        let cached = self.cached(&domain).filter(|c| c.fresh(crate::unix_now()));
        let id = match self.resolver.txt(&format!("_mta-sts.{domain}")).await {
            Ok(answer) => txt_policy_id(&answer.records),
            Err(_) => None,
        };
        match (id, cached) {
            (None, Some(cached)) => StsLookup::Policy(cached.policy),
            (None, None) => StsLookup::None,
            (Some(id), Some(cached)) if cached.id == id => StsLookup::Policy(cached.policy),
            (Some(id), cached) => match self.fetch(&domain).await {
                Ok((text, policy)) => {
                    self.store(
                        &domain,
                        Cached {
                            id,
                            fetched: crate::unix_now(),
                            policy: policy.clone(),
                            text,
                        },
                    );
                    StsLookup::Policy(policy)
                }
                // A policy still fresh stands until it can be replaced.
                Err(_) if cached.is_some() => {
                    StsLookup::Policy(cached.map(|c| c.policy).expect("checked"))
                }
                Err(failed) => failed,
            },
        }
    }

    fn cached(&self, domain: &str) -> Option<Cached> {
        if let Some(c) = self.memory.lock().unwrap().get(domain) {
            return Some(c.clone());
        }
        let bytes = crate::state::read_file(&self.cache_dir.as_ref()?.join(domain)).ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let mut lines = text.splitn(3, '\n');
        let id = lines.next()?.strip_prefix("id ")?.to_string();
        let fetched = lines.next()?.strip_prefix("fetched ")?.parse().ok()?;
        let text = lines.next()?.to_string();
        let cached = Cached {
            id,
            fetched,
            policy: parse_policy(&text).ok()?,
            text,
        };
        self.remember(domain, cached.clone());
        Some(cached)
    }

    /// Keeps `cached` in memory, which holds at most
    /// [`MAX_POLICIES_IN_MEMORY`]: past it, expired policies go, then all
    /// (the state directory still has them).
    fn remember(&self, domain: &str, cached: Cached) {
        let mut memory = self.memory.lock().unwrap();
        if memory.len() >= MAX_POLICIES_IN_MEMORY {
            let now = crate::unix_now();
            memory.retain(|_, c| c.fresh(now));
            if memory.len() >= MAX_POLICIES_IN_MEMORY {
                memory.clear();
            }
        }
        memory.insert(domain.to_string(), cached);
    }

    fn store(&self, domain: &str, cached: Cached) {
        if let Some(dir) = &self.cache_dir {
            let file = format!(
                "id {}\nfetched {}\n{}",
                cached.id, cached.fetched, cached.text
            );
            let written = crate::state::blocking(|| {
                crate::state::create_dir(dir)
                    .and_then(|()| crate::state::replace_file(&dir.join(domain), file.as_bytes()))
            });
            if let Err(e) = written {
                tracing::warn!(
                    "MTA-STS policy of {domain} not cached in {}: {e}",
                    dir.display()
                );
            }
        }
        self.remember(domain, cached);
    }

    /// GET https://mta-sts.<domain>/.well-known/mta-sts.txt.
    async fn fetch(&self, domain: &str) -> Result<(String, Policy), StsLookup> {
        let host = format!("mta-sts.{domain}");
        let failed = |result: &'static str, reason: String| StsLookup::Failed {
            reason: format!("MTA-STS policy of {domain}: {reason}"),
            result,
        };
        let body = match self.get(&host).await {
            Ok(body) => body,
            Err(HttpError::Certificate(why)) => return Err(failed("sts-webpki-invalid", why)),
            Err(HttpError::Other(why)) => return Err(failed("sts-policy-fetch-error", why)),
        };
        let text = String::from_utf8(body)
            .map_err(|_| failed("sts-policy-invalid", "not UTF-8".into()))?;
        let policy =
            parse_policy(&text).map_err(|e| failed("sts-policy-invalid", e.to_string()))?;
        Ok((text, policy))
    }

    async fn get(&self, host: &str) -> Result<Vec<u8>, HttpError> {
        let request = http_client::Request {
            host,
            port: 443,
            path: "/.well-known/mta-sts.txt",
            method: "GET",
            headers: &[],
            body: &[],
        };
        let response = http_client::request(
            http_client::Names::Relay(&self.resolver),
            http_client::Transport::Tls(&self.roots),
            &request,
            MAX_POLICY_BYTES,
            self.limit,
        )
        .await?;
        // RFC 8461 3.3: 200 only (no redirects), text/plain.
        if response.status != 200 {
            return Err(HttpError::Other(format!("HTTP status {}", response.status)));
        }
        if !response
            .content_type
            .as_deref()
            .is_some_and(|t| t.starts_with("text/plain"))
        {
            return Err(HttpError::Other(format!(
                "Content-Type {:?}, not text/plain",
                response.content_type.unwrap_or_default()
            )));
        }
        Ok(response.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tlsrelay_core::mta_sts::Mode;

    #[test]
    fn memory_holds_a_bounded_number_of_policies_keeping_fresh_ones_first() {
        let resolver = DnsResolver::new(&["127.0.0.1:9".parse().unwrap()], None).unwrap();
        let policies = StsPolicies::new(
            resolver,
            Arc::new(RootCertStore::empty()),
            None,
            Duration::from_secs(1),
        );
        let now = crate::unix_now();
        let cached = |fetched: i64| Cached {
            id: "1".into(),
            fetched,
            policy: Policy {
                mode: Mode::Enforce,
                mx: vec!["mx.example".into()],
                max_age: 86_400,
            },
            text: String::new(),
        };
        // Half of them expired a day ago.
        for i in 0..MAX_POLICIES_IN_MEMORY {
            let fetched = if i % 2 == 0 { now } else { now - 2 * 86_400 };
            policies.remember(&format!("d{i}.example"), cached(fetched));
        }
        policies.remember("new.example", cached(now));
        let memory = policies.memory.lock().unwrap();
        assert_eq!(memory.len(), MAX_POLICIES_IN_MEMORY / 2 + 1);
        assert!(memory.values().all(|c| c.fresh(now)));
    }
}
