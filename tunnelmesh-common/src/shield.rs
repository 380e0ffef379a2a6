//! The XDP underlay shield's counters.
//!
//! The shield looks at UDP datagrams addressed to the mesh port and drops those that cannot be a
//! TunnelMesh message before they cost the daemon a syscall. Each verdict has a reason, counted
//! in a per-CPU array indexed by [`ShieldReason`].

/// Why the shield passed or dropped a datagram to the mesh port. Used as the index of the
/// per-CPU counter array, so the discriminants are stable and dense.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShieldReason {
    /// A well-formed message of a known type; passed to the daemon.
    Passed = 0,
    /// Shorter than the 4-byte message header.
    TooShort = 1,
    /// The type byte is not 1–4, or the reserved bytes are not zero.
    BadType = 2,
    /// The size is impossible for the message type.
    BadLength = 3,
    /// IP header or UDP header truncated or inconsistent.
    Malformed = 4,
    /// A data message for a receiver index no session has (beyond one sample per source per
    /// second, passed up so the daemon can notice a peer that still holds a lost session).
    UnknownIndex = 5,
    /// A handshake initiation from a source the daemon blocked for a while: under load it
    /// proved its address (a cookie) and then spent its budget.
    RateLimited = 6,
    /// A STUN Binding response (the answer to a request this node sent from its tunnel socket
    /// to learn its public address); passed to the daemon within its source's budget.
    Stun = 7,
    /// A STUN response beyond its source's budget.
    StunRateLimited = 8,
    /// A handshake initiation or response whose mac1 is not this node's: not addressed to our
    /// public key, or forged. Never charged to any budget.
    BadMac = 9,
    /// A fragment of a datagram to the mesh port (IPv4 first fragment, or an IPv6 fragment
    /// header): passed to the stack, which reassembles it before the daemon's own checks.
    Fragment = 10,
}

impl ShieldReason {
    /// Number of counters (size of the counter array).
    pub const COUNT: u32 = 11;
    /// All reasons, in index order.
    pub const ALL: [ShieldReason; Self::COUNT as usize] = [
        ShieldReason::Passed,
        ShieldReason::TooShort,
        ShieldReason::BadType,
        ShieldReason::BadLength,
        ShieldReason::Malformed,
        ShieldReason::UnknownIndex,
        ShieldReason::RateLimited,
        ShieldReason::Stun,
        ShieldReason::StunRateLimited,
        ShieldReason::BadMac,
        ShieldReason::Fragment,
    ];

    /// The reason counted at `index`.
    #[inline(always)]
    pub const fn from_index(index: u32) -> Option<ShieldReason> {
        if index < Self::COUNT {
            Some(Self::ALL[index as usize])
        } else {
            None
        }
    }

    /// Whether datagrams judged this way go on to the daemon.
    #[inline(always)]
    pub const fn passes(self) -> bool {
        matches!(self, ShieldReason::Passed | ShieldReason::Stun | ShieldReason::Fragment)
    }

    /// Stable lower-case name used in status output and docs.
    pub const fn name(self) -> &'static str {
        match self {
            ShieldReason::Passed => "passed",
            ShieldReason::TooShort => "too_short",
            ShieldReason::BadType => "bad_type",
            ShieldReason::BadLength => "bad_length",
            ShieldReason::Malformed => "malformed",
            ShieldReason::UnknownIndex => "unknown_index",
            ShieldReason::RateLimited => "rate_limited",
            ShieldReason::Stun => "stun",
            ShieldReason::StunRateLimited => "stun_rate_limited",
            ShieldReason::BadMac => "bad_mac",
            ShieldReason::Fragment => "fragment",
        }
    }
}

