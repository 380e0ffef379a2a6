//! The data plane: one worker thread per core, each owning a TUN queue and a UDP socket.
//!
//! Workers move packets between the TUN device and the network: read a batch from the TUN queue,
//! seal each packet in place, `sendmmsg` the batch; `recvmmsg` a batch, open each in place, check
//! the inner source against the sender's allowed IPs, write it to the TUN queue. No allocation and
//! no channel on that path, and one lock: a session's replay window, taken once per run of its
//! messages in a receive batch and held by nobody else while steering keeps the session on one
//! worker. Keys, endpoints and the index table are read through `ArcSwap` snapshots. Handshake
//! messages and "need a session" go to the slow path.

pub(crate) mod receive;
mod send;
mod worker;

use std::{
    io,
    net::{Ipv6Addr, SocketAddr, UdpSocket},
    os::{fd::OwnedFd, unix::net::UnixDatagram},
    sync::Arc,
    thread::JoinHandle,
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::device::Device;

/// Packets per `recvmmsg`/`sendmmsg` call and per TUN read burst.
pub const BATCH: usize = 64;
// A receive batch may coalesce into one super-packet whole.
const _: () = assert!(BATCH <= crate::offload::coalesce::MAX_MEMBERS + 1);
/// Socket buffer size requested for each worker socket (the kernel doubles it, within
/// `net.core.rmem_max`/`wmem_max`). Small on purpose: a bulk stream fills whatever buffer is
/// there, and everything behind it waits. Measured on the 2-core VM with one stream through the
/// tunnel: 8 MiB gave pings of 3.7 ms under load, 1 MiB 2.2 ms, 256 KiB 1.2 ms, with throughput
/// and 64-byte UDP no lower (a little higher: the buffers stay in cache).
const SOCKET_BUFFER: usize = 1 << 18;
/// Receive buffer of the overlay inbox (SSH and relay messages arrive in bursts from tokio).
const INBOX_BUFFER: usize = 8 << 20;

/// Bind `count` dual-stack UDP sockets sharing `port` with SO_REUSEPORT (the kernel spreads
/// peers over them by flow hash). Port 0 picks one free port for all.
pub fn bind_sockets(port: u16, count: usize) -> io::Result<Vec<UdpSocket>> {
    let mut sockets = Vec::with_capacity(count);
    let mut port = port;
    for _ in 0..count {
        let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_only_v6(false)?;
        socket.set_reuse_port(true)?;
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
        socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
        let socket: UdpSocket = socket.into();
        port = socket.local_addr()?.port();
        sockets.push(socket);
    }
    Ok(sockets)
}

/// The data plane's inbox for messages from SSH connections and the relay: a datagram socket
/// pair, so workers can `poll` it with their TUN queue and UDP socket. The sending end goes into
/// the [`Device`]; every worker reads the other.
pub fn overlay_inbox() -> io::Result<(UnixDatagram, UnixDatagram)> {
    let (tx, rx) = UnixDatagram::pair()?;
    tx.set_nonblocking(true)?;
    rx.set_nonblocking(true)?;
    let _ = socket2::SockRef::from(&rx).set_recv_buffer_size(INBOX_BUFFER);
    Ok((tx, rx))
}

/// Start one worker per (TUN queue, socket) pair; `udp_offload`: UDP GSO and GRO where the
/// kernel takes them.
pub fn start(
    dev: Arc<Device>,
    queues: Vec<OwnedFd>,
    sockets: Vec<UdpSocket>,
    inbox: UnixDatagram,
    udp_offload: bool,
) -> io::Result<Vec<JoinHandle<()>>> {
    queues
        .into_iter()
        .zip(sockets)
        .enumerate()
        .map(|(i, (tun, udp))| {
            let worker = worker::Worker::new(i, dev.clone(), tun, udp, inbox.try_clone()?, udp_offload);
            std::thread::Builder::new()
                .name(format!("tm-worker-{i}"))
                .spawn(move || worker.run())
        })
        .collect()
}
