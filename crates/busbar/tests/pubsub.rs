//! Publish/subscribe over a real broker on 127.0.0.1:0 with real clients.

mod common;

use std::collections::HashSet;

use busbar::{Client, ClientOptions, Error, ErrorCode, EventBus, Status};
use busbar_core::{Frame, Message, Sub};
use common::*;
use serde::{Deserialize, Serialize};

#[tokio::test]
async fn fan_out_reaches_every_subscriber_in_order() {
    let broker = broker().await;
    let publisher = client(&broker).await;
    let mut subs = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..5 {
        let c = client(&broker).await;
        subs.push(c.subscribe("orders.created").await.unwrap());
        clients.push(c);
    }
    for i in 0..200u32 {
        publisher.publish("orders.created", i.to_be_bytes().to_vec()).await.unwrap();
    }
    for sub in &mut subs {
        for i in 0..200u32 {
            let m = tokio::time::timeout(PATIENCE, sub.next()).await.unwrap().unwrap();
            assert_eq!(m.topic(), "orders.created");
            assert_eq!(&m.payload()[..], &i.to_be_bytes());
            assert_eq!(m.source(), publisher.service_id());
        }
    }
    assert_eq!(broker.stats().deliveries, 1000);
}

/// Publishes each topic, then makes sure everything routed to `sub` has arrived, and returns the
/// topics it received.
async fn received(publisher: &Client, subscriber: &Client, sub: &mut busbar::Subscription) -> Vec<String> {
    publisher.flush().await.unwrap(); // the broker has routed every publish…
    subscriber.flush().await.unwrap(); // …and this PONG queued behind the deliveries has arrived
    let mut got = Vec::new();
    while let Some(m) = sub.try_next() {
        got.push(m.topic().to_string());
    }
    got
}

#[tokio::test]
async fn wildcards_match_one_token_or_the_rest() {
    let broker = broker().await;
    let publisher = client(&broker).await;
    let subscriber = client(&broker).await;
    let cases: [(&str, &[&str]); 5] = [
        ("event.*", &["event.email", "event.sms"]),
        ("event.>", &["event.email", "event.sms", "event.email.new", "event.sms.sent.ok"]),
        ("event.*.new", &["event.email.new"]),
        ("*.email.>", &["event.email.new"]),
        (">", &["event", "event.email", "event.sms", "event.email.new", "event.sms.sent.ok", "other"]),
    ];
    let mut subs = Vec::new();
    for (pattern, _) in &cases {
        subs.push(subscriber.subscribe(*pattern).await.unwrap());
    }
    for topic in ["event", "event.email", "event.sms", "event.email.new", "event.sms.sent.ok", "other"] {
        publisher.publish(topic, "x").await.unwrap();
    }
    for ((pattern, want), sub) in cases.iter().zip(&mut subs) {
        let got = received(&publisher, &subscriber, sub).await;
        assert_eq!(got, want.to_vec(), "pattern {pattern}");
    }
}

#[tokio::test]
async fn overlapping_subscriptions_get_one_copy_each_tagged_with_their_id() {
    let broker = broker().await;
    let c = client(&broker).await;
    let mut star = c.subscribe("a.*").await.unwrap();
    let mut rest = c.subscribe("a.>").await.unwrap();
    c.publish("a.b", "x").await.unwrap();
    let m1 = star.next().await.unwrap();
    let m2 = rest.next().await.unwrap();
    assert_eq!(m1.subscription_id(), star.id());
    assert_eq!(m2.subscription_id(), rest.id());
    assert_ne!(star.id(), rest.id());
    c.flush().await.unwrap();
    assert!(star.try_next().is_none() && rest.try_next().is_none(), "exactly one copy per subscription");
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let broker = broker().await;
    let publisher = client(&broker).await;
    let subscriber = client(&broker).await;
    let mut sub = subscriber.subscribe("t").await.unwrap();
    let mut other = subscriber.subscribe("t").await.unwrap();
    publisher.publish("t", "before").await.unwrap();
    assert_eq!(sub.next().await.unwrap().payload_str(), Some("before"));
    sub.unsubscribe().await.unwrap();
    subscriber.flush().await.unwrap();
    publisher.publish("t", "after").await.unwrap();
    assert_eq!(other.next().await.unwrap().payload_str(), Some("before"));
    assert_eq!(other.next().await.unwrap().payload_str(), Some("after"));
    assert!(received(&publisher, &subscriber, &mut sub).await.is_empty());
    assert_eq!(broker.stats().subscriptions, 1);
    // Dropping a subscription unsubscribes too.
    drop(other);
    eventually("dropped subscription removed", || broker.stats().subscriptions == 0).await;
}

