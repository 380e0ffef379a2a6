//! The coordinator's settings: `/etc/tunnelmesh/coordinator.toml` (`--config`), with each
//! command-line flag over the file's value. The file's keys are the flags' names with `_` for
//! `-`; unknown keys are named, and errors give the line.
//!
//! ```toml
//! listen = "0.0.0.0:8443"
//! data_dir = "/var/lib/tunnelmesh-coordinator"
//! policy = "/etc/tunnelmesh/policy.toml"
//! authorized_keys = "/etc/tunnelmesh/authorized_keys"
//! stun_port = 3478
//! relay_limit_mbit = 200
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use ipnet::{Ipv4Net, Ipv6Net};
use serde::Deserialize;

use super::{DEFAULT_DATA_DIR, ServeOptions};

/// Default HTTPS address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8443";
/// Default relay allowance per peer, Mbit/s.
pub const DEFAULT_RELAY_LIMIT_MBIT: u64 = 200;

/// What the coordinator serves with; the flags and the file have the same fields.
#[derive(clap::Args, Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address to serve HTTPS on [default: 0.0.0.0:8443].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain (default: self-signed, generated on first start).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// OpenSSH authorized_keys of admitted peers (default: DATA_DIR/authorized_keys if present).
    #[arg(long)]
    pub authorized_keys: Option<PathBuf>,
    /// IPv4 mesh prefix, fixed at first start [default: 100.64.0.0/10].
    #[arg(long)]
    pub ipv4_prefix: Option<Ipv4Net>,
    /// IPv6 (ULA) mesh prefix, fixed at first start (default: a random fdXX:…::/64).
    #[arg(long)]
    pub ipv6_prefix: Option<Ipv6Net>,
    /// Policy file; reloaded when it changes or on SIGHUP. Without one nothing is allowed.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// What each peer may send through the relay, in Mbit/s (excess frames are dropped)
    /// [default: 200].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub relay_limit_mbit: Option<u64>,
    /// Append every relayed message, exactly as the coordinator sees it, to FILE (an audit:
    /// it is ciphertext).
    #[arg(long)]
    pub relay_dump: Option<PathBuf>,
    /// UDP port of the first STUN target; the second is the next port (0: no STUN)
    /// [default: 3478].
    #[arg(long)]
    pub stun_port: Option<u16>,
    /// Serve the coordinator's metrics (Prometheus text, plain HTTP) at http://ADDR/metrics;
    /// give it a private address.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// State directory: SQLite store, TLS certificate, coordinator key [default:
    /// $STATE_DIRECTORY under systemd, else /var/lib/tunnelmesh-coordinator].
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
}

impl Settings {
    /// The file at `path`, or nothing.
    pub fn load(path: Option<&Path>) -> Result<Settings> {
        let Some(path) = path else {
            return Ok(Settings::default());
        };
        let text =
            std::fs::read_to_string(path).with_context(|| format!("config {}: cannot read it", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
    }

    /// `self` (the flags) over `file`.
    pub fn over(self, file: Settings) -> Settings {
        Settings {
            listen: self.listen.or(file.listen),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            authorized_keys: self.authorized_keys.or(file.authorized_keys),
            ipv4_prefix: self.ipv4_prefix.or(file.ipv4_prefix),
            ipv6_prefix: self.ipv6_prefix.or(file.ipv6_prefix),
            policy: self.policy.or(file.policy),
            relay_limit_mbit: self.relay_limit_mbit.or(file.relay_limit_mbit),
            relay_dump: self.relay_dump.or(file.relay_dump),
            stun_port: self.stun_port.or(file.stun_port),
            data_dir: self.data_dir.or(file.data_dir),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
        }
    }

    /// The data directory: as set, else systemd's `$STATE_DIRECTORY`, else the default.
    pub fn data_dir(&self) -> PathBuf {
        if let Some(dir) = &self.data_dir {
            return dir.clone();
        }
        crate::service::directory("STATE_DIRECTORY").unwrap_or_else(|| DEFAULT_DATA_DIR.into())
    }

    /// What to serve with, defaults filled in.
    pub fn serve_options(self) -> Result<ServeOptions> {
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            bail!("tls_cert and tls_key go together: give both (an operator certificate) or neither (self-signed)");
        }
        let mbit = self.relay_limit_mbit.unwrap_or(DEFAULT_RELAY_LIMIT_MBIT);
        if !(1..=100_000).contains(&mbit) {
            bail!("relay_limit_mbit = {mbit} is out of range; use 1..=100000");
        }
        Ok(ServeOptions {
            data_dir: self.data_dir(),
            listen: self
                .listen
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("a socket address")),
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            authorized_keys: self.authorized_keys,
            ipv4_prefix: self.ipv4_prefix,
            ipv6_prefix: self.ipv6_prefix,
            policy: self.policy,
            relay_rate: mbit * 1_000_000 / 8,
            relay_dump: self.relay_dump,
            stun_port: self.stun_port.unwrap_or(crate::protocol::stun::DEFAULT_PORT),
            metrics_listen: self.metrics_listen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_and_bad_keys_or_halves_are_named() {
        let file: Settings = toml::from_str("listen = \"127.0.0.1:9000\"\nstun_port = 4000\n").unwrap();
        let flags = Settings {
            stun_port: Some(0),
            ..Default::default()
        };
        let o = flags.over(file).serve_options().unwrap();
        assert_eq!((o.listen.port(), o.stun_port), (9000, 0));
        let e = toml::from_str::<Settings>("listen = \"127.0.0.1:9000\"\nlisten_port = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("listen_port"), "{e}");
        let half = Settings {
            tls_cert: Some("/c.pem".into()),
            ..Default::default()
        };
        let e = half.serve_options().err().unwrap().to_string();
        assert!(e.contains("go together"), "{e}");
        let e = toml::from_str::<Settings>("relay_limit_mbit = 0\n")
            .unwrap()
            .serve_options()
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("1..=100000"), "{e}");
    }
}
