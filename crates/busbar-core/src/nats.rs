//! The NATS client protocol, as a parser and writer with no I/O: the groundwork for a NATS
//! listener that lets existing NATS clients join the bus.
//!
//! [`parse`] looks at the start of a buffer and returns one client operation borrowing from it
//! (no allocation), or `Ok(None)` when more bytes are needed: an operation split across reads is
//! not an error. The control line is limited ([`Limits::max_control_line`]) before its end has
//! arrived, and payload sizes are checked against [`Limits::max_payload`] before the payload is
//! waited for. It never panics, whatever the input (property tests and a fuzz target).
//!
//! | client op | form |
//! |-----------|------|
//! | CONNECT | `CONNECT {json}␍␊` |
//! | PUB | `PUB <subject> [reply-to] <#bytes>␍␊<payload>␍␊` |
//! | HPUB | `HPUB <subject> [reply-to] <#header bytes> <#total bytes>␍␊<headers><payload>␍␊` |
//! | SUB | `SUB <subject> [queue group] <sid>␍␊` |
//! | UNSUB | `UNSUB <sid> [max_msgs]␍␊` |
//! | PING, PONG | `PING␍␊`, `PONG␍␊` |
//!
//! Operation names are case-insensitive; arguments are separated by spaces or tabs.

use thiserror::Error;

/// Bounds the parser enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest control line (the operation up to its CRLF), in bytes.
    pub max_control_line: usize,
    /// Largest payload (headers included, for HPUB), in bytes.
    pub max_payload: usize,
}

impl Default for Limits {
    /// The NATS server's defaults: 4 KiB control lines, 1 MiB payloads.
    fn default() -> Self {
        Self { max_control_line: 4096, max_payload: 1024 * 1024 }
    }
}

/// One operation from a client, borrowing from the parsed buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOp<'a> {
    /// `CONNECT` with its JSON options (not parsed here).
    Connect(&'a str),
    /// `PUB`.
    Pub {
        /// Subject.
        subject: &'a str,
        /// Reply subject.
        reply: Option<&'a str>,
        /// Payload.
        payload: &'a [u8],
    },
    /// `HPUB`: headers (the `NATS/1.0` block) and payload.
    Hpub {
        /// Subject.
        subject: &'a str,
        /// Reply subject.
        reply: Option<&'a str>,
        /// The header block, `NATS/1.0␍␊…␍␊␍␊`.
        headers: &'a [u8],
        /// Payload.
        payload: &'a [u8],
    },
    /// `SUB`.
    Sub {
        /// Subject (may contain wildcards).
        subject: &'a str,
        /// Queue group.
        queue: Option<&'a str>,
        /// Subscription id, chosen by the client.
        sid: &'a str,
    },
    /// `UNSUB`, optionally after `max` more messages.
    Unsub {
        /// Subscription id.
        sid: &'a str,
        /// Unsubscribe after this many messages in total.
        max: Option<u64>,
    },
    /// `PING`.
    Ping,
    /// `PONG`.
    Pong,
}

/// Why bytes are not a valid client operation. The NATS server answers each with `-ERR` and
/// closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NatsError {
    /// Not an operation a client may send.
    #[error("Unknown Protocol Operation")]
    UnknownOp,
    /// No CRLF within the control-line limit.
    #[error("Maximum Control Line Exceeded")]
    ControlLineTooLong,
    /// A payload larger than the limit.
    #[error("Maximum Payload Violation")]
    PayloadTooLarge,
    /// Wrong number or form of arguments.
    #[error("Unknown Protocol Operation: invalid arguments for {0}")]
    InvalidArgs(&'static str),
    /// The payload is not followed by CRLF.
    #[error("Unknown Protocol Operation: payload not followed by CRLF")]
    MissingCrlf,
    /// A control line that is not UTF-8.
    #[error("Unknown Protocol Operation: control line is not UTF-8")]
    NotUtf8,
}