/// A burst arrives as many frames per read, most of them handled straight from the read buffer:
/// those of a dropped subscription go nowhere, the others arrive whole and in order.
#[tokio::test]
async fn a_burst_for_a_live_and_a_dropped_subscription() {
    let broker = broker().await;
    let publisher = client(&broker).await;
    let subscriber = client(&broker).await;
    let mut live = subscriber.subscribe("live").await.unwrap();
    let gone = subscriber.subscribe("gone").await.unwrap();
    drop(gone);
    for i in 0..2_000u32 {
        publisher.publish("gone", i.to_be_bytes().to_vec()).await.unwrap();
        publisher.publish("live", i.to_be_bytes().to_vec()).await.unwrap();
    }
    publisher.flush().await.unwrap();
    for i in 0..2_000u32 {
        let m = tokio::time::timeout(std::time::Duration::from_secs(10), live.next()).await.unwrap().unwrap();
        assert_eq!(m.topic(), "live");
        assert_eq!(&m.payload()[..], &i.to_be_bytes());
    }
    eventually("dropped subscription removed", || broker.stats().subscriptions == 1).await;
}

#[tokio::test]
async fn a_disconnected_client_is_cleaned_up() {
    let broker = broker().await;
    let c = client(&broker).await;
    let _a = c.subscribe("a.>").await.unwrap();
    let _b = c.subscribe_group("b", "workers", busbar::GroupPolicy::RoundRobin).await.unwrap();
    let stats = broker.stats();
    assert_eq!((stats.connections, stats.subscriptions), (1, 2));
    c.disconnect().await.unwrap();
    assert_eq!(c.status(), Status::Disconnected);
    eventually("connection and subscriptions removed", || {
        let s = broker.stats();
        s.connections == 0 && s.subscriptions == 0
    })
    .await;
    // A connection that simply vanishes (no goodbye) is cleaned up the same way.
    let mut raw = Raw::hello(&broker).await;
    raw.send(Frame::Sub(Sub { sid: 1, pattern: "x".into(), group: None, kind: Default::default() })).await;
    raw.send(Frame::Ping).await;
    assert_eq!(raw.read().await, Some(Frame::Pong));
    assert_eq!(broker.stats().subscriptions, 1);
    drop(raw);
    eventually("vanished connection removed", || broker.stats().subscriptions == 0).await;
}

