//! `cargo xtask`: developer and CI tasks for TunnelMesh.
//!
//! `setup` installs, idempotently, everything the other tasks need: the pinned stable and nightly
//! toolchains (automatic toolchain install is off on our machines, so `rustup toolchain install`
//! is called explicitly), `bpf-linker` built against the pinned nightly's own LLVM, and the Debian
//! packages the tests use. Every other task calls it first. This crate has no dependencies so it
//! builds with any stable toolchain.

mod modgraph;

use std::{
    env, fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

/// Stable toolchain for the workspace (aya 0.16 needs rustc >= 1.98).
const STABLE: &str = "1.98.0";
/// Nightly toolchain for the kernel programs (`-Z build-std`, rust-src).
const NIGHTLY: &str = "nightly-2026-10-15";
/// bpf-linker release.
const BPF_LINKER: &str = "0.13.0";
/// cargo-deb release (the Debian package of `dist`).
const CARGO_DEB: &str = "3.8.0";
/// cargo-fuzz release (libFuzzer driver for `fuzz`).
const CARGO_FUZZ: &str = "0.13.2";
/// Seconds each fuzz target runs in `test` (17 targets: about four and a half minutes).
const CI_FUZZ_SECONDS: u32 = 15;
/// Debian packages the tests, demo and bench use.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "iperf3",
    "bpftool",
    "openssh-client",
    "util-linux",
    "procps",
    "curl",
    "openssl",
    "nftables",
    "tcpdump",
    // libFuzzer (built from C++ sources by libfuzzer-sys) and the bundled SQLite.
    "g++",
    // NAT lab: the routers' port-mapping service (NAT-PMP, PCP, UPnP-IGD), nftables backend.
    "miniupnpd",
    "miniupnpd-nftables",
    // The units' checks (systemd-analyze verify / security); the package's check.
    "systemd",
    "lintian",
];

type Result<T = ()> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup(),
        Some("build-ebpf") => setup().and_then(|_| build_ebpf()),
        Some("modules") if args.len() > 1 => args[1..]
            .iter()
            .try_for_each(|src| modgraph::check(Path::new(src), &[])),
        Some("modules") => check_modules(),
        Some("test") => setup().and_then(|_| build_ebpf()).and_then(|_| test(&args[1..])),
        Some("fuzz") => setup()
            .and_then(|_| build_ebpf())
            .and_then(|_| parse_fuzz_args(&args[1..]))
            .and_then(|(target, seconds)| fuzz(target.as_deref(), seconds)),
        Some("dist") => setup().and_then(|_| build_ebpf()).and_then(|_| {
            run(cargo(STABLE).args(["build", "--release", "-p", "tunnelmesh-daemon"]))?;
            dist()
        }),
        Some("demo") => setup()
            .and_then(|_| build_ebpf())
            .and_then(|_| lab_binary("tunnelmesh-demo", &args[1..])),
        Some("bench") => setup()
            .and_then(|_| build_ebpf())
            .and_then(|_| lab_binary("tunnelmesh-bench", &args[1..])),
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n\n  setup        install pinned toolchains, bpf-linker and test packages (idempotent)\n  build-ebpf   build the kernel programs into target/bpf/tunnelmesh.bpf.o\n  modules [SRC_DIR...]\n               check that the module graphs have no cycles (part of test)\n  test         run every test (fmt, clippy, unit, interop, BPF and network-namespace tests,\n               then every fuzz target briefly from its corpus)\n  fuzz [TARGET] [--seconds N]\n               run one fuzz target (default: all) from its corpus for N seconds each (default 60)\n  dist         the release binary, man pages, shell completions and the Debian package
               (target/debian/tunnelmesh_*.deb), checked by lintian (part of test)\n  demo         two peers in network namespaces: ping and a TCP transfer through the tunnel\n  bench [tunnel|crypto|coordinator|shield|paths]\n               tunnel: against raw veth, wireguard-go, boringtun-cli; crypto: AEAD candidates;\n               coordinator: 10,000 peers;\n               shield: a junk flood at the TC and XDP shield and without eBPF; paths: UDP vs SSH vs relay\n               (tables + JSON)"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed with {status}"))
    }
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cargo(toolchain: &str) -> Command {
    let mut c = Command::new("cargo");
    c.arg(format!("+{toolchain}")).current_dir(root());
    // Never let rustup try to fetch a toolchain on its own.
    c.env("RUSTUP_AUTO_INSTALL", "0");
    c
}

