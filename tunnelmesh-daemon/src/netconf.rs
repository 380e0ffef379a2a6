//! The kernel's network configuration over route netlink (`rtnetlink`): the mesh interface's MTU,
//! link state, addresses and routes, and what this host says about itself — its links, global
//! addresses and default gateways. No `ip` subprocess: iproute2 is not a runtime dependency.
//!
//! Every request is answered (acknowledged or refused) before the next is sent, so an error names
//! the step that failed, the interface and the kernel's own reason.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures_util::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::{
    Handle, LinkUnspec, RouteMessageBuilder,
    packet_route::{
        address::{AddressAttribute, AddressFlags, AddressScope},
        link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage},
        route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum NetconfError {
    #[error("cannot open a route netlink socket: {0}")]
    Open(#[source] io::Error),
    #[error("there is no interface named `{0}` in this network namespace")]
    NoInterface(String),
    #[error("cannot {action}: {reason}")]
    Request { action: String, reason: String },
}

/// Why the kernel refused (its errno, as `ip` would print it), or what else went wrong.
fn reason(e: rtnetlink::Error) -> String {
    match e {
        rtnetlink::Error::NetlinkError(m) => format!("the kernel answered: {}", m.to_io()),
        other => other.to_string(),
    }
}

/// One route netlink connection, driven by a runtime of its own on the calling thread: the
/// callers (interface start, reload, the slow-path thread) are plain threads, never async tasks.
struct Netlink {
    runtime: tokio::runtime::Runtime,
    handle: Handle,
}

impl Netlink {
    fn open() -> Result<Self, NetconfError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(NetconfError::Open)?;
        let (connection, handle, _) = {
            let _entered = runtime.enter();
            rtnetlink::new_connection().map_err(NetconfError::Open)?
        };
        runtime.spawn(connection);
        Ok(Netlink { runtime, handle })
    }

    /// Run one request; `action` says what it was for, in the error.
    fn run<T>(
        &self,
        action: impl FnOnce() -> String,
        request: impl Future<Output = Result<T, rtnetlink::Error>>,
    ) -> Result<T, NetconfError> {
        self.runtime.block_on(request).map_err(|e| NetconfError::Request {
            action: action(),
            reason: reason(e),
        })
    }

    fn links(&self) -> Result<Vec<Link>, NetconfError> {
        let links: Vec<LinkMessage> = self.run(
            || "list this host's interfaces".into(),
            self.handle.link().get().execute().try_collect(),
        )?;
        Ok(links.iter().map(Link::from).collect())
    }

    fn index(&self, name: &str) -> Result<u32, NetconfError> {
        self.links()?
            .into_iter()
            .find(|l| l.name == name)
            .map(|l| l.index)
            .ok_or_else(|| NetconfError::NoInterface(name.to_string()))
    }

    /// Every route of both families, of every table.
    fn routes(&self) -> Result<Vec<RouteMessage>, NetconfError> {
        let mut routes = Vec::new();
        for family in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let dump: Vec<RouteMessage> = self.run(
                || "list this host's routes".into(),
                self.handle.route().get(family).execute().try_collect(),
            )?;
            routes.extend(dump);
        }
        Ok(routes)
    }

    fn set_link(&self, action: impl FnOnce() -> String, message: LinkMessage) -> Result<(), NetconfError> {
        self.run(action, self.handle.link().set(message).execute())
    }

    fn replace_address(&self, name: &str, index: u32, address: &IpNet) -> Result<(), NetconfError> {
        let mut request = self
            .handle
            .address()
            .add(index, address.addr(), address.prefix_len())
            .replace();
        if address.addr().is_ipv6() {
            // No duplicate address detection: the mesh address is ours alone, and DAD would hold
            // it tentative (unusable) for a second after every start.
            request
                .message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        self.run(|| format!("add address {address} to {name}"), request.execute())
    }

    fn replace_route(&self, name: &str, index: u32, route: &IpNet) -> Result<(), NetconfError> {
        let mut message = route_into(index, route);
        // A route with no gateway: the destination is on the link (as `ip route add … dev`).
        message.header.scope = RouteScope::Link;
        self.run(
            || format!("route {} into {name}", route.trunc()),
            self.handle.route().add(message).replace().execute(),
        )
    }

    fn delete_route(&self, name: &str, index: u32, route: &IpNet) -> Result<(), NetconfError> {
        // As `ip route del`: any scope, protocol and type, as long as it leads into `name`.
        let mut message = route_into(index, route);
        message.header.scope = RouteScope::NoWhere;
        message.header.protocol = RouteProtocol::Unspec;
        message.header.kind = RouteType::Unspec;
        self.run(
            || format!("remove the route {} from {name}", route.trunc()),
            self.handle.route().del(message).execute(),
        )
    }
}

