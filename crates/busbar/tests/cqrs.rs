//! Requests, commands, scatter-gather, groups, direct addressing and envelopes over a real broker.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use busbar::core::SequentialGenerator;
use busbar::{Client, ClientOptions, Error, ErrorCode, EventBus, GroupPolicy, Outgoing, Pattern};
use bytes::Bytes;
use common::*;
use serde::{Deserialize, Serialize};

/// Long enough never to be reached when things work: a request that should fail fast must fail
/// long before this.
const LONG: Duration = Duration::from_secs(60);

async fn named(broker: &busbar_broker::Broker, service: &str) -> Client {
    let options = ClientOptions::new(broker.local_addr().to_string()).service(service);
    Client::connect_with(options).await.unwrap()
}

#[tokio::test]
async fn request_reply_round_trip() {
    let broker = broker().await;
    let responder = client(&broker).await;
    let requester = client(&broker).await;
    let _h = responder
        .respond("user.get", |m| async move { Ok::<_, String>(format!("user {}", m.payload_str().unwrap())) })
        .await
        .unwrap();
    let reply = requester.request("user.get", "42", LONG).await.unwrap();
    assert_eq!(reply.payload_str(), Some("user 42"));
    assert_eq!(reply.source(), responder.service_id());
    assert_eq!(broker.stats().requests_pending, 0, "answered requests are forgotten");
}

#[tokio::test]
async fn no_responders_is_immediate_not_a_timeout() {
    let broker = broker().await;
    let c = client(&broker).await;
    // The request's own timeout is a minute; the answer must come long before (bounded wait).
    let answer = tokio::time::timeout(PATIENCE, c.request("nobody.home", "?", LONG)).await;
    match answer.expect("no-responders answered before the bound") {
        Err(Error::NoResponders { topic }) => assert_eq!(topic, "nobody.home"),
        other => panic!("expected NoResponders, got {other:?}"),
    }
    // A plain event subscriber is not a responder.
    let _events = c.subscribe("nobody.home").await.unwrap();
    assert!(matches!(c.request("nobody.home", "?", LONG).await, Err(Error::NoResponders { .. })));
    assert_eq!(broker.stats().no_responders, 2);
}

#[tokio::test]
async fn a_request_nobody_answers_times_out() {
    let broker = broker().await;
    let responder = client(&broker).await;
    let requester = client(&broker).await;
    let mut requests = responder.requests("slow.op").await.unwrap();
    let pending =
        tokio::spawn(async move { requester.request("slow.op", "", Duration::from_millis(200)).await });
    // Hold the request without answering until the requester has given up.
    let held = requests.next().await.unwrap();
    assert!(matches!(pending.await.unwrap(), Err(Error::Timeout)));
    drop(held);
}

#[tokio::test]
async fn handler_errors_panics_and_forgotten_replies_reach_the_requester() {
    let broker = broker().await;
    let responder = client(&broker).await;
    let requester = client(&broker).await;
    let _fails = responder.respond("op.fail", |_| async { Err::<Bytes, _>("boom") }).await.unwrap();
    let _panics = responder
        .respond("op.panic", |_| async {
            if true {
                panic!("handler bug");
            }
            Ok::<Bytes, String>(Bytes::new())
        })
        .await
        .unwrap();
    let mut forgetful = responder.requests("op.forget").await.unwrap();
    tokio::spawn(async move {
        while let Some(request) = forgetful.next().await {
            drop(request);
        }
    });
    match requester.request("op.fail", "", LONG).await {
        Err(Error::Handler(text)) => assert_eq!(text, "boom"),
        other => panic!("{other:?}"),
    }
    match requester.request("op.panic", "", LONG).await {
        Err(Error::Handler(text)) => assert!(text.contains("panicked"), "{text}"),
        other => panic!("{other:?}"),
    }
    match requester.request("op.forget", "", LONG).await {
        Err(Error::Handler(text)) => assert!(text.contains("without a reply"), "{text}"),
        other => panic!("{other:?}"),
    }
    // The panicking handler keeps serving.
    assert!(matches!(requester.request("op.panic", "", LONG).await, Err(Error::Handler(_))));
}

