//! The test lab: real `tunnelmesh` binaries in network namespaces joined by veth pairs.
//!
//! A [`Lab`] owns everything it creates — namespaces (with their veths), daemons, temporary keys
//! and configs, and any BPF pins or status sockets a killed daemon left — and removes all of it
//! on drop, also when a test panics. Namespace and interface names carry a per-lab prefix so labs
//! never collide. Underlays use the 198.18.0.0/15 benchmark range; all traffic stays inside the
//! lab's namespaces. A lab that cannot be built panics: tests never skip.

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
fn spawn_in(ns: &str, args: &[String], log: &Path) -> Child {
    let log = File::options().create(true).append(true).open(log).expect("log file");
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(bin())
        .args(args)
        .env("RUST_LOG", "info,tunnelmesh=debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin().display()))
}

/// One `tunnelmesh` node: its namespace, key, addresses and (when running) its process.
pub struct Node {
    pub name: String,
    pub ns: String,
    pub iface: String,
    pub key: PathBuf,
    pub public_line: String,
    pub mesh4: Ipv4Addr,
    pub mesh6: Ipv6Addr,
    pub underlay: Ipv4Addr,
    pub port: u16,
    pub config: PathBuf,
    log: PathBuf,
    process: Option<Child>,
}

impl Node {
    /// Socket address other nodes reach this one at.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.underlay, self.port)
    }
}

