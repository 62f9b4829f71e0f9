//! A subscriber that never reads, while 200 MB are published: the broker's memory stays bounded,
//! the slow consumer is cut off (or its drops counted), and a fast subscriber gets everything.
//!
//! Its own test binary, one scenario per test run in sequence, so that the process's RSS is not
//! disturbed by other tests.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use busbar::{Client, ClientOptions, Status};
use busbar_broker::{Config, SlowConsumerPolicy};
use busbar_core::{Frame, Sub};
use common::*;

const MESSAGE: usize = 64 * 1024;
const PENDING_BYTES: usize = 8 * 1024 * 1024;
/// Allowance for everything that is not the broker's queues: the clients' buffers, the
/// allocator's slack, the test harness.
const MARGIN: u64 = 64 * 1024 * 1024;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("Linux /proc");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

struct Outcome {
    peak_growth: u64,
    received: u64,
}

/// Publishes `count` messages of 64 KiB to a fast subscriber and a raw subscriber that never
/// reads, with the publisher at most `window` messages ahead of the fast subscriber.
async fn flood(config: Config, count: u64) -> (busbar_broker::Broker, Raw, Outcome, [Client; 2]) {
    let broker = broker_with(config).await;
    let mut slow = Raw::hello(&broker).await;
    slow.send(Frame::Sub(Sub { sid: 1, pattern: "flood".into(), group: None, kind: Default::default() }))
        .await;
    slow.send(Frame::Ping).await;
    assert_eq!(slow.read().await, Some(Frame::Pong));
    // From here on `slow` reads nothing.

    let mut fast_options = ClientOptions::new(broker.local_addr().to_string());
    fast_options.subscription_capacity = 1024;
    let fast = Client::connect_with(fast_options).await.unwrap();
    let mut sub = fast.subscribe("flood").await.unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let r = received.clone();
    let consumer = tokio::spawn(async move {
        for i in 0..count {
            let m = tokio::time::timeout(PATIENCE, sub.next()).await.expect("next message in time").unwrap();
            assert_eq!(m.payload().len(), MESSAGE);
            assert_eq!(&m.payload()[..8], &i.to_be_bytes(), "in order, none lost");
            r.store(i + 1, Ordering::Relaxed);
        }
        assert_eq!(sub.dropped(), 0);
    });

    let mut pub_options = ClientOptions::new(broker.local_addr().to_string());
    pub_options.command_capacity = 16;
    let publisher = Client::connect_with(pub_options).await.unwrap();

    let baseline = rss_bytes();
    let peak = Arc::new(AtomicUsize::new(baseline as usize));
    let done = Arc::new(AtomicBool::new(false));
    let (p, d) = (peak.clone(), done.clone());
    let sampler = std::thread::spawn(move || {
        while !d.load(Ordering::Relaxed) {
            p.fetch_max(rss_bytes() as usize, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(5));
        }
    });

    let window = 64;
    let mut payload = vec![0u8; MESSAGE];
    for i in 0..count {
        while i >= received.load(Ordering::Relaxed) + window {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        payload[..8].copy_from_slice(&i.to_be_bytes());
        publisher.publish("flood", payload.clone()).await.unwrap();
    }
    tokio::time::timeout(PATIENCE * 6, consumer).await.expect("fast subscriber finishes").unwrap();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    assert_eq!(publisher.status(), Status::Connected);
    let peak_growth = (peak.load(Ordering::Relaxed) as u64).saturating_sub(baseline);
    let outcome = Outcome { peak_growth, received: received.load(Ordering::Relaxed) };
    (broker, slow, outcome, [fast, publisher])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumers_cannot_exhaust_the_broker() {
    // 200 MB with the default policy: the slow consumer is disconnected.
    let mut config = config();
    config.max_pending_bytes = PENDING_BYTES;
    let (broker, mut slow, outcome, _clients) = flood(config, 3200).await;
    assert_eq!(outcome.received, 3200);
    assert!(
        outcome.peak_growth < PENDING_BYTES as u64 + MARGIN,
        "RSS grew by {} MiB while 200 MiB went through; bound {} MiB + margin {} MiB",
        outcome.peak_growth >> 20,
        PENDING_BYTES >> 20,
        MARGIN >> 20
    );
    assert_eq!(broker.stats().slow_consumers, 1);
    // The slow consumer is cut off. The reason is written after what its socket still holds,
    // within a short grace; a reader this slow may find the connection closed without it, but
    // any error it does find is SlowConsumer.
    while let Some(frame) = slow.read().await {
        if let Frame::Error(e) = frame {
            assert_eq!(e.code, busbar::ErrorCode::SlowConsumer);
        }
    }
    eventually("slow consumer gone", || broker.stats().connections == 2).await;
    eprintln!("disconnect policy: RSS peak growth {} MiB for 200 MiB published", outcome.peak_growth >> 20);

    // 50 MB with the drop policy: the slow consumer stays, its drops are counted.
    let mut config = common::config();
    config.max_pending_bytes = PENDING_BYTES;
    config.slow_consumer = SlowConsumerPolicy::Drop;
    let (broker, _slow, outcome, _clients) = flood(config, 800).await;
    assert_eq!(outcome.received, 800);
    assert!(
        outcome.peak_growth < PENDING_BYTES as u64 + MARGIN,
        "RSS grew by {} MiB",
        outcome.peak_growth >> 20
    );
    let stats = broker.stats();
    assert_eq!(stats.slow_consumers, 0);
    assert!(stats.dropped > 0, "{stats:?}");
    assert_eq!(stats.connections, 3, "the slow consumer is kept under the drop policy");
    eprintln!("drop policy: {} messages dropped for the slow consumer", stats.dropped);

    // A subscriber to a rare topic that has stopped reading, among 256 MiB of others' traffic:
    // what it is owed is small (16 000 messages of 16 bytes), but each arrived in a read buffer
    // of 32 KiB with 16 KiB of others' messages. Queued as they came, they kept about 8 000
    // buffers alive (some 280 MiB, against the 800 kB its queue counts); once it has been
    // behind for a while it gets copies.
    let growth = rare_among_many(common::config(), 16_000).await;
    eprintln!("rare topic: RSS peak growth {} MiB for 256 MiB published", growth >> 20);
    assert!(growth < 64 << 20, "RSS grew by {} MiB", growth >> 20);
}

/// Publishes `rounds` of one 16-byte message on `rare` (whose raw subscriber never reads) and
/// sixteen of 1 KiB on `common` (read by a fast subscriber); returns the peak RSS growth.
async fn rare_among_many(config: Config, rounds: u64) -> u64 {
    let broker = broker_with(config).await;
    let mut slow = Raw::hello(&broker).await;
    slow.send(Frame::Sub(Sub { sid: 1, pattern: "rare".into(), group: None, kind: Default::default() }))
        .await;
    slow.send(Frame::Ping).await;
    assert_eq!(slow.read().await, Some(Frame::Pong));
    let fast = client(&broker).await;
    let mut sub = fast.subscribe("common").await.unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let r = received.clone();
    let total = rounds * 16;
    let consumer = tokio::spawn(async move {
        for _ in 0..total {
            tokio::time::timeout(PATIENCE, sub.next()).await.expect("next message in time").unwrap();
            r.fetch_add(1, Ordering::Relaxed);
        }
    });
    let publisher = client(&broker).await;
    // First 10 MiB for the rare subscriber: more than its socket's buffers hold, so that what
    // follows waits in its queue at the broker.
    let large = bytes::Bytes::from(vec![0u8; 64 * 1024]);
    for _ in 0..160 {
        publisher.publish("rare", large.clone()).await.unwrap();
    }
    publisher.flush().await.unwrap();
    let baseline = rss_bytes();
    let mut peak = baseline;
    let common = bytes::Bytes::from(vec![0u8; 1024]);
    for round in 0..rounds {
        publisher.publish("rare", "sixteen bytes!!!").await.unwrap();
        for _ in 0..16 {
            publisher.publish("common", common.clone()).await.unwrap();
        }
        if round % 64 == 63 {
            // At most 64 rounds ahead of the fast subscriber.
            while received.load(Ordering::Relaxed) + 64 * 16 < (round + 1) * 16 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            peak = peak.max(rss_bytes());
        }
    }
    tokio::time::timeout(PATIENCE * 6, consumer).await.expect("fast subscriber finishes").unwrap();
    peak = peak.max(rss_bytes());
    assert_eq!(broker.stats().slow_consumers, 0, "the rare subscriber is owed little");
    peak.saturating_sub(baseline)
}