/// Parses one operation from the start of `buf`: `Ok(Some((op, consumed)))`, or `Ok(None)` when
/// `buf` holds only the beginning of one.
pub fn parse<'a>(buf: &'a [u8], limits: &Limits) -> Result<Option<(ClientOp<'a>, usize)>, NatsError> {
    let Some(end) = find_crlf(buf, limits.max_control_line)? else { return Ok(None) };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| NatsError::NotUtf8)?;
    let after = end + 2;
    let (name, rest) = match line.find([' ', '\t']) {
        Some(i) => (&line[..i], line[i..].trim_start_matches([' ', '\t'])),
        None => (line, ""),
    };
    let mut args = rest.split([' ', '\t']).filter(|a| !a.is_empty());
    let mut take = |n: usize| -> Option<[&'a str; 4]> {
        let mut out = [""; 4];
        for slot in out.iter_mut().take(n) {
            *slot = args.next()?;
        }
        args.next().is_none().then_some(out)
    };
    // Case-insensitive op names, without allocating.
    let is = |op: &str| name.eq_ignore_ascii_case(op);
    let op = if is("PING") && rest.is_empty() {
        ClientOp::Ping
    } else if is("PONG") && rest.is_empty() {
        ClientOp::Pong
    } else if is("CONNECT") {
        ClientOp::Connect(rest)
    } else if is("PUB") {
        let (subject, reply, size) = match rest.split([' ', '\t']).filter(|a| !a.is_empty()).count() {
            2 => take(2).map(|a| (a[0], None, a[1])),
            3 => take(3).map(|a| (a[0], Some(a[1]), a[2])),
            _ => None,
        }
        .ok_or(NatsError::InvalidArgs("PUB"))?;
        let size = number(size, "PUB")?;
        let Some(payload) = payload(buf, after, size, limits)? else { return Ok(None) };
        return Ok(Some((ClientOp::Pub { subject, reply, payload }, after + size + 2)));
    } else if is("HPUB") {
        let (subject, reply, hsize, total) =
            match rest.split([' ', '\t']).filter(|a| !a.is_empty()).count() {
                3 => take(3).map(|a| (a[0], None, a[1], a[2])),
                4 => take(4).map(|a| (a[0], Some(a[1]), a[2], a[3])),
                _ => None,
            }
            .ok_or(NatsError::InvalidArgs("HPUB"))?;
        let (hsize, total) = (number(hsize, "HPUB")?, number(total, "HPUB")?);
        if hsize > total {
            return Err(NatsError::InvalidArgs("HPUB"));
        }
        let Some(all) = payload(buf, after, total, limits)? else { return Ok(None) };
        let (headers, payload) = all.split_at(hsize);
        return Ok(Some((ClientOp::Hpub { subject, reply, headers, payload }, after + total + 2)));
    } else if is("SUB") {
        match rest.split([' ', '\t']).filter(|a| !a.is_empty()).count() {
            2 => take(2).map(|a| ClientOp::Sub { subject: a[0], queue: None, sid: a[1] }),
            3 => take(3).map(|a| ClientOp::Sub { subject: a[0], queue: Some(a[1]), sid: a[2] }),
            _ => None,
        }
        .ok_or(NatsError::InvalidArgs("SUB"))?
    } else if is("UNSUB") {
        match rest.split([' ', '\t']).filter(|a| !a.is_empty()).count() {
            1 => take(1).map(|a| Ok(ClientOp::Unsub { sid: a[0], max: None })),
            2 => take(2)
                .map(|a| number(a[1], "UNSUB").map(|n| ClientOp::Unsub { sid: a[0], max: Some(n as u64) })),
            _ => None,
        }
        .ok_or(NatsError::InvalidArgs("UNSUB"))??
    } else {
        return Err(NatsError::UnknownOp);
    };
    Ok(Some((op, after)))
}

/// Index of the first CRLF, or None while none has arrived within `max` bytes.
fn find_crlf(buf: &[u8], max: usize) -> Result<Option<usize>, NatsError> {
    let window = &buf[..buf.len().min(max + 2)];
    match window.windows(2).position(|w| w == b"\r\n") {
        Some(i) if i <= max => Ok(Some(i)),
        Some(_) => Err(NatsError::ControlLineTooLong),
        None if buf.len() > max + 1 => Err(NatsError::ControlLineTooLong),
        None => Ok(None),
    }
}

