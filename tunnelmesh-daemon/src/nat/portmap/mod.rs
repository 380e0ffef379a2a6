//! Port mapping: ask the gateway to forward a public UDP port to our tunnel port, so peers behind
//! any NAT (a hard one included) can reach us unprompted.
//!
//! Three protocols, tried in this order: PCP (RFC 6887, MAP), NAT-PMP (RFC 6886) — both on the
//! gateway's UDP 5351, tiny binary messages written here — and UPnP-IGD (SSDP + SOAP, through
//! the `igd-next` crate). A mapping is renewed at half its lifetime and deleted when the daemon
//! stops. The mapped address becomes a candidate (see [`crate::nat`]).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

pub(crate) mod natpmp;
pub(crate) mod pcp;
pub(crate) mod upnp;

/// UDP port of PCP servers, and of NAT-PMP (its predecessor) servers.
const PCP_PORT: u16 = 5351;
/// Each request waits this long for its answer (and is sent twice).
const WAIT: Duration = Duration::from_millis(300);
/// After a failure, try again after this long.
const RETRY: Duration = Duration::from_secs(60);
/// Default lifetime asked for.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
pub(crate) const DESCRIPTION: &str = "tunnelmesh";

/// Which protocol to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    Pcp,
    NatPmp,
    Upnp,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Pcp, Protocol::NatPmp, Protocol::Upnp];

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Pcp => "pcp",
            Protocol::NatPmp => "nat-pmp",
            Protocol::Upnp => "upnp",
        }
    }
}

/// `--port-mapping`: `auto` (try each), one protocol, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum Mode {
    Off,
    Auto,
    Only(Protocol),
}

/// A `--port-mapping` value that names no mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a port-mapping mode: use auto, pcp, nat-pmp, upnp or off")]
pub struct BadMode(pub String);

impl FromStr for Mode {
    type Err = BadMode;
    fn from_str(s: &str) -> Result<Self, BadMode> {
        match s {
            "off" => Ok(Mode::Off),
            "auto" => Ok(Mode::Auto),
            other => Protocol::ALL
                .into_iter()
                .find(|p| p.name() == other)
                .map(Mode::Only)
                .ok_or_else(|| BadMode(other.into())),
        }
    }
}

impl TryFrom<String> for Mode {
    type Error = BadMode;
    fn try_from(s: String) -> Result<Self, BadMode> {
        s.parse()
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Off => f.write_str("off"),
            Mode::Auto => f.write_str("auto"),
            Mode::Only(p) => f.write_str(p.name()),
        }
    }
}

/// A mapping the gateway granted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mapping {
    pub protocol: Protocol,
    /// The public address peers reach us at.
    pub external: SocketAddr,
    pub lifetime_secs: u32,
    /// Times the mapping was renewed.
    pub renewals: u64,
    #[serde(skip)]
    pcp_nonce: [u8; 12],
}

/// Send `request` to the gateway's 5351 (twice if need be) and return the first answer from it.
pub(crate) fn ask_5351(gateway: Ipv4Addr, request: &[u8]) -> Result<Vec<u8>, MapError> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(WAIT))?;
    let mut buf = [0u8; 1100];
    for _ in 0..2 {
        socket.send_to(request, (gateway, PCP_PORT))?;
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) if from.ip() == IpAddr::V4(gateway) => return Ok(buf[..n].to_vec()),
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }
    Err(MapError::NoAnswer(SocketAddr::from((gateway, PCP_PORT))))
}

// -------------------------------------------------------------------------------------- client

