//! Faults: a broker that dies and comes back, silent connections, many malformed peers, drain.
//! Every wait is bounded (PATIENCE) and every loop has a fixed count.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use busbar::{Client, ClientOptions, Error, ErrorCode, EventBus, OfflinePolicy, Status};
use busbar_broker::{Broker, Config};
use busbar_core::frame::{self, DEFAULT_MAX_FRAME_SIZE};
use busbar_core::{Frame, Hello, Message};
use common::proxy::Proxy;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LONG: Duration = Duration::from_secs(60);

fn fast_reconnect(addr: impl Into<String>) -> ClientOptions {
    let mut o = ClientOptions::new(addr);
    o.reconnect.initial_delay = Duration::from_millis(10);
    o.reconnect.max_delay = Duration::from_millis(100);
    o
}

/// A flush on a task of its own, to be looked at while it waits.
fn flush_in_background(client: &Client) -> tokio::task::JoinHandle<busbar::Result<()>> {
    let client = client.clone();
    tokio::spawn(async move { client.flush().await })
}

async fn wait_status(client: &Client, want: Status) {
    let mut w = client.status_watch();
    tokio::time::timeout(PATIENCE, w.wait_for(|s| *s == want))
        .await
        .unwrap_or_else(|_| panic!("status {want:?} in time, still {:?}", client.status()))
        .unwrap();
}

#[tokio::test]
async fn a_broker_restarted_on_the_same_port_gets_its_clients_back() {
    let broker = broker().await;
    let addr = broker.local_addr();
    let service = Client::connect_with(fast_reconnect(addr.to_string())).await.unwrap();
    let mut events = service.subscribe("jobs.>").await.unwrap();
    let _responder = service.respond("jobs.status", |_| async { Ok::<_, String>("all good") }).await.unwrap();
    let old_id = service.service_id();

    broker.stop().await;
    wait_status(&service, Status::Reconnecting).await;
    // Published while the broker is down: buffered, sent on reconnect (after the subscriptions,
    // so this client sees its own message).
    service.publish("jobs.offline", "buffered").await.unwrap();
    eventually("the publish is buffered", || service.buffered() == 1).await;
    assert!(matches!(service.request("jobs.status", "", LONG).await, Err(Error::ConnectionLost)));

    let broker = Broker::start(Config::with_listen(addr)).await.expect("rebind the same port");
    wait_status(&service, Status::Connected).await;
    assert_eq!(events.next().await.unwrap().payload_str(), Some("buffered"));
    assert_eq!(service.buffered(), 0);
    let _ = old_id; // a new broker assigns ids afresh; the client reports the current one
    assert_eq!(broker.stats().connections, 1);

    // Subscriptions and responders work again without any user code.
    let other = client(&broker).await;
    other.publish("jobs.new", "after restart").await.unwrap();
    assert_eq!(events.next().await.unwrap().payload_str(), Some("after restart"));
    let reply = other.request("jobs.status", "", LONG).await.unwrap();
    assert_eq!(reply.payload_str(), Some("all good"));
    assert_eq!(broker.stats().subscriptions, 2);
}

/// A flush while the broker is down answers once the next connection has sent what was
/// published meanwhile, and the broker has handled it.
#[tokio::test]
async fn a_flush_while_offline_answers_once_the_next_connection_has_sent_the_buffer() {
    let broker = broker().await;
    let addr = broker.local_addr();
    let c = Client::connect_with(fast_reconnect(addr.to_string())).await.unwrap();
    let mut sub = c.subscribe("kept").await.unwrap();
    broker.stop().await;
    wait_status(&c, Status::Reconnecting).await;
    c.publish("kept", "1").await.unwrap();
    let flushing = flush_in_background(&c);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!flushing.is_finished(), "nothing to flush to yet: it waits");
    let _broker = Broker::start(Config::with_listen(addr)).await.expect("rebind the same port");
    tokio::time::timeout(PATIENCE, flushing).await.expect("flushed once back").unwrap().unwrap();
    assert_eq!(c.buffered(), 0);
    let m = tokio::time::timeout(PATIENCE, sub.next()).await.unwrap().unwrap();
    assert_eq!(m.payload_str(), Some("1"));
}

