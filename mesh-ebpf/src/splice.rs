//! `sk_skb/stream_verdict` on `NM_SPLICE`: the same-node fast path (`--sockmap on`).
//!
//! Only the proxy's own two sockets of a same-node connection are ever in the maps — the one it
//! accepted from the client pod and the one it opened to the server pod — never a pod's socket
//! (a socket in a sockmap gets `tcp_bpf_recvmsg`, which returns EAGAIN to blocking readers on
//! spurious wake-ups; ARCHITECTURE.md has the measurement). Bytes arriving on one of them are
//! moved in the kernel to the other one's send queue, so they never cross into user space.
//!
//! `NM_SPLICE_PEER` holds, under each socket's cookie, the socket its bytes go to; the daemon
//! fills it for both sockets before it puts either in `NM_SPLICE`, so the verdict always finds the
//! peer. `NM_SPLICE_BYTES` counts what was moved per source socket: the daemon forwards a FIN only
//! once the peer's send queue has taken all of it. Moved bytes wait in the kernel's queue for the
//! peer without counting against the sender's receive buffer, so TCP alone would not push back on
//! a fast client with a slow server: when the count reaches the daemon's limit
//! (`NM_SPLICE_CONTROL`), the cookie goes out on `NM_SPLICE_EVENTS`, and the daemon measures the
//! backlog and pauses the direction if it is too big.
//!
//! A paused direction is not taken out of `NM_SPLICE`: a verdict detached while a segment is on
//! its way through it drops that segment (the kernel applies "drop" when it finds no program), and
//! TCP has already acknowledged it. The verdict stays, and passes segments to the socket itself
//! instead, where they count against its receive buffer — so TCP's window pushes back — until the
//! daemon reads them. Moving resumes only when the daemon has relayed every byte passed before.

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::bpf_get_socket_cookie,
    macros::stream_verdict,
    programs::SkBuffContext,
};
use mesh_common::Counter;

use crate::maps::{SPLICE_BYTES, SPLICE_CONTROL, SPLICE_EVENTS, SPLICE_PEER, count};

#[stream_verdict]
pub fn nm_splice(ctx: SkBuffContext) -> u32 {
    try_splice(&ctx)
}

fn try_splice(ctx: &SkBuffContext) -> u32 {
    // SAFETY: a helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let len = u64::from(ctx.len());
    if len == 0 {
        // A bare FIN: TCP has already taken note of it (the proxy reads end-of-stream from the
        // socket state), and the skb carries nothing. It must not enter a psock queue: behind
        // queued bytes, the kernel's backlog worker reports an empty send or delivery as EPIPE,
        // which would break the connection. Dropping it frees it and nothing else.
        return SK_DROP;
    }
    let Some(c) = SPLICE_BYTES.get_ptr_mut(cookie) else {
        // No longer a splice the daemon serves (it has finished with the connection, and the
        // socket leaves the maps as it closes): leave the bytes to the socket.
        return SK_PASS;
    };
    // SAFETY: the pointer comes from the kernel's lookup and stays valid for this run. The verdict
    // of one socket runs under that socket's lock, so nobody else writes this value meanwhile; the
    // daemon only reads it (an aligned 8-byte store is never torn).
    let c = unsafe { &mut *c };
    // SAFETY: copied out at once; the daemon replaces the element whole, never in place.
    let ctl = unsafe { SPLICE_CONTROL.get(cookie) }
        .copied()
        .unwrap_or_default();
    // Move only when everything passed before is across: the daemon wrote it to the peer before
    // it said so, and this segment goes after it in the peer's send queue.
    let kernel = ctl.paused == 0 && c.passed == ctl.relayed;
    let mut key = cookie;
    if kernel && SPLICE_PEER.redirect_skb(ctx, &mut key, 0) == i64::from(SK_PASS) {
        c.moved += len;
        count(Counter::SpliceRedirected);
    } else {
        if kernel {
            // No peer (it closed): the bytes stay on this socket, where the proxy reads them.
            count(Counter::SpliceNoPeer);
        }
        c.passed += len;
        count(Counter::SplicePassed);
    }
    if c.moved + c.passed >= ctl.limit && ctl.limit != 0 && c.announced != ctl.limit {
        // The daemon asked to look at this splice once this much has arrived.
        c.announced = ctl.limit;
        if SPLICE_EVENTS.output::<u64>(cookie, 0).is_err() {
            count(Counter::SpliceEventLost);
        }
    }
    SK_PASS
}
