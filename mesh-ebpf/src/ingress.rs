//! `cgroup_skb/ingress`: inbound enforcement for enrolled pods.
//!
//! A TCP SYN to an enrolled pod from any source other than the node proxy's mesh source block is
//! plaintext from outside the mesh. PERMISSIVE pods accept it (counted); STRICT pods drop it unless
//! it targets one of their declared probe ports (kubelet probes come from the node, not the mesh).
//! In sidecar mode the proxy's own listeners (marked with the proxy mark) are exempt.
//! Only connection attempts are judged: packets of established connections pass untouched, so
//! replies to the pod's own outbound connections are never affected; nor is the pod's own
//! loopback (127.0.0.0/8), so containers of one pod talk over localhost in STRICT mode too.

use aya_ebpf::{
    helpers::{bpf_sk_fullsock, bpf_skb_ancestor_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use mesh_common::{Counter, DenyEvent, ENROLL_STRICT, Enrollment, MAX_PROBE_PORTS};

use crate::maps::{config, count, deny_event, enrolled_ancestor_by};

const PASS: i32 = 1;
const DROP: i32 = 0;
const ETH_P_IP: u32 = 0x0800;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[cgroup_skb(ingress)]
pub fn nm_ingress(ctx: SkBuffContext) -> i32 {
    // A packet this program cannot parse is not a SYN it needs to judge.
    try_ingress(&ctx).unwrap_or(PASS)
}

fn try_ingress(ctx: &SkBuffContext) -> Option<i32> {
    // The context's protocol is the L3 ethertype in network byte order. IPv6 pods are refused
    // outbound by connect6 and not judged here yet.
    if u16::from_be(ctx.skb.protocol() as u16) as u32 != ETH_P_IP {
        return None;
    }
    let cfg = config()?;
    // cgroup_skb data starts at the IP header.
    let vihl: u8 = ctx.load(0).ok()?;
    if ctx.load::<u8>(9).ok()? != IPPROTO_TCP {
        return None;
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 {
        return None;
    }
    let flags: u8 = ctx.load(ihl + 13).ok()?;
    if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
        return None;
    }
    let (cgroup_id, enrollment) = enrolled_ancestor_of_skb(ctx)?;
    // Sidecar mode: the proxy lives in the pod, and a SYN to one of its own listeners (HBONE from
    // peers' sidecars, the outbound port from the app, metrics, health) is the mesh's business;
    // the proxy marks every listener, and checks mTLS itself where that applies.
    if cfg.proxy_mark != 0 && receiving_socket_mark(ctx) == Some(cfg.proxy_mark) {
        return None;
    }
    let saddr: u32 = ctx.load(12).ok()?;
    let mask = if cfg.mesh_source4_mask == 0 {
        u32::MAX
    } else {
        cfg.mesh_source4_mask
    };
    if cfg.mesh_source4 != 0 && saddr & mask == cfg.mesh_source4 {
        return None;
    }
    // The pod's own loopback (127.0.0.0/8, also what a v4-mapped ::ffff:127.x connect sends):
    // containers of one pod talking over localhost, never a packet from outside the pod (the
    // kernel drops 127/8 arriving on any other device as martian). Neither judged nor counted.
    if u32::from_be(saddr) >> 24 == 127 {
        return None;
    }
    let dport = u16::from_be(ctx.load::<u16>(ihl + 2).ok()?);
    if enrollment.flags & ENROLL_STRICT != 0 && !is_probe_port(&enrollment, dport) {
        count(Counter::InboundDenied);
        // Who knocked: an operator sees the pod, the port and the source, not only a count.
        let sport = ctx.load::<u16>(ihl).map_or(0, u16::from_be);
        deny_event(&DenyEvent {
            cgroup_id,
            saddr,
            sport,
            dport,
        });
        return Some(DROP);
    }
    count(Counter::InboundPlaintext);
    None
}

#[inline(always)]
fn is_probe_port(e: &Enrollment, port: u16) -> bool {
    let mut i = 0;
    while i < MAX_PROBE_PORTS {
        if e.probe_ports[i] != 0 && e.probe_ports[i] == port {
            return true;
        }
        i += 1;
    }
    false
}

/// `SO_MARK` of the (full) socket receiving this packet, if the kernel hands one over.
#[inline(always)]
fn receiving_socket_mark(ctx: &SkBuffContext) -> Option<u32> {
    // SAFETY: reading the context's `sk` field, which the verifier allows for cgroup_skb and
    // types as a nullable socket pointer; it is null-checked before the helper and the read.
    unsafe {
        let sk = (*ctx.skb.skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return None;
        }
        let full = bpf_sk_fullsock(sk);
        if full.is_null() {
            return None;
        }
        Some((*full).mark)
    }
}

/// The enrolled pod-level cgroup of the socket receiving this packet.
#[inline(always)]
fn enrolled_ancestor_of_skb(ctx: &SkBuffContext) -> Option<(u64, Enrollment)> {
    // SAFETY: a helper call on the program's own context.
    enrolled_ancestor_by(|level| unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb.cast(), level) })
}
