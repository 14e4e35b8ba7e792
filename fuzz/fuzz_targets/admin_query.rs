//! The admin port's query strings: `/tap` filters and `/logging?level=` (checked, then handed to
//! tracing's own filter parser as the daemon does).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_daemon::{admin, tap::TapFilter};

fuzz_target!(|data: &[u8]| {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    let _ = TapFilter::parse(query);
    if let Some(level) = admin::logging_filter(query)
        && admin::check_log_filter(&level).is_ok()
    {
        let _ = tracing_subscriber::EnvFilter::try_new(&level);
    }
});
