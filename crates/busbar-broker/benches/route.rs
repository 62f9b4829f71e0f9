//! Broker routing per message: trie match plus one `try_send` per subscriber, with 1 000
//! subscriptions to other topics. `cargo bench -p busbar-broker --bench route`.

use std::hint::black_box;

use busbar_broker::bench_support::RoutingBench;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn route(c: &mut Criterion) {
    let mut g = c.benchmark_group("broker_route");
    for subscribers in [1u32, 4, 16] {
        let mut bench = RoutingBench::new(subscribers, 1000);
        assert_eq!(bench.route_one(), subscribers as usize);
        g.throughput(Throughput::Elements(u64::from(subscribers)));
        g.bench_function(BenchmarkId::from_parameter(subscribers), |b| {
            b.iter(|| black_box(bench.route_one()))
        });
    }
    g.finish();
}

criterion_group!(benches, route);
criterion_main!(benches);
