//! UPnP-IGD through `igd-next`: finding the gateway (SSDP) is all that is ours; adding and
//! removing the mapping are its calls.

use std::time::Duration;

use super::MapError;

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
