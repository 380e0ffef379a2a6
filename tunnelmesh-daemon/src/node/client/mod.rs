//! The peer side of the coordinator protocol: join, follow pushed updates, keep a cache.
//!
//! `tunnelmesh up --coordinator URL --fingerprint SHA256:…` joins (proving key possession with an
//! SSHSIG over the coordinator's challenge), brings the interface up from the welcome, and then
//! applies every pushed change to the running device. The last state is cached on disk, so a
//! restart while the coordinator is down still brings the mesh up; established tunnels never
//! depend on the coordinator. Connection loss is retried with exponential backoff and jitter.

mod pinning;

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use futures_util::{SinkExt, StreamExt};
use ipnet::IpNet;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::{
    control::proto::{CONNECT_PATH, ClientMsg, JOIN_NAMESPACE, NodeInfo, PeerInfo, ServerMsg},
    device::{ConnectionState, ControlState, CoordinatorRequest, Device, Event, PeerSpec, Via},
    identity::{Identity, PublicIdentity},
    node::interface::{Interface, InterfacePlan},
    policy::NodePolicy,
    protocol::discovery::{Candidates, NatKind},
    protocol::noise::MeshKey,
};

/// Default directory of the peer's cached state.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tunnelmesh";
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Messages queued for the relay before new ones are dropped.
const RELAY_QUEUE: usize = 1024;
/// The coordinator pings every 15 s; this long without a word means the connection is dead.
const SILENCE: Duration = Duration::from_secs(45);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Options of `tunnelmesh up --coordinator`.
pub struct JoinOptions {
    pub url: String,
    pub fingerprint: String,
    pub token: Option<String>,
    pub name: Option<String>,
    pub interface: String,
    pub listen_port: u16,
    pub mtu: usize,
    pub workers: usize,
    pub state_dir: PathBuf,
    pub no_ebpf: bool,
    /// Turn off TUN offloads.
    pub no_offload: bool,
    /// TCP port of the SSH transport (0: do not run one).
    pub ssh_port: u16,
    pub port_mapping: crate::nat::portmap::Mode,
    pub port_mapping_lifetime: Duration,
}

/// What the coordinator told us, as cached on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeshState {
    pub node: NodeInfo,
    pub mesh_keys: Vec<String>,
    pub ipv4_prefix: String,
    pub ipv6_prefix: String,
    pub peers: BTreeMap<String, PeerInfo>,
    /// This node's inbound rules (default deny).
    #[serde(default)]
    pub policy: NodePolicy,
    /// The coordinator's first STUN port (0: it runs none).
    #[serde(default)]
    pub stun_port: u16,
}

/// Why the coordinator will not have this node: the operator must act, retrying cannot help.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The certificate is not the pinned one.
    #[error(transparent)]
    Certificate(#[from] pinning::PinMismatch),
    /// The coordinator refused the hello (unknown key, bad token, revoked at the door…).
    #[error("the coordinator refused this node: {0}")]
    Refused(String),
    /// The node was revoked while connected.
    #[error("{0}")]
    Revoked(String),
}

impl MeshState {
    fn apply(&mut self, msg: ServerMsg) -> Result<bool> {
        match msg {
            ServerMsg::PeerUpsert { peer } => {
                self.peers.insert(peer.fingerprint.clone(), peer);
            }
            ServerMsg::PeerRemoved { fingerprint } => {
                self.peers.remove(&fingerprint);
            }
            ServerMsg::MeshKeys { mesh_keys } => self.mesh_keys = mesh_keys,
            ServerMsg::Policy { policy } => self.policy = policy,
            ServerMsg::Revoked { message } => return Err(Refusal::Revoked(message).into()),
            ServerMsg::Error { message } => bail!("coordinator error: {message}"),
            ServerMsg::Challenge { .. }
            | ServerMsg::Welcome { .. }
            | ServerMsg::Peers { .. }
            | ServerMsg::Punch { .. } => return Ok(false),
        }
        Ok(true)
    }

