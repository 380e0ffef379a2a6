//! `tunnelmesh coordinator`: the thin, self-hosted control plane.
//!
//! It admits peers (authorized_keys or enrollment tokens, proven by an SSHSIG over a fresh
//! challenge), gives each a stable address pair, hands out the mesh key over the authenticated
//! channel, and pushes membership changes over one WebSocket per peer. It never holds a peer's
//! private key and never sees traffic. All state lives in the data directory: the SQLite store,
//! the TLS certificate, the coordinator's own ed25519 key and (optionally) `authorized_keys`.
//! The operator commands (`token create`, `revoke`, `rotate-mesh-key`) write to the store; the
//! running coordinator notices the commit within half a second and pushes the consequences.

pub mod admission;
pub mod api;
pub mod config;
pub mod hub;
pub mod ipam;
pub mod metrics;
pub mod relay;
pub mod store;
pub mod tls;

use std::{
    fs,
    net::SocketAddr,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use ipnet::{Ipv4Net, Ipv6Net};
use rand::Rng;
use tracing::{info, warn};

use self::{
    hub::Hub,
    ipam::Ipam,
    store::{MeshKeyRecord, SqliteStore, Store, TokenRecord, new_mesh_key},
    tls::Certificate,
};
use crate::{control::unix_now, identity::Identity};

/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/tunnelmesh-coordinator";
/// Default IPv4 mesh prefix (the shared address space of RFC 6598, rarely used on LANs).
pub const DEFAULT_IPV4_PREFIX: &str = "100.64.0.0/10";

/// How `tunnelmesh coordinator` serves.
pub struct ServeOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub authorized_keys: Option<PathBuf>,
    pub ipv4_prefix: Option<Ipv4Net>,
    pub ipv6_prefix: Option<Ipv6Net>,
    /// Policy file (default deny: without one, nothing is allowed).
    pub policy: Option<PathBuf>,
    /// Bytes per second each peer may send through the relay.
    pub relay_rate: u64,
    /// Append every relayed message to this file (what the coordinator sees: ciphertext).
    pub relay_dump: Option<PathBuf>,
    /// UDP port of the first STUN target (the second is the next port); 0: no STUN.
    pub stun_port: u16,
    /// Where to serve `/metrics` (plain HTTP), if anywhere.
    pub metrics_listen: Option<SocketAddr>,
}

fn open_store(data_dir: &Path) -> Result<SqliteStore> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let path = data_dir.join("coordinator.db");
    SqliteStore::open(&path).with_context(|| format!("cannot open the store {}", path.display()))
}

fn open_existing_store(data_dir: &Path) -> Result<SqliteStore> {
    if !data_dir.join("coordinator.db").exists() {
        bail!(
            "{} holds no coordinator store; start `tunnelmesh coordinator --data-dir {}` first",
            data_dir.display(),
            data_dir.display()
        );
    }
    open_store(data_dir)
}

/// A random ULA /64 (RFC 4193: fd00::/8 with a 40-bit random global ID, subnet 0).
fn random_ula() -> Ipv6Net {
    let id: u64 = rand::thread_rng().r#gen::<u64>() & 0xff_ffff_ffff;
    let addr = (0xfdu128 << 120) | ((id as u128) << 80);
    Ipv6Net::new(addr.into(), 64).expect("valid prefix")
}