#[tokio::test]
async fn a_reply_too_large_for_the_broker_fails_the_request_at_once() {
    let config = busbar_broker::Config { max_frame_size: 64 * 1024, ..common::config() };
    let broker = broker_with(config).await;
    let responder = client(&broker).await;
    let requester = client(&broker).await;
    let mut requests = responder.requests("big").await.unwrap();
    let answered = tokio::spawn(async move {
        let request = requests.next().await.unwrap();
        request.reply(vec![0u8; 100 * 1024]).await
    });
    match requester.request("big", "", LONG).await {
        Err(Error::Handler(text)) => assert!(text.contains("could not be sent"), "{text}"),
        other => panic!("{other:?}"),
    }
    let sent = answered.await.unwrap();
    assert!(matches!(sent, Err(Error::Frame(_))), "the handler is told too: {sent:?}");
    // The connection is still good, and a `respond` handler whose reply was too large keeps
    // serving.
    let _h = responder
        .respond("sized", |m| async move {
            let size = if m.payload_str() == Some("big") { 100 * 1024 } else { 2 };
            Ok::<_, String>(vec![b'k'; size])
        })
        .await
        .unwrap();
    assert!(matches!(requester.request("sized", "big", LONG).await, Err(Error::Handler(_))));
    assert_eq!(requester.request("sized", "small", LONG).await.unwrap().payload_str(), Some("kk"));
}

#[tokio::test]
async fn a_responder_that_disconnects_fails_the_request_fast() {
    let broker = broker().await;
    let responder = client(&broker).await;
    let requester = client(&broker).await;
    let mut requests = responder.requests("fragile.op").await.unwrap();
    let pending = tokio::spawn(async move { requester.request("fragile.op", "", LONG).await });
    let _held = requests.next().await.unwrap();
    responder.disconnect().await.unwrap();
    let answer = tokio::time::timeout(PATIENCE, pending).await.expect("failed fast").unwrap();
    assert_eq!(answer.unwrap_err().code(), Some(ErrorCode::ResponderLost));
}

#[tokio::test]
async fn scatter_gather_collects_every_responder() {
    let broker = broker().await;
    let mut handles = Vec::new();
    let mut ids = Vec::new();
    for i in 0..3 {
        let c = client(&broker).await;
        ids.push(c.service_id());
        handles.push(
            c.respond("inventory.count", move |_| async move { Ok::<_, String>(format!("{i}")) })
                .await
                .unwrap(),
        );
        handles.push(
            c.respond("inventory.fail", move |_| async move { Err::<Bytes, _>(format!("no {i}")) })
                .await
                .unwrap(),
        );
        drop(c); // the handlers keep the connection open
    }
    let requester = client(&broker).await;
    let answers = requester.request_all("inventory.count", "", LONG, None).await.unwrap();
    let mut got: Vec<String> =
        answers.iter().map(|a| a.as_ref().unwrap().payload_str().unwrap().to_string()).collect();
    got.sort();
    assert_eq!(got, ["0", "1", "2"], "all three, and the call returned as soon as they had answered");
    let mut sources: Vec<u32> = answers.iter().map(|a| a.as_ref().unwrap().source()).collect();
    sources.sort();
    assert_eq!(sources, ids);

    let two = requester.request_all("inventory.count", "", LONG, Some(2)).await.unwrap();
    assert_eq!(two.len(), 2);
    let failures = requester.request_all("inventory.fail", "", LONG, None).await.unwrap();
    assert_eq!(failures.len(), 3);
    assert!(failures.iter().all(|a| matches!(a, Err(Error::Handler(t)) if t.starts_with("no "))));
    assert!(matches!(
        requester.request_all("inventory.none", "", LONG, None).await,
        Err(Error::NoResponders { .. })
    ));
}

/// Publishes messages with keys `keys` to `topic`; returns, per member, the keys it received.
async fn spread(
    publisher: &Client,
    members: &mut [(Client, busbar::Subscription)],
    topic: &str,
    keys: std::ops::Range<u64>,
) -> Vec<Vec<u64>> {
    let n = keys.end - keys.start;
    for k in keys {
        publisher.publish_message(Outgoing::new(topic.to_string(), Bytes::new()).key(k)).await.unwrap();
    }
    publisher.flush().await.unwrap(); // the broker has routed them all …
    let mut out = Vec::new();
    for (client, sub) in members.iter_mut() {
        client.flush().await.unwrap(); // … and each member has received what was routed to it
        let mut got = Vec::new();
        while let Some(m) = sub.try_next() {
            got.push(m.key().unwrap());
        }
        out.push(got);
    }
    assert_eq!(out.iter().map(Vec::len).sum::<usize>() as u64, n, "each message reaches exactly one member");
    out
}