/// Why no mapping was made or kept.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("port mapping is off")]
    Off,
    #[error("no IPv4 default gateway")]
    NoGateway,
    #[error("no answer from {0}")]
    NoAnswer(SocketAddr),
    #[error("{} refused the mapping with result code {}", .0.name(), .1)]
    Refused(Protocol, u16),
    #[error("{}: {}", .0.name(), .1)]
    Unexpected(Protocol, &'static str),
    #[error("UPnP: {0}")]
    Upnp(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Each protocol tried failed, in order.
    #[error("{}", .0.iter().map(|(p, e)| format!("{}: {e}", p.name())).collect::<Vec<_>>().join("; "))]
    Every(Vec<(Protocol, MapError)>),
}

/// A gateway's word for our external address is published to every peer as a candidate: refuse
/// one nobody outside could send to (a broken or hostile gateway saying loopback, link-local,
/// multicast, broadcast or unspecified — NAT-PMP's 0.0.0.0 means "no external address yet").
pub(crate) fn reachable_from_outside(protocol: Protocol, ip: IpAddr) -> Result<(), MapError> {
    let unreachable = ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || match ip {
            IpAddr::V4(v4) => v4.is_link_local() || v4.is_broadcast(),
            IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
    if unreachable {
        return Err(MapError::Unexpected(
            protocol,
            "the gateway reported an external address nobody outside can reach",
        ));
    }
    Ok(())
}

/// Keeps one mapping of our tunnel port alive.
pub struct PortMapper {
    mode: Mode,
    port: u16,
    lifetime: Duration,
    mapping: Option<Mapping>,
    /// The UPnP gateway found, kept for renewals and the deletion.
    igd: Option<igd_next::Gateway>,
}

impl PortMapper {
    pub fn new(mode: Mode, port: u16, lifetime: Duration) -> Self {
        PortMapper {
            mode,
            port,
            lifetime,
            mapping: None,
            igd: None,
        }
    }

    /// Map (or renew) the port with the first protocol that works.
    fn map(&mut self, gateway: Ipv4Addr, local: Ipv4Addr) -> Result<Mapping, MapError> {
        let protocols: Vec<Protocol> = match (self.mode, &self.mapping) {
            (Mode::Off, _) => return Err(MapError::Off),
            // Renew with the protocol that granted it.
            (_, Some(m)) => vec![m.protocol],
            (Mode::Only(p), None) => vec![p],
            (Mode::Auto, None) => Protocol::ALL.to_vec(),
        };
        let mut errors = Vec::new();
        for protocol in protocols {
            match self.map_with(protocol, gateway, local) {
                Ok(mut m) => {
                    if let Some(old) = &self.mapping {
                        m.renewals = old.renewals + 1;
                    }
                    return Ok(m);
                }
                Err(e) => errors.push((protocol, e)),
            }
        }
        Err(MapError::Every(errors))
    }

    fn map_with(&mut self, protocol: Protocol, gateway: Ipv4Addr, local: Ipv4Addr) -> Result<Mapping, MapError> {
        let lifetime = self.lifetime.as_secs().clamp(1, u32::MAX as u64) as u32;
        let previous = self.mapping.as_ref().filter(|m| m.protocol == protocol);
        let suggested = previous.map_or(self.port, |m| m.external.port());
        match protocol {
            Protocol::Pcp => {
                // A renewal repeats the nonce (RFC 6887 §11.2).
                let nonce = previous.map_or_else(
                    || {
                        let mut n = [0u8; 12];
                        rand::thread_rng().fill_bytes(&mut n);
                        n
                    },
                    |m| m.pcp_nonce,
                );
                let answer = ask_5351(gateway, &pcp::map_request(local, nonce, self.port, suggested, lifetime))?;
                let (external, lifetime_secs) = pcp::parse_map(&answer, &nonce)?;
                reachable_from_outside(protocol, external.ip())?;
                Ok(Mapping {
                    protocol,
                    external,
                    lifetime_secs,
                    renewals: 0,
                    pcp_nonce: nonce,
                })
            }
            Protocol::NatPmp => {
                let address = natpmp::parse_address(&ask_5351(gateway, &[0, 0])?)?;
                reachable_from_outside(protocol, address.into())?;
                let answer = ask_5351(gateway, &natpmp::map_request(self.port, suggested, lifetime))?;
                let (port, lifetime_secs) = natpmp::parse_map(&answer, self.port)?;
                Ok(Mapping {
                    protocol,
                    external: SocketAddr::new(IpAddr::V4(address), port),
                    lifetime_secs,
                    renewals: 0,
                    pcp_nonce: [0; 12],
                })
            }
            Protocol::Upnp => {
                if self.igd.is_none() {
                    self.igd = Some(upnp::find_gateway()?);
                }
                let igd = self.igd.as_ref().expect("just found");
                let external = upnp::map(igd, SocketAddrV4::new(local, self.port), suggested, lifetime)?;
                Ok(Mapping {
                    protocol,
                    external,
                    lifetime_secs: lifetime,
                    renewals: 0,
                    pcp_nonce: [0; 12],
                })
            }
        }
    }

    /// Delete the mapping (lifetime 0), if there is one.
    fn unmap(&mut self, gateway: Ipv4Addr, local: Ipv4Addr) {
        let Some(m) = self.mapping.take() else {
            return;
        };
        let result = match m.protocol {
            Protocol::Pcp => ask_5351(
                gateway,
                &pcp::map_request(local, m.pcp_nonce, self.port, m.external.port(), 0),
            )
            .map(drop),
            Protocol::NatPmp => ask_5351(gateway, &natpmp::map_request(self.port, 0, 0)).map(drop),
            Protocol::Upnp => match &self.igd {
                Some(igd) => igd
                    .remove_port(igd_next::PortMappingProtocol::UDP, m.external.port())
                    .map_err(|e| MapError::Upnp(e.to_string())),
                None => Ok(()),
            },
        };
        match result {
            Ok(()) => info!(protocol = m.protocol.name(), external = %m.external, "port mapping removed"),
            Err(e) => warn!(protocol = m.protocol.name(), "removing the port mapping failed: {e}"),
        }
    }
}

/// Our address towards `gateway` (the internal address of a mapping).
fn local_address_towards(gateway: Ipv4Addr) -> Option<Ipv4Addr> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect((gateway, PCP_PORT)).ok()?;
    match socket.local_addr().ok()?.ip() {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    }
}

/// What the mapping thread shares with the interface it serves.
pub struct MappingHandle {
    /// The UDP port to map.
    pub port: u16,
    /// Set when the interface stops: delete the mapping and return.
    pub shutdown: Arc<AtomicBool>,
    /// Bumped on every change of this machine's addresses or routes: map again.
    pub network_generation: Arc<AtomicU64>,
    /// Where the mapping is published while it holds (discovery turns it into a candidate).
    pub slot: Arc<ArcSwapOption<Mapping>>,
}

/// Keep a mapping of the port while the interface runs: map, renew at half the lifetime, map
/// again after a network change or a failure, delete at shutdown.
pub fn run(handle: MappingHandle, mode: Mode, lifetime: Duration) {
    let MappingHandle {
        port,
        shutdown,
        network_generation,
        slot,
    } = handle;
    let mut mapper = PortMapper::new(mode, port, lifetime);
    let mut next = Instant::now();
    let mut seen_change = network_generation.load(Ordering::Relaxed);
    let mut route: Option<(Ipv4Addr, Ipv4Addr)> = None;
    while !shutdown.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        let generation = network_generation.load(Ordering::Relaxed);
        if generation != seen_change {
            seen_change = generation;
            next = Instant::now();
        }
        if Instant::now() < next {
            continue;
        }
        let now_route = super::default_gateway().and_then(|g| Some((g, local_address_towards(g)?)));
        if now_route != route {
            // Another network: the old gateway's mapping is not ours to renew.
            if let Some((g, l)) = route {
                mapper.unmap(g, l);
            }
            mapper.mapping = None;
            mapper.igd = None;
            route = now_route;
        }
        let result = match route {
            Some((gateway, local)) => mapper.map(gateway, local),
            None => Err(MapError::NoGateway),
        };
        match result {
            Ok(m) => {
                if mapper.mapping.as_ref().is_none_or(|old| old.external != m.external) {
                    info!(protocol = m.protocol.name(), external = %m.external, lifetime = m.lifetime_secs, "port mapped");
                } else {
                    debug!(protocol = m.protocol.name(), external = %m.external, "port mapping renewed");
                }
                next = Instant::now() + Duration::from_secs(u64::from(m.lifetime_secs.max(2)) / 2);
                mapper.mapping = Some(m.clone());
                slot.store(Some(Arc::new(m)));
            }
            Err(e) => {
                if mapper.mapping.take().is_some() || slot.load().is_some() {
                    warn!("port mapping lost: {e}");
                } else {
                    debug!("no port mapping: {e}");
                }
                slot.store(None);
                next = Instant::now() + RETRY;
            }
        }
    }
    if let Some((gateway, local)) = route {
        mapper.unmap(gateway, local);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_name_themselves() {
        for s in ["off", "auto", "pcp", "nat-pmp", "upnp"] {
            assert_eq!(s.parse::<Mode>().unwrap().to_string(), s);
        }
        assert!(
            "igd"
                .parse::<Mode>()
                .unwrap_err()
                .to_string()
                .contains("auto, pcp, nat-pmp, upnp or off")
        );
    }

    /// A gateway that says our external address is loopback (or link-local, multicast,
    /// broadcast, unspecified) would have every peer aim at itself: refused, for all three.
    #[test]
    fn an_external_address_nobody_outside_can_reach_is_refused() {
        for bad in [
            "127.0.0.1",
            "0.0.0.0",
            "169.254.1.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "fe80::1",
            "::",
        ] {
            for p in Protocol::ALL {
                assert!(
                    reachable_from_outside(p, bad.parse().unwrap()).is_err(),
                    "{bad} via {}",
                    p.name()
                );
            }
        }
        for good in ["198.18.0.7", "203.0.113.9", "2001:db8::7", "100.64.1.1"] {
            assert!(
                reachable_from_outside(Protocol::Upnp, good.parse().unwrap()).is_ok(),
                "{good}"
            );
        }
    }
}