/// A flush reports what may have gone missing since the last one: publishes written into a
/// connection that was then lost (never confirmed), or dropped by a full offline buffer. The
/// flush after it is clean.
#[tokio::test]
async fn a_flush_after_a_loss_or_a_drop_says_so_once() {
    let broker = broker().await;
    let proxy = Proxy::start(broker.local_addr()).await;
    let mut options = fast_reconnect(proxy.addr().to_string());
    options.offline_buffer = 1;
    options.offline_policy = OfflinePolicy::DropOldest;
    let c = Client::connect_with(options).await.unwrap();
    let watcher = client(&broker).await;
    let mut seen = watcher.subscribe("w").await.unwrap();
    // Written (the watcher got it), not confirmed by a flush, then the connection is cut.
    c.publish("w", "written").await.unwrap();
    assert_eq!(seen.next().await.unwrap().payload_str(), Some("written"));
    proxy.cut();
    wait_status(&c, Status::Reconnecting).await;
    wait_status(&c, Status::Connected).await;
    let lost = tokio::time::timeout(PATIENCE, c.flush()).await.unwrap();
    assert!(matches!(lost, Err(Error::ConnectionLost)), "{lost:?}");
    tokio::time::timeout(PATIENCE, c.flush()).await.unwrap().expect("then clean");

    // Two published while offline into a buffer of one: the oldest is dropped.
    proxy.pause();
    proxy.cut();
    wait_status(&c, Status::Reconnecting).await;
    c.publish("w", "dropped").await.unwrap();
    c.publish("w", "kept").await.unwrap();
    let flushing = flush_in_background(&c);
    proxy.resume();
    let dropped = tokio::time::timeout(PATIENCE, flushing).await.unwrap().unwrap();
    assert!(matches!(dropped, Err(Error::BufferFull { capacity: 1 })), "{dropped:?}");
    assert_eq!(seen.next().await.unwrap().payload_str(), Some("kept"));
    tokio::time::timeout(PATIENCE, c.flush()).await.unwrap().expect("then clean");
}

#[tokio::test]
async fn a_message_buffered_offline_too_large_for_the_new_broker_is_dropped_alone() {
    let broker = broker().await;
    let addr = broker.local_addr();
    let c = Client::connect_with(fast_reconnect(addr.to_string())).await.unwrap();
    let mut events = c.subscribe("up.>").await.unwrap();
    broker.stop().await;
    wait_status(&c, Status::Reconnecting).await;
    // Within the first broker's limit (1 MiB), not the next one's (64 KiB).
    c.publish("up.big", vec![7u8; 200 * 1024]).await.unwrap();
    c.publish("up.small", "still here").await.unwrap();
    eventually("both buffered", || c.buffered() == 2).await;

    let config = Config { max_frame_size: 64 * 1024, ..Config::with_listen(addr) };
    let broker = Broker::start(config).await.expect("rebind the same port");
    wait_status(&c, Status::Connected).await;
    // The large one is dropped; the one after it arrives, on a connection that stays up.
    let first = tokio::time::timeout(PATIENCE, events.next()).await.unwrap().unwrap();
    assert_eq!(first.topic(), "up.small");
    c.publish("up.later", "after").await.unwrap();
    let next = tokio::time::timeout(PATIENCE, events.next()).await.unwrap().unwrap();
    assert_eq!(next.payload_str(), Some("after"));
    assert_eq!(c.status(), Status::Connected);
    assert_eq!(broker.stats().connections, 1);
}

