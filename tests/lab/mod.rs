//! The test lab: real `tunnelmesh` binaries in network namespaces joined by veth pairs.
//!
//! A [`Lab`] owns everything it creates — namespaces (with their veths), daemons, temporary keys
//! and configs, and any BPF pins or status sockets a killed daemon left — and removes all of it
//! on drop, also when a test panics. Namespace and interface names carry a per-lab prefix so labs
//! never collide. Underlays use the 198.18.0.0/15 benchmark range; all traffic stays inside the
//! lab's namespaces. A lab that cannot be built panics: tests never skip.

mod bpftool;
mod coordinator;
mod node;
mod probes;

pub use bpftool::{bpftool_dump, percpu_sums};
pub use coordinator::Coordinator;
pub use node::{Node, NodeOptions};

use std::{
    fs::{self, File},
    io::{Read, Write},
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use serde_json::Value;
use sha2::{Digest, Sha256};

static LABS: AtomicU32 = AtomicU32::new(0);

/// A policy under which every member may reach every member (tests about something else).
pub const ALLOW_ALL: &str = "[[allow]]\nfrom = [\"*\"]\nto = [\"*\"]\nports = [\"any\"]\n";

/// Mesh UDP port used by nodes unless a test picks another.
pub const PORT: u16 = 51820;

/// The `tunnelmesh` binary under test.
pub fn bin() -> PathBuf {
    std::env::var_os("TUNNELMESH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/tunnelmesh"))
}

fn check(what: &str, out: std::io::Result<Output>) -> Output {
    let out = out.unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run a host command that must succeed.
pub fn host(args: &[&str]) -> Output {
    check(&args.join(" "), Command::new(args[0]).args(&args[1..]).output())
}

/// Start `tunnelmesh ARGS` in namespace `ns`, appending its output to `log`.
fn spawn_in(ns: &str, wrapper: &[String], args: &[String], log: &Path, env: &[(String, String)]) -> Child {
    let log = File::options().create(true).append(true).open(log).expect("log file");
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .args(wrapper)
        .arg(bin())
        .args(args)
        .env("RUST_LOG", "info,tunnelmesh=debug")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin().display()))
}

pub struct Lab {
    pub prefix: String,
    pub dir: tempfile::TempDir,
    namespaces: Vec<String>,
    links: usize,
    pub nodes: Vec<Node>,
}

