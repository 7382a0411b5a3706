//! eBPF wire counters for tlsrelay.
//!
//! This crate will hold the `cgroup_skb` program (built for
//! `bpfel-unknown-none`) and the `#[repr(C)]` records it shares with the
//! relay's userspace loader. Until the program lands it holds nothing, so it
//! builds on the host as part of the workspace.
#![no_std]