/// A static unicast route to `route` (its network) through interface `index`, in the main table.
fn route_into(index: u32, route: &IpNet) -> RouteMessage {
    let net = route.trunc();
    match net.addr() {
        IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(a, net.prefix_len())
            .output_interface(index)
            .build(),
        IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(a, net.prefix_len())
            .output_interface(index)
            .build(),
    }
}

/// What a link dump says of one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub up: bool,
    pub loopback: bool,
    /// Frames carry an Ethernet header (what the underlay shield parses).
    pub ethernet: bool,
    /// One end of a veth pair (a container's or network namespace's link).
    pub veth: bool,
}

impl From<&LinkMessage> for Link {
    fn from(m: &LinkMessage) -> Self {
        let name = m.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        });
        let veth = m.attributes.iter().any(|a| match a {
            LinkAttribute::LinkInfo(infos) => infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))),
            _ => false,
        });
        Link {
            index: m.header.index,
            name: name.unwrap_or_default(),
            up: m.header.flags.contains(LinkFlags::Up),
            loopback: m.header.flags.contains(LinkFlags::Loopback),
            ethernet: m.header.link_layer_type == LinkLayerType::Ether,
            veth,
        }
    }
}

impl Link {
    /// Up, not loopback and not the mesh interface: a way the world may reach this host.
    fn carries_underlay(&self, mesh_interface: &str) -> bool {
        self.up && !self.loopback && self.name != mesh_interface
    }
}

/// The index of interface `name`.
pub fn interface_index(name: &str) -> Result<u32, NetconfError> {
    Netlink::open()?.index(name)
}

/// Interfaces of this network namespace that are up, except loopback and `mesh_interface`:
/// the default targets of the underlay shield.
pub fn underlay_interfaces(mesh_interface: &str) -> Result<Vec<Link>, NetconfError> {
    Ok(Netlink::open()?
        .links()?
        .into_iter()
        .filter(|l| l.carries_underlay(mesh_interface))
        .collect())
}

/// The interfaces called `names`, in that order; each must exist.
pub fn interfaces_named(names: &[String]) -> Result<Vec<Link>, NetconfError> {
    let links = Netlink::open()?.links()?;
    names
        .iter()
        .map(|name| {
            links
                .iter()
                .find(|l| &l.name == name)
                .cloned()
                .ok_or_else(|| NetconfError::NoInterface(name.clone()))
        })
        .collect()
}

/// The global (universe-scope) addresses of the interfaces that are up, except loopback and
/// `mesh_interface`, in the kernel's order.
pub fn global_addresses(mesh_interface: &str) -> Result<Vec<IpAddr>, NetconfError> {
    let nl = Netlink::open()?;
    let usable: HashMap<u32, Link> = nl
        .links()?
        .into_iter()
        .filter(|l| l.carries_underlay(mesh_interface))
        .map(|l| (l.index, l))
        .collect();
    let addresses: Vec<_> = nl.run(
        || "list this host's addresses".into(),
        nl.handle.address().get().execute().try_collect(),
    )?;
    Ok(addresses
        .iter()
        .filter(|m| m.header.scope == AddressScope::Universe && usable.contains_key(&m.header.index))
        .filter_map(|m| {
            // IFA_LOCAL is this end's address; IFA_ADDRESS is the peer's on a point-to-point link
            // (and the same as IFA_LOCAL elsewhere). IPv6 carries IFA_ADDRESS alone.
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            local.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            })
        })
        .collect())
}

/// This host's default gateways in the main table, one per family: the one with the lowest
/// metric. An IPv6 gateway is usually link-local, so it comes with its interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Gateways {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<(Ipv6Addr, String)>,
}

