//! What user space decodes from the kernel: a capture record (`OrigDst`, read from the map for
//! an accepted connection) admitted against the state, a STRICT deny event (`DenyEvent`, from
//! its ring buffer) and the workload id in a decision-log record, any bit pattern.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_common::OrigDst;
use mesh_daemon::{
    ebpf::kernel_log,
    proxy::{kernel_events, route},
};

fuzz_target!(|data: &[u8]| {
    let _ = kernel_events::parse(data);
    let _ = kernel_log::workload_id(&String::from_utf8_lossy(data));
    let size = std::mem::size_of::<OrigDst>();
    if data.len() < size + 8 {
        return;
    }
    // SAFETY: OrigDst is plain integers (repr(C)); every bit pattern is a value, and
    // read_unaligned copies out of the byte buffer without an alignment requirement.
    let rec: OrigDst = unsafe { std::ptr::read_unaligned(data.as_ptr().cast()) };
    let now = u64::from_le_bytes(data[size..size + 8].try_into().unwrap_or_default());
    let _ = route::orig_dst_addr(&rec);
    let _ = route::admit_record(nodemesh_fuzz::snapshot(), &rec, now);
});