    fn mesh_keys(&self) -> Result<Vec<MeshKey>> {
        self.mesh_keys
            .iter()
            .map(|k| {
                let bytes = BASE64
                    .decode(k)
                    .map_err(|_| anyhow!("the coordinator sent a mesh key that is not base64"))?;
                let key: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| anyhow!("the coordinator sent a mesh key that is not 32 bytes"))?;
                Ok(Zeroizing::new(key))
            })
            .collect()
    }

    fn peer_specs(&self) -> Vec<PeerSpec> {
        self.peers
            .values()
            .filter_map(|p| {
                let identity = PublicIdentity::from_ssh_line(&p.public_key).ok()?;
                let allowed_ips = vec![
                    format!("{}/32", p.ipv4).parse().ok()?,
                    format!("{}/128", p.ipv6).parse().ok()?,
                ];
                let candidates = udp_endpoints(&p.endpoints);
                Some(PeerSpec {
                    name: p.name.clone(),
                    identity,
                    allowed_ips,
                    // Only a peer not behind NAT may be sent to unprompted: a datagram reaching a
                    // NAT before the peer has sent through it can spoil the mapping (see `nat`).
                    endpoint: candidates.first().copied().filter(|_| p.nat == NatKind::None),
                    candidates,
                    nat: p.nat,
                    // The address a NAT'd peer's connection came from takes no connections.
                    ssh_endpoint: p
                        .endpoints
                        .iter()
                        .find_map(|e| e.strip_prefix("ssh://")?.parse::<SocketAddr>().ok())
                        .filter(|_| p.nat == NatKind::None),
                    persistent_keepalive: None,
                })
            })
            .collect()
    }

    fn addresses(&self) -> Result<Vec<IpNet>> {
        let v4_len = self.ipv4_prefix.parse::<IpNet>()?.prefix_len();
        let v6_len = self.ipv6_prefix.parse::<IpNet>()?.prefix_len();
        Ok(vec![
            format!("{}/{v4_len}", self.node.ipv4).parse()?,
            format!("{}/{v6_len}", self.node.ipv6).parse()?,
        ])
    }

    fn load(path: &Path) -> Option<Self> {
        serde_json::from_slice(&fs::read(path).ok()?).ok()
    }

    /// Write atomically, readable by root only (it holds the mesh key).
    fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        }
        let tmp = path.with_extension("tmp");
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        std::io::Write::write_all(&mut file, &serde_json::to_vec_pretty(self)?)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(())
    }
}

/// The coordinator client of one node.
pub struct Client {
    url: String,
    host_port: String,
    tls: Arc<rustls::ClientConfig>,
    identity: Arc<Identity>,
    token: Option<String>,
    name: Option<String>,
    listen_port: u16,
    ssh_port: u16,
    /// What the hello tells about our UDP candidates (the device's latest before a rejoin).
    candidates: arc_swap::ArcSwap<Candidates>,
}

