//! The NATS parser: operations split anywhere parse the same; random bytes never panic and
//! parse the same whole or in pieces.

use busbar_core::nats::{self, ClientOp, Limits};
use proptest::prelude::*;

fn word() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_.>*-]{1,12}"
}

#[derive(Debug, Clone)]
enum Op {
    Ping,
    Pong,
    Pub(String, Option<String>, Vec<u8>),
    Hpub(String, Option<String>, Vec<u8>),
    Sub(String, Option<String>, String),
    Unsub(String, Option<u64>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::Ping),
        Just(Op::Pong),
        (word(), proptest::option::of(word()), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(s, r, p)| Op::Pub(s, r, p)),
        (word(), proptest::option::of(word()), proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(s, r, p)| Op::Hpub(s, r, p)),
        (word(), proptest::option::of(word()), word()).prop_map(|(s, q, i)| Op::Sub(s, q, i)),
        (word(), proptest::option::of(0u64..1_000_000)).prop_map(|(i, m)| Op::Unsub(i, m)),
    ]
}

fn encode(op: &Op, out: &mut Vec<u8>) {
    let reply = |r: &Option<String>| r.as_ref().map(|r| format!(" {r}")).unwrap_or_default();
    match op {
        Op::Ping => out.extend_from_slice(b"PING\r\n"),
        Op::Pong => out.extend_from_slice(b"pong\r\n"),
        Op::Pub(s, r, p) => {
            out.extend_from_slice(format!("PUB {s}{} {}\r\n", reply(r), p.len()).as_bytes());
            out.extend_from_slice(p);
            out.extend_from_slice(b"\r\n");
        }
        Op::Hpub(s, r, p) => {
            let h = b"NATS/1.0\r\nk: v\r\n\r\n";
            out.extend_from_slice(
                format!("HPUB {s}{} {} {}\r\n", reply(r), h.len(), h.len() + p.len()).as_bytes(),
            );
            out.extend_from_slice(h);
            out.extend_from_slice(p);
            out.extend_from_slice(b"\r\n");
        }
        Op::Sub(s, q, i) => out.extend_from_slice(format!("SUB {s}{} {i}\r\n", reply(q)).as_bytes()),
        Op::Unsub(i, m) => {
            let max = m.map(|m| format!(" {m}")).unwrap_or_default();
            out.extend_from_slice(format!("UNSUB {i}{max}\r\n").as_bytes());
        }
    }
}

fn same(op: &Op, parsed: &ClientOp<'_>) -> bool {
    match (op, parsed) {
        (Op::Ping, ClientOp::Ping) | (Op::Pong, ClientOp::Pong) => true,
        (Op::Pub(s, r, p), ClientOp::Pub { subject, reply, payload }) => {
            s == subject && r.as_deref() == *reply && p == payload
        }
        (Op::Hpub(s, r, p), ClientOp::Hpub { subject, reply, payload, headers }) => {
            s == subject && r.as_deref() == *reply && p == payload && headers.starts_with(b"NATS/1.0")
        }
        (Op::Sub(s, q, i), ClientOp::Sub { subject, queue, sid }) => {
            s == subject && q.as_deref() == *queue && i == sid
        }
        (Op::Unsub(i, m), ClientOp::Unsub { sid, max }) => i == sid && m == max,
        _ => false,
    }
}

/// Feeds `data` in pieces cut at `cuts`, parsing after each; returns how many ops parsed and the
/// error, if any.
fn feed(
    data: &[u8],
    cuts: &[usize],
    check: &mut dyn FnMut(usize, &ClientOp<'_>),
) -> (usize, Option<nats::NatsError>) {
    let limits = Limits::default();
    let mut buf: Vec<u8> = Vec::new();
    let mut n = 0;
    let mut last = 0;
    for &cut in cuts.iter().chain([data.len()].iter()) {
        buf.extend_from_slice(&data[last..cut.max(last)]);
        last = cut.max(last);
        loop {
            match nats::parse(&buf, &limits) {
                Ok(Some((op, used))) => {
                    check(n, &op);
                    n += 1;
                    buf.drain(..used);
                }
                Ok(None) => break,
                Err(e) => return (n, Some(e)),
            }
        }
    }
    (n, None)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn ops_split_anywhere_parse_the_same(ops in proptest::collection::vec(op(), 1..8),
                                         cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10)) {
        let mut data = Vec::new();
        for o in &ops {
            encode(o, &mut data);
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
        cuts.sort();
        let mut ok = true;
        let (n, err) = feed(&data, &cuts, &mut |i, parsed| ok &= same(&ops[i], parsed));
        prop_assert_eq!(err, None);
        prop_assert_eq!(n, ops.len());
        prop_assert!(ok);
    }

    #[test]
    fn random_bytes_never_panic_and_pieces_agree(data in proptest::collection::vec(any::<u8>(), 0..300),
                                                 chunk in 1usize..20) {
        let whole = feed(&data, &[], &mut |_, _| {});
        let cuts: Vec<usize> = (chunk..data.len()).step_by(chunk).collect();
        let pieces = feed(&data, &cuts, &mut |_, _| {});
        prop_assert_eq!(whole, pieces);
    }

    #[test]
    fn header_blocks_round_trip(pairs in proptest::collection::vec(("[A-Za-z0-9-]{1,10}", "[ -~]{0,20}"), 0..6),
                                status in proptest::option::of(100u16..1000)) {
        let mut block = Vec::new();
        let borrowed: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        nats::headers::write(&mut block, status.map(|s| (s, "")), borrowed.iter().copied());
        let parsed = nats::headers::parse(&block).expect("a written block parses");
        prop_assert_eq!(parsed.status, status);
        // Values are trimmed on both sides, as HTTP-style headers are.
        let expected: Vec<(&str, &str)> = borrowed.iter().map(|&(k, v)| (k, v.trim())).collect();
        prop_assert_eq!(parsed.pairs, expected);
    }

    #[test]
    fn random_header_blocks_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = nats::headers::parse(&data);
        let mut text = b"NATS/1.0".to_vec();
        text.extend_from_slice(&data);
        let _ = nats::headers::parse(&text);
    }
}
