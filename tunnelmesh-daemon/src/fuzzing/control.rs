//! Targets for the coordinator protocol in both directions: what a peer sends the coordinator
//! (the hello, JSON control messages, binary relay frames) and what the coordinator sends a
//! node (welcome parts and pushes). Inputs are either text as it comes or messages built from
//! the input with the real types, so the fuzzer reaches past serde into the logic.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::OnceLock,
};

use arbitrary::{Arbitrary, Unstructured};
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};

use crate::{
    control::proto::{ClientMsg, JOIN_NAMESPACE, MeshInfo, NodeInfo, PeerInfo, ServerMsg, join_transcript},
    coordinator::{
        hub::{Admitted, Hub},
        ipam::Ipam,
        relay::{Budget, Relay},
        store::SqliteStore,
    },
    device::PeerTable,
    fastpath::acl::KernelTables,
    identity::Identity,
    node::client::state::{Change, MeshState, udp_endpoints},
    policy::{CompiledRule, NodePolicy, PortRange, Proto},
    protocol::discovery::NatKind,
};

const COORDINATOR: &str = "ssh-ed25519 AAAA coordinator";
const CERTIFICATE: &str = "SHA256:fuzz-certificate";
const TOKEN: &str = "tmtok_fuzz";
const NONCE: &[u8] = b"fuzz-nonce";

/// Fixed identities: members the hub admits before the input starts, and keys the input may use.
fn identities() -> &'static [Identity] {
    static IDS: OnceLock<Vec<Identity>> = OnceLock::new();
    IDS.get_or_init(|| {
        (0..4u8)
            .map(|i| Identity::from_seed([i + 1; 32], &format!("root@node{i}")))
            .collect()
    })
}

#[derive(Debug, Arbitrary)]
enum Endpoint {
    V4([u8; 4], u16),
    V6([u16; 8], u16),
    Ssh([u8; 4], u16),
    Text(String),
}

impl Endpoint {
    fn render(&self) -> String {
        match self {
            Endpoint::V4(ip, port) => SocketAddr::new(Ipv4Addr::from(*ip).into(), *port).to_string(),
            Endpoint::V6(ip, port) => SocketAddr::new(Ipv6Addr::from(*ip).into(), *port).to_string(),
            Endpoint::Ssh(ip, port) => format!("ssh://{}", SocketAddr::new(Ipv4Addr::from(*ip).into(), *port)),
            Endpoint::Text(t) => t.clone(),
        }
    }
}

fn nat(n: u8) -> NatKind {
    [NatKind::Unknown, NatKind::None, NatKind::Easy, NatKind::Hard][usize::from(n % 4)]
}

#[derive(Debug, Arbitrary)]
enum Hello {
    /// A fixed identity's hello, signed right or not.
    Built {
        who: u8,
        signed: bool,
        token: Option<Option<String>>,
        name: Option<String>,
        listen_port: u16,
        endpoints: Vec<Endpoint>,
        ssh_port: Option<u16>,
        nat: u8,
    },
    /// Whatever text arrives as the hello.
    Text(String),
}

#[derive(Debug, Arbitrary)]
enum FromPeer {
    Hello {
        hello: Hello,
        remote: [u8; 4],
    },
    /// A control message from connected node `who` on its current connection or a stale one.
    Candidates {
        who: u8,
        stale: bool,
        endpoints: Vec<Endpoint>,
        nat: u8,
    },
    Punch {
        who: u8,
        peer: u8,
        other: Option<String>,
    },
    Text {
        who: u8,
        text: String,
    },
    /// A binary relay frame from `who`: a destination key (a member's or not) and the message.
    Relay {
        who: u8,
        to_member: Option<u8>,
        frame: Vec<u8>,
    },
    /// The operator changed the store (revoked a node, say): the hub reconciles.
    Revoke {
        who: u8,
    },
}

/// Each fixed identity's signature of this coordinator's transcript, and of another's
/// (computed once: signing is most of a fresh hub's cost).
fn signatures() -> &'static [(String, String)] {
    static SIGS: OnceLock<Vec<(String, String)>> = OnceLock::new();
    SIGS.get_or_init(|| {
        let transcript = join_transcript(NONCE, COORDINATOR, CERTIFICATE);
        identities()
            .iter()
            .map(|id| {
                (
                    id.sign(JOIN_NAMESPACE, &transcript),
                    id.sign(JOIN_NAMESPACE, b"another coordinator's transcript"),
                )
            })
            .collect()
    })
}

fn hello_of(who: usize, signed: bool, token: Option<String>) -> ClientMsg {
    let id = &identities()[who];
    let (right, wrong) = &signatures()[who];
    ClientMsg::Hello {
        ssh_key: id.public().ssh_line_with_comment(),
        signature: if signed { right.clone() } else { wrong.clone() },
        token,
        name: None,
        listen_port: 51820,
        endpoints: vec![],
        ssh_port: None,
        nat: NatKind::Unknown,
    }
}

