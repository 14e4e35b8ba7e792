//! Builds the kernel programs (mesh-ebpf, for bpfel-unknown-none with the nightly toolchain and
//! bpf-linker) so the daemon can embed the object. `cargo xtask setup` installs what this needs.
//!
//! With `AYA_BUILD_SKIP=1` (host-only checks) an empty object is written instead; the daemon then
//! refuses to load it with a message saying so.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../mesh-ebpf");
    let pkg = aya_build::Package {
        name: "mesh-ebpf",
        root_dir: root,
        ..Default::default()
    };
    let skip = std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v == "true");
    if skip {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("mesh");
        if !out.exists() {
            std::fs::write(&out, b"")?;
        }
        // aya-build would say it skipped as a `warning:`; skipping is what was asked.
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    // aya-build relays every line the nested cargo writes to stderr as a `warning:`, so its
    // progress ("Compiling core ...") read as warnings on a newcomer's first build. Quiet cargo
    // writes only real diagnostics (warnings and errors of the kernel crate), which still show.
    // SAFETY: the build script is single-threaded here; aya-build's threads start later.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf([pkg], aya_build::Toolchain::default()).context(
        "building the eBPF programs failed; run `cargo xtask setup` to install the nightly \
         toolchain, rust-src and bpf-linker (or set AYA_BUILD_SKIP=1 for host-only checks)",
    )
}
