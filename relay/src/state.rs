//! The relay's state directory: where generated material lives between runs.

use std::path::PathBuf;

/// Chooses the state directory: the explicit one, else systemd's
/// `$STATE_DIRECTORY`, else `$XDG_STATE_HOME/tlsrelay`, else
/// `~/.local/state/tlsrelay`, else `/var/lib/tlsrelay`.
pub fn state_dir(explicit: Option<PathBuf>) -> PathBuf {
    let env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    explicit
        .or_else(|| {
            env("STATE_DIRECTORY").map(|dirs| {
                PathBuf::from(dirs.to_string_lossy().split(':').next().unwrap_or_default())
            })
        })
        .or_else(|| env("XDG_STATE_HOME").map(|d| d.join("tlsrelay")))
        .or_else(|| env("HOME").map(|h| h.join(".local/state/tlsrelay")))
        .unwrap_or_else(|| PathBuf::from("/var/lib/tlsrelay"))
}
