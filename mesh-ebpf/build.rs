//! Emits `--cfg bpf_target_arch` for aya-ebpf when this crate is built for the host (clippy, the
//! library target mesh-daemon's build.rs depends on).
fn main() -> aya_build::Result<()> {
    aya_build::emit_bpf_target_arch_cfg()
}
