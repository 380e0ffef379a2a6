//! The SSH transport: a path for peers that can reach each other over TCP but not over UDP.
//!
//! Every node runs an SSH server (russh) whose host key is its mesh identity, and accepts only
//! clients whose key is a current member's. A client dials a peer's SSH port when the path
//! manager asks for it (`want_ssh`: UDP does not work), and refuses loudly if the server's host
//! key is not the peer's known key. SSH is only a carrier: one session channel carries the
//! unchanged, end-to-end encrypted wire messages, each prefixed with its length (u16, big
//! endian); the Noise session is the trust anchor. SSH keepalives detect dead connections.
//!
//! Server bounds: a connection not yet authenticated holds a place among at most
//! [`MAX_UNAUTHENTICATED_PER_SOURCE`] per source address and [`MAX_UNAUTHENTICATED`] in all (others
//! are closed at once), and must authenticate within [`CONNECT_TIMEOUT`] of being accepted; an
//! authenticated connection carries one channel, and ends when its member leaves the mesh.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use russh::{
    Channel,
    keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate},
    server::{self, Auth, ChannelOpenHandle, Msg, Session, VerifiedPublicKey},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, BufWriter},
    net::TcpListener,
    sync::{Notify, mpsc, oneshot},
};
use tracing::{debug, info, warn};

use crate::{
    device::{Counters, Device, Peer, Via},
    identity::PublicIdentity,
    protocol::framing::Deframer,
    slots::{Slot, Slots},
};

/// User name the client logs in as (the key is what counts).
const USER: &str = "tunnelmesh";
/// Messages queued for one SSH connection before new ones are dropped.
const QUEUE: usize = 1024;
/// Time a client has to connect and authenticate (either side waits no longer).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Server connections not yet authenticated, per source address and in all.
pub const MAX_UNAUTHENTICATED_PER_SOURCE: usize = 8;
pub const MAX_UNAUTHENTICATED: usize = 128;
/// SSH keepalive interval; three unanswered close the connection.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// First and longest wait between dial attempts to one peer.
const REDIAL_MIN: Duration = Duration::from_secs(1);
const REDIAL_MAX: Duration = Duration::from_secs(30);

/// Whether `key` is the ed25519 key of `identity`.
fn same_key(key: &PublicKey, identity: &PublicIdentity) -> bool {
    key.to_openssh()
        .is_ok_and(|line| line.split_whitespace().nth(1) == identity.ssh_line().split_whitespace().nth(1))
}

/// The node's identity as a russh key.
pub fn host_key(identity: &crate::identity::Identity) -> Result<PrivateKey> {
    PrivateKey::from_openssh(identity.openssh_private().as_str()).context("the identity key does not load into russh")
}

/// Move wire messages between an SSH channel and the data plane until either side ends.
async fn pump<S>(dev: Arc<Device>, peer: Arc<Peer>, channel: Channel<S>)
where
    S: From<(russh::ChannelId, russh::ChannelMsg)> + Send + Sync + 'static,
{
    let key = *peer.identity.noise_public();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    let tx = Arc::new(tx);
    peer.ssh_tx.store(Some(tx.clone()));
    info!(peer = %peer.name, "SSH transport up");
    let (mut reader, writer) = tokio::io::split(channel.into_stream());
    let reading = async {
        let mut frames = Deframer::default();
        loop {
            let n = reader.read(frames.spare()).await?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            frames.filled(n);
            while let Some(msg) = frames.next_message() {
                dev.deliver_overlay(Via::Ssh(key), msg);
            }
        }
        #[allow(unreachable_code)]
        Ok::<(), std::io::Error>(())
    };
    let writing = async {
        let mut writer = BufWriter::new(writer);
        while let Some(msg) = rx.recv().await {
            writer.write_u16(msg.len() as u16).await?;
            writer.write_all(&msg).await?;
            // Coalesce what is queued, then flush.
            while let Ok(msg) = rx.try_recv() {
                writer.write_u16(msg.len() as u16).await?;
                writer.write_all(&msg).await?;
            }
            writer.flush().await?;
        }
        Ok::<(), std::io::Error>(())
    };
    // A peer that leaves the mesh (removed, revoked) loses its connection too.
    let membership = async {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let still = dev.peers.load().get(&key).is_some_and(|p| Arc::ptr_eq(p, &peer));
            if !still || dev.shutdown.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("the peer left the mesh"));
            }
        }
    };
    let ended = tokio::select! {
        r = reading => r,
        w = writing => w,
        m = membership => m,
    };
    // Only clear the slot if it is still ours (a newer connection may have replaced it).
    if peer.ssh_tx.load().as_ref().is_some_and(|t| Arc::ptr_eq(t, &tx)) {
        peer.ssh_tx.store(None);
    }
    info!(peer = %peer.name, "SSH transport down ({:?})", ended.err());
}