/// What a node's config says beyond its peers.
#[derive(Clone)]
pub struct NodeOptions {
    pub mesh_key: [u8; 32],
    pub no_ebpf: bool,
    pub workers: usize,
    pub extra: String,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            mesh_key: [7; 32],
            no_ebpf: false,
            workers: 0,
            extra: String::new(),
        }
    }
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

    /// Whether `count` pings from `ns` to `dst` all succeed within `wait` seconds each.
    pub fn ping(&self, ns: &str, dst: &str, count: u32) -> bool {
        self.sh_cmd(ns, &format!("ping -n -q -c {count} -i 0.2 -W 2 {dst}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Ping `dst` from `ns` ten times a second for three seconds while `during` runs; ping's
    /// summary. Used to show that something (a restart, a rotation) costs no packet.
    pub fn ping_while(&self, ns: &str, dst: &str, during: impl FnOnce()) -> String {
        let pinger = self
            .sh_cmd(ns, &format!("ping -n -q -c 30 -i 0.1 {dst}"))
            .stdout(Stdio::piped())
            .spawn()
            .expect("ping runs");
        thread::sleep(Duration::from_millis(500));
        during();
        let out = pinger.wait_with_output().expect("ping finishes");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Ping until one reply arrives or `timeout` passes; returns the time it took.
    pub fn ping_until_reply(&self, ns: &str, dst: &str, timeout: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let ok = self
                .sh_cmd(ns, &format!("ping -n -q -c 1 -W 1 {dst}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Some(start.elapsed());
            }
        }
        None
    }

    /// Add a node in namespace `ns`: a fresh ed25519 key from `ssh-keygen`, mesh address
    /// 10.99.0.`index` / fd99::`index`.
    pub fn node(&mut self, name: &str, ns: &str, underlay: Ipv4Addr, index: u8, port: u16) -> usize {
        let key = self.dir.path().join(format!("{name}_ed25519"));
        host(&[
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            &format!("root@{name}"),
            "-f",
            key.to_str().unwrap(),
        ]);
        let public_line = fs::read_to_string(key.with_extension("pub")).unwrap_or_else(|_| {
            fs::read_to_string(format!("{}.pub", key.display())).expect("ssh-keygen wrote the public key")
        });
        let node = Node {
            iface: format!("{}{name}", self.prefix),
            ns: ns.to_string(),
            name: name.to_string(),
            public_line: public_line.trim().to_string(),
            mesh4: Ipv4Addr::new(10, 99, 0, index),
            mesh6: format!("fd99::{index}").parse().unwrap(),
            underlay,
            port,
            config: self.dir.path().join(format!("{name}.toml")),
            log: self.dir.path().join(format!("{name}.log")),
            key,
            process: None,
        };
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Write node `i`'s config listing `peers` (indices) as its peers.
    pub fn configure(&self, i: usize, peers: &[usize], opts: &NodeOptions) {
        let with_endpoints: Vec<(usize, String)> = peers.iter().map(|&p| (p, self.nodes[p].endpoint())).collect();
        self.configure_with_endpoints(i, &with_endpoints, opts);
    }

    /// Write node `i`'s config listing `peers` with the endpoint to reach each at.
    pub fn configure_with_endpoints(&self, i: usize, peers: &[(usize, String)], opts: &NodeOptions) {
        let n = &self.nodes[i];
        let mut text = format!(
            "[interface]\nname = \"{}\"\nmesh_key = \"{}\"\naddresses = [\"{}/24\", \"{}/64\"]\nlisten_port = {}\nno_ebpf = {}\nworkers = {}\n{}\n",
            n.iface,
            BASE64.encode(opts.mesh_key),
            n.mesh4,
            n.mesh6,
            n.port,
            opts.no_ebpf,
            opts.workers,
            opts.extra
        );
        for (p, endpoint) in peers {
            let peer = &self.nodes[*p];
            text += &format!(
                "\n[[peer]]\npublic_key = \"{}\"\nendpoint = \"{}\"\nallowed_ips = [\"{}/32\", \"{}/128\"]\n",
                peer.public_line, endpoint, peer.mesh4, peer.mesh6
            );
        }
        fs::write(&n.config, text).expect("write config");
    }

    /// Start node `i` from its static config and wait until its status socket answers.
    pub fn start(&mut self, i: usize) {
        let args = vec![
            "up".to_string(),
            "--config".into(),
            self.nodes[i].config.display().to_string(),
        ];
        self.spawn_node(i, args);
        self.wait_up(i);
    }

    /// Start node `i` joining the coordinator `c`, with `extra` arguments; does not wait.
    pub fn spawn_joining(&mut self, i: usize, c: &Coordinator, extra: &[&str]) {
        let n = &self.nodes[i];
        let mut args: Vec<String> = [
            "up",
            "--coordinator",
            &c.url,
            "--fingerprint",
            &c.fingerprint,
            "--interface",
            &n.iface,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(["--listen-port".to_string(), n.port.to_string(), "--state-dir".into()]);
        args.push(self.dir.path().join("state").display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn_node(i, args);
    }

    /// Start node `i` joining the coordinator `c` and wait until it is up.
    pub fn join(&mut self, i: usize, c: &Coordinator, extra: &[&str]) {
        self.spawn_joining(i, c, extra);
        self.wait_up(i);
    }

    fn spawn_node(&mut self, i: usize, mut args: Vec<String>) {
        let n = &self.nodes[i];
        args.extend(["--identity".to_string(), n.key.display().to_string()]);
        let child = spawn_in(&n.ns, &args, &n.log);
        self.nodes[i].process = Some(child);
    }

    /// Wait until node `i` answers on its status socket.
    pub fn wait_up(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.try_status(i).is_some() {
                return;
            }
            if let Some(status) = self.nodes[i].process.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("node {} exited with {status}:\n{}", self.nodes[i].name, self.log(i));
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!("node {} did not come up:\n{}", self.nodes[i].name, self.log(i));
    }

    /// Wait for node `i` to exit by itself; its exit success and log.
    pub fn wait_exit(&mut self, i: usize, timeout: Duration) -> (bool, String) {
        let deadline = Instant::now() + timeout;
        let mut child = self.nodes[i].process.take().expect("node was started");
        loop {
            if let Some(status) = child.try_wait().ok().flatten() {
                return (status.success(), self.log(i));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "node {} did not exit within {timeout:?}:\n{}",
                    self.nodes[i].name,
                    self.log(i)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop node `i` with SIGTERM (clean shutdown) and wait for it.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].process.take() {
            // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("node {} did not stop within 5 s of SIGTERM", self.nodes[i].name);
        }
    }

    /// Kill node `i` with SIGKILL (no cleanup by the daemon).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Process id of node `i`'s daemon, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].process.as_ref().map(Child::id)
    }

    /// The daemon's log so far.
    pub fn log(&self, i: usize) -> String {
        fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
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

    /// `tunnelmesh status --json` of node `i`.
    pub fn status(&self, i: usize) -> Value {
        self.try_status(i)
            .unwrap_or_else(|| panic!("status of {} unavailable:\n{}", self.nodes[i].name, self.log(i)))
    }

    /// A counter of node `i`.
    pub fn counter(&self, i: usize, name: &str) -> u64 {
        self.status(i)["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// Status entry of `peer` as seen by node `i`.
    pub fn peer_status(&self, i: usize, peer: usize) -> Value {
        let fingerprint = self.fingerprint(peer);
        self.status(i)["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["fingerprint"] == fingerprint.as_str()).cloned())
            .unwrap_or_else(|| panic!("{} has no peer {}", self.nodes[i].name, self.nodes[peer].name))
    }

    /// `SHA256:…` of node `i`, from `ssh-keygen -lf`.
    pub fn fingerprint(&self, i: usize) -> String {
        let out = host(&["ssh-keygen", "-lf", self.nodes[i].key.to_str().unwrap()]);
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string()
    }

    /// Run `f` on a thread inside namespace `ns` (sockets it creates live in that namespace).
    pub fn in_netns<T: Send + 'static>(
        &self,
        ns: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        let file = File::open(format!("/run/netns/{ns}")).expect("namespace exists");
        thread::spawn(move || {
            // SAFETY: `file` is an open namespace descriptor; setns only changes this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// Send `bytes` of pseudo-random data over TCP from node `from` to node `to` through the
    /// tunnel; returns (sent hash, received hash, seconds).
    pub fn tcp_transfer(&self, from: usize, to: usize, bytes: usize) -> ([u8; 32], [u8; 32], f64) {
        let dst = self.nodes[to].mesh4;
        let listener = self
            .in_netns(&self.nodes[to].ns, move || {
                std::net::TcpListener::bind((dst, 5001)).expect("bind in namespace")
            })
            .join()
            .unwrap();
        let receiver = thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match stream.read(&mut buf).expect("read") {
                    0 => break,
                    n => hash.update(&buf[..n]),
                }
            }
            <[u8; 32]>::from(hash.finalize())
        });
        let stream = self
            .in_netns(&self.nodes[from].ns, move || {
                std::net::TcpStream::connect_timeout(&(dst, 5001).into(), Duration::from_secs(10))
            })
            .join()
            .unwrap()
            .expect("connect through the tunnel");
        let start = Instant::now();
        let mut stream = stream;
        let mut hash = Sha256::new();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut chunk = vec![0u8; 1 << 16];
        let mut left = bytes;
        while left > 0 {
            for word in chunk.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
            }
            let n = left.min(chunk.len());
            stream.write_all(&chunk[..n]).expect("write through the tunnel");
            hash.update(&chunk[..n]);
            left -= n;
        }
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let received = receiver.join().expect("receiver");
        (hash.finalize().into(), received, start.elapsed().as_secs_f64())
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

    /// Start a coordinator in namespace `ns` listening on `addr`:8443 with `extra` arguments.
    pub fn coordinator(&mut self, ns: &str, addr: Ipv4Addr, extra: &[&str]) -> Coordinator {
        let data_dir = self.dir.path().join("coordinator");
        let mut c = Coordinator {
            ns: ns.to_string(),
            url: format!("https://{addr}:8443"),
            listen: format!("{addr}:8443"),
            data_dir,
            fingerprint: String::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            log: self.dir.path().join("coordinator.log"),
            process: None,
        };
        c.start();
        c
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

    /// Start a coordinator at `host` admitting `authorized_keys`, with `policy` (written to the
    /// lab's `policy.toml`, which tests may edit while it runs) and `extra` arguments.
    pub fn coordinator_with_policy(
        &mut self,
        host: &(String, Ipv4Addr),
        authorized: &Path,
        policy: &str,
        extra: &[&str],
    ) -> Coordinator {
        let path = self.dir.path().join("policy.toml");
        fs::write(&path, policy).unwrap();
        let mut args = vec![
            "--authorized-keys",
            authorized.to_str().unwrap(),
            "--policy",
            path.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.coordinator(&host.0, host.1, &args)
    }

    /// The path node `i` sends to `peer` on (`udp`, `ssh`, `relay`), from its status.
    pub fn peer_path(&self, i: usize, peer: usize) -> String {
        self.peer_status(i, peer)["path"].as_str().unwrap_or("").to_string()
    }

    /// Mesh addresses (IPv4, IPv6) of node `i`, from its status.
    pub fn mesh_addrs(&self, i: usize) -> (String, String) {
        let st = self.status(i);
        let addrs: Vec<String> = st["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().split('/').next().unwrap().to_string())
            .collect();
        (addrs[0].clone(), addrs[1].clone())
    }

    /// Whether a TCP connection from `from_ns` to `addr:port` (a listener in `to_ns`) opens and
    /// carries an echo both ways within two seconds.
    pub fn tcp_reaches(&self, from_ns: &str, to_ns: &str, addr: &str, port: u16) -> bool {
        let target = std::net::SocketAddr::new(addr.parse().unwrap(), port);
        let listener = self
            .in_netns(to_ns, move || std::net::TcpListener::bind(target).expect("bind"))
            .join()
            .unwrap();
        listener.set_nonblocking(false).unwrap();
        let server = std::thread::spawn(move || {
            listener.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok((mut s, _)) = listener.accept() {
                    s.set_nonblocking(false).unwrap();
                    let mut b = [0u8; 4];
                    if s.read_exact(&mut b).is_ok() {
                        let _ = s.write_all(&b);
                    }
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let ok = self
            .in_netns(from_ns, move || {
                let Ok(mut s) = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
                    return false;
                };
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut b = [0u8; 4];
                s.write_all(b"ping").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"ping"
            })
            .join()
            .unwrap();
        server.join().unwrap();
        ok
    }

    /// Whether a UDP datagram from `from_ns` to `addr:port` (a socket in `to_ns`) is answered
    /// within two seconds (three tries).
    pub fn udp_reaches(&self, from_ns: &str, to_ns: &str, addr: &str, port: u16) -> bool {
        let target = std::net::SocketAddr::new(addr.parse().unwrap(), port);
        let server = self
            .in_netns(to_ns, move || std::net::UdpSocket::bind(target).expect("bind"))
            .join()
            .unwrap();
        server.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let echo = thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(3);
            let mut b = [0u8; 64];
            while Instant::now() < deadline {
                if let Ok((n, from)) = server.recv_from(&mut b) {
                    let _ = server.send_to(&b[..n], from);
                }
            }
        });
        let unspecified = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let ok = self
            .in_netns(from_ns, move || {
                let s = std::net::UdpSocket::bind(unspecified).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(600))).unwrap();
                let mut b = [0u8; 64];
                (0..3).any(|_| {
                    s.send_to(b"ping", target).is_ok() && s.recv_from(&mut b).is_ok_and(|(n, _)| &b[..n] == b"ping")
                })
            })
            .join()
            .unwrap();
        echo.join().unwrap();
        ok
    }

    /// Two namespaces `a` and `b` on one veth (198.18.`net`.1 / .2), a node in each, configured
    /// as each other's peer and started.
    pub fn pair(net: u8, opts_a: &NodeOptions, opts_b: &NodeOptions) -> (Lab, usize, usize) {
        let mut lab = Lab::new();
        let (na, nb) = (lab.netns("a"), lab.netns("b"));
        let (ua, ub) = (Ipv4Addr::new(198, 18, net, 1), Ipv4Addr::new(198, 18, net, 2));
        lab.link(&na, ua, &nb, ub);
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

/// The per-CPU counters of the pinned array PIN, read with bpftool and summed over CPUs, by key.
pub fn percpu_sums(pin: &str) -> std::collections::BTreeMap<u64, u64> {
    bpftool_dump(pin)
        .as_array()
        .expect("bpftool prints an array")
        .iter()
        .map(|entry| {
            // With BTF, bpftool prints typed entries under "formatted".
            let e = entry.get("formatted").unwrap_or(entry);
            let sum = e["values"]
                .as_array()
                .expect("per-CPU values")
                .iter()
                .map(|v| v["value"].as_u64().unwrap_or(0))
                .sum();
            (e["key"].as_u64().expect("u32 key"), sum)
        })
        .collect()
}

/// `bpftool -j map dump pinned PIN`, parsed.
pub fn bpftool_dump(pin: &str) -> Value {
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned", pin])
        .output()
        .expect("bpftool is installed");
    assert!(
        out.status.success(),
        "bpftool map dump pinned {pin}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("bpftool prints JSON")
}

/// A coordinator process of the lab.
pub struct Coordinator {
    pub ns: String,
    pub url: String,
    pub listen: String,
    pub data_dir: PathBuf,
    pub fingerprint: String,
    extra: Vec<String>,
    log: PathBuf,
    process: Option<Child>,
}

impl Coordinator {
    /// Start (or restart) and wait until it serves; learns its fingerprint.
    pub fn start(&mut self) {
        let mut args: Vec<String> = [
            "coordinator",
            "--data-dir",
            self.data_dir.to_str().unwrap(),
            "--listen",
            &self.listen,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(self.extra.iter().cloned());
        // Only what this start logs counts (a restart appends to the same file).
        let skip = fs::metadata(&self.log).map_or(0, |m| m.len() as usize);
        let child = spawn_in(&self.ns, &args, &self.log);
        self.process = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let log = fs::read_to_string(&self.log)
                .unwrap_or_default()
                .get(skip..)
                .unwrap_or_default()
                .to_string();
            if let Some(fp) = log.lines().find_map(|l| l.strip_prefix("TLS fingerprint: ")) {
                self.fingerprint = fp.trim().to_string();
                return;
            }
            if let Some(status) = self.process.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("coordinator exited with {status}:\n{log}");
            }
            assert!(Instant::now() < deadline, "coordinator did not come up:\n{log}");
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Send `signal` (e.g. `libc::SIGHUP`) to the running coordinator.
    pub fn signal(&self, signal: i32) {
        let pid = self.process.as_ref().expect("coordinator runs").id();
        // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
        assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
    }

    /// SIGKILL, no cleanup.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.process.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Run `tunnelmesh coordinator ARGS --data-dir …` (operator commands); its output.
    pub fn admin(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("coordinator")
            .args(args)
            .args(["--data-dir", self.data_dir.to_str().unwrap()])
            .output()
            .expect("run tunnelmesh coordinator")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("---- coordinator log ----\n{}", self.log());
        }
        self.kill();
    }
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
            let iface = &self.nodes[i].iface;
            let _ = fs::remove_file(format!("/sys/fs/bpf/tunnelmesh/{iface}/shield_counters"));
            let _ = fs::remove_dir(format!("/sys/fs/bpf/tunnelmesh/{iface}"));
            let _ = fs::remove_file(format!("/run/tunnelmesh/{iface}.sock"));
        }
        for ns in self.namespaces.drain(..) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
    }
}
