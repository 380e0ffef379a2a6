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
    consts::{SIGINT, SIGTERM},
    iterator::Signals,
};
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::{
    dataplane,
    device::{
        Clock, Counters, Device, InterfaceInfo, PeerSpec, PeerTable,
        policy::{Enforcement, PolicyEnforcer},
    },
    fastpath::{SharedShield, Shield, Steering},
    identity::{DEFAULT_IDENTITY, Identity},
    netconf,
    node::config::Config,
    node::status::{self, FastpathStatus, SteeringMode},
    policy::NodePolicy,
    protocol::noise::{LocalStatic, MeshKey},
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
    pub xdp_interfaces: Vec<String>,
    pub no_ebpf: bool,
    /// Turn off TUN offloads (virtio headers, TSO/USO, GRO): one packet per read and write.
    pub no_offload: bool,
    pub peers: Vec<PeerSpec>,
    pub mesh_keys: Vec<MeshKey>,
    /// Inbound policy (coordinated meshes); `None`: every configured peer may connect.
    pub policy: Option<NodePolicy>,
    /// Port mapping at the gateway, and the lifetime to ask for.
    pub port_mapping: (crate::nat::portmap::Mode, Duration),
}

/// `tunnelmesh up --config FILE`.
pub fn up_static(config_path: &Path, identity_override: Option<&Path>) -> Result<()> {
    let config = Config::load(config_path)?;
    let identity_path = identity_override
        .map(Path::to_path_buf)
        .or_else(|| config.interface.identity.clone())
        .unwrap_or_else(|| DEFAULT_IDENTITY.into());
    let identity = Identity::load(&identity_path)?;
    let mut peers = Vec::new();
    for pc in &config.peers {
        let key = &pc.public_key.get_ref().0;
        if key == identity.public() {
            bail!(
                "config {}: [[peer]] {} is this node's own key; remove it",
                config_path.display(),
                key.fingerprint()
            );
        }
        peers.push(PeerSpec {
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
        });
    }
    let iface = &config.interface;
    let plan = InterfacePlan {
        name: iface.name.clone(),
        mtu: config.mtu() as usize,
        listen_port: iface.listen_port,
        workers: iface.workers,
        addresses: iface.addresses.clone(),
        routes: config
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().copied())
            .collect(),
        xdp_interfaces: iface.xdp_interfaces.clone(),
        no_ebpf: iface.no_ebpf,
        no_offload: iface.no_offload,
        peers,
        mesh_keys: vec![iface.mesh_key.0.clone()],
        policy: None,
        port_mapping: (crate::nat::portmap::Mode::Off, crate::nat::portmap::DEFAULT_LIFETIME),
    };
    let running = Interface::start(&identity, plan)?;
    running.wait_for_signal()
}

/// A running mesh interface: its device, threads and fast path.
pub struct Interface {
    pub dev: Arc<Device>,
    threads: Vec<JoinHandle<()>>,
    shield: SharedShield,
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
                netconf::underlay_interfaces(&plan.name).map_err(|e| e.to_string())
            } else {
                Ok(plan.xdp_interfaces.clone())
            };
            targets.and_then(|t: Vec<String>| {
                Shield::attach(listen_port, identity.public().noise_public(), &t, &plan.name).map_err(|e| e.to_string())
            })
        };
        match &shield {
            Ok(s) => info!(interfaces = ?s.interfaces, mode = s.mode, "XDP shield attached"),
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
        });
        let local = LocalStatic {
            secret: Zeroizing::new(*identity.noise_secret()),
            public: *identity.public().noise_public(),
        };
        let handshake_socket = sockets[0].try_clone()?;
        let status_listener =
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
        let shield_for_status = shield.clone();
        let fastpath_status = Box::new(move || fastpath_status(&crate::sync::lock(&shield_for_status), steered));
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
            _steering: steering.ok(),
        })
    }

    /// Run until SIGINT or SIGTERM, then shut down cleanly.
    pub fn wait_for_signal(self) -> Result<()> {
        let mut signals = Signals::new([SIGINT, SIGTERM])?;
        let signal = signals.forever().next();
        info!(?signal, "shutting down");
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
        let _ = std::fs::remove_file(status::socket_path(&self.dev.info.interface));
    }
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
                xdp_interfaces: s.interfaces.clone(),
                xdp_mode: Some(s.mode.into()),
                shield,
                error,
                steering,
            }
        }
        Err(e) => FastpathStatus {
            enforcement: Enforcement::Userspace,
            xdp_interfaces: Vec::new(),
            xdp_mode: None,
            shield: BTreeMap::new(),
            error: Some(e.clone()),
            steering,
        },
    }
}