/// The server side of one connection.
struct ServerHandler {
    dev: Arc<Device>,
    remote: Option<SocketAddr>,
    peer: Option<Arc<Peer>>,
    /// The connection's place among those not yet authenticated (given back on success).
    unauthenticated: Option<Slot>,
    /// Told once a member authenticated.
    authenticated: Option<oneshot::Sender<()>>,
    /// Whether the connection's one channel was opened.
    channel_opened: bool,
    /// Told when that channel's pump ends (the channel closed, or the member left the mesh).
    ended: Arc<Notify>,
}

impl server::Handler for ServerHandler {
    type Error = russh::Error;

    async fn auth_publickey(&mut self, _user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        let table = self.dev.peers.load();
        match table.peers.iter().find(|p| same_key(key.public_key, &p.identity)) {
            Some(peer) => {
                self.peer = Some(peer.clone());
                self.unauthenticated = None;
                if let Some(authenticated) = self.authenticated.take() {
                    let _ = authenticated.send(());
                }
                Ok(Auth::Accept)
            }
            None => {
                warn!(remote = ?self.remote, "SSH transport: refused a key that is not a mesh member's");
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(peer) = self.peer.clone() else {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        if self.channel_opened {
            debug!(peer = %peer.name, "SSH transport: refused a second channel");
            reply.reject(russh::ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        self.channel_opened = true;
        reply.accept().await;
        let (dev, ended) = (self.dev.clone(), self.ended.clone());
        tokio::spawn(async move {
            pump(dev, peer, channel).await;
            ended.notify_one();
        });
        Ok(())
    }
}

/// The SSH server on a runtime (one thread) of its own: the key exchanges of connections not
/// yet authenticated (bounded by their places, but each a Diffie-Hellman and a signature) must
/// not delay the coordinator client, which carries revocations and policy on the daemon's main
/// runtime. Dropping it stops the server.
pub struct SshServer {
    runtime: Option<tokio::runtime::Runtime>,
    /// The address it listens on.
    pub addr: SocketAddr,
}

impl SshServer {
    /// Listen on `bind` and serve `dev`'s members.
    pub fn start(dev: Arc<Device>, bind: SocketAddr, host_key: PrivateKey) -> std::io::Result<SshServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tunnelmesh-ssh")
            .enable_all()
            .build()?;
        let listener = runtime.block_on(TcpListener::bind(bind))?;
        let addr = listener.local_addr()?;
        runtime.spawn(serve(dev, listener, host_key));
        Ok(SshServer {
            runtime: Some(runtime),
            addr,
        })
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// Accept SSH connections on `listener` until the device shuts down.
pub async fn serve(dev: Arc<Device>, listener: TcpListener, host_key: PrivateKey) {
    let config = Arc::new(server::Config {
        keys: vec![host_key],
        keepalive_interval: Some(KEEPALIVE),
        keepalive_max: 3,
        auth_rejection_time: Duration::from_millis(200),
        auth_rejection_time_initial: Some(Duration::ZERO),
        nodelay: true,
        ..Default::default()
    });
    let unauthenticated = Slots::new(MAX_UNAUTHENTICATED_PER_SOURCE, MAX_UNAUTHENTICATED);
    loop {
        let Ok((tcp, remote)) = listener.accept().await else {
            continue;
        };
        let Some(slot) = unauthenticated.take(remote.ip()) else {
            debug!(%remote, "SSH transport: too many connections not yet authenticated; closed");
            continue;
        };
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        let (authenticated, authenticated_rx) = oneshot::channel();
        let ended = Arc::new(Notify::new());
        let handler = ServerHandler {
            dev: dev.clone(),
            remote: Some(remote),
            peer: None,
            unauthenticated: Some(slot),
            authenticated: Some(authenticated),
            channel_opened: false,
            ended: ended.clone(),
        };
        tokio::spawn(connection(
            config.clone(),
            tcp,
            remote,
            handler,
            deadline,
            authenticated_rx,
            ended,
        ));
    }
}

/// One server connection: authenticated by `deadline` or closed; then it lasts until the
/// session ends or its channel's pump does (the member left).
async fn connection(
    config: Arc<server::Config>,
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    handler: ServerHandler,
    deadline: tokio::time::Instant,
    authenticated: oneshot::Receiver<()>,
    ended: Arc<Notify>,
) {
    // A client that never sends its identification holds up `run_stream` itself.
    let session = match tokio::time::timeout_at(deadline, server::run_stream(config, tcp, handler)).await {
        Ok(Ok(session)) => session,
        Ok(Err(e)) => return debug!(%remote, "SSH handshake failed: {e}"),
        Err(_) => return debug!(%remote, "SSH transport: no identification in time; closed"),
    };
    let handle = session.handle();
    tokio::pin!(session);
    let close = |why: &'static str| {
        let handle = handle.clone();
        async move {
            debug!(%remote, "SSH transport: {why}; closed");
            let bye = handle.disconnect(russh::Disconnect::ByApplication, why.into(), "en".into());
            let _ = tokio::time::timeout(Duration::from_secs(1), bye).await;
        }
    };
    tokio::select! {
        ended = &mut session => return log_end(remote, ended),
        authenticated = tokio::time::timeout_at(deadline, authenticated) => {
            if !matches!(authenticated, Ok(Ok(()))) {
                return close("not authenticated in time").await;
            }
        }
    }
    tokio::select! {
        ended = &mut session => log_end(remote, ended),
        () = ended.notified() => close("its channel ended (the member left, or closed it)").await,
    }
}

fn log_end(remote: SocketAddr, ended: Result<(), russh::Error>) {
    if let Err(e) = ended {
        debug!(%remote, "SSH session ended: {e}");
    }
}

/// The client side: checks that the server is the peer it should be.
struct ClientHandler {
    expected: PublicIdentity,
    peer: String,
    address: SocketAddr,
    dev: Arc<Device>,
}

impl russh::client::Handler for ClientHandler {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        // A certificate is not a mesh key: only the bare key is accepted.
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return Ok(false);
        };
        if same_key(key, &self.expected) {
            return Ok(true);
        }
        Counters::bump(&self.dev.counters.ssh_host_key_mismatch);
        warn!(
            peer = %self.peer,
            address = %self.address,
            expected = %self.expected.fingerprint(),
            offered = %key.fingerprint(russh::keys::HashAlg::Sha256),
            "SSH transport: the server's host key is NOT the peer's mesh key; refusing (wrong address, or an impostor)"
        );
        Ok(false)
    }
}

/// Dial `peer`'s SSH transport and pump messages until the connection ends; `connected` is set
/// once the channel is open.
async fn dial(
    dev: Arc<Device>,
    peer: Arc<Peer>,
    client_key: Arc<PrivateKey>,
    connected: Arc<std::sync::atomic::AtomicBool>,
) -> Result<()> {
    let address = peer.ssh_endpoint.ok_or_else(|| anyhow!("no SSH endpoint"))?;
    let config = Arc::new(russh::client::Config {
        keepalive_interval: Some(KEEPALIVE),
        keepalive_max: 3,
        nodelay: true,
        ..Default::default()
    });
    let handler = ClientHandler {
        expected: peer.identity.clone(),
        peer: peer.name.clone(),
        address,
        dev: dev.clone(),
    };
    let session = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let mut session = russh::client::connect(config, address, handler).await?;
        let auth = session
            .authenticate_publickey(USER, PrivateKeyWithHashAlg::new(client_key, None))
            .await?;
        if !auth.success() {
            bail!("the peer refused our key (are we a member in its view yet?)");
        }
        Ok(session)
    })
    .await
    .map_err(|_| anyhow!("connecting timed out"))??;
    let channel = session.channel_open_session().await?;
    connected.store(true, Ordering::Relaxed);
    pump(dev, peer, channel).await;
    drop(session);
    Ok(())
}

/// A dial in progress (or done): its task, whether it got connected, the wait it ends with.
struct Dial {
    task: tokio::task::JoinHandle<()>,
    connected: Arc<std::sync::atomic::AtomicBool>,
    backoff: Duration,
}

/// Keep an SSH connection to every peer whose path manager wants one, with backoff (reset by a
/// connection that came up).
pub async fn supervise(dev: Arc<Device>, client_key: PrivateKey) {
    let client_key = Arc::new(client_key);
    let mut dialing: std::collections::HashMap<[u8; 32], Dial> = std::collections::HashMap::new();
    while !dev.shutdown.load(Ordering::Relaxed) {
        let table = dev.peers.load_full();
        dialing.retain(|key, _| table.get(key).is_some());
        for peer in &table.peers {
            if !peer.want_ssh.load(Ordering::Relaxed) || peer.ssh_tx.load().is_some() || peer.ssh_endpoint.is_none() {
                continue;
            }
            let key = *peer.identity.noise_public();
            let backoff = match dialing.get(&key) {
                Some(d) if !d.task.is_finished() => continue,
                Some(d) if d.connected.load(Ordering::Relaxed) => REDIAL_MIN,
                Some(d) => (d.backoff * 2).min(REDIAL_MAX),
                None => REDIAL_MIN,
            };
            let connected = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (dev, peer, client_key, flag) = (dev.clone(), peer.clone(), client_key.clone(), connected.clone());
            let task = tokio::spawn(async move {
                if let Err(e) = dial(dev, peer.clone(), client_key, flag).await {
                    debug!(peer = %peer.name, "SSH transport: {e:#}");
                }
                tokio::time::sleep(backoff).await;
            });
            dialing.insert(
                key,
                Dial {
                    task,
                    connected,
                    backoff,
                },
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    //! The SSH server on loopback with a real russh client.

    use std::time::Instant;

    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::slowpath::testbed::Node;

    /// A server for `server`'s device on loopback; its address.
    async fn server(node: &Node) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(node.dev.clone(), listener, host_key(&node.identity).unwrap()));
        addr
    }

    /// Security item 12: the server keeps answering while the daemon's main runtime (one
    /// worker, the coordinator client's) is busy — its key exchanges run on a thread of their
    /// own, so a burst of them cannot hold up coordinator pushes, nor the reverse.
    #[test]
    fn the_server_authenticates_a_member_while_the_main_runtime_is_busy() {
        let t0 = Instant::now();
        let node = Node::new("sshd", "198.18.0.1:51820", t0);
        let member = Node::new("member", "198.18.0.2:51820", t0);
        node.knows(&member);
        let main = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let server = SshServer::start(
            node.dev.clone(),
            "127.0.0.1:0".parse().unwrap(),
            host_key(&node.identity).unwrap(),
        )
        .unwrap();
        let (busy_tx, busy_rx) = std::sync::mpsc::channel();
        main.spawn(async move {
            busy_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_secs(4));
        });
        busy_rx.recv().unwrap();
        let client = tokio::runtime::Runtime::new().unwrap();
        let authenticated = client.block_on(async {
            tokio::time::timeout(Duration::from_secs(2), async {
                let config = Arc::new(russh::client::Config::default());
                let mut session = russh::client::connect(config, server.addr, Trusting).await.unwrap();
                let key = Arc::new(host_key(&member.identity).unwrap());
                session
                    .authenticate_publickey(USER, PrivateKeyWithHashAlg::new(key, None))
                    .await
                    .unwrap()
                    .success()
            })
            .await
        });
        assert_eq!(
            authenticated,
            Ok(true),
            "authenticated within 2 s while the main runtime was busy"
        );
        main.shutdown_background();
    }

    /// Bytes the server sends until it closes the connection (`None`: still open at `by`).
    async fn until_closed(tcp: &mut tokio::net::TcpStream, by: Duration) -> Option<Duration> {
        let started = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(by.saturating_sub(started.elapsed()), tcp.read(&mut buf)).await {
                Err(_) => return None,
                Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
                Ok(Ok(_)) => {}
            }
        }
    }

