//! The same-node fast path (`--sockmap on`): the proxy's two sockets of a connection between pods
//! of this node are spliced in the kernel, so the bytes never cross into user space.
//!
//! Only the proxy's own, non-blocking sockets enter the socket maps, never a pod's: on Linux a
//! socket in a sockmap gets `tcp_bpf_recvmsg`, which returns EAGAIN to a blocking reader woken
//! without data (ARCHITECTURE.md). The kernel moves bytes; this task still owns the connection's
//! life: it sees each end's FIN or reset and passes it on, and it passes a FIN on only after the
//! kernel has handed every byte before it to the other socket (the bytes the verdict moved, from
//! `NM_SPLICE_BYTES`, against what the other socket has taken: `tcpi_bytes_acked` + `SIOCOUTQ`).
//!
//! Bytes the kernel moved wait in a queue for the receiving socket that counts against no socket
//! buffer, so TCP alone would let a fast client fill the node's memory for a slow server. The
//! window (`--splice-window`) bounds that queue per direction: `nm_splice` sends an event when
//! enough has moved since the last look, this task measures the backlog, and past the window it
//! pauses the direction — the verdict is detached from the sending socket, new bytes wait in its
//! receive buffer and TCP's window pushes back on the client, as with the user-space relay. Once
//! the receiver has caught up (and the sending socket's queue is empty: the verdict takes whole
//! segments, so none may be half read), the direction goes back to the kernel.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpStream,
    sync::Notify,
};

use crate::ebpf::loader::SpliceMaps;

/// How the splice of one connection started.
pub enum Started {
    /// Relayed in the kernel until both directions ended (or one was reset); (bytes a→b, bytes
    /// b→a).
    Spliced(io::Result<(u64, u64)>),
    /// Nothing was changed: relay in user space. `expected`: a socket had already closed its
    /// side (only established sockets can be spliced), not a fault.
    NotStarted { why: String, expected: bool },
}

/// The backlog of a kernel-spliced direction is measured when `nm_splice` says enough has moved
/// since the last look (a ring buffer event), and in any case this often (should an event be lost).
const SAFETY_CHECK: Duration = Duration::from_secs(1);
/// How often a pending FIN or a paused direction looks again whether the kernel has handed on
/// everything before it; the interval doubles while the receiver takes nothing, up to
/// [`STALLED_CHECK`].
const FLUSH_CHECK: Duration = Duration::from_millis(1);
const STALLED_CHECK: Duration = Duration::from_millis(100);

/// What a splice counts (`nodemesh_splice_pauses_total`, `nodemesh_splice_resumes_total`).
#[derive(Clone, Copy)]
pub struct Counters<'a> {
    pub pauses: &'a prometheus::IntCounter,
    pub resumes: &'a prometheus::IntCounter,
}

/// One direction of the pair.
struct Direction {
    /// Cookie of the socket the bytes arrive on.
    from: u64,
    /// What the receiving end had taken before the splice (its SYN, acknowledged).
    to_base: u64,
    /// Bytes this task copied itself (while paused, or a one-way splice's other direction).
    copied: u64,
    /// The verdict is attached to the sending socket: the kernel moves the bytes.
    kernel: bool,
    /// Kernel mode was paused for a slow receiver; it resumes once this task has caught up.
    paused: bool,
    /// The sending socket has something for this task: an end of stream, an error, or (not in
    /// kernel mode) bytes. Read only once the kernel has handed on everything before it.
    pending: bool,
    eof: bool,
    done: bool,
    /// Kernel mode: measure the backlog now (an event came), or at `next_check` at the latest.
    check: bool,
    next_check: Instant,
    /// Waiting for the backlog to drain (something pending, or the FIN).
    last_backlog: u64,
    flush_every: Duration,
}

impl Direction {
    fn new(from: u64, to_base: u64, kernel: bool) -> Self {
        Self {
            from,
            to_base,
            copied: 0,
            kernel,
            paused: false,
            // A first read runs bytes that arrived before the splice through the verdict.
            pending: true,
            eof: false,
            done: false,
            check: false,
            next_check: Instant::now() + SAFETY_CHECK,
            last_backlog: 0,
            flush_every: FLUSH_CHECK,
        }
    }

    /// When this direction needs looking at without an event.
    fn deadline(&self) -> Option<Instant> {
        if self.pending || (self.eof && !self.done) {
            Some(Instant::now() + self.flush_every)
        } else if self.kernel {
            Some(self.next_check)
        } else {
            None
        }
    }
}

