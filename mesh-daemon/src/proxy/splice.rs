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
//! enough has arrived since the last look, this task measures the backlog, and past the window it
//! pauses the direction. Paused, the verdict passes the segments to the sending socket itself
//! (never detached: a verdict detached mid-segment drops it), where they count against its
//! receive buffer, so TCP's window pushes back on the client, as with the user-space relay. This
//! task reads them once the receiver has taken everything moved before, and resumes the
//! direction; the verdict moves again only once this task has relayed every byte passed to it
//! (`SpliceControl::relayed`), so the bytes stay in order whichever way each went.

use std::{
    io,
    os::fd::AsFd,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpStream,
    sync::Notify,
};

use mesh_common::SpliceControl;

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

/// What a splice counts (`nodemesh_splice_pauses_total`, `nodemesh_splice_resumes_total`,
/// `nodemesh_splice_overflows_total`).
#[derive(Clone, Copy)]
pub struct Counters<'a> {
    pub pauses: &'a prometheus::IntCounter,
    pub resumes: &'a prometheus::IntCounter,
    pub overflows: &'a prometheus::IntCounter,
}

/// Bytes passed to a paused socket may wait in the kernel behind the bytes going out of it (one
/// queue serves both): a side that sends while it reads nothing of what it is sent has its bytes
/// held there, charged to no buffer. Past the window plus its receive buffer, and at least this,
/// the connection is reset: TCP alone would have stopped that sender long before.
const OVERFLOW_FLOOR: u64 = 4 << 20;

/// One direction of the pair.
struct Direction {
    /// Cookie of the socket the bytes arrive on.
    from: u64,
    /// What the receiving end had taken before the splice (its SYN, acknowledged).
    to_base: u64,
    /// Bytes this task read from `from` and wrote to `to` (passed to it while paused, or a
    /// one-way splice's other direction).
    copied: u64,
    /// `from` is in `NM_SPLICE`: its segments go through the verdict, which moves them or passes
    /// them to this task as `ctl` says. False: the other direction of a one-way splice.
    spliced: bool,
    /// What this task last told the verdict about `from`.
    ctl: SpliceControl,
    /// The sending socket has something for this task: an end of stream, an error, or bytes
    /// passed to it. Read only once the kernel has handed on everything before it.
    pending: bool,
    eof: bool,
    done: bool,
    /// Spliced: measure the backlog now (an event came), or at `next_check` at the latest.
    check: bool,
    next_check: Instant,
    /// Waiting for the backlog to drain (something pending, or the FIN).
    last_backlog: u64,
    flush_every: Duration,
    /// Bytes read from `from`, `unsent[sent..]` not yet taken by `to` (it was full).
    unsent: Vec<u8>,
    sent: usize,
    /// The last read stopped at its budget with more to read: go on at once.
    more: bool,
    /// The last read found the end of stream with passed bytes still on their way.
    in_transit: bool,
}

impl Direction {
    fn new(from: u64, to_base: u64, spliced: bool, window: u64) -> Self {
        Self {
            from,
            to_base,
            copied: 0,
            spliced,
            ctl: SpliceControl {
                limit: window.max(1),
                ..SpliceControl::default()
            },
            // A first read runs bytes that arrived before the splice through the verdict.
            pending: true,
            eof: false,
            done: false,
            check: false,
            next_check: Instant::now() + SAFETY_CHECK,
            last_backlog: 0,
            flush_every: FLUSH_CHECK,
            unsent: Vec::new(),
            sent: 0,
            more: false,
            in_transit: false,
        }
    }

    /// Bytes read wait for `to` to take them: wait for it to be writable.
    fn blocked(&self) -> bool {
        self.sent < self.unsent.len()
    }

    fn paused(&self) -> bool {
        self.ctl.paused != 0
    }