async fn members(
    broker: &busbar_broker::Broker,
    n: usize,
    topic: &str,
    policy: GroupPolicy,
) -> Vec<(Client, busbar::Subscription)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let c = client(broker).await;
        let s = c.subscribe(Pattern::new(topic.to_string()).group("g", policy)).await.unwrap();
        out.push((c, s));
    }
    out
}

#[tokio::test]
async fn round_robin_spreads_evenly() {
    let broker = broker().await;
    let publisher = client(&broker).await;
    let mut m = members(&broker, 3, "work.rr", GroupPolicy::RoundRobin).await;
    let got = spread(&publisher, &mut m, "work.rr", 0..3000).await;
    assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), [1000, 1000, 1000]);
}

#[tokio::test]
async fn random_spreads_within_ten_percent() {
    let broker = broker().await;
    let publisher = client(&broker).await;
    let mut m = members(&broker, 3, "work.random", GroupPolicy::Random).await;
    let got = spread(&publisher, &mut m, "work.random", 0..3000).await;
    for (i, keys) in got.iter().enumerate() {
        assert!((900..=1100).contains(&keys.len()), "member {i} got {} of 3000", keys.len());
    }
}

#[tokio::test]
async fn hash_keeps_keys_on_their_member_and_moves_few_when_one_joins() {
    let broker = broker().await;
    let publisher = client(&broker).await;
    let mut m = members(&broker, 3, "work.hash", GroupPolicy::Hash).await;
    let owner = |got: &[Vec<u64>]| -> HashMap<u64, usize> {
        got.iter().enumerate().flat_map(|(i, keys)| keys.iter().map(move |k| (*k, i))).collect()
    };
    let first = owner(&spread(&publisher, &mut m, "work.hash", 0..3000).await);
    let again = owner(&spread(&publisher, &mut m, "work.hash", 0..3000).await);
    assert_eq!(first, again, "equal keys go to the same member");
    for i in 0..3 {
        let share = first.values().filter(|&&o| o == i).count();
        assert!(share > 600, "member {i} owns {share} of 3000 keys: the hash spreads");
    }
    m.extend(members(&broker, 1, "work.hash", GroupPolicy::Hash).await);
    let after = owner(&spread(&publisher, &mut m, "work.hash", 0..3000).await);
    let moved: Vec<u64> = (0..3000).filter(|k| first[k] != after[k]).collect();
    assert!(moved.iter().all(|k| after[k] == 3), "keys only move to the new member");
    let fraction = moved.len() as f64 / 3000.0;
    assert!(
        (0.15..=0.34).contains(&fraction),
        "{fraction:.3} of keys moved; about 1/4 expected, at most ~1/3"
    );
}

#[tokio::test]
async fn groups_and_plain_subscribers_on_one_topic_both_receive() {
    let broker = broker().await;
    let publisher = client(&broker).await;
    let plain = client(&broker).await;
    let mut plain_sub = plain.subscribe("mixed").await.unwrap();
    let mut group = members(&broker, 3, "mixed", GroupPolicy::RoundRobin).await;
    let got = spread(&publisher, &mut group, "mixed", 0..30).await;
    assert_eq!(got.iter().map(Vec::len).sum::<usize>(), 30, "the group got each once");
    plain.flush().await.unwrap();
    let mut n = 0;
    while plain_sub.try_next().is_some() {
        n += 1;
    }
    assert_eq!(n, 30, "the plain subscriber got every one");
}

