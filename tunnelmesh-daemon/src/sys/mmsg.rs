//! Batched UDP receive and send (`recvmmsg(2)` / `sendmmsg(2)`) over preallocated buffers.
//!
//! A [`Batch`] owns `N` packet buffers with their addresses; the data plane fills or drains them
//! in place, so a batch of packets costs one syscall and no allocation.

use std::{
    io,
    mem::{self, MaybeUninit},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd, BorrowedFd},
    ptr,
};

/// A fixed set of packet buffers with their peer addresses.
pub struct Batch {
    bufs: Vec<u8>,
    slot: usize,
    lens: Vec<usize>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
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
            addrs: (0..count).map(|_| zeroed()).collect(),
            // SAFETY: as above.
            iovs: (0..count).map(|_| unsafe { mem::zeroed() }).collect(),
            // SAFETY: as above.
            hdrs: (0..count).map(|_| unsafe { mem::zeroed() }).collect(),
        }
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.lens.len()
    }

    /// The whole buffer of slot `i` (to fill before sending).
    pub fn buf_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i * self.slot..(i + 1) * self.slot]
    }

    /// The received packet in slot `i`, with its source.
    pub fn packet_mut(&mut self, i: usize) -> (&mut [u8], SocketAddr) {
        let addr = from_storage(&self.addrs[i]);
        let len = self.lens[i];
        (
            &mut self.bufs[i * self.slot..i * self.slot + len],
            addr.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
        )
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
        to_storage(dst, &mut self.addrs[i]);
    }

    fn prepare(&mut self, n: usize, for_recv: bool) {
        for i in 0..n {
            let len = if for_recv { self.slot } else { self.lens[i] };
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i * self.slot..].as_mut_ptr().cast(),
                iov_len: len,
            };
            let hdr = &mut self.hdrs[i].msg_hdr;
            hdr.msg_name = ptr::from_mut(&mut self.addrs[i]).cast();
            hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = &mut self.iovs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = ptr::null_mut();
            hdr.msg_controllen = 0;
            hdr.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
    }

    /// Receive up to `capacity()` datagrams without blocking; returns how many arrived.
    pub fn recv(&mut self, fd: BorrowedFd<'_>) -> io::Result<usize> {
        let n = self.capacity();
        self.prepare(n, true);
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
        }
        Ok(got as usize)
    }

    /// Send slots `0..n` (as set by [`Batch::set_send`]). A message the kernel refuses (say, an
    /// unreachable destination) is skipped and counted; the rest of the batch still goes out.
    pub fn send(&mut self, fd: BorrowedFd<'_>, n: usize) -> SendOutcome {
        self.prepare(n, false);
        let mut outcome = SendOutcome::default();
        let mut next = 0;
        while next < n {
            // SAFETY: `hdrs[next..n]` point at valid iovecs/addresses owned by `self`.
            let rc = unsafe {
                libc::sendmmsg(
                    fd.as_raw_fd(),
                    self.hdrs[next..].as_mut_ptr(),
                    (n - next) as libc::c_uint,
                    0,
                )
            };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    next += 1;
                    outcome.failed += 1;
                    outcome.last_error = Some(err);
                }
                continue;
            }
            next += rc as usize;
            outcome.sent += rc as usize;
        }
        outcome
    }
}

/// What a batched send did.
#[derive(Debug, Default)]
pub struct SendOutcome {
    pub sent: usize,
    pub failed: usize,
    pub last_error: Option<io::Error>,
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