/// Name of the XDP program in the object file.
pub const SHIELD_PROGRAM: &str = "tunnelmesh_shield";
/// Name of the TC program: the same judgement at TC ingress, for interfaces where XDP costs more
/// than it saves (veth, no native XDP), segment by segment on UDP super-datagrams.
pub const SHIELD_TC_PROGRAM: &str = "tunnelmesh_shield_tc";
/// The most segments a UDP super-datagram can carry (the kernel's `UDP_MAX_SEGMENTS`); the TC
/// shield drops one that claims more as malformed.
pub const MAX_SEGMENTS: usize = 128;
/// Name of the per-CPU counter map (also its pin name).
pub const SHIELD_COUNTERS_MAP: &str = "SHIELD_COUNTERS";
/// Name of the hash map of live receiver indices (key `u32`, value unused), kept by the daemon.
pub const KNOWN_INDICES_MAP: &str = "KNOWN_INDICES";
/// Capacity of [`KNOWN_INDICES_MAP`]: three keys per peer.
pub const KNOWN_INDICES_MAX: u32 = 65_536;
/// Name of the LRU map of per-source budgets.
pub const SOURCE_BUDGETS_MAP: &str = "SOURCE_BUDGETS";
/// Name of the LRU map of sources whose initiations are dropped until a time (key: the
/// [`budget_address`], value: `CLOCK_MONOTONIC` ns), written by the daemon.
pub const BLOCKED_SOURCES_MAP: &str = "BLOCKED_SOURCES";
/// Capacity of [`BLOCKED_SOURCES_MAP`].
pub const BLOCKED_SOURCES_MAX: u32 = 16_384;
/// Name of the global holding the BLAKE2s state after the mac1 key block
/// ([`crate::blake2s::keyed_midstate`] of this node's mac1 key), set at load time.
pub const SHIELD_MAC1_GLOBAL: &str = "MAC1_MIDSTATE";

/// Key of the per-source budget map: the source address (IPv4 as `::ffff:a.b.c.d`) and which
/// budget.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceKey {
    pub addr: [u8; 16],
    pub kind: u32,
}

/// The address a source's budgets are kept under: an IPv4 source (v4-mapped) as itself, an IPv6
/// source by its /64 — one subscriber's prefix, so rotating addresses within it buys no fresh
/// budget.
pub const fn budget_address(addr: [u8; 16]) -> [u8; 16] {
    let v4_mapped = addr[0] == 0
        && addr[1] == 0
        && addr[2] == 0
        && addr[3] == 0
        && addr[4] == 0
        && addr[5] == 0
        && addr[6] == 0
        && addr[7] == 0
        && addr[8] == 0
        && addr[9] == 0
        && addr[10] == 0xff
        && addr[11] == 0xff;
    if v4_mapped {
        return addr;
    }
    let mut out = addr;
    let mut i = 8;
    while i < 16 {
        out[i] = 0;
        i += 1;
    }
    out
}

/// Budget of handshake initiations per source (kept by the daemon, which charges only proven
/// sources under load and tells the shield whom to block).
pub const BUDGET_INITIATIONS: u32 = 0;
/// Budget of unknown-index data messages passed up per source.
pub const BUDGET_UNKNOWN_INDEX: u32 = 1;
/// Budget of STUN responses per source.
pub const BUDGET_STUN: u32 = 2;

/// A token bucket kept as time credit (GCRA): each message costs `interval` nanoseconds of
/// credit; credit accrues with time up to `interval × burst`. `refused` counts the messages it
/// turned away (the shield says so in its log at the first).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budget {
    pub credit_ns: u64,
    pub last_ns: u64,
    pub refused: u64,
}

/// (interval between messages in ns, burst) of each budget kind.
pub const fn budget_params(kind: u32) -> (u64, u64) {
    match kind {
        // 5 initiations a second per source, bursts of 20: many peers behind one NAT still fit;
        // a legitimate peer sends at most one every 5 s.
        BUDGET_INITIATIONS => (200_000_000, 20),
        // A node sends two STUN requests every 25 s (more after a network change).
        BUDGET_STUN => (100_000_000, 10),
        // One stale-session sample a second per source.
        _ => (1_000_000_000, 1),
    }
}

impl Budget {
    /// Spend one message at `now_ns`; whether the budget allowed it.
    #[inline(always)]
    pub fn spend(&mut self, kind: u32, now_ns: u64) -> bool {
        let (interval, burst) = budget_params(kind);
        let cap = interval * burst;
        let accrued = self.credit_ns.saturating_add(now_ns.saturating_sub(self.last_ns));
        let credit = if accrued > cap { cap } else { accrued };
        self.last_ns = now_ns;
        if credit >= interval {
            self.credit_ns = credit - interval;
            true
        } else {
            self.credit_ns = credit;
            self.refused = self.refused.wrapping_add(1);
            false
        }
    }

    /// A fresh budget at `now_ns`, with the first message already spent.
    pub const fn fresh(kind: u32, now_ns: u64) -> Self {
        let (interval, burst) = budget_params(kind);
        Budget {
            credit_ns: interval * burst - interval,
            last_ns: now_ns,
            refused: 0,
        }
    }
}

/// Name of the global holding the mesh UDP port (network byte order), set at load time.
pub const SHIELD_PORT_GLOBAL: &str = "MESH_PORT_BE";
