//! NATS clients on the busbar broker: the async-nats client against `--nats-listen`, NATS and
//! native clients on one bus in both directions, and the protocol's edges over raw TCP.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::client::RequestErrorKind;
use busbar::{Client, ClientOptions, EventBus, Outgoing};
use busbar_broker::{AuthConfig, Broker, Config, Permissions, Rules, User, hash_password};
use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Long enough never to be reached when things work.
const LONG: Duration = Duration::from_secs(60);

fn nats_config() -> Config {
    let mut config = common::config();
    config.nats_listen = Some("127.0.0.1:0".parse().unwrap());
    config
}

async fn nats_broker() -> Broker {
    broker_with(nats_config()).await
}

fn nats_url(broker: &Broker) -> String {
    format!("nats://{}", broker.nats_addr().expect("NATS listener on"))
}

async fn nats(broker: &Broker) -> async_nats::Client {
    async_nats::connect(nats_url(broker)).await.expect("NATS client connects")
}

/// The next message of a subscription, within [`PATIENCE`].
async fn next(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(PATIENCE, sub.next()).await.expect("a message in time").expect("subscription open")
}

/// Nothing more arrives on `sub` for a while (used after a round trip that proves delivery).
async fn nothing_more(sub: &mut async_nats::Subscriber) {
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
        panic!("unexpected message on {}: {:?}", m.subject, m.payload);
    }
}

async fn next_native(sub: &mut busbar::Subscription) -> busbar::Message {
    tokio::time::timeout(PATIENCE, sub.next()).await.expect("a message in time").expect("subscription open")
}

#[tokio::test]
async fn nats_clients_publish_and_subscribe_with_wildcards() {
    let broker = nats_broker().await;
    let a = nats(&broker).await;
    let b = nats(&broker).await;
    let mut exact = b.subscribe("orders.created").await.unwrap();
    let mut star = b.subscribe("orders.*").await.unwrap();
    let mut rest = b.subscribe("orders.>").await.unwrap();
    b.flush().await.unwrap();
    a.publish("orders.created", "1".into()).await.unwrap();
    a.publish("orders.eu.shipped", "2".into()).await.unwrap();
    a.flush().await.unwrap();
    assert_eq!(next(&mut exact).await.payload, "1");
    assert_eq!(next(&mut star).await.payload, "1");
    let m = next(&mut rest).await;
    assert_eq!((m.subject.as_str(), &m.payload[..]), ("orders.created", &b"1"[..]));
    assert_eq!(next(&mut rest).await.subject.as_str(), "orders.eu.shipped");
    nothing_more(&mut star).await;
    nothing_more(&mut exact).await;
}

#[tokio::test]
async fn nats_and_native_clients_see_each_others_messages_and_headers() {
    let broker = nats_broker().await;
    let nc = nats(&broker).await;
    let native = client(&broker).await;
    let mut from_native = nc.subscribe("mixed.>").await.unwrap();
    nc.flush().await.unwrap();
    let mut from_nats = native.subscribe("mixed.*").await.unwrap();
    native.flush().await.unwrap();

    // NATS → native, headers become envelope headers.
    let mut headers = HeaderMap::new();
    headers.insert("Trace", "abc");
    nc.publish_with_headers("mixed.a", headers, "hello".into()).await.unwrap();
    nc.flush().await.unwrap();
    let m = next_native(&mut from_nats).await;
    assert_eq!((m.topic(), m.payload_str()), ("mixed.a", Some("hello")));
    assert_eq!(m.headers().get("Trace"), Some("abc"));
    assert_eq!(next(&mut from_native).await.payload, "hello", "echo is on by default");

    // native → NATS: the envelope shows as Busbar-* headers.
    native.publish_message(Outgoing::new("mixed.b", "world").header("K", "v")).await.unwrap();
    let m = next(&mut from_native).await;
    assert_eq!((m.subject.as_str(), &m.payload[..]), ("mixed.b", &b"world"[..]));
    let h = m.headers.expect("envelope headers");
    assert_eq!(h.get("K").map(|v| v.as_str()), Some("v"));
    let id = h.get("Busbar-Id").expect("message id").as_str();
    assert!(busbar::core::id::parse_id(id).is_some_and(|id| id != 0), "{id}");
    assert!(h.get("Busbar-Tx").is_some() && h.get("Busbar-Time").is_some());
}

