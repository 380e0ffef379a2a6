//! Joining: TLS to the pinned certificate, the challenge, a hello signed with the node's key,
//! and the welcome (in parts).

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

use super::{JoinOptions, MeshState, Refusal, pinning};
use crate::{
    control::proto::{CONNECT_PATH, ClientMsg, JOIN_NAMESPACE, ServerMsg, join_transcript},
    identity::Identity,
    protocol::discovery::Candidates,
};

/// What `join_raw` reads of each part of a welcome (`serde_json` skips the rest).
#[derive(serde::Deserialize)]
struct PartHead {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    more: bool,
    /// Of an `error` message.
    message: Option<String>,
}

/// The coordinator client of one node.
pub struct Client {
    pub(super) url: String,
    host_port: String,
    tls: Arc<rustls::ClientConfig>,
    /// The pinned certificate fingerprint (the join signature covers it).
    fingerprint: String,
    identity: Arc<Identity>,
    token: Option<String>,
    name: Option<String>,
    listen_port: u16,
    ssh_port: u16,
    /// What the hello tells about our UDP candidates (the device's latest before a rejoin).
    pub(super) candidates: arc_swap::ArcSwap<Candidates>,
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
            fingerprint: opts.fingerprint.clone(),
            identity,
            token: opts.token.clone(),
            name: opts.name.clone(),
            listen_port: opts.listen_port,
            ssh_port: opts.ssh_port,
            candidates: Default::default(),
        })
    }

    /// Connect, prove our key, and return the welcome with the open socket.
    pub(super) async fn join(&self) -> Result<(MeshState, Socket)> {
        let (parts, ws) = self.join_raw().await?;
        let mut state: Option<MeshState> = None;
        for part in parts {
            match (
                serde_json::from_str(&part).context("unreadable welcome from the coordinator")?,
                &mut state,
            ) {
                (ServerMsg::Welcome { mesh, peers, .. }, None) => {
                    let peers = peers.into_iter().map(|p| (p.fingerprint.clone(), p)).collect();
                    state = Some(MeshState { mesh, peers });
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
        let (nonce, coordinator) = match next_msg(&mut ws).await? {
            ServerMsg::Challenge { nonce, coordinator } => {
                (BASE64.decode(nonce).context("challenge is not base64")?, coordinator)
            }
            other => bail!("the coordinator sent {other:?} instead of a challenge"),
        };
        let transcript = join_transcript(&nonce, &coordinator, &self.fingerprint);
        let candidates = self.candidates.load();
        let hello = ClientMsg::Hello {
            ssh_key: self.identity.public().ssh_line_with_comment(),
            signature: self.identity.sign(JOIN_NAMESPACE, &transcript),
            token: self.token.clone(),
            name: self.name.clone(),
            listen_port: self.listen_port,
            endpoints: candidates.endpoints().iter().map(|e| e.to_string()).collect(),
            ssh_port: (self.ssh_port != 0).then_some(self.ssh_port),
            nat: candidates.nat,
        };
        ws.send(Message::Text(serde_json::to_string(&hello)?.into())).await?;
        // The welcome comes in parts. Only each part's kind and `more` are read here (the peers are
        // skipped over, not built); `join` reads the parts whole.
        let mut parts = Vec::new();
        loop {
            let text = next_text(&mut ws).await?;
            let head: PartHead = serde_json::from_str(&text).context("unreadable message from the coordinator")?;
            let more = match head.kind.as_str() {
                "welcome" | "peers" => head.more,
                "error" => return Err(Refusal::Refused(head.message.unwrap_or_default()).into()),
                other => bail!("the coordinator sent a {other:?} message instead of a welcome"),
            };
            parts.push(text);
            if !more {
                return Ok((parts, ws));
            }
        }
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

/// Send `msg` to the coordinator.
pub async fn send_msg(ws: &mut Socket, msg: &ClientMsg) -> Result<()> {
    let text = serde_json::to_string(msg).expect("client messages serialize");
    ws.send(Message::Text(text.into()))
        .await
        .context("writing to the coordinator failed")
}

async fn next_msg(ws: &mut Socket) -> Result<ServerMsg> {
    serde_json::from_str(&next_text(ws).await?).context("unreadable message from the coordinator")
}
