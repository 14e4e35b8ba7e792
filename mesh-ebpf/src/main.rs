//! nodemesh's kernel programs: capture enrolled pods' connections and hand them to the node proxy.
//!
//! One file per hook; every map lives in `maps.rs`. Each entry point is a thin wrapper over a
//! `try_*` function, and every failure path lets the connection through untouched: a bug here must
//! never break a pod that is not enrolled.
#![no_std]
#![no_main]

mod connect;
mod getpeername;
mod ingress;
mod maps;
mod sockops;
mod splice;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach here; this only satisfies no_std.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