#[tokio::test]
async fn envelope_headers_from_nats_fill_the_envelope() {
    let broker = nats_broker().await;
    let nc = nats(&broker).await;
    let native = client(&broker).await;
    let mut sub = native.subscribe("env").await.unwrap();
    native.flush().await.unwrap();
    let tx = busbar::core::id::format_id(0xABCDEF);
    let mut headers = HeaderMap::new();
    headers.insert("Busbar-Tx", tx.as_str());
    nc.publish_with_headers("env", headers, "x".into()).await.unwrap();
    nc.flush().await.unwrap();
    let m = next_native(&mut sub).await;
    assert_eq!(m.transaction(), 0xABCDEF);
    assert!(m.headers().get("Busbar-Tx").is_none(), "moved into the envelope");
}

#[tokio::test]
async fn queue_groups_deliver_each_message_once_across_members() {
    let broker = nats_broker().await;
    let publisher = nats(&broker).await;
    let mut members = Vec::new();
    for _ in 0..3 {
        let c = nats(&broker).await;
        let sub = c.queue_subscribe("jobs", "workers".into()).await.unwrap();
        c.flush().await.unwrap();
        members.push((c, sub));
    }
    // A plain subscriber beside the group gets everything.
    let mut all = publisher.subscribe("jobs").await.unwrap();
    publisher.flush().await.unwrap();
    const N: usize = 90;
    for i in 0..N {
        publisher.publish("jobs", i.to_string().into()).await.unwrap();
    }
    publisher.flush().await.unwrap();
    for _ in 0..N {
        next(&mut all).await;
    }
    let mut seen = HashMap::new();
    let mut per_member = Vec::new();
    for (_, sub) in &mut members {
        let mut n = 0;
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
            *seen.entry(m.payload.clone()).or_insert(0) += 1;
            n += 1;
        }
        per_member.push(n);
    }
    assert_eq!(seen.len(), N, "every message reached the group");
    assert!(seen.values().all(|&n| n == 1), "and exactly one member each");
    assert!(per_member.iter().all(|&n| n > 0), "spread across members: {per_member:?}");
}

#[tokio::test]
async fn nats_queue_group_and_native_group_are_one_group() {
    let broker = nats_broker().await;
    let nc = nats(&broker).await;
    let mut nats_member = nc.queue_subscribe("shared.work", "pool".into()).await.unwrap();
    nc.flush().await.unwrap();
    let native = client(&broker).await;
    let pattern = busbar::Pattern::new("shared.work").group("pool", busbar::GroupPolicy::Random);
    let mut native_member = native.subscribe(pattern).await.unwrap();
    native.flush().await.unwrap();
    let publisher = client(&broker).await;
    const N: usize = 60;
    for i in 0..N {
        publisher.publish("shared.work", i.to_string()).await.unwrap();
    }
    publisher.flush().await.unwrap();
    let mut got = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), nats_member.next()).await {
        got += 1;
    }
    let nats_got = got;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), native_member.next()).await {
        got += 1;
    }
    assert_eq!(got, N, "each message to one member of the shared group");
    assert!(nats_got > 0 && nats_got < N, "both protocols take a share: {nats_got} of {N}");
}

#[tokio::test]
async fn request_reply_between_nats_clients() {
    let broker = nats_broker().await;
    let responder = nats(&broker).await;
    let mut service = responder.subscribe("math.double").await.unwrap();
    responder.flush().await.unwrap();
    let r = responder.clone();
    tokio::spawn(async move {
        while let Some(m) = service.next().await {
            let n: u64 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
            r.publish(m.reply.unwrap(), (n * 2).to_string().into()).await.unwrap();
        }
    });
    let requester = nats(&broker).await;
    let reply = requester.request("math.double", "21".into()).await.unwrap();
    assert_eq!(reply.payload, "42");
}