    /// When this direction needs looking at without an event.
    fn deadline(&self) -> Option<Instant> {
        if self.more {
            Some(Instant::now())
        } else if self.blocked() {
            self.spliced.then_some(self.next_check)
        } else if self.pending || (self.eof && !self.done) {
            Some(Instant::now() + self.flush_every)
        } else if self.spliced && !self.eof {
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
            crate::socket::socket_cookie(a)?,
            crate::socket::socket_cookie(b)?,
            crate::socket::taken_for_sending(a)?,
            crate::socket::taken_for_sending(b)?,
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
    let mut ab = Direction::new(ca, b_base, true, maps.window());
    let mut ba = Direction::new(cb, a_base, both_ways, maps.window());
    tracing::debug!(a = ca, b = cb, both_ways, "spliced");
    let r = serve(maps, a, b, &mut ab, &mut ba, &wake, counters).await;
    tracing::debug!(a = ca, b = cb, result = ?r, "splice ended");
    for dir in [&ab, &ba] {
        let passed = maps.count(dir.from).passed;
        if dir.spliced && dir.copied > passed {
            // Every byte read from a spliced socket should have come through the verdict (see
            // `pump`); if not, the direction never went back to the kernel (slower, still in
            // order). Seen here, it is worth a look.
            tracing::warn!(
                from = dir.from,
                copied = dir.copied,
                passed,
                "splice accounting: the proxy read bytes the verdict never passed"
            );
        }
    }
    let moved = (
        maps.moved(ca) + ab.copied,
        if both_ways { maps.moved(cb) } else { 0 } + ba.copied,
    );
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
        step(maps, a, b, ab, counters)?;
        step(maps, b, a, ba, counters)?;
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
            // Bytes read wait for the other side to take them.
            r = b.writable(), if ab.blocked() => { r?; }
            r = a.writable(), if ba.blocked() => { r?; }
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

/// Moves one direction on: measures the kernel's backlog (pausing the direction when it is too
/// big), forwards what is pending once everything before it is across, resumes a paused
/// direction, and passes the FIN on last.
fn step(
    maps: &SpliceMaps,
    from: &TcpStream,
    to: &TcpStream,
    dir: &mut Direction,
    counters: Counters<'_>,
) -> io::Result<()> {
    if dir.spliced && !dir.eof && (dir.check || Instant::now() >= dir.next_check) {
        dir.check = false;
        dir.next_check = Instant::now() + SAFETY_CHECK;
        look(maps, from, to, dir, counters)?;
    }
    if !(dir.pending || (dir.eof && !dir.done)) {
        return Ok(());
    }
    // Bytes read and not yet sent were read after everything before them was across.
    if !dir.blocked() {
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
        if !dir.in_transit {
            dir.flush_every = FLUSH_CHECK;
        }
    }
    if dir.pending && !dir.eof {
        // Everything the kernel moved is in `to`'s send queue: bytes read now go after it.
        let pumped = pump(maps, from, to, dir)?;
        dir.more = pumped == Pumped::More;
        dir.pending = !matches!(pumped, Pumped::Drained | Pumped::Eof);
        // Poll less often while the passed bytes before an end of stream do not come.
        let was_in_transit = std::mem::replace(&mut dir.in_transit, pumped == Pumped::InTransit);
        if dir.in_transit && was_in_transit {
            dir.flush_every = (dir.flush_every * 2).min(STALLED_CHECK);
        }
        if dir.spliced
            && pumped == Pumped::Drained
            && (dir.paused() || dir.copied != dir.ctl.relayed)
        {
            // This task has relayed everything passed to `from` so far and the receiver has
            // taken everything moved: the verdict may move again once it has counted as many
            // bytes passed as this task relayed (more may be on their way; they come here first).
            let resuming = dir.paused();
            let c = maps.count(dir.from);
            // Read more than the verdict passed: some bytes did not go through it, so the counts
            // no longer tell when all passed bytes are across. Stay in user space for good
            // (reported when the splice ends).
            let lost_count = dir.copied > c.passed;
            dir.ctl = SpliceControl {
                limit: c.moved + c.passed + maps.window(),
                relayed: dir.copied,
                paused: u32::from(lost_count),
                _reserved: 0,
            };
            if !maps.control(dir.from, dir.ctl) {
                dir.ctl.paused = u32::from(resuming);
            } else if resuming && !lost_count {
                dir.next_check = Instant::now() + SAFETY_CHECK;
                counters.resumes.inc();
                tracing::trace!(from = dir.from, "splice resumed");
            }
        }
    }
    if dir.eof && !dir.done && backlog(maps, dir, to)? == 0 {
        // Every byte before the FIN is in the other socket's send queue: the FIN follows.
        crate::socket::shutdown_write(to)?;
        dir.done = true;
    }
    Ok(())
}

/// Measures a spliced direction (an event came, or a second passed): pauses it when the kernel
/// holds more than the window for the receiver, and resets the connection when the kernel holds
/// too many of the sender's passed bytes that this task cannot read (see [`OVERFLOW_FLOOR`]).
fn look(
    maps: &SpliceMaps,
    from: &TcpStream,
    to: &TcpStream,
    dir: &mut Direction,
    counters: Counters<'_>,
) -> io::Result<()> {
    let c = maps.count(dir.from);
    let arrived = c.moved + c.passed;
    let window = maps.window();
    // Passed bytes this task has not read: in `from`'s receive buffer (bounded by it), or queued
    // behind the bytes going out of `from` (bounded by nothing) — paused, or still catching up
    // after a resume.
    let unread = c.passed.saturating_sub(dir.copied);
    if unread > 0 {
        let bound = window.max(OVERFLOW_FLOOR) + receive_buffer(from);
        if unread > bound {
            counters.overflows.inc();
            tracing::warn!(
                unread,
                bound,
                "a same-node client or server kept sending while it read nothing of what it was \
                 sent; the node holds no more for it and resets the connection (the peer must \
                 read its responses, or send less ahead of them)"
            );
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!(
                    "{unread} bytes sent ahead of unread responses: more than the node holds for \
                     one connection ({bound})"
                ),
            ));
        }
    }
    if dir.paused() {
        dir.ctl.limit = arrived + window;
        maps.control(dir.from, dir.ctl);
        return Ok(());
    }
    let left = backlog(maps, dir, to)?;
    if left <= window {
        dir.ctl.limit = arrived + (window - left).max(1);
        maps.control(dir.from, dir.ctl);
        return Ok(());
    }
    // The receiver is slower than the sender: pass the sender's bytes to this task from now on.
    dir.ctl = SpliceControl {
        limit: arrived + window,
        relayed: dir.copied,
        paused: 1,
        _reserved: 0,
    };
    if !maps.control(dir.from, dir.ctl) {
        dir.ctl.paused = 0;
        return Ok(());
    }
    // A verdict run for `from` holds the socket's lock; after this socket call none that read
    // the old control is still under way, so the moved count is final until the resume.
    let _ = crate::socket::taken_for_sending(from);
    dir.pending = true;
    counters.pauses.inc();
    tracing::trace!(
        from = dir.from,
        left,
        "splice paused: the receiver is behind"
    );
    Ok(())
}

/// How a [`pump`] ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pumped {
    /// `from` had nothing more, and everything read is in `to`.
    Drained,
    /// `from` ended its stream, and everything before it is in `to`.
    Eof,
    /// `to` is full; the bytes read wait in the direction.
    Blocked,
    /// The read budget is spent; there may be more.
    More,
    /// `from` says end of stream, but bytes passed before it are still on their way through the
    /// kernel: look again soon (no wake-up comes for them).
    InTransit,
}