pub fn default_gateways() -> Result<Gateways, NetconfError> {
    let nl = Netlink::open()?;
    let names: HashMap<u32, String> = nl.links()?.into_iter().map(|l| (l.index, l.name)).collect();
    let routes = nl.routes()?;
    let mut best: [Option<(u32, IpAddr, u32)>; 2] = [None, None];
    for (metric, gateway, oif) in routes.iter().filter_map(default_route) {
        let slot = &mut best[usize::from(gateway.is_ipv6())];
        if slot.is_none_or(|(m, ..)| metric < m) {
            *slot = Some((metric, gateway, oif));
        }
    }
    Ok(Gateways {
        v4: best[0].and_then(|(_, g, _)| match g {
            IpAddr::V4(g) => Some(g),
            IpAddr::V6(_) => None,
        }),
        v6: best[1].and_then(|(_, g, oif)| match g {
            IpAddr::V6(g) => Some((g, names.get(&oif).cloned().unwrap_or_default())),
            IpAddr::V4(_) => None,
        }),
    })
}

/// `(metric, gateway, output interface)` of a unicast default route of the main table; of a
/// multipath one, its first next hop with a gateway.
fn default_route(m: &RouteMessage) -> Option<(u32, IpAddr, u32)> {
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table));
    if m.header.destination_prefix_length != 0
        || m.header.kind != RouteType::Unicast
        || table != u32::from(RouteHeader::RT_TABLE_MAIN)
    {
        return None;
    }
    let gateway_of = |attributes: &[RouteAttribute]| {
        attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(IpAddr::V4(*g)),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => Some(IpAddr::V6(*g)),
            _ => None,
        })
    };
    let metric = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0);
    let oif = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    if let Some(g) = gateway_of(&m.attributes) {
        return Some((metric, g, oif.unwrap_or(0)));
    }
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::MultiPath(hops) => hops
            .iter()
            .find_map(|h| gateway_of(&h.attributes).map(|g| (metric, g, h.interface_index))),
        _ => None,
    })
}

/// Whether `interface` can carry IPv6 (it cannot where `net.ipv6.conf.*.disable_ipv6` is 1, or
/// the kernel runs without IPv6).
pub fn ipv6_enabled(interface: &str) -> bool {
    std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{interface}/disable_ipv6")).is_ok_and(|v| v.trim() == "0")
}

/// Bring `name` up with `mtu`, `addresses`, and routes for `routes`. Without IPv6 on the device
/// its IPv6 addresses and routes are left out; the families configured are returned.
pub fn configure(name: &str, mtu: usize, addresses: &[IpNet], routes: &[IpNet]) -> Result<Families, NetconfError> {
    let nl = Netlink::open()?;
    let index = nl.index(name)?;
    nl.set_link(
        || format!("set the MTU of {name} to {mtu}"),
        LinkUnspec::new_with_index(index).mtu(mtu as u32).build(),
    )?;
    let families = Families {
        ipv6: ipv6_enabled(name),
    };
    for addr in addresses.iter().filter(|a| a.addr().is_ipv4() || families.ipv6) {
        nl.replace_address(name, index, addr)?;
    }
    nl.set_link(
        || format!("bring {name} up"),
        LinkUnspec::new_with_index(index).up().build(),
    )?;
    for route in routes.iter().filter(|r| r.addr().is_ipv4() || families.ipv6) {
        nl.replace_route(name, index, route)?;
    }
    Ok(families)
}

/// Route `add` into `name` and take `remove` off it (a reload's peer changes). All or nothing: if
/// a route cannot be added, the ones added before it are taken off again and nothing is removed.
/// IPv6 routes are skipped where the device carries no IPv6.
pub fn change_routes(name: &str, ipv6: bool, add: &[IpNet], remove: &[IpNet]) -> Result<(), NetconfError> {
    let nl = Netlink::open()?;
    let index = nl.index(name)?;
    let carried = |r: &&IpNet| r.addr().is_ipv4() || ipv6;
    let mut added: Vec<IpNet> = Vec::new();
    for route in add.iter().filter(carried) {
        if let Err(e) = nl.replace_route(name, index, route) {
            for done in &added {
                let _ = nl.delete_route(name, index, done);
            }
            return Err(e);
        }
        added.push(*route);
    }
    for route in remove.iter().filter(carried) {
        // Already gone (an operator removed it) is what we wanted.
        let _ = nl.delete_route(name, index, route);
    }
    Ok(())
}

/// What [`configure`] could set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Families {
    pub ipv6: bool,
}

