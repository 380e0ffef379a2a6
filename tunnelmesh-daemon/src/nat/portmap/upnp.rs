//! UPnP-IGD through `igd-next`: finding the gateway (SSDP) is all that is ours; adding and
//! removing the mapping are its calls, and what it hands back is checked here.

use std::{
    net::{SocketAddr, SocketAddrV4},
    time::Duration,
};

use super::{DESCRIPTION, MapError, Protocol, reachable_from_outside};

/// How long an SSDP search for a UPnP gateway waits.
const SEARCH: Duration = Duration::from_millis(1500);

/// An Internet Gateway Device answering an SSDP search (and serving its description).
pub(crate) fn find_gateway() -> Result<igd_next::Gateway, MapError> {
    let mut options = igd_next::SearchOptions::default();
    // Short: the daemon waits for the port-mapping thread when it stops.
    options.timeout = Some(SEARCH);
    options.single_search_timeout = Some(SEARCH);
    igd_next::search_gateway(options).map_err(|e| MapError::Upnp(e.to_string()))
}

/// Map UDP `external_port` on `igd` to `local` for `lifetime` seconds; the external address
/// the gateway then reports, if anyone outside could reach it.
pub(crate) fn map(
    igd: &igd_next::Gateway,
    local: SocketAddrV4,
    external_port: u16,
    lifetime: u32,
) -> Result<SocketAddr, MapError> {
    igd.add_port(
        igd_next::PortMappingProtocol::UDP,
        external_port,
        local.into(),
        lifetime,
        DESCRIPTION,
    )
    .map_err(|e| MapError::Upnp(e.to_string()))?;
    let ip = igd.get_external_ip().map_err(|e| MapError::Upnp(e.to_string()))?;
    reachable_from_outside(Protocol::Upnp, ip)?;
    Ok(SocketAddr::new(ip, external_port))
}