#[tokio::test]
async fn native_request_is_answered_by_a_nats_responder() {
    let broker = nats_broker().await;
    let responder = nats(&broker).await;
    let mut service = responder.subscribe("greet.*").await.unwrap();
    responder.flush().await.unwrap();
    let r = responder.clone();
    tokio::spawn(async move {
        while let Some(m) = service.next().await {
            let name = String::from_utf8_lossy(&m.payload).to_string();
            let mut headers = HeaderMap::new();
            headers.insert("Answered-By", "nats");
            r.publish_with_headers(m.reply.unwrap(), headers, format!("hello {name}").into()).await.unwrap();
        }
    });
    let native = client(&broker).await;
    let reply = native.request("greet.en", "ada", LONG).await.unwrap();
    assert_eq!(reply.payload_str(), Some("hello ada"));
    assert_eq!(reply.topic(), "greet.en", "a reply carries the request's topic");
    assert_eq!(reply.headers().get("Answered-By"), Some("nats"));
    assert_eq!(broker.stats().requests_pending, 0);
}

#[tokio::test]
async fn nats_request_is_answered_by_a_native_responder() {
    let broker = nats_broker().await;
    let native = client(&broker).await;
    let _h = native
        .respond("inventory.count", |m| async move {
            Ok::<_, String>(format!("{} left", m.payload_str().unwrap_or("?")))
        })
        .await
        .unwrap();
    native.flush().await.unwrap();
    let nc = nats(&broker).await;
    let reply = nc.request("inventory.count", "7".into()).await.unwrap();
    assert_eq!(reply.payload, "7 left");
    // An error reply reaches the NATS requester with its code in a header.
    let _failing =
        native.respond("inventory.fail", |_m| async move { Err::<Bytes, _>("out of stock") }).await.unwrap();
    native.flush().await.unwrap();
    let reply = nc.request("inventory.fail", "".into()).await.unwrap();
    assert!(reply.headers.unwrap().get("Busbar-Error").is_some());
    assert_eq!(broker.stats().requests_pending, 0);
}

#[tokio::test]
async fn a_native_subscriber_answers_a_nats_request_on_its_reply_subject() {
    let broker = nats_broker().await;
    let native = client(&broker).await;
    let mut events = native.subscribe("ask").await.unwrap();
    native.flush().await.unwrap();
    let answerer = native.clone();
    tokio::spawn(async move {
        while let Some(m) = events.next().await {
            let to = m.reply_to().expect("a NATS request carries its reply subject").to_string();
            answerer.publish(to, "answer").await.unwrap();
        }
    });
    let nc = nats(&broker).await;
    let reply = nc.request("ask", "question".into()).await.unwrap();
    assert_eq!(reply.payload, "answer");
}

#[tokio::test]
async fn no_responders_is_reported_at_once() {
    let broker = nats_broker().await;
    let nc = nats(&broker).await;
    let request = nc.send_request("nobody.here", async_nats::Request::new().timeout(Some(LONG)));
    let err = tokio::time::timeout(PATIENCE, request).await.expect("answered before the bound").unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::NoResponders);
    // A native requester to a topic nobody serves in either protocol: the same, at once.
    let native = client(&broker).await;
    let answer = tokio::time::timeout(PATIENCE, native.request("nobody.here", "?", LONG)).await.unwrap();
    assert!(matches!(answer, Err(busbar::Error::NoResponders { .. })), "{answer:?}");
}

#[tokio::test]
async fn unsubscribe_after_max_messages() {
    let broker = nats_broker().await;
    let nc = nats(&broker).await;
    let mut sub = nc.subscribe("limited").await.unwrap();
    sub.unsubscribe_after(3).await.unwrap();
    nc.flush().await.unwrap();
    let native = client(&broker).await;
    for i in 0..10 {
        native.publish("limited", i.to_string()).await.unwrap();
    }
    native.flush().await.unwrap();
    for i in 0..3 {
        assert_eq!(next(&mut sub).await.payload, i.to_string());
    }
    let after = tokio::time::timeout(PATIENCE, sub.next()).await.expect("the subscription ends");
    assert!(after.is_none(), "no fourth message: {after:?}");
    eventually("the broker forgot the subscription", || broker.stats().subscriptions == 0).await;
}

