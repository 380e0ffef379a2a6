//! The coordinator's HTTPS API: `GET /v1/info` and the peer WebSocket `GET /v1/connect`.
//!
//! TLS is terminated here with rustls; HTTP/1.1 and the WebSocket upgrade by hyper and axum. A
//! malformed request gets a 4xx and affects nothing else.
//!
//! Bounds, so that silent or half-sent connections cannot use up the coordinator: a connection is
//! *pending* from accept until its hello is admitted — at most [`MAX_PENDING_PER_SOURCE`] per
//! source address and [`MAX_PENDING`] in all (others are closed at once); TLS must finish, the
//! request headers arrive and the hello come each within [`HELLO_TIMEOUT`]. An admitted
//! connection (one per member: a reconnect replaces it) is closed when two pings in a row go
//! unanswered (within 30 s of stalling) or one send takes longer than [`SEND_TIMEOUT`].

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Extension, Json, Router,
    extract::{
        State,
        ws::{Message, WebSocket, WebSocketUpgrade},
    },
    response::IntoResponse,
    routing::get,
};
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use rand::RngCore;
use serde_json::json;
use tokio::net::TcpListener;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use super::{
    hub::{Hub, MessageError},
    relay::{Budget, Relay},
};
use crate::control::proto::{CONNECT_PATH, ClientMsg, ServerMsg};
use crate::identity::PublicIdentity;
use crate::slots::{Slot, Slots};

/// Time a new connection has for each of its TLS handshake, its request headers, its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// WebSocket ping interval (a stalled connection is closed within two of these).
pub const PING_INTERVAL: Duration = Duration::from_secs(15);
/// One WebSocket send may take this long; a peer that does not read is disconnected.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections not admitted yet, per source address and in all.
pub const MAX_PENDING_PER_SOURCE: usize = 64;
pub const MAX_PENDING: usize = 1024;

/// Send `msg` within [`SEND_TIMEOUT`]; false if it failed or timed out.
async fn send(socket: &mut WebSocket, msg: Message) -> bool {
    matches!(tokio::time::timeout(SEND_TIMEOUT, socket.send(msg)).await, Ok(Ok(())))
}

#[derive(Clone)]
pub struct ApiState {
    pub hub: Arc<Mutex<Hub>>,
    pub tls_fingerprint: String,
    pub relay: Arc<Relay>,
    pub stats: super::metrics::Stats,
}

#[derive(Clone, Copy)]
struct Remote(SocketAddr);

/// The connection's pending slot, handed from the accept loop to the WebSocket handler.
#[derive(Clone)]
struct PendingPlace(Arc<Mutex<Option<Slot>>>);

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/info", get(info))
        .route(CONNECT_PATH, get(connect))
        .with_state(state)
}

async fn info(State(state): State<ApiState>) -> impl IntoResponse {
    let hub = crate::sync::lock(&state.hub);
    Json(json!({
        "tls_fingerprint": state.tls_fingerprint,
        "coordinator_key": hub.coordinator_key,
        "connected_peers": hub.connected(),
        "relay": &state.relay.counters,
    }))
}

async fn connect(
    ws: WebSocketUpgrade,
    State(state): State<ApiState>,
    Extension(Remote(remote)): Extension<Remote>,
    Extension(PendingPlace(slot)): Extension<PendingPlace>,
) -> impl IntoResponse {
    let slot = crate::sync::lock(&slot).take();
    ws.max_message_size(1 << 20)
        .max_frame_size(1 << 20)
        .on_upgrade(move |socket| connection(state, socket, remote, slot))
}

fn text(msg: &ServerMsg) -> Message {
    Message::Text(serde_json::to_string(msg).expect("messages serialize").into())
}

