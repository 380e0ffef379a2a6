//! Network namespaces.

use std::io;

/// Move the calling thread (only it) into a new, empty network namespace: the sockets it opens
/// from then on see only that namespace's links, addresses and routes, and the namespace goes
/// when the last of them and the thread are gone. Needs CAP_SYS_ADMIN.
pub fn unshare_network() -> io::Result<()> {
    // SAFETY: unshare(2) with a constant flag; it touches no memory of ours.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
