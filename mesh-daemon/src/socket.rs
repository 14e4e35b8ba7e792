//! Every socket option and socket-level call the daemon makes, in one leaf module (ztunnel's
//! `src/socket.rs` is the model): the proxy mark, cookies, buffer and queue sizes, marked
//! connects. socket2's `SockRef` does what it covers; the few options it does not
//! (`SO_NETNS_COOKIE`, `IP_BIND_ADDRESS_NO_PORT`, `TCP_INFO`'s byte counters, `SIOCOUTQ`) are
//! raw calls here and nowhere else.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    time::Duration,
};

use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};

/// What to do about a failed bind of `addr` (the listener `flag` sets), for its error message:
/// "free the port" helps only when the port is taken.
/// The accept queue of the data-path listeners (the outbound listener and HBONE). A node proxy
/// takes every pod's new connections on one socket: a burst (a deployment starting, a client
/// reconnecting its pool, a flood of half-open peers) must queue, not overflow — an overflowing
/// queue drops the client's ACK, and with SYN cookies the client believes in a connection the node
/// never had. The kernel caps it at `net.core.somaxconn` (4096 by default).
pub const DATA_BACKLOG: u32 = 4096;

/// A listener on `addr` (SO_REUSEADDR, as tokio's own `bind`) with the data-path accept queue.
pub fn listen(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let s = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(DATA_BACKLOG)
}

pub fn bind_advice(addr: SocketAddr, e: &io::Error, flag: &str) -> String {
    match e.kind() {
        io::ErrorKind::AddrInUse => {
            format!("another process holds {addr}; stop it, or pass {flag} with another port")
        }
        io::ErrorKind::AddrNotAvailable => format!(
            "{} is not an address of this host; pass {flag} with one of its addresses (`ip -brief \
             addr` lists them)",
            addr.ip()
        ),
        io::ErrorKind::PermissionDenied => format!(
            "port {} needs CAP_NET_BIND_SERVICE; grant it, or pass {flag} with a port above 1023",
            addr.port()
        ),
        _ => format!("check {flag}"),
    }
}

/// How long a connection attempt to a pod or a node may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `SO_NETNS_COOKIE` (linux/socket.h); not yet in every libc release.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Puts the proxy's mark on a socket so the kernel hooks never capture it (0: no mark).
pub fn set_mark(fd: &impl AsFd, mark: u32) -> io::Result<()> {
    if mark == 0 {
        return Ok(());
    }
    SockRef::from(fd).set_mark(mark)
}

/// `IP_BIND_ADDRESS_NO_PORT`: defer the source port choice from bind() to connect().
fn set_bind_no_port(fd: &impl AsRawFd) -> io::Result<()> {
    set_sockopt_u32(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)
}

/// Sets a socket option whose value is one 32-bit integer (`int` or `u32` in the kernel).
fn set_sockopt_u32(
    fd: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: u32,
) -> io::Result<()> {
    // SAFETY: setsockopt reads `size_of::<u32>()` bytes from a live local.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The network namespace cookie of a socket (what `bpf_get_netns_cookie` returns for it).
pub fn netns_cookie(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut v = [0u8; 8];
    let mut len = v.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into a live local.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            v.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len != 8 {
        return Err(io::Error::other(format!(
            "SO_NETNS_COOKIE: {len} bytes, expected 8"
        )));
    }
    Ok(u64::from_ne_bytes(v))
}

/// The socket's cookie (`SO_COOKIE`, what `bpf_get_socket_cookie` returns for it).
pub fn socket_cookie(fd: &impl AsFd) -> io::Result<u64> {
    SockRef::from(fd).cookie()
}

/// The socket's receive buffer size (`SO_RCVBUF`, as TCP has tuned it so far).
pub fn receive_buffer(fd: &impl AsFd) -> io::Result<u64> {
    SockRef::from(fd).recv_buffer_size().map(|n| n as u64)
}

/// Half-closes the socket's sending side (a FIN once queued bytes are sent).
pub fn shutdown_write(fd: &impl AsFd) -> io::Result<()> {
    SockRef::from(fd).shutdown(std::net::Shutdown::Write)
}

/// Bytes a socket has taken for sending: acknowledged (`tcpi_bytes_acked`) plus still queued
/// (`SIOCOUTQ`). Read in this order, a concurrent acknowledgement can only make it low, never
/// high.
pub fn taken_for_sending(s: &TcpStream) -> io::Result<u64> {
    let acked = tcp_info_u64(s, TCPI_BYTES_ACKED)?;
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int into a live local.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut queued) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(acked + u64::try_from(queued).unwrap_or(0))
}