/// One peer's connection: challenge, hello, welcome, then pushed updates until it goes away.
async fn connection(state: ApiState, mut socket: WebSocket, remote: SocketAddr, slot: Option<Slot>) {
    let opened = std::time::Instant::now();
    let mut nonce = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut nonce);
    let coordinator = crate::sync::lock(&state.hub).coordinator_key.clone();
    let challenge = text(&ServerMsg::Challenge {
        nonce: BASE64.encode(nonce),
        coordinator,
    });
    if !send(&mut socket, challenge).await {
        return;
    }
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, socket.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => {
            serde_json::from_str::<ClientMsg>(&t).map_err(|e| format!("malformed hello: {e}"))
        }
        Ok(Some(Ok(_))) => Err("expected a JSON hello as a text message".to_string()),
        _ => return,
    };
    // The relay names peers by their Noise key.
    let relay_key = match &hello {
        Ok(ClientMsg::Hello { ssh_key, .. }) => {
            PublicIdentity::from_ssh_line(ssh_key).ok().map(|id| *id.noise_public())
        }
        _ => None,
    };
    let admitted = hello.and_then(|h| {
        let mut hub = crate::sync::lock(&state.hub);
        hub.admit(h, &nonce, remote.ip()).map_err(|e| e.to_string())
    });
    let super::hub::Admitted {
        fingerprint,
        connection: id,
        welcome,
        mut updates,
    } = match admitted {
        Ok(a) => a,
        Err(message) => {
            state.stats.joined(false, opened.elapsed().as_secs_f64());
            info!(%remote, "refused a peer: {message}");
            send(&mut socket, text(&ServerMsg::Error { message })).await;
            let _ = tokio::time::timeout(SEND_TIMEOUT, socket.close()).await;
            return;
        }
    };
    // Admitted: no longer pending.
    drop(slot);
    debug!(%remote, %fingerprint, "peer connected");
    let mut sent = true;
    for part in welcome {
        if !send(&mut socket, Message::Text(part.into())).await {
            sent = false;
            break;
        }
    }
    state.stats.joined(sent, opened.elapsed().as_secs_f64());
    let relay_key = relay_key.expect("an admitted hello has a valid key");
    let mut relayed = state.relay.register(relay_key, id);
    let mut budget = Budget::new(state.relay.rate);
    if sent {
        let mut ping = tokio::time::interval(PING_INTERVAL);
        let mut unanswered = 0u32;
        loop {
            tokio::select! {
                // Control messages first: a busy relay never delays them.
                biased;
                update = updates.recv() => {
                    let Some(update) = update else { break };
                    let last = matches!(*update, ServerMsg::Revoked { .. });
                    if !send(&mut socket, text(&update)).await || last {
                        break;
                    }
                    state.stats.pushed();
                }
                incoming = socket.next() => match incoming {
                    Some(Ok(Message::Pong(_))) => unanswered = 0,
                    Some(Ok(Message::Binary(frame))) => {
                        unanswered = 0;
                        state.relay.forward(&relay_key, &frame, &mut budget);
                    }
                    Some(Ok(Message::Text(t))) => {
                        unanswered = 0;
                        let outcome = serde_json::from_str::<ClientMsg>(&t)
                            .map_err(MessageError::from)
                            .and_then(|msg| {
                                let mut hub = crate::sync::lock(&state.hub);
                                hub.on_message(&fingerprint, id, msg)
                            });
                        if let Err(e) = outcome {
                            // Not fatal: a newer peer may speak messages this coordinator lacks.
                            warn!(%remote, %fingerprint, "ignored a message: {e}");
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
                frame = relayed.recv() => {
                    let Some(frame) = frame else { break };
                    if !send(&mut socket, Message::Binary(frame)).await {
                        break;
                    }
                }
                _ = ping.tick() => {
                    unanswered += 1;
                    // Nothing heard for two ticks: stalled (closed within 2 × PING_INTERVAL).
                    if unanswered > 1 || !send(&mut socket, Message::Ping(Vec::new().into())).await {
                        break;
                    }
                }
            }
        }
    }
    state.relay.unregister(&relay_key, id);
    let _ = tokio::time::timeout(SEND_TIMEOUT, socket.close()).await;
    crate::sync::lock(&state.hub).disconnect(&fingerprint, id);
    debug!(%remote, %fingerprint, "peer disconnected");
}

/// Serve the API on `listener` with TLS until the task is dropped, within the bounds above.
pub async fn serve(listener: TcpListener, tls: rustls::ServerConfig, app: Router, pending: Arc<Slots>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    loop {
        let Ok((tcp, remote)) = listener.accept().await else {
            // Out of descriptors, most likely: do not spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Some(slot) = pending.take(remote.ip()) else {
            debug!(%remote, "too many pending connections; closed");
            continue;
        };
        // Relayed packets are small and latency-bound: no Nagle.
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let slot = PendingPlace(Arc::new(Mutex::new(Some(slot))));
        let app = app.clone().layer(Extension(Remote(remote))).layer(Extension(slot));
        tokio::spawn(async move {
            let Ok(Ok(stream)) = tokio::time::timeout(HELLO_TIMEOUT, acceptor.accept(tcp)).await else {
                return;
            };
            let service = hyper::service::service_fn(move |req| app.clone().oneshot(req));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HELLO_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpSocket;

    use super::*;
    use crate::{
        coordinator::{ipam::Ipam, store::SqliteStore, tls::Certificate},
        identity::Identity,
        node::client::{Client, JoinOptions, pinning::PinnedCertificate},
    };

    /// A coordinator on loopback with one token; its URL, fingerprint and pending connections.
    async fn coordinator(dir: &std::path::Path) -> (String, String, Arc<Slots>) {
        let store = SqliteStore::for_tests("tmtok_join");
        let cert = Certificate::load_or_generate(dir).unwrap();
        let fingerprint = cert.fingerprint();
        let ipam = Ipam::new("100.64.0.0/10".parse().unwrap(), "fd00::/64".parse().unwrap(), []).unwrap();
        let hub = Hub::new(Box::new(store), ipam, "ssh-ed25519 AAAA c".into(), fingerprint.clone()).unwrap();
        let app = router(ApiState {
            hub: Arc::new(Mutex::new(hub)),
            tls_fingerprint: fingerprint.clone(),
            relay: Arc::new(Relay::new(1 << 20)),
            stats: Default::default(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let pending = Slots::new(MAX_PENDING_PER_SOURCE, MAX_PENDING);
        tokio::spawn(serve(listener, cert.server_config().unwrap(), app, pending.clone()));
        (url, fingerprint, pending)
    }

    fn joining(url: &str, fingerprint: &str) -> Client {
        let (identity, _) = Identity::generate("root@real");
        let opts = JoinOptions::without_interface(url, fingerprint, "tmtok_join");
        Client::new(&opts, Arc::new(identity)).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn five_thousand_idle_tls_connections_from_one_address_do_not_stop_a_real_join() {
        crate::sys::rlimit::raise_open_files();
        let dir = tempfile::tempdir().unwrap();
        let (url, fingerprint, pending) = coordinator(dir.path()).await;
        let server: SocketAddr = url.trim_start_matches("https://").parse().unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(PinnedCertificate::client_config(&fingerprint)));
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        // The attacker, on 127.0.0.2: 5,000 connections that finish TLS (where let in) and then
        // say nothing.
        let mut idle = Vec::new();
        let mut refused = 0;
        let mut peak = 0;
        for _ in 0..5_000 {
            let socket = TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            let Ok(tcp) = socket.connect(server).await else {
                refused += 1;
                continue;
            };
            match tokio::time::timeout(Duration::from_secs(2), connector.connect(name.clone(), tcp)).await {
                Ok(Ok(tls)) => idle.push(tls),
                _ => refused += 1,
            }
            peak = peak.max(pending.count());
        }
        // The server never held more than the cap at once (on a slow run the first idle ones
        // time out and free their places before the loop ends, so count on the server's side).
        assert!(peak <= MAX_PENDING_PER_SOURCE, "{peak} pending at once");
        assert!(refused > 5_000 / 2, "only {refused} of 5,000 refused");
        // A real node joins meanwhile (from 127.0.0.1), and is no longer pending once admitted.
        let (welcome, _socket) = joining(&url, &fingerprint).join_raw().await.expect("a real join");
        assert!(welcome[0].starts_with(r#"{"type":"welcome""#));
        // The silent ones are closed once their request headers are overdue.
        let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT + Duration::from_secs(5);
        while pending.count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(pending.count(), 0, "idle connections were closed");
        drop(idle);
    }
}
