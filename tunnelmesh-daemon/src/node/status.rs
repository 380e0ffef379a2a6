//! The local status socket: `tunnelmesh status` asks the running daemon over a unix socket.
//!
//! The daemon listens on `/run/tunnelmesh/<interface>.sock` (root only) and answers each
//! connection with one JSON document describing the interface, its peers and its counters.

use std::{
    io::{Read, Write},
    os::unix::{
        fs::PermissionsExt,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::device::{
    ControlState, Counters, Device, Event, PingAnswer, PingReport,
    policy::{Enforcement, PolicyStatus},
};
use crate::protocol::discovery::{Candidates, NatKind};
use crate::protocol::path::PathReport;
use crate::sys::tun::Offloads;

/// Directory of the status sockets.
pub const RUN_DIR: &str = "/run/tunnelmesh";

/// The status socket of `interface`: `RUN_DIR/INTERFACE/status.sock` (the folder is the unit's
/// per-instance `RuntimeDirectory=` under systemd).
pub fn socket_path(interface: &str) -> PathBuf {
    Path::new(RUN_DIR).join(interface).join(SOCKET)
}

const SOCKET: &str = "status.sock";

#[derive(Debug, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub fingerprint: String,
    /// The Noise static public key (base64), as WireGuard shows it.
    #[serde(rename = "public_key")]
    pub noise_public_key: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// Seconds since the last completed handshake, if any.
    pub last_handshake_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// The path traffic goes on: `udp`, `ssh` or `relay`.
    pub path: String,
    /// Every path the manager knows of: available, proven by a round trip, last probe RTT.
    pub paths: Vec<PathReport>,
    /// Where the peer's SSH transport listens, if it runs one.
    pub ssh_endpoint: Option<String>,
    /// Workers that opened data from this peer (one, with steering, whatever the peer's port).
    #[serde(default)]
    pub rx_workers: Vec<u32>,
    /// The peer's UDP candidates and NAT kind (from the coordinator), and hole punching so far.
    #[serde(default)]
    pub nat: Option<PeerNat>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PeerNat {
    pub kind: NatKind,
    pub candidates: Vec<String>,
    /// Punches started (asked for by either side).
    #[serde(rename = "punches")]
    pub punches_started: u64,
    /// Punches that ended in a direct path.
    #[serde(rename = "punched")]
    pub punches_succeeded: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct FastpathStatus {
    /// Whether the shield runs in the kernel (`ebpf`) or not (`userspace`).
    pub enforcement: Enforcement,
    /// The interfaces the kernel shield guards, each with its hook.
    pub shield_on: Vec<ShieldOn>,
    pub shield: std::collections::BTreeMap<String, u64>,
    pub error: Option<String>,
    /// How inbound data reaches the workers.
    #[serde(default)]
    pub steering: SteeringMode,
}

/// One interface the kernel shield guards.
#[derive(Debug, Serialize, Deserialize)]
pub struct ShieldOn {
    pub interface: String,
    pub hook: crate::fastpath::Hook,
}

/// How inbound data reaches the workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SteeringMode {
    /// By session, with the `SK_REUSEPORT` program.
    Ebpf,
    /// The kernel's 4-tuple hash.
    #[default]
    Hash,
}

impl std::fmt::Display for SteeringMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SteeringMode::Ebpf => "ebpf",
            SteeringMode::Hash => "hash",
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub interface: String,
    pub addresses: Vec<String>,
    /// False where the host has IPv6 disabled: the mesh runs over IPv4 only.
    #[serde(default = "ipv6_assumed")]
    pub ipv6: bool,
    pub coordinator: Option<ControlState>,
    /// Inbound policy: `null` in a static mesh (every configured peer may connect), else the
    /// rules in force (none: nothing may reach this node), the enforcer and its counters.
    pub policy: Option<PolicyStatus>,
    pub fingerprint: String,
    /// The Noise static public key (base64), as WireGuard shows it.
    #[serde(rename = "public_key")]
    pub noise_public_key: String,
    pub listen_port: u16,
    pub mtu: usize,
    /// TUN offloads in use (`off`, `vnet_header`, `tso`, `tso_uso`).
    #[serde(default = "offloads_unknown")]
    pub offloads: Offloads,
    pub uptime_secs: u64,
    pub counters: std::collections::BTreeMap<String, u64>,
    pub fastpath: FastpathStatus,
    /// This node's UDP candidates and the NAT in front of it, learned from the tunnel socket.
    #[serde(default)]
    pub nat: Candidates,
    /// The gateway's port mapping for our tunnel port, if one holds.
    #[serde(default)]
    pub port_mapping: Option<crate::nat::portmap::Mapping>,
    pub peers: Vec<PeerStatus>,
}

/// A daemon from before this field always configured IPv6.
fn ipv6_assumed() -> bool {
    true
}

/// A daemon from before offloads existed had none.
fn offloads_unknown() -> Offloads {
    Offloads::Off
}

/// Build the status document.
pub fn snapshot(dev: &Device, fastpath: &dyn Fn() -> FastpathStatus) -> Status {
    let unix_now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let counters = dev.counters.by_name();
    Status {
        interface: dev.info.interface.clone(),
        addresses: dev.info.addresses.iter().map(|a| a.to_string()).collect(),
        ipv6: dev.info.ipv6,
        coordinator: dev.coordinator.state.load().as_deref().cloned(),
        policy: dev.policy.status(),
        fingerprint: dev.info.local.fingerprint(),
        noise_public_key: dev.info.local.noise_public_base64(),
        listen_port: dev.info.listen_port,
        mtu: dev.info.mtu,
        offloads: dev.info.offloads,
        uptime_secs: dev.info.started.elapsed().as_secs(),
        counters,
        fastpath: fastpath(),
        nat: (**dev.reach.candidates.load()).clone(),
        port_mapping: dev.reach.port_mapping.load().as_deref().cloned(),
        peers: dev
            .peers
            .load()
            .peers
            .iter()
            .map(|p| {
                let hs = p.last_handshake_unix.load(Ordering::Relaxed);
                PeerStatus {
                    name: p.name.clone(),
                    fingerprint: p.identity.fingerprint(),
                    noise_public_key: p.identity.noise_public_base64(),
                    endpoint: p.endpoint.load().as_deref().map(|e| e.to_string()),
                    allowed_ips: p.allowed_ips.iter().map(|n| n.to_string()).collect(),
                    last_handshake_secs: (hs != 0).then(|| unix_now.saturating_sub(hs)),
                    rx_bytes: p.rx_bytes.load(Ordering::Relaxed),
                    tx_bytes: p.tx_bytes.load(Ordering::Relaxed),
                    path: p.path().name().to_string(),
                    paths: (**p.paths.load()).clone(),
                    ssh_endpoint: p.ssh_endpoint.map(|e| e.to_string()),
                    rx_workers: {
                        let mask = p.rx_workers.load(Ordering::Relaxed);
                        (0..64).filter(|w| mask & (1 << w) != 0).collect()
                    },
                    nat: Some({
                        let remote = p.remote.load();
                        PeerNat {
                            kind: remote.nat,
                            candidates: remote.endpoints.iter().map(|e| e.to_string()).collect(),
                            punches_started: p.punches_started.load(Ordering::Relaxed),
                            punches_succeeded: p.punches_succeeded.load(Ordering::Relaxed),
                        }
                    }),
                }
            })
            .collect(),
    }
}

/// What a client asks, as one JSON line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Probe every path to a peer (`tunnelmesh ping`).
    Ping {
        peer: String,
    },
}

