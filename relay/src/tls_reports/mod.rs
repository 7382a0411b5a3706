//! TLS-RPT (RFC 8460) on disk: each delivery attempt's result added to
//! its policy domain's aggregate for the UTC day, kept in
//! `<state_dir>/tlsrpt/<day>/<domain>.json` (written through, so a crash
//! or restart loses nothing). [`sender`] sends the finished days.

pub mod sender;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::unix_now;
use tlsrelay_core::smtp::address::is_hostname;
use tlsrelay_core::tlsrpt::{utc_day, DayResults, PolicyDescriptor, SessionResult};

/// Today's results, as sessions add to them. One per state directory in
/// the process: a reload's new plan shares the store its draining sessions
/// still write to, so no increment is lost between two copies of a file.
pub struct TlsReports {
    dir: Option<PathBuf>,
    /// Today's aggregates by domain, also on disk; earlier days are on disk
    /// only.
    days: Mutex<HashMap<(String, String), DayResults>>,
}

/// Domains held in memory at once; past it they are dropped and read back
/// from disk as sessions come (a bound on what a day's deliveries hold).
const MAX_DOMAINS_IN_MEMORY: usize = 10_000;

/// A file name holds 255 octets: a domain longer than this is named by a
/// prefix and a digest, and kept inside the file.
const MAX_NAME_IN_FILE_NAME: usize = 200;

impl TlsReports {
    /// Results kept in `dir` (none: in memory only, as for `check`): the
    /// store the process already has for `dir`, else a new one.
    pub fn shared(dir: Option<PathBuf>) -> Arc<TlsReports> {
        type Stores = Mutex<HashMap<PathBuf, std::sync::Weak<TlsReports>>>;
        static STORES: std::sync::OnceLock<Stores> = std::sync::OnceLock::new();
        let new = |dir| {
            Arc::new(TlsReports {
                dir,
                days: Mutex::new(HashMap::new()),
            })
        };
        let Some(path) = dir else {
            return new(None);
        };
        let mut stores = STORES.get_or_init(Default::default).lock().unwrap();
        stores.retain(|_, store| store.strong_count() > 0);
        if let Some(store) = stores.get(&path).and_then(|s| s.upgrade()) {
            return store;
        }
        let store = new(Some(path.clone()));
        stores.insert(path, Arc::downgrade(&store));
        store
    }

    /// Adds one session's result to today's report for `domain`.
    pub fn record(&self, domain: &str, policy: &PolicyDescriptor, result: SessionResult) {
        let day = utc_day(unix_now());
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if !is_hostname(&domain) {
            return; // it names a file: nothing but a host name may
        }
        let mut days = self.days.lock().unwrap();
        // A new day: the ones before it are on disk, to be sent.
        if days.keys().next().is_some_and(|(d, _)| *d != day) {
            days.retain(|(d, _), _| *d == day);
        }
        if days.len() >= MAX_DOMAINS_IN_MEMORY {
            days.clear();
        }
        let key = (day.clone(), domain.clone());
        let results = days.entry(key).or_insert_with(|| {
            self.dir
                .as_ref()
                .and_then(|dir| load(&dir.join(&day).join(file_name(&domain))))
                .unwrap_or_default()
        });
        results.record(policy, result);
        if let Some(dir) = &self.dir {
            let written = crate::state::blocking(|| store(&dir.join(&day), &domain, results));
            if let Err(e) = written {
                tracing::warn!("TLS report for {domain} not kept in {}: {e}", dir.display());
            }
        }
    }
}

/// `<domain>.json`, or for a long domain `<prefix>~<digest>.json`.
fn file_name(domain: &str) -> String {
    if domain.len() <= MAX_NAME_IN_FILE_NAME {
        return format!("{domain}.json");
    }
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, domain.as_bytes());
    let hex: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{}~{hex}.json", &domain[..MAX_NAME_IN_FILE_NAME])
}

fn load(path: &Path) -> Option<DayResults> {
    serde_json::from_slice(&crate::state::read_file(path).ok()?).ok()
}

fn store(dir: &Path, domain: &str, results: &DayResults) -> std::io::Result<()> {
    crate::state::create_dir(dir)?;
    let name = file_name(domain);
    let json = if name == format!("{domain}.json") {
        serde_json::to_vec_pretty(results)?
    } else {
        let mut named = results.clone();
        named.domain = Some(domain.to_string());
        serde_json::to_vec_pretty(&named)?
    };
    crate::state::replace_file(&dir.join(name), &json)
}

/// One day's results for one domain, waiting to be sent.
pub struct Pending {
    pub day: String,
    pub domain: String,
    pub results: DayResults,
    path: PathBuf,
}

/// Every report kept in `dir` (`<state_dir>/tlsrpt`), oldest first.
pub fn pending(dir: &Path) -> Vec<Pending> {
    let mut all = Vec::new();
    let Ok(days) = std::fs::read_dir(dir) else {
        return all;
    };
    for day in days.flatten() {
        let day_name = day.file_name().to_string_lossy().into_owned();
        let Ok(files) = std::fs::read_dir(day.path()) else {
            continue;
        };
        for file in files.flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            if let Some(mut results) = load(&file.path()) {
                let domain = results.domain.take().unwrap_or_else(|| stem.to_string());
                all.push(Pending {
                    day: day_name.clone(),
                    domain,
                    results,
                    path: file.path(),
                });
            }
        }
    }
    all.sort_by(|a, b| (&a.day, &a.domain).cmp(&(&b.day, &b.domain)));
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn success(store: &TlsReports, domain: &str) {
        store.record(
            domain,
            &PolicyDescriptor::none(domain),
            SessionResult::Success,
        );
    }

    #[test]
    fn one_store_per_directory_while_a_plan_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = TlsReports::shared(Some(dir.path().to_path_buf()));
        let second = TlsReports::shared(Some(dir.path().to_path_buf()));
        assert!(Arc::ptr_eq(&first, &second));
        let other = tempfile::tempdir().unwrap();
        assert!(!Arc::ptr_eq(
            &first,
            &TlsReports::shared(Some(other.path().to_path_buf()))
        ));
        // Increments from both plans land in one aggregate.
        success(&first, "a.example");
        success(&second, "a.example");
        let pending = pending(dir.path());
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].results.policies[0].summary.successful, 2);
    }

    #[test]
    fn a_domain_too_long_for_a_file_name_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = TlsReports::shared(Some(dir.path().to_path_buf()));
        // 253 octets: labels of 62, 62, 62 and 60, and "com".
        let label = "a".repeat(62);
        let domain = format!("{label}.{label}.{label}.{}.com", "a".repeat(60));
        assert_eq!(domain.len(), 253);
        success(&store, &domain);
        let pending = pending(dir.path());
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].domain, domain);
        assert!(pending[0].results.domain.is_none());
    }

    #[test]
    fn memory_holds_a_bounded_number_of_domains() {
        let store = TlsReports::shared(None);
        for i in 0..=MAX_DOMAINS_IN_MEMORY {
            success(&store, &format!("d{i}.example"));
        }
        assert!(store.days.lock().unwrap().len() <= MAX_DOMAINS_IN_MEMORY);
    }
}
