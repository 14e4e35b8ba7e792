//! The kernel side as the daemon sees it: finding cgroup v2, loading and attaching the programs,
//! and reading and writing their maps.

pub mod cgroup;
pub mod kernel_log;
pub mod loader;

/// The kernel object built by `build.rs`, aligned for the ELF parser.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

/// Turns an OS error from a BPF syscall into a sentence naming cause and fix.
pub fn explain_os_error(what: &str, err: &std::io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => format!(
            "{what} was refused by the kernel (permission denied): run as root or grant \
             CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and CAP_SYS_ADMIN"
        ),
        Some(libc::EINVAL) => format!(
            "{what} failed with EINVAL: the kernel does not support this program or attach \
             type; nodemesh needs Linux 5.15 or newer with BTF"
        ),
        Some(libc::ENOENT) => format!("{what} failed: the target does not exist ({err})"),
        _ => format!("{what} failed: {err}"),
    }
}
