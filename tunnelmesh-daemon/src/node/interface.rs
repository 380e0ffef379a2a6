//! `tunnelmesh up`: assemble and run a mesh interface from a static configuration.
//!
//! Order matters and is all-or-nothing: validate the config and identity, open the TUN queues,
//! bind the sockets, configure addresses and routes, then start threads. Any failure before the
//! threads start returns an error and leaves nothing behind (the TUN device disappears with its
//! descriptors). SIGINT/SIGTERM stop the threads, detach the eBPF programs and remove the pins and
//! the status socket.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{Arc, Mutex, atomic::Ordering},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use arc_swap::ArcSwap;
use ipnet::IpNet;
use signal_hook::{
    consts::{SIGHUP, SIGINT, SIGTERM},
    iterator::Signals,
};
use tracing::{error, info, warn};
use zeroize::Zeroizing;

use crate::{
    dataplane,
    device::{
        Clock, Counters, Device, InterfaceInfo, PeerSpec, PeerTable,
        policy::{Enforcement, PolicyEnforcer},
    },
    fastpath::{HookChoice, SharedShield, Shield, Steering},
    identity::{Identity, PublicIdentity},
    netconf,
    node::config::{Config, StaticMesh},
    node::status::{self, FastpathStatus, ShieldOn, SteeringMode},
    policy::NodePolicy,
    protocol::{
        noise::{LocalStatic, MeshKey},
        path::PathKind,
    },
    service,
    slowpath::{SlowPath, thread::SlowPathIo},
    sys::tun,
};

/// Queue of events from workers to the slow path.
const EVENT_QUEUE: usize = 4096;

