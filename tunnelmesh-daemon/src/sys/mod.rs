//! Thin, safe wrappers over the Linux syscalls and ioctls the data plane needs.
//!
//! This is the only place with `unsafe` in the daemon. Every block carries a `// SAFETY:` line;
//! everything above this module is safe Rust.

#![allow(unsafe_code)]

pub mod bpffs;
pub mod clock;
pub mod mmsg;
#[cfg(test)]
pub mod netns;
pub mod poll;
pub mod rlimit;
pub mod tun;
