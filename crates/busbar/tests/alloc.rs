//! Emitting a pre-built message to a synchronous handler allocates nothing.
//!
//! The counting allocator sees every thread's allocations, so this test binary runs without the
//! libtest harness (`harness = false`): its `main` is the only thread. Under the harness, the
//! harness's thread could still be allocating (its bookkeeping for the test it just started)
//! while the test measured, now and then, on a loaded machine.

use std::alloc::System;
use std::hint::black_box;

use busbar::local::Bus;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

#[allow(clippy::print_stdout, reason = "a test binary without the harness reports its result itself")]
fn main() {
    emitting_a_prebuilt_message_to_one_handler_allocates_nothing();
    println!("alloc: emitting a prebuilt message to one handler allocates nothing ... ok");
}

fn emitting_a_prebuilt_message_to_one_handler_allocates_nothing() {
    let bus = Bus::new();
    let _exact = bus.on("order.created", |m| {
        black_box(m);
    });
    let message = bus.message("order.created", "payload").unwrap();
    // Warm up: the first load of the subscription table on a thread may set up thread-local state.
    assert_eq!(bus.emit(&message).unwrap().delivered, 1);

    let region = Region::new(GLOBAL);
    for _ in 0..1_000 {
        black_box(bus.emit(black_box(&message)).unwrap());
    }
    let stats = region.change();
    assert_eq!(stats.allocations, 0, "{stats:?}");
    assert_eq!(stats.reallocations, 0, "{stats:?}");

    // Through a wildcard subscription too.
    let _wild = bus.on("order.>", |m| {
        black_box(m);
    });
    assert_eq!(bus.emit(&message).unwrap().delivered, 2);
    let region = Region::new(GLOBAL);
    for _ in 0..1_000 {
        black_box(bus.emit(black_box(&message)).unwrap());
    }
    assert_eq!(region.change().allocations, 0);
}