#[tokio::test]
async fn a_request_made_while_offline_fails_and_is_never_run_later() {
    let broker = broker().await;
    let addr = broker.local_addr();
    let calls = Arc::new(AtomicUsize::new(0));
    let responder = Client::connect_with(fast_reconnect(addr.to_string())).await.unwrap();
    let counted = calls.clone();
    let _h = responder
        .respond("jobs.run", move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, String>("done") }
        })
        .await
        .unwrap();
    let requester = Client::connect_with(fast_reconnect(addr.to_string())).await.unwrap();
    broker.stop().await;
    wait_status(&requester, Status::Reconnecting).await;
    assert!(matches!(requester.request("jobs.run", "offline", LONG).await, Err(Error::ConnectionLost)));
    requester.publish("jobs.note", "buffered").await.unwrap();
    eventually("only the publish is buffered", || requester.buffered() == 1).await;

    let _broker = Broker::start(Config::with_listen(addr)).await.expect("rebind the same port");
    wait_status(&requester, Status::Connected).await;
    wait_status(&responder, Status::Connected).await;
    let reply = tokio::time::timeout(PATIENCE, async {
        loop {
            match requester.request("jobs.run", "online", LONG).await {
                Err(Error::NoResponders { .. }) => tokio::time::sleep(Duration::from_millis(10)).await,
                other => return other,
            }
        }
    })
    .await
    .expect("the responder is back in time");
    assert_eq!(reply.unwrap().payload_str(), Some("done"));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the request that failed offline never ran");
}

#[tokio::test]
async fn clients_fail_over_to_another_broker_on_shutdown() {
    let a = broker().await;
    let b = broker().await;
    let options = fast_reconnect(a.local_addr().to_string()).server(b.local_addr().to_string());
    let c = Client::connect_with(options).await.unwrap();
    let mut sub = c.subscribe("x").await.unwrap();
    a.stop().await; // tells the client ShuttingDown, then closes
    wait_status(&c, Status::Connected).await;
    eventually("subscription restored on b", || b.stats().subscriptions == 1).await;
    let other = client(&b).await;
    other.publish("x", "on b").await.unwrap();
    assert_eq!(sub.next().await.unwrap().payload_str(), Some("on b"));
}

#[tokio::test]
async fn a_paused_connection_is_found_by_the_broker_heartbeat_and_cleaned_up() {
    let mut config = config();
    config.heartbeat_interval = Duration::from_millis(100);
    config.heartbeat_max_missed = 2;
    let broker = broker_with(config).await;
    let proxy = Proxy::start(broker.local_addr()).await;
    let mut options = ClientOptions::new(proxy.addr().to_string()).no_reconnect();
    options.heartbeat_interval = Duration::ZERO; // only the broker watches
    let victim = Client::connect_with(options).await.unwrap();
    let _sub = victim.subscribe("a.>").await.unwrap();
    let mut held = victim.requests("work").await.unwrap();
    let requester = client(&broker).await;
    let r = requester.clone();
    let pending = tokio::spawn(async move { r.request("work", "", LONG).await });
    let _request = held.next().await.unwrap();
    assert_eq!(broker.stats().subscriptions, 2);

    proxy.pause();
    // Within interval × (max missed + 1) (plus one check period), the broker gives up on it: its
    // subscriptions go, and the request it owed fails at once instead of after a minute.
    eventually("paused connection cleaned up", || {
        let s = broker.stats();
        s.connections == 1 && s.subscriptions == 0
    })
    .await;
    let answer = tokio::time::timeout(PATIENCE, pending).await.unwrap().unwrap();
    assert_eq!(answer.unwrap_err().code(), Some(ErrorCode::ResponderLost));
}

#[tokio::test]
async fn a_silent_broker_is_found_by_the_client_heartbeat() {
    let broker = broker().await;
    let proxy = Proxy::start(broker.local_addr()).await;
    let mut options = fast_reconnect(proxy.addr().to_string());
    options.heartbeat_interval = Duration::from_millis(100);
    let c = Client::connect_with(options).await.unwrap();
    let mut sub = c.subscribe("ping.>").await.unwrap();
    proxy.pause();
    wait_status(&c, Status::Reconnecting).await;
    proxy.resume(); // the old connection is abandoned; a new one is made through the proxy
    wait_status(&c, Status::Connected).await;
    eventually("old connection gone, new one subscribed", || {
        let s = broker.stats();
        s.connections == 1 && s.subscriptions == 1
    })
    .await;
    client(&broker).await.publish("ping.back", "hi").await.unwrap();
    assert_eq!(sub.next().await.unwrap().payload_str(), Some("hi"));
}

