//! One behaviour suite, two transports: every test body is written once against `EventBus` and
//! run on the in-process bus and on the network client (through `AnyBus`, as an application that
//! chooses by configuration would).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use busbar::local::BusOptions;
use busbar::{AnyBus, BusConfig, ClientOptions, Error, EventBus, GroupPolicy, Outgoing, Pattern};
use busbar_broker::Broker;
use bytes::Bytes;

const LONG: Duration = Duration::from_secs(60);

async fn next(sub: &mut busbar::Subscription) -> busbar::Message {
    tokio::time::timeout(common::PATIENCE, sub.next()).await.expect("a message in time").expect("stream open")
}

async fn pub_sub_with_wildcards(bus: &impl EventBus) {
    let mut star = bus.subscribe("shop.*.created").await.unwrap();
    let mut rest = bus.subscribe("shop.>").await.unwrap();
    bus.publish("shop.order.created", "1").await.unwrap();
    bus.publish("shop.order.paid", "2").await.unwrap();
    bus.publish("other.order.created", "3").await.unwrap();
    assert_eq!(next(&mut star).await.payload_str(), Some("1"));
    assert_eq!(next(&mut rest).await.payload_str(), Some("1"));
    assert_eq!(next(&mut rest).await.payload_str(), Some("2"));
    bus.flush().await.unwrap();
    assert!(star.try_next().is_none() && rest.try_next().is_none());
}

async fn handler_runs_and_propagates_the_transaction(bus: &(impl EventBus + Clone)) {
    let mut invoices = bus.subscribe("inv.created").await.unwrap();
    let b = bus.clone();
    let _h = bus
        .subscribe_with("ord.created", move |_| {
            let b = b.clone();
            async move { b.publish("inv.created", "").await.unwrap() }
        })
        .await
        .unwrap();
    bus.publish_message(Outgoing::new("ord.created", "").transaction(1234)).await.unwrap();
    let invoice = next(&mut invoices).await;
    assert_eq!(invoice.transaction(), 1234);
    assert_ne!(invoice.id(), 1234);
}

async fn queries_and_errors(bus: &impl EventBus) {
    let _echo = bus.respond("echo", |m| async move { Ok::<_, String>(m.payload().clone()) }).await.unwrap();
    let _fail = bus.respond("fail", |_| async { Err::<Bytes, _>("nope") }).await.unwrap();
    let reply = bus.request_message(Outgoing::new("echo", "hi").transaction(55), LONG).await.unwrap();
    assert_eq!((reply.payload_str(), reply.transaction()), (Some("hi"), 55));
    assert_eq!(bus.request("echo", "forever", Duration::MAX).await.unwrap().payload_str(), Some("forever"));
    assert!(matches!(bus.request("fail", "", LONG).await, Err(Error::Handler(t)) if t == "nope"));
    let quick = tokio::time::timeout(common::PATIENCE, bus.request("nobody", "", LONG)).await.unwrap();
    assert!(matches!(quick, Err(Error::NoResponders { .. })));
    let mut silent = bus.requests("silent").await.unwrap();
    let timed_out = bus.request("silent", "", Duration::from_millis(100));
    let (answer, held) = tokio::join!(timed_out, silent.next());
    assert!(matches!(answer, Err(Error::Timeout)));
    drop(held);
}

async fn commands_reach_one_handler(bus: &impl EventBus) {
    let handled = Arc::new(AtomicUsize::new(0));
    let mut handlers = Vec::new();
    for _ in 0..3 {
        let h = handled.clone();
        let pattern = Pattern::new("cmd.do").group("doers", GroupPolicy::RoundRobin);
        handlers.push(
            bus.handle_commands(pattern, move |_| {
                h.fetch_add(1, Ordering::Relaxed);
                async { Ok::<(), String>(()) }
            })
            .await
            .unwrap(),
        );
    }
    for i in 0..9 {
        bus.send_command("cmd.do", &i, LONG).await.unwrap();
    }
    assert_eq!(handled.load(Ordering::Relaxed), 9, "each command handled exactly once before the ack");
}

