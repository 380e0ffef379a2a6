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
}

impl ShieldReason {
    /// Number of counters (size of the counter array).
    pub const COUNT: u32 = 5;
    /// All reasons, in index order.
    pub const ALL: [ShieldReason; Self::COUNT as usize] = [
        ShieldReason::Passed,
        ShieldReason::TooShort,
        ShieldReason::BadType,
        ShieldReason::BadLength,
        ShieldReason::Malformed,
    ];

    /// Stable lower-case name used in status output and docs.
    pub const fn name(self) -> &'static str {
        match self {
            ShieldReason::Passed => "passed",
            ShieldReason::TooShort => "too_short",
            ShieldReason::BadType => "bad_type",
            ShieldReason::BadLength => "bad_length",
            ShieldReason::Malformed => "malformed",
        }
    }
}

/// Name of the XDP program in the object file.
pub const SHIELD_PROGRAM: &str = "tunnelmesh_shield";
/// Name of the per-CPU counter map (also its pin name).
pub const SHIELD_COUNTERS_MAP: &str = "SHIELD_COUNTERS";
/// Name of the global holding the mesh UDP port (network byte order), set at load time.
pub const SHIELD_PORT_GLOBAL: &str = "MESH_PORT_BE";