/// Serve requests until the device shuts down.
pub fn serve(dev: Arc<Device>, listener: UnixListener, fastpath: Arc<dyn Fn() -> FastpathStatus + Send + Sync>) {
    let _ = listener.set_nonblocking(true);
    while !dev.shutdown.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(&stream), &mut line);
                let doc = match serde_json::from_str::<Request>(line.trim()) {
                    Ok(Request::Ping { peer }) => {
                        // Answered by the slow path; a slow ping never blocks status.
                        let dev = dev.clone();
                        std::thread::spawn(move || {
                            let doc = serde_json::to_vec(&ping(&dev, peer)).unwrap_or_default();
                            answer(&mut stream, &doc);
                        });
                        continue;
                    }
                    _ => serde_json::to_vec(&snapshot(&dev, &*fastpath)).unwrap_or_default(),
                };
                answer(&mut stream, &doc);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// How long a client may take to read its answer before the daemon gives up on it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// Write `doc` to a client within [`WRITE_TIMEOUT`]: one that never reads cannot hold the
/// status thread (and with it shutdown).
fn answer(stream: &mut UnixStream, doc: &[u8]) {
    let deadline = std::time::Instant::now() + WRITE_TIMEOUT;
    let mut rest = doc;
    while !rest.is_empty() {
        // The socket's timeout bounds each write; the deadline bounds them all.
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || stream.set_write_timeout(Some(left)).is_err() {
            return;
        }
        match stream.write(rest) {
            Ok(0) => return,
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn ping(dev: &Device, peer: String) -> PingAnswer {
    let (answer, result) = crossbeam_channel::bounded(1);
    dev.events
        .send_timeout(Event::Ping { peer, answer }, Duration::from_secs(1))
        .map_err(|_| "the daemon is too busy to ping".to_string())?;
    result
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| "no answer from the daemon".to_string())?
}

/// Bind the status socket for `interface`, readable by the owner and the group (the
/// `tunnelmesh` group under systemd). Where systemd gives a `$RUNTIME_DIRECTORY`, it goes there.
pub fn bind(interface: &str) -> std::io::Result<(UnixListener, PathBuf)> {
    let path = match crate::service::directory("RUNTIME_DIRECTORY") {
        Some(dir) => {
            if dir.join(SOCKET) != socket_path(interface) {
                tracing::warn!(
                    runtime_directory = %dir.display(),
                    "the status socket is not under {RUN_DIR}/{interface}, so `tunnelmesh status` will not find it; \
                     name the unit's instance after the interface"
                );
            }
            dir.join(SOCKET)
        }
        None => socket_path(interface),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))?;
    Ok((listener, path))
}

/// Why `tunnelmesh status` or `ping` got no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(
        "cannot reach the daemon of {interface} at {path}: {source}; is `tunnelmesh up` running (and are you root)?"
    )]
    Unreachable {
        interface: String,
        path: String,
        source: std::io::Error,
    },
    #[error("talking to the daemon failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon sent an unreadable answer: {0}")]
    Unreadable(#[from] serde_json::Error),
    /// The daemon answered, with an error (`ping`: no such peer, no session yet, busy).
    #[error("{0}")]
    Daemon(String),
}