/// A reconnect attempt that hangs (a broker that accepts and says nothing, until the connect
/// timeout) does not hold the handles: publishes are buffered and disconnect returns.
#[tokio::test]
async fn commands_are_taken_while_a_reconnect_attempt_hangs() {
    let broker = broker().await;
    let proxy = Proxy::start(broker.local_addr()).await;
    let mut options = fast_reconnect(proxy.addr().to_string());
    options.connect_timeout = Duration::from_secs(3600);
    options.command_capacity = 4;
    let c = Client::connect_with(options).await.unwrap();
    proxy.pause();
    proxy.cut();
    wait_status(&c, Status::Reconnecting).await;
    // An attempt is under way (a few ms of backoff) and hangs: its HELLO is held.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let handles = async {
        for i in 0..64 {
            c.publish("held", format!("{i}")).await.unwrap();
        }
        c.disconnect().await.unwrap();
    };
    tokio::time::timeout(PATIENCE, handles).await.expect("not held until the connect timeout");
    assert_eq!(c.status(), Status::Disconnected);
}

#[tokio::test]
async fn a_cut_connection_comes_back_and_flushes_what_was_published_meanwhile() {
    let broker = broker().await;
    let proxy = Proxy::start(broker.local_addr()).await;
    let c = Client::connect_with(fast_reconnect(proxy.addr().to_string())).await.unwrap();
    let mut sub = c.subscribe("n").await.unwrap();
    for round in 0..3 {
        proxy.cut();
        // A publish into a connection that is being cut may be lost (at most once), so wait
        // until the client has noticed and is back.
        wait_status(&c, Status::Reconnecting).await;
        wait_status(&c, Status::Connected).await;
        c.publish("n", format!("{round}")).await.unwrap();
        let m = tokio::time::timeout(PATIENCE, sub.next()).await.unwrap().unwrap();
        assert_eq!(m.payload_str(), Some(format!("{round}").as_str()));
    }
}

/// Two clients left offline for the test by a broker that stops, their offline buffers set by
/// `bound`: one refusing publishes when it is full, one dropping its oldest.
async fn offline_pair(bound: impl Fn(&mut ClientOptions)) -> (Client, Client) {
    let broker = broker().await;
    let mut options = fast_reconnect(broker.local_addr().to_string());
    bound(&mut options);
    options.reconnect.initial_delay = Duration::from_secs(3600); // stay offline for the test
    options.reconnect.max_delay = Duration::from_secs(3600);
    let refusing = Client::connect_with(options.clone()).await.unwrap();
    options.offline_policy = OfflinePolicy::DropOldest;
    let dropping = Client::connect_with(options).await.unwrap();
    broker.stop().await;
    wait_status(&refusing, Status::Reconnecting).await;
    wait_status(&dropping, Status::Reconnecting).await;
    (refusing, dropping)
}

#[tokio::test]
async fn the_offline_buffer_is_bounded() {
    let (refusing, dropping) = offline_pair(|o| o.offline_buffer = 5).await;
    for i in 0..5 {
        refusing.publish("t", vec![i]).await.unwrap();
    }
    eventually("5 buffered", || refusing.buffered() == 5).await;
    assert!(matches!(refusing.publish("t", "6th").await, Err(Error::BufferFull { capacity: 5 })));
    for i in 0..20 {
        dropping.publish("t", vec![i]).await.unwrap();
    }
    dropping.subscribe("barrier").await.unwrap(); // handled after every publish before it
    assert_eq!(dropping.buffered(), 5);
    // A flush while offline waits for the next connection; a disconnect meanwhile ends it.
    let flushing = flush_in_background(&dropping);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!flushing.is_finished(), "nothing to flush to: it waits");
    dropping.disconnect().await.unwrap();
    let flushed = tokio::time::timeout(PATIENCE, flushing).await.unwrap().unwrap();
    assert!(matches!(flushed, Err(Error::Closed)), "{flushed:?}");
}

