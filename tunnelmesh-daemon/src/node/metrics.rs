//! A node's counters in the Prometheus text format (`prometheus-client`): `tunnelmesh metrics`
//! prints them from the status socket, and `metrics_listen` serves them at `/metrics`.
//!
//! Names follow Prometheus conventions: a `tunnelmesh_` prefix, base units (`_bytes`,
//! `_seconds`), `_total` on counters, and what varies (peer, reason, rule, path) in labels.

use std::net::SocketAddr;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

use crate::node::status::Status;

/// Label sets (one type per shape, so a family's labels are typed).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Peer {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerPath {
    peer: String,
    path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Rule {
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Info {
    interface: String,
    version: String,
    enforcement: String,
    shield: String,
    nat: String,
    coordinator: String,
}

fn counters<L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    values: impl IntoIterator<Item = (L, u64)>,
) {
    let family = Family::<L, Counter>::default();
    for (labels, v) in values {
        family.get_or_create(&labels).inc_by(v);
    }
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, family),
        None => registry.register(name, help, family),
    }
}

fn gauge(registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>, v: i64) {
    let g = Gauge::<i64>::default();
    g.set(v);
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, g),
        None => registry.register(name, help, g),
    }
}

/// `status` as Prometheus text.
pub fn render(status: &Status) -> String {
    let mut r = Registry::with_prefix("tunnelmesh");
    let peer = |name: &str| Peer { peer: name.to_string() };
    let info = Family::<Info, Gauge>::default();
    info.get_or_create(&Info {
        interface: status.interface.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        enforcement: status
            .policy
            .as_ref()
            .map_or("none".into(), |p| format!("{:?}", p.enforcement).to_lowercase()),
        shield: format!("{:?}", status.fastpath.enforcement).to_lowercase(),
        nat: format!("{:?}", status.nat.nat).to_lowercase(),
        coordinator: status
            .coordinator
            .as_ref()
            .map_or("none".into(), |c| c.state.to_string()),
    })
    .set(1);
    r.register(
        "node_info",
        "The interface, version, policy enforcer (ebpf, userspace, none), shield, NAT kind and coordinator state",
        info,
    );
    gauge(
        &mut r,
        "uptime",
        "Seconds since the interface came up",
        Some(Unit::Seconds),
        status.uptime_secs as i64,
    );
    gauge(&mut r, "peers", "Configured peers", None, status.peers.len() as i64);
    gauge(
        &mut r,
        "peers_up",
        "Peers with a handshake in the last 180 s",
        None,
        status
            .peers
            .iter()
            .filter(|p| p.last_handshake_secs.is_some_and(|s| s < 180))
            .count() as i64,
    );
    counters(
        &mut r,
        "peer_received",
        "Bytes received from each peer",
        Some(Unit::Bytes),
        status.peers.iter().map(|p| (peer(&p.name), p.rx_bytes)),
    );
    counters(
        &mut r,
        "peer_sent",
        "Bytes sent to each peer",
        Some(Unit::Bytes),
        status.peers.iter().map(|p| (peer(&p.name), p.tx_bytes)),
    );
    let age = Family::<Peer, Gauge>::default();
    for p in &status.peers {
        if let Some(s) = p.last_handshake_secs {
            age.get_or_create(&peer(&p.name)).set(s as i64);
        }
    }
    r.register_with_unit(
        "peer_last_handshake_age",
        "Seconds since each peer's last completed handshake",
        Unit::Seconds,
        age,
    );
    let path = Family::<PeerPath, Gauge>::default();
    for p in &status.peers {
        path.get_or_create(&PeerPath {
            peer: p.name.clone(),
            path: p.path.clone(),
        })
        .set(1);
    }
    r.register(
        "peer_path",
        "The path each peer's traffic takes (udp, ssh, relay)",
        path,
    );
    counters(
        &mut r,
        "datapath_events",
        "Data-plane and handshake events by reason (drops, rejections, coalesced segments, …)",
        None,
        status.counters.iter().map(|(k, v)| (Reason { reason: k.clone() }, *v)),
    );
    counters(
        &mut r,
        "shield_packets",
        "Underlay datagrams the kernel shield judged, by verdict",
        None,
        status
            .fastpath
            .shield
            .iter()
            .map(|(k, v)| (Reason { reason: k.clone() }, *v)),
    );
    if let Some(policy) = &status.policy {
        counters(
            &mut r,
            "acl_packets",
            "Inbound mesh packets the policy judged, by verdict",
            None,
            policy.counters.iter().map(|(k, v)| (Reason { reason: k.clone() }, *v)),
        );
        counters(
            &mut r,
            "acl_rule_hits",
            "Inbound mesh packets allowed by each rule",
            None,
            policy.rule_hits.iter().map(|(k, v)| (Rule { rule: k.to_string() }, *v)),
        );
    }
    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String cannot fail");
    out
}

/// Serve `/metrics` on `addr` until `shutdown`, each answer rendered from `status()`.
pub fn serve(
    addr: SocketAddr,
    status: std::sync::Arc<dyn Fn() -> Status + Send + Sync>,
    shutdown: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    std::thread::Builder::new().name("tm-metrics".into()).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(r) => r,
            Err(e) => return tracing::error!("metrics: cannot start a runtime: {e}"),
        };
        runtime.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let status = status.clone();
                    async move {
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )],
                            render(&status()),
                        )
                    }
                }),
            );
            let stop = async move {
                while !shutdown.load(std::sync::atomic::Ordering::Relaxed) {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            };
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
                tracing::error!("metrics: serving stopped: {e}");
            }
        });
    })
}
