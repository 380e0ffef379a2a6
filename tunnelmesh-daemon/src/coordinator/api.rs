//! The coordinator's HTTPS API: `GET /v1/info` and the peer WebSocket `GET /v1/connect`.
//!
//! TLS is terminated here with rustls; HTTP/1.1 and the WebSocket upgrade by hyper and axum. A
//! malformed request gets a 4xx and affects nothing else; a peer connection that does not send
//! a valid hello within [`HELLO_TIMEOUT`] is closed.

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

/// Time a new connection has to send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// WebSocket ping interval (dead connections are noticed within two of these).
pub const PING_INTERVAL: Duration = Duration::from_secs(15);

#[derive(Clone)]
pub struct ApiState {
    pub hub: Arc<Mutex<Hub>>,
    pub tls_fingerprint: String,
    pub relay: Arc<Relay>,
}

#[derive(Clone, Copy)]
struct Remote(SocketAddr);

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
) -> impl IntoResponse {
    ws.max_message_size(1 << 20)
        .on_upgrade(move |socket| connection(state, socket, remote))
}

fn text(msg: &ServerMsg) -> Message {
    Message::Text(serde_json::to_string(msg).expect("messages serialize").into())
}

/// One peer's connection: challenge, hello, welcome, then pushed updates until it goes away.
async fn connection(state: ApiState, mut socket: WebSocket, remote: SocketAddr) {
    let mut nonce = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut nonce);
    let coordinator = crate::sync::lock(&state.hub).coordinator_key.clone();
    if socket
        .send(text(&ServerMsg::Challenge {
            nonce: BASE64.encode(nonce),
            coordinator,
        }))
        .await
        .is_err()
    {
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
            info!(%remote, "refused a peer: {message}");
            let _ = socket.send(text(&ServerMsg::Error { message })).await;
            let _ = socket.close().await;
            return;
        }
    };
    debug!(%remote, %fingerprint, "peer connected");
    let mut sent = true;
    for part in welcome {
        if socket.send(Message::Text(part.into())).await.is_err() {
            sent = false;
            break;
        }
    }
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
                    if socket.send(text(&update)).await.is_err() || last {
                        break;
                    }
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
                    if socket.send(Message::Binary(frame)).await.is_err() {
                        break;
                    }
                }
                _ = ping.tick() => {
                    unanswered += 1;
                    if unanswered > 2 || socket.send(Message::Ping(Vec::new().into())).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    state.relay.unregister(&relay_key, id);
    let _ = socket.close().await;
    crate::sync::lock(&state.hub).disconnect(&fingerprint, id);
    debug!(%remote, %fingerprint, "peer disconnected");
}

/// Serve the API on `listener` with TLS until the task is dropped.
pub async fn serve(listener: TcpListener, tls: rustls::ServerConfig, app: Router) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    loop {
        let Ok((tcp, remote)) = listener.accept().await else {
            continue;
        };
        // Relayed packets are small and latency-bound: no Nagle.
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone().layer(Extension(Remote(remote)));
        tokio::spawn(async move {
            let Ok(Ok(stream)) = tokio::time::timeout(HELLO_TIMEOUT, acceptor.accept(tcp)).await else {
                return;
            };
            let service = hyper::service::service_fn(move |req| app.clone().oneshot(req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}
