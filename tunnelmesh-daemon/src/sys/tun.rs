//! Opening queues of a multi-queue TUN device (`/dev/net/tun`, `TUNSETIFF`) and negotiating its
//! offloads (`IFF_VNET_HDR`, `TUNSETOFFLOAD`).
//!
//! Every `TUNSETIFF` on a multi-queue device rewrites the device's flags, so every queue is
//! opened with the same flags; with `IFF_VNET_HDR` each read and write carries a
//! `virtio_net_hdr` (see `crate::offload`).

use std::{
    fs::OpenOptions,
    io::{self, IoSlice},
    os::fd::{AsRawFd, OwnedFd},
    os::unix::fs::OpenOptionsExt,
};

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_USO4: libc::c_uint = 0x20;
const TUN_F_USO6: libc::c_uint = 0x40;

/// What the TUN device does for us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Offloads {
    /// One packet per read and write, no virtio header (turned off, or refused by the kernel).
    Off,
    /// Virtio headers, but the kernel segments and checksums itself (`TUNSETOFFLOAD` refused).
    VnetHeader,
    /// TCP super-packets (TSO) and checksum offload.
    Tso,
    /// TCP and UDP super-packets (TSO, USO) and checksum offload.
    TsoUso,
}

impl Offloads {
    /// Reads and writes carry a `virtio_net_hdr`.
    pub fn vnet_header(self) -> bool {
        self != Offloads::Off
    }

    /// The kernel accepts TCP super-packets written to the device (so received segments may
    /// be coalesced).
    pub fn tso(self) -> bool {
        matches!(self, Offloads::Tso | Offloads::TsoUso)
    }
}

impl std::fmt::Display for Offloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Offloads::Off => "off",
            Offloads::VnetHeader => "virtio header only (TUNSETOFFLOAD refused)",
            Offloads::Tso => "TSO/GRO, checksum (USO refused)",
            Offloads::TsoUso => "TSO/USO/GRO, checksum",
        })
    }
}

#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Open `count` queues of the TUN device `name` (created on first open), non-blocking, with
/// offloads when `offloads` (falling back to fewer, then none, as the kernel allows).
pub fn open_queues(name: &str, count: usize, offloads: bool) -> io::Result<(Vec<OwnedFd>, Offloads)> {
    if offloads {
        // An old kernel may refuse IFF_VNET_HDR: then no offloads at all.
        if let Ok(first) = open_queue(name, true) {
            let mode = negotiate(&first);
            let mut queues = vec![first];
            for _ in 1..count {
                let q = open_queue(name, true)?;
                negotiate(&q);
                queues.push(q);
            }
            return Ok((queues, mode));
        }
    }
    let queues = (0..count)
        .map(|_| open_queue(name, false))
        .collect::<io::Result<Vec<_>>>()?;
    Ok((queues, Offloads::Off))
}

/// Ask for checksum, TSO and USO offloads; without USO when refused (kernels before 6.2); none
/// when refused again.
fn negotiate(fd: &OwnedFd) -> Offloads {
    let base = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
    for (flags, mode) in [
        (base | TUN_F_USO4 | TUN_F_USO6, Offloads::TsoUso),
        (base, Offloads::Tso),
    ] {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is an open TUN queue.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
        if rc == 0 {
            return mode;
        }
    }
    Offloads::VnetHeader
}

/// Open one queue of the TUN device `name` (created on first open), non-blocking.
fn open_queue(name: &str, vnet_header: bool) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} must be 1-15 characters without '/', spaces or NUL"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | if vnet_header { IFF_VNET_HDR } else { 0 },
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `req` is a valid, initialised `struct ifreq` prefix of the size TUNSETIFF reads,
    // and the fd is an open /dev/net/tun descriptor.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReqFlags) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file.into())
}

/// `read(2)` one packet; `Ok(None)` when the queue is empty.
pub fn read(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::WouldBlock {
            Ok(None)
        } else {
            Err(err)
        };
    }
    Ok(Some(n as usize))
}

/// `writev(2)` one packet from its pieces (with offloads: the virtio header first).
pub fn write_vectored(fd: &OwnedFd, pieces: &[IoSlice<'_>]) -> io::Result<()> {
    // SAFETY: `IoSlice` is ABI-compatible with `struct iovec` on Unix, and every slice is valid
    // for reads for the duration of the call.
    let n = unsafe { libc::writev(fd.as_raw_fd(), pieces.as_ptr().cast(), pieces.len() as libc::c_int) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}