#[tokio::test]
async fn garbage_bytes_get_an_error_and_a_close_while_others_keep_receiving() {
    let broker = broker().await;
    let publisher = client(&broker).await;
    let subscriber = client(&broker).await;
    let mut sub = subscriber.subscribe("keep.going").await.unwrap();

    let mut http = Raw::connect(&broker).await;
    http.send_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let e = http.expect_error().await;
    assert_eq!(e.code, ErrorCode::FrameTooLarge, "{e:?}");
    http.expect_closed().await;

    let mut bad_magic = Raw::hello(&broker).await;
    bad_magic
        .send_bytes(&[0, 0, 0, 20, b'x', b'x', 1, 0x83, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        .await;
    let e = bad_magic.expect_error().await;
    assert_eq!(e.code, ErrorCode::MalformedFrame);
    assert!(e.message.contains("magic"), "{}", e.message);
    bad_magic.expect_closed().await;

    let mut truncated = Raw::hello(&broker).await;
    let mut bytes = Frame::Pub(Message::new("keep.going", "x")).to_bytes().unwrap().to_vec();
    bytes[25] = 200; // topic length past the end of the frame
    truncated.send_bytes(&bytes).await;
    assert_eq!(truncated.expect_error().await.code, ErrorCode::MalformedFrame);
    truncated.expect_closed().await;

    for i in 0..50u8 {
        publisher.publish("keep.going", vec![i]).await.unwrap();
    }
    for i in 0..50u8 {
        assert_eq!(&sub.next().await.unwrap().payload()[..], &[i]);
    }
    assert_eq!(broker.stats().connections, 2);
}

#[tokio::test]
async fn an_oversized_frame_is_refused_and_closes_only_that_connection() {
    let mut config = config();
    config.max_frame_size = 4096;
    let broker = broker_with(config).await;
    let good = client(&broker).await;
    let mut sub = good.subscribe("big").await.unwrap();
    assert_eq!(good.max_frame_size(), 4096);

    // The client refuses it locally, with a clear error, and stays connected.
    match good.publish("big", vec![0u8; 5000]).await {
        Err(Error::Frame(busbar_core::FrameError::TooLarge { max: 4096, .. })) => {}
        other => panic!("expected a local TooLarge error, got {other:?}"),
    }
    // A raw peer that sends it anyway is closed with FrameTooLarge.
    let mut raw = Raw::hello(&broker).await;
    raw.send(Frame::Pub(Message::new("big", vec![0u8; 5000]))).await;
    let e = raw.expect_error().await;
    assert_eq!(e.code, ErrorCode::FrameTooLarge);
    raw.expect_closed().await;

    good.publish("big", vec![1u8; 4000]).await.unwrap();
    assert_eq!(sub.next().await.unwrap().payload().len(), 4000);
    assert_eq!(good.status(), Status::Connected);
}

#[tokio::test]
async fn protocol_violations_have_specific_codes() {
    let broker = broker().await;
    // First frame must be HELLO.
    let mut raw = Raw::connect(&broker).await;
    raw.send(Frame::Ping).await;
    assert_eq!(raw.expect_error().await.code, ErrorCode::HandshakeRequired);
    raw.expect_closed().await;
    // A client may not send MSG.
    let mut raw = Raw::hello(&broker).await;
    raw.send(Frame::Msg { sid: 1, message: Message::new("a", "") }).await;
    assert_eq!(raw.expect_error().await.code, ErrorCode::UnexpectedFrame);
    raw.expect_closed().await;
    // Invalid topic, invalid pattern, unknown and duplicate subscriptions: an error, but the
    // connection stays open.
    let mut raw = Raw::hello(&broker).await;
    raw.send(Frame::Pub(Message::new("a..b", ""))).await;
    assert_eq!(raw.expect_error().await.code, ErrorCode::InvalidTopic);
    raw.send(Frame::Sub(Sub { sid: 7, pattern: "a.>.b".into(), group: None, kind: Default::default() }))
        .await;
    let e = raw.expect_error().await;
    assert_eq!((e.code, e.correlation), (ErrorCode::InvalidPattern, 7));
    raw.send(Frame::Unsub { sid: 99 }).await;
    assert_eq!(raw.expect_error().await.code, ErrorCode::UnknownSubscription);
    raw.send(Frame::Sub(Sub { sid: 1, pattern: "a".into(), group: None, kind: Default::default() })).await;
    raw.send(Frame::Sub(Sub { sid: 1, pattern: "b".into(), group: None, kind: Default::default() })).await;
    assert_eq!(raw.expect_error().await.code, ErrorCode::DuplicateSubscription);
    // The id routes use for "the client is gone" is reserved.
    raw.send(Frame::Sub(Sub { sid: u64::MAX, pattern: "c".into(), group: None, kind: Default::default() }))
        .await;
    let e = raw.expect_error().await;
    assert_eq!((e.code, e.correlation), (ErrorCode::DuplicateSubscription, u64::MAX));
    // Group names follow the topic rules (and so are bounded: each distinct one is kept).
    for name in ["x".repeat(60_000), "a..b".to_string(), "w*".to_string()] {
        let group = Some(busbar::core::Group { name: name.into(), policy: busbar::GroupPolicy::Random });
        raw.send(Frame::Sub(Sub { sid: 8, pattern: "g".into(), group, kind: Default::default() })).await;
        let e = raw.expect_error().await;
        assert_eq!((e.code, e.correlation), (ErrorCode::InvalidPattern, 8), "{}", e.message);
    }
    raw.send(Frame::Ping).await;
    assert_eq!(raw.read().await, Some(Frame::Pong));
    assert_eq!(broker.stats().subscriptions, 1);
    // A service name too.
    let mut raw = Raw::connect(&broker).await;
    let properties = [("service", "bad..name")].into_iter().collect();
    raw.send(Frame::Hello(busbar::core::Hello { name: "raw".into(), properties })).await;
    assert_eq!(raw.expect_error().await.code, ErrorCode::InvalidTopic);
    raw.expect_closed().await;
}

#[tokio::test]
async fn handshake_timeout_closes_a_silent_connection() {
    let mut config = config();
    config.handshake_timeout = std::time::Duration::from_millis(100);
    let broker = broker_with(config).await;
    let mut raw = Raw::connect(&broker).await;
    assert_eq!(raw.expect_error().await.code, ErrorCode::HandshakeTimeout);
    raw.expect_closed().await;
}

#[tokio::test]
async fn connection_limit_refuses_with_a_specific_error() {
    let mut config = config();
    config.max_connections = 1;
    let broker = broker_with(config).await;
    let _first = client(&broker).await;
    match Client::connect(broker.local_addr().to_string()).await {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::TooManyConnections), "{e}"),
        Ok(_) => panic!("second connection accepted past the limit"),
    }
    assert_eq!(broker.stats().connections_refused, 1);
}

#[tokio::test]
async fn subscription_limit_and_bad_patterns_fail_the_subscribe_call() {
    let mut config = config();
    config.max_subscriptions = 2;
    let broker = broker_with(config).await;
    let c = client(&broker).await;
    let _a = c.subscribe("a").await.unwrap();
    let _b = c.subscribe("b").await.unwrap();
    let e = c.subscribe("c").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::TooManySubscriptions));
    assert!(matches!(c.subscribe("a.>.b").await, Err(Error::InvalidTopic { .. })));
    assert!(matches!(c.publish("a.*", "x").await, Err(Error::InvalidTopic { .. })));
    assert_eq!(broker.stats().subscriptions, 2);
    assert_eq!(c.status(), Status::Connected);
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Email {
    subject: String,
    to: Vec<String>,
}

