//! A coordinator process of the lab.

use super::*;

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
        let child = spawn_in(&self.ns, &[], &args, &self.log, &[]);
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

impl Lab {
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
}
