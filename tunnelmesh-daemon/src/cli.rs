//! Command-line interface: parses arguments and turns errors into sentences a sysadmin can act on.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use crate::{
    daemon,
    identity::{DEFAULT_IDENTITY, Identity},
    status,
};

#[derive(Parser)]
#[command(
    name = "tunnelmesh",
    version,
    about = "Peer-to-peer mesh VPN keyed by your OpenSSH ed25519 keys"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show this node's identity.
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
    },
    /// Bring up a mesh interface from a static config file and run until SIGINT/SIGTERM.
    Up {
        /// TOML config: [interface] and [[peer]] tables (see README).
        #[arg(long)]
        config: PathBuf,
        /// OpenSSH ed25519 private key (default: the config's identity, else /etc/ssh/ssh_host_ed25519_key).
        #[arg(long)]
        identity: Option<PathBuf>,
    },
    /// Show a running interface: peers, endpoints, handshakes, traffic, drop counters.
    Status {
        /// Mesh interface name (default: the only one running).
        #[arg(long)]
        interface: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum IdentityCommand {
    /// Print the key's fingerprint (as `ssh-keygen -lf` does) and its mesh public key.
    Show {
        #[arg(long, default_value = DEFAULT_IDENTITY)]
        identity: PathBuf,
    },
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Identity {
            command: IdentityCommand::Show { identity },
        } => {
            let id = Identity::load(&identity)?;
            println!("{}", id.public().ssh_keygen_line());
            println!("mesh public key: {}", id.public().noise_public_base64());
            Ok(())
        }
        Command::Up { config, identity } => daemon::up_static(&config, identity.as_deref()),
        Command::Status { interface, json } => {
            let interface = match interface {
                Some(i) => i,
                None => match status::running_interfaces().as_slice() {
                    [one] => one.clone(),
                    [] => bail!("no tunnelmesh interface is running (no socket in {})", status::RUN_DIR),
                    many => bail!(
                        "several interfaces are running ({}); pick one with --interface",
                        many.join(", ")
                    ),
                },
            };
            let s = status::query(&interface).map_err(anyhow::Error::msg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_status(&s);
            }
            Ok(())
        }
    }
}

fn print_status(s: &status::Status) {
    println!(
        "interface: {} (port {}, mtu {}, up {} s)",
        s.interface, s.listen_port, s.mtu, s.uptime_secs
    );
    println!("  identity: {}", s.fingerprint);
    println!("  addresses: {}", s.addresses.join(", "));
    if let Some(c) = &s.coordinator {
        println!("  coordinator: {} ({})", c.url, c.state);
        if let Some(e) = &c.last_error {
            println!("    last error: {e}");
        }
    }
    println!("  public key: {}", s.public_key);
    println!("  enforcement: {}", s.fastpath.enforcement);
    if !s.fastpath.xdp_interfaces.is_empty() {
        println!(
            "  xdp shield: {} ({})",
            s.fastpath.xdp_interfaces.join(", "),
            s.fastpath.xdp_mode.as_deref().unwrap_or("?")
        );
        for (reason, n) in &s.fastpath.shield {
            println!("    {reason}: {n}");
        }
    }
    if let Some(e) = &s.fastpath.error {
        println!("  fast path: {e}");
    }
    for (name, n) in s.counters.iter().filter(|(_, n)| **n > 0) {
        println!("  {name}: {n}");
    }
    for p in &s.peers {
        println!("\npeer: {} ({})", p.name, p.fingerprint);
        println!("  endpoint: {}", p.endpoint.as_deref().unwrap_or("(none)"));
        println!("  allowed ips: {}", p.allowed_ips.join(", "));
        match p.last_handshake_secs {
            Some(s) => println!("  latest handshake: {s} s ago"),
            None => println!("  latest handshake: never"),
        }
        println!("  transfer: {} B received, {} B sent", p.rx_bytes, p.tx_bytes);
    }
}