async fn scatter_gather(bus: &impl EventBus) {
    let mut handlers = Vec::new();
    for i in 0..3u8 {
        handlers.push(bus.respond("poll", move |_| async move { Ok::<_, String>(vec![i]) }).await.unwrap());
    }
    let answers = bus.request_all("poll", "", LONG, None).await.unwrap();
    let mut got: Vec<u8> = answers.into_iter().map(|a| a.unwrap().payload()[0]).collect();
    got.sort();
    assert_eq!(got, [0, 1, 2]);
    // A timeout too long to add to the clock is one that never comes.
    assert_eq!(bus.request_all("poll", "", Duration::MAX, None).await.unwrap().len(), 3);
    assert!(matches!(bus.request_all("nobody.polls", "", LONG, None).await, Err(Error::NoResponders { .. })));
    // Zero expected waits for one answer, on every transport alike.
    assert_eq!(bus.request_all("poll", "", LONG, Some(0)).await.unwrap().len(), 1);
}

async fn groups_round_robin(bus: &impl EventBus) {
    let mut members = Vec::new();
    for _ in 0..3 {
        members
            .push(bus.subscribe(Pattern::new("rr.work").group("w", GroupPolicy::RoundRobin)).await.unwrap());
    }
    for _ in 0..30 {
        bus.publish("rr.work", "").await.unwrap();
    }
    each_gets_exactly(bus, &mut members, 10).await;
    // A group name follows the topic rules, on both transports.
    for bad in ["", "a..b", "w>"] {
        let refused = bus.subscribe(Pattern::new("rr.work").group(bad, GroupPolicy::RoundRobin)).await;
        assert!(matches!(refused, Err(Error::InvalidTopic { .. })), "{bad:?}: {refused:?}");
    }
}

/// Every member receives `n` messages, and no more.
async fn each_gets_exactly(bus: &impl EventBus, members: &mut [busbar::Subscription], n: usize) {
    bus.flush().await.unwrap();
    for m in members.iter_mut() {
        for _ in 0..n {
            next(m).await;
        }
    }
    bus.flush().await.unwrap();
    assert!(members.iter_mut().all(|m| m.try_next().is_none()), "{n} each, no more");
}

/// Responders on `patterns` that answer with nothing and count what each served.
async fn counting_responders<const N: usize>(
    bus: &impl EventBus,
    patterns: [Pattern; N],
) -> (Arc<[AtomicUsize; N]>, Vec<busbar::HandlerTask>) {
    let served: Arc<[AtomicUsize; N]> = Arc::new(std::array::from_fn(|_| AtomicUsize::new(0)));
    let mut handlers = Vec::new();
    for (i, pattern) in patterns.into_iter().enumerate() {
        let served = served.clone();
        let handler = bus
            .respond(pattern, move |_| {
                served[i].fetch_add(1, Ordering::Relaxed);
                async { Ok::<_, String>("") }
            })
            .await
            .unwrap();
        handlers.push(handler);
    }
    (served, handlers)
}

/// Round-robin takes turns per topic, even when members of one group (or responders in no group)
/// match different topics and those topics are published in turn.
async fn round_robin_is_fair_when_topics_interleave(bus: &impl EventBus) {
    let (served, _handlers) =
        counting_responders(bus, ["rrq.a", "rrq.a", "rrq.b", "rrq.b"].map(Pattern::new)).await;
    let mut members = Vec::new();
    for topic in ["rre.a", "rre.a", "rre.b", "rre.b"] {
        let pattern = Pattern::new(topic).group("mixed", GroupPolicy::RoundRobin);
        members.push(bus.subscribe(pattern).await.unwrap());
    }
    for _ in 0..10 {
        for topic in ["a", "b"] {
            bus.request(format!("rrq.{topic}"), "", LONG).await.unwrap();
            bus.publish(format!("rre.{topic}"), "").await.unwrap();
        }
    }
    let served: Vec<usize> = served.iter().map(|n| n.load(Ordering::Relaxed)).collect();
    assert_eq!(served, [5; 4], "responders in no group");
    // A responder in no group, busy on its own topics, still takes its turn beside a group's
    // members on a topic they share (every turn is told by the same clock).
    let (served, _handlers) = counting_responders(
        bus,
        [
            Pattern::new("rrm.>"),
            Pattern::new("rrm.y").group("g", GroupPolicy::RoundRobin),
            Pattern::new("rrm.y").group("g", GroupPolicy::RoundRobin),
        ],
    )
    .await;
    for _ in 0..20 {
        bus.request("rrm.z", "", LONG).await.unwrap();
    }
    for _ in 0..30 {
        bus.request("rrm.y", "", LONG).await.unwrap();
    }
    let served: Vec<usize> = served.iter().map(|n| n.load(Ordering::Relaxed)).collect();
    assert_eq!(served, [30, 10, 10], "20 alone on rrm.z, then a third each of rrm.y");
    each_gets_exactly(bus, &mut members, 5).await;
}