/// Splices `a` and `b` (established, nothing read from either yet) and serves the connection
/// until both directions are done. An error on either side resets both, as the user-space relay
/// does.
pub async fn relay(
    maps: &SpliceMaps,
    a: &TcpStream,
    b: &TcpStream,
    counters: Counters<'_>,
) -> Started {
    let setup = (|| -> io::Result<_> {
        Ok((
            super::socket_cookie(a)?,
            super::socket_cookie(b)?,
            taken_by_socket(a)?,
            taken_by_socket(b)?,
        ))
    })();
    let (ca, cb, a_base, b_base) = match setup {
        Ok(v) => v,
        Err(e) => {
            return Started::NotStarted {
                why: e.to_string(),
                expected: false,
            };
        }
    };
    let wake = Arc::new(Notify::new());
    let both_ways = match maps.join((a.as_fd(), ca), (b.as_fd(), cb), maps.window(), &wake) {
        Ok(both) => both,
        Err(e) => {
            return Started::NotStarted {
                expected: e.not_established,
                why: e.to_string(),
            };
        }
    };
    let mut ab = Direction::new(ca, b_base, true);
    let mut ba = Direction::new(cb, a_base, both_ways);
    tracing::debug!(a = ca, b = cb, both_ways, "spliced");
    let r = serve(maps, a, b, &mut ab, &mut ba, &wake, counters).await;
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
    wake: &Notify,
    counters: Counters<'_>,
) -> io::Result<()> {
    while !(ab.done && ba.done) {
        step(maps, a, b, ab, counters).await?;
        step(maps, b, a, ba, counters).await?;
        if ab.done && ba.done {
            break;
        }
        let deadline = [ab.deadline(), ba.deadline()].into_iter().flatten().min();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = a.readable(), if !ab.eof && !ab.pending => { r?; ab.pending = true; }
            r = b.readable(), if !ba.eof && !ba.pending => { r?; ba.pending = true; }
            // While a side waits (for the kernel to finish, or after its FIN) it can still be
            // reset, or fail a send the kernel made for it.
            r = a.ready(Interest::ERROR), if ab.eof || ab.pending => { r?; return Err(socket_error(a)); }
            r = b.ready(Interest::ERROR), if ba.eof || ba.pending => { r?; return Err(socket_error(b)); }
            // `nm_splice` reached a limit: look at the backlogs.
            () = wake.notified() => { ab.check = true; ba.check = true; }
            () = sleep => {}
        }
    }
    Ok(())
}

/// Moves one direction on: measures the kernel's backlog (pausing the splice when it is too
/// big), forwards what is pending once everything before it is across, resumes a paused splice,
/// and passes the FIN on last.
async fn step(
    maps: &SpliceMaps,
    from: &TcpStream,
    to: &TcpStream,
    dir: &mut Direction,
    counters: Counters<'_>,
) -> io::Result<()> {
    if dir.kernel && !dir.eof && (dir.check || Instant::now() >= dir.next_check) {
        dir.check = false;
        dir.next_check = Instant::now() + SAFETY_CHECK;
        let moved = maps.moved(dir.from);
        let left = backlog(maps, dir, to)?;
        let window = maps.window();
        if left > window || !maps.set_limit(dir.from, moved + (window - left)) {
            // The receiver is slower than the sender: stop moving bytes in the kernel. After the
            // socket call below, no verdict run for `from` is still under way (it holds the
            // socket's lock), so `moved` is final until the splice resumes.
            maps.pause(dir.from);
            let _ = taken_by_socket(from);
            dir.kernel = false;
            dir.paused = true;
            dir.pending = true;
            counters.pauses.inc();
            tracing::trace!(
                from = dir.from,
                left,
                "splice paused: the receiver is behind"
            );
        }
    }
    if !(dir.pending || (dir.eof && !dir.done)) {
        return Ok(());
    }
    let left = backlog(maps, dir, to)?;
    if left > 0 {
        // Poll less often while the receiver takes nothing.
        dir.flush_every = if left == dir.last_backlog {
            (dir.flush_every * 2).min(STALLED_CHECK)
        } else {
            FLUSH_CHECK
        };
        dir.last_backlog = left;
        return Ok(());
    }
    dir.flush_every = FLUSH_CHECK;
    if dir.pending && !dir.eof {
        // Everything the kernel moved is in `to`'s send queue: bytes read now go after it.
        pump(from, to, dir).await?;
        dir.pending = false;
        if dir.paused && !dir.eof {
            dir.paused = false;
            let moved = maps.moved(dir.from);
            if maps.set_limit(dir.from, moved + maps.window())
                && maps.resume(from.as_fd(), dir.from)
            {
                dir.kernel = true;
                dir.next_check = Instant::now() + SAFETY_CHECK;
                // Bytes that arrived since the last read go through the verdict now.
                dir.pending = true;
                counters.resumes.inc();
                tracing::trace!(from = dir.from, "splice resumed");
            }
        }
    }
    if dir.eof && !dir.done && backlog(maps, dir, to)? == 0 {
        // Every byte before the FIN is in the other socket's send queue: the FIN follows.
        shutdown_write(to)?;
        dir.done = true;
    }
    Ok(())
}

/// Reads what waits on `from` — its FIN, its error, or bytes the kernel did not move — and
/// forwards the bytes to `to` in order, until `from` has nothing more.
///
/// It always reads until the receive queue is empty: the verdict takes whole segments from the
/// queue, so a paused splice may resume only when no segment is half read (the kernel would pass
/// the read half on again).
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

/// Reads `nm_splice`'s limit events for as long as the daemon runs and wakes the connection each
/// names. One task per daemon.
pub async fn run_events(maps: Arc<SpliceMaps>) {
    let Some(events) = maps.take_events() else {
        return;
    };
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as long as the
    // `AsyncFd` holds it.
    let registered = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) };
    let mut events = match registered {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the splice events; spliced connections are measured once a second only");
            return;
        }
    };
    loop {
        let mut guard = match events.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(error = %e, "splice events stopped; spliced connections are measured once a second only");
                return;
            }
        };
        while let Some(item) = guard.get_inner_mut().next() {
            if let Some(bytes) = item.get(..8) {
                let mut c = [0u8; 8];
                c.copy_from_slice(bytes);
                maps.wake(u64::from_ne_bytes(c));
            }
        }
        guard.clear_ready();
    }
}

/// Bytes that arrived for `to` (moved by the kernel or copied here) that it has not taken yet:
/// what still waits in the kernel's queue for it.
fn backlog(maps: &SpliceMaps, dir: &Direction, to: &TcpStream) -> io::Result<u64> {
    let arrived = maps.moved(dir.from) + dir.copied;
    let taken = taken_by_socket(to)?.saturating_sub(dir.to_base);
    tracing::trace!(from = dir.from, arrived, taken, "splice: backlog");
    Ok(arrived.saturating_sub(taken))
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
