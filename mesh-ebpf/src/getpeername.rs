//! `cgroup/getpeername4` and `cgroup/getpeername6`: an app that asks whom it is connected to gets
//! the original destination, not the proxy, so the rewrite stays invisible.

use aya_ebpf::{
    helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use mesh_common::{AF_INET, Counter};

use crate::{
    connect::{Skip, write_ip6},
    maps::{ORIG_BY_COOKIE, config, count},
};

#[cgroup_sock_addr(getpeername4)]
pub fn nm_getpeername4(ctx: SockAddrContext) -> i32 {
    let _ = try_getpeername(&ctx, false);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn nm_getpeername6(ctx: SockAddrContext) -> i32 {
    let _ = try_getpeername(&ctx, true);
    1
}

fn try_getpeername(ctx: &SockAddrContext, v6: bool) -> Result<(), Skip> {
    let cfg = config().ok_or(Skip)?;
    // SAFETY: valid context for the duration of the run.
    let sa = unsafe { &mut *ctx.sock_addr };
    if !cfg.is_outbound_port(u32::from(u16::from_be(sa.user_port as u16))) {
        return Err(Skip);
    }
    // Only sockets that were captured have a record under their cookie.
    // SAFETY: a helper call on the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: copied out at once.
    let rec = unsafe { ORIG_BY_COOKIE.get(cookie) }.copied().ok_or(Skip)?;
    let port_be = u32::from((rec.port as u16).to_be());
    match (v6, rec.family == AF_INET) {
        (false, true) => sa.user_ip4 = rec.ip[0],
        // A dual-stack socket that reached an IPv4 destination sees it v4-mapped.
        (true, true) => write_ip6(sa, [0, 0, 0xffffu32.to_be(), rec.ip[0]]),
        (true, false) => write_ip6(sa, rec.ip),
        (false, false) => return Err(Skip),
    }
    sa.user_port = port_be;
    count(Counter::PeernameRestored);
    Ok(())
}
