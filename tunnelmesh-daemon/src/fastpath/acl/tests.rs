//! The shared policy table (`policy::cases`) run against the TC programs through
//! BPF_PROG_TEST_RUN; the userspace matcher runs the same table in `policy::matcher`.
//! Needs root (CAP_BPF); under CI these tests fail rather than skip when the kernel refuses.

use super::*;
use crate::policy::{
    CompiledRule, PortRange, Verdict,
    cases::{self, Case},
};

use super::testing::{TC_ACT_OK, TC_ACT_SHOT};

fn run(acl: &mut KernelAcl, program: &str, packet: &[u8]) -> u32 {
    acl.test_run(program, packet, 0)
}

fn run_segments(acl: &mut KernelAcl, program: &str, packet: &[u8], segments: u32) -> u32 {
    acl.test_run(program, packet, segments)
}

/// Move every flow's last-seen time `secs` into the past.
fn age_flows(acl: &mut KernelAcl, secs: u64) {
    let mut flows: HashMap<_, AclFlow, u64> =
        HashMap::try_from(acl.ebpf.map_mut(ACL_CONNTRACK_MAP).expect("conntrack")).unwrap();
    let entries: Vec<(AclFlow, u64)> = flows.iter().map(Result::unwrap).collect();
    for (flow, seen) in entries {
        flows
            .insert(&flow, &seen.wrapping_sub(secs * 1_000_000_000), 0)
            .unwrap();
    }
}

fn clear_flows(acl: &mut KernelAcl) {
    let mut flows: HashMap<_, AclFlow, u64> =
        HashMap::try_from(acl.ebpf.map_mut(ACL_CONNTRACK_MAP).expect("conntrack")).unwrap();
    let keys: Vec<AclFlow> = flows.keys().map(Result::unwrap).collect();
    for key in keys {
        flows.remove(&key).unwrap();
    }
}

/// The verdict of the kernel on `case`, told apart by which counter moved.
fn kernel_verdict(acl: &mut KernelAcl, case: &Case) -> Verdict {
    if let Some((out, sent)) = &case.opened {
        assert_eq!(
            run(acl, ACL_EGRESS_PROGRAM, out),
            TC_ACT_OK,
            "{}: egress never drops",
            case.name
        );
        age_flows(acl, case.at - sent);
    }
    if !cases::source_belongs_to_sender(case) {
        return Verdict::Deny;
    }
    acl.ingress_verdict(&case.inbound)
}

fn web_acl() -> KernelAcl {
    KernelAcl::load(&cases::web_policy()).expect("the ACL must load (run as root on a BPF-capable kernel)")
}

/// laptop → web tcp/443 (allowed by the web policy).
fn https_from_laptop() -> Vec<u8> {
    cases::packet(
        cases::LAPTOP,
        cases::WEB,
        true,
        cases::L4::Tcp(1, 443),
        cases::Frag::None,
    )
}

/// web → laptop udp/53 (a flow web opens: no rule allows laptop's answers by themselves).
fn dns_from_web() -> Vec<u8> {
    cases::packet(
        cases::WEB,
        cases::LAPTOP,
        false,
        cases::L4::Udp(7, 53),
        cases::Frag::None,
    )
}

/// A super-packet (the daemon's GRO writes, the kernel's TSO) counts as its segments.
#[test]
fn super_packets_count_as_their_segments() {
    let mut acl = web_acl();
    let https = https_from_laptop();
    let opened = dns_from_web();
    let before = acl.reasons();
    let hits_before: u64 = acl.rule_hits().unwrap().iter().map(|h| h.1).sum();
    assert_eq!(run_segments(&mut acl, ACL_INGRESS_PROGRAM, &https, 5), TC_ACT_OK);
    assert_eq!(run_segments(&mut acl, ACL_EGRESS_PROGRAM, &opened, 3), TC_ACT_OK);
    assert_eq!(run(&mut acl, ACL_INGRESS_PROGRAM, &https), TC_ACT_OK);
    let after = acl.reasons();
    let moved = |r: AclReason| after[&r] - before[&r];
    assert_eq!(moved(AclReason::Allowed), 5 + 1);
    assert_eq!(moved(AclReason::Tracked), 3);
    let hits_after: u64 = acl.rule_hits().unwrap().iter().map(|h| h.1).sum();
    assert_eq!(hits_after - hits_before, 6);
}

#[test]
fn the_policy_table_in_the_kernel() {
    let cases = cases::cases();
    assert!(cases.len() >= 50);
    let mut acl = web_acl();
    for case in &cases {
        // An empty flow table per case, as the userspace run has.
        clear_flows(&mut acl);
        assert_eq!(kernel_verdict(&mut acl, case), case.expected, "{}", case.name);
    }
}

