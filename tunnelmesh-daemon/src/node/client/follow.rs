//! Following the coordinator while the interface runs: apply and cache every pushed change,
//! carry the relay channel and the slow path's requests, reconnect with backoff on loss.

use std::{
    fs,
    path::PathBuf,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context, Result, anyhow};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio_tungstenite::tungstenite::Message;
use tracing::{info, warn};

use super::{
    BACKOFF_MAX, BACKOFF_MIN, Client, MeshState, RELAY_QUEUE, Refusal, SILENCE, Socket,
    state::{CacheFile, Change, udp_endpoints},
};
use crate::{
    control::proto::{ClientMsg, ServerMsg},
    device::{ConnectionState, ControlState, CoordinatorRequest, Device, Event, Via},
    identity::PublicIdentity,
    protocol::discovery::NatKind,
};

/// Point the device's discovery at the coordinator's STUN targets: its host, at the port the
/// welcome named and the next one. Called per welcome (the host name is resolved here), not
/// per pushed update.
pub(super) fn set_stun_targets(dev: &Device, url: &str, state: &MeshState) {
    let targets = match state.mesh.stun_port {
        0 => None,
        port => crate::nat::netcheck::targets(url, port)
            .inspect_err(|e| warn!("no STUN targets ({e:#}); this node's public address stays a guess"))
            .ok(),
    };
    if dev.coordinator.stun_targets.load().as_deref() != targets.as_ref() {
        dev.coordinator.stun_targets.store(targets.map(Arc::new));
    }
}

pub(super) fn set_control(dev: &Device, url: &str, state: ConnectionState, error: Option<String>, updated: bool) {
    let previous = dev.coordinator.state.load_full();
    let last_update_unix = if updated {
        Some(crate::control::unix_now() as u64)
    } else {
        previous.as_ref().and_then(|c| c.last_update_unix)
    };
    dev.coordinator.state.store(Some(Arc::new(ControlState {
        url: url.to_string(),
        state,
        last_error: error,
        last_update_unix,
    })));
}

pub(super) fn apply_to_device(dev: &Device, state: &MeshState) -> Result<()> {
    dev.policy.set(state.mesh.policy.clone());
    dev.update(state.peer_specs(), state.mesh_keys()?);
    Ok(())
}

/// Apply what one pushed message changed: the rules, or the peer table and keys; nothing for
/// a message that changed nothing (a repeated update rebuilds no table).
fn apply_change(dev: &Device, state: &MeshState, change: Change) -> Result<()> {
    match change {
        Change::Nothing => {}
        Change::Policy => dev.policy.set(state.mesh.policy.clone()),
        Change::Peer | Change::PeerRemoved | Change::MeshKeys => dev.update(state.peer_specs(), state.mesh_keys()?),
    }
    Ok(())
}

/// Follow the coordinator until shutdown: apply pushes, cache them, reconnect on loss.
pub(super) async fn follow(
    client: Client,
    dev: Arc<Device>,
    mut state: MeshState,
    mut socket: Option<Socket>,
    cache: PathBuf,
) {
    let mut cache = CacheFile::new(cache);
    let mut backoff = BACKOFF_MIN;
    while !dev.shutdown.load(Ordering::Relaxed) {
        // A rejoin's hello carries what the device learned since.
        client.candidates.store(dev.reach.candidates.load_full());
        let ws = match socket.take() {
            Some(ws) => ws,
            None => match client.join().await {
                Ok((fresh, ws)) => {
                    if fresh.mesh.node.ipv4 != state.mesh.node.ipv4 {
                        warn!(
                            "the coordinator now gives this node {} (was {}); restart to take it",
                            fresh.mesh.node.ipv4, state.mesh.node.ipv4
                        );
                    }
                    state = fresh;
                    set_stun_targets(&dev, &client.url, &state);
                    if let Err(e) = apply_to_device(&dev, &state).and_then(|_| cache.write(&state)) {
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
        dev.coordinator.relay.store(Some(Arc::new(relay_tx)));
        // Candidates and punch requests from the slow path.
        let (to_coordinator, mut outbox) = tokio::sync::mpsc::channel::<CoordinatorRequest>(RELAY_QUEUE);
        dev.coordinator.requests.store(Some(Arc::new(to_coordinator)));
        let mut last_heard = tokio::time::Instant::now();
        // One timer for the whole connection (a sleep made per message never fires while
        // messages keep coming).
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                _ = tick.tick() => {
                    if let Err(e) = cache.flush_due(&state) {
                        warn!("cannot write the state cache {}: {e:#}", cache.path().display());
                    }
                    if dev.shutdown.load(Ordering::Relaxed) {
                        dev.coordinator.relay.store(None);
                        dev.coordinator.requests.store(None);
                        if let Err(e) = cache.flush_now(&state) {
                            warn!("cannot write the state cache {}: {e:#}", cache.path().display());
                        }
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
                Ok(Change::Nothing) => {}
                Ok(change) => {
                    if let Err(e) = apply_change(&dev, &state, change).and_then(|_| cache.changed(&state, change)) {
                        warn!("applying an update failed: {e:#}");
                    }
                    set_control(&dev, &client.url, ConnectionState::Connected, None, true);
                }
                Err(e) if e.downcast_ref::<Refusal>().is_some() => {
                    warn!("{e:#}; dropping every peer");
                    dev.coordinator.relay.store(None);
                    dev.coordinator.requests.store(None);
                    state.peers.clear();
                    let _ = apply_to_device(&dev, &state);
                    let _ = fs::remove_file(cache.path());
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
        dev.coordinator.relay.store(None);
        dev.coordinator.requests.store(None);
        if let Err(e) = cache.flush_now(&state) {
            warn!("cannot write the state cache {}: {e:#}", cache.path().display());
        }
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
pub(super) fn protocol_message(request: CoordinatorRequest) -> ClientMsg {
    match request {
        CoordinatorRequest::Candidates { endpoints, nat } => ClientMsg::Candidates {
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            nat,
        },
        CoordinatorRequest::Punch { peer } => ClientMsg::Punch { peer },
    }
}

/// The coordinator asks us to punch towards `fingerprint` now: hand it to the slow path.
pub(super) fn punch(dev: &Device, state: &MeshState, fingerprint: &str, endpoints: &[String], nat: NatKind) {
    let Some(key) = state
        .peers
        .get(fingerprint)
        .and_then(|p| PublicIdentity::from_ssh_line(&p.ssh_key).ok())
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
