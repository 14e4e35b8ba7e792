//! The same-node fast path (`--sockmap on`): the proxy's two sockets of a connection between pods
//! of this node are spliced in the kernel, so the bytes never cross into user space.
//!
//! Only the proxy's own, non-blocking sockets enter the socket maps, never a pod's: on Linux a
//! socket in a sockmap gets `tcp_bpf_recvmsg`, which returns EAGAIN to a blocking reader woken
//! without data (ARCHITECTURE.md). The kernel moves bytes; this task still owns the connection's
//! life: it sees each end's FIN or reset and passes it on, and it passes a FIN on only after the
//! kernel has handed every byte before it to the other socket (the bytes the verdict moved, from
//! `NM_SPLICE_BYTES`, against what the other socket has taken: `tcpi_bytes_acked` + `SIOCOUTQ`).

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    time::Duration,
};

use tokio::{io::Interest, net::TcpStream};

use crate::ebpf::loader::SpliceMaps;

/// How the splice of one connection started.
pub enum Started {
    /// Relayed in the kernel until both directions ended (or one was reset); (bytes a→b, bytes
    /// b→a).
    Spliced(io::Result<(u64, u64)>),
    /// Nothing was changed: relay in user space.
    NotStarted(String),
}

/// One direction of the pair.
struct Direction {
    /// Cookie of the socket the bytes arrive on.
    from: u64,
    /// What the receiving end had taken before the splice (its SYN, acknowledged).
    to_base: u64,
    /// Bytes this task copied itself (a one-way splice's other direction).
    copied: u64,
    eof: bool,
    done: bool,
}

/// Splices `a` and `b` (established, nothing read from either yet) and serves the connection
/// until both directions are done. An error on either side resets both, as the user-space relay
/// does.
pub async fn relay(maps: &SpliceMaps, a: &TcpStream, b: &TcpStream) -> Started {
    let setup = (|| -> io::Result<_> {
        Ok((
            cookie(a)?,
            cookie(b)?,
            taken_by_socket(a)?,
            taken_by_socket(b)?,
        ))
    })();
    let (ca, cb, a_base, b_base) = match setup {
        Ok(v) => v,
        Err(e) => return Started::NotStarted(e.to_string()),
    };
    let both_ways = match maps.join((a.as_fd(), ca), (b.as_fd(), cb)) {
        Ok(both) => both,
        Err(e) => return Started::NotStarted(e.to_string()),
    };
    let mut ab = Direction {
        from: ca,
        to_base: b_base,
        copied: 0,
        eof: false,
        done: false,
    };
    let mut ba = Direction {
        from: cb,
        to_base: a_base,
        copied: 0,
        eof: false,
        done: false,
    };
    tracing::debug!(a = ca, b = cb, both_ways, "spliced");
    let r = serve(maps, a, b, &mut ab, &mut ba).await;
    tracing::debug!(a = ca, b = cb, result = ?r, "splice ended");
    let moved = (maps.moved(ca) + ab.copied, maps.moved(cb) + ba.copied);
    maps.forget(ca, cb);
    if r.is_err() {
        reset(a, b);
    }
    Started::Spliced(r.map(|()| moved))
}

async fn serve(
    maps: &SpliceMaps,
    a: &TcpStream,
    b: &TcpStream,
    ab: &mut Direction,
    ba: &mut Direction,
) -> io::Result<()> {
    // Bytes that arrived before the verdict was attached wait in the receive queue; a read runs
    // them through it (and clears readiness that predates the splice).
    pump(a, b, ab).await?;
    pump(b, a, ba).await?;
    let mut wait = Duration::from_millis(1);
    while !(ab.done && ba.done) {
        for (dir, to) in [(&mut *ab, b), (&mut *ba, a)] {
            if dir.eof && !dir.done && flushed(maps, dir, to)? {
                // Every byte before the FIN is in the other socket's send queue: the FIN follows.
                shutdown_write(to)?;
                dir.done = true;
                wait = Duration::from_millis(1);
            }
        }
        if ab.done && ba.done {
            break;
        }
        let flushing = (ab.eof && !ab.done) || (ba.eof && !ba.done);
        tokio::select! {
            r = a.readable(), if !ab.eof => { r?; pump(a, b, ab).await?; }
            r = b.readable(), if !ba.eof => { r?; pump(b, a, ba).await?; }
            // After its FIN, a side can still be reset (or fail a kernel send).
            r = a.ready(Interest::ERROR), if ab.eof => { r?; return Err(socket_error(a)); }
            r = b.ready(Interest::ERROR), if ba.eof => { r?; return Err(socket_error(b)); }
            () = tokio::time::sleep(wait), if flushing => {
                wait = (wait * 2).min(Duration::from_millis(20));
            }
        }
    }
    Ok(())
}

/// Reads what the verdict left on `from` (its FIN, its error, bytes it could not move, or — for a
/// one-way splice — everything) and forwards bytes to `to` in order.
async fn pump(from: &TcpStream, to: &TcpStream, dir: &mut Direction) -> io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.try_read(&mut buf) {
            Ok(0) => {
                tracing::debug!(from = dir.from, "splice: end of stream");
                dir.eof = true;
                return Ok(());
            }
            Ok(n) => {
                write_all(to, &buf[..n]).await?;
                dir.copied += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!(from = dir.from, error = %e, "splice: read error");
                return Err(e);
            }
        }
    }
}

async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Has `to` taken every byte that arrived for it (moved by the kernel or copied here)?
fn flushed(maps: &SpliceMaps, dir: &Direction, to: &TcpStream) -> io::Result<bool> {
    let arrived = maps.moved(dir.from) + dir.copied;
    let taken = taken_by_socket(to)?.saturating_sub(dir.to_base);
    tracing::trace!(
        from = dir.from,
        arrived,
        taken,
        base = dir.to_base,
        "splice: flush check"
    );
    Ok(taken >= arrived)
}

/// Bytes a socket has taken for sending: acknowledged plus still queued. Read in this order, a
/// concurrent acknowledgement can only make it low, never high.
fn taken_by_socket(s: &TcpStream) -> io::Result<u64> {
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

fn tcp_info_u64(s: &TcpStream, offset: usize) -> io::Result<u64> {
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

/// `SO_COOKIE`: the socket's cookie, what `bpf_get_socket_cookie` returns for it.
fn cookie(s: &TcpStream) -> io::Result<u64> {
    let mut v: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into a live local.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut v as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn shutdown_write(s: &TcpStream) -> io::Result<()> {
    // SAFETY: shutdown on a live descriptor.
    if unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_WR) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The pending error of a socket that reported one (a reset, or a send the kernel failed).
fn socket_error(s: &TcpStream) -> io::Error {
    match s.take_error() {
        Ok(Some(e)) => e,
        Ok(None) => io::Error::new(io::ErrorKind::ConnectionReset, "connection reset"),
        Err(e) => e,
    }
}

fn reset(a: &TcpStream, b: &TcpStream) {
    let _ = a.set_zero_linger();
    let _ = b.set_zero_linger();
}