#[tokio::test]
async fn responders_in_a_group_share_requests() {
    let broker = broker().await;
    let mut handles = Vec::new();
    let counts: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
    let mut clients = Vec::new();
    for i in 0..3 {
        let c = client(&broker).await;
        let counts = counts.clone();
        let pattern = Pattern::new("calc.add").group("adders", GroupPolicy::RoundRobin);
        handles.push(
            c.respond(pattern, move |_| {
                counts[i].fetch_add(1, Ordering::Relaxed);
                async { Ok::<_, String>("ok") }
            })
            .await
            .unwrap(),
        );
        clients.push(c);
    }
    let requester = client(&broker).await;
    for _ in 0..30 {
        requester.request("calc.add", "", LONG).await.unwrap();
    }
    let spread: Vec<usize> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    assert_eq!(spread, [10, 10, 10], "one responder per request, in turn");
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Ship {
    order: u64,
}

#[tokio::test]
async fn commands_reach_exactly_one_handler_and_are_acknowledged() {
    let broker = broker().await;
    let handled = Arc::new(AtomicUsize::new(0));
    let mut keep = Vec::new();
    for _ in 0..2 {
        let c = client(&broker).await;
        let handled = handled.clone();
        let pattern = Pattern::new("cmd.ship").group("shippers", GroupPolicy::Random);
        keep.push(
            c.handle_commands(pattern, move |m| {
                let handled = handled.clone();
                async move {
                    let ship: Ship = m.json().map_err(|e| e.to_string())?;
                    if ship.order == 0 {
                        return Err("order 0 does not exist".to_string());
                    }
                    handled.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
            })
            .await
            .unwrap(),
        );
        keep.push(c.handle_commands("cmd.noop", |_| async { Ok::<(), String>(()) }).await.unwrap());
        drop(c); // the handlers keep the connection open
    }
    let sender = client(&broker).await;
    for order in 1..=20 {
        sender.send_command("cmd.ship", &Ship { order }, LONG).await.unwrap();
    }
    assert_eq!(handled.load(Ordering::Relaxed), 20, "acknowledged means handled, and only once");
    match sender.send_command("cmd.ship", &Ship { order: 0 }, LONG).await {
        Err(Error::Handler(text)) => assert_eq!(text, "order 0 does not exist"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(sender.send_command("cmd.unknown", &(), LONG).await, Err(Error::NoResponders { .. })));
}

#[tokio::test]
async fn typed_queries() {
    #[derive(Serialize)]
    struct Add {
        a: i64,
        b: i64,
    }
    let broker = broker().await;
    let c = client(&broker).await;
    let mut requests = c.requests("math.add").await.unwrap();
    tokio::spawn(async move {
        while let Some(r) = requests.next().await {
            let q: serde_json::Value = r.json().unwrap();
            let sum = q["a"].as_i64().unwrap() + q["b"].as_i64().unwrap();
            r.reply_json(&sum).await.unwrap();
        }
    });
    let sum: i64 = c.query("math.add", &Add { a: 2, b: 40 }, LONG).await.unwrap();
    assert_eq!(sum, 42);
}

#[tokio::test]
async fn direct_messages_by_service_id_and_by_name() {
    let broker = broker().await;
    let publisher = client(&broker).await;
    let a = client(&broker).await;
    let b = named(&broker, "mailer").await;
    let mut sub_a = a.subscribe("notify").await.unwrap();
    let mut sub_b = b.subscribe("notify").await.unwrap();
    publisher.publish_message(Outgoing::new("notify", "to a").to(a.service_id())).await.unwrap();
    publisher.publish_message(Outgoing::new("notify", "to mailer").to_service("mailer")).await.unwrap();
    publisher.publish_message(Outgoing::new("notify", "to nobody").to_service("ghost")).await.unwrap();
    publisher.publish("notify", "to all").await.unwrap();
    publisher.flush().await.unwrap();
    a.flush().await.unwrap();
    b.flush().await.unwrap();
    let drain = |sub: &mut busbar::Subscription| {
        let mut v = Vec::new();
        while let Some(m) = sub.try_next() {
            v.push(m.payload_str().unwrap().to_string());
        }
        v
    };
    assert_eq!(drain(&mut sub_a), ["to a", "to all"]);
    assert_eq!(drain(&mut sub_b), ["to mailer", "to all"]);
    assert_eq!(broker.stats().undeliverable, 1);

    // Requests too: two responders, the request names one.
    let _ha = a.respond("who", |_| async { Ok::<_, String>("a") }).await.unwrap();
    let _hb = b.respond("who", |_| async { Ok::<_, String>("b") }).await.unwrap();
    for _ in 0..4 {
        let r = publisher.request_message(Outgoing::new("who", "").to_service("mailer"), LONG).await.unwrap();
        assert_eq!(r.payload_str(), Some("b"));
        let r = publisher.request_message(Outgoing::new("who", "").to(a.service_id()), LONG).await.unwrap();
        assert_eq!(r.payload_str(), Some("a"));
    }
    let ghost = publisher.request_message(Outgoing::new("who", "").to_service("ghost"), LONG).await;
    assert!(matches!(ghost, Err(Error::NoResponders { .. })));
}

#[tokio::test]
async fn envelope_fields_survive_the_round_trip() {
    let broker = broker().await;
    let options = ClientOptions::new(broker.local_addr().to_string())
        .id_generator(Arc::new(SequentialGenerator::new()));
    let publisher = Client::connect_with(options).await.unwrap();
    let subscriber = client(&broker).await;
    let mut sub = subscriber.subscribe("audit.>").await.unwrap();
    let before = busbar::core::id::now_ns();
    publisher.publish_message(Outgoing::new("audit.login", "ann").header("ip", "127.0.0.1")).await.unwrap();
    publisher.publish_message(Outgoing::new("audit.logout", "ann").transaction(77)).await.unwrap();
    let m1 = sub.next().await.unwrap();
    let m2 = sub.next().await.unwrap();
    let after = busbar::core::id::now_ns();
    assert_eq!((m1.id(), m1.transaction()), (1, 1), "a new transaction starts with the message's own id");
    assert_eq!((m2.id(), m2.transaction()), (2, 77));
    assert!((before..=after).contains(&m1.timestamp_ns()));
    assert_eq!(m1.topic(), "audit.login");
    assert_eq!(m1.source(), publisher.service_id());
    assert_eq!(m1.headers().get("ip"), Some("127.0.0.1"));
    assert_eq!(m1.payload_str(), Some("ann"));
    // Default ids are ULID-style: increasing, and carrying the time in their top 48 bits.
    let c = client(&broker).await;
    c.publish("audit.x", "").await.unwrap();
    c.publish("audit.y", "").await.unwrap();
    let (x, y) = (sub.next().await.unwrap(), sub.next().await.unwrap());
    assert!(x.id() < y.id());
    assert_eq!((x.id() >> 80) as u64, x.timestamp_ns() / 1_000_000);
}

#[tokio::test]
async fn transaction_ids_propagate_from_handled_messages() {
    let broker = broker().await;
    let orders = client(&broker).await;
    let billing = client(&broker).await;
    let watcher = client(&broker).await;
    let mut invoices = watcher.subscribe("invoice.created").await.unwrap();
    // Billing handles an order event by publishing an invoice event, without passing any id.
    let b = billing.clone();
    let _h = billing
        .subscribe_with("order.created", move |_order| {
            let b = b.clone();
            async move { b.publish("invoice.created", "inv").await.unwrap() }
        })
        .await
        .unwrap();
    // A responder that publishes while answering: same transaction as the request.
    let b = billing.clone();
    let _r = billing
        .respond("invoice.get", move |_| {
            let b = b.clone();
            async move {
                b.publish("invoice.created", "from request").await.unwrap();
                Ok::<_, String>("ok")
            }
        })
        .await
        .unwrap();
    let mut own = orders.subscribe("order.created").await.unwrap();
    orders.publish("order.created", "o1").await.unwrap();
    let order = own.next().await.unwrap();
    let invoice = invoices.next().await.unwrap();
    assert_eq!(invoice.transaction(), order.transaction());
    assert_ne!(invoice.id(), order.id());

    let reply =
        orders.request_message(Outgoing::new("invoice.get", "").transaction(4242), LONG).await.unwrap();
    assert_eq!(reply.transaction(), 4242, "the reply is in the request's transaction");
    assert_eq!(invoices.next().await.unwrap().transaction(), 4242, "so is what its handler published");
}

#[tokio::test]
async fn requests_in_flight_are_bounded_per_connection() {
    let mut config = config();
    config.max_requests = 2;
    let broker = broker_with(config).await;
    let responder = client(&broker).await;
    let mut requests = responder.requests("slow").await.unwrap();
    let requester = client(&broker).await;
    let r1 = tokio::spawn({
        let r = requester.clone();
        async move { r.request("slow", "", LONG).await }
    });
    let r2 = tokio::spawn({
        let r = requester.clone();
        async move { r.request("slow", "", LONG).await }
    });
    let (a, b) = (requests.next().await.unwrap(), requests.next().await.unwrap());
    let third = requester.request("slow", "", LONG).await;
    assert_eq!(third.unwrap_err().code(), Some(ErrorCode::TooManyRequests));
    a.reply("1").await.unwrap();
    b.reply("2").await.unwrap();
    assert!(r1.await.unwrap().is_ok() && r2.await.unwrap().is_ok());
}

#[tokio::test]
async fn a_responder_with_two_subscriptions_that_disconnects_fails_both_calls() {
    let broker = broker().await;
    let responder = client(&broker).await;
    let mut a = responder.requests("census.>").await.unwrap();
    let mut b = responder.requests("census.*").await.unwrap();
    let requester = client(&broker).await;
    let r = requester.clone();
    let pending = tokio::spawn(async move { r.request_all("census.x", "", LONG, None).await });
    let (_held_a, _held_b) = (a.next().await.unwrap(), b.next().await.unwrap());
    responder.disconnect().await.unwrap();
    let answers = tokio::time::timeout(PATIENCE, pending).await.expect("failed fast").unwrap().unwrap();
    assert_eq!(answers.len(), 2);
    assert!(answers.iter().all(|a| a.as_ref().unwrap_err().code() == Some(ErrorCode::ResponderLost)));
}

#[tokio::test]
async fn a_request_a_full_responder_cannot_take_is_refused_at_once_under_the_drop_policy() {
    // The Drop policy keeps a responder whose queue is full: the CALL it misses must be answered
    // for it, or its requester would wait out the whole timeout.
    let mut config = config();
    config.slow_consumer = busbar_broker::SlowConsumerPolicy::Drop;
    config.max_frame_size = 128 * 1024;
    config.max_pending_bytes = 256 * 1024;
    let broker = broker_with(config).await;
    let mut stuck = Raw::hello(&broker).await;
    let kind = busbar::core::SubKind::Requests;
    let sub = busbar::core::Sub { sid: 1, pattern: "stuck".into(), group: None, kind };
    stuck.send(busbar::core::Frame::Sub(sub)).await;
    stuck.send(busbar::core::Frame::Ping).await;
    assert_eq!(stuck.read().await, Some(busbar::core::Frame::Pong), "subscribed");
    // It never reads again: 400 requests of 64 KiB (25 MiB) overflow the socket's buffers and
    // its queue of 256 KiB.
    let requester = client(&broker).await;
    let payload = Bytes::from(vec![0u8; 64 * 1024]);
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..400 {
        let (r, p) = (requester.clone(), payload.clone());
        requests.spawn(async move { r.request("stuck", p, LONG).await });
    }
    let first =
        tokio::time::timeout(PATIENCE, requests.join_next()).await.expect("one refused, not timed out");
    let error = first.unwrap().unwrap().unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::TooManyRequests), "{error:?}");
    assert_eq!(broker.stats().connections, 2, "the responder is kept");
    requests.abort_all();
}

/// Under the drop policy a requester whose queue is full of messages (it has not read for a
/// while) still gets its reply: replies pass the bound that messages stop at.
#[tokio::test]
async fn a_reply_is_not_dropped_with_the_messages_of_a_full_queue() {
    let mut config = config();
    config.slow_consumer = busbar_broker::SlowConsumerPolicy::Drop;
    // Full by count: a small reply would still fit a byte bound.
    config.max_pending = 8;
    let broker = broker_with(config).await;
    let responder = client(&broker).await;
    let _h = responder.respond("svc", |_m| async move { Ok::<_, String>("the answer") }).await.unwrap();
    responder.flush().await.unwrap();
    let mut raw = Raw::hello(&broker).await;
    let sub = busbar::core::Sub { sid: 1, pattern: "flood".into(), group: None, kind: Default::default() };
    raw.send(busbar::core::Frame::Sub(sub)).await;
    raw.send(busbar::core::Frame::Ping).await;
    assert_eq!(raw.read().await, Some(busbar::core::Frame::Pong));
    // It stops reading: 16 KiB messages, on and on, until the request is answered: its socket
    // and its queue stay full and the broker drops for it.
    let publisher = client(&broker).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = tokio::spawn({
        let stop = stop.clone();
        let payload = Bytes::from(vec![0u8; 16 * 1024]);
        async move {
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                publisher.publish("flood", payload.clone()).await.unwrap();
                publisher.flush().await.unwrap();
            }
        }
    });
    eventually("the queue full", || broker.stats().dropped > 32).await;
    let request = busbar::core::Request {
        id: 9,
        all: false,
        timeout_ms: 60_000,
        message: busbar::core::Message::new("svc", "?"),
    };
    raw.send(busbar::core::Frame::Request(request)).await;
    eventually("answered", || broker.stats().requests_pending == 0).await;
    stop.store(true, Ordering::Relaxed);
    flood.await.unwrap();
    // Now it reads: the reply is among what was kept.
    loop {
        match raw.read().await {
            Some(busbar::core::Frame::Reply(r)) => {
                assert_eq!((r.id, r.error, &r.message.payload[..]), (9, None, &b"the answer"[..]));
                break;
            }
            Some(_) => continue,
            None => panic!("closed without the reply"),
        }
    }
}