#[test]
fn a_new_policy_replaces_the_old_one_whole_and_keeps_flows() {
    let mut acl = web_acl();
    let ssh_from_laptop = cases::packet(
        cases::LAPTOP,
        cases::WEB,
        false,
        cases::L4::Tcp(1, 22),
        cases::Frag::None,
    );
    let https = https_from_laptop();
    let opened = dns_from_web();
    let answer = cases::packet(
        cases::LAPTOP,
        cases::WEB,
        false,
        cases::L4::Udp(53, 7),
        cases::Frag::None,
    );
    run(&mut acl, ACL_EGRESS_PROGRAM, &opened);
    assert_eq!(run(&mut acl, ACL_INGRESS_PROGRAM, &ssh_from_laptop), TC_ACT_SHOT);
    assert_eq!(run(&mut acl, ACL_INGRESS_PROGRAM, &https), TC_ACT_OK);
    // Three swaps: each generation is rewritten at least once.
    for round in 0..3 {
        let ssh_only = NodePolicy {
            rules: vec![CompiledRule {
                id: 7,
                sources: vec!["100.64.0.1/32".parse().unwrap(), "fd00::1/128".parse().unwrap()],
                proto: Proto::Tcp,
                ports: PortRange { low: 22, high: 22 },
            }],
            destinations: cases::web_policy().destinations,
        };
        acl.install(&ssh_only).unwrap();
        assert_eq!(
            run(&mut acl, ACL_INGRESS_PROGRAM, &ssh_from_laptop),
            TC_ACT_OK,
            "round {round}"
        );
        assert_eq!(run(&mut acl, ACL_INGRESS_PROGRAM, &https), TC_ACT_SHOT, "round {round}");
        assert_eq!(acl.rule_hits().unwrap(), [(7, 1)]);
        acl.install(&cases::web_policy()).unwrap();
        assert_eq!(
            run(&mut acl, ACL_INGRESS_PROGRAM, &ssh_from_laptop),
            TC_ACT_SHOT,
            "round {round}"
        );
        assert_eq!(run(&mut acl, ACL_INGRESS_PROGRAM, &https), TC_ACT_OK, "round {round}");
        assert_eq!(
            run(&mut acl, ACL_INGRESS_PROGRAM, &answer),
            TC_ACT_OK,
            "flows survive policy changes"
        );
    }
    assert_eq!(acl.flows().unwrap().len(), 1);
    let (flow, _) = acl.flows().unwrap()[0];
    assert_eq!(
        (flow_addr(flow.local), flow_addr(flow.remote)),
        ("100.64.0.2".parse().unwrap(), "100.64.0.1".parse().unwrap())
    );
}

#[test]
fn nested_source_prefixes_carry_the_rules_of_the_shorter_ones() {
    let rule = |id, net: &str, low| CompiledRule {
        id,
        sources: vec![net.parse().unwrap()],
        proto: Proto::Tcp,
        ports: PortRange { low, high: low },
    };
    let policy = NodePolicy {
        rules: vec![rule(0, "100.64.0.0/10", 80), rule(1, "100.64.0.5/32", 22)],
        destinations: cases::web_policy().destinations,
    };
    let tables = KernelTables::build(&policy).unwrap();
    let host = tables
        .sources
        .iter()
        .find(|(len, _, _)| *len == 128)
        .expect("the host prefix");
    assert_eq!(host.2.bits[0], 0b11, "the /32 also carries the /10's rule");
    let mut acl = KernelAcl::load(&policy).unwrap();
    let from = |host: u8, port| cases::packet(host, cases::WEB, false, cases::L4::Tcp(1, port), cases::Frag::None);
    assert_eq!(run(&mut acl, ACL_INGRESS_PROGRAM, &from(5, 80)), TC_ACT_OK);
    assert_eq!(run(&mut acl, ACL_INGRESS_PROGRAM, &from(5, 22)), TC_ACT_OK);
    assert_eq!(run(&mut acl, ACL_INGRESS_PROGRAM, &from(6, 80)), TC_ACT_OK);
    assert_eq!(run(&mut acl, ACL_INGRESS_PROGRAM, &from(6, 22)), TC_ACT_SHOT);
}

#[test]
fn a_policy_beyond_the_slots_is_refused_before_any_write() {
    let rules = (0..=ACL_MAX_RULES)
        .map(|id| CompiledRule {
            id,
            sources: vec!["100.64.0.1/32".parse().unwrap()],
            proto: Proto::Udp,
            ports: PortRange::ALL,
        })
        .collect();
    let err = KernelTables::build(&NodePolicy {
        rules,
        destinations: Vec::new(),
    })
    .unwrap_err();
    assert!(err.to_string().contains("257 rules"), "{err}");
}