/// Everything needed to bring a mesh interface up, whatever its source (static file or
/// coordinator).
pub struct InterfacePlan {
    pub name: String,
    pub mtu: usize,
    pub listen_port: u16,
    pub workers: usize,
    pub addresses: Vec<IpNet>,
    /// Extra routes into the interface (static mode: every peer's allowed IPs).
    pub routes: Vec<IpNet>,
    /// The underlay interfaces the shield guards (empty: every one that is up) and its hook.
    pub xdp_interfaces: Vec<String>,
    pub shield_hook: HookChoice,
    pub no_ebpf: bool,
    /// Turn off TUN offloads (virtio headers, TSO/USO, GRO): one packet per read and write.
    pub no_offload: bool,
    pub peers: Vec<PeerSpec>,
    pub mesh_keys: Vec<MeshKey>,
    /// Inbound policy (coordinated meshes); `None`: every configured peer may connect.
    pub policy: Option<NodePolicy>,
    /// Port mapping at the gateway, and the lifetime to ask for.
    pub port_mapping: (crate::nat::portmap::Mode, Duration),
    /// Where to serve `/metrics`, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// A static interface: its peers are listed in `config`. `reload` runs on each SIGHUP.
pub fn up_static(
    config: &Config,
    mesh: &StaticMesh,
    path: Option<&Path>,
    identity: Identity,
    reload: impl FnMut(&Interface) -> Result<()>,
) -> Result<()> {
    let iface = &config.interface;
    let plan = InterfacePlan {
        name: iface.name.clone(),
        mtu: config.mtu() as usize,
        listen_port: iface.listen_port,
        workers: iface.workers,
        addresses: mesh.addresses.clone(),
        routes: static_routes(mesh),
        xdp_interfaces: iface.xdp_interfaces.clone(),
        shield_hook: iface.shield_hook,
        no_ebpf: iface.no_ebpf,
        no_offload: iface.no_offload,
        peers: static_peers(mesh, identity.public(), path)?,
        mesh_keys: vec![mesh.mesh_key.0.clone()],
        policy: None,
        port_mapping: (crate::nat::portmap::Mode::Off, crate::nat::portmap::DEFAULT_LIFETIME),
        metrics_listen: iface.metrics_listen,
    };
    Interface::start(&identity, plan)?.run(reload)
}

/// Apply a reloaded static file's peers and mesh key to a running interface: peers that stay
/// keep their sessions, routes follow the allowed IPs. Nothing is applied if a route cannot be.
pub fn reload_static(iface: &Interface, old: &StaticMesh, new: &StaticMesh, path: &Path) -> Result<()> {
    let dev = &iface.dev;
    let peers = static_peers(new, &dev.info.local, Some(path))?;
    let (old_routes, new_routes) = (static_routes(old), static_routes(new));
    let add: Vec<IpNet> = new_routes.iter().filter(|r| !old_routes.contains(r)).copied().collect();
    let remove: Vec<IpNet> = old_routes.iter().filter(|r| !new_routes.contains(r)).copied().collect();
    netconf::change_routes(&dev.info.interface, dev.info.ipv6, &add, &remove)?;
    let count = peers.len();
    dev.update(peers, vec![new.mesh_key.0.clone()]);
    info!(
        peers = count,
        routes_added = add.len(),
        routes_removed = remove.len(),
        "config reloaded"
    );
    Ok(())
}

/// Every peer's allowed IPs, once each: the routes a static interface adds.
fn static_routes(mesh: &StaticMesh) -> Vec<IpNet> {
    let mut routes: Vec<IpNet> = mesh.peers.iter().flat_map(|p| p.allowed_ips.iter().copied()).collect();
    routes.sort_unstable();
    routes.dedup();
    routes
}

fn static_peers(mesh: &StaticMesh, own: &PublicIdentity, path: Option<&Path>) -> Result<Vec<PeerSpec>> {
    mesh.peers
        .iter()
        .map(|pc| {
            let key = &pc.public_key.get_ref().0;
            if key == own {
                bail!(
                    "config {}: [[peer]] {} is this node's own key; remove it",
                    path.map_or("".into(), |p| p.display().to_string()),
                    key.fingerprint()
                );
            }
            Ok(PeerSpec {
                name: pc.name.clone().unwrap_or_else(|| match key.comment() {
                    "" => key.fingerprint(),
                    c => c.to_string(),
                }),
                identity: key.clone(),
                allowed_ips: pc.allowed_ips.clone(),
                endpoint: pc.endpoint,
                candidates: pc.endpoint.into_iter().collect(),
                nat: crate::protocol::discovery::NatKind::None,
                ssh_endpoint: None,
                persistent_keepalive: (pc.persistent_keepalive > 0)
                    .then(|| Duration::from_secs(pc.persistent_keepalive.into())),
            })
        })
        .collect()
}

/// A running mesh interface: its device, threads and fast path.
pub struct Interface {
    pub dev: Arc<Device>,
    threads: Vec<JoinHandle<()>>,
    shield: SharedShield,
    status_socket: std::path::PathBuf,
    /// Held for the interface's life (the program stays with the sockets anyway).
    _steering: Option<Steering>,
}

impl Interface {
    /// Create the TUN device, sockets, fast path and threads described by `plan`.
    pub fn start(identity: &Identity, plan: InterfacePlan) -> Result<Interface> {
        if plan.mesh_keys.is_empty() {
            bail!("no mesh key: a static config needs mesh_key, a coordinator sends it");
        }
        let workers = match plan.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let (queues, offloads) = tun::open_queues(&plan.name, workers, !plan.no_offload).with_context(|| {
            format!(
                "cannot create TUN device {} (needs root or CAP_NET_ADMIN, and /dev/net/tun)",
                plan.name
            )
        })?;
        let sockets = dataplane::bind_sockets(plan.listen_port, workers).with_context(|| {
            format!(
                "cannot bind UDP port {}; is another tunnelmesh or WireGuard using it? choose another listen port",
                plan.listen_port
            )
        })?;
        let listen_port = sockets[0].local_addr()?.port();
        let steering = if plan.no_ebpf {
            Err("disabled by no_ebpf".to_string())
        } else {
            Steering::attach(&sockets).map_err(|e| e.to_string())
        };
        match &steering {
            Ok(_) => info!(
                workers,
                "worker steering attached: each session's data goes to the worker that owns it"
            ),
            Err(e) => info!("worker steering unavailable ({e}); the kernel's hash spreads peers over the workers"),
        }
        let steered = steering.is_ok();
        // In force before the interface is up and before the first packet can arrive: a
        // coordinated node fails closed.
        let policy = match plan.policy {
            Some(p) => PolicyEnforcer::start(p, &plan.name, plan.no_ebpf),
            None => PolicyEnforcer::none(),
        };
        let families = netconf::configure(&plan.name, plan.mtu, &plan.addresses, &plan.routes)?;
        let addresses: Vec<IpNet> = if families.ipv6 {
            plan.addresses.clone()
        } else {
            warn!(
                interface = %plan.name,
                "IPv6 is disabled on this host (net.ipv6.conf.*.disable_ipv6): the mesh runs over IPv4 only"
            );
            plan.addresses.iter().copied().filter(|a| a.addr().is_ipv4()).collect()
        };

        let shield = if plan.no_ebpf {
            Err("disabled by no_ebpf".to_string())
        } else {
            let targets = if plan.xdp_interfaces.is_empty() {
                netconf::underlay_interfaces(&plan.name)
            } else {
                netconf::interfaces_named(&plan.xdp_interfaces)
            };
            targets.map_err(|e| e.to_string()).and_then(|t| {
                Shield::attach(
                    listen_port,
                    identity.public().noise_public(),
                    &t,
                    plan.shield_hook,
                    &plan.name,
                )
                .map_err(|e| e.to_string())
            })
        };
        match &shield {
            Ok(s) => {
                let hooks: Vec<String> = s.hooks.iter().map(|(i, h)| format!("{i} ({})", h.name())).collect();
                info!(on = %hooks.join(", "), "shield attached");
            }
            Err(e) => warn!("eBPF fast path unavailable ({e}); the daemon checks every datagram itself"),
        }

        let (tx, rx) = crossbeam_channel::bounded(EVENT_QUEUE);
        let (inbox_tx, inbox_rx) = dataplane::overlay_inbox()?;
        let now = Instant::now();
        let dev = Arc::new(Device {
            info: InterfaceInfo {
                interface: plan.name.clone(),
                mtu: plan.mtu,
                offloads,
                listen_port,
                local: identity.public().clone(),
                addresses,
                ipv6: families.ipv6,
                started: now,
            },
            peers: ArcSwap::from_pointee(PeerTable::build(plan.peers, &PeerTable::default())),
            mesh_keys: ArcSwap::from_pointee(plan.mesh_keys),
            sessions: ArcSwap::from_pointee(HashMap::new()),
            counters: Counters::default(),
            clock: Clock::new(now),
            events: tx,
            shutdown: Default::default(),
            policy,
            coordinator: Default::default(),
            reach: Default::default(),
            overlay_inbox: inbox_tx,
            heartbeats: crate::service::Heartbeats::new(1 + workers),
        });
        let local = LocalStatic {
            secret: Zeroizing::new(*identity.noise_secret()),
            public: *identity.public().noise_public(),
        };
        let handshake_socket = sockets[0].try_clone()?;
        let (status_listener, status_socket) =
            status::bind(&plan.name).context("cannot create the status socket under /run/tunnelmesh")?;

        let mut threads = dataplane::start(dev.clone(), queues, sockets, inbox_rx, !plan.no_offload)?;
        let shield: SharedShield = Arc::new(Mutex::new(shield));
        let slow_path = SlowPath::new(dev.clone(), local, workers, Instant::now());
        let io = SlowPathIo {
            dev: dev.clone(),
            socket: handshake_socket,
            events: rx,
            mirror: Box::new(shield.clone()),
        };
        threads.push(
            std::thread::Builder::new()
                .name("tm-slowpath".into())
                .spawn(move || io.run(slow_path))?,
        );
        match crate::node::netwatch::watch_network(dev.clone()) {
            Ok(thread) => threads.push(thread),
            Err(e) => warn!("cannot watch for address changes ({e}); candidates refresh every 25 s only"),
        }
        if let (mode, lifetime) = plan.port_mapping
            && mode != crate::nat::portmap::Mode::Off
        {
            let handle = crate::nat::portmap::MappingHandle {
                port: dev.info.listen_port,
                shutdown: dev.shutdown.clone(),
                network_generation: dev.reach.network_generation.clone(),
                slot: dev.reach.port_mapping.clone(),
            };
            threads.push(
                std::thread::Builder::new()
                    .name("tm-portmap".into())
                    .spawn(move || crate::nat::portmap::run(handle, mode, lifetime))?,
            );
        }
        if let Some(thread) = supervise(dev.clone())? {
            threads.push(thread);
        }
        let shield_for_status = shield.clone();
        let fastpath_status: Arc<dyn Fn() -> FastpathStatus + Send + Sync> =
            Arc::new(move || fastpath_status(&crate::sync::lock(&shield_for_status), steered));
        if let Some(addr) = plan.metrics_listen {
            let (shutdown, dev, fastpath) = (dev.shutdown.clone(), dev.clone(), fastpath_status.clone());
            let snapshot = Arc::new(move || status::snapshot(&dev, &*fastpath));
            threads.push(
                crate::node::metrics::serve(addr, snapshot, shutdown)
                    .with_context(|| format!("cannot serve metrics on {addr} (metrics_listen); is the port taken?"))?,
            );
            info!(%addr, "metrics at http://{addr}/metrics");
        }
        let status_dev = dev.clone();
        threads.push(
            std::thread::Builder::new()
                .name("tm-status".into())
                .spawn(move || status::serve(status_dev, status_listener, fastpath_status))?,
        );
        info!(
            interface = %dev.info.interface,
            port = listen_port,
            fingerprint = %dev.info.local.fingerprint(),
            public_key = %dev.info.local.noise_public_base64(),
            peers = dev.peers.load().peers.len(),
            workers,
            "tunnelmesh is up"
        );
        Ok(Interface {
            dev,
            threads,
            shield,
            status_socket,
            _steering: steering.ok(),
        })
    }

