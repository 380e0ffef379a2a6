//! Command-line interface: parses arguments and turns errors into sentences a sysadmin can act on.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use crate::{
    coordinator,
    identity::{DEFAULT_IDENTITY, Identity},
    node::client,
    node::status,
};

fn up(args: UpArgs) -> Result<()> {
    if let Some(config) = &args.config {
        return crate::node::interface::up_static(config, args.identity.as_deref());
    }
    let (Some(url), Some(fingerprint)) = (args.coordinator, args.fingerprint) else {
        bail!("give --config FILE, or --coordinator URL with --fingerprint SHA256:…");
    };
    if args.listen_port == 0 {
        bail!("--listen-port must be 1-65535");
    }
    let identity = Identity::load(
        args.identity
            .as_deref()
            .unwrap_or(std::path::Path::new(DEFAULT_IDENTITY)),
    )?;
    let opts = client::JoinOptions {
        url,
        fingerprint,
        token: args.token,
        name: args.name,
        interface: args.interface,
        listen_port: args.listen_port,
        mtu: args.mtu as usize,
        workers: args.workers,
        state_dir: args.state_dir,
        no_ebpf: args.no_ebpf,
        no_offload: args.no_offload,
        ssh_port: args.ssh_port.unwrap_or(args.listen_port),
        port_mapping: args.port_mapping,
        port_mapping_lifetime: std::time::Duration::from_secs(args.port_mapping_lifetime),
    };
    client::up(opts, identity)
}

fn coordinator_command(args: CoordinatorArgs) -> Result<()> {
    match args.command {
        None => coordinator::serve(coordinator::ServeOptions {
            data_dir: args.data_dir,
            listen: args.listen,
            tls_cert: args.tls_cert,
            tls_key: args.tls_key,
            authorized_keys: args.authorized_keys,
            ipv4_prefix: args.ipv4_prefix,
            ipv6_prefix: args.ipv6_prefix,
            policy: args.policy,
            relay_rate: args.relay_limit_mbit * 1_000_000 / 8,
            relay_dump: args.relay_dump,
            stun_port: args.stun_port,
        }),
        Some(CoordinatorCommand::Info) => coordinator::info(&args.data_dir),
        Some(CoordinatorCommand::Token {
            command: TokenCommand::Create { ttl, uses, tags },
        }) => coordinator::token_create(&args.data_dir, coordinator::parse_duration(&ttl)?, uses, tags),
        Some(CoordinatorCommand::Revoke { node }) => coordinator::revoke(&args.data_dir, &node),
        Some(CoordinatorCommand::Remove { node }) => coordinator::remove(&args.data_dir, &node),
        Some(CoordinatorCommand::RotateMeshKey) => coordinator::rotate_mesh_key(&args.data_dir),
        Some(CoordinatorCommand::Policy { command }) => policy_command(&args.data_dir, command),
    }
}

