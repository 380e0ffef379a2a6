//! Drop and error counters of the interface, as `tunnelmesh status` shows them.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Drop and error counters of the interface, as shown by `tunnelmesh status`.
#[derive(Default, Serialize)]
pub struct Counters {
    /// Datagrams that are not a valid message (bad type/length).
    pub rx_malformed: AtomicU64,
    /// Data messages naming no session we have.
    pub rx_unknown_index: AtomicU64,
    /// Data messages that did not authenticate.
    pub rx_auth_failed: AtomicU64,
    /// Replayed or too-old data messages.
    pub rx_replayed: AtomicU64,
    /// Decrypted packets whose inner source is not an allowed IP of the sender.
    pub rx_spoofed_source: AtomicU64,
    /// Decrypted packets that are not IPv4/IPv6.
    pub rx_bad_inner: AtomicU64,
    /// Handshake messages with a bad mac1, from an unknown key, or that do not decrypt.
    pub handshake_rejected: AtomicU64,
    /// Initiations whose timestamp was not newer than the last (replays).
    pub handshake_replayed: AtomicU64,
    /// Cookie replies sent because we were under load.
    pub cookie_replies_sent: AtomicU64,
    /// Handshake messages dropped because the handshake queue was full.
    pub handshake_queue_full: AtomicU64,
    /// Initiations dropped under load because their proven source (an address that answered a
    /// cookie, or the member an SSH or relay carrier authenticated) spent its budget.
    pub handshake_rate_limited: AtomicU64,
    /// Outbound packets to an address no peer owns.
    pub tx_no_route: AtomicU64,
    /// Outbound packets dropped: peer has no endpoint, or its queue overflowed.
    pub tx_dropped: AtomicU64,
    /// Datagrams the kernel refused to send (no route to the endpoint, …).
    pub tx_send_failed: AtomicU64,
    /// Messages for the SSH or relay path dropped: no connection, or its queue was full.
    pub tx_overlay_dropped: AtomicU64,
    /// Messages from the SSH or relay path dropped because the data plane's inbox was full.
    pub rx_overlay_dropped: AtomicU64,
    /// SSH servers that presented a host key other than the peer's mesh key (refused).
    pub ssh_host_key_mismatch: AtomicU64,
    /// TUN reads with a malformed virtio header or super-packet (dropped).
    pub tun_bad_offload: AtomicU64,
    /// Packets the TUN device refused to take.
    pub tun_write_failed: AtomicU64,
    /// Received TCP segments coalesced into a super-packet before the previous one (GRO).
    pub rx_coalesced: AtomicU64,
    /// Times a worker's socket fell back from UDP GSO to one datagram per message.
    pub udp_gso_refused: AtomicU64,
}

impl Counters {
    #[inline]
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