    /// Tell the service manager the node is ready (the caller has finished starting), then run
    /// until SIGINT or SIGTERM and shut down cleanly. Each SIGHUP calls `reload`; a reload that
    /// fails is logged and changes nothing, and the interface runs on as it was.
    pub fn run(self, mut reload: impl FnMut(&Interface) -> Result<()>) -> Result<()> {
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])?;
        service::ready(&status_line(&self.dev));
        for signal in signals.forever() {
            if signal != SIGHUP {
                info!(signal, "shutting down");
                break;
            }
            match reload(&self) {
                Ok(()) => service::status(&status_line(&self.dev)),
                Err(e) => error!("reload refused, still running the previous config: {e:#}"),
            }
        }
        service::stopping();
        self.shutdown();
        Ok(())
    }

    /// Stop the threads, detach the fast path, remove the pins and the status socket.
    pub fn shutdown(self) {
        self.dev.shutdown.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        // The status thread is gone, so this is the last reference: detach XDP, remove the pins.
        drop(self.shield);
        let _ = std::fs::remove_file(&self.status_socket);
        // Ours to remove unless systemd made it (then it is not writable here and systemd does).
        if let Some(dir) = self.status_socket.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// How often `systemctl status` gets a fresh line.
const STATUS_PERIOD: Duration = Duration::from_secs(5);
/// A peer counts as up while its last handshake is younger than this (a session's lifetime).
const PEER_UP: Duration = Duration::from_secs(180);

/// Under systemd (`NOTIFY_SOCKET` set): a thread that pings the watchdog while the slow path
/// and every worker go round, and refreshes the status line.
fn supervise(dev: Arc<Device>) -> Result<Option<JoinHandle<()>>> {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return Ok(None);
    }
    let watchdog = service::watchdog_period();
    let period = watchdog.map_or(STATUS_PERIOD, |w| w.min(STATUS_PERIOD));
    let thread = std::thread::Builder::new().name("tm-service".into()).spawn(move || {
        let mut beats = dev.heartbeats.snapshot();
        let mut shown = String::new();
        let mut next = Instant::now() + period;
        while !dev.shutdown.load(Ordering::Relaxed) {
            std::thread::sleep(
                next.saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100)),
            );
            if Instant::now() < next {
                continue;
            }
            next += period;
            let now = dev.heartbeats.snapshot();
            let stalled = service::stalled(&beats, &now);
            beats = now;
            if watchdog.is_some() {
                if stalled.is_empty() {
                    service::watchdog();
                } else {
                    let names: Vec<String> = stalled
                        .iter()
                        .map(|&i| match i {
                            crate::device::HEARTBEAT_SLOW_PATH => "the slow path".to_string(),
                            w => format!("worker {}", w - 1),
                        })
                        .collect();
                    error!(stalled = ?names, "a thread stopped going round; not pinging the watchdog");
                }
            }
            let line = status_line(&dev);
            if line != shown {
                service::status(&line);
                shown = line;
            }
        }
    })?;
    Ok(Some(thread))
}

