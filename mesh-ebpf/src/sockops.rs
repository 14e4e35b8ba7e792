//! `sockops`: when a captured connection is established, re-key its record by the client's own
//! address, which is what the proxy sees as the peer of the accepted socket; and free the
//! record when its socket closes.
//!
//! A captured socket asks for state callbacks as it connects (`TCP_CONNECT_CB`, right after
//! `nm_connect4` stored its record), so its record in `NM_ORIG_BY_COOKIE` is deleted when the
//! socket reaches `TCP_CLOSE` — a normal close, a reset, a failed connect, or the move to
//! TIME_WAIT. Without it every captured connection left its record behind until the LRU evicted
//! one, and a live connection's record could be the one evicted (its getpeername() would then
//! name the proxy).
//!
//! This callback may run in softirq context (the SYN-ACK arrives there), so "the current task" is
//! meaningless here; identity was taken at connect time and travels in the record.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::sock_ops,
    programs::SockOpsContext,
};
use mesh_common::{AF_INET, AF_INET6, ConnKey, Counter, conn_port, is_loopback4};

use crate::{
    connect::Skip,
    maps::{ORIG_BY_ADDR, ORIG_BY_COOKIE, config, count},
};

#[sock_ops]
pub fn nm_sockops(ctx: SockOpsContext) -> u32 {
    let _ = try_sockops(&ctx);
    0
}

fn try_sockops(ctx: &SockOpsContext) -> Result<(), Skip> {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => return watch_close(ctx),
        BPF_SOCK_OPS_STATE_CB => return forget_on_close(ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {}
        _ => return Ok(()),
    }
    let cfg = config().ok_or(Skip)?;
    let (family, local_ip, remote_ip) = addresses(ctx).ok_or(Skip)?;
    let local_port = ctx.local_port();
    // sock_ops keeps the remote port in network order in the upper half of the word (on this
    // little-endian machine): swapping the word's bytes gives it in host order.
    let remote_port = u32::from_be(ctx.remote_port());
    // SAFETY: helper calls on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: copied out at once.
    let Some(mut rec) = (unsafe { ORIG_BY_COOKIE.get(cookie) }).copied() else {
        // Established to the proxy without a record: it was evicted (or never stored); the proxy
        // will refuse the connection, and this says why.
        if family == AF_INET && remote_ip[0] == cfg.proxy_ip4 && cfg.is_outbound_port(remote_port) {
            count(Counter::SockopsNoRecord);
        }
        return Ok(());
    };
    let netns_cookie = if family == AF_INET && is_loopback4(local_ip[0]) {
        // SAFETY: helper call on the program's own context.
        unsafe { bpf_get_netns_cookie(ctx.ops.cast()) }
    } else {
        0
    };
    let key = ConnKey {
        netns_cookie,
        ip: local_ip,
        port: conn_port(local_port as u16, remote_port as u16),
        family,
    };
    // SAFETY: a helper without arguments.
    rec.established_ns = unsafe { bpf_ktime_get_ns() };
    if ORIG_BY_ADDR.insert(key, rec, 0).is_err() {
        count(Counter::RecordStoreFailed);
        return Err(Skip);
    }
    count(Counter::SockopsRekeyed);
    Ok(())
}

/// A socket `nm_connect4` captured asks to be told when its state changes, so its record can be
/// freed when it closes.
#[inline(always)]
fn watch_close(ctx: &SockOpsContext) -> Result<(), Skip> {
    // SAFETY: helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: only whether a record exists is read.
    if unsafe { ORIG_BY_COOKIE.get(cookie) }.is_none() {
        return Ok(());
    }
    let flags = ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG;
    if ctx.set_cb_flags(flags as i32).is_err() {
        count(Counter::CloseWatchFailed);
        return Err(Skip);
    }
    Ok(())
}

/// A watched socket reached `TCP_CLOSE`: its record goes with it.
#[inline(always)]
fn forget_on_close(ctx: &SockOpsContext) -> Result<(), Skip> {
    // args[0] is the old state, args[1] the new one.
    if ctx.arg(1) != BPF_TCP_CLOSE {
        return Ok(());
    }
    // SAFETY: helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    if ORIG_BY_COOKIE.remove(cookie).is_ok() {
        count(Counter::RecordFreed);
    }
    Ok(())
}

/// (family, local, remote) with v4-mapped IPv6 folded to IPv4, as the proxy's IPv4 listener sees
/// such a peer.
///
/// Every context field is read once, up front, with a volatile load: otherwise LLVM may pick the
/// field's address by family and load through the computed pointer, a "modified ctx pointer" the
/// verifier refuses.
#[inline(always)]
fn addresses(ctx: &SockOpsContext) -> Option<(u32, [u32; 4], [u32; 4])> {
    let ops = ctx.ops;
    // SAFETY: the context is valid for the run; each read is of a plain u32 field.
    let f = |p: *const u32| unsafe { core::ptr::read_volatile(p) };
    // SAFETY: field addresses inside the live context; nothing is dereferenced here.
    let (family, l4, r4, l6, r6) = unsafe {
        (
            f(&raw const (*ops).family),
            f(&raw const (*ops).local_ip4),
            f(&raw const (*ops).remote_ip4),
            [
                f(&raw const (*ops).local_ip6[0]),
                f(&raw const (*ops).local_ip6[1]),
                f(&raw const (*ops).local_ip6[2]),
                f(&raw const (*ops).local_ip6[3]),
            ],
            [
                f(&raw const (*ops).remote_ip6[0]),
                f(&raw const (*ops).remote_ip6[1]),
                f(&raw const (*ops).remote_ip6[2]),
                f(&raw const (*ops).remote_ip6[3]),
            ],
        )
    };
    match family {
        AF_INET => Some((AF_INET, [l4, 0, 0, 0], [r4, 0, 0, 0])),
        AF_INET6 => {
            if l6[0] == 0 && l6[1] == 0 && l6[2] == 0xffffu32.to_be() {
                Some((AF_INET, [l6[3], 0, 0, 0], [r6[3], 0, 0, 0]))
            } else {
                Some((AF_INET6, l6, r6))
            }
        }
        _ => None,
    }
}
