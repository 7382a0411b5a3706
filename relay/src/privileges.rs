//! What the relay runs as once it is serving: the configured `user` (when
//! started as root), and of its capabilities only CAP_SYS_RESOURCE, which
//! lets the splice pipes keep their size past `fs.pipe-user-pages-soft`.
//! The state directory becomes the user's, since the relay writes it. An
//! instance cgroup it made (`ebpf.cgroup = "child"`) can then no longer be
//! removed at exit; the next start sweeps it.

use std::path::Path;

use tlsrelay_sys::privileges::{
    drop_privileges, effective_uid, lookup_user, Capability, PrivilegeError,
};

#[derive(Debug, thiserror::Error)]
pub enum GiveUpError {
    #[error("user = \"{user}\": {source}")]
    User {
        user: String,
        #[source]
        source: PrivilegeError,
    },
    #[error("handing the state directory {dir} to user {user}: {source}")]
    StateDir {
        dir: String,
        user: String,
        #[source]
        source: std::io::Error,
    },
    #[error("giving up privileges: {0}")]
    Drop(#[source] PrivilegeError),
}

/// The capabilities kept, and why.
const KEPT: [(Capability, &str); 1] = [(
    Capability::CAP_SYS_RESOURCE,
    "splice pipes past fs.pipe-user-pages-soft",
)];

/// Becomes `user` (if set) and drops every capability but [`KEPT`]; the
/// banner's line saying what the relay now runs as.
pub fn give_up(user: Option<&str>, state_dir: &Path) -> Result<String, GiveUpError> {
    let account = match user {
        Some(name) => {
            let account = lookup_user(name).map_err(|source| GiveUpError::User {
                user: name.to_string(),
                source,
            })?;
            if effective_uid() == 0 {
                hand_over(state_dir, account.uid, account.gid).map_err(|source| {
                    GiveUpError::StateDir {
                        dir: state_dir.display().to_string(),
                        user: name.to_string(),
                        source,
                    }
                })?;
            }
            Some(account)
        }
        None => None,
    };
    if account.is_none() && effective_uid() == 0 {
        // Root without a user to become: capabilities alone would not
        // make it unprivileged (it still owns every root file), and it
        // needs them to remove its instance cgroup at exit.
        return Ok(
            "privileges: running as root with all its capabilities: set user = \"...\" to run unprivileged once bound"
                .to_string(),
        );
    }
    let keep: Vec<Capability> = KEPT.iter().map(|(c, _)| *c).collect();
    let dropped = drop_privileges(account.as_ref(), &keep).map_err(|e| match (&account, e) {
        (Some(a), e @ PrivilegeError::NotRoot { .. }) => GiveUpError::User {
            user: a.name.clone(),
            source: e,
        },
        (_, e) => GiveUpError::Drop(e),
    })?;
    let who = match &account {
        Some(a) => format!("user {} (uid {}, gid {})", a.name, dropped.uid, dropped.gid),
        None => format!("uid {}", dropped.uid),
    };
    let kept: Vec<String> = KEPT
        .iter()
        .filter(|(c, _)| dropped.kept.contains(&c.to_string()))
        .map(|(c, why)| format!("{c} ({why})"))
        .collect();
    Ok(format!(
        "privileges: running as {who}; capabilities kept: {}",
        if kept.is_empty() {
            "none".to_string()
        } else {
            kept.join(", ")
        }
    ))
}

/// Makes the state directory (0700, created if missing) and everything in
/// it belong to `uid`:`gid`, not following symlinks.
fn hand_over(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    crate::state::create_dir(dir)?;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    Ok(())
}

/// What `check` says about the files the relay trusts: private keys that
/// others can read, a state directory others can write, a user that does
/// not exist here.
pub fn warnings(config: &tlsrelay_core::config::Config) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let src = &config.source;
    let mut out = Vec::new();
    let keys = config
        .listeners
        .iter()
        .flat_map(|l| &l.tls.certificates)
        .chain(
            config
                .upstreams
                .iter()
                .filter_map(|u| u.tls.client_certificate.as_ref()),
        )
        .chain(
            config
                .outbound_connectors
                .iter()
                .filter_map(|c| c.tls.client_certificate.as_ref()),
        )
        .map(|files| src.resolve(files.key.get_ref()));
    for key in keys {
        if let Ok(meta) = std::fs::metadata(&key) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                out.push(format!(
                    "private key {} is readable by {} (mode {mode:04o}): chmod 600 and make it the relay user's",
                    key.display(),
                    if mode & 0o007 != 0 { "anyone" } else { "its group" }
                ));
            }
        }
    }
    let state = crate::state::state_dir(config.state_dir.clone());
    if let Ok(meta) = std::fs::symlink_metadata(&state) {
        let mode = meta.permissions().mode() & 0o777;
        if meta.file_type().is_symlink() || mode & 0o022 != 0 {
            out.push(format!(
                "state directory {} can be written by others (mode {mode:04o}{}): it holds the generated private key",
                state.display(),
                if meta.file_type().is_symlink() { ", a symlink" } else { "" }
            ));
        }
    }
    match &config.user {
        Some(user) => {
            if let Err(e) = lookup_user(user.get_ref()) {
                out.push(format!("user = \"{}\": {e} (run refuses to start)", user.get_ref()));
            }
        }
        None if effective_uid() == 0 => out.push(
            "no user = \"...\": started as root, the relay keeps root and its capabilities while it serves".into(),
        ),
        None => {}
    }
    out
}
