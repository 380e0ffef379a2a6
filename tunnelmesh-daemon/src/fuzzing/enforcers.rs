//! Targets for what decides a packet's fate, each held against its twin: the inner-IP parsers
//! of the policy, the userspace matcher against the TC ACL and the userspace classifier against
//! both shield programs, XDP and TC (all through BPF_PROG_TEST_RUN, so they need root), and TUN offload
//! splitting against coalescing.

use std::{
    sync::{Mutex, OnceLock},
    time::Instant,
};

use arbitrary::{Arbitrary, Unstructured};
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use tunnelmesh_common::shield::{KNOWN_INDICES_MAP, ShieldReason};

use super::files;
use crate::{
    fastpath::{
        acl::KernelAcl,
        shield::{Hook, load_shield, shield_counters, testing as shield},
    },
    offload::{
        Layout, VNET_HDR_LEN, VnetHeader,
        checksum::transport_valid,
        coalesce::coalesce,
        split::{
            Segments,
            testing::{as_super, payload, tcp_packet},
        },
    },
    policy::{Conntrack, NodePolicy, PacketInfo, PolicyFile, cases, compile_for, decide},
    protocol::{
        ip::IpHeader,
        wire::{self, HeaderError, Kind},
    },
};

/// The two inner-IP parsers agree (the data path's `IpHeader`, the policy's `PacketInfo`), and
/// the matcher decides whatever they accept against the shared table's policy.
pub fn inner_ip(data: &[u8]) {
    let header = IpHeader::parse(data);
    let info = PacketInfo::parse(data);
    if let Some(info) = &info {
        let header = header.as_ref().expect("what the policy parses, the data path parses");
        assert_eq!((header.src, header.dst), (info.src, info.dst));
        assert!(header.len <= data.len());
    }
    let policy = cases::web_policy();
    let mut conntrack = Conntrack::new(64);
    let now = Instant::now();
    let _ = decide(&policy, &mut conntrack, data, now);
    if let Some(info) = info {
        // Once the node sent it, its mirror image is a reply.
        if let Some(flow) = info.outbound_flow() {
            conntrack.outbound(flow, now);
        }
        let _ = info.reply_flow();
    }
}

/// Packets for the ACL differential: built by the shared table's builder, or raw bytes.
#[derive(Debug, Arbitrary)]
enum Packet {
    Built {
        src: u8,
        dst: u8,
        v6: bool,
        l4: u8,
        a: u16,
        b: u16,
        frag: u8,
    },
    Raw(Vec<u8>),
}

impl Packet {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Packet::Raw(b) => b.clone(),
            &Packet::Built {
                src,
                dst,
                v6,
                l4,
                a,
                b,
                frag,
            } => {
                let l4 = match l4 % 4 {
                    0 => cases::L4::Tcp(a, b),
                    1 => cases::L4::Udp(a, b),
                    2 => cases::L4::Icmp(a as u8, b),
                    _ => cases::L4::Proto(a as u8),
                };
                let frag = [cases::Frag::None, cases::Frag::First, cases::Frag::Later][usize::from(frag % 3)];
                // Hosts 1–4 are members (and 9 a stranger); the rest of the byte is noise.
                cases::packet(src % 5 + 1, dst % 5 + 1, v6, l4, frag)
            }
        }
    }
}

#[derive(Debug, Arbitrary)]
struct AclInput {
    /// A policy file to compile for `web`; none: the shared table's.
    policy: Option<files::Policy>,
    packets: Vec<Packet>,
}

/// The loaded TC programs and the policy in force, kept across inputs (loading verifies the
/// programs, which is slow).
struct Acl {
    kernel: KernelAcl,
    policy: NodePolicy,
}

fn acl() -> &'static Mutex<Acl> {
    static ACL: OnceLock<Mutex<Acl>> = OnceLock::new();
    ACL.get_or_init(|| {
        let policy = cases::web_policy();
        let kernel = KernelAcl::load(&policy).expect("the TC ACL must load (run as root on a BPF-capable kernel)");
        Mutex::new(Acl { kernel, policy })
    })
}