/// `disconnect` fails what is in flight with `Closed`, as documented (and as the in-process bus
/// does), not `ConnectionLost`, which says the connection broke.
#[tokio::test]
async fn disconnect_fails_requests_in_flight_with_closed() {
    let broker = broker().await;
    let responder = client(&broker).await;
    let _calls = responder.requests("slow.answer").await.unwrap(); // never answered
    responder.flush().await.unwrap();
    let requester = client(&broker).await;
    let r = requester.clone();
    let pending = tokio::spawn(async move { r.request("slow.answer", "?", LONG).await });
    eventually("the request in flight", || broker.stats().requests_pending == 1).await;
    requester.disconnect().await.unwrap();
    let answer = tokio::time::timeout(PATIENCE, pending).await.unwrap().unwrap();
    assert!(matches!(answer, Err(Error::Closed)), "{answer:?}");
    assert!(matches!(requester.request("slow.answer", "?", LONG).await, Err(Error::Closed)));
}

#[tokio::test]
async fn a_request_whose_call_would_be_too_large_is_refused_and_the_connection_stays() {
    let broker = broker().await;
    let responder = client(&broker).await;
    let _h = responder.respond("big", |_m| async move { Ok::<_, String>("ok") }).await.unwrap();
    responder.flush().await.unwrap();
    let mut raw = Raw::hello(&broker).await;
    let max = busbar::core::frame::DEFAULT_MAX_FRAME_SIZE;
    // A REQUEST 4 bytes under the limit: its CALL, 8 bytes longer, would be over it.
    let request = |payload: usize| busbar::core::Request {
        id: 7,
        all: false,
        timeout_ms: 60_000,
        message: busbar::core::Message::new("big", vec![0u8; payload]),
    };
    let overhead = busbar::core::frame::MessageView::from(&request(0).message).frame_len() + 4;
    let frame = busbar::core::Frame::Request(request(max - 4 - overhead + 4));
    let mut bytes = bytes::BytesMut::new();
    frame.encode(&mut bytes, usize::MAX).unwrap();
    assert_eq!(bytes.len() - 4, max - 4, "a REQUEST the broker accepts");
    raw.send(frame).await;
    match raw.read().await {
        Some(busbar::core::Frame::Reply(r)) => {
            assert_eq!((r.id, r.error), (7, Some(ErrorCode::FrameTooLarge)))
        }
        other => panic!("{other:?}"),
    }
    // Still open, and one that fits is answered.
    raw.send(busbar::core::Frame::Request(request(16))).await;
    match raw.read().await {
        Some(busbar::core::Frame::Reply(r)) => assert_eq!((r.id, r.error), (7, None)),
        other => panic!("{other:?}"),
    }
}