/// A requester that stopped waiting (timed out, or had the answers it wanted) does not stop the
/// responder: its late reply is dropped and the next request is served.
async fn a_responder_outlives_abandoned_requests(bus: &impl EventBus) {
    let release = Arc::new(tokio::sync::Notify::new());
    let mut handlers = Vec::new();
    for name in ["late.a", "late.b"] {
        let release = release.clone();
        let handler = bus
            .respond("late", move |m| {
                let release = release.clone();
                async move {
                    // "hold" holds whoever gets it; a responder's own name holds only it.
                    if matches!(m.payload_str(), Some(p) if p == "hold" || p == name) {
                        release.notified().await;
                    }
                    Ok::<_, String>(name)
                }
            })
            .await
            .unwrap();
        handlers.push(handler);
    }
    // One responder holds this request past its timeout, then answers it.
    assert!(matches!(bus.request("late", "hold", Duration::from_millis(50)).await, Err(Error::Timeout)));
    release.notify_one();
    // Scatter-gather content with the first answer (from late.a): late.b answers after it.
    let first = bus.request_all("late", "late.b", LONG, Some(1)).await.unwrap();
    assert_eq!(
        first.into_iter().map(|a| a.unwrap().payload_str().unwrap().to_string()).collect::<Vec<_>>(),
        ["late.a"]
    );
    release.notify_one();
    // Both replied to requesters that were gone, and both still serve.
    let answers = bus.request_all("late", "fast", LONG, None).await.unwrap();
    let mut names: Vec<String> =
        answers.into_iter().map(|a| a.unwrap().payload_str().unwrap().to_string()).collect();
    names.sort();
    assert_eq!(names, ["late.a", "late.b"]);
}

/// Addressed by service name (the suite's bus is "suite"), a message reaches only that service:
/// its own name reaches it, any other name or service id reaches no one here.
async fn direct_addressing(bus: &impl EventBus) {
    let _echo =
        bus.respond("direct.echo", |m| async move { Ok::<_, String>(m.payload().clone()) }).await.unwrap();
    let mut notes = bus.subscribe("direct.note").await.unwrap();
    let mine = bus.request_message(Outgoing::new("direct.echo", "me").to_service("suite"), LONG).await;
    assert_eq!(mine.unwrap().payload_str(), Some("me"));
    let ghost = bus.request_message(Outgoing::new("direct.echo", "").to_service("ghost"), LONG).await;
    assert!(matches!(ghost, Err(Error::NoResponders { .. })), "{ghost:?}");
    let by_id = bus.request_message(Outgoing::new("direct.echo", "").to(0x7fff_fff0), LONG).await;
    assert!(matches!(by_id, Err(Error::NoResponders { .. })), "{by_id:?}");
    bus.publish_message(Outgoing::new("direct.note", "ghost").to_service("ghost")).await.unwrap();
    bus.publish_message(Outgoing::new("direct.note", "other id").to(0x7fff_fff0)).await.unwrap();
    bus.publish_message(Outgoing::new("direct.note", "me").to_service("suite")).await.unwrap();
    assert_eq!(next(&mut notes).await.payload_str(), Some("me"));
    bus.flush().await.unwrap();
    assert!(notes.try_next().is_none());
}

