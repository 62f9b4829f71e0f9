//! The golden byte vectors of docs/PROTOCOL.md: each must encode from, and decode to, the frame
//! named here. The document is read at test time, so it cannot drift from the code.

use busbar_core::frame::{self, DEFAULT_MAX_FRAME_SIZE};
use busbar_core::*;
use bytes::BytesMut;

const PROTOCOL_MD: &str = include_str!("../../../docs/PROTOCOL.md");

fn golden_frames() -> Vec<(&'static str, Frame)> {
    let mut full = Message::new("a.b", "hi");
    full.key = Some(42);
    full.envelope = Some(Envelope { id: 1, tx: 2, timestamp_ns: 3 });
    full.headers.insert("k", "v");
    let mut delivered = Message::new("event.email.new", "hi");
    delivered.source = 7;
    let mut call = Message::new("user.get", "42");
    call.source = 7;
    let mut reply = Message::new("user.get", "ann");
    reply.destination = 7;
    let no_one = Message::new("user.get", "no responders");
    vec![
        (
            "hello",
            Frame::Hello(Hello {
                name: "cli".into(),
                properties: [("service", "mailer")].into_iter().collect(),
            }),
        ),
        (
            "welcome",
            Frame::Welcome(Welcome {
                service_id: 7,
                max_frame_size: 1_048_576,
                heartbeat_ms: 10_000,
                server_name: "busbar".into(),
                server_version: "0.1.0".into(),
                properties: Headers::new(),
            }),
        ),
        ("ping", Frame::Ping),
        ("pong", Frame::Pong),
        ("sub", Frame::Sub(Sub { sid: 1, pattern: "event.>".into(), group: None, kind: SubKind::Events })),
        (
            "sub-group",
            Frame::Sub(Sub {
                sid: 2,
                pattern: "jobs.*".into(),
                group: Some(Group { name: "workers".into(), policy: GroupPolicy::RoundRobin }),
                kind: SubKind::Requests,
            }),
        ),
        ("unsub", Frame::Unsub { sid: 1 }),
        (
            "error",
            Frame::Error(ErrorFrame { code: ErrorCode::InvalidTopic, correlation: 0, message: "bad".into() }),
        ),
        ("pub", Frame::Pub(Message::new("event.email.new", r#"{"subject":"hi"}"#))),
        ("pub-full", Frame::Pub(full)),
        ("msg", Frame::Msg { sid: 1, message: delivered }),
        (
            "request",
            Frame::Request(Request {
                id: 9,
                all: false,
                timeout_ms: 5000,
                message: Message::new("user.get", "42"),
            }),
        ),
        ("call", Frame::Call(Call { id: 9, sid: 2, timeout_ms: 5000, message: call })),
        ("reply", Frame::Reply(Reply { id: 9, error: None, remaining: 0, message: reply })),
        (
            "reply-error",
            Frame::Reply(Reply {
                id: 9,
                error: Some(ErrorCode::NoResponders),
                remaining: 0,
                message: no_one,
            }),
        ),
    ]
}

/// `(name, bytes)` for every `<!-- golden: name -->` marker followed by a fenced hex block.
fn vectors_in_doc() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut lines = PROTOCOL_MD.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line.trim().strip_prefix("<!-- golden: ").and_then(|r| r.strip_suffix(" -->"))
        else {
            continue;
        };
        assert!(lines.next().is_some_and(|l| l.starts_with("```")), "fence after golden marker {name}");
        let mut hex = String::new();
        for l in lines.by_ref() {
            if l.starts_with("```") {
                break;
            }
            hex.extend(l.split('#').next().unwrap().chars().filter(|c| c.is_ascii_hexdigit()));
        }
        assert_eq!(hex.len() % 2, 0, "odd number of hex digits in {name}");
        let bytes =
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        out.push((name.to_string(), bytes));
    }
    out
}

/// Frames as brokers send them over a route: with the source and destination ids of the header
/// set ([`frame::set_ids`]).
fn route_frames() -> Vec<(&'static str, Frame, (u32, u32))> {
    let mut published = Message::new("a.b", "hi");
    published.source = 0x0100_0007;
    vec![
        (
            "route-sub",
            Frame::Sub(Sub { sid: 1, pattern: "event.>".into(), group: None, kind: SubKind::Events }),
            (0x0200_0005, 0),
        ),
        ("route-msg-fanout", Frame::Msg { sid: u64::MAX, message: published }, (0x0100_0007, 0)),
    ]
}

#[test]
fn golden_vectors_in_protocol_md_match_the_codec() {
    let doc = vectors_in_doc();
    let frames = golden_frames();
    for (name, frame, ids) in route_frames() {
        let mut encoded = BytesMut::new();
        frame.encode(&mut encoded, DEFAULT_MAX_FRAME_SIZE).unwrap();
        frame::set_ids(&mut encoded, ids.0, ids.1);
        let hex: String = encoded.iter().map(|b| format!("{b:02x}")).collect();
        let Some((_, bytes)) = doc.iter().find(|(n, _)| n == name) else {
            panic!("docs/PROTOCOL.md has no golden vector {name:?}; the codec says:\n{hex}");
        };
        assert_eq!(&encoded[..], &bytes[..], "vector {name}: the codec encodes\n{hex}");
        assert_eq!(frame::ids(bytes), Some(ids), "{name}: header ids");
        let mut buf = BytesMut::from(&bytes[..]);
        let decoded = frame::decode(&mut buf, DEFAULT_MAX_FRAME_SIZE).unwrap().unwrap();
        match (&decoded, &frame) {
            // Data frames carry the header ids in their message; compare the rest.
            (Frame::Msg { sid, message }, Frame::Msg { sid: want, message: m }) => {
                assert_eq!((sid, &message.topic, &message.payload), (want, &m.topic, &m.payload));
                assert_eq!((message.source, message.destination), ids);
            }
            _ => assert_eq!(&decoded, &frame, "{name}"),
        }
    }
    for (name, frame) in &frames {
        let mut encoded = BytesMut::new();
        frame.encode(&mut encoded, DEFAULT_MAX_FRAME_SIZE).unwrap();
        let Some((_, bytes)) = doc.iter().find(|(n, _)| n == name) else {
            let hex: String = encoded.iter().map(|b| format!("{b:02x}")).collect();
            panic!("docs/PROTOCOL.md has no golden vector {name:?}; the codec says:\n{hex}");
        };
        let hex: String = encoded.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(&encoded[..], &bytes[..], "vector {name}: the codec encodes\n{hex}");
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(frame::decode(&mut buf, DEFAULT_MAX_FRAME_SIZE).unwrap().as_ref(), Some(frame), "{name}");
    }
    assert_eq!(doc.len(), frames.len() + route_frames().len(), "every vector in the document is checked");
}
