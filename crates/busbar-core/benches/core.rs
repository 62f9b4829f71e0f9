//! Hot paths of the core crate: frame encode/decode and trie matching.
//!
//! `cargo bench -p busbar-core`; results are recorded in docs/BENCHMARKS.md.

use busbar_core::frame::{self, DEFAULT_MAX_FRAME_SIZE};
use busbar_core::{Frame, Message, SubscriptionTrie};
use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    for size in [16usize, 1024] {
        let msg = Message::new("event.email.new", vec![7u8; size]);
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("encode_msg", size), &msg, |b, msg| {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            b.iter(|| {
                frame::encode_msg(&mut buf, 1, black_box(msg), DEFAULT_MAX_FRAME_SIZE).unwrap();
                if buf.len() > 60 * 1024 {
                    buf.clear();
                }
            });
        });
        let mut encoded = BytesMut::new();
        Frame::Pub(msg.clone()).encode(&mut encoded, DEFAULT_MAX_FRAME_SIZE).unwrap();
        let encoded = encoded.freeze();
        g.bench_with_input(BenchmarkId::new("decode_pub", size), &encoded, |b, encoded| {
            b.iter(|| {
                let mut buf = BytesMut::from(&encoded[..]);
                black_box(frame::decode(&mut buf, DEFAULT_MAX_FRAME_SIZE).unwrap());
            });
        });
    }
    g.finish();
}

fn trie(c: &mut Criterion) {
    let mut g = c.benchmark_group("trie_match");
    for n in [1usize, 1_000, 100_000] {
        let mut t = SubscriptionTrie::new();
        // n subscriptions to other topics (a mix of literals and wildcards), plus the 3 that match.
        for i in 0..n {
            match i % 4 {
                0 => t.insert(&format!("svc{i}.orders.created"), i),
                1 => t.insert(&format!("svc{i}.*.created"), i),
                2 => t.insert(&format!("svc{i}.>"), i),
                _ => t.insert(&format!("tenant.{i}.orders.*"), i),
            }
        }
        t.insert("shop.orders.created", usize::MAX);
        t.insert("shop.*.created", usize::MAX - 1);
        t.insert("shop.>", usize::MAX - 2);
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::from_parameter(n), &t, |b, t| {
            b.iter(|| {
                let mut hits = 0usize;
                t.for_each_match(black_box("shop.orders.created"), |_| hits += 1);
                assert_eq!(hits, 3);
            });
        });
    }
    g.finish();
}

criterion_group!(benches, codec, trie);
criterion_main!(benches);
