//! `tunnelmesh`: the one binary — peer daemon, coordinator and CLI.

use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};
use tunnelmesh_daemon::cli::{Cli, LogFormat};

fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if let Err(e) = tunnelmesh_daemon::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Logs go to stderr: JSON lines with `--log-format json`; journald's own fields when stderr is
/// the journal's stream (systemd sets `JOURNAL_STREAM`); otherwise text, coloured only on a
/// terminal (and not under `NO_COLOR`). `RUST_LOG` filters (default `info`).
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry.with(fmt::layer().json().with_writer(std::io::stderr)).init(),
        LogFormat::Text => {
            if stderr_is_journal()
                && let Ok(journald) = tracing_journald::layer()
            {
                return registry
                    .with(journald.with_syslog_identifier("tunnelmesh".into()))
                    .init();
            }
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            registry
                .with(fmt::layer().with_ansi(colour).with_writer(std::io::stderr))
                .init()
        }
    }
}

/// systemd connects stderr to the journal and says so in `JOURNAL_STREAM=DEV:INODE`; a stderr
/// redirected elsewhere (a child's pipe, a file) keeps the variable but not the device and inode.
fn stderr_is_journal() -> bool {
    use std::os::{fd::AsFd, unix::fs::MetadataExt};
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(stderr) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(stderr).metadata() {
        Ok(m) => dev.parse() == Ok(m.dev()) && ino.parse() == Ok(m.ino()),
        Err(_) => false,
    }
}