fn number(text: &str, op: &'static str) -> Result<usize, NatsError> {
    if text.is_empty() || text.len() > 12 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NatsError::InvalidArgs(op));
    }
    text.parse().map_err(|_| NatsError::InvalidArgs(op))
}

/// The `size` payload bytes after the control line, once they and their CRLF have arrived.
fn payload<'a>(
    buf: &'a [u8],
    start: usize,
    size: usize,
    limits: &Limits,
) -> Result<Option<&'a [u8]>, NatsError> {
    if size > limits.max_payload {
        return Err(NatsError::PayloadTooLarge);
    }
    let end = start + size;
    if buf.len() < end + 2 {
        return Ok(None);
    }
    if &buf[end..end + 2] != b"\r\n" {
        return Err(NatsError::MissingCrlf);
    }
    Ok(Some(&buf[start..end]))
}

/// The header block of HPUB and HMSG: `NATS/1.0[ <status>[ <description>]]␍␊(<name>: <value>␍␊)*␍␊`.
pub mod headers {
    /// A parsed header block, borrowing from the input.
    #[derive(Debug, Clone, PartialEq, Eq, Default)]
    pub struct Block<'a> {
        /// The status code of the version line (`503` for "no responders"), if any.
        pub status: Option<u16>,
        /// The description after the status code.
        pub description: &'a str,
        /// Name/value pairs in order; names may repeat.
        pub pairs: Vec<(&'a str, &'a str)>,
    }

    /// Parses a header block; `None` when it is not one (wrong version line, a line without a
    /// colon, not UTF-8).
    pub fn parse(block: &[u8]) -> Option<Block<'_>> {
        let text = std::str::from_utf8(block).ok()?;
        let text = text.strip_suffix("\r\n\r\n").or_else(|| text.strip_suffix("\r\n"))?;
        let mut lines = text.split("\r\n");
        let version = lines.next()?;
        let rest = version.strip_prefix("NATS/1.0")?;
        let mut out = Block::default();
        let rest = rest.trim_start_matches([' ', '\t']);
        if !rest.is_empty() {
            let (code, description) = rest.split_once([' ', '\t']).unwrap_or((rest, ""));
            if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            out.status = code.parse().ok();
            out.description = description.trim();
        }
        for line in lines {
            let (name, value) = line.split_once(':')?;
            // Any name but an empty one: nats-server relays header blocks unread, and clients
            // (nats.go) let a name hold spaces.
            let name = name.trim();
            if name.is_empty() {
                return None;
            }
            out.pairs.push((name, value.trim()));
        }
        Some(out)
    }

    /// Writes a header block. Names and values must not contain CR or LF (they are dropped if
    /// they do), names no colon nor leading or trailing white space.
    pub fn write<'a>(
        out: &mut impl bytes::BufMut,
        status: Option<(u16, &str)>,
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) {
        out.put_slice(b"NATS/1.0");
        if let Some((code, description)) = status {
            out.put_u8(b' ');
            super::write::put_number(out, u64::from(code));
            if !description.is_empty() {
                out.put_u8(b' ');
                out.put_slice(description.as_bytes());
            }
        }
        out.put_slice(b"\r\n");
        let clean = |s: &str| !s.contains(['\r', '\n']);
        for (name, value) in pairs {
            // What `parse` gives back: no colon, nothing for the trim to take.
            let name_ok = !name.is_empty() && !name.contains(':') && name.trim() == name;
            if clean(name) && clean(value) && name_ok {
                out.put_slice(name.as_bytes());
                out.put_slice(b": ");
                out.put_slice(value.as_bytes());
                out.put_slice(b"\r\n");
            }
        }
        out.put_slice(b"\r\n");
    }
}

/// Writers for what the server sends, into any [`bytes::BufMut`] (a `Vec<u8>`, a `BytesMut`),
/// without allocating.
pub mod write {
    use bytes::BufMut;

    /// `MSG <subject> <sid> [reply-to] <#bytes>␍␊<payload>␍␊`
    pub fn msg(out: &mut impl BufMut, subject: &str, sid: &str, reply: Option<&str>, payload: &[u8]) {
        head(out, "MSG", subject, sid, reply);
        out.put_u8(b' ');
        put_number(out, payload.len() as u64);
        out.put_slice(b"\r\n");
        out.put_slice(payload);
        out.put_slice(b"\r\n");
    }