#[tokio::test]
async fn typed_payloads_and_handler_callbacks() {
    let broker = broker().await;
    let c = client(&broker).await;
    let mut json = c.subscribe("mail.json").await.unwrap();
    let mut pack = c.subscribe("mail.pack").await.unwrap();
    let email = Email { subject: "hi".into(), to: vec!["a@b".into()] };
    c.publish_json("mail.json", &email).await.unwrap();
    c.publish_msgpack("mail.pack", &email).await.unwrap();
    assert_eq!(json.next().await.unwrap().json::<Email>().unwrap(), email);
    assert_eq!(pack.next().await.unwrap().msgpack::<Email>().unwrap(), email);

    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let handler = c
        .subscribe_with("jobs.*", move |m| {
            let tx = tx.clone();
            async move {
                tx.send(m.topic().to_string()).await.unwrap();
            }
        })
        .await
        .unwrap();
    c.publish("jobs.one", "").await.unwrap();
    c.publish("jobs.two", "").await.unwrap();
    assert_eq!(rx.recv().await.unwrap(), "jobs.one");
    assert_eq!(rx.recv().await.unwrap(), "jobs.two");
    handler.stop();
    eventually("handler's subscription removed", || broker.stats().subscriptions == 2).await;
}

#[tokio::test]
async fn headers_keys_and_envelopes_cross_the_wire() {
    let broker = broker().await;
    let c = client(&broker).await;
    let mut sub = c.subscribe("h").await.unwrap();
    let env = busbar_core::Envelope { id: 1, tx: 2, timestamp_ns: 3 };
    c.publish_message(busbar::Outgoing::new("h", "p").header("k", "v").key(42).envelope(env)).await.unwrap();
    let m = sub.next().await.unwrap();
    assert_eq!(m.headers().get("k"), Some("v"));
    assert_eq!(m.key(), Some(42));
    assert_eq!(m.envelope(), Some(&env));
}

#[tokio::test]
async fn graceful_shutdown_tells_clients_and_closes_them() {
    let broker = broker().await;
    let c = Client::connect_with(
        ClientOptions::new(broker.local_addr().to_string()).name("shutdown-test").no_reconnect(),
    )
    .await
    .unwrap();
    let mut sub = c.subscribe("x").await.unwrap();
    let mut status = c.status_watch();
    let mut raw = Raw::hello(&broker).await;
    c.publish("x", "last").await.unwrap();
    c.flush().await.unwrap();
    broker.stop().await;
    // What was queued before the shutdown is still delivered, then the stream ends.
    assert_eq!(sub.next().await.unwrap().payload_str(), Some("last"));
    assert!(tokio::time::timeout(PATIENCE, sub.next()).await.unwrap().is_none());
    tokio::time::timeout(PATIENCE, status.wait_for(|s| *s == Status::Disconnected)).await.unwrap().unwrap();
    assert_eq!(raw.expect_error().await.code, ErrorCode::ShuttingDown);
    raw.expect_closed().await;
    assert!(matches!(c.publish("x", "y").await, Err(Error::Closed)));
    // (With reconnecting on, the default, the client would instead be Reconnecting: see
    // tests/resilience.rs.)
}

#[tokio::test]
async fn many_clients_many_topics_no_cross_talk() {
    let broker = broker().await;
    let mut clients = Vec::new();
    for i in 0..20 {
        let c = client(&broker).await;
        let sub = c.subscribe(format!("room.{i}")).await.unwrap();
        clients.push((c, sub));
    }
    for (i, (c, _)) in clients.iter().enumerate() {
        let target = (i + 1) % 20;
        c.publish(format!("room.{target}"), format!("from {i}")).await.unwrap();
    }
    let mut seen = HashSet::new();
    for (i, (_, sub)) in clients.iter_mut().enumerate() {
        let m = sub.next().await.unwrap();
        let from = (i + 19) % 20;
        assert_eq!(m.payload_str().unwrap(), format!("from {from}"));
        seen.insert(i);
    }
    assert_eq!(seen.len(), 20);
}

#[tokio::test]
async fn error_texts_quote_at_most_a_bounded_part_of_what_the_client_sent() {
    let broker = broker().await;
    let mut raw = Raw::hello(&broker).await;
    let long_bad_topic = "a b".repeat(10_000);
    raw.send(Frame::Pub(Message::new(long_bad_topic, ""))).await;
    let e = raw.expect_error().await;
    assert_eq!(e.code, ErrorCode::InvalidTopic);
    assert!(e.message.len() < 300, "{} bytes of error text", e.message.len());
}
