//! The relay's state directory: where generated material lives between runs.

use std::path::{Path, PathBuf};

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

/// Creates the state directory (and its parents) where missing, the
/// directory itself 0700: what the relay keeps there is its own.
pub fn create_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Writes `contents` to `path` as a new file (0600, the relay's own) and
/// renames it into place: a symlink planted at `path` is replaced, never
/// followed; and a crash leaves the old file or the new one, never a part.
pub fn replace_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}-{n}.tmp", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true) // O_EXCL: a symlink there is an error, not a target
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(contents)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    // The rename itself survives a crash once the directory is synced.
    std::fs::File::open(dir).and_then(|d| d.sync_all())
}

/// Runs file work that blocks (a write ending in an fsync): on a thread of
/// a multi-thread runtime, tokio first moves the thread's other tasks
/// elsewhere, so sessions do not wait behind the disk.
pub fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// Reads a state file, refusing a symlink where the file should be.
pub fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mut out = Vec::new();
    file.read_to_end(&mut out)?;
    Ok(out)
}
