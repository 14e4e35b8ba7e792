//! `sk_msg` on the SOCKHASH: the optional same-host fast path. Messages a pod socket sends are
//! passed to the kernel's normal path for now and counted; splicing them straight into the peer
//! socket (`bpf_msg_redirect_hash`) is enabled by the data-path work behind `--sockmap on`, once
//! the proxy-side sockets are in the map.

use aya_ebpf::{bindings::sk_action::SK_PASS, macros::sk_msg, programs::SkMsgContext};
use mesh_common::Counter;

use crate::maps::count;

#[sk_msg]
pub fn nm_sk_msg(ctx: SkMsgContext) -> u32 {
    try_sk_msg(&ctx)
}

fn try_sk_msg(_ctx: &SkMsgContext) -> u32 {
    count(Counter::SkMsgSeen);
    SK_PASS
}
