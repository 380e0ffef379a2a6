//! The peer side of the coordinator protocol: join, follow pushed updates, keep a cache.
//!
//! `tunnelmesh up --coordinator URL --fingerprint SHA256:…` joins (proving key possession with an
//! SSHSIG over the coordinator's challenge), brings the interface up from the welcome, and then
//! applies every pushed change to the running device. The last state is cached on disk, so a
//! restart while the coordinator is down still brings the mesh up; established tunnels never
//! depend on the coordinator. Connection loss is retried with exponential backoff and jitter.

mod follow;
mod join;
pub(crate) mod pinning;
pub(crate) mod state;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::{
    device::ConnectionState,
    fastpath::HookChoice,
    identity::Identity,
    node::interface::{Interface, InterfacePlan},
    protocol::discovery::Candidates,
};

use follow::{follow, set_control, set_stun_targets};
pub use join::{Client, Socket, next_text, send_msg};
pub use state::MeshState;

const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Messages queued for the relay before new ones are dropped.
const RELAY_QUEUE: usize = 1024;
/// The coordinator pings every 15 s; this long without a word means the connection is dead.
const SILENCE: Duration = Duration::from_secs(45);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How much longer a first start may take, told to the service manager before each join attempt.
const JOIN_GRACE: Duration = Duration::from_secs(60);

/// Options of `tunnelmesh up --coordinator`.
pub struct JoinOptions {
    pub url: String,
    pub fingerprint: String,
    pub token: Option<String>,
    pub name: Option<String>,
    pub interface: String,
    pub listen_port: u16,
    pub mtu: usize,
    pub workers: usize,
    /// Where the last coordinator state is cached.
    pub cache: PathBuf,
    /// The underlay interfaces the shield guards (empty: every one that is up) and its hook.
    pub xdp_interfaces: Vec<String>,
    pub shield_hook: HookChoice,
    pub no_ebpf: bool,
    /// Turn off TUN offloads.
    pub no_offload: bool,
    /// TCP port of the SSH transport (0: do not run one).
    pub ssh_port: u16,
    pub port_mapping: crate::nat::portmap::Mode,
    pub port_mapping_lifetime: Duration,
    /// Where to serve `/metrics`, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl JoinOptions {
    /// Options of a client that joins with `token` and follows the coordinator without an
    /// interface of its own (the coordinator bench, tests).
    pub fn without_interface(url: &str, fingerprint: &str, token: &str) -> Self {
        JoinOptions {
            url: url.into(),
            fingerprint: fingerprint.into(),
            token: Some(token.into()),
            name: None,
            interface: String::new(),
            listen_port: 51820,
            mtu: 1420,
            workers: 1,
            cache: Default::default(),
            xdp_interfaces: Vec::new(),
            shield_hook: HookChoice::Auto,
            no_ebpf: true,
            no_offload: false,
            ssh_port: 0,
            port_mapping: crate::nat::portmap::Mode::Off,
            port_mapping_lifetime: crate::nat::portmap::DEFAULT_LIFETIME,
            metrics_listen: None,
        }
    }
}

/// Why the coordinator will not have this node: the operator must act, retrying cannot help.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The certificate is not the pinned one.
    #[error(transparent)]
    Certificate(#[from] pinning::PinMismatch),
    /// The coordinator refused the hello (unknown key, bad token, revoked at the door…).
    #[error("the coordinator refused this node: {0}")]
    Refused(String),
    /// The node was revoked while connected.
    #[error("{0}")]
    Revoked(String),
}

/// A coordinated interface: join (or start from the cache) and follow the coordinator.
/// `reload` runs on each SIGHUP.
pub fn up(opts: JoinOptions, identity: Identity, reload: impl FnMut(&Interface) -> Result<()>) -> Result<()> {
    let identity = Arc::new(identity);
    let client = Client::new(&opts, identity.clone())?;
    client.candidates.store(Arc::new(Candidates {
        host: crate::nat::host_candidates(&opts.interface, opts.listen_port),
        ..Candidates::default()
    }));
    let cache = opts.cache.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (state, socket) = match MeshState::load(&cache) {
        Some(cached) => {
            info!(cache = %cache.display(), peers = cached.peers.len(), "starting from the cached mesh state");
            (cached, None)
        }
        None => {
            let (state, ws) = runtime.block_on(async {
                let mut backoff = BACKOFF_MIN;
                crate::service::extend_timeout(JOIN_GRACE, &format!("joining {} (no cached state yet)", opts.url));
                loop {
                    match client.join().await {
                        Ok(joined) => break Ok(joined),
                        Err(e) if e.downcast_ref::<Refusal>().is_some() => break Err(e),
                        Err(e) => {
                            warn!("cannot join yet ({e:#}); retrying in {backoff:?}");
                            // A first start waits for the coordinator as long as it takes; the
                            // service manager is told so rather than timing the start out.
                            crate::service::extend_timeout(
                                backoff + JOIN_GRACE,
                                &format!("waiting for the coordinator {}: {e:#}", opts.url),
                            );
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                        }
                    }
                }
            })?;
            state
                .save(&cache)
                .with_context(|| format!("cannot write the state cache {}", cache.display()))?;
            (state, Some(ws))
        }
    };
    info!(name = %state.mesh.node.name, ipv4 = %state.mesh.node.ipv4, ipv6 = %state.mesh.node.ipv6, "joined the mesh");
    let plan = InterfacePlan {
        name: opts.interface.clone(),
        mtu: opts.mtu,
        listen_port: opts.listen_port,
        workers: opts.workers,
        addresses: state.addresses()?,
        routes: Vec::new(),
        xdp_interfaces: opts.xdp_interfaces.clone(),
        shield_hook: opts.shield_hook,
        no_ebpf: opts.no_ebpf,
        no_offload: opts.no_offload,
        peers: state.peer_specs(),
        mesh_keys: state.mesh_keys()?,
        policy: Some(state.mesh.policy.clone()),
        port_mapping: (opts.port_mapping, opts.port_mapping_lifetime),
        metrics_listen: opts.metrics_listen,
    };
    let interface = Interface::start(&identity, plan)?;
    set_stun_targets(&interface.dev, &opts.url, &state);
    set_control(
        &interface.dev,
        &opts.url,
        if socket.is_some() {
            ConnectionState::Connected
        } else {
            ConnectionState::Connecting
        },
        None,
        socket.is_some(),
    );
    let ssh_server = if opts.ssh_port != 0 {
        let dev = interface.dev.clone();
        let key = crate::paths::ssh::host_key(&identity)?;
        let bind = std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, opts.ssh_port));
        let server = crate::paths::ssh::SshServer::start(dev.clone(), bind, key.clone()).with_context(|| {
            format!(
                "cannot listen on TCP port {} for the SSH transport; choose another --ssh-port (0 turns it off)",
                opts.ssh_port
            )
        })?;
        runtime.spawn(crate::paths::ssh::supervise(dev, key));
        Some(server)
    } else {
        None
    };
    runtime.spawn(follow(client, interface.dev.clone(), state, socket, cache));
    let result = interface.run(reload);
    drop(ssh_server);
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}
