//! Property tests: codec round trips, decoder robustness, trie against the reference matcher.

use busbar_core::frame::{self, DEFAULT_MAX_FRAME_SIZE};
use busbar_core::topic::matches;
use busbar_core::*;
use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

fn text(max: usize) -> impl Strategy<Value = ByteString> {
    proptest::string::string_regex(&format!("[a-zA-Z0-9 ._ü-]{{0,{max}}}"))
        .unwrap()
        .prop_map(ByteString::from)
}

fn headers() -> impl Strategy<Value = Headers> {
    proptest::collection::vec((text(12), text(24)), 0..4).prop_map(|v| v.into_iter().collect())
}

fn topic() -> impl Strategy<Value = String> {
    proptest::collection::vec("[a-c]{1,2}", 1..5).prop_map(|t| t.join("."))
}

fn pattern() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(prop_oneof![3 => "[a-c]{1,2}", 1 => Just("*".to_string())], 1..5),
        any::<bool>(),
    )
        .prop_map(|(mut t, rest)| {
            if rest {
                let last = t.len() - 1;
                t[last] = ">".into();
            }
            t.join(".")
        })
}

fn message() -> impl Strategy<Value = Message> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<Option<u64>>(),
        any::<Option<(u128, u128, u64)>>(),
        topic(),
        headers(),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(source, destination, key, env, topic, headers, payload)| Message {
            source,
            destination,
            key,
            envelope: env.map(|(id, tx, timestamp_ns)| Envelope { id, tx, timestamp_ns }),
            topic: topic.into(),
            headers,
            payload: Bytes::from(payload),
        })
}

fn any_frame() -> impl Strategy<Value = Frame> {
    let policy =
        prop_oneof![Just(GroupPolicy::Random), Just(GroupPolicy::RoundRobin), Just(GroupPolicy::Hash)];
    let group = proptest::option::of((text(10).prop_filter("non-empty", |s| !s.is_empty()), policy))
        .prop_map(|g| g.map(|(name, policy)| Group { name, policy }));
    prop_oneof![
        (text(20), headers()).prop_map(|(name, properties)| Frame::Hello(Hello { name, properties })),
        (any::<u32>(), any::<u32>(), any::<u32>(), text(10), text(10), headers()).prop_map(
            |(service_id, max_frame_size, heartbeat_ms, server_name, server_version, properties)| {
                Frame::Welcome(Welcome {
                    service_id,
                    max_frame_size,
                    heartbeat_ms,
                    server_name,
                    server_version,
                    properties,
                })
            }
        ),
        Just(Frame::Ping),
        Just(Frame::Pong),
        (any::<u64>(), pattern(), group, any::<bool>()).prop_map(|(sid, pattern, group, requests)| {
            let kind = if requests { SubKind::Requests } else { SubKind::Events };
            Frame::Sub(Sub { sid, pattern: pattern.into(), group, kind })
        }),
        any::<u64>().prop_map(|sid| Frame::Unsub { sid }),
        (any::<u16>(), any::<u64>(), text(40)).prop_map(|(code, correlation, message)| {
            Frame::Error(ErrorFrame { code: ErrorCode::from_u16(code), correlation, message })
        }),
        message().prop_map(Frame::Pub),
        (any::<u64>(), message()).prop_map(|(sid, message)| Frame::Msg { sid, message }),
        (any::<u64>(), any::<bool>(), any::<u32>(), message()).prop_map(|(id, all, timeout_ms, message)| {
            Frame::Request(Request { id, all, timeout_ms, message })
        }),
        (any::<u64>(), any::<u64>(), any::<u32>(), message())
            .prop_map(|(id, sid, timeout_ms, message)| Frame::Call(Call { id, sid, timeout_ms, message })),
        (any::<u64>(), any::<u16>(), any::<u32>(), message()).prop_map(|(id, status, remaining, message)| {
            let error = (status != 0).then(|| ErrorCode::from_u16(status));
            Frame::Reply(Reply { id, error, remaining, message })
        }),
    ]
}