fn rustup_home() -> PathBuf {
    env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".rustup"))
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cargo"))
}

fn home() -> PathBuf {
    env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

// ---------------------------------------------------------------------------------------- setup

fn setup() -> Result {
    ensure_toolchain(STABLE, &["clippy", "rustfmt"])?;
    ensure_toolchain(NIGHTLY, &["rust-src"])?;
    ensure_bpf_linker()?;
    ensure_tool("cargo-fuzz", CARGO_FUZZ)?;
    ensure_tool("cargo-deb", CARGO_DEB)?;
    ensure_apt_packages()
}

/// Where a pinned cargo tool is installed: its own root per version, so the version run is the
/// one pinned here.
fn tool_root(tool: &str, version: &str) -> PathBuf {
    cargo_home().join("tunnelmesh").join(format!("{tool}-{version}"))
}

fn cargo_fuzz_root() -> PathBuf {
    tool_root("cargo-fuzz", CARGO_FUZZ)
}

fn cargo_deb_root() -> PathBuf {
    tool_root("cargo-deb", CARGO_DEB)
}

/// `cargo install TOOL --version VERSION` into its root, unless it is there.
fn ensure_tool(tool: &str, version: &str) -> Result {
    let root = tool_root(tool, version);
    if root.join("bin").join(tool).exists() {
        return Ok(());
    }
    run(cargo(STABLE)
        .args(["install", tool, "--version", version, "--locked", "--root"])
        .arg(&root))
}

fn ensure_toolchain(name: &str, components: &[&str]) -> Result {
    let installed = output(Command::new("rustup").args(["toolchain", "list"]))?;
    let have_toolchain = installed.lines().any(|l| l.starts_with(name));
    let have_components = have_toolchain && {
        let list = output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", name]))?;
        components.iter().all(|c| list.lines().any(|l| l.starts_with(c)))
    };
    if have_components {
        return Ok(());
    }
    let mut cmd = Command::new("rustup");
    cmd.args(["toolchain", "install", name, "--profile", "minimal", "--no-self-update"]);
    for c in components {
        cmd.args(["--component", c]);
    }
    run(&mut cmd)
}

/// The nightly's own libLLVM (`lib/libLLVM.so.<ver>-rust-…`) and its major version.
fn nightly_llvm() -> Result<(PathBuf, String)> {
    let lib = rustup_home()
        .join("toolchains")
        .join(format!("{NIGHTLY}-x86_64-unknown-linux-gnu"))
        .join("lib");
    let lib = if lib.exists() {
        lib
    } else {
        // Other hosts (aarch64): find the toolchain folder by prefix.
        fs::read_dir(rustup_home().join("toolchains"))
            .map_err(|e| format!("cannot list rustup toolchains: {e}"))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(NIGHTLY))
            })
            .ok_or(format!("toolchain {NIGHTLY} is not installed"))?
            .join("lib")
    };
    let so = fs::read_dir(&lib)
        .map_err(|e| format!("cannot list {}: {e}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .ok_or(format!("{} has no libLLVM.so.*; is {NIGHTLY} complete?", lib.display()))?;
    let name = so.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let major = name
        .trim_start_matches("libLLVM.so.")
        .split(['.', '-'])
        .next()
        .unwrap_or_default()
        .to_string();
    if major.is_empty() {
        return Err(format!("cannot read the LLVM version from {name}"));
    }
    Ok((so, major))
}

/// Where bpf-linker is installed: keyed by the nightly and its LLVM, so a change rebuilds it.
fn bpf_linker_root() -> Result<PathBuf> {
    let (_, major) = nightly_llvm()?;
    Ok(cargo_home()
        .join("tunnelmesh")
        .join(format!("bpf-linker-{BPF_LINKER}-{NIGHTLY}-llvm{major}")))
}

fn ensure_bpf_linker() -> Result {
    let (so, major) = nightly_llvm()?;
    let root = bpf_linker_root()?;
    if root.join("bin/bpf-linker").exists() {
        return Ok(());
    }
    // bpf-linker links against libLLVM; point it at the toolchain's copy through a prefix folder.
    let prefix = root.join("llvm-prefix");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).map_err(|e| format!("cannot create {}: {e}", lib.display()))?;
    for link in [lib.join("libLLVM.so"), lib.join(so.file_name().expect("file"))] {
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&so, &link).map_err(|e| format!("cannot link {}: {e}", link.display()))?;
    }
    run(cargo(STABLE)
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER,
            "--locked",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{major}")])
        .arg("--root")
        .arg(&root)
        .env("LLVM_PREFIX", &prefix))
}

