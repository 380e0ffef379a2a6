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
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use arc_swap::ArcSwap;
use signal_hook::{
    consts::{SIGINT, SIGTERM},
    iterator::Signals,
};
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::{
    config::Config,
    dataplane,
    device::{Clock, Counters, Device, Peer, handshaker::Handshaker},
    fastpath::Shield,
    identity::{DEFAULT_IDENTITY, Identity},
    netconf,
    noise::LocalStatic,
    routing::AllowedIps,
    status::{self, FastpathStatus},
    sys::tun,
};

/// Queue of events from workers to the handshake thread.
const EVENT_QUEUE: usize = 4096;

pub fn up(config_path: &Path, identity_override: Option<&Path>) -> Result<()> {
    let config = Config::load(config_path)?;
    let identity_path = identity_override
        .map(Path::to_path_buf)
        .or_else(|| config.interface.identity.clone())
        .unwrap_or_else(|| DEFAULT_IDENTITY.into());
    let identity = Identity::load(&identity_path)?;
    let iface = &config.interface;
    let mtu = config.mtu() as usize;

    let mut peers = Vec::new();
    let mut by_key = HashMap::new();
    let mut routes = AllowedIps::default();
    let mut route_list = Vec::new();
    for (i, pc) in config.peers.iter().enumerate() {
        let key = &pc.public_key.get_ref().0;
        if key == identity.public() {
            bail!(
                "config {}: [[peer]] {} is this node's own key; remove it",
                config_path.display(),
                key.fingerprint()
            );
        }
        let name = pc.name.clone().unwrap_or_else(|| match key.comment() {
            "" => key.fingerprint(),
            c => c.to_string(),
        });
        for net in &pc.allowed_ips {
            routes.insert(*net, i);
            route_list.push(*net);
        }
        by_key.insert(*key.noise_public(), i);
        let keepalive = (pc.persistent_keepalive > 0).then(|| Duration::from_secs(pc.persistent_keepalive.into()));
        peers.push(Peer::new(
            name,
            key.clone(),
            pc.allowed_ips.clone(),
            pc.endpoint,
            keepalive,
        ));
    }

    let workers = match iface.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let queues = (0..workers)
        .map(|_| tun::open_queue(&iface.name))
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| {
            format!(
                "cannot create TUN device {} (needs root or CAP_NET_ADMIN, and /dev/net/tun)",
                iface.name
            )
        })?;
    let sockets = dataplane::bind_sockets(iface.listen_port, workers).with_context(|| {
        format!(
            "cannot bind UDP port {}; is another tunnelmesh or WireGuard using it? set listen_port",
            iface.listen_port
        )
    })?;
    let listen_port = sockets[0].local_addr()?.port();
    netconf::configure(&iface.name, mtu, &iface.addresses, &route_list)?;

    let shield = if iface.no_ebpf {
        Err("disabled by no_ebpf".to_string())
    } else {
        let targets = if iface.xdp_interfaces.is_empty() {
            netconf::underlay_interfaces(&iface.name).map_err(|e| e.to_string())
        } else {
            Ok(iface.xdp_interfaces.clone())
        };
        targets.and_then(|t: Vec<String>| Shield::attach(listen_port, &t, &iface.name).map_err(|e| e.to_string()))
    };
    match &shield {
        Ok(s) => info!(interfaces = ?s.interfaces, mode = s.mode, "XDP shield attached"),
        Err(e) => {
            warn!("eBPF fast path unavailable ({e}); the daemon checks every datagram itself")
        }
    }

    let (tx, rx) = crossbeam_channel::bounded(EVENT_QUEUE);
    let now = Instant::now();
    let dev = Arc::new(Device {
        interface: iface.name.clone(),
        mtu,
        listen_port,
        local: identity.public().clone(),
        peers,
        by_key,
        routes,
        sessions: ArcSwap::from_pointee(HashMap::new()),
        counters: Counters::default(),
        clock: Clock::new(now),
        events: tx,
        shutdown: Default::default(),
        started: now,
    });
    let local = LocalStatic {
        secret: Zeroizing::new(*identity.noise_secret()),
        public: *identity.public().noise_public(),
        psk: config.interface.mesh_key.0.clone(),
    };
    let handshake_socket = sockets[0].try_clone()?;
    let status_listener = status::bind(&iface.name).context("cannot create the status socket under /run/tunnelmesh")?;

    let mut threads = dataplane::start(dev.clone(), queues, sockets)?;
    let handshaker = Handshaker::new(dev.clone(), local, handshake_socket, rx);
    threads.push(
        std::thread::Builder::new()
            .name("tm-handshake".into())
            .spawn(move || handshaker.run())?,
    );
    let shield = Arc::new(Mutex::new(shield));
    let shield_for_status = shield.clone();
    let fastpath_status =
        Box::new(move || fastpath_status(&shield_for_status.lock().unwrap_or_else(|p| p.into_inner())));
    let status_dev = dev.clone();
    threads.push(
        std::thread::Builder::new()
            .name("tm-status".into())
            .spawn(move || status::serve(status_dev, status_listener, fastpath_status))?,
    );

    info!(
        interface = %dev.interface,
        port = listen_port,
        fingerprint = %dev.local.fingerprint(),
        public_key = %dev.local.noise_public_base64(),
        peers = dev.peers.len(),
        workers,
        "tunnelmesh is up"
    );

    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let signal = signals.forever().next();
    info!(?signal, "shutting down");
    dev.shutdown.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    // The status thread is gone, so this is the last reference: detach XDP, remove the pins.
    drop(shield);
    let _ = std::fs::remove_file(status::socket_path(&dev.interface));
    Ok(())
}

fn fastpath_status(shield: &Result<Shield, String>) -> FastpathStatus {
    match shield {
        Ok(s) => {
            let (shield, error) = match s.counters() {
                Ok(c) => (c.into_iter().map(|(r, n)| (r.name().to_string(), n)).collect(), None),
                Err(e) => (BTreeMap::new(), Some(e.to_string())),
            };
            FastpathStatus {
                enforcement: "ebpf".into(),
                xdp_interfaces: s.interfaces.clone(),
                xdp_mode: Some(s.mode.into()),
                shield,
                error,
            }
        }
        Err(e) => FastpathStatus {
            enforcement: "userspace".into(),
            xdp_interfaces: Vec::new(),
            xdp_mode: None,
            shield: BTreeMap::new(),
            error: Some(e.clone()),
        },
    }
}