impl Lab {
    /// An empty lab. Requires root.
    pub fn new() -> Lab {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the network-namespace lab needs root (run `cargo xtask test` as root)"
        );
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("t{:04x}{}", std::process::id() & 0xffff, n);
        Lab {
            prefix,
            dir: tempfile::tempdir().expect("temp dir"),
            namespaces: Vec::new(),
            links: 0,
            nodes: Vec::new(),
        }
    }

    /// Create namespace `short` (returns its full name), with loopback up.
    pub fn netns(&mut self, short: &str) -> String {
        let name = format!("{}-{short}", self.prefix);
        host(&["ip", "netns", "add", &name]);
        self.namespaces.push(name.clone());
        self.sh(&name, "ip link set lo up");
        name
    }

    /// A veth pair between two namespaces with the given IPv4 /24 addresses.
    pub fn link(&mut self, ns_a: &str, addr_a: Ipv4Addr, ns_b: &str, addr_b: Ipv4Addr) -> (String, String) {
        self.links += 1;
        let n = self.links;
        let (ia, ib) = (format!("{}a{n}", self.prefix), format!("{}b{n}", self.prefix));
        host(&[
            "ip", "link", "add", &ia, "netns", ns_a, "type", "veth", "peer", "name", &ib, "netns", ns_b,
        ]);
        self.sh(
            ns_a,
            &format!("ip addr add {addr_a}/24 dev {ia} && ip link set {ia} up"),
        );
        self.sh(
            ns_b,
            &format!("ip addr add {addr_b}/24 dev {ib} && ip link set {ib} up"),
        );
        (ia, ib)
    }

    /// Run `sh -c script` in namespace `ns`; it must succeed.
    pub fn sh(&self, ns: &str, script: &str) -> Output {
        check(&format!("[{ns}] {script}"), self.sh_cmd(ns, script).output())
    }

    /// `sh -c script` in namespace `ns`, not yet run.
    pub fn sh_cmd(&self, ns: &str, script: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{ns}")).args(["--", "sh", "-c", script]);
        c
    }

    fn spawn_node(&mut self, i: usize, mut args: Vec<String>) {
        let n = &self.nodes[i];
        args.extend(["--identity".to_string(), n.key.display().to_string()]);
        let child = spawn_in(&n.ns, &n.wrapper, &args, &n.log, &n.env);
        self.nodes[i].process = Some(child);
    }

    fn try_status(&self, i: usize) -> Option<Value> {
        let out = Command::new(bin())
            .args(["status", "--json", "--interface", &self.nodes[i].iface])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// A switch: namespace `sw` with a bridge, and one namespace per name plugged into it with
    /// address 198.18.`net`.(i+1)/24. Returns the namespaces and addresses.
    pub fn switched(&mut self, net: u8, names: &[&str]) -> Vec<(String, Ipv4Addr)> {
        let sw = self.netns("sw");
        self.sh(&sw, "ip link add br0 type bridge && ip link set br0 up");
        names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let addr = Ipv4Addr::new(198, 18, net, i as u8 + 1);
                (self.plug(&sw, "br0", name, addr, "true"), addr)
            })
            .collect()
    }

    /// A LAN behind `router`: a bridge in the router's namespace at 198.19.`net`.1/24 and a new
    /// namespace per name at .2, .3, … with a default route via the router. Returns each host's
    /// namespace and address, and the name of the router's LAN interface.
    pub fn lan(&mut self, router: &str, net: u8, names: &[&str]) -> (Vec<(String, Ipv4Addr)>, String) {
        let gateway = Ipv4Addr::new(198, 19, net, 1);
        let bridge = format!("{}l{net}", self.prefix);
        self.sh(
            router,
            &format!(
                "ip link add {bridge} type bridge && ip addr add {gateway}/24 dev {bridge} && ip link set {bridge} up"
            ),
        );
        let hosts = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let addr = Ipv4Addr::new(198, 19, net, i as u8 + 2);
                let route = format!("ip route add default via {gateway}");
                (self.plug(router, &bridge, name, addr, &route), addr)
            })
            .collect();
        (hosts, bridge)
    }

    /// A new namespace `name` with `addr`/24 on a veth whose other end is a port of `bridge` in
    /// namespace `owner`; `then` runs in the new namespace afterwards. Returns its name.
    fn plug(&mut self, owner: &str, bridge: &str, name: &str, addr: Ipv4Addr, then: &str) -> String {
        let ns = self.netns(name);
        self.links += 1;
        let (inside, port) = (
            format!("{}h{}", self.prefix, self.links),
            format!("{}s{}", self.prefix, self.links),
        );
        host(&[
            "ip", "link", "add", &inside, "netns", &ns, "type", "veth", "peer", "name", &port, "netns", owner,
        ]);
        self.sh(
            &ns,
            &format!("ip addr add {addr}/24 dev {inside} && ip link set {inside} up && {then}"),
        );
        self.sh(
            owner,
            &format!("ip link set {port} master {bridge} && ip link set {port} up"),
        );
        ns
    }

    /// Drop outbound traffic from namespace `ns` to `to` matching `what` (`"all"`, `"udp"`,
    /// `"tcp"`), with an nftables table `tmblock` that [`Lab::unblock`] removes.
    pub fn block(&self, ns: &str, to: Ipv4Addr, what: &str) {
        let what = match what {
            "all" => String::new(),
            proto => format!("meta l4proto {proto}"),
        };
        self.sh(
            ns,
            &format!(
                "nft add table inet tmblock && \
                 nft add chain inet tmblock out '{{ type filter hook output priority 0; policy accept; }}' && \
                 nft add rule inet tmblock out ip daddr {to} {what} drop"
            ),
        );
    }

    /// Remove every [`Lab::block`] of namespace `ns`.
    pub fn unblock(&self, ns: &str) {
        self.sh(ns, "nft delete table inet tmblock");
    }

    /// [`Lab::unblock`], also when nothing was blocked.
    pub fn unblock_quietly(&self, ns: &str) {
        let _ = self.sh_cmd(ns, "nft delete table inet tmblock 2>/dev/null").status();
    }

    /// Two namespaces `a` and `b` on one veth (198.18.`net`.1 / .2), a node in each, configured
    /// as each other's peer and started.
    pub fn pair(net: u8, opts_a: &NodeOptions, opts_b: &NodeOptions) -> (Lab, usize, usize) {
        Lab::pair_prepared(net, opts_a, opts_b, |_, _| {})
    }

    /// [`Lab::pair`], with `prepare` run on both ends — `[(namespace, veth)]` of a, then b —
    /// before the nodes are made and started (an underlay MTU, a sysctl).
    pub fn pair_prepared(
        net: u8,
        opts_a: &NodeOptions,
        opts_b: &NodeOptions,
        prepare: impl FnOnce(&Lab, [(&str, &str); 2]),
    ) -> (Lab, usize, usize) {
        let mut lab = Lab::new();
        let (na, nb) = (lab.netns("a"), lab.netns("b"));
        let (ua, ub) = (Ipv4Addr::new(198, 18, net, 1), Ipv4Addr::new(198, 18, net, 2));
        let (ia, ib) = lab.link(&na, ua, &nb, ub);
        prepare(&lab, [(&na, &ia), (&nb, &ib)]);
        let a = lab.node("a", &na, ua, 1, PORT);
        let b = lab.node("b", &nb, ub, 2, PORT);
        lab.configure(a, &[b], opts_a);
        lab.configure(b, &[a], opts_b);
        lab.start(a);
        lab.start(b);
        (lab, a, b)
    }
}

/// Poll `check` every 100 ms until it holds; how long that took. Panics after `timeout`.
pub fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return start.elapsed();
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: not within {timeout:?}");
}

impl Default for Lab {
    fn default() -> Self {
        Lab::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            if let Some(mut child) = self.nodes[i].process.take() {
                // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(3);
                while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
                    thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            if thread::panicking() {
                eprintln!("---- log of node {} ----\n{}", self.nodes[i].name, self.log(i));
            }
            // A killed daemon leaves every pin (shield, ACL, steering): remove the directory whole.
            let iface = &self.nodes[i].iface;
            let _ = fs::remove_dir_all(format!("/sys/fs/bpf/tunnelmesh/{iface}"));
            let _ = fs::remove_dir_all(format!("/run/tunnelmesh/{iface}"));
        }
        // The pin root goes with its last interface (it stays while another daemon uses it).
        let _ = fs::remove_dir("/sys/fs/bpf/tunnelmesh");
        for ns in self.namespaces.drain(..) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
}
