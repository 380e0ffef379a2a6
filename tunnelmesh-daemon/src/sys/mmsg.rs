//! Batched UDP receive and send (`recvmmsg(2)` / `sendmmsg(2)`) over preallocated buffers, with
//! UDP segmentation offload both ways.
//!
//! A [`Batch`] owns `N` packet buffers with their addresses; the data plane fills or drains them
//! in place, so a batch of packets costs one syscall and no allocation.
//!
//! **GSO** (send): a run of slots with equal lengths (the last may be shorter) to one destination
//! goes out as one message with a `UDP_SEGMENT` control message; the kernel cuts it into
//! datagrams as late as it can (on veth and many NICs, not before the receiver). If the kernel
//! or the device refuses (`EIO` when the device cannot checksum, `EINVAL`, `ENOPROTOOPT`), the
//! batch falls back to one datagram per message for good, and says so once.
//!
//! **GRO** (receive): with `UDP_GRO` on the socket, one received buffer may hold several
//! datagrams of one sender, all `segment_size(i)` long but the last; slots must then be large
//! enough for a whole coalesced buffer (64 KiB), or the kernel truncates it.

use std::{
    io,
    mem::{self, MaybeUninit},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd, BorrowedFd},
    ptr,
};

/// Room for one `UDP_SEGMENT` / `UDP_GRO` control message (`CMSG_SPACE` of an int), aligned
/// as `cmsghdr` needs.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Control([u8; 32]);

/// Most datagrams in one GSO message (the kernel's `UDP_MAX_SEGMENTS` is 64 or more).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes in one GSO message (a UDP length is 16 bits; leave room for the headers).
const GSO_MAX_BYTES: usize = 65_000;

/// A fixed set of packet buffers with their peer addresses.
pub struct Batch {
    bufs: Vec<u8>,
    slot: usize,
    lens: Vec<usize>,
    /// Received: the GRO segment size of slot `i` (0: one datagram).
    segs: Vec<usize>,
    addrs: Vec<libc::sockaddr_storage>,
    /// To send: the destination of slot `i` (compared to form GSO runs).
    dsts: Vec<SocketAddr>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    controls: Vec<Control>,
    /// To send: (first slot, slots) of each prepared message.
    runs: Vec<(usize, usize)>,
    gso: bool,
}

// SAFETY: the raw pointers inside `iovs`/`hdrs` only ever point into this struct's own heap
// buffers, and are rebuilt before every syscall.
unsafe impl Send for Batch {}

impl Batch {
    /// `count` buffers of `slot` bytes each.
    pub fn new(count: usize, slot: usize) -> Self {
        // SAFETY: all-zero is a valid `sockaddr_storage`, `iovec` and `mmsghdr` (null pointers, zero lengths).
        let zeroed = || unsafe { MaybeUninit::<libc::sockaddr_storage>::zeroed().assume_init() };
        Batch {
            bufs: vec![0; count * slot],
            slot,
            lens: vec![0; count],
            segs: vec![0; count],
            addrs: (0..count).map(|_| zeroed()).collect(),
            dsts: vec![SocketAddr::from(([0, 0, 0, 0], 0)); count],
            // SAFETY: as above.
            iovs: (0..count).map(|_| unsafe { mem::zeroed() }).collect(),
            // SAFETY: as above.
            hdrs: (0..count).map(|_| unsafe { mem::zeroed() }).collect(),
            controls: vec![Control([0; 32]); count],
            runs: Vec::with_capacity(count),
            gso: false,
        }
    }

    /// Send runs of equal-sized datagrams to one destination as one GSO message.
    pub fn enable_gso(&mut self) {
        self.gso = true;
    }

    /// The GRO segment size of received slot `i`: every datagram in it is this long but the
    /// last; 0 when the slot holds one datagram.
    pub fn segment_size(&self, i: usize) -> usize {
        self.segs[i]
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.lens.len()
    }