/// Ask the daemon of `interface` for its status.
pub fn query(interface: &str) -> Result<Status, QueryError> {
    request(interface, &Request::Status)
}

/// Ask the daemon of `interface` to ping `peer` on every path.
pub fn query_ping(interface: &str, peer: &str) -> Result<PingReport, QueryError> {
    // The answer travels as `PingAnswer` (the status socket's JSON).
    request::<PingAnswer>(interface, &Request::Ping { peer: peer.into() })?.map_err(QueryError::Daemon)
}

fn request<T: serde::de::DeserializeOwned>(interface: &str, request: &Request) -> Result<T, QueryError> {
    let path = socket_path(interface);
    let mut stream = UnixStream::connect(&path).map_err(|source| QueryError::Unreachable {
        interface: interface.into(),
        path: path.display().to_string(),
        source,
    })?;
    let mut line = serde_json::to_vec(request).expect("requests serialize");
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut doc = Vec::new();
    stream.read_to_end(&mut doc)?;
    Ok(serde_json::from_slice(&doc)?)
}

/// Interfaces that have a status socket.
pub fn running_interfaces() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(RUN_DIR)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            e.path()
                .join(SOCKET)
                .exists()
                .then(|| e.file_name().into_string().ok())?
        })
        .collect();
    names.sort();
    names
}

impl Counters {
    /// Counter snapshot by name (for tests and tooling).
    pub fn by_name(&self) -> std::collections::BTreeMap<String, u64> {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Security item 22: a client that asks and never reads used to block the status thread
    /// (and shutdown, which waits for it) for good once the socket buffer filled.
    #[test]
    fn a_client_that_never_reads_holds_the_status_thread_no_longer_than_the_write_timeout() {
        let (mut daemon_side, _client_side) = UnixStream::pair().unwrap();
        let doc = vec![b'x'; 8 << 20];
        let started = std::time::Instant::now();
        answer(&mut daemon_side, &doc);
        let took = started.elapsed();
        assert!(
            took >= WRITE_TIMEOUT && took < WRITE_TIMEOUT + Duration::from_secs(2),
            "took {took:?}"
        );
    }
}
