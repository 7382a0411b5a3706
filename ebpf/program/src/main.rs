//! tlsrelay's wire counters: a `cgroup_skb` program on ingress and egress of
//! the relay's own cgroup, reading what actually crossed the wire on each of
//! the relay's sockets (TLS hellos and alerts, SMTP's STARTTLS dialogue) so
//! a policy bug in userspace shows up as a disagreement.
//!
//! Built for `bpfel-unknown-none` by the relay's build script (aya-build)
//! and by `cargo xtask build-ebpf`. On the host target this is an empty
//! binary, so the workspace builds everywhere.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod program;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
