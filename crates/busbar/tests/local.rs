//! The in-process bus on its own: handlers, regex, strict topics, isolation, requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use busbar::local::{Bus, BusOptions, Delivery};
use busbar::{Error, EventBus, GroupPolicy, Outgoing, Pattern};
use bytes::Bytes;

const LONG: Duration = Duration::from_secs(60);

fn recorder() -> (Arc<Mutex<Vec<String>>>, impl Fn(&busbar::Message) + Send + Sync + Clone + 'static) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    (seen, move |m: &busbar::Message| s.lock().unwrap().push(m.topic().to_string()))
}

#[test]
fn wildcard_and_regex_handlers() {
    let bus = Bus::new();
    let (star, on_star) = recorder();
    let (rest, on_rest) = recorder();
    let (re, on_re) = recorder();
    let _a = bus.on("order.*", on_star).unwrap();
    let _b = bus.on("order.>", on_rest).unwrap();
    let _c = bus.on_regex(r"^order\.(created|paid)$", on_re).unwrap();
    for topic in ["order.created", "order.paid", "order.item.added", "order", "invoice.created"] {
        bus.publish(topic, "x").unwrap();
    }
    assert_eq!(*star.lock().unwrap(), ["order.created", "order.paid"]);
    assert_eq!(*rest.lock().unwrap(), ["order.created", "order.paid", "order.item.added"]);
    assert_eq!(*re.lock().unwrap(), ["order.created", "order.paid"]);
}

