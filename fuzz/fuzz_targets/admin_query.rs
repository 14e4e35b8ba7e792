//! The admin port's query strings: `/tap` filters and `/logging?level=` (checked and parsed into
//! the filter the daemon would install).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_daemon::{admin, tap::TapFilter};

fuzz_target!(|data: &[u8]| {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    let _ = TapFilter::parse(query);
    if let Some(level) = admin::logging_filter(query) {
        let _ = admin::log_filter(&level);
    }
});