/// An open, authenticated connection to the coordinator.
pub type Socket = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl Client {
    pub fn new(opts: &JoinOptions, identity: Arc<Identity>) -> Result<Self> {
        let rest = opts
            .url
            .strip_prefix("https://")
            .ok_or_else(|| anyhow!("--coordinator {} must be an https:// URL", opts.url))?;
        let host_port = rest.trim_end_matches('/').to_string();
        if host_port.is_empty() || host_port.contains('/') {
            bail!("--coordinator {} must look like https://HOST:PORT", opts.url);
        }
        if !opts.fingerprint.starts_with("SHA256:") {
            bail!(
                "--fingerprint must be the SHA256:… fingerprint the coordinator prints (`tunnelmesh coordinator info`)"
            );
        }
        Ok(Client {
            url: opts.url.clone(),
            host_port,
            tls: Arc::new(pinning::PinnedCertificate::client_config(&opts.fingerprint)),
            identity,
            token: opts.token.clone(),
            name: opts.name.clone(),
            listen_port: opts.listen_port,
            ssh_port: opts.ssh_port,
            candidates: Default::default(),
        })
    }

    /// Connect, prove our key, and return the welcome with the open socket.
    async fn join(&self) -> Result<(MeshState, Socket)> {
        let (parts, ws) = self.join_raw().await?;
        let mut state: Option<MeshState> = None;
        for part in parts {
            match (
                serde_json::from_str(&part).context("unreadable welcome from the coordinator")?,
                &mut state,
            ) {
                (
                    ServerMsg::Welcome {
                        node,
                        mesh_keys,
                        ipv4_prefix,
                        ipv6_prefix,
                        peers,
                        policy,
                        stun_port,
                        ..
                    },
                    None,
                ) => {
                    let peers = peers.into_iter().map(|p| (p.fingerprint.clone(), p)).collect();
                    state = Some(MeshState {
                        node,
                        mesh_keys,
                        ipv4_prefix,
                        ipv6_prefix,
                        peers,
                        policy,
                        stun_port,
                    });
                }
                (ServerMsg::Peers { peers, .. }, Some(s)) => {
                    s.peers.extend(peers.into_iter().map(|p| (p.fingerprint.clone(), p)));
                }
                (other, _) => bail!("the coordinator sent {other:?} in the middle of its welcome"),
            }
        }
        Ok((state.ok_or_else(|| anyhow!("the coordinator sent no welcome"))?, ws))
    }

    /// Connect and prove our key; the welcome parts as the coordinator sent them (JSON), and the
    /// socket.
    pub async fn join_raw(&self) -> Result<(Vec<String>, Socket)> {
        let tcp = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(&self.host_port))
            .await
            .map_err(|_| anyhow!("connecting to {} timed out", self.host_port))?
            .with_context(|| format!("cannot connect to the coordinator at {}", self.host_port))?;
        // The relay rides on this connection: no Nagle.
        let _ = tcp.set_nodelay(true);
        let host = self
            .host_port
            .rsplit_once(':')
            .map_or(self.host_port.as_str(), |(h, _)| h)
            .trim_matches(['[', ']']);
        let server_name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|_| anyhow!("{host} is not a valid host name"))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(server_name, tcp)
            .await
            .map_err(|e| match pinning::PinMismatch::in_tls_error(&e) {
                Some(mismatch) => Refusal::from(mismatch.clone()).into(),
                None => anyhow!("TLS with the coordinator failed: {e}"),
            })?;
        let request = format!("wss://{}{CONNECT_PATH}", self.host_port).into_client_request()?;
        let (mut ws, _) = tokio_tungstenite::client_async(request, tls)
            .await
            .context("WebSocket upgrade failed")?;
        let nonce = match next_msg(&mut ws).await? {
            ServerMsg::Challenge { nonce, .. } => BASE64.decode(nonce).context("challenge is not base64")?,
            other => bail!("the coordinator sent {other:?} instead of a challenge"),
        };
        let candidates = self.candidates.load();
        let hello = ClientMsg::Hello {
            public_key: self.identity.public().ssh_line_with_comment(),
            signature: self.identity.sign(JOIN_NAMESPACE, &nonce),
            token: self.token.clone(),
            name: self.name.clone(),
            listen_port: self.listen_port,
            endpoints: candidates.endpoints().iter().map(|e| e.to_string()).collect(),
            ssh_port: (self.ssh_port != 0).then_some(self.ssh_port),
            nat: candidates.nat,
        };
        ws.send(Message::Text(serde_json::to_string(&hello)?.into())).await?;
        // The welcome comes in parts; `type` and `more` lead each, so they need no parsing here.
        let mut parts = Vec::new();
        loop {
            let text = next_text(&mut ws).await?;
            let more =
                if text.starts_with(r#"{"type":"welcome","more":"#) || text.starts_with(r#"{"type":"peers","more":"#) {
                    text.split_once(r#""more":"#)
                        .is_some_and(|(_, rest)| rest.starts_with("true"))
                } else {
                    match serde_json::from_str(&text).context("unreadable message from the coordinator")? {
                        ServerMsg::Welcome { more, .. } | ServerMsg::Peers { more, .. } => more,
                        ServerMsg::Error { message } => {
                            return Err(Refusal::Refused(message).into());
                        }
                        other => bail!("the coordinator sent {other:?} instead of a welcome"),
                    }
                };
            parts.push(text);
            if !more {
                return Ok((parts, ws));
            }
        }
    }
}

