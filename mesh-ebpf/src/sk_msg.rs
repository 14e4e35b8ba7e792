//! `sk_msg` on the SOCKHASH: the optional same-host fast path's hook. It counts and passes; nothing
//! is spliced. `--sockmap on` (which puts pod sockets in the map) is refused by the daemon: on this
//! kernel a socket in a sockhash gets `tcp_bpf_recvmsg`, which returns EAGAIN to blocking readers
//! on spurious wake-ups (see ARCHITECTURE.md). A working splice must keep pod sockets out of the map.

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