#[tokio::test]
async fn the_offline_buffer_is_bounded_in_bytes_too() {
    let (refusing, dropping) = offline_pair(|o| o.offline_buffer_bytes = 10_000).await;
    // Frames of about 1 050 bytes: 9 fit in 10 000.
    let mut kept = 0;
    loop {
        match refusing.publish("t", vec![0u8; 1000]).await {
            Ok(()) => {
                kept += 1;
                // The handle learns of the room left once the task has buffered it.
                eventually("buffered", || refusing.buffered() == kept).await;
            }
            Err(Error::BufferFull { .. }) => break,
            Err(e) => panic!("{e:?}"),
        }
        assert!(kept <= 9, "over the byte bound");
    }
    assert_eq!(kept, 9);
    for i in 0..50 {
        dropping.publish("t", vec![i; 1000]).await.unwrap();
    }
    // Larger than the whole buffer: not kept, and nothing is evicted for it.
    dropping.publish("t", vec![0u8; 20_000]).await.unwrap();
    dropping.subscribe("barrier").await.unwrap(); // handled after every publish before it
    assert_eq!(dropping.buffered(), 9);
}

#[tokio::test]
async fn a_thousand_malformed_peers_each_get_an_error_and_a_close_while_a_good_client_loses_nothing() {
    let broker = broker().await;
    let addr = broker.local_addr();
    let publisher = client(&broker).await;
    let subscriber = client(&broker).await;
    let mut sub = subscriber.subscribe("steady").await.unwrap();
    let good = tokio::spawn(async move {
        for i in 0..2000u32 {
            publisher.publish("steady", i.to_be_bytes().to_vec()).await.unwrap();
            if i.is_multiple_of(100) {
                tokio::task::yield_now().await;
            }
        }
        publisher
    });

    let mut seed = 0x5eed_u64;
    let mut attacks = Vec::new();
    for i in 0..1000usize {
        attacks.push((i.is_multiple_of(2), malformed(i, &mut seed)));
    }
    let mut codes = std::collections::HashMap::new();
    for chunk in attacks.chunks(50) {
        let mut tasks = Vec::new();
        for (hello_first, bytes) in chunk.iter().cloned() {
            tasks.push(tokio::spawn(async move { attack(addr, hello_first, bytes).await }));
        }
        for t in tasks {
            *codes.entry(t.await.unwrap()).or_insert(0) += 1;
        }
    }
    assert_eq!(codes.values().sum::<i32>(), 1000);
    assert!(
        codes.keys().all(|c| matches!(
            c,
            ErrorCode::MalformedFrame | ErrorCode::FrameTooLarge | ErrorCode::UnsupportedVersion
        )),
        "{codes:?}"
    );

    let publisher = good.await.unwrap();
    for i in 0..2000u32 {
        let m = tokio::time::timeout(PATIENCE, sub.next()).await.unwrap().unwrap();
        assert_eq!(&m.payload()[..], &i.to_be_bytes(), "in order, none lost");
    }
    publisher.flush().await.unwrap();
    eventually("only the two good clients remain", || broker.stats().connections == 2).await;
    assert_eq!(sub.dropped(), 0);
}

