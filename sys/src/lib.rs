//! tlsrelay's contact with the kernel, where the unsafe code lives: kernel
//! TLS (probe, key install, control records), the splice syscalls and the
//! io_uring pump's workers, the
//! eBPF wire counters (load, attach, pin, read; socket cookies),
//! sd_notify, and giving up root and capabilities. Every unsafe block says why it is sound.

pub mod bpf;
pub mod ktls;
pub mod notify;
pub mod privileges;
pub mod read_buf;
pub mod splice;
pub mod uring;