/// Reads per pump before the other direction (and other connections) get a turn.
const PUMP_BUDGET: usize = 64;
const CHUNK: usize = 16 * 1024;

/// Reads what waits on `from` — its FIN, its error, or bytes passed to this task — and forwards
/// the bytes to `to` in order, until `from` has nothing more, `to` is full or the budget is
/// spent. Never waits: a full `to` leaves the bytes in the direction (the other direction must go
/// on meanwhile, or a server that writes before it reads would wait for this task forever).
fn pump(
    maps: &SpliceMaps,
    from: &TcpStream,
    to: &TcpStream,
    dir: &mut Direction,
) -> io::Result<Pumped> {
    for _ in 0..PUMP_BUDGET {
        while dir.blocked() {
            match to.try_write(&dir.unsent[dir.sent..]) {
                Ok(n) => {
                    dir.sent += n;
                    dir.copied += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Pumped::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        dir.unsent.resize(CHUNK, 0);
        dir.sent = 0;
        match from.try_read(&mut dir.unsent) {
            Ok(0) => {
                dir.unsent = Vec::new();
                if dir.spliced && maps.count(dir.from).passed > dir.copied {
                    // The kernel still has passed bytes queued for this socket; the end of
                    // stream comes after them.
                    return Ok(Pumped::InTransit);
                }
                tracing::debug!(from = dir.from, "splice: end of stream");
                dir.eof = true;
                return Ok(Pumped::Eof);
            }
            Ok(n) => dir.unsent.truncate(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Nothing held between pumps.
                dir.unsent = Vec::new();
                return Ok(Pumped::Drained);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => dir.unsent.clear(),
            Err(e) => {
                tracing::debug!(from = dir.from, error = %e, "splice: read error");
                return Err(e);
            }
        }
    }
    Ok(Pumped::More)
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
    let taken = crate::socket::taken_for_sending(to)?.saturating_sub(dir.to_base);
    tracing::trace!(from = dir.from, arrived, taken, "splice: backlog");
    Ok(arrived.saturating_sub(taken))
}

/// The socket's receive buffer size (`SO_RCVBUF`, as TCP has tuned it so far).
fn receive_buffer(s: &TcpStream) -> u64 {
    crate::socket::receive_buffer(s).unwrap_or(0)
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
