//! The proxy's listeners: outbound (captured connections from local pods).

pub mod outbound;

use std::os::fd::AsRawFd;

/// `SO_NETNS_COOKIE` (linux/socket.h); not yet in every libc release.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Puts the proxy's mark on a socket so the kernel hooks never capture it.
pub fn set_mark(fd: &impl AsRawFd, mark: u32) -> std::io::Result<()> {
    if mark == 0 {
        return Ok(());
    }
    // SAFETY: setsockopt reads `size_of::<u32>()` bytes from a live local.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The network namespace cookie of a socket (what `bpf_get_netns_cookie` returns for it).
pub fn netns_cookie(fd: &impl AsRawFd) -> std::io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into a live local.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(v)
    } else {
        Err(std::io::Error::last_os_error())
    }
}
