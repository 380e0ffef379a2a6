//! Policy: who may reach whom on the mesh. Default deny.
//!
//! [`model`] is the operator's file (groups, tags, `allow` rules) as written; [`compile`] turns
//! it into the rules that concern one node — inbound, by source addresses, protocol and ports —
//! which is all a node ever receives; [`matcher`] decides a decrypted inbound packet against those
//! rules and the node's [`conntrack`] table (replies to flows the node opened pass). One compiler
//! feeds both enforcers (userspace here; the eBPF programs read the same compiled form), so the
//! two cannot disagree.
//!
//! Sans-I/O throughout: packets are parsed headers, time is passed in.

#![forbid(unsafe_code)]

#[cfg(any(test, feature = "fuzzing"))]
pub mod cases;
pub mod compile;
pub mod conntrack;
pub mod matcher;
pub mod model;
pub mod ports;

pub use compile::{CompiledRule, NodePolicy, compile_for};
pub use conntrack::{Conntrack, FlowKey};
pub use matcher::{PacketInfo, Verdict, decide, inbound_verdict, track_outbound};
pub use model::{Member, PolicyError, PolicyFile};
pub use ports::{PortRange, Proto};