    /// The whole buffer of slot `i` (to fill before sending).
    pub fn buf_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i * self.slot..(i + 1) * self.slot]
    }

    /// Bytes received in slot `i`.
    pub fn len(&self, i: usize) -> usize {
        self.lens[i]
    }

    /// Where the datagrams in slot `i` came from.
    pub fn source(&self, i: usize) -> SocketAddr {
        from_storage(&self.addrs[i]).unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Bytes per slot: slot `i` starts at `i * slot()` in [`Batch::storage`].
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// Every slot's buffer, one after another.
    pub fn storage(&self) -> &[u8] {
        &self.bufs
    }

    pub fn storage_mut(&mut self) -> &mut [u8] {
        &mut self.bufs
    }

    /// Mark slot `i` to be sent: `len` bytes to `dst`.
    pub fn set_send(&mut self, i: usize, len: usize, dst: SocketAddr) {
        self.lens[i] = len;
        self.dsts[i] = dst;
        to_storage(dst, &mut self.addrs[i]);
    }

    fn prepare_recv(&mut self) {
        for i in 0..self.capacity() {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i * self.slot..].as_mut_ptr().cast(),
                iov_len: self.slot,
            };
            let hdr = &mut self.hdrs[i].msg_hdr;
            hdr.msg_name = ptr::from_mut(&mut self.addrs[i]).cast();
            hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = &mut self.iovs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = ptr::from_mut(&mut self.controls[i]).cast();
            hdr.msg_controllen = mem::size_of::<Control>();
            hdr.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
    }

    /// Build one message per GSO run (or per slot without GSO) of slots `from..n`; how many.
    fn prepare_send(&mut self, from: usize, n: usize) -> usize {
        self.runs.clear();
        let mut i = from;
        while i < n {
            let (len, dst) = (self.lens[i], self.dsts[i]);
            let mut count = 1;
            let mut bytes = len;
            if self.gso {
                while i + count < n
                    && count < GSO_MAX_SEGMENTS
                    && self.dsts[i + count] == dst
                    && self.lens[i + count] <= len
                    && bytes + self.lens[i + count] <= GSO_MAX_BYTES
                {
                    bytes += self.lens[i + count];
                    count += 1;
                    if self.lens[i + count - 1] < len {
                        break; // a shorter datagram ends the run
                    }
                }
            }
            for k in i..i + count {
                self.iovs[k] = libc::iovec {
                    iov_base: self.bufs[k * self.slot..].as_mut_ptr().cast(),
                    iov_len: self.lens[k],
                };
            }
            let m = self.runs.len();
            let control = ptr::from_mut(&mut self.controls[m]).cast::<libc::c_void>();
            let hdr = &mut self.hdrs[m].msg_hdr;
            hdr.msg_name = ptr::from_mut(&mut self.addrs[i]).cast();
            hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = &mut self.iovs[i];
            hdr.msg_iovlen = count;
            hdr.msg_flags = 0;
            if count > 1 {
                hdr.msg_control = control;
                // SAFETY: CMSG_SPACE only computes a size.
                hdr.msg_controllen = unsafe { libc::CMSG_SPACE(mem::size_of::<u16>() as u32) } as usize;
                // SAFETY: `hdr` points at a control buffer of `msg_controllen` (<= 32) bytes
                // aligned for `cmsghdr`, so the first header and its 2 data bytes fit in it.
                unsafe {
                    let cmsg = libc::CMSG_FIRSTHDR(hdr);
                    (*cmsg).cmsg_level = libc::SOL_UDP;
                    (*cmsg).cmsg_type = libc::UDP_SEGMENT;
                    (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<u16>() as u32) as usize;
                    ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), len as u16);
                }
            } else {
                hdr.msg_control = ptr::null_mut();
                hdr.msg_controllen = 0;
            }
            self.hdrs[m].msg_len = 0;
            self.runs.push((i, count));
            i += count;
        }
        self.runs.len()
    }

    /// Receive up to `capacity()` buffers without blocking; returns how many arrived.
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        let n = self.capacity();
        self.prepare_recv();
        // SAFETY: `hdrs[..n]` point at `n` valid iovecs/addresses owned by `self`, which outlive the call.
        let got = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                ptr::null_mut(),
            )
        };
        if got < 0 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::WouldBlock {
                Ok(0)
            } else {
                Err(err)
            };
        }
        for i in 0..got as usize {
            self.lens[i] = self.hdrs[i].msg_len as usize;
            self.segs[i] = gro_segment_size(&self.hdrs[i].msg_hdr);
        }
        Ok(got as usize)
    }

    /// Send slots `0..n` (as set by [`Batch::set_send`]). A message the kernel refuses (say, an
    /// unreachable destination) is skipped and counted; the rest of the batch still goes out.
    pub fn send(&mut self, fd: BorrowedFd<'_>, n: usize) -> SendOutcome {
        let mut outcome = SendOutcome::default();
        let mut from = 0;
        'prepare: while from < n {
            let msgs = self.prepare_send(from, n);
            let mut next = 0;
            while next < msgs {
                // SAFETY: `hdrs[next..msgs]` point at valid iovecs, addresses and control
                // buffers owned by `self`.
                let rc = unsafe {
                    libc::sendmmsg(
                        fd.as_raw_fd(),
                        self.hdrs[next..].as_mut_ptr(),
                        (msgs - next) as libc::c_uint,
                        0,
                    )
                };
                if rc >= 0 {
                    let sent = rc as usize;
                    outcome.sent += self.runs[next..next + sent].iter().map(|r| r.1).sum::<usize>();
                    next += sent;
                    continue;
                }
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                let (first, count) = self.runs[next];
                // The kernel or the device cannot segment (EIO, EINVAL, ENOPROTOOPT), or the
                // segment size exceeds the path MTU (EMSGSIZE since Linux 6.x; the kernel then
                // fragments single datagrams): send one datagram per message.
                if count > 1
                    && matches!(
                        err.raw_os_error(),
                        Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EMSGSIZE)
                    )
                {
                    self.gso = false;
                    outcome.gso_refused = Some(err);
                    from = first;
                    continue 'prepare;
                }
                outcome.failed += count;
                outcome.last_error = Some(err);
                next += 1;
            }
            break;
        }
        outcome
    }
}