/// Security item 14, run against both enforcers. A peer allowed one port opens connections
/// from 70,000 source ports: web's answers (SYN-ACKs) used to open a flow each and churn the
/// 65,536-flow table, evicting the flow web itself opened. Now an answer whose replies a rule
/// allows anyway opens no flow. Then web opens 70,000 flows of its own while it keeps using
/// one: both tables evict the least recently used (the userspace one evicted by first
/// insertion), so the flow in use survives in both and an idle one goes in both.
#[test]
fn under_pressure_both_enforcers_keep_the_flow_in_use_and_answers_open_no_flow() {
    use crate::policy::{Conntrack, PacketInfo, decide, track_outbound};
    use cases::{Frag, L4, LAPTOP, WEB, packet};
    use tunnelmesh_common::acl::ACL_MAX_FLOWS;

    let policy = cases::web_policy();
    let mut acl = web_acl();
    let mut ct = Conntrack::new(ACL_MAX_FLOWS as usize);
    let now = std::time::Instant::now();
    let outbound = |acl: &mut KernelAcl, ct: &mut Conntrack, p: &[u8]| {
        assert_eq!(run(acl, ACL_EGRESS_PROGRAM, p), TC_ACT_OK);
        track_outbound(&policy, ct, &PacketInfo::parse(p).unwrap(), now);
    };
    let ssh = packet(WEB, LAPTOP, false, L4::Tcp(40000, 22), Frag::None);
    let ssh_reply = packet(LAPTOP, WEB, false, L4::Tcp(22, 40000), Frag::None);
    let both =
        |acl: &mut KernelAcl, ct: &mut Conntrack, p: &[u8]| (acl.ingress_verdict(p), decide(&policy, ct, p, now));
    outbound(&mut acl, &mut ct, &ssh);
    let tracked = acl.reasons()[&AclReason::Tracked];

    for port in 0..70_000u32 {
        let answer = packet(
            WEB,
            LAPTOP,
            false,
            L4::Tcp(443, 1024 + (port % 64_000) as u16),
            Frag::None,
        );
        outbound(&mut acl, &mut ct, &answer);
    }
    assert_eq!(
        acl.reasons()[&AclReason::Tracked],
        tracked,
        "the answers opened no flow"
    );
    assert_eq!(ct.len(), 1);
    assert_eq!(both(&mut acl, &mut ct, &ssh_reply), (Verdict::Reply, Verdict::Reply));

    let idle = packet(WEB, LAPTOP, false, L4::Udp(1, 9), Frag::None);
    let idle_reply = packet(LAPTOP, WEB, false, L4::Udp(9, 1), Frag::None);
    outbound(&mut acl, &mut ct, &idle);
    for i in 0..70_000u32 {
        let flow = packet(
            WEB,
            LAPTOP,
            false,
            L4::Udp(2 + (i / 60_000) as u16, (i % 60_000) as u16),
            Frag::None,
        );
        outbound(&mut acl, &mut ct, &flow);
        if i % 1000 == 0 {
            // The ssh session keeps talking.
            outbound(&mut acl, &mut ct, &ssh);
        }
    }
    assert_eq!(
        both(&mut acl, &mut ct, &ssh_reply),
        (Verdict::Reply, Verdict::Reply),
        "the flow in use survives"
    );
    assert_eq!(
        both(&mut acl, &mut ct, &idle_reply),
        (Verdict::Deny, Verdict::Deny),
        "the idle one was evicted"
    );
}

/// Each program says once, at the first packet it judges under it, which policy generation is
/// in force, and again only when another comes into force: never per packet.
#[test]
fn each_program_says_once_which_policy_generation_is_in_force() {
    let captured = crate::fastpath::kernel_log::Captured::default();
    let (mut acl, mut logger) = KernelAcl::load_logging_to(&cases::web_policy(), captured.clone())
        .expect("the ACL must load (run as root on a BPF-capable kernel)");
    let first = acl.generation;
    for _ in 0..5 {
        run(&mut acl, ACL_INGRESS_PROGRAM, &https_from_laptop());
        run(&mut acl, ACL_EGRESS_PROGRAM, &dns_from_web());
    }
    assert_eq!(
        captured.lines(&mut logger),
        [
            format!("ACL ingress: policy generation {first} in force"),
            format!("ACL egress: policy generation {first} in force"),
        ]
    );
    acl.install(&cases::web_policy()).unwrap();
    let second = acl.generation;
    assert_ne!(first, second);
    for _ in 0..5 {
        run(&mut acl, ACL_INGRESS_PROGRAM, &https_from_laptop());
    }
    let lines = captured.lines(&mut logger);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[2], format!("ACL ingress: policy generation {second} in force"));
}
