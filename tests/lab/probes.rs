//! Probes through the lab: pings, TCP transfers with digests, reachability of ports.

use super::*;

impl Lab {
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
}