/// The `ip:port` entries of a peer's endpoint list.
fn udp_endpoints(endpoints: &[String]) -> Vec<SocketAddr> {
    endpoints.iter().filter_map(|e| e.parse::<SocketAddr>().ok()).collect()
}

/// Point the device's discovery at the coordinator's STUN targets: its host, at the port the
/// welcome named and the next one. Called per welcome (the host name is resolved here), not
/// per pushed update.
fn set_stun_targets(dev: &Device, url: &str, state: &MeshState) {
    let targets = match state.stun_port {
        0 => None,
        port => crate::nat::netcheck::targets(url, port)
            .inspect_err(|e| warn!("no STUN targets ({e:#}); this node's public address stays a guess"))
            .ok(),
    };
    if dev.stun_targets.load().as_deref() != targets.as_ref() {
        dev.stun_targets.store(targets.map(Arc::new));
    }
}

/// The next text message, answering pings on the way.
pub async fn next_text(ws: &mut Socket) -> Result<String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(45), ws.next()).await {
            Err(_) => bail!("the coordinator went silent"),
            Ok(None) => bail!("the coordinator closed the connection"),
            Ok(Some(Err(e))) => bail!("connection to the coordinator failed: {e}"),
            Ok(Some(Ok(Message::Text(t)))) => return Ok(t.to_string()),
            Ok(Some(Ok(Message::Ping(p)))) => ws.send(Message::Pong(p)).await?,
            Ok(Some(Ok(Message::Close(_)))) => bail!("the coordinator closed the connection"),
            Ok(Some(Ok(_))) => {}
        }
    }
}

async fn next_msg(ws: &mut Socket) -> Result<ServerMsg> {
    serde_json::from_str(&next_text(ws).await?).context("unreadable message from the coordinator")
}

fn set_control(dev: &Device, url: &str, state: ConnectionState, error: Option<String>, updated: bool) {
    let previous = dev.control.load_full();
    let last_update_unix = if updated {
        Some(crate::control::unix_now() as u64)
    } else {
        previous.as_ref().and_then(|c| c.last_update_unix)
    };
    dev.control.store(Some(Arc::new(ControlState {
        url: url.to_string(),
        state,
        last_error: error,
        last_update_unix,
    })));
}

fn apply_to_device(dev: &Device, state: &MeshState) -> Result<()> {
    dev.policy.set(state.policy.clone());
    dev.update(state.peer_specs(), state.mesh_keys()?);
    Ok(())
}

