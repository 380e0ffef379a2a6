//! Configuring the mesh interface in the kernel: MTU, link state, addresses, routes.
//!
//! Uses iproute2's `ip` so every change is the same one an operator would type, and a failure
//! shows `ip`'s own message. Routes are added for every peer's allowed IPs, so the kernel sends
//! traffic for them to the mesh interface.

use std::process::Command;

use ipnet::IpNet;

#[derive(Debug, thiserror::Error)]
#[error("`ip {args}` failed: {message}")]
pub struct NetconfError {
    args: String,
    message: String,
}

pub(crate) fn ip_output(args: &[&str]) -> Result<String, NetconfError> {
    let fail = |message: String| NetconfError {
        args: args.join(" "),
        message,
    };
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| fail(format!("{e}; install iproute2")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_string()))
    }
}

fn ip(args: &[&str]) -> Result<(), NetconfError> {
    ip_output(args).map(drop)
}

/// Interfaces of this network namespace that are up, except loopback and `mesh_interface`:
/// the default targets of the XDP shield.
pub fn underlay_interfaces(mesh_interface: &str) -> Result<Vec<String>, NetconfError> {
    // `N: name[@peer]: <FLAGS> ...` per line.
    let listing = ip_output(&["-o", "link", "show", "up"])?;
    Ok(listing
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_string())
        .filter(|name| name != "lo" && name != mesh_interface)
        .collect())
}

/// Whether `interface` can carry IPv6 (it cannot where `net.ipv6.conf.*.disable_ipv6` is 1, or
/// the kernel runs without IPv6).
pub fn ipv6_enabled(interface: &str) -> bool {
    std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{interface}/disable_ipv6")).is_ok_and(|v| v.trim() == "0")
}

/// Bring `name` up with `mtu`, `addresses`, and routes for `routes`. Without IPv6 on the device
/// its IPv6 addresses and routes are left out; the families configured are returned.
pub fn configure(name: &str, mtu: usize, addresses: &[IpNet], routes: &[IpNet]) -> Result<Families, NetconfError> {
    ip(&["link", "set", "dev", name, "mtu", &mtu.to_string()])?;
    let families = Families {
        ipv6: ipv6_enabled(name),
    };
    for addr in addresses {
        let a = addr.to_string();
        match addr {
            IpNet::V4(_) => ip(&["-4", "addr", "replace", &a, "dev", name])?,
            IpNet::V6(_) if families.ipv6 => ip(&["-6", "addr", "replace", &a, "dev", name, "nodad"])?,
            IpNet::V6(_) => {}
        }
    }
    ip(&["link", "set", "dev", name, "up"])?;
    for route in routes.iter().filter(|r| r.addr().is_ipv4() || families.ipv6) {
        let r = route.trunc().to_string();
        let family = if route.addr().is_ipv4() { "-4" } else { "-6" };
        ip(&[family, "route", "replace", &r, "dev", name])?;
    }
    Ok(families)
}

/// Route `add` into `name` and take `remove` off it (a reload's peer changes). All or nothing: if
/// a route cannot be added, the ones added before it are taken off again and nothing is removed.
/// IPv6 routes are skipped where the device carries no IPv6.
pub fn change_routes(name: &str, ipv6: bool, add: &[IpNet], remove: &[IpNet]) -> Result<(), NetconfError> {
    let family = |r: &IpNet| if r.addr().is_ipv4() { "-4" } else { "-6" };
    let carried = |r: &&IpNet| r.addr().is_ipv4() || ipv6;
    let mut added: Vec<IpNet> = Vec::new();
    for route in add.iter().filter(carried) {
        let r = route.trunc().to_string();
        if let Err(e) = ip(&[family(route), "route", "replace", &r, "dev", name]) {
            for done in &added {
                let _ = ip(&[family(done), "route", "del", &done.trunc().to_string(), "dev", name]);
            }
            return Err(e);
        }
        added.push(*route);
    }
    for route in remove.iter().filter(carried) {
        // Already gone (an operator removed it) is what we wanted.
        let _ = ip(&[family(route), "route", "del", &route.trunc().to_string(), "dev", name]);
    }
    Ok(())
}

/// What [`configure`] could set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Families {
    pub ipv6: bool,
}