/// The prefixes fixed at first start; later starts must agree.
fn prefixes(store: &dyn Store, v4: Option<Ipv4Net>, v6: Option<Ipv6Net>) -> Result<(Ipv4Net, Ipv6Net)> {
    let stored_v4 = store
        .setting("ipv4_prefix")?
        .map(|s| s.parse::<Ipv4Net>())
        .transpose()?;
    let stored_v6 = store
        .setting("ipv6_prefix")?
        .map(|s| s.parse::<Ipv6Net>())
        .transpose()?;
    let v4 = match (stored_v4, v4) {
        (Some(s), Some(f)) if s != f => {
            bail!("the IPv4 prefix of this mesh is {s}; it cannot change to {f} (nodes hold addresses in it)")
        }
        (Some(s), _) => s,
        (None, f) => f.unwrap_or_else(|| DEFAULT_IPV4_PREFIX.parse().expect("valid default")),
    };
    let v6 = match (stored_v6, v6) {
        (Some(s), Some(f)) if s != f => {
            bail!("the IPv6 prefix of this mesh is {s}; it cannot change to {f} (nodes hold addresses in it)")
        }
        (Some(s), _) => s,
        (None, f) => f.unwrap_or_else(random_ula),
    };
    store.set_setting("ipv4_prefix", &v4.to_string())?;
    store.set_setting("ipv6_prefix", &v6.to_string())?;
    Ok((v4, v6))
}

/// Create `path` with `mode` from the start (a private key is never readable by others, not even
/// for a moment), write `data` and sync it.
fn create_file(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(data)?;
    file.sync_all()
}

/// The coordinator's own ed25519 identity, created on first start.
fn coordinator_identity(data_dir: &Path) -> Result<Identity> {
    let path = data_dir.join("coordinator_ed25519_key");
    if !path.exists() {
        let (_, pem) = Identity::generate("tunnelmesh-coordinator");
        create_file(&path, pem.as_bytes(), 0o600).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(Identity::load(&path)?)
}

fn certificate(data_dir: &Path, cert: Option<&Path>, key: Option<&Path>) -> Result<Certificate> {
    Ok(match (cert, key) {
        (Some(c), Some(k)) => Certificate::load(c, k)?,
        (None, None) => Certificate::load_or_generate(data_dir)?,
        _ => bail!("--tls-cert and --tls-key go together"),
    })
}

/// `tunnelmesh coordinator`: run until SIGINT/SIGTERM.
pub fn serve(opts: ServeOptions) -> Result<()> {
    let open_files = crate::sys::rlimit::raise_open_files();
    let store = open_store(&opts.data_dir)?;
    let (v4, v6) = prefixes(&store, opts.ipv4_prefix, opts.ipv6_prefix)?;
    if store.mesh_keys()?.is_empty() {
        store.add_mesh_key(&MeshKeyRecord {
            key: new_mesh_key(),
            created: unix_now(),
        })?;
    }
    let identity = coordinator_identity(&opts.data_dir)?;
    let cert = certificate(&opts.data_dir, opts.tls_cert.as_deref(), opts.tls_key.as_deref())?;
    let tls_fingerprint = cert.fingerprint();
    // `coordinator info` reports what is served, operator-provided certificate or not.
    store.set_setting("tls_fingerprint", &tls_fingerprint)?;
    let hosts: Vec<u32> = store.nodes()?.iter().map(|n| n.host).collect();
    let ipam = Ipam::new(v4, v6, hosts)?;
    let mut hub = Hub::new(
        Box::new(store),
        ipam,
        identity.public().ssh_line(),
        tls_fingerprint.clone(),
    )?;
    hub.stun_port = opts.stun_port;
    let authorized_path = opts.authorized_keys.clone().or_else(|| {
        let default = opts.data_dir.join("authorized_keys");
        default.exists().then_some(default)
    });
    if let Some(path) = &authorized_path {
        hub.set_authorized(load_authorized(path)?)?;
    }
    match &opts.policy {
        Some(path) => hub.set_policy(load_policy(path)?),
        None => warn!("no --policy: default deny, so no node may reach another until a policy allows it"),
    }
    let hub = Arc::new(Mutex::new(hub));
    let server_config = cert.server_config()?;

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .with_context(|| format!("cannot listen on {}", opts.listen))?;
        println!("tunnelmesh coordinator listening on https://{}", listener.local_addr()?);
        println!("TLS fingerprint: {tls_fingerprint}");
        println!(
            "peers join with: tunnelmesh up --coordinator https://{} --fingerprint {tls_fingerprint}",
            listener.local_addr()?
        );
        info!(prefix4 = %v4, prefix6 = %v6, open_files, "coordinator up");
        let stats = metrics::Stats::default();
        let relay = Arc::new(match &opts.relay_dump {
            Some(path) => relay::Relay::new(opts.relay_rate).dumping_to(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("cannot open --relay-dump {}", path.display()))?,
            ),
            None => relay::Relay::new(opts.relay_rate),
        });
        if let Some(addr) = opts.metrics_listen {
            let metrics_listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot serve metrics on {addr} (metrics_listen); is the port taken?"))?;
            info!(%addr, "metrics at http://{addr}/metrics");
            tokio::spawn(metrics::serve(
                metrics_listener,
                hub.clone(),
                relay.clone(),
                stats.clone(),
            ));
        }
        let app = api::router(api::ApiState {
            hub: hub.clone(),
            tls_fingerprint,
            relay,
            stats,
        });
        tokio::spawn(api::serve(
            listener,
            server_config,
            app,
            crate::slots::Slots::new(api::MAX_PENDING_PER_SOURCE, api::MAX_PENDING),
        ));
        if opts.stun_port != 0 {
            for port in [opts.stun_port, opts.stun_port.wrapping_add(1)] {
                let socket = tokio::net::UdpSocket::bind((opts.listen.ip(), port))
                    .await
                    .with_context(|| {
                        format!("cannot listen for STUN on UDP port {port}; choose another --stun-port (0: none)")
                    })?;
                tokio::spawn(crate::protocol::stun::serve(socket));
            }
            info!(ports = ?[opts.stun_port, opts.stun_port.wrapping_add(1)], "STUN targets up");
        }
        tokio::spawn(hub::push_policies(hub.clone()));
        tokio::spawn(watch(hub.clone(), authorized_path, opts.policy.clone()));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        crate::service::ready("serving; 0 nodes connected");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        crate::service::stopping();
        info!("coordinator shutting down");
        anyhow::Ok(())
    })?;
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