    /// `HMSG <subject> <sid> [reply-to] <#header bytes> <#total bytes>␍␊<headers><payload>␍␊`
    pub fn hmsg(
        out: &mut impl BufMut,
        subject: &str,
        sid: &str,
        reply: Option<&str>,
        headers: &[u8],
        payload: &[u8],
    ) {
        head(out, "HMSG", subject, sid, reply);
        out.put_u8(b' ');
        put_number(out, headers.len() as u64);
        out.put_u8(b' ');
        put_number(out, (headers.len() + payload.len()) as u64);
        out.put_slice(b"\r\n");
        out.put_slice(headers);
        out.put_slice(payload);
        out.put_slice(b"\r\n");
    }

    /// `<op> <subject> <sid> [reply-to]`, the part MSG and HMSG share.
    fn head(out: &mut impl BufMut, op: &str, subject: &str, sid: &str, reply: Option<&str>) {
        out.put_slice(op.as_bytes());
        out.put_u8(b' ');
        out.put_slice(subject.as_bytes());
        out.put_u8(b' ');
        out.put_slice(sid.as_bytes());
        if let Some(r) = reply {
            out.put_u8(b' ');
            out.put_slice(r.as_bytes());
        }
    }

    /// A decimal number, without allocating.
    pub fn put_number(out: &mut impl BufMut, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        out.put_slice(&digits[at..]);
    }

    /// `-ERR '<text>'␍␊` (quotes, CR and LF in the text are dropped).
    pub fn err(out: &mut impl BufMut, text: &str) {
        out.put_slice(b"-ERR '");
        for b in text.bytes().filter(|&b| b != b'\'' && b != b'\r' && b != b'\n') {
            out.put_u8(b);
        }
        out.put_slice(b"'\r\n");
    }