fn ensure_apt_packages() -> Result {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        c
    };
    run(&mut apt(&["update", "-q"]))?;
    run(apt(&["install", "-y", "-q", "--no-install-recommends"]).args(&missing))
}

// ---------------------------------------------------------------------------------- build-ebpf

fn build_ebpf() -> Result {
    let linker_bin = bpf_linker_root()?.join("bin");
    let path =
        env::join_paths(std::iter::once(linker_bin).chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())))
            .map_err(|e| e.to_string())?;
    let ebpf_dir = root().join("tunnelmesh-ebpf");
    run(cargo(NIGHTLY)
        .current_dir(&ebpf_dir)
        .args([
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .env("PATH", path)
        // BTF so that bpftool prints the maps with their types.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["-C", "debuginfo=2", "-C", "link-arg=--btf"].join("\x1f"),
        ))?;
    let built = ebpf_dir.join("target/bpfel-unknown-none/release/tunnelmesh-ebpf");
    let dest_dir = root().join("target/bpf");
    fs::create_dir_all(&dest_dir).map_err(|e| format!("cannot create {}: {e}", dest_dir.display()))?;
    let dest = dest_dir.join("tunnelmesh.bpf.o");
    // Copy only on change, so the daemon is not rebuilt needlessly.
    let new = fs::read(&built).map_err(|e| format!("cannot read {}: {e}", built.display()))?;
    if fs::read(&dest).ok().as_deref() != Some(&new[..]) {
        fs::write(&dest, &new).map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
    }
    eprintln!("xtask: kernel programs at {}", dest.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------- test

/// The daemon's rooms that must stay at the bottom, and the rooms each may use.
const DAEMON_LAYERS: &[(&str, &[&str])] = &[
    ("protocol", &["protocol", "sync"]),
    ("policy", &["policy", "protocol", "sync"]),
    ("offload", &["offload", "protocol"]),
    ("control", &["control", "policy", "protocol"]),
    ("sync", &["sync"]),
    ("slots", &["slots", "sync"]),
];

/// No module cycles in the daemon and the common crate, and the daemon's bottom rooms import
/// nothing above them.
fn check_modules() -> Result {
    modgraph::check(&root().join("tunnelmesh-daemon/src"), DAEMON_LAYERS)?;
    modgraph::check(&root().join("tunnelmesh-common/src"), &[])
}

fn test(extra: &[String]) -> Result {
    run(cargo(STABLE).args(["fmt", "--all", "--", "--check"]))?;
    // The kernel programs and xtask are workspaces of their own: check them with the same rustfmt.
    for (dir, crate_root) in [
        ("tunnelmesh-ebpf", "src/main.rs"),
        ("xtask", "src/main.rs"),
        ("tunnelmesh-daemon/fuzz", "fuzz_targets/wire.rs"),
    ] {
        let mut rustfmt = Command::new("rustfmt");
        rustfmt
            .args([&format!("+{STABLE}"), "--edition", "2024", "--check", crate_root])
            .current_dir(root().join(dir))
            .env("RUSTUP_AUTO_INSTALL", "0");
        run(&mut rustfmt)?;
    }
    // Dependencies point one way: no module cycles (the checker's own tests first).
    run(cargo(STABLE)
        .args(["test", "--quiet", "--manifest-path"])
        .arg(root().join("xtask/Cargo.toml")))?;
    check_modules()?;
    run(cargo(STABLE).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--release",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo(STABLE).args(["build", "--release", "--workspace"]))?;
    // The package test installs what this builds.
    dist()?;
    let bin = root().join("target/release/tunnelmesh");
    let mut cmd = cargo(STABLE);
    cmd.args(["test", "--workspace", "--release"])
        .args(extra)
        .args(["--", "--test-threads=1"])
        .env("TUNNELMESH_BIN", &bin)
        .stdout(Stdio::piped());
    loopback_direct(&mut cmd);
    eprintln!("xtask: running {cmd:?}");
    let mut child = cmd.spawn().map_err(|e| format!("cannot start cargo test: {e}"))?;
    // Echo the output and add up every test binary's "test result:" line.
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.map_err(|e| e.to_string())?;
        println!("{line}");
        if let Some(summary) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                summary
                    .split([';', '.'])
                    .find_map(|part| part.trim().strip_suffix(word)?.trim().parse::<u64>().ok())
            };
            passed += count("passed").unwrap_or(0);
            failed += count("failed").unwrap_or(0);
            ignored += count("ignored").unwrap_or(0);
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    println!("\ntests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() || failed > 0 {
        return Err(format!("cargo test failed ({status})"));
    }
    if passed == 0 {
        return Err("cargo test ran no test".into());
    }
    fuzz(None, CI_FUZZ_SECONDS)
}

// ---------------------------------------------------------------------------------------- dist

/// From the release binary already built: man pages and completions into `target/dist`, then
/// the Debian package (cargo-deb, which strips the binary) and lintian over it (errors fail).
fn dist() -> Result {
    let bin = root().join("target/release/tunnelmesh");
    let out = root().join("target/dist");
    let _ = fs::remove_dir_all(&out);
    let (man, completions) = (out.join("man"), out.join("completions"));
    fs::create_dir_all(&completions).map_err(|e| format!("cannot create {}: {e}", completions.display()))?;
    run(Command::new(&bin).arg("manpages").arg(&man))?;
    run(Command::new("sh").args(["-c", "gzip -9n -- \"$0\"/*.1"]).arg(&man))?;
    for (shell, file) in [
        ("bash", "tunnelmesh.bash"),
        ("zsh", "_tunnelmesh"),
        ("fish", "tunnelmesh.fish"),
    ] {
        let script = output(Command::new(&bin).args(["completions", shell]))?;
        fs::write(completions.join(file), script).map_err(|e| format!("cannot write {file}: {e}"))?;
    }
    let _ = fs::remove_dir_all(root().join("target/debian"));
    run(Command::new(cargo_deb_root().join("bin/cargo-deb"))
        .args(["--no-build", "--strip", "-p", "tunnelmesh-daemon"])
        .current_dir(root()))?;
    let deb = fs::read_dir(root().join("target/debian"))
        .map_err(|e| format!("cargo-deb wrote no target/debian: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or("cargo-deb wrote no .deb")?;
    run(Command::new("lintian").args(["--fail-on", "error", "--info"]).arg(&deb))?;
    eprintln!("xtask: package at {}", deb.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------- fuzz

/// Loopback HTTP (the UPnP fuzz target's fake gateway) never goes through a proxy the
/// environment may name.
fn loopback_direct(cmd: &mut Command) {
    cmd.env("no_proxy", "127.0.0.1,localhost")
        .env("NO_PROXY", "127.0.0.1,localhost");
}

fn parse_fuzz_args(args: &[String]) -> Result<(Option<String>, u32)> {
    let (mut target, mut seconds) = (None, 60);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--seconds" => {
                let value = it.next().ok_or("--seconds needs a number of seconds")?;
                seconds = value
                    .parse()
                    .map_err(|_| format!("--seconds {value}: not a whole number of seconds"))?;
            }
            other if other.starts_with('-') => return Err(format!("fuzz: unknown option {other}")),
            other if target.is_none() => target = Some(other.to_string()),
            other => return Err(format!("fuzz: one target at a time (got {other} too)")),
        }
    }
    Ok((target, seconds))
}

/// The fuzz targets: the `[[bin]]` names of the fuzz crate.
fn fuzz_targets() -> Result<Vec<String>> {
    let manifest = root().join("tunnelmesh-daemon/fuzz/Cargo.toml");
    let text = fs::read_to_string(&manifest).map_err(|e| format!("cannot read {}: {e}", manifest.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("name = \"")?.strip_suffix('"'))
        .filter(|n| *n != "tunnelmesh-fuzz")
        .map(str::to_string)
        .collect())
}

fn cargo_fuzz() -> Result<Command> {
    let path = env::join_paths(
        std::iter::once(cargo_fuzz_root().join("bin"))
            .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
    )
    .map_err(|e| e.to_string())?;
    let mut c = cargo(NIGHTLY);
    c.current_dir(root().join("tunnelmesh-daemon")).env("PATH", path);
    loopback_direct(&mut c);
    Ok(c)
}

/// Build every target (libFuzzer, AddressSanitizer, debug assertions on), then run `only` or
/// each for `seconds` from its committed corpus. New inputs go to `target/fuzz/corpus/TARGET`
/// (the committed corpus is only read); a crash stops with its reproducer's path.
fn fuzz(only: Option<&str>, seconds: u32) -> Result {
    let targets = fuzz_targets()?;
    let chosen: Vec<&String> = match only {
        Some(t) => vec![
            targets
                .iter()
                .find(|n| *n == t)
                .ok_or(format!("no fuzz target {t}; the targets are: {}", targets.join(", ")))?,
        ],
        None => targets.iter().collect(),
    };
    run(cargo_fuzz()?.args(["fuzz", "build", "-O", "--fuzz-dir", "fuzz"]))?;
    let work = root().join("target/fuzz");
    let mut rows = Vec::new();
    for target in chosen {
        let seeds = root().join("tunnelmesh-daemon/fuzz/corpus").join(target);
        let grown = work.join("corpus").join(target);
        let artifacts = work.join("artifacts").join(target);
        for dir in [&grown, &artifacts] {
            fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let mut cmd = cargo_fuzz()?;
        cmd.args(["fuzz", "run", "-O", "--fuzz-dir", "fuzz", target])
            .arg(&grown)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1")
            .stderr(Stdio::piped());
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        let out = cmd.output().map_err(|e| format!("cannot start cargo fuzz: {e}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let done = log
            .lines()
            .rev()
            .find(|l| l.contains("DONE") || l.contains("cov:"))
            .unwrap_or("");
        let field = |name: &str| {
            done.split_whitespace()
                .skip_while(|w| *w != name)
                .nth(1)
                .unwrap_or("?")
                .to_string()
        };
        let execs = log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .map_or("?".to_string(), |v| v.trim().to_string());
        if !out.status.success() {
            eprintln!("{log}");
            return Err(format!(
                "fuzz target {target} failed ({}); its reproducer is in {}: fix the bug, then keep the input in tunnelmesh-daemon/fuzz/regressions/{target}/",
                out.status,
                artifacts.display()
            ));
        }
        rows.push((target.clone(), execs, field("cov:"), field("ft:"), field("corp:")));
    }
    println!(
        "\nfuzz: {seconds} s per target\n{:<22} {:>12} {:>8} {:>8} {:>14}",
        "target", "executions", "cov", "ft", "corpus"
    );
    for (target, execs, cov, ft, corp) in rows {
        println!("{target:<22} {execs:>12} {cov:>8} {ft:>8} {corp:>14}");
    }
    Ok(())
}

/// Run one of the lab binaries (demo, bench) from the tests crate, release build.
fn lab_binary(name: &str, args: &[String]) -> Result {
    run(cargo(STABLE).args(["build", "--release", "--workspace"]))?;
    let mut cmd = cargo(STABLE);
    cmd.args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "tunnelmesh-tests",
        "--bin",
        name,
        "--",
    ])
    .args(args)
    .env("TUNNELMESH_BIN", root().join("target/release/tunnelmesh"));
    run(&mut cmd)
}