/// One line for `systemctl status`: how many peers are up and on which paths, and the
/// coordinator connection.
fn status_line(dev: &Device) -> String {
    let unix_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let table = dev.peers.load();
    let mut on = [0usize; 3];
    for peer in &table.peers {
        let hs = peer.last_handshake_unix.load(Ordering::Relaxed);
        if hs != 0 && unix_now.saturating_sub(hs) < PEER_UP.as_secs() {
            on[peer.path() as usize] += 1;
        }
    }
    let up: usize = on.iter().sum();
    let mut line = format!("{}: {up} of {} peers up", dev.info.interface, table.peers.len());
    if up > 0 {
        let paths: Vec<String> = PathKind::ALL
            .iter()
            .filter(|k| on[**k as usize] > 0)
            .map(|k| format!("{} {}", on[*k as usize], k.name()))
            .collect();
        line += &format!(" ({})", paths.join(", "));
    }
    if let Some(c) = dev.coordinator.state.load().as_deref() {
        line += &format!("; coordinator {}", c.state);
    }
    line
}

fn fastpath_status(shield: &Result<Shield, String>, steered: bool) -> FastpathStatus {
    let steering = if steered {
        SteeringMode::Ebpf
    } else {
        SteeringMode::Hash
    };
    match shield {
        Ok(s) => {
            let (shield, error) = match s.counters() {
                Ok(c) => (c.into_iter().map(|(r, n)| (r.name().to_string(), n)).collect(), None),
                Err(e) => (BTreeMap::new(), Some(e.to_string())),
            };
            FastpathStatus {
                enforcement: Enforcement::Ebpf,
                shield_on: s
                    .hooks
                    .iter()
                    .map(|(interface, hook)| ShieldOn {
                        interface: interface.clone(),
                        hook: *hook,
                    })
                    .collect(),
                shield,
                error,
                steering,
            }
        }
        Err(e) => FastpathStatus {
            enforcement: Enforcement::Userspace,
            shield_on: Vec::new(),
            shield: BTreeMap::new(),
            error: Some(e.clone()),
            steering,
        },
    }
}
