//! Fuzzes the NATS client-protocol parser: never panics, and what it consumes is never more than
//! the input.
#![no_main]

use busbar_core::nats::{self, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_control_line: 256, max_payload: 1024 };
    let mut rest = data;
    while let Ok(Some((_, used))) = nats::parse(rest, &limits) {
        assert!(used > 0 && used <= rest.len());
        rest = &rest[used..];
    }
});
