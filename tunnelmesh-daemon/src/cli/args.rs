//! The command line: every subcommand and flag (clap derive).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::{coordinator, identity::DEFAULT_IDENTITY};

#[derive(Parser)]
#[command(
    name = "tunnelmesh",
    version,
    about = "Peer-to-peer mesh VPN keyed by your OpenSSH ed25519 keys"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines on stderr: text (journald fields under systemd, colour only on a terminal) or
    /// json (one object per line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// Print a running interface's counters in the Prometheus text format (peers, bytes,
    /// handshakes, drops by reason, shield and ACL verdicts, paths, NAT, coordinator state).
    Metrics {
        /// Mesh interface name (default: the only one running).
        #[arg(long)]
        interface: Option<String>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (tunnelmesh.1 and one per subcommand) into DIR (for packaging).
    #[command(hide = true)]
    Manpages { dir: PathBuf },
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

/// `tunnelmesh up`: a config file, flags, or both (flags win over the file).
#[derive(clap::Args)]
pub struct UpArgs {
    /// TOML config: [interface] with [[peer]] tables (static) or a [coordinator] table (see
    /// README). SIGHUP reloads it.
    #[arg(long, required_unless_present = "coordinator")]
    pub config: Option<PathBuf>,
    /// Coordinator URL, https://HOST:PORT.
    #[arg(long, requires = "fingerprint")]
    pub coordinator: Option<String>,
    /// The coordinator's TLS fingerprint (SHA256:…), as `tunnelmesh coordinator` prints it.
    #[arg(long)]
    pub fingerprint: Option<String>,
    /// File holding an enrollment token, for a key not in the coordinator's authorized_keys
    /// (mode 0600; `-`: read it from stdin). Tokens never go on the command line.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Node name to ask for (default: from authorized_keys, else the key comment).
    #[arg(long)]
    pub name: Option<String>,
    /// Mesh interface name [default: tunnelmesh0].
    #[arg(long)]
    pub interface: Option<String>,
    /// UDP port for tunnel traffic [default: 51820].
    #[arg(long)]
    pub listen_port: Option<u16>,
    /// MTU of the mesh interface [default: 1420].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1280..=65000))]
    pub mtu: Option<u16>,
    /// Worker threads (0: one per core) [default: 0].
    #[arg(long)]
    pub workers: Option<usize>,
    /// Where the last coordinator state is cached [default: $STATE_DIRECTORY under systemd,
    /// else /var/lib/tunnelmesh/INTERFACE].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Do not load the eBPF fast path.
    #[arg(long)]
    pub no_ebpf: bool,
    /// Turn off TUN offloads (TSO/USO super-packets, GRO): one packet per TUN read and write.
    #[arg(long)]
    pub no_offload: bool,
    /// TCP port of the SSH transport, the fallback path when UDP is blocked (default: the same
    /// number as --listen-port; 0 turns it off).
    #[arg(long)]
    pub ssh_port: Option<u16>,
    /// Ask the gateway to forward a public UDP port to --listen-port: auto (PCP, then NAT-PMP,
    /// then UPnP-IGD), pcp, nat-pmp, upnp, or off [default: auto]. The mapping is renewed at
    /// half its lifetime and removed on exit.
    #[arg(long)]
    pub port_mapping: Option<crate::nat::portmap::Mode>,
    /// Lifetime to ask for a port mapping, in seconds [default: 3600].
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..=86400))]
    pub port_mapping_lifetime: Option<u64>,
    /// OpenSSH ed25519 private key (default: the systemd credential `identity`, else the
    /// config's identity, else /etc/ssh/ssh_host_ed25519_key).
    #[arg(long)]
    pub identity: Option<PathBuf>,
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CoordinatorArgs {
    #[command(subcommand)]
    pub command: Option<CoordinatorCommand>,
    /// TOML settings (/etc/tunnelmesh/coordinator.toml under systemd): the flags below, with
    /// `_` for `-`. Flags win over the file.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: coordinator::config::Settings,
}

#[derive(Subcommand)]
pub enum CoordinatorCommand {
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
pub enum PolicyCommand {
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
pub enum TokenCommand {
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
        /// Names its holders may take: `*` (any free name that no policy rule names and no
        /// authorized_keys line reserves), `prefix*`, or one exact name.
        #[arg(long, default_value = "*")]
        names: String,
    },
}

#[derive(Subcommand)]
pub enum IdentityCommand {
    /// Print the key's fingerprint (as `ssh-keygen -lf` does) and its mesh public key.
    Show {
        #[arg(long, default_value = DEFAULT_IDENTITY)]
        identity: PathBuf,
    },
}
