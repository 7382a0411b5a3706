//! The program is the `tlsrelay-ebpf` binary (built for
//! `bpfel-unknown-none`); this library target only exists so the relay can
//! depend on the package from its build script.
#![no_std]