/// A NATS subscriber that stops after one message is sent several native requests at once:
/// the one it sees is answered, and each one past its limit fails at once (ResponderLost when
/// its CALL was already queued, NoResponders once the broker forgot the subscription) instead
/// of waiting out its timeout.
#[tokio::test]
async fn requests_past_a_subscribers_max_msgs_fail_at_once() {
    let broker = nats_broker().await;
    let nc = nats(&broker).await;
    let mut sub = nc.subscribe("once").await.unwrap();
    sub.unsubscribe_after(1).await.unwrap();
    nc.flush().await.unwrap();
    let r = nc.clone();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            r.publish(m.reply.unwrap(), "the one".into()).await.unwrap();
        }
    });
    let native = client(&broker).await;
    let asks: Vec<_> = (0..4).map(|_| native.request("once", "?", LONG)).collect();
    let answers = tokio::time::timeout(PATIENCE, futures_util::future::join_all(asks))
        .await
        .expect("every request ends long before its timeout");
    let ok = answers.iter().filter(|a| a.is_ok()).count();
    assert_eq!(ok, 1, "{answers:?}");
    for a in answers.iter().filter_map(|a| a.as_ref().err()) {
        let code = a.code();
        let lost = code == Some(busbar::ErrorCode::ResponderLost);
        assert!(lost || matches!(a, busbar::Error::NoResponders { .. }), "{a:?}");
    }
    assert_eq!(broker.stats().requests_pending, 0);
}

#[tokio::test]
async fn echo_false_hides_a_clients_own_messages() {
    let broker = nats_broker().await;
    let quiet = async_nats::ConnectOptions::new().no_echo().connect(nats_url(&broker)).await.unwrap();
    let mut own = quiet.subscribe("echo").await.unwrap();
    quiet.flush().await.unwrap();
    let other = nats(&broker).await;
    quiet.publish("echo", "mine".into()).await.unwrap();
    quiet.flush().await.unwrap();
    other.publish("echo", "theirs".into()).await.unwrap();
    other.flush().await.unwrap();
    assert_eq!(next(&mut own).await.payload, "theirs", "its own message was not echoed");
    nothing_more(&mut own).await;
}

/// A NATS broker with one user, "ana" (password "s3cret"), held to `permissions`.
async fn broker_with_ana(permissions: Permissions) -> Broker {
    let mut config = nats_config();
    config.auth = AuthConfig {
        users: vec![User {
            name: "ana".into(),
            password_hash: hash_password("s3cret"),
            permissions: Some(permissions),
        }],
        ..AuthConfig::default()
    };
    broker_with(config).await
}

#[tokio::test]
async fn users_authenticate_and_permissions_apply() {
    let limited = Permissions {
        publish: Rules::only(["allowed.>", "_INBOX.>"]),
        subscribe: Rules::only(["allowed.>", "_INBOX.>"]),
        ..Permissions::default()
    };
    let broker = broker_with_ana(limited).await;
    let url = nats_url(&broker);
    let wrong =
        async_nats::ConnectOptions::new().user_and_password("ana".into(), "nope".into()).connect(&url);
    let refused = tokio::time::timeout(PATIENCE, wrong).await.expect("refused in time");
    assert!(refused.is_err(), "a wrong password is refused");
    assert_eq!(broker.stats().auth_failures, 1);

    let nc = async_nats::ConnectOptions::new()
        .user_and_password("ana".into(), "s3cret".into())
        .connect(&url)
        .await
        .expect("right password admitted");
    let mut sub = nc.subscribe("allowed.x").await.unwrap();
    nc.flush().await.unwrap();
    nc.publish("forbidden", "x".into()).await.unwrap();
    nc.publish("allowed.x", "ok".into()).await.unwrap();
    nc.flush().await.unwrap();
    assert_eq!(next(&mut sub).await.payload, "ok", "a violation does not close the connection");
    eventually("the violation counted", || broker.stats().permission_denied == 1).await;
}

