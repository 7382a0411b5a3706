//! Giving up privileges once they are no longer needed: after the
//! listeners are bound and the eBPF program attached, the relay runs as an
//! unprivileged user with at most the capabilities it still uses, and can
//! never regain the others (`no_new_privs`, a trimmed bounding set).
//!
//! Linux keeps credentials per thread. `setuid(2)` through glibc changes
//! every thread of the process (it signals each to make the call), and a
//! change away from uid 0 clears each thread's capabilities; only the
//! calling thread, with `PR_SET_KEEPCAPS`, keeps its permitted set, from
//! which it raises the kept ones. So this runs on the main thread before
//! the runtime's threads exist: they inherit exactly what it kept.

use std::collections::HashSet;
use std::ffi::CString;
use std::io;

use caps::CapSet;
pub use caps::Capability;

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("no user named '{0}' on this system")]
    NoSuchUser(String),
    #[error("running as user '{user}' needs the relay started as root (it runs as uid {uid})")]
    NotRoot { user: String, uid: u32 },
    #[error("{what}: {source}")]
    Call {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("capabilities: {0}")]
    Capabilities(String),
}

fn call(what: &'static str, rc: libc::c_int) -> Result<(), PrivilegeError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(PrivilegeError::Call {
            what,
            source: io::Error::last_os_error(),
        })
    }
}

fn caps_err(e: caps::errors::CapsError) -> PrivilegeError {
    PrivilegeError::Capabilities(e.to_string())
}

/// A user to run as, with its primary group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// Looks `name` up in the system's user database.
pub fn lookup_user(name: &str) -> Result<Account, PrivilegeError> {
    let c_name = CString::new(name).map_err(|_| PrivilegeError::NoSuchUser(name.into()))?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid value for getpwnam_r to fill.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is to live memory of the size given; the
    // strings getpwnam_r stores point into `buf`, which outlives their use
    // (only the numeric ids are read).
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(PrivilegeError::Call {
            what: "looking up the user",
            source: io::Error::from_raw_os_error(rc),
        });
    }
    if found.is_null() {
        return Err(PrivilegeError::NoSuchUser(name.into()));
    }
    Ok(Account {
        name: name.into(),
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

/// The effective user id.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// What the process runs with after [`drop_privileges`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dropped {
    pub uid: u32,
    pub gid: u32,
    /// The capabilities kept (effective and permitted), e.g.
    /// `CAP_SYS_RESOURCE`.
    pub kept: Vec<String>,
}

/// Becomes `account` (when given; that needs root) and keeps, of the
/// capabilities the process has, only those in `keep`; sets
/// `no_new_privs`, so no exec can hand any back. Call it while the
/// process has one thread besides ones that only write logs.
pub fn drop_privileges(
    account: Option<&Account>,
    keep: &[Capability],
) -> Result<Dropped, PrivilegeError> {
    let permitted = caps::read(None, CapSet::Permitted).map_err(caps_err)?;
    let kept: HashSet<Capability> = keep
        .iter()
        .copied()
        .filter(|c| permitted.contains(c))
        .collect();
    // The bounding set first: trimming it needs CAP_SETPCAP, which the
    // switch of user takes away. Best effort (without CAP_SETPCAP the
    // permitted set below is what counts).
    if permitted.contains(&Capability::CAP_SETPCAP) {
        for cap in caps::all() {
            if !kept.contains(&cap) {
                let _ = caps::drop(None, CapSet::Bounding, cap);
            }
        }
    }
    if let Some(account) = account {
        switch_user(account, !kept.is_empty())?;
    }
    caps::clear(None, CapSet::Ambient).map_err(caps_err)?;
    caps::set(None, CapSet::Inheritable, &HashSet::new()).map_err(caps_err)?;
    caps::set(None, CapSet::Effective, &kept).map_err(caps_err)?;
    caps::set(None, CapSet::Permitted, &kept).map_err(caps_err)?;
    // SAFETY: prctl with integer arguments only.
    call("setting no_new_privs", unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    })?;
    let mut names: Vec<String> = kept.iter().map(ToString::to_string).collect();
    names.sort();
    // SAFETY: getuid and getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    Ok(Dropped {
        uid,
        gid,
        kept: names,
    })
}

/// setgroups, setgid, setuid to `account`, keeping the permitted
/// capabilities across the change when `keep_caps`.
fn switch_user(account: &Account, keep_caps: bool) -> Result<(), PrivilegeError> {
    let euid = effective_uid();
    if euid == account.uid {
        return Ok(());
    }
    if euid != 0 {
        return Err(PrivilegeError::NotRoot {
            user: account.name.clone(),
            uid: euid,
        });
    }
    if keep_caps {
        // SAFETY: prctl with integer arguments only.
        call("keeping capabilities across setuid", unsafe {
            libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0)
        })?;
    }
    let groups = [account.gid];
    // SAFETY: a one-element array of gid_t, its length given.
    call("setgroups", unsafe { libc::setgroups(1, groups.as_ptr()) })?;
    // SAFETY: set*id take plain integers; glibc applies them to every
    // thread of the process.
    call("setgid", unsafe { libc::setgid(account.gid) })?;
    // SAFETY: as above.
    call("setuid", unsafe { libc::setuid(account.uid) })?;
    if keep_caps {
        // SAFETY: prctl with integer arguments only.
        call("clearing keep-capabilities", unsafe {
            libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0)
        })?;
    }
    Ok(())
}