    #[test]
    fn unauthenticated_connections_are_bounded_per_source_and_closed_at_the_deadline() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let node = Node::new("sshd", "198.18.0.1:51820", Instant::now());
        runtime.block_on(async {
            let addr = server(&node).await;
            let mut silent = Vec::new();
            for _ in 0..MAX_UNAUTHENTICATED_PER_SOURCE {
                silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            }
            // Beyond the per-source bound: closed at once.
            let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
            let closed = until_closed(&mut extra, Duration::from_secs(2)).await;
            assert!(closed.is_some(), "a connection beyond the bound stays open");
            // The silent ones (they never send an identification) go at the deadline.
            for tcp in &mut silent {
                let closed = until_closed(tcp, CONNECT_TIMEOUT + Duration::from_secs(3)).await;
                assert!(closed.is_some(), "a silent connection outlived the deadline");
            }
            // Their places are free again.
            let mut again = tokio::net::TcpStream::connect(addr).await.unwrap();
            assert!(
                until_closed(&mut again, Duration::from_secs(1)).await.is_none(),
                "places come back when connections close"
            );
        });
    }

    struct Trusting;

    impl russh::client::Handler for Trusting {
        type Error = russh::Error;
        async fn check_server_key(&mut self, _key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
            Ok(true)
        }
    }

    #[test]
    fn a_member_gets_one_channel_and_loses_the_connection_when_it_leaves() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let t0 = Instant::now();
        let node = Node::new("sshd", "198.18.0.1:51820", t0);
        let member = Node::new("member", "198.18.0.2:51820", t0);
        node.knows(&member);
        runtime.block_on(async {
            let addr = server(&node).await;
            let config = Arc::new(russh::client::Config::default());
            let mut session = russh::client::connect(config, addr, Trusting).await.unwrap();
            let key = Arc::new(host_key(&member.identity).unwrap());
            let auth = session
                .authenticate_publickey(USER, PrivateKeyWithHashAlg::new(key, None))
                .await
                .unwrap();
            assert!(auth.success(), "a member authenticates");
            let _channel = session.channel_open_session().await.unwrap();
            assert!(
                session.channel_open_session().await.is_err(),
                "a second channel is refused"
            );
            // The member leaves the mesh: its connection goes (the pump checks every second).
            node.dev.update(Vec::new(), Vec::new());
            let started = Instant::now();
            while !session.is_closed() && started.elapsed() < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(session.is_closed(), "the connection outlived the membership");
        });
    }
}
