//! `tunnelmesh netcheck`: what the network between this machine and the coordinator does to UDP.
//!
//! From one UDP socket: Binding requests to the coordinator's two STUN targets (two ports) tell
//! whether UDP gets out at all, the address the outside sees, the round trip, and whether the
//! NAT maps endpoint-independently (both targets see the same address: hole punching works) or
//! endpoint-dependently ("symmetric": each destination gets another port). A second socket sends
//! to the first one's public address to test hairpinning. The default gateway is asked whether it
//! speaks NAT-PMP or PCP (UDP 5351), and the LAN whether a UPnP IGD answers SSDP.

use std::{
    net::{Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use serde::Serialize;

use crate::protocol::discovery::Discovery;

/// How long the hairpin check and the gateway questions wait for an answer.
const WAIT: Duration = Duration::from_millis(800);
/// A STUN round looks at the clock at least this often (its retries are due).
const RECEIVE_SLICE: Duration = Duration::from_millis(50);

/// What netcheck found.
#[derive(Debug, Serialize)]
pub struct Report {
    pub stun_targets: Vec<String>,
    /// Whether any STUN target answered (UDP gets out and back).
    pub udp: bool,
    /// The address each target saw us at.
    pub mapped: Vec<Option<String>>,
    /// `endpoint-independent`, `endpoint-dependent`, or `unknown`.
    pub mapping: String,
    /// Round trip to the first target.
    pub stun_rtt_ms: Option<f64>,
    /// A datagram to our own public address came back to us.
    pub hairpinning: Option<bool>,
    /// The IPv4 default gateway (the one NAT-PMP and PCP are asked).
    pub gateway: Option<String>,
    /// The IPv6 default gateway, with its interface (`fe80::1%eth0`).
    pub gateway6: Option<String>,
    pub nat_pmp: bool,
    pub pcp: bool,
    pub upnp_igd: bool,
}

/// One STUN round against `targets` from `socket`, run by the same [`Discovery`] the slow path
/// uses on the tunnel socket (its retries and its timeout): what each target saw us at, and the
/// round trip.
fn stun_round(socket: &UdpSocket, targets: [SocketAddr; 2]) -> [Option<(SocketAddr, Duration)>; 2] {
    let start = Instant::now();
    let mut discovery = Discovery::new(start);
    discovery.set_targets(Some(targets), start);
    let mut buf = [0u8; 1500];
    loop {
        for (target, request) in discovery.poll(Instant::now()) {
            let _ = socket.send_to(&request, target);
        }
        if discovery.settled() {
            return discovery.answers();
        }
        let _ = socket.set_read_timeout(Some(RECEIVE_SLICE));
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            discovery.on_response(&buf[..n], from, Instant::now());
        }
    }
}

/// Ask `gateway` on UDP 5351 with `request` (the port-mapping client's exchange); whether an
/// answer with `version` came back.
fn answers_on_5351(gateway: Ipv4Addr, request: &[u8], version: u8) -> bool {
    crate::nat::portmap::ask_5351(gateway, request).is_ok_and(|a| a.len() >= 8 && a[0] == version)
}

/// Run every check against the STUN `targets` (the coordinator's two ports).
pub fn run(targets: [SocketAddr; 2]) -> Result<Report> {
    let socket = UdpSocket::bind("0.0.0.0:0").context("cannot open a UDP socket")?;
    let answers = stun_round(&socket, targets);
    let mapped: Vec<Option<SocketAddr>> = answers.iter().map(|a| a.map(|(m, _)| m)).collect();
    let mapping = match (mapped[0], mapped[1]) {
        (Some(a), Some(b)) if a == b => "endpoint-independent",
        (Some(_), Some(_)) => "endpoint-dependent",
        _ => "unknown",
    };
    let hairpinning = mapped[0].map(|public| {
        let other = UdpSocket::bind("0.0.0.0:0").ok();
        let _ = socket.set_read_timeout(Some(WAIT));
        let marker = b"tunnelmesh-hairpin";
        let mut buf = [0u8; 64];
        other.is_some_and(|o| o.send_to(marker, public).is_ok())
            && socket.recv_from(&mut buf).is_ok_and(|(n, _)| &buf[..n] == marker)
    });
    let gateways = crate::netconf::default_gateways().unwrap_or_else(|e| {
        tracing::warn!("cannot read the default gateways: {e}");
        Default::default()
    });
    let gateway = gateways.v4;
    // NAT-PMP: version 0, opcode 0 (external address). PCP: version 2, ANNOUNCE.
    let nat_pmp = gateway.is_some_and(|g| answers_on_5351(g, &[0, 0], 0));
    let mut announce = [0u8; 24];
    announce[0] = 2;
    let pcp = gateway.is_some_and(|g| answers_on_5351(g, &announce, 2));
    Ok(Report {
        stun_targets: targets.iter().map(|t| t.to_string()).collect(),
        udp: answers.iter().any(Option::is_some),
        mapped: mapped.iter().map(|m| m.map(|a| a.to_string())).collect(),
        mapping: mapping.into(),
        stun_rtt_ms: answers.iter().flatten().next().map(|(_, rtt)| rtt.as_secs_f64() * 1e3),
        hairpinning,
        gateway: gateway.map(|g| g.to_string()),
        gateway6: gateways.v6.map(|(g, interface)| format!("{g}%{interface}")),
        nat_pmp,
        pcp,
        upnp_igd: crate::nat::portmap::upnp::find_gateway().is_ok(),
    })
}

/// The two STUN targets of a coordinator (`HOST` from `https://HOST:PORT`, or `HOST[:PORT]`):
/// `port` and the next one.
pub fn targets(coordinator: &str, port: u16) -> Result<[SocketAddr; 2]> {
    let rest = coordinator
        .strip_prefix("https://")
        .unwrap_or(coordinator)
        .trim_end_matches('/');
    let host = rest.rsplit_once(':').map_or(rest, |(h, _)| h).trim_matches(['[', ']']);
    let first = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {host}"))?
        .next()
        .ok_or_else(|| anyhow!("{host} has no address"))?;
    let second = SocketAddr::new(first.ip(), port.wrapping_add(1));
    Ok([first, second])
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let yes = |b: bool| if b { "yes" } else { "no" };
        writeln!(f, "STUN targets: {}", self.stun_targets.join(", "))?;
        writeln!(
            f,
            "UDP: {}",
            if self.udp {
                "works (STUN answered)"
            } else {
                "blocked (no STUN answer)"
            }
        )?;
        let seen: Vec<String> = self
            .mapped
            .iter()
            .map(|m| m.clone().unwrap_or_else(|| "-".into()))
            .collect();
        writeln!(f, "public address as seen by each target: {}", seen.join(", "))?;
        let meaning = match self.mapping.as_str() {
            "endpoint-independent" => " (hole punching works)",
            "endpoint-dependent" => " (symmetric NAT: direct paths need the other side to be easy, else the relay)",
            _ => "",
        };
        writeln!(f, "mapping: {}{meaning}", self.mapping)?;
        match self.stun_rtt_ms {
            Some(ms) => writeln!(f, "STUN RTT: {ms:.2} ms")?,
            None => writeln!(f, "STUN RTT: -")?,
        }
        match self.hairpinning {
            Some(h) => writeln!(f, "hairpinning: {}", yes(h))?,
            None => writeln!(f, "hairpinning: unknown")?,
        }
        writeln!(f, "gateway: {}", self.gateway.as_deref().unwrap_or("none"))?;
        writeln!(f, "IPv6 gateway: {}", self.gateway6.as_deref().unwrap_or("none"))?;
        writeln!(
            f,
            "port mapping: NAT-PMP {}, PCP {}, UPnP-IGD {}",
            yes(self.nat_pmp),
            yes(self.pcp),
            yes(self.upnp_igd)
        )
    }
}
