//! In-process emit: one pre-built message to 1, 10 and 100 synchronous handlers, on an exact
//! topic and through a wildcard. `cargo bench -p busbar --bench local`; figures in
//! docs/BENCHMARKS.md.

use std::hint::black_box;

use busbar::local::Bus;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn emit(c: &mut Criterion) {
    let mut g = c.benchmark_group("local_emit");
    for handlers in [1usize, 10, 100] {
        let bus = Bus::new();
        let regs: Vec<_> = (0..handlers)
            .map(|_| {
                bus.on("order.created", |m| {
                    black_box(m);
                })
                .unwrap()
            })
            .collect();
        // Unrelated subscriptions, which a good matcher does not pay for.
        let others: Vec<_> =
            (0..1000).map(|i| bus.on(format!("svc{i}.>").as_str(), |_| ()).unwrap()).collect();
        let message = bus.message("order.created", "payload").unwrap();
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("exact", handlers), &message, |b, m| {
            b.iter(|| black_box(bus.emit(black_box(m)).unwrap()))
        });
        drop((regs, others));
    }
    let bus = Bus::new();
    let _w = bus.on("order.>", |m| {
        black_box(m);
    });
    let message = bus.message("order.created", "payload").unwrap();
    g.bench_function("wildcard/1", |b| b.iter(|| black_box(bus.emit(black_box(&message)).unwrap())));
    g.finish();
}

criterion_group!(benches, emit);
criterion_main!(benches);
