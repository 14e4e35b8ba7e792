//! `cgroup/connect4` and `cgroup/connect6`: capture an enrolled pod's outbound TCP connection.
//!
//! Both families live in one file because connect6 also carries IPv4 traffic: a dual-stack socket
//! connecting to `::ffff:a.b.c.d` runs only the connect6 hook, so it must capture IPv4 too.
//!
//! On capture the destination is rewritten to the proxy's outbound listener and the original
//! destination plus the source identity (the enrolled cgroup, found from the *task*, not from an
//! address the pod controls) are stored under the socket cookie; `sockops` moves the record to a
//! key the proxy can compute once the connection is established.

use aya_ebpf::{
    bindings::bpf_sock_addr, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use mesh_common::{
    AF_INET, AF_INET6, Counter, FLAG_CAPTURE_ALL, FLAG_LOG_DECISIONS, FLAG_REDIRECT, OrigDst,
    ProxyConfig, is_loopback4, is_loopback6,
};

use crate::maps::{ORIG_BY_COOKIE, config, count, enrolled_ancestor, is_mesh_destination};

const SOCK_STREAM: u32 = 1;
/// Allow the connect() to proceed.
const ALLOW: i32 = 1;
/// Fail the connect() with EPERM: only for traffic the mesh must carry but cannot (fail closed).
const REFUSE: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn nm_connect4(ctx: SockAddrContext) -> i32 {
    // Every error path leaves the connection untouched; there is nothing else to do with it.
    let _ = try_connect4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn nm_connect6(ctx: SockAddrContext) -> i32 {
    try_connect6(&ctx).unwrap_or(ALLOW)
}

/// Why a connection was left alone; only used to end `try_*` early.
pub struct Skip;

fn try_connect4(ctx: &SockAddrContext) -> Result<(), Skip> {
    count(Counter::ConnectSeen);
    // SAFETY: the kernel hands the program a valid context for the duration of the run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let cfg = capture(ctx, sa.type_, [sa.user_ip4, 0, 0, 0], AF_INET, sa.user_port)?;
    if cfg.flags & FLAG_REDIRECT != 0 {
        let port = cfg.outbound_port(sa.user_ip4, u32::from(u16::from_be(sa.user_port as u16)));
        sa.user_ip4 = cfg.proxy_ip4;
        sa.user_port = u32::from((port as u16).to_be());
        count(Counter::Redirected);
    }
    Ok(())
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, Skip> {
    count(Counter::ConnectSeen);
    // SAFETY: as in try_connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip6 = read_ip6(sa);
    if is_v4_mapped(ip6) {
        let cfg = capture(ctx, sa.type_, [ip6[3], 0, 0, 0], AF_INET, sa.user_port)?;
        if cfg.flags & FLAG_REDIRECT != 0 {
            let port = cfg.outbound_port(ip6[3], u32::from(u16::from_be(sa.user_port as u16)));
            write_ip6(sa, [0, 0, 0xffffu32.to_be(), cfg.proxy_ip4]);
            sa.user_port = u32::from((port as u16).to_be());
            count(Counter::Redirected);
        }
        return Ok(ALLOW);
    }
    let cfg = capture(ctx, sa.type_, ip6, AF_INET6, sa.user_port)?;
    if cfg.flags & FLAG_REDIRECT == 0 {
        return Ok(ALLOW);
    }
    // IPv6 is redirected only when the proxy listens on IPv6 (`proxy_ip6` set). Without that
    // listener the connection is refused rather than left to go out unencrypted (fail closed).
    if cfg.proxy_ip6 == [0; 4] {
        count(Counter::Ipv6Refused);
        // No connection follows, so no close would free the record `capture` stored.
        // SAFETY: a helper call on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
        let _ = ORIG_BY_COOKIE.remove(cookie);
        return Ok(REFUSE);
    }
    write_ip6(sa, cfg.proxy_ip6);
    sa.user_port = u32::from((cfg.proxy_port as u16).to_be());
    count(Counter::Redirected);
    Ok(ALLOW)
}

/// The shared decision: is this an enrolled pod's TCP connection that the mesh takes? If so the
/// record is stored and the configuration returned for the rewrite.
#[inline(always)]
fn capture(
    ctx: &SockAddrContext,
    sock_type: u32,
    ip: [u32; 4],
    family: u32,
    port_be: u32,
) -> Result<&'static ProxyConfig, Skip> {
    if sock_type != SOCK_STREAM {
        return Err(Skip);
    }
    let cfg = config().ok_or(Skip)?;
    let (cgroup_id, enrollment) = enrolled_ancestor().ok_or(Skip)?;
    count(Counter::ConnectEnrolled);
    // Loopback stays inside the pod in both modes: it is the pod talking to itself.
    let loopback = if family == AF_INET {
        is_loopback4(ip[0])
    } else {
        is_loopback6(ip)
    };
    let log = cfg.flags & FLAG_LOG_DECISIONS != 0;
    let port = u32::from(u16::from_be(port_be as u16));
    // The decision log names the pod by its workload id (the daemon turns it into a name) and
    // the destination; IPv6 destinations by family only (aya-log's address hint is per type).
    let v4 = u32::from_be(ip[0]);
    if loopback {
        if log {
            debug!(ctx, target: "nodemesh::ebpf", "connect of workload {} to port {} left alone: loopback stays in the pod (cgroup {})", enrollment.workload_id, port, cgroup_id);
        }
        return Err(Skip);
    }
    if family == AF_INET && ip[0] == cfg.proxy_ip4 && cfg.is_outbound_port(port) {
        if log {
            debug!(ctx, target: "nodemesh::ebpf", "connect of workload {} to {:i}:{} left alone: it is the proxy's own listener (cgroup {})", enrollment.workload_id, v4, port, cgroup_id);
        }
        return Err(Skip);
    }
    if is_proxy_socket(ctx, cfg) {
        count(Counter::ProxyExempt);
        return Err(Skip);
    }
    // Only what the mesh serves is captured (unless the daemon runs with --capture all): any
    // other destination keeps the app's exact semantics — its own timeouts, "connection
    // refused", its own source address — and native IPv6 (no IPv6 destination is the mesh's
    // yet) goes out untouched.
    if cfg.flags & FLAG_CAPTURE_ALL == 0
        && (family != AF_INET || !is_mesh_destination(ip[0], port as u16))
    {
        count(Counter::LeftOutsideMesh);
        if log {
            if family == AF_INET {
                debug!(ctx, target: "nodemesh::ebpf", "connect of workload {} to {:i}:{} left alone: not a mesh destination (cgroup {})", enrollment.workload_id, v4, port, cgroup_id);
            } else {
                debug!(ctx, target: "nodemesh::ebpf", "connect of workload {} to an IPv6 address port {} left alone: not a mesh destination (cgroup {})", enrollment.workload_id, port, cgroup_id);
            }
        }
        return Err(Skip);
    }
    let rec = OrigDst {
        cgroup_id,
        ip,
        port,
        family,
        workload_id: enrollment.workload_id,
        flags: 0,
        established_ns: 0,
    };
    // SAFETY: a helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    if ORIG_BY_COOKIE.insert(cookie, rec, 0).is_err() {
        // Fail closed: the connection still goes to the proxy, which refuses it for lack of a
        // record and counts it, rather than leaving the mesh unencrypted.
        count(Counter::RecordStoreFailed);
    }
    if log {
        if family == AF_INET {
            debug!(ctx, target: "nodemesh::ebpf", "connect of workload {} to {:i}:{} captured: to the proxy (cgroup {}, cookie {})", enrollment.workload_id, v4, port, cgroup_id, cookie);
        } else {
            debug!(ctx, target: "nodemesh::ebpf", "connect of workload {} to an IPv6 address port {} captured (cgroup {}, cookie {})", enrollment.workload_id, port, cgroup_id, cookie);
        }
    }
    Ok(cfg)
}

/// The proxy's own sockets carry its `SO_MARK`; in sidecar mode they live in the pod's cgroup and
/// would otherwise be captured by the proxy itself.
#[inline(always)]
fn is_proxy_socket(ctx: &SockAddrContext, cfg: &ProxyConfig) -> bool {
    if cfg.proxy_mark == 0 {
        return false;
    }
    // SAFETY: `sk` is always set for connect hooks; reading `mark` is allowed by the verifier for
    // cgroup_sock_addr programs.
    let mark = unsafe { (*(*ctx.sock_addr).__bindgen_anon_1.sk).mark };
    mark == cfg.proxy_mark
}

#[inline(always)]
fn is_v4_mapped(ip: [u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == 0xffffu32.to_be()
}

/// Reads `user_ip6` one 32-bit word at a time: the verifier allows only word-sized context
/// accesses there, and a plain array copy may be lowered to byte loads.
#[inline(always)]
pub fn read_ip6(sa: &bpf_sock_addr) -> [u32; 4] {
    let mut ip = [0u32; 4];
    for (i, w) in ip.iter_mut().enumerate() {
        // SAFETY: an aligned in-bounds read of the context, kept word-sized by `read_volatile`.
        *w = unsafe { core::ptr::read_volatile(&sa.user_ip6[i]) };
    }
    ip
}

/// Writes `user_ip6` one 32-bit word at a time (see [`read_ip6`]); a memcpy into the context is
/// refused with "dereference of modified ctx ptr".
#[inline(always)]
pub fn write_ip6(sa: &mut bpf_sock_addr, ip: [u32; 4]) {
    for (i, w) in ip.iter().enumerate() {
        // SAFETY: an aligned in-bounds write of the context, kept word-sized by `write_volatile`.
        unsafe { core::ptr::write_volatile(&mut sa.user_ip6[i], *w) };
    }
}