/// The userspace matcher and the TC ACL give every inbound packet the same verdict and name
/// the same rule, for the same compiled policy.
pub fn acl_vs_matcher(data: &[u8]) {
    let Ok(input) = AclInput::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let policy = match &input.policy {
        None => cases::web_policy(),
        Some(p) => match PolicyFile::parse(&p.render()) {
            Ok(file) => compile_for(&file, &files::members(), "web"),
            Err(_) => return,
        },
    };
    let mut acl = crate::sync::lock(acl());
    if acl.policy != policy {
        if acl.kernel.install(&policy).is_err() {
            // Too big for the kernel's maps: the daemon enforces it in userspace, nothing to compare.
            return;
        }
        acl.policy = policy;
    }
    let now = Instant::now();
    for packet in input.packets.iter().take(32) {
        let bytes = packet.bytes();
        let userspace = userspace_of(&acl.policy, &bytes, now);
        // BPF_PROG_TEST_RUN refuses (EINVAL) a frame whose EtherType says IPv4 or IPv6 but
        // that is shorter than that header (the kernel's `empty_skb` selftest). Such a packet
        // never reaches the TUN device: the data path drops it first (`rx_bad_inner`).
        let v6 = bytes.first().is_some_and(|b| b >> 4 == 6);
        if bytes.len() < if v6 { 40 } else { 20 } {
            assert_eq!(userspace, crate::policy::Verdict::Deny);
            continue;
        }
        let kernel = acl.kernel.ingress_verdict(&bytes);
        assert_eq!(
            userspace, kernel,
            "the enforcers disagree on {bytes:02x?} under {:?}",
            acl.policy
        );
    }
}

fn userspace_of(policy: &NodePolicy, packet: &[u8], now: Instant) -> crate::policy::Verdict {
    decide(policy, &mut Conntrack::new(16), packet, now)
}

const SHIELD_PORT: u16 = 51820;
/// The Noise public key of the node the fuzzed shield guards.
const SHIELD_LOCAL: [u8; 32] = [0x42; 32];

/// One loaded shield per hook, each with its own maps (budgets), so the two judge alike.
fn shields() -> &'static Mutex<Vec<(Hook, Ebpf)>> {
    static SHIELDS: OnceLock<Mutex<Vec<(Hook, Ebpf)>>> = OnceLock::new();
    SHIELDS.get_or_init(|| {
        let loaded = shield::HOOKS
            .iter()
            .map(|&hook| {
                // The log reader goes at once: the loaded program holds its ring, whose rare
                // lines nobody reads here.
                let (mut ebpf, _) = load_shield(
                    SHIELD_PORT,
                    &SHIELD_LOCAL,
                    crate::fastpath::kernel_log::ToTracing("shield"),
                )
                .expect("the shield must load (run as root on a BPF-capable kernel)");
                let mut known: HashMap<&mut MapData, u32, u8> =
                    HashMap::try_from(ebpf.map_mut(KNOWN_INDICES_MAP).expect("the index map")).expect("a hash map");
                known.insert(&1, &1, 0).expect("the index map takes an entry");
                (hook, ebpf)
            })
            .collect();
        Mutex::new(loaded)
    })
}

/// Both shield programs (XDP and TC) and the userspace classifier agree on every datagram: the
/// shield drops for a malformation exactly what the classifier refuses for it, and what the
/// classifier accepts the shield passes or holds back only for a budget or an unknown session; a
/// handshake passes exactly when userspace finds this node's mac1 on it. The selector's top bit
/// signs a handshake with that mac1, so both sides of the check are reached.
pub fn shield_vs_classifier(data: &[u8]) {
    let Some((&selector, msg)) = data.split_first() else {
        return;
    };
    let now = Instant::now();
    let mut msg = msg.to_vec();
    let handshake = matches!(wire::classify(&msg), Ok(Kind::Initiation | Kind::Response));
    if selector & 0x80 != 0 && handshake {
        crate::protocol::noise::CookieJar::new(&SHIELD_LOCAL).stamp(&mut msg, now);
    }
    let msg = &msg[..];
    let host = (selector >> 1) & 0x3f;
    let frame = if selector & 1 == 0 {
        shield::frame_v4_from([198, 18, 1, host], SHIELD_PORT, msg)
    } else {
        let mut src = [0xfd; 16];
        src[15] = host;
        shield::frame_v6_from(src, SHIELD_PORT, msg)
    };
    let userspace = wire::classify(msg);
    let any_source = std::net::SocketAddr::from(([198, 18, 1, host], 40000));
    let mac_ok = handshake
        && crate::protocol::noise::CookieChecker::new(&SHIELD_LOCAL, now).verify(msg, any_source, false, now)
            == crate::protocol::noise::MacVerdict::Accept;
    let expected: &[ShieldReason] = match userspace {
        Ok(Kind::Initiation | Kind::Response) if !mac_ok => &[ShieldReason::BadMac],
        Err(HeaderError::TooShort) => &[ShieldReason::TooShort],
        Err(HeaderError::BadType) => &[ShieldReason::BadType],
        Err(HeaderError::BadLength) => &[ShieldReason::BadLength],
        // Nothing blocks a source here (only the daemon writes blocks).
        Ok(Kind::Initiation) => &[ShieldReason::Passed],
        Ok(Kind::Response | Kind::CookieReply) => &[ShieldReason::Passed],
        Ok(Kind::Data) if wire::receiver_index(msg) == 1 => &[ShieldReason::Passed],
        // Dropped, or passed as the source's one sample a second.
        Ok(Kind::Data) => &[ShieldReason::UnknownIndex, ShieldReason::Passed],
        Ok(Kind::Stun) => &[ShieldReason::Stun, ShieldReason::StunRateLimited],
    };
    for (hook, ebpf) in crate::sync::lock(shields()).iter_mut() {
        let before = shield_counters(ebpf).expect("the counters read");
        let action = shield::run(ebpf, *hook, &frame);
        let after = shield_counters(ebpf).expect("the counters read");
        let moved: Vec<ShieldReason> = before
            .iter()
            .zip(&after)
            .filter(|((_, b), (_, a))| a > b)
            .map(|((r, _), _)| *r)
            .collect();
        let [reason] = moved[..] else {
            panic!("one datagram moved {moved:?} at {hook:?}");
        };
        assert_eq!(action == shield::PASS, reason.passes(), "{hook:?} counted {reason:?}");
        assert!(
            expected.contains(&reason),
            "the {hook:?} shield says {reason:?}, userspace {userspace:?}, for {msg:02x?}"
        );
    }
}

