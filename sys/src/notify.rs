//! sd_notify(3) without libsystemd: readiness, reloads and shutdown told to
//! systemd over the datagram socket it names in `NOTIFY_SOCKET` (a path, or
//! an abstract name written with a leading '@'). Without it, nothing.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. "READY=1") to systemd, if it listens.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str());
        match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr)
            }
            None => socket.send_to(state.as_bytes(), &target),
        }
    });
    if let Err(e) = sent {
        tracing::warn!("sd_notify {state:?}: {e}");
    }
}

/// "RELOADING=1" with the CLOCK_MONOTONIC timestamp systemd wants with it.
pub fn reloading() {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000;
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}
