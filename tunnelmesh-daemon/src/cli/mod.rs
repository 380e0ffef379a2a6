//! Command-line interface: parses arguments ([`args`]), dispatches them, renders what comes
//! back ([`render`]), and turns errors into sentences a sysadmin can act on.

mod args;
mod render;

use args::*;
pub use args::{Cli, LogFormat};

use anyhow::{Result, bail};

use crate::{
    coordinator,
    identity::Identity,
    node::{status, up::Overrides},
};

fn up(args: UpArgs) -> Result<()> {
    let overrides = Overrides {
        interface: args.interface,
        listen_port: args.listen_port,
        mtu: args.mtu,
        workers: args.workers,
        no_ebpf: args.no_ebpf,
        no_offload: args.no_offload,
        identity: args.identity,
        coordinator: args.coordinator,
        fingerprint: args.fingerprint,
        token_file: args.token_file,
        name: args.name,
        ssh_port: args.ssh_port,
        port_mapping: args.port_mapping,
        port_mapping_lifetime: args.port_mapping_lifetime,
        state_dir: args.state_dir,
    };
    crate::node::up::up(args.config.as_deref(), overrides)
}

fn coordinator_command(args: CoordinatorArgs) -> Result<()> {
    let settings = args
        .settings
        .over(coordinator::config::Settings::load(args.config.as_deref())?);
    let data_dir = settings.data_dir();
    match args.command {
        None => coordinator::serve(settings.serve_options()?),
        Some(CoordinatorCommand::Info) => coordinator::info(&data_dir),
        Some(CoordinatorCommand::Token {
            command: TokenCommand::Create { ttl, uses, tags, names },
        }) => coordinator::token_create(&data_dir, coordinator::parse_duration(&ttl)?, uses, tags, &names),
        Some(CoordinatorCommand::Revoke { node }) => coordinator::revoke(&data_dir, &node),
        Some(CoordinatorCommand::Remove { node }) => coordinator::remove(&data_dir, &node),
        Some(CoordinatorCommand::RotateMeshKey) => coordinator::rotate_mesh_key(&data_dir),
        Some(CoordinatorCommand::Policy { command }) => policy_command(&data_dir, command),
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
                let report = status::query_ping(&interface, &peer)?;
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
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "tunnelmesh", &mut std::io::stdout());
            Ok(())
        }
        Command::Manpages { dir } => manpages(&dir),
        Command::Metrics { interface } => {
            let interface = pick_interface(interface)?;
            print!("{}", crate::node::metrics::render(&status::query(&interface)?));
            Ok(())
        }
        Command::Status { interface, json } => {
            let interface = pick_interface(interface)?;
            let s = status::query(&interface)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{s}");
            }
            Ok(())
        }
    }
}

/// `tunnelmesh.1`, and `tunnelmesh-SUB.1` for each visible subcommand, into `dir`.
fn manpages(dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let top = <Cli as clap::CommandFactory>::command();
    let version = top.get_version().unwrap_or_default().to_string();
    let mut pages = vec![("tunnelmesh".to_string(), top.clone())];
    for sub in top.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("tunnelmesh-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name).version(version.clone())));
    }
    for (name, cmd) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut page)?;
        std::fs::write(&path, page).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
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
