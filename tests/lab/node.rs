//! Lab nodes: a `tunnelmesh` daemon per namespace, its key and config, started, stopped and
//! asked for its status.

use super::*;

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
    pub(crate) log: PathBuf,
    pub(crate) process: Option<Child>,
    /// A command the daemon runs under (`setpriv …`), and variables added to its environment
    /// (systemd's); empty unless a test sets them.
    pub wrapper: Vec<String>,
    pub env: Vec<(String, String)>,
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

impl Lab {
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
            wrapper: Vec::new(),
            env: Vec::new(),
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
        self.spawn(i);
        self.wait_up(i);
    }

    /// Start node `i` from its static config; does not wait.
    pub fn spawn(&mut self, i: usize) {
        let args = vec![
            "up".to_string(),
            "--config".into(),
            self.nodes[i].config.display().to_string(),
        ];
        self.spawn_node(i, args);
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

    /// A fresh 0600 file in the lab's folder holding `token`, for `--token-file`.
    pub fn token_file(&self, token: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let path = tempfile::Builder::new()
            .prefix("token")
            .tempfile_in(self.dir.path())
            .expect("a token file")
            .into_temp_path()
            .keep()
            .expect("keep the token file");
        fs::write(&path, token).expect("write the token");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod 600");
        path.display().to_string()
    }

    /// Start node `i` joining the coordinator `c` and wait until it is up.
    pub fn join(&mut self, i: usize, c: &Coordinator, extra: &[&str]) {
        self.spawn_joining(i, c, extra);
        self.wait_up(i);
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
}