#[derive(Debug, Arbitrary)]
enum Offload {
    /// A super-packet the kernel could hand over: split, then coalesced back.
    Tso {
        v6: bool,
        tcp_opt_words: u8,
        seq: u32,
        push: bool,
        len: u16,
        gso: u16,
        salt: u8,
    },
    /// A virtio-net header and a packet, as they come.
    Raw(Vec<u8>),
}

/// TUN offloads: any header and packet are split into valid segments or refused; a
/// super-packet split then coalesced is the same super-packet.
pub fn offload(data: &[u8]) {
    const MTU: usize = 1500;
    let Ok(input) = Offload::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    match input {
        Offload::Raw(bytes) => {
            let Ok(hdr) = VnetHeader::parse(&bytes) else { return };
            let mut packet = bytes[VNET_HDR_LEN..].to_vec();
            let Ok(segments) = Segments::new(hdr, &mut packet, MTU) else {
                return;
            };
            for i in 0..segments.count() {
                let mut out = vec![0u8; MTU];
                let n = segments.write(i, &mut out);
                assert!(n <= MTU);
                if segments.count() > 1 {
                    let seg = &out[..n];
                    let layout = Layout::whole(seg).expect("a segment is a whole packet");
                    assert!(transport_valid(seg, &layout), "segment {i}'s checksum");
                }
            }
        }
        Offload::Tso {
            v6,
            tcp_opt_words,
            seq,
            push,
            len,
            gso,
            salt,
        } => {
            let tcp_opts = 4 * usize::from(tcp_opt_words % 11);
            let flags = 0x10 | if push { 0x08 } else { 0 };
            let len = 1 + usize::from(len) % 60_000;
            let ip_and_tcp = if v6 { 40 } else { 20 } + 20 + tcp_opts;
            // Any MSS from 88 bytes up to what fits the MTU.
            let gso = 88 + usize::from(gso) % (MTU - ip_and_tcp - 87);
            let original = tcp_packet(v6, 0, tcp_opts, seq, flags, &payload(len, salt));
            let (hdr, mut sup) = as_super(original.clone(), gso as u16);
            let want = sup.clone();
            let segments = Segments::new(hdr, &mut sup, MTU).expect("a kernel super-packet splits");
            let pieces: Vec<Vec<u8>> = (0..segments.count())
                .map(|i| {
                    let mut out = vec![0u8; MTU];
                    let n = segments.write(i, &mut out);
                    out.truncate(n);
                    let layout = Layout::whole(&out).expect("a segment is a whole packet");
                    assert!(transport_valid(&out, &layout), "segment {i}'s checksum");
                    out
                })
                .collect();
            let out = coalesce(&pieces);
            // One receive batch holds at most 64 segments, a super-packet the head and 63 more.
            if pieces.len() <= 64 {
                if pieces.len() == 1 {
                    assert_eq!(out, vec![(VnetHeader::default(), original)]);
                    return;
                }
                assert_eq!(out.len(), 1, "one flow in order is one write");
                assert_eq!(out[0].0, hdr);
                assert!(out[0].1 == want, "coalescing gave back another super-packet");
            }
            // However many writes it took, they split back into exactly the segments, in order.
            let mut again = Vec::new();
            for (h, mut p) in out {
                let s = Segments::new(h, &mut p, MTU).expect("a coalesced write splits");
                for i in 0..s.count() {
                    let mut seg = vec![0u8; MTU];
                    let n = s.write(i, &mut seg);
                    seg.truncate(n);
                    again.push(seg);
                }
            }
            assert!(again == pieces, "coalescing lost, added or reordered data");
        }
    }
}