/// Turn on `UDP_GRO` for `socket`: false when the kernel refuses (before Linux 5.0).
pub fn enable_gro(socket: BorrowedFd<'_>) -> bool {
    let on: libc::c_int = 1;
    // SAFETY: `on` is a valid int for the duration of the call; the fd is an open UDP socket.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_GRO,
            ptr::from_ref(&on).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// The `UDP_GRO` segment size in a received message's control data (0: none).
fn gro_segment_size(hdr: &libc::msghdr) -> usize {
    let mut size = 0;
    // SAFETY: the kernel filled `msg_control` with `msg_controllen` bytes of well-formed
    // control messages; CMSG_FIRSTHDR/NXTHDR stay within them and return null at the end.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == libc::UDP_GRO {
                size = ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>()).max(0) as usize;
            }
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    size
}

/// What a batched send did.
#[derive(Debug, Default)]
pub struct SendOutcome {
    pub sent: usize,
    pub failed: usize,
    pub last_error: Option<io::Error>,
    /// GSO was refused during this send (and is off from now on), with the error.
    pub gso_refused: Option<io::Error>,
}

fn from_storage(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is large enough for.
            let a = unsafe { &*ptr::from_ref(s).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6, which it is large enough for.
            let a = unsafe { &*ptr::from_ref(s).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            let port = u16::from_be(a.sin6_port);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(ip, port, a.sin6_flowinfo, a.sin6_scope_id)),
            })
        }
        _ => None,
    }
}