fn load_policy(path: &Path) -> Result<crate::policy::PolicyFile> {
    let text = fs::read_to_string(path).with_context(|| format!("cannot read the policy {}", path.display()))?;
    let policy =
        crate::policy::PolicyFile::parse(&text).map_err(|e| anyhow::anyhow!("policy {}: {e}", path.display()))?;
    info!(rules = policy.rules.len(), file = %path.display(), "policy loaded");
    Ok(policy)
}

fn load_authorized(path: &Path) -> Result<std::collections::HashMap<String, admission::AuthorizedKey>> {
    let (keys, problems) = admission::read_authorized_keys(path).map_err(anyhow::Error::msg)?;
    for p in problems {
        warn!("{}: {p} (line skipped)", path.display());
    }
    info!(keys = keys.len(), file = %path.display(), "authorized keys loaded");
    Ok(keys)
}

/// A file the coordinator reloads when its modification time changes or on SIGHUP.
struct WatchedFile {
    path: PathBuf,
    seen: Option<SystemTime>,
}

impl WatchedFile {
    fn new(path: Option<PathBuf>) -> Option<Self> {
        path.map(|path| WatchedFile {
            seen: Self::mtime(&path),
            path,
        })
    }

    fn mtime(path: &Path) -> Option<SystemTime> {
        fs::metadata(path).and_then(|m| m.modified()).ok()
    }

    /// Whether to reload now (`forced` by SIGHUP, or the file changed since last asked).
    fn due(&mut self, forced: bool) -> bool {
        let now = Self::mtime(&self.path);
        let changed = now != self.seen;
        self.seen = now;
        forced || changed
    }
}