/// Follow the coordinator until shutdown: apply pushes, cache them, reconnect on loss.
async fn follow(client: Client, dev: Arc<Device>, mut state: MeshState, mut socket: Option<Socket>, cache: PathBuf) {
    let mut backoff = BACKOFF_MIN;
    while !dev.shutdown.load(Ordering::Relaxed) {
        // A rejoin's hello carries what the device learned since.
        client.candidates.store(dev.candidates.load_full());
        let ws = match socket.take() {
            Some(ws) => ws,
            None => match client.join().await {
                Ok((fresh, ws)) => {
                    if fresh.node.ipv4 != state.node.ipv4 {
                        warn!(
                            "the coordinator now gives this node {} (was {}); restart to take it",
                            fresh.node.ipv4, state.node.ipv4
                        );
                    }
                    state = fresh;
                    set_stun_targets(&dev, &client.url, &state);
                    if let Err(e) = apply_to_device(&dev, &state).and_then(|_| state.save(&cache)) {
                        warn!("applying the coordinator's state failed: {e:#}");
                    }
                    ws
                }
                Err(e) => {
                    let fatal = e.downcast_ref::<Refusal>().is_some();
                    warn!("coordinator {}: {e:#}", client.url);
                    set_control(
                        &dev,
                        &client.url,
                        if fatal {
                            ConnectionState::Refused
                        } else {
                            ConnectionState::Disconnected
                        },
                        Some(format!("{e:#}")),
                        false,
                    );
                    let jitter = rand::thread_rng().gen_range(0..=backoff.as_millis() as u64 / 4);
                    tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            },
        };
        backoff = BACKOFF_MIN;
        set_control(&dev, &client.url, ConnectionState::Connected, None, true);
        info!(coordinator = %client.url, peers = state.peers.len(), "following the coordinator");
        let (mut sink, mut stream) = ws.split();
        // The relay path exists while we are connected.
        let (relay_tx, mut relay_rx) = tokio::sync::mpsc::channel::<([u8; 32], Vec<u8>)>(RELAY_QUEUE);
        dev.relay_tx.store(Some(Arc::new(relay_tx)));
        // Candidates and punch requests from the slow path.
        let (to_coordinator, mut outbox) = tokio::sync::mpsc::channel::<CoordinatorRequest>(RELAY_QUEUE);
        dev.coordinator_tx.store(Some(Arc::new(to_coordinator)));
        let mut last_heard = tokio::time::Instant::now();
        let reason = loop {
            let incoming = tokio::select! {
                m = stream.next() => m,
                out = relay_rx.recv() => {
                    let Some((dst, msg)) = out else { continue };
                    let frame = [&dst[..], &msg].concat();
                    if let Err(e) = sink.send(Message::Binary(frame.into())).await {
                        break anyhow!("relaying to the coordinator failed: {e}");
                    }
                    continue;
                }
                out = outbox.recv() => {
                    let Some(request) = out else { continue };
                    let text = serde_json::to_string(&protocol_message(request)).expect("client messages serialize");
                    if let Err(e) = sink.send(Message::Text(text.into())).await {
                        break anyhow!("writing to the coordinator failed: {e}");
                    }
                    continue;
                }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if dev.shutdown.load(Ordering::Relaxed) {
                        dev.relay_tx.store(None);
                        dev.coordinator_tx.store(None);
                        return;
                    }
                    if last_heard.elapsed() > SILENCE {
                        break anyhow!("the coordinator went silent");
                    }
                    continue;
                }
            };
            last_heard = tokio::time::Instant::now();
            let msg = match incoming {
                None => Err(anyhow!("the coordinator closed the connection")),
                Some(Err(e)) => Err(anyhow!("connection to the coordinator failed: {e}")),
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerMsg>(&t) {
                    Ok(ServerMsg::Punch { peer, endpoints, nat }) => {
                        punch(&dev, &state, &peer, &endpoints, nat);
                        continue;
                    }
                    other => other.context("unreadable message from the coordinator"),
                },
                Some(Ok(Message::Binary(frame))) => {
                    // A relayed wire message: the sender's Noise key, then the message.
                    if let Some((from, msg)) = frame.split_first_chunk::<32>() {
                        dev.deliver_overlay(Via::Relay(*from), msg);
                    }
                    continue;
                }
                Some(Ok(Message::Ping(p))) => {
                    if let Err(e) = sink.send(Message::Pong(p)).await {
                        break anyhow!("connection to the coordinator failed: {e}");
                    }
                    continue;
                }
                Some(Ok(Message::Close(_))) => Err(anyhow!("the coordinator closed the connection")),
                Some(Ok(_)) => continue,
            };
            match msg.and_then(|m| state.apply(m)) {
                Ok(true) => {
                    if let Err(e) = apply_to_device(&dev, &state).and_then(|_| state.save(&cache)) {
                        warn!("applying an update failed: {e:#}");
                    }
                    set_control(&dev, &client.url, ConnectionState::Connected, None, true);
                }
                Ok(false) => {}
                Err(e) if e.downcast_ref::<Refusal>().is_some() => {
                    warn!("{e:#}; dropping every peer");
                    dev.relay_tx.store(None);
                    dev.coordinator_tx.store(None);
                    state.peers.clear();
                    let _ = apply_to_device(&dev, &state);
                    let _ = fs::remove_file(&cache);
                    set_control(
                        &dev,
                        &client.url,
                        ConnectionState::Revoked,
                        Some(format!("{e:#}")),
                        true,
                    );
                    return;
                }
                Err(e) => break e,
            }
        };
        dev.relay_tx.store(None);
        dev.coordinator_tx.store(None);
        warn!("lost the coordinator ({reason:#}); tunnels keep running, reconnecting");
        set_control(
            &dev,
            &client.url,
            ConnectionState::Disconnected,
            Some(format!("{reason:#}")),
            false,
        );
    }
}