fn policy_command(data_dir: &std::path::Path, command: PolicyCommand) -> Result<()> {
    match command {
        PolicyCommand::Explain { policy, src, dst, port } => coordinator::explain(data_dir, &policy, &src, &dst, &port),
        PolicyCommand::Check { file } => {
            let text =
                std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let policy =
                crate::policy::PolicyFile::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            println!(
                "{}: ok ({} allow rules, {} groups)",
                file.display(),
                policy.rules.len(),
                policy.groups.len()
            );
            Ok(())
        }
    }
}

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
    /// Bring up a mesh interface — from a coordinator, or a static config file — and run until
    /// SIGINT/SIGTERM.
    Up(UpArgs),
    /// Run the coordinator, or manage it (info, tokens, revocation, mesh-key rotation).
    Coordinator(CoordinatorArgs),
    /// Check a policy file, or explain what it allows (on the coordinator's host; the same as
    /// `tunnelmesh coordinator policy …`).
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
        /// The coordinator's state directory (explain resolves node names and addresses there).
        #[arg(long, global = true, default_value = coordinator::DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
    },
    /// What the network does to UDP: reachability, NAT mapping, STUN RTT, hairpinning, port mapping.
    Netcheck {
        /// The coordinator (https://HOST:PORT or HOST): its STUN targets are asked.
        #[arg(long)]
        coordinator: String,
        /// UDP port of the coordinator's first STUN target; the second is the next port (as the
        /// coordinator's `--stun-port` sets them).
        #[arg(long, default_value_t = crate::protocol::stun::DEFAULT_PORT)]
        stun_port: u16,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Probe every path to a peer (direct UDP, SSH, relay) and show which answered, and how fast.
    Ping {
        /// The peer's name (or fingerprint).
        peer: String,
        /// Mesh interface name (default: the only one running).
        #[arg(long)]
        interface: Option<String>,
        /// Probe rounds, one a second.
        #[arg(long, short = 'c', default_value_t = 3)]
        count: u32,
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

#[derive(clap::Args)]
struct UpArgs {
    /// TOML config with [interface] and [[peer]] tables (static mode; see README).
    #[arg(long, conflicts_with_all = ["coordinator", "fingerprint", "token"], required_unless_present = "coordinator")]
    config: Option<PathBuf>,
    /// Coordinator URL, https://HOST:PORT.
    #[arg(long, requires = "fingerprint")]
    coordinator: Option<String>,
    /// The coordinator's TLS fingerprint (SHA256:…), as `tunnelmesh coordinator` prints it.
    #[arg(long)]
    fingerprint: Option<String>,
    /// Enrollment token, for a key not in the coordinator's authorized_keys.
    #[arg(long)]
    token: Option<String>,
    /// Node name to ask for (default: from authorized_keys, else the key comment).
    #[arg(long)]
    name: Option<String>,
    /// Mesh interface name.
    #[arg(long, default_value = "tunnelmesh0")]
    interface: String,
    /// UDP port for tunnel traffic.
    #[arg(long, default_value_t = crate::node::config::DEFAULT_PORT)]
    listen_port: u16,
    /// MTU of the mesh interface.
    #[arg(long, default_value_t = crate::node::config::DEFAULT_MTU, value_parser = clap::value_parser!(u16).range(1280..=65000))]
    mtu: u16,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Where the last coordinator state is cached.
    #[arg(long, default_value = crate::node::client::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Do not load the eBPF fast path.
    #[arg(long)]
    no_ebpf: bool,
    /// Turn off TUN offloads (TSO/USO super-packets, GRO): one packet per TUN read and write.
    #[arg(long)]
    no_offload: bool,
    /// TCP port of the SSH transport, the fallback path when UDP is blocked (default: the same
    /// number as --listen-port; 0 turns it off).
    #[arg(long)]
    ssh_port: Option<u16>,
    /// Ask the gateway to forward a public UDP port to --listen-port: auto (PCP, then NAT-PMP,
    /// then UPnP-IGD), pcp, nat-pmp, upnp, or off. The mapping is renewed at half its lifetime
    /// and removed on exit.
    #[arg(long, default_value = "auto")]
    port_mapping: crate::nat::portmap::Mode,
    /// Lifetime to ask for a port mapping, in seconds.
    #[arg(long, default_value_t = crate::nat::portmap::DEFAULT_LIFETIME.as_secs(), value_parser = clap::value_parser!(u64).range(2..=86400))]
    port_mapping_lifetime: u64,
    /// OpenSSH ed25519 private key (default: the config's identity, else /etc/ssh/ssh_host_ed25519_key).
    #[arg(long)]
    identity: Option<PathBuf>,
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct CoordinatorArgs {
    #[command(subcommand)]
    command: Option<CoordinatorCommand>,
    /// State directory: SQLite store, TLS certificate, coordinator key.
    #[arg(long, global = true, default_value = coordinator::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Address to serve HTTPS on.
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: std::net::SocketAddr,
    /// PEM certificate chain (default: self-signed, generated on first start).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// OpenSSH authorized_keys of admitted peers (default: DATA_DIR/authorized_keys if present).
    #[arg(long)]
    authorized_keys: Option<PathBuf>,
    /// IPv4 mesh prefix, fixed at first start.
    #[arg(long)]
    ipv4_prefix: Option<ipnet::Ipv4Net>,
    /// IPv6 (ULA) mesh prefix, fixed at first start (default: a random fdXX:…::/64).
    #[arg(long)]
    ipv6_prefix: Option<ipnet::Ipv6Net>,
    /// Policy file; reloaded when it changes or on SIGHUP. Without one nothing is allowed.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// What each peer may send through the relay, in Mbit/s (excess frames are dropped).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    relay_limit_mbit: u64,
    /// Append every relayed message, exactly as the coordinator sees it, to FILE (an audit:
    /// it is ciphertext).
    #[arg(long)]
    relay_dump: Option<PathBuf>,
    /// UDP port of the first STUN target; the second is the next port (0: no STUN).
    #[arg(long, default_value_t = crate::protocol::stun::DEFAULT_PORT)]
    stun_port: u16,
}

#[derive(Subcommand)]
enum CoordinatorCommand {
    /// Print the TLS fingerprint peers pin, the coordinator key and the prefixes.
    Info,
    /// Enrollment tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Revoke a node by name or fingerprint: every peer drops it, and it cannot rejoin.
    Revoke { node: String },
    /// Remove a node from the mesh: every peer drops it; it may rejoin if admitted again.
    Remove { node: String },
    /// Issue a new mesh key; the previous one stays valid for an overlap so no tunnel drops.
    RotateMeshKey,
    /// Policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Check a policy file: every error with its line and what is wrong.
    Check { file: PathBuf },
    /// Which rule lets node SRC reach node DST on PROTO/PORT (e.g. tcp/443), or that default
    /// deny applies.
    Explain {
        /// The policy file to explain (as passed to the coordinator's --policy).
        #[arg(long)]
        policy: PathBuf,
        src: String,
        dst: String,
        port: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print it (only its hash is stored).
    Create {
        /// Lifetime: 90s, 15m, 2h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// How many nodes may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Tags given to nodes that join with it (comma-separated).
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
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
        Command::Up(args) => up(args),
        Command::Coordinator(args) => coordinator_command(args),
        Command::Policy { command, data_dir } => policy_command(&data_dir, command),
        Command::Netcheck {
            coordinator,
            stun_port,
            json,
        } => {
            let report = crate::nat::netcheck::run(crate::nat::netcheck::targets(&coordinator, stun_port)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(())
        }
        Command::Ping { peer, interface, count } => {
            let interface = pick_interface(interface)?;
            let mut answered = 0;
            for round in 0..count {
                if round > 0 {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
                let report = status::query_ping(&interface, &peer).map_err(anyhow::Error::msg)?;
                let current = report.current.map_or("none", |c| c.name());
                for (kind, at, rtt) in &report.paths {
                    let mark = if report.current == Some(*kind) { " (in use)" } else { "" };
                    match rtt {
                        Some(ms) => {
                            answered += 1;
                            println!("{}: reply via {at}{mark}: rtt {ms:.3} ms", report.peer)
                        }
                        None => println!("{}: no reply via {at}{mark}", report.peer),
                    }
                }
                if report.paths.is_empty() {
                    println!("{}: no path available (traffic path: {current})", report.peer);
                }
            }
            if answered == 0 {
                bail!("{peer} did not answer on any path");
            }
            Ok(())
        }
        Command::Status { interface, json } => {
            let interface = pick_interface(interface)?;
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

/// `--interface`, or the only one running.
fn pick_interface(interface: Option<String>) -> Result<String> {
    Ok(match interface {
        Some(i) => i,
        None => match status::running_interfaces().as_slice() {
            [one] => one.clone(),
            [] => bail!("no tunnelmesh interface is running (no socket in {})", status::RUN_DIR),
            many => bail!(
                "several interfaces are running ({}); pick one with --interface",
                many.join(", ")
            ),
        },
    })
}

fn print_status(s: &status::Status) {
    println!(
        "interface: {} (port {}, mtu {}, up {} s)",
        s.interface, s.listen_port, s.mtu, s.uptime_secs
    );
    println!("  offloads: {}", s.offloads);
    println!("  identity: {}", s.fingerprint);
    println!("  addresses: {}", s.addresses.join(", "));
    if let Some(c) = &s.coordinator {
        println!("  coordinator: {} ({})", c.url, c.state);
        if let Some(e) = &c.last_error {
            println!("    last error: {e}");
        }
    }
    println!("  public key: {}", s.public_key);
    let endpoints: Vec<String> = s.nat.endpoints().iter().map(|e| e.to_string()).collect();
    println!(
        "  nat: {} (reflexive {}, STUN RTT {}); candidates: {}",
        s.nat.nat.name(),
        s.nat.reflexive.map_or("unknown".into(), |r| r.to_string()),
        s.nat.stun_rtt_ms.map_or("-".into(), |ms| format!("{ms:.2} ms")),
        if endpoints.is_empty() {
            "(none)".into()
        } else {
            endpoints.join(", ")
        }
    );
    if let Some(m) = &s.port_mapping {
        println!(
            "  port mapping: {} via {} (lifetime {} s, renewed {} times)",
            m.external,
            m.protocol.name(),
            m.lifetime_secs,
            m.renewals
        );
    }
    match &s.policy {
        Some(p) => {
            println!(
                "  policy: default deny, {} inbound rules, enforcement: {}",
                p.rules.len(),
                p.enforcement
            );
            if let Some(reason) = &p.userspace_reason {
                println!("    (not in the kernel: {reason})");
            }
            for r in &p.rules {
                println!(
                    "    rule {}: {} {} from {} ({} allowed)",
                    r.id,
                    r.proto,
                    r.ports,
                    r.sources.join(", "),
                    p.rule_hits.get(&r.id).copied().unwrap_or(0)
                );
            }
            let counters: Vec<String> = p.counters.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("    {}", counters.join(", "));
        }
        None => println!("  policy: none (static mesh: configured peers may connect)"),
    }
    println!("  shield: {}", s.fastpath.enforcement);
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
        let paths: Vec<String> = p
            .paths
            .iter()
            .filter(|c| c.available)
            .map(|c| {
                let state = if c.proven { "works" } else { "untested" };
                match c.rtt_ms {
                    Some(ms) => format!("{} {state}, {ms:.2} ms", c.kind.name()),
                    None => format!("{} {state}", c.kind.name()),
                }
            })
            .collect();
        println!("  path: {} (candidates: {})", p.path, paths.join("; "));
        if let Some(n) = &p.nat {
            println!(
                "  nat: {}; udp candidates: {}; punches: {} started, {} direct",
                n.kind.name(),
                if n.candidates.is_empty() {
                    "(none)".into()
                } else {
                    n.candidates.join(", ")
                },
                n.punches_started,
                n.punches_succeeded
            );
        }
        println!("  allowed ips: {}", p.allowed_ips.join(", "));
        match p.last_handshake_secs {
            Some(s) => println!("  latest handshake: {s} s ago"),
            None => println!("  latest handshake: never"),
        }
        println!("  transfer: {} B received, {} B sent", p.rx_bytes, p.tx_bytes);
    }
}
