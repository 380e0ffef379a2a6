//! Watching this machine's network: a thread reads route netlink and tells the slow path when an
//! address, route or link of any interface but the mesh interface changes.

use std::{
    io,
    os::fd::AsFd,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use rtnetlink::{
    packet_core::{NetlinkBuffer, NetlinkMessage, NetlinkPayload},
    packet_route::{RouteNetlinkMessage, route::RouteAttribute},
    sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE},
};

use crate::{
    device::{Device, Event},
    netconf,
    sys::poll,
};

/// A route netlink socket subscribed to link, address and route changes (IPv4 and IPv6).
fn subscribe() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    let groups = libc::RTMGRP_LINK
        | libc::RTMGRP_IPV4_IFADDR
        | libc::RTMGRP_IPV6_IFADDR
        | libc::RTMGRP_IPV4_ROUTE
        | libc::RTMGRP_IPV6_ROUTE;
    socket.bind(&SocketAddr::new(0, groups as u32))?;
    socket.set_non_blocking(true)?;
    Ok(socket)
}

/// Watch route netlink until `dev` shuts down; tell the slow path when an address, route
/// or link of any interface but the mesh interface changes (routes of the mesh interface change
/// whenever peers come and go; they say nothing about how the world reaches us).
pub fn watch_network(dev: Arc<Device>) -> io::Result<std::thread::JoinHandle<()>> {
    let events = subscribe()?;
    // The mesh interface exists from start to stop: its index does not change under us.
    let mesh = netconf::interface_index(&dev.info.interface).map_err(io::Error::other)?;
    std::thread::Builder::new().name("tm-netwatch".into()).spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        while !dev.shutdown.load(Ordering::Relaxed) {
            if !matches!(poll::readable([events.as_fd()], Duration::from_millis(500)), Ok([true])) {
                continue;
            }
            let mut changed = false;
            loop {
                match events.recv(&mut &mut buf[..], 0) {
                    Ok(0) => break,
                    // Longer than the buffer (MSG_TRUNC): its end is lost; something changed.
                    Ok(n) if n > buf.len() => changed = true,
                    Ok(n) => changed |= concerns_other_interfaces(&buf[..n], mesh),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // The kernel dropped notifications (ENOBUFS): something changed; say so.
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => changed = true,
                    Err(_) => break,
                }
            }
            if changed {
                dev.reach.network_generation.fetch_add(1, Ordering::Relaxed);
                let _ = dev.events.try_send(Event::NetworkChanged);
            }
        }
    })
}

/// Whether a batch of route netlink notifications may be about an interface other than `mesh`.
/// A message that cannot be read (netlink-packet-route refuses it) counts as a change: a
/// refresh too many costs a STUN round, a change missed costs the tunnel.
pub(crate) fn concerns_other_interfaces(mut batch: &[u8], mesh: u32) -> bool {
    // An nlmsghdr: a message claiming less could not move the walk on.
    const HEADER: usize = 16;
    while !batch.is_empty() {
        let Ok(len) = NetlinkBuffer::new_checked(batch).map(|b| b.length() as usize) else {
            return true;
        };
        if len < HEADER {
            return true;
        }
        let index = match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&batch[..len]) {
            Ok(m) => match m.payload {
                NetlinkPayload::InnerMessage(message) => interface_of(&message),
                NetlinkPayload::Done(_) | NetlinkPayload::Noop | NetlinkPayload::Error(_) => None,
                // Overrun, and whatever netlink-packet-core learns to say next.
                _ => return true,
            },
            Err(_) => return true,
        };
        if index.is_some_and(|i| i != mesh) {
            return true;
        }
        batch = batch.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    false
}

/// The interface a link, address or route notification is about; `Some(0)` for a route
/// without an output interface (unreachable, blackhole, multipath): a change too.
fn interface_of(message: &RouteNetlinkMessage) -> Option<u32> {
    match message {
        RouteNetlinkMessage::NewLink(l) | RouteNetlinkMessage::DelLink(l) => Some(l.header.index),
        RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a) => Some(a.header.index),
        RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => Some(
            r.attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                })
                .unwrap_or(0),
        ),
        _ => None,
    }
}

/// `message` as the kernel sends it.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn nlmsg(message: RouteNetlinkMessage) -> Vec<u8> {
    emit(NetlinkMessage::from(message))
}

/// `m`'s bytes, its header made to agree with its payload and padded to 4 bytes.
#[cfg(any(test, feature = "fuzzing"))]
fn emit(mut m: NetlinkMessage<RouteNetlinkMessage>) -> Vec<u8> {
    m.finalize();
    let mut out = vec![0; m.buffer_len()];
    m.serialize(&mut out);
    out.resize(out.len().next_multiple_of(4), 0);
    out
}

/// A notification that an address was added to interface `index`, and one that a route through
/// it was: the shapes the kernel sends.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn address_and_route_on(index: u32) -> [Vec<u8>; 2] {
    use rtnetlink::{RouteMessageBuilder, packet_route::address::AddressMessage};
    let mut address = AddressMessage::default();
    address.header.family = rtnetlink::packet_route::AddressFamily::Inet;
    address.header.prefix_len = 24;
    address.header.index = index;
    address
        .attributes
        .push(rtnetlink::packet_route::address::AddressAttribute::Address(
            [10, 0, 0, 2].into(),
        ));
    let route = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
        .destination_prefix([10, 1, 0, 0].into(), 16)
        .output_interface(index)
        .build();
    [
        nlmsg(RouteNetlinkMessage::NewAddress(address)),
        nlmsg(RouteNetlinkMessage::NewRoute(route)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlink_changes_on_the_mesh_interface_alone_are_ignored() {
        let mesh = 7;
        let [addr_on_mesh, route_via_mesh] = address_and_route_on(mesh);
        let [addr_on_eth, route_via_eth] = address_and_route_on(3);
        assert!(!concerns_other_interfaces(&addr_on_mesh, mesh));
        assert!(!concerns_other_interfaces(&route_via_mesh, mesh));
        assert!(!concerns_other_interfaces(
            &[addr_on_mesh.clone(), route_via_mesh.clone()].concat(),
            mesh
        ));
        assert!(concerns_other_interfaces(&addr_on_eth, mesh));
        assert!(concerns_other_interfaces(
            &[route_via_mesh.clone(), route_via_eth].concat(),
            mesh
        ));
        let done = nlmsg_done();
        assert!(!concerns_other_interfaces(&done, mesh), "NLMSG_DONE");
        // What cannot be read is a change: a truncated batch, a length shorter than a header.
        assert!(concerns_other_interfaces(&[1, 2, 3], mesh), "truncated");
        assert!(
            concerns_other_interfaces(&addr_on_mesh[..addr_on_mesh.len() - 4], mesh),
            "cut short"
        );
        let mut short = route_via_mesh;
        short[..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(concerns_other_interfaces(&short, mesh), "length below a header");
    }

    fn nlmsg_done() -> Vec<u8> {
        emit(NetlinkMessage::new(
            Default::default(),
            NetlinkPayload::Done(rtnetlink::packet_core::DoneMessage::default()),
        ))
    }
}