    /// `INFO {json}␍␊`
    pub fn info(out: &mut impl BufMut, json: &str) {
        out.put_slice(b"INFO ");
        out.put_slice(json.as_bytes());
        out.put_slice(b"\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(input: &str) -> Result<Option<(ClientOp<'_>, usize)>, NatsError> {
        parse(input.as_bytes(), &Limits::default())
    }

    #[test]
    fn every_op() {
        assert_eq!(one("PING\r\n"), Ok(Some((ClientOp::Ping, 6))));
        assert_eq!(one("pong\r\n"), Ok(Some((ClientOp::Pong, 6))));
        assert_eq!(
            one("CONNECT {\"verbose\":false}\r\n").unwrap().unwrap().0,
            ClientOp::Connect("{\"verbose\":false}")
        );
        assert_eq!(
            one("PUB a.b 5\r\nhello\r\n"),
            Ok(Some((ClientOp::Pub { subject: "a.b", reply: None, payload: b"hello" }, 18)))
        );
        assert_eq!(
            one("pub a.b _INBOX.1  0\r\n\r\n").unwrap().unwrap().0,
            ClientOp::Pub { subject: "a.b", reply: Some("_INBOX.1"), payload: b"" }
        );
        let h = "HPUB a 12 14\r\nNATS/1.0\r\n\r\nhi\r\n";
        assert_eq!(
            one(h).unwrap().unwrap().0,
            ClientOp::Hpub { subject: "a", reply: None, headers: b"NATS/1.0\r\n\r\n", payload: b"hi" }
        );
        assert_eq!(
            one("SUB a.* 1\r\n").unwrap().unwrap().0,
            ClientOp::Sub { subject: "a.*", queue: None, sid: "1" }
        );
        assert_eq!(
            one("SUB a q 7\r\n").unwrap().unwrap().0,
            ClientOp::Sub { subject: "a", queue: Some("q"), sid: "7" }
        );
        assert_eq!(one("UNSUB 7\r\n").unwrap().unwrap().0, ClientOp::Unsub { sid: "7", max: None });
        assert_eq!(one("UNSUB 7 10\r\n").unwrap().unwrap().0, ClientOp::Unsub { sid: "7", max: Some(10) });
    }

    #[test]
    fn incomplete_is_not_an_error() {
        for partial in ["", "PI", "PING\r", "PUB a 5\r\nhel", "PUB a 5\r\nhello", "PUB a 5\r\nhello\r"] {
            assert_eq!(one(partial), Ok(None), "{partial:?}");
        }
    }

    #[test]
    fn errors() {
        assert_eq!(one("FOO\r\n"), Err(NatsError::UnknownOp));
        assert_eq!(one("PUB a\r\n"), Err(NatsError::InvalidArgs("PUB")));
        assert_eq!(one("PUB a x\r\n"), Err(NatsError::InvalidArgs("PUB")));
        assert_eq!(one("PUB a 2\r\nhi!!"), Err(NatsError::MissingCrlf));
        assert_eq!(one("HPUB a 5 3\r\n"), Err(NatsError::InvalidArgs("HPUB")));
        assert_eq!(one("SUB a\r\n"), Err(NatsError::InvalidArgs("SUB")));
        assert_eq!(one("UNSUB\r\n"), Err(NatsError::InvalidArgs("UNSUB")));
        assert_eq!(one("PING extra\r\n"), Err(NatsError::UnknownOp));
        let limits = Limits { max_control_line: 16, max_payload: 4 };
        assert_eq!(parse(b"PUB a 5\r\n", &limits), Err(NatsError::PayloadTooLarge));
        assert_eq!(parse(b"PUB a.very.long.subject 1\r\n", &limits), Err(NatsError::ControlLineTooLong));
        // Refused before the CRLF arrives.
        assert_eq!(parse(&[b'x'; 40], &limits), Err(NatsError::ControlLineTooLong));
        assert_eq!(
            parse(b"PUB a 99999999999999999999\r\n", &Limits::default()),
            Err(NatsError::InvalidArgs("PUB"))
        );
    }

    #[test]
    fn writers() {
        let mut out = Vec::new();
        write::msg(&mut out, "a.b", "1", Some("_INBOX.x"), b"hi");
        write::err(&mut out, "Permissions Violation for Publish to 'x'");
        assert_eq!(out, b"MSG a.b 1 _INBOX.x 2\r\nhi\r\n-ERR 'Permissions Violation for Publish to x'\r\n");
        out.clear();
        write::hmsg(&mut out, "a", "22", None, b"NATS/1.0\r\n\r\n", b"x");
        assert_eq!(out, b"HMSG a 22 12 13\r\nNATS/1.0\r\n\r\nx\r\n");
        out.clear();
        write::put_number(&mut out, 0);
        write::put_number(&mut out, u64::MAX);
        assert_eq!(out, b"018446744073709551615");
    }

    #[test]
    fn header_blocks_round_trip() {
        let mut out = Vec::new();
        headers::write(&mut out, Some((503, "")), [("A", "1"), ("Bad\r\n", "x"), ("B", "two words")]);
        assert_eq!(out, b"NATS/1.0 503\r\nA: 1\r\nB: two words\r\n\r\n");
        let block = headers::parse(&out).unwrap();
        assert_eq!(block.status, Some(503));
        assert_eq!(block.pairs, vec![("A", "1"), ("B", "two words")]);
        let plain = headers::parse(b"NATS/1.0\r\nX-Id: 7\r\nX-Id:8\r\n\r\n").unwrap();
        assert_eq!((plain.status, plain.pairs), (None, vec![("X-Id", "7"), ("X-Id", "8")]));
        let spaced = headers::parse(b"NATS/1.0\r\nMy Key: 1\r\n\r\n").unwrap();
        assert_eq!(spaced.pairs, vec![("My Key", "1")]);
        let status = headers::parse(b"NATS/1.0 408 Request Timeout\r\n\r\n").unwrap();
        assert_eq!((status.status, status.description), (Some(408), "Request Timeout"));
        for bad in [
            &b"HTTP/1.1\r\n\r\n"[..],
            b"NATS/1.0\r\nnocolon\r\n\r\n",
            b"NATS/1.0\r\n : x\r\n\r\n",
            b"NATS/1.0 5x3\r\n\r\n",
            b"\xff",
        ] {
            assert_eq!(headers::parse(bad), None, "{bad:?}");
        }
    }
}