#[tokio::test]
async fn a_denied_queue_subscription_is_named_with_its_queue() {
    let no_queue_q = Permissions { groups: Rules::only(["ok"]), ..Permissions::default() };
    let broker = broker_with_ana(no_queue_q).await;
    let (mut raw, _) = RawNats::connect(&broker).await;
    raw.send(b"CONNECT {\"verbose\":false,\"user\":\"ana\",\"pass\":\"s3cret\"}\r\nSUB a q 1\r\nSUB a ok 2\r\nPING\r\n").await;
    // nats-server's text: clients (nats.go) match subject and queue to flag the subscription.
    assert_eq!(
        raw.line().await.as_deref(),
        Some(r#"-ERR 'Permissions Violation for Subscription to "a" using queue "q"'"#)
    );
    assert_eq!(raw.line().await.as_deref(), Some("PONG"), "the allowed queue subscription is taken");
}

#[tokio::test]
async fn a_header_name_with_a_space_is_carried_not_refused() {
    let broker = nats_broker().await;
    let (mut raw, _) = RawNats::connect(&broker).await;
    raw.send(b"CONNECT {\"verbose\":false,\"headers\":true}\r\nSUB h 1\r\nPING\r\n").await;
    assert_eq!(raw.line().await.as_deref(), Some("PONG"));
    let block = "NATS/1.0\r\nMy Key: 1\r\n\r\n";
    raw.send(format!("HPUB h {} {}\r\n{block}\r\nPING\r\n", block.len(), block.len()).as_bytes()).await;
    assert_eq!(
        raw.line().await.as_deref(),
        Some(format!("HMSG h 1 {} {}", block.len(), block.len()).as_str())
    );
    assert_eq!(raw.payload(block.len()).await, block.as_bytes());
    assert_eq!(raw.line().await.as_deref(), Some("PONG"), "the connection stays open");
}

#[tokio::test]
async fn a_payload_trickling_in_keeps_the_connection_alive() {
    // Dead after 3 × 200 ms without a sign of life; the payload takes 2 s to arrive.
    let config =
        Config { heartbeat_interval: Duration::from_millis(200), heartbeat_max_missed: 2, ..nats_config() };
    let broker = broker_with(config).await;
    let (mut raw, _) = RawNats::connect(&broker).await;
    raw.send(b"CONNECT {\"verbose\":false}\r\nSUB t 1\r\nPING\r\n").await;
    assert_eq!(raw.line().await.as_deref(), Some("PONG"));
    raw.send(b"PUB t 20\r\n").await;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        raw.send(b"x").await;
    }
    raw.send(b"\r\n").await;
    let line = loop {
        match raw.line().await {
            Some(l) if l == "PING" => raw.send(b"PONG\r\n").await,
            other => break other,
        }
    };
    assert_eq!(line.as_deref(), Some("MSG t 1 20"), "delivered, not closed as stale");
    assert_eq!(raw.payload(20).await, vec![b'x'; 20]);
}

#[tokio::test]
async fn a_slow_consumer_is_closed_without_an_err_line() {
    // nats.go and nats.py stop reconnecting on an -ERR they do not know: nats-server sends none.
    let config = Config { max_frame_size: 64 * 1024, max_pending_bytes: 64 * 1024, ..nats_config() };
    let broker = broker_with(config).await;
    let (mut slow, _) = RawNats::connect(&broker).await;
    slow.send(b"CONNECT {\"verbose\":false}\r\nSUB flood 1\r\nPING\r\n").await;
    assert_eq!(slow.line().await.as_deref(), Some("PONG"));
    // From here on `slow` reads nothing until the flood is over.
    let publisher = nats(&broker).await;
    let chunk = Bytes::from(vec![b'x'; 8 * 1024]);
    for _ in 0..2000 {
        publisher.publish("flood", chunk.clone()).await.unwrap();
        if broker.stats().slow_consumers > 0 {
            break;
        }
    }
    publisher.flush().await.unwrap();
    eventually("cut off as a slow consumer", || broker.stats().slow_consumers == 1).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(PATIENCE, slow.rd.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(_))), "closed: {read:?}");
    let text = String::from_utf8_lossy(&rest);
    assert!(!text.contains("-ERR"), "no -ERR line: {}", &text[text.len().saturating_sub(200)..]);
}

