//! The coordinator's metrics in the Prometheus text format: `metrics_listen` serves them at
//! `http://ADDR/metrics` (plain HTTP, meant for a private address; off by default).

use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

use super::{hub::Hub, relay::RelayCounters};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

/// What the connection handlers count as they go (shared, lock-free).
#[derive(Clone)]
pub struct Stats {
    joins: Family<Outcome, Counter>,
    join_duration: Histogram,
    pushes: Counter,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            joins: Family::default(),
            // 1 ms … 8 s.
            join_duration: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            pushes: Counter::default(),
        }
    }
}

impl Stats {
    /// A hello was answered: `admitted` or refused, `seconds` after the connection opened.
    pub fn joined(&self, admitted: bool, seconds: f64) {
        let outcome = if admitted { "admitted" } else { "refused" };
        self.joins
            .get_or_create(&Outcome {
                outcome: outcome.into(),
            })
            .inc();
        if admitted {
            self.join_duration.observe(seconds);
        }
    }

    /// One update pushed to a connected node.
    pub fn pushed(&self) {
        self.pushes.inc();
    }
}

/// The coordinator's state and counters as Prometheus text.
pub fn render(hub: &Mutex<Hub>, relay: &RelayCounters, stats: &Stats) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let (members, connected) = {
        let hub = crate::sync::lock(hub);
        (hub.member_count(), hub.connected())
    };
    let mut r = Registry::with_prefix("tunnelmesh_coordinator");
    let gauge = |v: usize| {
        let g = Gauge::<i64>::default();
        g.set(v as i64);
        g
    };
    r.register(
        "nodes",
        "Member nodes: admitted, neither revoked nor removed",
        gauge(members),
    );
    r.register("connections", "Nodes connected now", gauge(connected));
    r.register("joins", "Hellos answered, by outcome", stats.joins.clone());
    r.register_with_unit(
        "join_duration",
        "From a connection's opening to its welcome being sent",
        Unit::Seconds,
        stats.join_duration.clone(),
    );
    r.register("pushes", "Updates pushed to connected nodes", stats.pushes.clone());
    let counter = |v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        c
    };
    r.register(
        "relay_frames",
        "Frames relayed between nodes",
        counter(relay.frames.load(Relaxed)),
    );
    r.register_with_unit(
        "relay",
        "Bytes relayed between nodes",
        Unit::Bytes,
        counter(relay.bytes.load(Relaxed)),
    );
    let drops = Family::<Reason, Counter>::default();
    for (reason, n) in [
        ("no_destination", &relay.dropped_no_destination),
        ("queue_full", &relay.dropped_queue_full),
        ("rate_limited", &relay.dropped_rate_limited),
        ("malformed", &relay.dropped_malformed),
    ] {
        drops
            .get_or_create(&Reason { reason: reason.into() })
            .inc_by(n.load(Relaxed));
    }
    r.register("relay_dropped_frames", "Relay frames dropped, by reason", drops);
    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String cannot fail");
    out
}

/// Serve `/metrics` on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    hub: Arc<Mutex<Hub>>,
    relay: Arc<super::relay::Relay>,
    stats: Stats,
) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = render(&hub, &relay.counters, &stats);
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("metrics: serving stopped: {e}");
    }
}