/// Offset of `tcpi_bytes_acked` in `struct tcp_info` (linux/tcp.h, stable UAPI since 4.1).
const TCPI_BYTES_ACKED: usize = 120;

fn tcp_info_u64(s: &impl AsRawFd, offset: usize) -> io::Result<u64> {
    let mut buf = [0u8; 256];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into a live local buffer.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < offset + 8 {
        return Err(io::Error::other(
            "this kernel's tcp_info has no byte counters",
        ));
    }
    let mut v = [0u8; 8];
    v.copy_from_slice(&buf[offset..offset + 8]);
    Ok(u64::from_ne_bytes(v))
}

/// Connects with the proxy's mark (never captured), optionally from a given source address.
pub async fn connect_marked(
    dst: SocketAddr,
    mark: u32,
    source: Option<IpAddr>,
) -> io::Result<TcpStream> {
    let sock = if dst.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    set_mark(&sock, mark)?;
    if let Some(ip) = source {
        // Every connection to a local pod leaves from the one mesh source address. Binding port
        // 0 would pick the port at bind time, blind to the destination, so ports held (or in
        // TIME_WAIT) toward any pod would count against all of them; with this option connect()
        // picks it per destination (what Envoy and HAProxy do for source binding).
        set_bind_no_port(&sock)?;
        sock.bind(SocketAddr::new(ip, 0)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot use {ip} as source address ({e}); the node's meshSource must be an \
                     address of this node"
                ),
            )
        })?;
    }
    sock.set_nodelay(true)?;
    tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(dst))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_and_buffer_sizes_read_back() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let cookie = socket_cookie(&s).expect("SO_COOKIE");
        assert!(cookie > 0);
        assert_eq!(socket_cookie(&s).expect("SO_COOKIE"), cookie);
        assert!(netns_cookie(&s).expect("SO_NETNS_COOKIE") > 0);
        // An int option: the kernel doubles what was set (socket(7)).
        set_sockopt_u32(&s, libc::SOL_SOCKET, libc::SO_RCVBUF, 8192).expect("SO_RCVBUF");
        assert_eq!(receive_buffer(&s).expect("SO_RCVBUF"), 2 * 8192);
    }

    #[test]
    fn a_zero_mark_sets_nothing() {
        // Setting a mark needs CAP_NET_ADMIN; mark 0 means "no mark" and must not need it.
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        set_mark(&s, 0).expect("no mark, no syscall");
    }
}

/// What [`raise_open_file_limit`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum NofileLimit {
    /// The soft limit was already the hard one.
    Unchanged(u64),
    /// Raised from the first to the second (the hard limit).
    Raised(u64, u64),
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit. Every connection costs the
/// daemon one or two descriptors, and the common default soft limit (1024) is reached by about a
/// thousand idle peers, after which every accept, connect, mesh-file read and CA request fails.
pub fn raise_open_file_limit() -> std::io::Result<NofileLimit> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if l.rlim_cur >= l.rlim_max {
        return Ok(NofileLimit::Unchanged(l.rlim_cur));
    }
    let was = l.rlim_cur;
    l.rlim_cur = l.rlim_max;
    // SAFETY: setrlimit reads the struct we own; raising the soft limit up to the hard one
    // needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(NofileLimit::Raised(was, l.rlim_max))
}

/// [`raise_open_file_limit`], said in the log: raised (and from what), or why not, and a warning
/// when even the hard limit is low for a proxy.
pub fn raise_open_file_limit_and_say() {
    const LOW: u64 = 16_384;
    let hard = match raise_open_file_limit() {
        Ok(NofileLimit::Raised(was, now)) => {
            tracing::info!(
                from = was,
                to = now,
                "raised the open-file limit (RLIMIT_NOFILE) to its hard limit"
            );
            now
        }
        Ok(NofileLimit::Unchanged(now)) => now,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit (RLIMIT_NOFILE); connections beyond it fail");
            return;
        }
    };
    if hard < LOW {
        tracing::warn!(
            limit = hard,
            "the open-file limit is low for a proxy: each connection takes one or two descriptors; raise the hard limit (LimitNOFILE= for systemd, ulimit -Hn, the container runtime's nofile)"
        );
    }
}