fn decode_all(mut buf: BytesMut) -> Result<Vec<Frame>, FrameError> {
    let mut out = Vec::new();
    while let Some(f) = frame::decode(&mut buf, DEFAULT_MAX_FRAME_SIZE)? {
        out.push(f);
    }
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_frame_round_trips(f in any_frame()) {
        let mut buf = BytesMut::new();
        f.encode(&mut buf, DEFAULT_MAX_FRAME_SIZE).unwrap();
        let len = buf.len();
        if let Some(m) = f.message() {
            let fixed = match &f { Frame::Request(_) => 4, Frame::Call(_) => 12, Frame::Reply(_) => 6, _ => 0 };
            prop_assert_eq!(m.frame_size() - 12 + fixed + frame::LEN_PREFIX, len);
        }
        prop_assert_eq!(frame::check(&buf, DEFAULT_MAX_FRAME_SIZE), Ok(Some(len)));
        let back = frame::decode(&mut buf, DEFAULT_MAX_FRAME_SIZE).unwrap();
        prop_assert_eq!(back, Some(f));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn a_stream_split_anywhere_decodes_the_same(frames in proptest::collection::vec(any_frame(), 1..6),
                                                cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8)) {
        let mut whole = BytesMut::new();
        for f in &frames {
            f.encode(&mut whole, DEFAULT_MAX_FRAME_SIZE).unwrap();
        }
        let bytes = whole.clone().freeze();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        points.sort();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut last = 0;
        for p in points.into_iter().chain([bytes.len()]) {
            buf.extend_from_slice(&bytes[last..p]);
            last = p;
            while let Some(f) = frame::decode(&mut buf, DEFAULT_MAX_FRAME_SIZE).unwrap() {
                got.push(f);
            }
        }
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn random_bytes_never_panic_and_chunking_agrees(data in proptest::collection::vec(any::<u8>(), 0..200),
                                                    chunk in 1usize..17) {
        let whole = decode_all(BytesMut::from(&data[..]));
        // Feed the same bytes in small chunks: the frames decoded before an error, and the error
        // itself, must be the same as when decoding the whole buffer at once.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut err = None;
        'outer: for piece in data.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                match frame::decode(&mut buf, DEFAULT_MAX_FRAME_SIZE) {
                    Ok(Some(f)) => got.push(f),
                    Ok(None) => break,
                    Err(e) => { err = Some(e); break 'outer; }
                }
            }
        }
        match whole {
            Ok(frames) => { prop_assert_eq!(err, None); prop_assert_eq!(got, frames); }
            Err(e) => prop_assert_eq!(err, Some(e)),
        }
    }

    #[test]
    fn decode_with_and_decode_msg_with_agree_with_decode(f in any_frame(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3)) {
        // Valid frames and damaged ones: the same frame or the same error either way.
        let mut buf = BytesMut::new();
        f.encode(&mut buf, DEFAULT_MAX_FRAME_SIZE).unwrap();
        for (i, b) in flips {
            let at = i.index(buf.len());
            buf[at] = b;
        }
        let mut other = buf.clone();
        let other_start = buf.clone();
        let plain = frame::decode(&mut buf, DEFAULT_MAX_FRAME_SIZE);
        let with = frame::decode_with(&mut other, DEFAULT_MAX_FRAME_SIZE, Frame::Pub, |f| f);
        prop_assert_eq!(with, plain.clone());
        prop_assert_eq!(&other, &buf);
        let mut other = other_start.clone();
        let mut last = frame::LastTopic::default();
        let msg = frame::decode_msg_with(&mut other, DEFAULT_MAX_FRAME_SIZE, &mut last, |sid, message| Frame::Msg { sid, message }, |f| f);
        prop_assert_eq!(&msg, &plain);
        prop_assert_eq!(&other, &buf);
        // Again with the topic remembered from the first: the same frame or error.
        let mut again = other_start;
        let msg = frame::decode_msg_with(&mut again, DEFAULT_MAX_FRAME_SIZE, &mut last, |sid, message| Frame::Msg { sid, message }, |f| f);
        prop_assert_eq!(msg, plain);
        prop_assert_eq!(again, buf);
    }

    /// A remembered topic is reused only for the same bytes: MSGs to a mix of topics, decoded
    /// in one stream with one `LastTopic`, come out as they went in.
    #[test]
    fn msgs_decoded_with_a_remembered_topic_keep_their_own_topics(
        msgs in proptest::collection::vec((any::<u64>(), prop_oneof![Just("a.b".to_string()), Just("a.c".to_string()), Just("a".to_string()), text(6).prop_map(|t| t.to_string())]), 1..20),
    ) {
        let mut buf = BytesMut::new();
        for (sid, topic) in &msgs {
            Frame::Msg { sid: *sid, message: Message::new(topic.clone(), "x") }.encode(&mut buf, DEFAULT_MAX_FRAME_SIZE).unwrap();
        }
        let mut last = frame::LastTopic::default();
        for (sid, topic) in &msgs {
            let got = frame::decode_msg_with(&mut buf, DEFAULT_MAX_FRAME_SIZE, &mut last, |s, m| (s, m.topic.to_string()), |_| (0, String::new()));
            prop_assert_eq!(got, Ok(Some((*sid, topic.clone()))));
        }
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn a_detached_message_is_equal_and_shares_nothing_with_its_frame(m in message()) {
        let mut buf = BytesMut::new();
        Frame::Msg { sid: 1, message: m }.encode(&mut buf, usize::MAX).unwrap();
        let read = buf.as_ptr_range();
        let Ok(Some(Frame::Msg { message, .. })) = frame::decode(&mut buf, usize::MAX) else {
            return Err(TestCaseError::fail("a MSG"));
        };
        let inside = |p: *const u8| read.contains(&p);
        prop_assert!(inside(message.topic.as_bytes().as_ptr()), "decoded in place");
        let copy = message.detached();
        prop_assert_eq!(&copy, &message);
        prop_assert!(copy.payload.is_empty() || !inside(copy.payload.as_ptr()));
        prop_assert!(!inside(copy.topic.as_bytes().as_ptr()));
        prop_assert!(copy.headers.iter().all(|(k, v)| !inside(k.as_ptr()) && !inside(v.as_ptr())));
    }

    #[test]
    fn a_pub_from_borrowed_fields_is_the_same_bytes(m in message(), max in 0usize..300) {
        let (mut owned, mut viewed) = (BytesMut::from(&b"kept"[..]), BytesMut::from(&b"kept"[..]));
        let a = frame::encode_pub(&mut owned, &m, max);
        let b = frame::encode_pub_view(&mut viewed, frame::MessageView::from(&m), max);
        prop_assert_eq!(&a, &b);
        if a.is_ok() {
            prop_assert_eq!(owned.len() - 4, frame::MessageView::from(&m).frame_len(), "the exact length");
        }
        prop_assert_eq!(owned, viewed);
    }

    #[test]
    fn requests_and_replies_from_borrowed_fields_are_the_same_bytes(
        m in message(), id in any::<u64>(), all in any::<bool>(), timeout_ms in any::<u32>(),
        status in 0u16..12, remaining in any::<u32>(), max in 0usize..300,
    ) {
        let view = frame::MessageView::from(&m);
        let request = Frame::Request(Request { id, all, timeout_ms, message: m.clone() });
        let (mut owned, mut viewed) = (BytesMut::from(&b"kept"[..]), BytesMut::from(&b"kept"[..]));
        let a = request.encode(&mut owned, max);
        prop_assert_eq!(&a, &frame::encode_request_view(&mut viewed, id, all, timeout_ms, view, max));
        prop_assert_eq!(&owned, &viewed);
        if a.is_ok() {
            prop_assert_eq!(owned.len() - 4, view.frame_len() + 4, "the exact length");
            prop_assert!(frame::is_request_or_reply(&owned[4..]));
            prop_assert_eq!(frame::request_id(&owned[4..]), Some(id));
        }
        let error = (status != 0).then(|| ErrorCode::from_u16(status));
        let reply = Frame::Reply(Reply { id, error, remaining, message: m.clone() });
        let (mut owned, mut viewed) = (BytesMut::new(), BytesMut::new());
        let a = reply.encode(&mut owned, max);
        prop_assert_eq!(&a, &frame::encode_reply_view(&mut viewed, id, error, remaining, view, max));
        prop_assert_eq!(&owned, &viewed);
        if a.is_ok() {
            prop_assert_eq!(owned.len(), view.frame_len() + 6, "the exact length");
            prop_assert!(frame::is_request_or_reply(&owned));
            prop_assert_eq!(frame::request_id(&owned), None);
        }
        // Not the other data frames.
        for other in [Frame::Pub(m.clone()), Frame::Msg { sid: id, message: m.clone() },
                      Frame::Call(Call { id, sid: id, timeout_ms, message: m.clone() })] {
            let mut buf = BytesMut::new();
            if other.encode(&mut buf, DEFAULT_MAX_FRAME_SIZE).is_ok() {
                prop_assert!(!frame::is_request_or_reply(&buf), "{}", other.name());
                prop_assert_eq!(frame::request_id(&buf), None);
            }
        }
    }

    #[test]
    fn mutated_frames_never_panic(f in any_frame(), flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
        let mut buf = BytesMut::new();
        f.encode(&mut buf, DEFAULT_MAX_FRAME_SIZE).unwrap();
        for (i, b) in flips {
            let at = i.index(buf.len());
            buf[at] = b;
        }
        let _ = decode_all(buf);
    }

    #[test]
    fn trie_agrees_with_reference_matcher(patterns in proptest::collection::vec(pattern(), 0..40),
                                          topics in proptest::collection::vec(topic(), 1..20),
                                          removals in proptest::collection::vec(any::<prop::sample::Index>(), 0..10)) {
        let mut trie = SubscriptionTrie::new();
        let mut live: Vec<(String, usize)> = Vec::new();
        for (i, p) in patterns.iter().enumerate() {
            prop_assert_eq!(validate_pattern(p), Ok(()));
            trie.insert(p, i);
            live.push((p.clone(), i));
        }
        for r in removals {
            if live.is_empty() { break; }
            let (p, v) = live.remove(r.index(live.len()));
            prop_assert_eq!(trie.remove(&p, &v), Some(v));
        }
        prop_assert_eq!(trie.len(), live.len());
        for t in &topics {
            let mut want: Vec<usize> = live.iter().filter(|(p, _)| matches(p, t)).map(|(_, v)| *v).collect();
            let mut got: Vec<usize> = trie.matches(t).into_iter().copied().collect();
            want.sort();
            got.sort();
            prop_assert_eq!(got, want, "topic {}", t);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// `covers` and `intersects` (used for subscribe permissions) agree with the matcher on
    /// sampled topics: coverage is never wrong the permissive way, and a shared topic always
    /// means the patterns intersect.
    #[test]
    fn covers_and_intersects_agree_with_matching(a in pattern(), b in pattern(),
                                                 topics in proptest::collection::vec(topic(), 1..40)) {
        use busbar_core::topic::{covers, intersects};
        for t in &topics {
            if covers(&a, &b) && matches(&b, t) {
                prop_assert!(matches(&a, t), "{} covers {} but not {}", a, b, t);
            }
            if matches(&a, t) && matches(&b, t) {
                prop_assert!(intersects(&a, &b), "{} and {} share {}", a, b, t);
            }
        }
    }
}

#[test]
fn oversized_frame_is_refused_from_its_prefix_alone() {
    let prefix = ((DEFAULT_MAX_FRAME_SIZE + 1) as u32).to_be_bytes();
    assert_eq!(
        frame::check(&prefix, DEFAULT_MAX_FRAME_SIZE),
        Err(FrameError::TooLarge { size: DEFAULT_MAX_FRAME_SIZE + 1, max: DEFAULT_MAX_FRAME_SIZE })
    );
    let mut buf = BytesMut::new();
    let big = Frame::Pub(Message::new("a", vec![0u8; 100]));
    assert!(matches!(big.encode(&mut buf, 64), Err(FrameError::TooLarge { max: 64, .. })));
    assert!(buf.is_empty(), "a refused encode writes nothing");
}

#[test]
fn garbage_is_refused_before_its_claimed_length_arrives() {
    // "GET / HTTP/1.1": the first four bytes read as a length of 0x47455420, far above the limit.
    assert!(matches!(
        frame::check(b"GET / HTTP/1.1", DEFAULT_MAX_FRAME_SIZE),
        Err(FrameError::TooLarge { .. })
    ));
    // A plausible length but the wrong magic, with only six bytes in hand.
    assert_eq!(
        frame::check(&[0, 0, 0, 30, b'x', b'y'], DEFAULT_MAX_FRAME_SIZE),
        Err(FrameError::BadMagic(0x7879))
    );
    assert_eq!(
        frame::check(&[0, 0, 0, 30, b'e', b'b', 9], DEFAULT_MAX_FRAME_SIZE),
        Err(FrameError::UnsupportedVersion(9))
    );
    assert_eq!(frame::check(&[0, 0, 0, 30, b'e', b'b', 1], DEFAULT_MAX_FRAME_SIZE), Ok(None));
    assert_eq!(frame::check(&[0, 0, 0, 3], DEFAULT_MAX_FRAME_SIZE), Err(FrameError::TooShort { size: 3 }));
}

#[test]
fn structural_errors_are_specific() {
    let mut ok = BytesMut::new();
    Frame::Ping.encode(&mut ok, DEFAULT_MAX_FRAME_SIZE).unwrap();
    // Unknown command nibble.
    let mut b = ok.clone();
    b[7] = 0x8f;
    assert_eq!(frame::decode(&mut b, DEFAULT_MAX_FRAME_SIZE), Err(FrameError::UnknownCommand(0x8f)));
    // Balance-key flag on a control frame.
    let mut b = ok.clone();
    b[7] |= 0x20;
    assert_eq!(frame::decode(&mut b, DEFAULT_MAX_FRAME_SIZE), Err(FrameError::BadFlags(0x20)));
    // A PUB whose topic length runs past the end.
    let mut b = BytesMut::new();
    Frame::Pub(Message::new("abc", "")).encode(&mut b, DEFAULT_MAX_FRAME_SIZE).unwrap();
    b[24] = 0xff;
    assert_eq!(frame::decode(&mut b, DEFAULT_MAX_FRAME_SIZE), Err(FrameError::Truncated("topic")));
    // Invalid UTF-8 in a topic.
    let mut b = BytesMut::new();
    Frame::Pub(Message::new("abc", "")).encode(&mut b, DEFAULT_MAX_FRAME_SIZE).unwrap();
    b[26] = 0xff;
    assert_eq!(frame::decode(&mut b, DEFAULT_MAX_FRAME_SIZE), Err(FrameError::InvalidUtf8("topic")));
}

proptest! {
    /// The memo answers exactly as `validate_topic` does, over any sequence of topics, patterns
    /// (invalid as topics) and arbitrary strings, repeats included.
    #[test]
    fn the_topic_memo_agrees_with_the_check(
        seq in proptest::collection::vec(
            prop_oneof![3 => topic(), 1 => pattern(), 1 => ".{0,80}", 1 => "[a.]{60,70}"], 1..40),
    ) {
        let mut memo = TopicMemo::new();
        for t in seq.iter().chain(seq.iter().rev()) {
            prop_assert_eq!(memo.validate(t), validate_topic(t), "{:?}", t);
        }
    }
}
