//! The slow-path thread: the I/O around [`SlowPath`]. It waits for an [`Event`] from a worker,
//! the control plane or the status socket, or for the next [`TICK`], hands it to the machine,
//! and carries out what comes back in order — datagrams on the tunnel socket, messages on the
//! SSH and relay channels, receiver indices into the XDP shield, requests to the coordinator
//! client, ping answers, reading this machine's addresses.

use std::{
    collections::VecDeque,
    net::{SocketAddr, UdpSocket},
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::{Input, Output, SlowPath, TICK};
use crate::device::{Device, Event, IndexMirror, Via};

/// The dual-stack sockets take IPv4 destinations as v4-mapped IPv6.
fn dual_stack(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) => SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port()),
        v6 => v6,
    }
}

/// Everything the slow path's I/O needs.
pub struct SlowPathIo {
    pub dev: Arc<Device>,
    /// The tunnel socket (the first worker's, shared): handshakes and STUN leave from the port
    /// peers know.
    pub socket: UdpSocket,
    pub events: Receiver<Event>,
    /// The receiver indices the XDP shield lets through.
    pub mirror: Box<dyn IndexMirror>,
}

impl SlowPathIo {
    /// Run `machine` until the device shuts down.
    pub fn run(self, mut machine: SlowPath) {
        let mut next_tick = Instant::now();
        let mut ticks = 0u64;
        while !self.dev.shutdown.load(Ordering::Relaxed) {
            self.dev.heartbeats.beat(crate::device::HEARTBEAT_SLOW_PATH);
            match self
                .events
                .recv_timeout(next_tick.saturating_duration_since(Instant::now()))
            {
                Ok(event) => {
                    machine.set_backlog(self.events.len());
                    self.step(&mut machine, Input::Event(event), Instant::now());
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            if now >= next_tick {
                self.step(&mut machine, Input::Tick, now);
                next_tick = now + TICK;
                ticks += 1;
                if ticks.is_multiple_of(10) {
                    self.dev.policy.check_kernel();
                }
            }
        }
    }

    /// Hand `input` to the machine and carry out its outputs (and theirs), in order.
    fn step(&self, machine: &mut SlowPath, input: Input, now: Instant) {
        let mut todo: VecDeque<Output> = machine.handle(input, now).into();
        while let Some(output) = todo.pop_front() {
            match output {
                Output::Transmit { via, msg } => self.send_via(via, &msg),
                Output::ShieldIndex { index, live: true } => self.mirror.insert(index),
                Output::ShieldIndex { index, live: false } => self.mirror.remove(index),
                Output::ShieldBlock { source, period } => self.mirror.block(source, period),
                Output::Coordinator(request) => {
                    let sent = self
                        .dev
                        .coordinator
                        .requests
                        .load()
                        .as_ref()
                        .is_some_and(|tx| tx.try_send(request.clone()).is_ok());
                    if !sent {
                        machine.coordinator_refused(&request);
                    }
                }
                Output::PingDone { to, report } => {
                    let _ = to.send(report);
                }
                Output::ReadHostCandidates => {
                    let host = crate::nat::host_candidates(&self.dev.info.interface, self.dev.info.listen_port);
                    todo.extend(machine.handle(Input::HostCandidates(host), now));
                }
            }
        }
    }

    /// Send a wire message on `via` (a failed send is like a lost datagram: timers retry).
    fn send_via(&self, via: Via, msg: &[u8]) {
        match via {
            Via::Udp(addr) => {
                let _ = self.socket.send_to(msg, dual_stack(addr));
            }
            Via::Ssh(key) | Via::Relay(key) => {
                if let Some(peer) = self.dev.peers.load().get(&key) {
                    self.dev.send_overlay(peer, via.kind(), msg);
                }
            }
        }
    }
}