/// The coordinator protocol's message for a request of the slow path.
fn protocol_message(request: CoordinatorRequest) -> ClientMsg {
    match request {
        CoordinatorRequest::Candidates { endpoints, nat } => ClientMsg::Candidates {
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            nat,
        },
        CoordinatorRequest::Punch { peer } => ClientMsg::Punch { peer },
    }
}

/// The coordinator asks us to punch towards `fingerprint` now: hand it to the handshake thread.
fn punch(dev: &Device, state: &MeshState, fingerprint: &str, endpoints: &[String], nat: NatKind) {
    let Some(key) = state
        .peers
        .get(fingerprint)
        .and_then(|p| PublicIdentity::from_ssh_line(&p.public_key).ok())
        .map(|id| *id.noise_public())
    else {
        return;
    };
    let _ = dev.events.try_send(Event::Punch {
        key,
        candidates: udp_endpoints(endpoints),
        nat,
    });
}

/// `tunnelmesh up --coordinator URL --fingerprint FP`.
pub fn up(opts: JoinOptions, identity: Identity) -> Result<()> {
    let identity = Arc::new(identity);
    let client = Client::new(&opts, identity.clone())?;
    client.candidates.store(Arc::new(Candidates {
        host: crate::nat::host_candidates(&opts.interface, opts.listen_port),
        ..Candidates::default()
    }));
    let cache = opts.state_dir.join(&opts.interface).join("state.json");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (state, socket) = match MeshState::load(&cache) {
        Some(cached) => {
            info!(cache = %cache.display(), peers = cached.peers.len(), "starting from the cached mesh state");
            (cached, None)
        }
        None => {
            let (state, ws) = runtime.block_on(async {
                let mut backoff = BACKOFF_MIN;
                loop {
                    match client.join().await {
                        Ok(joined) => break Ok(joined),
                        Err(e) if e.downcast_ref::<Refusal>().is_some() => break Err(e),
                        Err(e) => {
                            warn!("cannot join yet ({e:#}); retrying in {backoff:?}");
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                        }
                    }
                }
            })?;
            state
                .save(&cache)
                .with_context(|| format!("cannot write the state cache {}", cache.display()))?;
            (state, Some(ws))
        }
    };
    info!(name = %state.node.name, ipv4 = %state.node.ipv4, ipv6 = %state.node.ipv6, "joined the mesh");
    let plan = InterfacePlan {
        name: opts.interface.clone(),
        mtu: opts.mtu,
        listen_port: opts.listen_port,
        workers: opts.workers,
        addresses: state.addresses()?,
        routes: Vec::new(),
        xdp_interfaces: Vec::new(),
        no_ebpf: opts.no_ebpf,
        no_offload: opts.no_offload,
        peers: state.peer_specs(),
        mesh_keys: state.mesh_keys()?,
        policy: Some(state.policy.clone()),
        port_mapping: (opts.port_mapping, opts.port_mapping_lifetime),
    };
    let interface = Interface::start(&identity, plan)?;
    set_stun_targets(&interface.dev, &opts.url, &state);
    set_control(
        &interface.dev,
        &opts.url,
        if socket.is_some() {
            ConnectionState::Connected
        } else {
            ConnectionState::Connecting
        },
        None,
        socket.is_some(),
    );
    if opts.ssh_port != 0 {
        let dev = interface.dev.clone();
        let key = crate::paths::ssh::host_key(&identity)?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind((
                std::net::Ipv6Addr::UNSPECIFIED,
                opts.ssh_port,
            )))
            .with_context(|| {
                format!(
                    "cannot listen on TCP port {} for the SSH transport; choose another --ssh-port (0 turns it off)",
                    opts.ssh_port
                )
            })?;
        runtime.spawn(crate::paths::ssh::serve(dev.clone(), listener, key.clone()));
        runtime.spawn(crate::paths::ssh::supervise(dev, key));
    }
    runtime.spawn(follow(client, interface.dev.clone(), state, socket, cache));
    let result = interface.wait_for_signal();
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}