/// One malformed frame, of several kinds, built from a valid one or from random bytes.
fn malformed(i: usize, seed: &mut u64) -> Vec<u8> {
    let mut next = || {
        *seed = busbar_core::group::mix(seed.wrapping_add(0x9e37_79b9_7f4a_7c15));
        *seed
    };
    let mut valid =
        Frame::Pub(Message::new("a.b", vec![7u8; (next() % 64) as usize])).to_bytes().unwrap().to_vec();
    match i % 8 {
        0 => {
            // Random garbage whose magic is certainly wrong.
            let mut g: Vec<u8> = (0..64).map(|_| next() as u8).collect();
            g[4] = b'x';
            g
        }
        1 => {
            valid[4] ^= 0xff; // magic
            valid
        }
        2 => {
            valid[6] = 2 + (next() % 200) as u8; // version
            valid
        }
        3 => {
            valid[7] = 0x8f; // unknown control command
            valid
        }
        4 => {
            valid[24] = 0xff; // topic length past the end
            valid
        }
        5 => {
            valid[26] = 0xff; // topic not UTF-8
            valid
        }
        6 => {
            // Length prefix beyond the maximum frame size.
            valid[..4].copy_from_slice(
                &((DEFAULT_MAX_FRAME_SIZE as u32) + 1 + (next() as u32 % 1000)).to_be_bytes(),
            );
            valid
        }
        _ => {
            // A PING with trailing bytes.
            let mut ping = Frame::Ping.to_bytes().unwrap().to_vec();
            let extra = 1 + (next() % 8) as usize;
            ping.extend(std::iter::repeat_n(0u8, extra));
            let len = (ping.len() - 4) as u32;
            ping[..4].copy_from_slice(&len.to_be_bytes());
            ping
        }
    }
}

