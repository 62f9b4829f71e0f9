//! Fuzzes the NATS client-protocol parser and the header-block parser of HPUB: never panic, and
//! what is consumed is never more than the input.
#![no_main]

use busbar_core::nats::{self, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_control_line: 256, max_payload: 1024 };
    let mut rest = data;
    let _ = nats::headers::parse(data);
    while let Ok(Some((op, used))) = nats::parse(rest, &limits) {
        if let nats::ClientOp::Hpub { headers, .. } = op {
            let _ = nats::headers::parse(headers);
        }
        assert!(used > 0 && used <= rest.len());
        rest = &rest[used..];
    }
});