async fn a_handler_panicking_before_its_future_keeps_serving(bus: &(impl EventBus + Clone)) {
    // Both closures panic while they build their future (a payload that does not parse, say),
    // not inside it: the handler task must catch that too, and go on.
    let mut seen = bus.subscribe("parsed.ok").await.unwrap();
    let b = bus.clone();
    let _h = bus
        .subscribe_with("parse.me", move |m| {
            let n: u32 = m.payload_str().unwrap().parse().expect("a number");
            let b = b.clone();
            async move { b.publish("parsed.ok", n.to_string()).await.unwrap() }
        })
        .await
        .unwrap();
    let _r = bus
        .respond("parse.req", |m| {
            let n: u32 = m.payload_str().unwrap().parse().expect("a number");
            async move { Ok::<_, String>((n + 1).to_string()) }
        })
        .await
        .unwrap();
    bus.publish("parse.me", "not a number").await.unwrap();
    bus.publish("parse.me", "7").await.unwrap();
    assert_eq!(next(&mut seen).await.payload_str(), Some("7"), "the next message is handled");
    let failed = bus.request("parse.req", "nope", LONG).await;
    assert!(matches!(&failed, Err(Error::Handler(t)) if t.contains("panicked")), "{failed:?}");
    assert_eq!(bus.request("parse.req", "1", LONG).await.unwrap().payload_str(), Some("2"));
}

async fn whole_suite(bus: AnyBus) {
    pub_sub_with_wildcards(&bus).await;
    handler_runs_and_propagates_the_transaction(&bus).await;
    queries_and_errors(&bus).await;
    commands_reach_one_handler(&bus).await;
    scatter_gather(&bus).await;
    groups_round_robin(&bus).await;
    a_responder_outlives_abandoned_requests(&bus).await;
    round_robin_is_fair_when_topics_interleave(&bus).await;
    direct_addressing(&bus).await;
    a_handler_panicking_before_its_future_keeps_serving(&bus).await;
}

#[tokio::test]
async fn suite_on_the_in_process_bus() {
    let bus = AnyBus::new(BusConfig::Local(BusOptions::default().service("suite"))).await.unwrap();
    assert!(matches!(bus, AnyBus::Local(_)));
    whole_suite(bus).await;
}

#[tokio::test]
async fn suite_over_a_broker() {
    let broker = Broker::start(common::config()).await.unwrap();
    let bus =
        AnyBus::new(BusConfig::Remote(ClientOptions::new(broker.local_addr().to_string()).service("suite")))
            .await
            .unwrap();
    assert!(matches!(bus, AnyBus::Remote(_)));
    whole_suite(bus).await;
}

/// With one request of buffer per responder: a responder whose buffer is full refuses at once
/// with TooManyRequests, for a request and as one answer of a scatter-gather, on both transports.
async fn full_responders_refuse(bus: AnyBus) {
    let _held = bus.requests("full").await.unwrap(); // never read
    let _free = bus.respond("full", |_| async { Ok::<_, String>("free") }).await.unwrap();
    // Round-robin: the first goes to the held responder (it subscribed first) and stays in its
    // buffer; the second to the free one; the third to the held one again, whose buffer is full.
    let first = bus.request("full", "1", Duration::from_millis(300)).await;
    assert!(matches!(first, Err(Error::Timeout)), "{first:?}");
    assert_eq!(bus.request("full", "2", LONG).await.unwrap().payload_str(), Some("free"));
    let third = bus.request("full", "3", Duration::from_secs(5)).await;
    assert!(
        matches!(&third, Err(Error::Server { code: busbar_core::ErrorCode::TooManyRequests, .. })),
        "{third:?}"
    );
    let answers = bus.request_all("full", "all", Duration::from_secs(5), None).await.unwrap();
    let mut outcomes: Vec<String> = answers
        .into_iter()
        .map(|a| match a {
            Ok(m) => m.payload_str().unwrap().to_string(),
            Err(e) => format!("{:?}", e.code()),
        })
        .collect();
    outcomes.sort();
    assert_eq!(outcomes, ["Some(TooManyRequests)", "free"]);
    // A refusal counts as an answer: content with one, the gather stops at one.
    assert_eq!(bus.request_all("full", "one", Duration::from_secs(5), Some(1)).await.unwrap().len(), 1);
}

#[tokio::test]
async fn full_responders_refuse_in_process() {
    let options = BusOptions { subscription_capacity: 1, ..BusOptions::default() };
    full_responders_refuse(AnyBus::new(BusConfig::Local(options)).await.unwrap()).await;
}

#[tokio::test]
async fn full_responders_refuse_over_a_broker() {
    let broker = Broker::start(common::config()).await.unwrap();
    let options =
        ClientOptions { subscription_capacity: 1, ..ClientOptions::new(broker.local_addr().to_string()) };
    full_responders_refuse(AnyBus::new(BusConfig::Remote(options)).await.unwrap()).await;
}
