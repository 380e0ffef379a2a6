//! Watching this machine's network: a thread reads route netlink and tells the slow path when an
//! address, route or link of any interface but the mesh interface changes.

use std::{
    os::fd::AsFd,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use crate::{
    device::{Device, Event},
    sys::{
        netlink::{self, RouteEvents},
        poll,
    },
};

/// Watch route netlink until `dev` shuts down; tell the slow path when an address, route
/// or link of any interface but the mesh interface changes (routes of the mesh interface change
/// whenever peers come and go; they say nothing about how the world reaches us).
pub fn watch_network(dev: Arc<Device>) -> std::io::Result<std::thread::JoinHandle<()>> {
    let events = RouteEvents::open()?;
    std::thread::Builder::new().name("tm-netwatch".into()).spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        while !dev.shutdown.load(Ordering::Relaxed) {
            if !matches!(poll::readable([events.as_fd()], Duration::from_millis(500)), Ok([true])) {
                continue;
            }
            let mesh = netlink::interface_index(&dev.info.interface).unwrap_or(0);
            let mut changed = false;
            while let Ok(n) = events.read(&mut buf) {
                if n == 0 {
                    break;
                }
                changed |= n == buf.len() || concerns_other_interfaces(&buf[..n], mesh);
            }
            if changed {
                dev.reach.network_generation.fetch_add(1, Ordering::Relaxed);
                let _ = dev.events.try_send(Event::NetworkChanged);
            }
        }
    })
}

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTA_OIF: u16 = 4;
const NLMSG_HDR: usize = 16;
const RTMSG_LEN: usize = 12;

/// Whether a batch of route-netlink notifications is about an interface other than `mesh`.
pub(crate) fn concerns_other_interfaces(mut batch: &[u8], mesh: u32) -> bool {
    let u16_at = |b: &[u8], i: usize| b.get(i..i + 2).map(|v| u16::from_ne_bytes([v[0], v[1]]));
    let u32_at = |b: &[u8], i: usize| b.get(i..i + 4).map(|v| u32::from_ne_bytes([v[0], v[1], v[2], v[3]]));
    while let (Some(len), Some(kind)) = (u32_at(batch, 0), u16_at(batch, 4)) {
        let len = len as usize;
        if len < NLMSG_HDR || len > batch.len() {
            return false;
        }
        let body = &batch[NLMSG_HDR..len];
        let index = match kind {
            // ifinfomsg and ifaddrmsg both carry the interface index at offset 4.
            RTM_NEWLINK | RTM_DELLINK | RTM_NEWADDR | RTM_DELADDR => u32_at(body, 4),
            RTM_NEWROUTE | RTM_DELROUTE => {
                let mut attrs = body.get(RTMSG_LEN..).unwrap_or(&[]);
                let mut oif = None;
                while let (Some(alen), Some(atype)) = (u16_at(attrs, 0), u16_at(attrs, 2)) {
                    let alen = alen as usize;
                    if alen < 4 || alen > attrs.len() {
                        break;
                    }
                    if atype == RTA_OIF {
                        oif = u32_at(attrs, 4);
                    }
                    attrs = attrs.get(alen.next_multiple_of(4)..).unwrap_or(&[]);
                }
                // A route without an output interface (unreachable, blackhole) is a change too.
                Some(oif.unwrap_or(0))
            }
            _ => None,
        };
        if index.is_some_and(|i| i != mesh) {
            return true;
        }
        batch = batch.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    false
}

/// One netlink message: header of `kind`, then `body`.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn nlmsg(kind: u16, body: &[u8]) -> Vec<u8> {
    let mut m = ((16 + body.len()) as u32).to_ne_bytes().to_vec();
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&[0; 10]);
    m.extend_from_slice(body);
    m.resize(m.len().next_multiple_of(4), 0);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlink_changes_on_the_mesh_interface_alone_are_ignored() {
        let addr_on = |index: u32| nlmsg(RTM_NEWADDR, &[&[2, 24, 0, 0][..], &index.to_ne_bytes()].concat());
        let route_via = |index: u32| {
            let mut body = vec![2, 32, 0, 0, 254, 4, 0, 1, 0, 0, 0, 0];
            body.extend_from_slice(&8u16.to_ne_bytes());
            body.extend_from_slice(&RTA_OIF.to_ne_bytes());
            body.extend_from_slice(&index.to_ne_bytes());
            nlmsg(RTM_NEWROUTE, &body)
        };
        let mesh = 7;
        assert!(!concerns_other_interfaces(&addr_on(mesh), mesh));
        assert!(!concerns_other_interfaces(&route_via(mesh), mesh));
        assert!(concerns_other_interfaces(&addr_on(2), mesh));
        assert!(concerns_other_interfaces(
            &[route_via(mesh), route_via(3)].concat(),
            mesh
        ));
        assert!(!concerns_other_interfaces(&nlmsg(3, &[]), mesh), "NLMSG_DONE");
        assert!(!concerns_other_interfaces(&[1, 2, 3], mesh), "truncated");
    }
}