/// A raw NATS connection for protocol-level checks.
struct RawNats {
    rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: tokio::net::tcp::OwnedWriteHalf,
}

impl RawNats {
    async fn connect(broker: &Broker) -> (RawNats, serde_json::Value) {
        let stream = TcpStream::connect(broker.nats_addr().unwrap()).await.unwrap();
        let (rd, wr) = stream.into_split();
        let mut raw = RawNats { rd: BufReader::new(rd), wr };
        let info = raw.line().await.expect("INFO");
        let json = info.strip_prefix("INFO ").expect("starts with INFO");
        (raw, serde_json::from_str(json).unwrap())
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.wr.write_all(bytes).await.unwrap();
    }

    /// The next line without CRLF; None at end of stream.
    async fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        let n = tokio::time::timeout(PATIENCE, self.rd.read_line(&mut line))
            .await
            .expect("a line in time")
            .ok()?;
        (n > 0).then(|| line.trim_end_matches("\r\n").to_string())
    }

    async fn payload(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n + 2];
        self.rd.read_exact(&mut buf).await.unwrap();
        buf.truncate(n);
        buf
    }

    /// True when the server closes the connection (after any lines).
    async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(tokio::time::timeout(PATIENCE, self.rd.read_to_end(&mut rest)).await, Ok(Ok(_)))
    }
}

#[tokio::test]
async fn info_verbose_ok_ping_and_named_sids() {
    let broker = nats_broker().await;
    let (mut raw, info) = RawNats::connect(&broker).await;
    assert_eq!(info["proto"], 1);
    assert_eq!(info["headers"], true);
    assert!(info["max_payload"].as_u64().unwrap() > 0);
    assert!(info["client_id"].as_u64().is_some() && info["server_id"].is_string());
    // Every CONNECT field is optional, and verbose defaults to true, as at nats-server.
    raw.send(b"CONNECT {\"name\":\"raw\"}\r\n").await;
    assert_eq!(raw.line().await.as_deref(), Some("+OK"));
    raw.send(b"ping\r\n").await;
    assert_eq!(raw.line().await.as_deref(), Some("PONG"));
    raw.send(b"SUB a.* sub-one\r\nPUB a.b _INBOX.r 5\r\nhello\r\n").await;
    assert_eq!(raw.line().await.as_deref(), Some("+OK"));
    assert_eq!(raw.line().await.as_deref(), Some("+OK"));
    assert_eq!(raw.line().await.as_deref(), Some("MSG a.b sub-one _INBOX.r 5"));
    assert_eq!(raw.payload(5).await, b"hello");
    // Invalid subjects: an -ERR, and the connection goes on.
    raw.send(b"SUB a..b 2\r\nPUB a.* 0\r\n\r\nPING\r\n").await;
    assert_eq!(raw.line().await.as_deref(), Some("-ERR 'Invalid Subject'"));
    assert_eq!(raw.line().await.as_deref(), Some("-ERR 'Invalid Publish Subject'"));
    assert_eq!(raw.line().await.as_deref(), Some("PONG"));
    raw.send(b"UNSUB sub-one\r\nPUB a.b 1\r\nx\r\nPING\r\n").await;
    assert_eq!(raw.line().await.as_deref(), Some("+OK"));
    assert_eq!(raw.line().await.as_deref(), Some("+OK"));
    assert_eq!(raw.line().await.as_deref(), Some("PONG"), "no MSG after UNSUB");
    // A queue name is a busbar group name: it follows the topic rules.
    raw.send(b"SUB q a..b 3\r\nPING\r\n").await;
    assert_eq!(raw.line().await.as_deref(), Some("-ERR 'Invalid Queue Name'"));
    assert_eq!(raw.line().await.as_deref(), Some("PONG"));
}