/// Sends `bytes` (after a HELLO, or instead of it) and returns the ERROR code the broker
/// answers with, asserting that it then closes the connection.
async fn attack(addr: std::net::SocketAddr, hello_first: bool, bytes: Vec<u8>) -> ErrorCode {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    if hello_first {
        let hello = Frame::Hello(Hello { name: "attacker".into(), properties: Default::default() });
        stream.write_all(&hello.to_bytes().unwrap()).await.unwrap();
    }
    let _ = stream.write_all(&bytes).await;
    let mut code = None;
    tokio::time::timeout(PATIENCE, async {
        loop {
            while let Some(f) = frame::decode(&mut buf, DEFAULT_MAX_FRAME_SIZE).unwrap() {
                match f {
                    Frame::Welcome(_) => {}
                    Frame::Error(e) => code = Some(e.code),
                    other => panic!("unexpected {other:?}"),
                }
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the broker closes the connection");
    code.expect("an ERROR frame before the close")
}

#[tokio::test]
async fn drain_lets_handlers_finish_what_they_were_given() {
    let broker = broker().await;
    let worker = client(&broker).await;
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let _task = worker
        .subscribe_with("slow.job", move |_| {
            let h = h.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                h.fetch_add(1, Ordering::Relaxed);
            }
        })
        .await
        .unwrap();
    let producer = client(&broker).await;
    for _ in 0..50 {
        producer.publish("slow.job", "").await.unwrap();
    }
    producer.flush().await.unwrap();
    worker.flush().await.unwrap(); // all 50 are in the worker's buffer now
    worker.drain(PATIENCE).await.unwrap();
    assert_eq!(handled.load(Ordering::Relaxed), 50, "every delivered message was handled");
    assert_eq!(worker.status(), Status::Disconnected);
    eventually("worker gone from the broker", || broker.stats().subscriptions == 0).await;
}

#[tokio::test]
async fn a_silent_raw_peer_is_pinged_then_closed_as_stale() {
    let mut config = config();
    config.heartbeat_interval = Duration::from_millis(50);
    let broker = broker_with(config).await;
    let mut raw = Raw::connect(&broker).await;
    raw.send(Frame::Hello(Hello { name: "silent".into(), properties: Default::default() })).await;
    match raw.read().await {
        Some(Frame::Welcome(w)) => assert_eq!(w.heartbeat_ms, 50),
        other => panic!("{other:?}"),
    }
    assert_eq!(raw.read().await, Some(Frame::Ping), "pinged after one quiet interval");
    assert_eq!(raw.expect_error().await.code, ErrorCode::StaleConnection);
    raw.expect_closed().await;
}

#[tokio::test]
async fn with_one_missed_heartbeat_allowed_a_peer_that_answers_its_pings_stays() {
    // max_missed = 1 once closed a quiet connection at the very check that should have pinged it.
    let mut config = config();
    config.heartbeat_interval = Duration::from_millis(50);
    config.heartbeat_max_missed = 1;
    let broker = broker_with(config).await;
    let mut raw = Raw::hello(&broker).await;
    for _ in 0..5 {
        assert_eq!(raw.read().await, Some(Frame::Ping), "pinged, not closed");
        raw.send(Frame::Pong).await;
    }
    assert_eq!(broker.stats().connections, 1);
    // And silent, it is closed after its one ping goes unanswered.
    assert_eq!(raw.read().await, Some(Frame::Ping));
    assert_eq!(raw.expect_error().await.code, ErrorCode::StaleConnection);
}

#[tokio::test]
async fn a_subscription_refused_after_a_reconnect_ends_alone_and_fails_no_flush() {
    let broker = broker().await;
    let addr = broker.local_addr();
    let c = Client::connect_with(fast_reconnect(addr.to_string()).user("ana", "s3cret")).await.unwrap();
    let mut kept = c.subscribe("keep").await.unwrap();
    let mut refused = c.subscribe("refuse").await.unwrap();
    broker.stop().await;
    wait_status(&c, Status::Reconnecting).await;
    // The new broker lets this user subscribe to "keep" only: "refuse", sent again, is refused.
    let only_keep = busbar_broker::Permissions {
        subscribe: busbar_broker::Rules::only(["keep"]),
        ..busbar_broker::Permissions::default()
    };
    let ana = busbar_broker::User {
        name: "ana".into(),
        password_hash: busbar_broker::hash_password("s3cret"),
        permissions: Some(only_keep),
    };
    let auth = busbar_broker::AuthConfig { users: vec![ana], ..busbar_broker::AuthConfig::default() };
    let config = Config { auth, ..Config::with_listen(addr) };
    let _broker = Broker::start(config).await.expect("rebind the same port");
    wait_status(&c, Status::Connected).await;
    let ended = tokio::time::timeout(PATIENCE, refused.next()).await.expect("the refused stream ends");
    assert!(ended.is_none());
    // That refusal is not the application's publishes': flush succeeds, and the other works.
    c.flush().await.unwrap();
    c.publish("keep", "still").await.unwrap();
    assert_eq!(
        tokio::time::timeout(PATIENCE, kept.next()).await.unwrap().unwrap().payload_str(),
        Some("still")
    );
    c.flush().await.unwrap();
}

#[tokio::test]
async fn a_subscribe_given_up_before_its_confirmation_leaves_no_subscription() {
    let broker = broker().await;
    let proxy = Proxy::start(broker.local_addr()).await;
    let mut options = ClientOptions::new(proxy.addr().to_string()).no_reconnect();
    options.heartbeat_interval = Duration::ZERO;
    let c = Client::connect_with(options).await.unwrap();
    // The confirmation is held back, and the caller stops waiting for it.
    proxy.pause();
    let pattern = busbar::Pattern::new("jobs").group("workers", busbar::GroupPolicy::RoundRobin);
    let gave_up = tokio::time::timeout(Duration::from_millis(50), c.subscribe(pattern)).await;
    assert!(gave_up.is_err(), "still waiting for the PONG");
    proxy.resume();
    // Everything before this flush's PING is done at the broker once it returns: the SUB, and
    // the UNSUB of the member nobody reads (which would otherwise take every other job).
    c.flush().await.unwrap();
    eventually("the abandoned member gone", || broker.stats().subscriptions == 0).await;
    let other = client(&broker).await;
    let mut worker = other
        .subscribe(busbar::Pattern::new("jobs").group("workers", busbar::GroupPolicy::RoundRobin))
        .await
        .unwrap();
    for i in 0..4 {
        other.publish("jobs", format!("{i}")).await.unwrap();
    }
    for i in 0..4 {
        let m = tokio::time::timeout(PATIENCE, worker.next()).await.unwrap().unwrap();
        assert_eq!(m.payload_str(), Some(format!("{i}").as_str()), "every job reaches the live member");
    }
}