/// Addresses are always written as IPv6 (v4-mapped for IPv4): the sockets are dual-stack.
fn to_storage(addr: SocketAddr, s: &mut libc::sockaddr_storage) {
    let (ip, port, scope) = match addr {
        SocketAddr::V4(a) => (a.ip().to_ipv6_mapped(), a.port(), 0),
        SocketAddr::V6(a) => (*a.ip(), a.port(), a.scope_id()),
    };
    // SAFETY: sockaddr_storage is large enough and suitably aligned for a sockaddr_in6.
    let a = unsafe { &mut *ptr::from_mut(s).cast::<libc::sockaddr_in6>() };
    a.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    a.sin6_port = port.to_be();
    a.sin6_flowinfo = 0;
    a.sin6_addr = libc::in6_addr { s6_addr: ip.octets() };
    a.sin6_scope_id = scope;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{net::UdpSocket, os::fd::AsFd, time::Duration};

    fn datagram(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|k| (i * 7 + k) as u8).collect()
    }

    /// Everything `rx` holds, one datagram per entry (GRO buffers cut at their segment size).
    fn drain(batch: &mut Batch, socket: &UdpSocket, want: usize) -> Vec<(Vec<u8>, usize)> {
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while out.len() < want && std::time::Instant::now() < deadline {
            let got = batch.recv(socket.as_fd()).unwrap();
            for i in 0..got {
                let (len, seg) = (batch.len(i), batch.segment_size(i));
                let step = if seg == 0 { len } else { seg };
                let slot = &batch.storage()[i * batch.slot()..i * batch.slot() + len];
                for chunk in slot.chunks(step) {
                    out.push((chunk.to_vec(), seg));
                }
            }
            if got == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        out
    }

    /// Sizes 1000 ×4, 300 (ends a run), 1000 ×2 to A, then 1000 to B: with GSO that is two
    /// messages to A and one to B; every datagram arrives whole and in order either way, and
    /// with GRO on the receiver they arrive as coalesced buffers.
    #[test]
    fn gso_runs_arrive_as_the_datagrams_they_were_made_of() {
        let sizes = [1000, 1000, 1000, 1000, 300, 1000, 1000];
        for (gso, gro) in [(false, false), (true, false), (true, true)] {
            // Dual-stack, as the workers' sockets are (addresses go out v4-mapped).
            let tx_socket = UdpSocket::bind("[::]:0").unwrap();
            let (a, b) = (
                UdpSocket::bind("127.0.0.1:0").unwrap(),
                UdpSocket::bind("127.0.0.1:0").unwrap(),
            );
            for s in [&a, &b] {
                s.set_nonblocking(true).unwrap();
                if gro {
                    assert!(enable_gro(s.as_fd()), "UDP_GRO (Linux >= 5.0)");
                }
            }
            let mut tx = Batch::new(8, 1500);
            if gso {
                tx.enable_gso();
            }
            for (i, &len) in sizes.iter().enumerate() {
                tx.buf_mut(i)[..len].copy_from_slice(&datagram(i, len));
                tx.set_send(i, len, a.local_addr().unwrap());
            }
            tx.buf_mut(7)[..1000].copy_from_slice(&datagram(7, 1000));
            tx.set_send(7, 1000, b.local_addr().unwrap());
            assert_eq!(tx.prepare_send(0, 8), if gso { 3 } else { 8 });
            let outcome = tx.send(tx_socket.as_fd(), 8);
            assert_eq!((outcome.sent, outcome.failed), (8, 0), "{:?}", outcome.last_error);
            assert!(outcome.gso_refused.is_none());
            let mut rx = Batch::new(8, 65536);
            let got_a = drain(&mut rx, &a, 7);
            let want: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &l)| datagram(i, l)).collect();
            assert_eq!(
                got_a.iter().map(|d| d.0.clone()).collect::<Vec<_>>(),
                want,
                "gso={gso} gro={gro}"
            );
            if gro {
                assert!(got_a.iter().any(|d| d.1 == 1000), "at least one coalesced buffer");
            }
            let got_b = drain(&mut rx, &b, 1);
            assert_eq!(got_b.len(), 1);
            assert_eq!(got_b[0].0, datagram(7, 1000));
        }
    }
}