#[tokio::test]
async fn unsub_max_is_exact_on_the_wire() {
    let broker = nats_broker().await;
    let (mut raw, _) = RawNats::connect(&broker).await;
    raw.send(b"CONNECT {\"verbose\":false}\r\nSUB n 9\r\nPUB n 1\r\na\r\nPING\r\n").await;
    assert_eq!(raw.line().await.as_deref(), Some("MSG n 9 1"));
    raw.payload(1).await;
    assert_eq!(raw.line().await.as_deref(), Some("PONG"));
    // One delivered already: a total of 3 means two more.
    raw.send(b"UNSUB 9 3\r\n").await;
    raw.send(&b"PUB n 1\r\nb\r\n".repeat(5)).await;
    raw.send(b"PING\r\n").await;
    for _ in 0..2 {
        assert_eq!(raw.line().await.as_deref(), Some("MSG n 9 1"));
        raw.payload(1).await;
    }
    assert_eq!(raw.line().await.as_deref(), Some("PONG"));
    eventually("auto-unsubscribed", || broker.stats().subscriptions == 0).await;
}

#[tokio::test]
async fn too_large_a_payload_is_refused_and_closes_only_that_connection() {
    let broker = nats_broker().await;
    let (mut bystander, _) = RawNats::connect(&broker).await;
    bystander.send(b"CONNECT {\"verbose\":false}\r\nSUB x 1\r\nPING\r\n").await;
    assert_eq!(bystander.line().await.as_deref(), Some("PONG"));
    let (mut raw, info) = RawNats::connect(&broker).await;
    let too_big = info["max_payload"].as_u64().unwrap() + 1;
    raw.send(format!("CONNECT {{\"verbose\":false}}\r\nPUB x {too_big}\r\n").as_bytes()).await;
    assert_eq!(raw.line().await.as_deref(), Some("-ERR 'Maximum Payload Violation'"));
    assert!(raw.closed().await);
    bystander.send(b"PUB x 2\r\nok\r\n").await;
    assert_eq!(bystander.line().await.as_deref(), Some("MSG x 1 2"));
}

#[tokio::test]
async fn a_malformed_operation_gets_err_and_close() {
    let broker = nats_broker().await;
    for bad in [&b"FLY me\r\n"[..], b"PUB a notanumber\r\n", b"PUB a 2\r\nabc\r\n", b"HPUB a 1 2\r\nxy\r\n"] {
        let (mut raw, _) = RawNats::connect(&broker).await;
        raw.send(b"CONNECT {\"verbose\":false}\r\n").await;
        raw.send(bad).await;
        let line = raw.line().await.unwrap_or_default();
        assert!(line.starts_with("-ERR '"), "{bad:?} → {line}");
        assert!(raw.closed().await, "{bad:?} closes the connection");
    }
    let nc = nats(&broker).await;
    nc.flush().await.expect("the broker still serves");
}

#[tokio::test]
async fn auth_required_refuses_operations_before_connect() {
    let mut config = nats_config();
    config.auth.token = Some("a-token-of-16-chars".into());
    let broker = broker_with(config).await;
    let (mut raw, info) = RawNats::connect(&broker).await;
    assert_eq!(info["auth_required"], true);
    raw.send(b"SUB a 1\r\n").await;
    assert_eq!(raw.line().await.as_deref(), Some("-ERR 'Authorization Violation'"));
    assert!(raw.closed().await);
    let nc = async_nats::ConnectOptions::with_token("a-token-of-16-chars".into())
        .connect(nats_url(&broker))
        .await
        .unwrap();
    nc.flush().await.unwrap();
}

