//! `tunnelmesh`: the one binary — peer daemon and CLI.
//!
//! Module map (one concern each): `identity` (SSH key → Noise key), `wire` (message layouts),
//! `noise` (handshake, cookies), `session` (keys, replay window, timers), `routing` (cryptokey
//! routing), `device` (shared interface state and the handshake thread), `dataplane` (worker
//! threads), `sys` (the only `unsafe`: syscalls and ioctls), `fastpath` (eBPF), `netconf`
//! (addresses and routes), `config`, `status`, `daemon` (`up`), `cli`.

use clap::Parser;

mod cli;
mod config;
mod control;
mod coordinator;
mod daemon;
mod dataplane;
mod device;
mod fastpath;
mod identity;
mod netconf;
mod noise;
mod routing;
mod session;
mod status;
mod sys;
mod wire;

#[cfg(test)]
mod interop;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = cli::run(cli::Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
