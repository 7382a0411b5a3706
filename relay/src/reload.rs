//! Hot reload: on SIGHUP, and when the configuration or any certificate,
//! key or trust-anchor file it names changes, the configuration is loaded
//! and checked again (chains parse, keys match, certificates not expired).
//! A good one is switched in for new sessions; established sessions keep
//! what they started with. A bad one changes nothing and says why.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rustls::pki_types::UnixTime;

use crate::inspect::CertificateInfo;
use crate::listeners::PlanSwitch;
use crate::plan::{ConnectionLimits, Plan, SelfSignedSource};
use tlsrelay_core::config::{Config, ConfigError};

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{file}: {reason}")]
    Certificate { file: PathBuf, reason: String },
}

/// A file's identity for change detection: modification time and size.
type Stamp = Option<(SystemTime, u64)>;

pub struct Reloader {
    config: Option<PathBuf>,
    state_dir: PathBuf,
    /// The upstream pools: an unchanged one keeps its health and sessions.
    pools: crate::upstreams::Pools,
    switch: PlanSwitch,
    limits: ConnectionLimits,
    watched: Mutex<Vec<(PathBuf, Stamp)>>,
}

impl Reloader {
    /// `config` is the file the relay runs from (`None`: the embedded
    /// default, which only SIGHUP reloads).
    pub fn new(
        config: Option<PathBuf>,
        current: &Config,
        state_dir: PathBuf,
        switch: PlanSwitch,
        pools: crate::upstreams::Pools,
    ) -> Reloader {
        let watched = stamps(watched_files(current, config.as_deref()));
        Reloader {
            config,
            state_dir,
            pools,
            switch,
            limits: ConnectionLimits::of(current),
            watched: Mutex::new(watched),
        }
    }

    /// Loads, checks and switches in the configuration; returns what needs
    /// a restart to take effect.
    pub fn reload(&self) -> Result<Vec<String>, ReloadError> {
        let config = match &self.config {
            Some(path) => Config::load(path),
            None => Ok(Config::embedded_default()),
        };
        // Whatever happens, the files as they are now are the ones seen.
        if let Ok(c) = &config {
            *self.watched.lock().expect("not poisoned") =
                stamps(watched_files(c, self.config.as_deref()));
        }
        let config = config?;
        let self_signed = SelfSignedSource::StateDir(self.state_dir.clone());
        let plan = Plan::build_with(&config, self_signed, &self.pools)?;
        check_not_expired(&config)?;
        Ok(self.switch.apply(plan, self.limits))
    }

    /// Whether a watched file changed since it was last looked at.
    pub fn files_changed(&self) -> bool {
        let watched = self.watched.lock().expect("not poisoned");
        watched.iter().any(|(path, stamp)| stamp_of(path) != *stamp)
    }

    /// Reloads and logs the outcome.
    pub fn reload_and_log(&self, why: &str) -> bool {
        match self.reload() {
            Ok(left) => {
                tracing::info!(
                    "configuration reloaded ({why}): new sessions use it, established sessions keep theirs"
                );
                for note in left {
                    tracing::warn!("{note}");
                }
                true
            }
            Err(e) => {
                tracing::warn!(
                    "reload ({why}) failed, still serving the previous configuration: {e}"
                );
                false
            }
        }
    }

    /// Reloads on each SIGHUP `hup` hears (registered before readiness is
    /// announced, so an early reload cannot kill the process), and when a
    /// watched file changes (looked at every `poll`), telling systemd
    /// around each attempt.
    pub async fn run(&self, mut hup: tokio::signal::unix::Signal, poll: Duration) {
        loop {
            let why = tokio::select! {
                _ = hup.recv() => "SIGHUP",
                _ = tokio::time::sleep(poll) => {
                    if !self.files_changed() {
                        continue;
                    }
                    // Let a writer finish the file (or its sibling) first.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "a watched file changed"
                }
            };
            tlsrelay_sys::notify::reloading();
            self.reload_and_log(why);
            tlsrelay_sys::notify::notify("READY=1");
        }
    }
}

/// The configuration file and every certificate, key and trust-anchor file
/// it names.
pub fn watched_files(config: &Config, path: Option<&Path>) -> Vec<PathBuf> {
    let src = &config.source;
    let mut files: Vec<PathBuf> = path.map(Path::to_path_buf).into_iter().collect();
    // A rotated ticket key file takes effect without a restart.
    files.extend(
        config
            .listeners
            .iter()
            .filter_map(|l| l.tls.ticket_keys.as_ref())
            .map(|k| src.resolve(k.get_ref())),
    );
    let mut pair = |f: &tlsrelay_core::config::CertificateFiles| {
        files.push(src.resolve(f.chain.get_ref()));
        files.push(src.resolve(f.key.get_ref()));
        files.extend(f.ocsp_response.iter().map(|o| src.resolve(o.get_ref())));
    };
    for l in &config.listeners {
        l.tls.certificates.iter().for_each(&mut pair);
    }
    for u in &config.upstreams {
        u.tls.client_certificate.iter().for_each(&mut pair);
    }
    for c in &config.outbound_connectors {
        c.tls.client_certificate.iter().for_each(&mut pair);
    }
    let anchors = config
        .listeners
        .iter()
        .filter_map(|l| {
            l.tls
                .client_auth
                .as_ref()
                .map(|a| a.trust_anchors.get_ref())
        })
        .chain(
            config
                .upstreams
                .iter()
                .filter_map(|u| u.tls.trust_anchors.as_ref().map(|a| a.get_ref())),
        )
        .chain(
            config
                .outbound_connectors
                .iter()
                .filter_map(|c| c.tls.trust_anchors.as_ref().map(|a| a.get_ref())),
        )
        .chain(
            config
                .inbound_connectors
                .iter()
                .filter_map(|c| c.trust_anchors.as_ref().map(|a| a.get_ref())),
        )
        .map(|p| src.resolve(p))
        .collect::<Vec<_>>();
    files.extend(anchors);
    let crls = config
        .upstreams
        .iter()
        .flat_map(|u| &u.tls.crls)
        .chain(config.outbound_connectors.iter().flat_map(|c| &c.tls.crls))
        .map(|p| src.resolve(p.get_ref()));
    files.extend(crls.collect::<Vec<_>>());
    files.sort();
    files.dedup();
    files
}

fn stamp_of(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn stamps(files: Vec<PathBuf>) -> Vec<(PathBuf, Stamp)> {
    files
        .into_iter()
        .map(|f| {
            let stamp = stamp_of(&f);
            (f, stamp)
        })
        .collect()
}

/// A certificate must not be switched in expired.
fn check_not_expired(config: &Config) -> Result<(), ReloadError> {
    let now = UnixTime::now();
    for l in &config.listeners {
        for files in &l.tls.certificates {
            let file = config.source.resolve(files.chain.get_ref());
            let chain = crate::tls::load_chain(&file).map_err(|e| ReloadError::Certificate {
                file: file.clone(),
                reason: e.to_string(),
            })?;
            let info = CertificateInfo::of_chain(&chain).map_err(|e| ReloadError::Certificate {
                file: file.clone(),
                reason: e.to_string(),
            })?;
            if info.days_left(now) < 0 {
                return Err(ReloadError::Certificate {
                    file,
                    reason: format!("certificate expired on {}", info.not_after),
                });
            }
        }
    }
    Ok(())
}