/// What peers send the coordinator, through the hub and the relay as the API calls them.
pub fn coordinator(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let store = SqliteStore::for_tests(TOKEN);
    let ipam = Ipam::new(
        "100.64.0.0/10".parse().expect("a prefix"),
        "fd00::/64".parse().expect("a prefix"),
        [],
    )
    .expect("an address plan");
    let mut hub = Hub::new(Box::new(store), ipam, COORDINATOR.into(), CERTIFICATE.into()).expect("a hub");
    let relay = Relay::new(64 * 1024);
    let ids = identities();
    let remote: IpAddr = "198.18.0.9".parse().expect("an address");
    let mut connected: Vec<Admitted> = (0..2)
        .map(|who| {
            hub.admit(hello_of(who, true, Some(TOKEN.into())), NONCE, remote)
                .expect("admitted")
        })
        .collect();
    let mut budgets: Vec<Budget> = (0..ids.len()).map(|_| Budget::new(relay.rate)).collect();
    let _routes: Vec<_> = ids
        .iter()
        .map(|id| relay.register(*id.public().noise_public(), 0))
        .collect();
    for _ in 0..32 {
        let Ok(step) = FromPeer::arbitrary(&mut u) else { break };
        let pick = |who: u8, connected: &[Admitted]| {
            connected
                .get(usize::from(who) % connected.len().max(1))
                .map(|c| (c.fingerprint.clone(), c.connection))
        };
        match step {
            FromPeer::Hello { hello, remote } => {
                let msg = match hello {
                    Hello::Built {
                        who,
                        signed,
                        token,
                        name,
                        listen_port,
                        endpoints,
                        ssh_port,
                        nat: n,
                    } => {
                        let token = token.unwrap_or(Some(TOKEN.into()));
                        let ClientMsg::Hello { ssh_key, signature, .. } =
                            hello_of(usize::from(who) % ids.len(), signed, None)
                        else {
                            unreachable!("hello_of makes hellos")
                        };
                        ClientMsg::Hello {
                            ssh_key,
                            signature,
                            token,
                            name,
                            listen_port,
                            endpoints: endpoints.iter().map(Endpoint::render).collect(),
                            ssh_port,
                            nat: nat(n),
                        }
                    }
                    Hello::Text(t) => match serde_json::from_str::<ClientMsg>(&t) {
                        Ok(m) => m,
                        Err(_) => continue,
                    },
                };
                if let Ok(admitted) = hub.admit(msg, NONCE, Ipv4Addr::from(remote).into())
                    && connected.len() < 8
                {
                    connected.push(admitted);
                }
            }
            FromPeer::Candidates {
                who,
                stale,
                endpoints,
                nat: n,
            } => {
                if let Some((fp, conn)) = pick(who, &connected) {
                    let msg = ClientMsg::Candidates {
                        endpoints: endpoints.iter().map(Endpoint::render).collect(),
                        nat: nat(n),
                    };
                    let _ = hub.on_message(&fp, conn.wrapping_add(u64::from(stale)), msg);
                }
            }
            FromPeer::Punch { who, peer, other } => {
                if let Some((fp, conn)) = pick(who, &connected) {
                    let peer = other.unwrap_or_else(|| ids[usize::from(peer) % ids.len()].public().fingerprint());
                    let _ = hub.on_message(&fp, conn, ClientMsg::Punch { peer });
                }
            }
            FromPeer::Text { who, text } => {
                if let (Some((fp, conn)), Ok(msg)) = (pick(who, &connected), serde_json::from_str::<ClientMsg>(&text)) {
                    let _ = hub.on_message(&fp, conn, msg);
                }
            }
            FromPeer::Relay { who, to_member, frame } => {
                let from = usize::from(who) % ids.len();
                let frame = match to_member {
                    Some(to) => [&ids[usize::from(to) % ids.len()].public().noise_public()[..], &frame].concat(),
                    None => frame,
                };
                relay.forward(ids[from].public().noise_public(), &frame, &mut budgets[from]);
            }
            FromPeer::Revoke { who } => {
                if let Some((fp, _)) = pick(who, &connected) {
                    let _ = hub.revoke_now(&fp);
                }
            }
        }
        // The coordinator's pusher and ticker: compile what changed, take what was held.
        hub.settle_policies();
        hub.flush_paced(std::time::Instant::now() + crate::coordinator::hub::CANDIDATES_INTERVAL);
        // The API drains every connection's pushes; a push is a message a node can read.
        for c in &mut connected {
            while let Ok(msg) = c.updates.try_recv() {
                let text = serde_json::to_string(&*msg).expect("server messages serialize");
                serde_json::from_str::<ServerMsg>(&text).expect("what the hub pushes parses");
            }
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Peer {
    Member {
        who: u8,
        name: String,
        ipv4: [u8; 4],
        ipv6: [u16; 8],
        endpoints: Vec<Endpoint>,
        tags: Vec<String>,
        nat: u8,
    },
    Fields {
        name: String,
        fingerprint: String,
        ssh_key: String,
        ipv4: String,
        ipv6: String,
        endpoints: Vec<String>,
    },
}

impl Peer {
    fn info(self) -> PeerInfo {
        match self {
            Peer::Member {
                who,
                name,
                ipv4,
                ipv6,
                endpoints,
                tags,
                nat: n,
            } => {
                let id = &identities()[usize::from(who) % identities().len()];
                PeerInfo {
                    name,
                    fingerprint: id.public().fingerprint(),
                    ssh_key: id.public().ssh_line_with_comment(),
                    ipv4: Ipv4Addr::from(ipv4).to_string(),
                    ipv6: Ipv6Addr::from(ipv6).to_string(),
                    endpoints: endpoints.iter().map(Endpoint::render).collect(),
                    tags,
                    nat: nat(n),
                }
            }
            Peer::Fields {
                name,
                fingerprint,
                ssh_key,
                ipv4,
                ipv6,
                endpoints,
            } => PeerInfo {
                name,
                fingerprint,
                ssh_key,
                ipv4,
                ipv6,
                endpoints,
                tags: vec![],
                nat: NatKind::Unknown,
            },
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Rule {
    id: u32,
    sources: Vec<([u8; 4], u8)>,
    proto: u8,
    low: u16,
    high: u16,
}

#[derive(Debug, Arbitrary)]
enum FromCoordinator {
    Upsert(Peer),
    Removed {
        who: u8,
    },
    MeshKeys(Vec<Vec<u8>>),
    MeshKeyText(Vec<String>),
    Policy {
        rules: Vec<Rule>,
        destinations: Vec<([u8; 4], u8)>,
    },
    Punch {
        who: u8,
        endpoints: Vec<Endpoint>,
        nat: u8,
    },
    Revoked(String),
    Text(String),
}

fn net((ip, len): ([u8; 4], u8)) -> ipnet::IpNet {
    ipnet::Ipv4Net::new(Ipv4Addr::from(ip), len % 33)
        .expect("a length of at most 32")
        .into()
}

/// What the coordinator sends a node after its welcome, applied as the node's client applies
/// it: the state, the peer table built from it, the mesh keys, the policy's kernel tables.
pub fn node(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mut state = MeshState {
        mesh: MeshInfo {
            node: NodeInfo {
                name: "web".into(),
                fingerprint: identities()[0].public().fingerprint(),
                ipv4: "100.64.0.2".into(),
                ipv6: "fd00::2".into(),
                tags: vec![],
            },
            mesh_keys: vec![BASE64.encode([7u8; 32])],
            ipv4_prefix: "100.64.0.0/10".into(),
            ipv6_prefix: "fd00::/64".into(),
            policy: NodePolicy::default(),
            stun_port: 3478,
        },
        peers: BTreeMap::new(),
    };
    let mut table = PeerTable::default();
    for _ in 0..32 {
        let Ok(step) = FromCoordinator::arbitrary(&mut u) else {
            break;
        };
        let msg = match step {
            FromCoordinator::Upsert(peer) => ServerMsg::PeerUpsert { peer: peer.info() },
            FromCoordinator::Removed { who } => ServerMsg::PeerRemoved {
                fingerprint: identities()[usize::from(who) % identities().len()]
                    .public()
                    .fingerprint(),
            },
            FromCoordinator::MeshKeys(keys) => ServerMsg::MeshKeys {
                mesh_keys: keys.iter().map(|k| BASE64.encode(k)).collect(),
            },
            FromCoordinator::MeshKeyText(mesh_keys) => ServerMsg::MeshKeys { mesh_keys },
            FromCoordinator::Policy { rules, destinations } => ServerMsg::Policy {
                policy: NodePolicy {
                    rules: rules
                        .into_iter()
                        .map(|r| CompiledRule {
                            id: r.id,
                            sources: r.sources.into_iter().map(net).collect(),
                            proto: [Proto::Any, Proto::Tcp, Proto::Udp, Proto::Icmp][usize::from(r.proto % 4)],
                            ports: PortRange {
                                low: r.low,
                                high: r.high,
                            },
                        })
                        .collect(),
                    destinations: destinations.into_iter().map(net).collect(),
                },
            },
            FromCoordinator::Punch { who, endpoints, nat: n } => ServerMsg::Punch {
                peer: identities()[usize::from(who) % identities().len()]
                    .public()
                    .fingerprint(),
                endpoints: endpoints.iter().map(Endpoint::render).collect(),
                nat: nat(n),
            },
            FromCoordinator::Revoked(message) => ServerMsg::Revoked { message },
            FromCoordinator::Text(t) => match serde_json::from_str::<ServerMsg>(&t) {
                Ok(m) => m,
                Err(_) => continue,
            },
        };
        // Over the wire and back, as the client reads it.
        let text = serde_json::to_string(&msg).expect("server messages serialize");
        let msg: ServerMsg = serde_json::from_str(&text).expect("what serializes parses");
        if let ServerMsg::Punch { endpoints, .. } = &msg {
            let _ = udp_endpoints(endpoints);
        }
        let Ok(change) = state.apply(msg) else { continue };
        if change != Change::Nothing {
            table = PeerTable::build(state.peer_specs(), &table);
            let _ = state.mesh_keys();
            let _ = state.addresses();
            let _ = KernelTables::build(&state.mesh.policy);
        }
    }
}