#[test]
fn invalid_regex_and_patterns_are_errors_not_ignored() {
    let bus = Bus::new();
    match bus.on_regex("order.(created", |_| ()) {
        Err(Error::InvalidRegex { regex, reason }) => {
            assert_eq!(regex, "order.(created");
            assert!(!reason.is_empty());
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(bus.on("a.>.b", |_| ()), Err(Error::InvalidTopic { .. })));
    assert!(matches!(bus.publish("a.*", ""), Err(Error::InvalidTopic { .. })));
    assert_eq!(bus.subscription_count(), 0);
}

#[test]
fn strict_registration_refuses_unknown_topics() {
    let bus = Bus::strict();
    bus.register_topics(["order.created", "order.paid"]).unwrap();
    let (seen, record) = recorder();
    let _h = bus.on(">", record).unwrap();
    bus.publish("order.created", "").unwrap();
    match bus.publish("order.cancelled", "") {
        Err(Error::UnknownTopic { topic }) => assert_eq!(topic, "order.cancelled"),
        other => panic!("{other:?}"),
    }
    assert_eq!(*seen.lock().unwrap(), ["order.created"]);
    assert!(matches!(bus.register_topics(["bad..topic"]), Err(Error::InvalidTopic { .. })));
}

#[tokio::test]
async fn strict_registration_covers_requests_and_commands() {
    let bus = Bus::strict();
    bus.register_topics(["order.get"]).unwrap();
    let _h = bus.respond("order.>", |_m| async move { Ok::<_, String>("ok") }).await.unwrap();
    assert_eq!(bus.request("order.get", "", LONG).await.unwrap().payload_str(), Some("ok"));
    let unknown =
        |r: Result<_, Error>| matches!(r, Err(Error::UnknownTopic { topic }) if topic == "order.lost");
    assert!(unknown(bus.request("order.lost", "", LONG).await.map(|_| ())));
    assert!(unknown(bus.request_all("order.lost", "", LONG, None).await.map(|_| ())));
    assert!(unknown(bus.send_command("order.lost", &1, LONG).await));
}

#[test]
fn a_handler_that_publishes_what_it_handles_is_stopped_at_a_depth_not_by_the_stack() {
    let bus = Bus::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(Mutex::new(None));
    let (b, c, r) = (bus.clone(), calls.clone(), refused.clone());
    let _audit = bus
        .on(">", move |_m| {
            c.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = b.publish("audit.seen", "") {
                r.lock().unwrap().get_or_insert(e.to_string());
            }
        })
        .unwrap();
    bus.publish("order.created", "").unwrap();
    assert_eq!(calls.load(Ordering::Relaxed), 64, "one per level");
    let refused = refused.lock().unwrap().clone().expect("the 65th publish refused");
    assert!(refused.contains("nested 64 deep"), "{refused}");
    // The depth is back to zero afterwards.
    calls.store(0, Ordering::Relaxed);
    bus.publish("order.created", "").unwrap();
    assert_eq!(calls.load(Ordering::Relaxed), 64);
}

#[test]
fn a_failing_or_panicking_handler_is_reported_and_never_skips_the_others() {
    let bus = Bus::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut regs = Vec::new();
    for i in 0..5 {
        let calls = calls.clone();
        regs.push(
            bus.on("job.run", move |_m| -> Result<(), String> {
                calls.fetch_add(1, Ordering::Relaxed);
                match i {
                    1 => panic!("handler {i} has a bug"),
                    3 => Err(format!("handler {i} refused")),
                    _ => Ok(()),
                }
            })
            .unwrap(),
        );
    }
    let Delivery { delivered, failures } = bus.publish("job.run", "").unwrap();
    assert_eq!(calls.load(Ordering::Relaxed), 5, "every handler ran");
    assert_eq!(delivered, 3);
    assert_eq!(failures.len(), 2);
    let panicked = failures.iter().find(|f| f.panicked).unwrap();
    assert_eq!(panicked.subscription, regs[1].id());
    assert!(panicked.error.contains("handler 1 has a bug"), "{}", panicked.error);
    let refused = failures.iter().find(|f| !f.panicked).unwrap();
    assert_eq!((refused.subscription, refused.error.as_str()), (regs[3].id(), "handler 3 refused"));
    // And the bus still works afterwards.
    assert_eq!(bus.publish("job.run", "").unwrap().delivered, 3);
}

#[test]
fn handlers_may_publish_and_subscribe_while_they_run() {
    let bus = Bus::new();
    let (seen, record) = recorder();
    let _sink = bus.on("step.>", record).unwrap();
    let b = bus.clone();
    let later = Arc::new(Mutex::new(Vec::new()));
    let l = later.clone();
    let _chain = bus
        .on("step.one", move |m| {
            // Re-entrant publish, and a new subscription, from inside a handler.
            b.publish("step.two", m.payload().clone()).unwrap();
            l.lock().unwrap().push(b.on("step.three", |_| ()).unwrap());
        })
        .unwrap();
    bus.publish("step.one", "go").unwrap();
    // Handlers of one message run in no promised order; a nested publish runs at once.
    let mut got = seen.lock().unwrap().clone();
    got.sort();
    assert_eq!(got, ["step.one", "step.two"]);
    assert_eq!(bus.subscription_count(), 3);
    later.lock().unwrap().clear();
    assert_eq!(bus.subscription_count(), 2, "dropping a Registration unsubscribes");
}

#[test]
fn registrations_unsubscribe_on_drop_unless_detached() {
    let bus = Bus::new();
    let (seen, record) = recorder();
    let r = bus.on("a", record.clone()).unwrap();
    bus.on("b", record).unwrap().detach();
    bus.publish("a", "").unwrap();
    drop(r);
    bus.publish("a", "").unwrap();
    bus.publish("b", "").unwrap();
    assert_eq!(*seen.lock().unwrap(), ["a", "b"]);
}

#[test]
fn sync_handlers_pass_their_transaction_on() {
    let bus = Bus::new();
    let b = bus.clone();
    let _h = bus
        .on("order.created", move |_| {
            b.publish("invoice.created", "").unwrap();
        })
        .unwrap();
    let tx = Arc::new(Mutex::new(Vec::new()));
    let t = tx.clone();
    let _w = bus
        .on(">", move |m| t.lock().unwrap().push((m.topic().to_string(), m.id(), m.transaction())))
        .unwrap();
    bus.publish("order.created", "").unwrap();
    let seen = tx.lock().unwrap();
    let order = seen.iter().find(|(t, ..)| t == "order.created").unwrap();
    let invoice = seen.iter().find(|(t, ..)| t == "invoice.created").unwrap();
    assert_eq!(order.2, order.1, "a new transaction starts with the message's own id");
    assert_eq!(invoice.2, order.2, "the invoice inherits the order's transaction");
    assert_ne!(invoice.1, order.1);
}

#[test]
fn groups_balance_sync_handlers() {
    let bus = Bus::new();
    let counts: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
    let mut regs = Vec::new();
    for i in 0..3 {
        let counts = counts.clone();
        let pattern = Pattern::new("work").group("workers", GroupPolicy::RoundRobin);
        regs.push(
            bus.on(pattern, move |_| {
                counts[i].fetch_add(1, Ordering::Relaxed);
            })
            .unwrap(),
        );
    }
    let (seen, record) = recorder();
    let _plain = bus.on("work", record).unwrap();
    for _ in 0..300 {
        assert_eq!(bus.publish("work", "").unwrap().delivered, 2, "one group member plus the plain handler");
    }
    let spread: Vec<usize> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    assert_eq!(spread, [100, 100, 100]);
    assert_eq!(seen.lock().unwrap().len(), 300);
    let other = Pattern::new("work").group("workers", GroupPolicy::Hash);
    assert!(bus.on(other, |_| ()).is_err(), "a group keeps one policy");
}

#[test]
fn a_full_stream_buffer_drops_and_counts() {
    let bus = Bus::with_options(BusOptions { subscription_capacity: 2, ..BusOptions::default() });
    let sub = bus.subscribe("t").unwrap();
    for _ in 0..5 {
        bus.publish("t", "").unwrap();
    }
    assert_eq!(sub.dropped(), 3);
    let d = bus.publish("t", "").unwrap();
    assert_eq!(d.failures[0].error, "buffer full");
}

#[tokio::test]
async fn commands_and_queries_work_in_process() {
    let bus = Bus::new();
    let _adder = bus
        .respond("math.add", |m| async move {
            let (a, b): (i64, i64) = m.json().map_err(|e| e.to_string())?;
            Ok::<_, String>(serde_json::to_vec(&(a + b)).unwrap())
        })
        .await
        .unwrap();
    let sum: i64 = bus.query("math.add", &(2, 40), LONG).await.unwrap();
    assert_eq!(sum, 42);

    let shipped = Arc::new(AtomicUsize::new(0));
    let s = shipped.clone();
    let _shipper = bus
        .handle_commands("cmd.ship", move |m| {
            let s = s.clone();
            async move {
                if m.payload().as_ref() == b"0" {
                    return Err("no such order");
                }
                s.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        })
        .await
        .unwrap();
    bus.send_command("cmd.ship", &7, LONG).await.unwrap();
    assert_eq!(shipped.load(Ordering::Relaxed), 1);
    assert!(
        matches!(bus.send_command("cmd.ship", &0, LONG).await, Err(Error::Handler(t)) if t == "no such order")
    );
    assert!(matches!(bus.request("nobody", "", LONG).await, Err(Error::NoResponders { .. })));

    let mut held = bus.requests("slow").unwrap();
    let b = bus.clone();
    let pending = tokio::spawn(async move { b.request("slow", "", Duration::from_millis(100)).await });
    let request = held.next().await.unwrap();
    assert!(matches!(pending.await.unwrap(), Err(Error::Timeout)));
    drop(request);
}

#[tokio::test]
async fn scatter_gather_in_process() {
    let bus = Bus::new();
    let mut handlers = Vec::new();
    for i in 0..3 {
        handlers.push(
            bus.respond("census", move |_| async move { Ok::<_, String>(Bytes::from(vec![i])) })
                .await
                .unwrap(),
        );
    }
    let answers = bus.request_all("census", "", LONG, None).await.unwrap();
    let mut got: Vec<u8> = answers.into_iter().map(|a| a.unwrap().payload()[0]).collect();
    got.sort();
    assert_eq!(got, [0, 1, 2]);
    assert_eq!(bus.request_all("census", "", LONG, Some(1)).await.unwrap().len(), 1);
    let reply = bus.request_message(Outgoing::new("census", "").transaction(9), LONG).await.unwrap();
    assert_eq!(reply.transaction(), 9);
}

#[test]
fn a_handler_that_owns_a_registration_of_the_same_bus_can_be_dropped() {
    // Dropping the outer registration drops the handler, which drops the inner registration,
    // which unsubscribes: that must not deadlock on the bus's writer lock.
    let bus = Bus::new();
    let inner = bus.on("inner", |_| ()).unwrap();
    let outer = bus
        .on("outer", move |_| {
            let _keep = &inner;
        })
        .unwrap();
    assert_eq!(bus.subscription_count(), 2);
    drop(outer);
    assert_eq!(bus.subscription_count(), 0);
}

#[test]
fn a_refused_handler_that_owns_a_registration_of_the_same_bus_is_dropped_without_deadlock() {
    // The group exists under another policy, so the handler is refused and dropped: that drops
    // the inner registration, which unsubscribes, taking the bus's writer lock.
    let bus = Bus::new();
    let member = bus.on(Pattern::new("work").group("g", GroupPolicy::Random), |_| ()).unwrap();
    let inner = bus.on("inner", |_| ()).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let b = bus.clone();
    std::thread::spawn(move || {
        let refused = b.on(Pattern::new("work").group("g", GroupPolicy::RoundRobin), move |_| {
            let _keep = &inner;
        });
        done_tx.send(refused.is_err()).unwrap();
    });
    let Ok(refused) = done_rx.recv_timeout(Duration::from_secs(10)) else {
        // Dropping `member` would wait for the lock too: fail rather than hang.
        let _leaked = std::mem::ManuallyDrop::new(member);
        panic!("deadlock: the refused handler was dropped under the bus's writer lock");
    };
    assert!(refused, "a clashing policy is an error");
    assert_eq!(bus.subscription_count(), 1, "the inner registration went with the refused handler");
    drop(member);
}

#[test]
fn a_destination_id_decides_before_a_service_name_as_at_the_broker() {
    let bus = Bus::with_options(BusOptions { source: 7, ..BusOptions::default().service("s") });
    let _h = bus.on("d", |_| ()).unwrap();
    let both = bus.publish_message(Outgoing::new("d", "").to(7).to_service("ghost")).unwrap();
    assert_eq!(both.delivered, 1, "its own id: delivered whatever the name");
    assert_eq!(bus.publish_message(Outgoing::new("d", "").to(8).to_service("s")).unwrap().delivered, 0);
    assert_eq!(bus.publish_message(Outgoing::new("d", "").to_service("s")).unwrap().delivered, 1);
    assert_eq!(bus.publish_message(Outgoing::new("d", "").to_service("ghost")).unwrap().delivered, 0);
}

#[tokio::test]
async fn through_the_event_bus_trait_nothing_happens_until_polled() {
    // As with the network client: a future dropped unpolled does nothing.
    let bus = Bus::new();
    let mut sub = EventBus::subscribe(&bus, "lazy").await.unwrap();
    drop(EventBus::publish(&bus, "lazy", "never"));
    drop(EventBus::subscribe(&bus, "lazy.other"));
    EventBus::publish(&bus, "lazy", "polled").await.unwrap();
    assert_eq!(sub.try_next().unwrap().payload_str(), Some("polled"));
    assert!(sub.try_next().is_none());
    assert_eq!(bus.subscription_count(), 1);
}

/// A handler that publishes runs after its message is in the streams: a stream sees the cause
/// before the effect, as over a broker.
#[tokio::test]
async fn a_stream_sees_a_message_before_what_its_handlers_publish() {
    let bus = Bus::new();
    let mut log = bus.subscribe("a.>").unwrap();
    let b = bus.clone();
    let _cause = bus
        .on("a.x", move |_m: &busbar::Message| {
            b.publish("a.y", "effect").unwrap();
        })
        .unwrap();
    bus.publish("a.x", "cause").unwrap();
    let first = log.next().await.unwrap();
    let second = log.next().await.unwrap();
    assert_eq!((first.topic(), second.topic()), ("a.x", "a.y"));
}