/// Reload authorized_keys and the policy on change or SIGHUP; reconcile the store and take held
/// candidates twice a second.
async fn watch(hub: Arc<Mutex<Hub>>, authorized: Option<PathBuf>, policy: Option<PathBuf>) {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let (mut authorized, mut policy) = (WatchedFile::new(authorized), WatchedFile::new(policy));
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    // The watchdog is pinged from this loop, which takes the hub lock each round: a wedged hub
    // or runtime stops the pings.
    let watchdog = crate::service::watchdog_period();
    let mut last_ping = std::time::Instant::now();
    let mut shown = None;
    loop {
        let hangup = async {
            match hup.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        let forced = tokio::select! {
            _ = tick.tick() => false,
            _ = hangup => true,
        };
        if let Some(file) = authorized.as_mut()
            && file.due(forced)
        {
            match load_authorized(&file.path) {
                Ok(keys) => {
                    if let Err(e) = crate::sync::lock(&hub).set_authorized(keys) {
                        warn!("authorized_keys reloaded, but the store refused a change: {e}");
                    }
                }
                Err(e) => warn!("keeping the previous authorized keys: {e:#}"),
            }
        }
        if let Some(file) = policy.as_mut()
            && file.due(forced)
        {
            match load_policy(&file.path) {
                Ok(p) => crate::sync::lock(&hub).set_policy(p),
                Err(e) => warn!("keeping the policy in force: {e:#}"),
            }
        }
        let mut state = crate::sync::lock(&hub);
        if let Err(e) = state.reconcile() {
            warn!("reconciling with the store failed: {e}");
        }
        let now = std::time::Instant::now();
        state.flush_paced(now);
        let connected = state.connected();
        drop(state);
        if let Some(period) = watchdog
            && now.duration_since(last_ping) >= period
        {
            crate::service::watchdog();
            last_ping = now;
        }
        if shown != Some(connected) {
            crate::service::status(&format!("serving; {connected} nodes connected"));
            shown = Some(connected);
        }
    }
}

/// `tunnelmesh coordinator info`.
pub fn info(data_dir: &Path) -> Result<()> {
    let store = open_existing_store(data_dir)?;
    let identity = coordinator_identity(data_dir)?;
    let nodes = store.nodes()?;
    println!(
        "TLS fingerprint: {}",
        store
            .setting("tls_fingerprint")?
            .unwrap_or_else(|| "(not served yet)".into())
    );
    println!("coordinator key: {}", identity.public().ssh_keygen_line());
    println!("IPv4 prefix: {}", store.setting("ipv4_prefix")?.unwrap_or_default());
    println!("IPv6 prefix: {}", store.setting("ipv6_prefix")?.unwrap_or_default());
    println!(
        "nodes: {} ({} revoked)",
        nodes.len(),
        nodes.iter().filter(|n| n.revoked).count()
    );
    Ok(())
}

/// Parse `90s`, `15m`, `2h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let (num, unit) = s.split_at(s.trim_end_matches(|c: char| c.is_ascii_alphabetic()).len());
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("{s:?} is not a duration; use e.g. 90s, 15m, 2h, 7d"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => bail!("{s:?} has an unknown unit; use s, m, h or d"),
    };
    if secs == 0 {
        bail!("a token lifetime must be positive");
    }
    Ok(Duration::from_secs(secs))
}

/// `tunnelmesh coordinator token create`.
pub fn token_create(data_dir: &Path, ttl: Duration, uses: u32, tags: Vec<String>, names: &str) -> Result<()> {
    if uses == 0 {
        bail!("--uses must be at least 1");
    }
    let names = admission::TokenNames::parse(names).map_err(anyhow::Error::msg)?;
    let store = open_existing_store(data_dir)?;
    let (token, hash) = admission::new_token();
    store.insert_token(&TokenRecord {
        hash,
        uses_left: uses,
        expires: unix_now() + ttl.as_secs() as i64,
        tags,
        names: names.pattern(),
    })?;
    println!("{token}");
    Ok(())
}

