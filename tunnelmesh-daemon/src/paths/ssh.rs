//! The SSH transport: a path for peers that can reach each other over TCP but not over UDP.
//!
//! Every node runs an SSH server (russh) whose host key is its mesh identity, and accepts only
//! clients whose key is a current member's. A client dials a peer's SSH port when the path
//! manager asks for it (`want_ssh`: UDP does not work), and refuses loudly if the server's host
//! key is not the peer's known key. SSH is only a carrier: one session channel carries the
//! unchanged, end-to-end encrypted wire messages, each prefixed with its length (u16, big
//! endian); the Noise session is the trust anchor. SSH keepalives detect dead connections.

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
    sync::mpsc,
};
use tracing::{debug, info, warn};

use crate::{
    device::{Counters, Device, Peer, Via},
    identity::PublicIdentity,
    protocol::framing::Deframer,
};

/// User name the client logs in as (the key is what counts).
const USER: &str = "tunnelmesh";
/// Messages queued for one SSH connection before new ones are dropped.
const QUEUE: usize = 1024;
/// Time a client has to connect and authenticate.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
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
}

impl server::Handler for ServerHandler {
    type Error = russh::Error;

    async fn auth_publickey(&mut self, _user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        let table = self.dev.peers.load();
        match table.peers.iter().find(|p| same_key(key.public_key, &p.identity)) {
            Some(peer) => {
                self.peer = Some(peer.clone());
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
            return Ok(());
        };
        reply.accept().await;
        tokio::spawn(pump(self.dev.clone(), peer, channel));
        Ok(())
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
    loop {
        let Ok((tcp, remote)) = listener.accept().await else {
            continue;
        };
        let handler = ServerHandler {
            dev: dev.clone(),
            remote: Some(remote),
            peer: None,
        };
        let config = config.clone();
        tokio::spawn(async move {
            match server::run_stream(config, tcp, handler).await {
                Ok(session) => {
                    if let Err(e) = session.await {
                        debug!(%remote, "SSH session ended: {e}");
                    }
                }
                Err(e) => debug!(%remote, "SSH handshake failed: {e}"),
            }
        });
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