#[tokio::test]
async fn the_server_pings_idle_clients_and_closes_silent_ones() {
    let mut config = nats_config();
    config.heartbeat_interval = Duration::from_millis(100);
    let broker = broker_with(config).await;
    let (mut raw, _) = RawNats::connect(&broker).await;
    raw.send(b"CONNECT {\"verbose\":false}\r\n").await;
    assert_eq!(raw.line().await.as_deref(), Some("PING"));
    // Never answered: closed as stale.
    let mut last = String::new();
    while let Some(line) = raw.line().await {
        last = line;
    }
    assert_eq!(last, "-ERR 'Stale Connection'");
}

#[tokio::test]
async fn monitoring_counts_nats_connections() {
    let broker = nats_broker().await;
    let nc = nats(&broker).await;
    let native: Client =
        Client::connect_with(ClientOptions::new(broker.local_addr().to_string())).await.unwrap();
    nc.flush().await.unwrap();
    native.flush().await.unwrap();
    assert_eq!(broker.stats().connections, 2);
}

#[tokio::test]
async fn sids_are_text_and_unknown_unsubs_are_ignored() {
    let broker = nats_broker().await;
    let (mut raw, _) = RawNats::connect(&broker).await;
    // "01" and "1" are two subscriptions; an UNSUB with a limit for a sid not subscribed leaves
    // nothing behind that could cut short a later SUB with that sid.
    raw.send(b"CONNECT {\"verbose\":false}\r\nUNSUB 7 1\r\nSUB s 01\r\nSUB s 1\r\nSUB s 7\r\nPUB s 1\r\na\r\nPUB s 1\r\nb\r\nPING\r\n").await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        let line = raw.line().await.unwrap();
        raw.payload(1).await;
        seen.push(line);
    }
    seen.sort();
    assert_eq!(seen, ["MSG s 01 1", "MSG s 01 1", "MSG s 1 1", "MSG s 1 1", "MSG s 7 1", "MSG s 7 1"]);
    assert_eq!(raw.line().await.as_deref(), Some("PONG"));
    // A duplicate sid is taken silently (as nats-server does): no -ERR, still one delivery.
    raw.send(b"SUB s 1\r\nPUB s 1\r\nc\r\nPING\r\n").await;
    let mut lines = Vec::new();
    for _ in 0..3 {
        lines.push(raw.line().await.unwrap());
        raw.payload(1).await;
    }
    assert!(lines.iter().all(|l| l.starts_with("MSG s ")), "{lines:?}");
    assert_eq!(raw.line().await.as_deref(), Some("PONG"));
}

#[tokio::test]
async fn reply_subjects_cannot_be_forged_or_injected() {
    let broker = nats_broker().await;
    let (mut raw, _) = RawNats::connect(&broker).await;
    raw.send(b"CONNECT {\"verbose\":false}\r\nSUB x 1\r\nPUB x _BUSBAR.R.1.1 1\r\na\r\nPING\r\n").await;
    assert_eq!(
        raw.line().await.as_deref(),
        Some("-ERR 'Invalid Publish Subject'"),
        "reserved for the broker"
    );
    assert_eq!(raw.line().await.as_deref(), Some("PONG"));
    // A native publisher's reply header that is not a subject is dropped, never written raw.
    let native = client(&broker).await;
    let evil = "a 1\r\nINFO {\"connect_urls\":[\"evil:4222\"]}\r\nMSG x 1 b";
    native.publish_message(Outgoing::new("x", "z").header(":reply", evil)).await.unwrap();
    native.publish_message(Outgoing::new("x", "z").header(":status", "503")).await.unwrap();
    native.flush().await.unwrap();
    assert_eq!(raw.line().await.as_deref(), Some("MSG x 1 1"));
    raw.payload(1).await;
    assert_eq!(raw.line().await.as_deref(), Some("MSG x 1 1"), "no status from a publisher");
    raw.payload(1).await;
    raw.send(b"PING\r\n").await;
    assert_eq!(raw.line().await.as_deref(), Some("PONG"));
}