#[cfg(test)]
mod tests {
    //! Each test runs on a thread of its own in a new, empty network namespace (root:
    //! CAP_SYS_ADMIN), so it can change links and routes freely and leaves nothing behind: the
    //! namespace goes with the thread.

    use super::*;
    use crate::sys::netns;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// Run `test` in a new network namespace holding a veth pair `m0`/`m1`, both down.
    fn in_a_namespace_of_its_own(test: impl FnOnce(&Netlink) + Send + 'static) {
        std::thread::spawn(move || {
            netns::unshare_network().expect("a network namespace of its own (the tests run as root)");
            let nl = Netlink::open().unwrap();
            nl.run(
                || "create a veth pair".into(),
                nl.handle
                    .link()
                    .add(rtnetlink::LinkVeth::new("m0", "m1").build())
                    .execute(),
            )
            .unwrap();
            test(&nl);
        })
        .join()
        .unwrap();
    }

    /// The destinations of the routes into interface `index` of the main table.
    fn routes_into(nl: &Netlink, index: u32) -> Vec<IpNet> {
        let mut found = Vec::new();
        for m in nl
            .routes()
            .unwrap()
            .iter()
            .filter(|m| m.header.table == RouteHeader::RT_TABLE_MAIN)
        {
            let into = m.attributes.contains(&RouteAttribute::Oif(index));
            let destination = m.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(IpAddr::V4(*d)),
                RouteAttribute::Destination(RouteAddress::Inet6(d)) => Some(IpAddr::V6(*d)),
                _ => None,
            });
            if let (true, Some(d)) = (into, destination) {
                found.push(IpNet::new(d, m.header.destination_prefix_length).unwrap());
            }
        }
        found
    }

    fn mtu_of(nl: &Netlink, name: &str) -> u32 {
        let links: Vec<LinkMessage> = nl
            .run(
                || "dump".into(),
                nl.handle.link().get().match_name(name).execute().try_collect(),
            )
            .unwrap();
        links[0]
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
            .unwrap()
    }

    #[test]
    fn configure_sets_the_mtu_the_addresses_the_link_state_and_the_routes() {
        in_a_namespace_of_its_own(|nl| {
            let addresses = [net("100.64.0.1/10"), net("fd7a:115c:a1e0::1/48")];
            let routes = [net("10.9.0.0/16"), net("10.20.30.40/32"), net("fd00:9::1/32")];
            let families = configure("m0", 1380, &addresses, &routes).unwrap();
            assert!(families.ipv6, "a new namespace carries IPv6");

            assert_eq!(mtu_of(nl, "m0"), 1380);
            let m0 = nl.links().unwrap().into_iter().find(|l| l.name == "m0").unwrap();
            assert!(m0.up);
            assert_eq!(interface_index("m0").unwrap(), m0.index);
            // The mesh interface's own addresses are not host candidates; seen as any other
            // interface, they are listed, IPv4 as IFA_LOCAL.
            assert_eq!(global_addresses("m0").unwrap(), Vec::<IpAddr>::new());
            let listed = global_addresses("tm0").unwrap();
            assert!(listed.contains(&"100.64.0.1".parse().unwrap()), "{listed:?}");
            assert!(listed.contains(&"fd7a:115c:a1e0::1".parse().unwrap()), "{listed:?}");

            let into = routes_into(nl, m0.index);
            for r in [net("10.9.0.0/16"), net("10.20.30.40/32"), net("fd00:9::/32")] {
                assert!(into.contains(&r), "{r} missing from {into:?}");
            }
            // Applying the same again changes nothing and fails nothing (a restart).
            configure("m0", 1380, &addresses, &routes).unwrap();
            assert_eq!(routes_into(nl, m0.index).len(), into.len());

            let err = configure("tm-missing", 1380, &addresses, &routes).unwrap_err();
            assert_eq!(
                err.to_string(),
                "there is no interface named `tm-missing` in this network namespace"
            );
        });
    }

    #[test]
    fn changing_routes_is_all_or_nothing_and_names_the_interface_and_the_kernels_reason() {
        in_a_namespace_of_its_own(|nl| {
            configure("m0", 1420, &[net("100.64.0.1/10")], &[net("10.9.0.0/16")]).unwrap();
            let index = interface_index("m0").unwrap();
            change_routes(
                "m0",
                true,
                &[net("10.10.0.0/16"), net("fd00:10::/32")],
                &[net("10.9.0.0/16")],
            )
            .unwrap();
            let into = routes_into(nl, index);
            assert!(into.contains(&net("10.10.0.0/16")) && into.contains(&net("fd00:10::/32")));
            assert!(!into.contains(&net("10.9.0.0/16")), "{into:?}");

            // The kernel refuses IPv6 routes into a device whose IPv6 is off: the IPv4 route
            // added before is taken off again and the one to remove stays.
            std::fs::write("/proc/sys/net/ipv6/conf/m0/disable_ipv6", "1").unwrap();
            let err = change_routes(
                "m0",
                true,
                &[net("10.11.0.0/16"), net("fd00:11::/32")],
                &[net("10.10.0.0/16")],
            )
            .unwrap_err();
            let message = err.to_string();
            assert!(
                message.starts_with("cannot route fd00:11::/32 into m0: the kernel answered: "),
                "{message}"
            );
            let after = routes_into(nl, index);
            assert!(!after.contains(&net("10.11.0.0/16")), "{after:?}");
            assert!(after.contains(&net("10.10.0.0/16")), "{after:?}");
            // Without IPv6 on the device (what `configure` found), IPv6 routes are skipped.
            change_routes("m0", false, &[net("10.11.0.0/16"), net("fd00:11::/32")], &[]).unwrap();
            assert!(routes_into(nl, index).contains(&net("10.11.0.0/16")));
            // Removing what is already gone is what was wanted.
            change_routes("m0", false, &[], &[net("10.99.0.0/16")]).unwrap();
        });
    }

    #[test]
    fn the_underlay_is_every_interface_up_but_loopback_and_the_mesh_and_gateways_come_per_family() {
        in_a_namespace_of_its_own(|nl| {
            let names = |links: Vec<Link>| links.into_iter().map(|l| l.name).collect::<Vec<_>>();
            assert_eq!(
                names(underlay_interfaces("tm0").unwrap()),
                Vec::<String>::new(),
                "all down"
            );
            assert_eq!(default_gateways().unwrap(), Gateways::default());

            configure("m0", 1500, &[net("198.18.5.2/24"), net("2001:db8:5::2/64")], &[]).unwrap();
            configure("m1", 1500, &[], &[]).unwrap();
            assert_eq!(names(underlay_interfaces("m1").unwrap()), vec!["m0".to_string()]);
            let mut both = names(underlay_interfaces("tm0").unwrap());
            both.sort();
            assert_eq!(both, ["m0", "m1"]);
            assert!(
                underlay_interfaces("tm0").unwrap().iter().all(|l| l.veth),
                "a veth pair"
            );
            let named = interfaces_named(&["m1".into(), "lo".into()]).unwrap();
            assert_eq!(
                named
                    .iter()
                    .map(|l| (l.name.as_str(), l.veth, l.ethernet))
                    .collect::<Vec<_>>(),
                [("m1", true, true), ("lo", false, false)]
            );
            assert_eq!(
                interfaces_named(&["m0".into(), "tm-missing".into()])
                    .unwrap_err()
                    .to_string(),
                "there is no interface named `tm-missing` in this network namespace"
            );

            let m0 = interface_index("m0").unwrap();
            let default_via = |gateway: IpAddr, metric: u32| {
                let mut m = RouteMessageBuilder::<IpAddr>::new()
                    .destination_prefix(
                        if gateway.is_ipv4() {
                            Ipv4Addr::UNSPECIFIED.into()
                        } else {
                            Ipv6Addr::UNSPECIFIED.into()
                        },
                        0,
                    )
                    .unwrap()
                    .gateway(gateway)
                    .unwrap()
                    .output_interface(m0)
                    .priority(metric)
                    .build();
                m.header.protocol = RouteProtocol::Static;
                nl.run(|| "add a default route".into(), nl.handle.route().add(m).execute())
                    .unwrap();
            };
            default_via("198.18.5.1".parse().unwrap(), 200);
            default_via("198.18.5.254".parse().unwrap(), 100);
            default_via("fe80::1".parse().unwrap(), 1024);
            assert_eq!(
                default_gateways().unwrap(),
                Gateways {
                    v4: Some("198.18.5.254".parse().unwrap()),
                    v6: Some(("fe80::1".parse().unwrap(), "m0".to_string())),
                }
            );
        });
    }
}