/// `tunnelmesh coordinator revoke NAME|FINGERPRINT`.
pub fn revoke(data_dir: &Path, who: &str) -> Result<()> {
    let store = open_existing_store(data_dir)?;
    match store.revoke(who)? {
        Some(n) => {
            println!(
                "revoked {} ({}); peers drop it within seconds. A new mesh key was issued: peers accept the \
                 previous one for {} more minutes, so no tunnel drops",
                n.name,
                n.fingerprint,
                hub::MESH_KEY_OVERLAP_SECS / 60
            );
            Ok(())
        }
        None => bail!("no node is named or has the fingerprint {who:?}"),
    }
}

/// `tunnelmesh coordinator remove NAME|FINGERPRINT`.
pub fn remove(data_dir: &Path, who: &str) -> Result<()> {
    let store = open_existing_store(data_dir)?;
    match store.set_removed(who, true)? {
        Some(n) => {
            println!(
                "removed {} ({}) from the mesh; it keeps its address if it is admitted again",
                n.name, n.fingerprint
            );
            Ok(())
        }
        None => bail!("no node is named or has the fingerprint {who:?}"),
    }
}

/// `tunnelmesh coordinator rotate-mesh-key`.
pub fn rotate_mesh_key(data_dir: &Path) -> Result<()> {
    let store = open_existing_store(data_dir)?;
    store.add_mesh_key(&MeshKeyRecord {
        key: new_mesh_key(),
        created: unix_now(),
    })?;
    println!(
        "new mesh key issued; peers accept the previous one for {} more minutes, so no tunnel drops",
        hub::MESH_KEY_OVERLAP_SECS / 60
    );
    Ok(())
}

/// `tunnelmesh coordinator policy explain SRC DST PROTO/PORT`: which rule lets node SRC reach
/// node DST, or that default deny applies.
pub fn explain(data_dir: &Path, policy_path: &Path, src: &str, dst: &str, spec: &str) -> Result<()> {
    use crate::policy::{
        Conntrack, Member, PacketInfo, Proto, Verdict, compile_for, inbound_verdict, ports::parse_ports,
    };
    let store = open_existing_store(data_dir)?;
    let policy = load_policy(policy_path)?;
    let (v4, v6) = prefixes(&store, None, None)?;
    let ipam = Ipam::new(v4, v6, [])?;
    let members: Vec<Member> = hub::members(&store.nodes()?, &ipam);
    let find = |name: &str| {
        members
            .iter()
            .find(|m| m.name == name)
            .ok_or_else(|| anyhow::anyhow!("no node is named {name:?}"))
    };
    let (from, to) = (find(src)?, find(dst)?);
    let (proto, ports) = parse_ports(spec)?;
    let addr = |m: &Member| m.addresses[0].addr();
    let packet = PacketInfo {
        src: addr(from),
        dst: addr(to),
        proto,
        src_port: 40000,
        dst_port: ports.low,
        icmp_type: ports.low as u8,
        icmp_id: 1,
        later_fragment: false,
    };
    let compiled = compile_for(&policy, &members, dst);
    match inbound_verdict(&compiled, &mut Conntrack::new(1), &packet, std::time::Instant::now()) {
        Verdict::Allow(id) => {
            let rule = &policy.rules[id as usize];
            let list =
                |v: &[toml::Spanned<String>]| v.iter().map(|s| s.get_ref().as_str()).collect::<Vec<_>>().join(", ");
            println!(
                "{src} → {dst} {spec}: allowed by rule {} (line {}: from [{}] to [{}] ports [{}])",
                id + 1,
                rule.line,
                list(&rule.from),
                list(&rule.to),
                list(&rule.ports)
            );
        }
        _ if proto == Proto::Any => println!("{src} → {dst} any: not every protocol is allowed (default deny)"),
        _ => println!("{src} → {dst} {spec}: denied — no rule allows it (default deny)"),
    }
    Ok(())
}
