//! Fuzzes the native frame decoder: any bytes, fed whole and in two pieces, must decode to the
//! same frames and the same error, never panic, and every frame decoded must re-encode to bytes
//! that decode to the same frame. The fast paths for PUB and MSG (`decode_with`,
//! `decode_msg_with`) must agree with `decode` on every input.
#![no_main]

use busbar_core::frame::{self, DEFAULT_MAX_FRAME_SIZE};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fn decode_all(mut buf: BytesMut) -> (Vec<busbar_core::Frame>, Option<busbar_core::FrameError>) {
    let mut frames = Vec::new();
    loop {
        match frame::decode(&mut buf, DEFAULT_MAX_FRAME_SIZE) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return (frames, None),
            Err(e) => return (frames, Some(e)),
        }
    }
}

/// `decode_all` through a fast path: `pick` is `decode_with` or `decode_msg_with`, rebuilt into frames.
fn decode_all_with(
    mut buf: BytesMut,
    pick: fn(&mut BytesMut) -> Result<Option<busbar_core::Frame>, busbar_core::FrameError>,
) -> (Vec<busbar_core::Frame>, Option<busbar_core::FrameError>) {
    let mut frames = Vec::new();
    loop {
        match pick(&mut buf) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return (frames, None),
            Err(e) => return (frames, Some(e)),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (frames, error) = decode_all(BytesMut::from(data));

    // The fast paths agree with the plain decoder.
    let with = decode_all_with(BytesMut::from(data), |b| {
        frame::decode_with(b, DEFAULT_MAX_FRAME_SIZE, busbar_core::Frame::Pub, |f| f)
    });
    assert_eq!(with, (frames.clone(), error.clone()));
    let msg = decode_all_with(BytesMut::from(data), |b| {
        frame::decode_msg_with(b, DEFAULT_MAX_FRAME_SIZE, |sid, message| busbar_core::Frame::Msg { sid, message }, |f| f)
    });
    assert_eq!(msg, (frames.clone(), error.clone()));

    // The same bytes in two pieces decode the same way.
    let cut = data.first().map_or(0, |b| *b as usize % (data.len() + 1));
    let mut buf = BytesMut::from(&data[..cut]);
    let mut split_frames = Vec::new();
    let mut split_error = None;
    'feed: for piece in [&data[cut..], &[][..]] {
        loop {
            match frame::decode(&mut buf, DEFAULT_MAX_FRAME_SIZE) {
                Ok(Some(f)) => split_frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    split_error = Some(e);
                    break 'feed;
                }
            }
        }
        buf.extend_from_slice(piece);
    }
    assert_eq!(split_frames, frames);
    assert_eq!(split_error, error);

    // What decodes, re-encodes to the same frame.
    for f in frames {
        let mut out = BytesMut::new();
        f.encode(&mut out, usize::MAX).expect("a decoded frame encodes");
        assert_eq!(frame::decode(&mut out, DEFAULT_MAX_FRAME_SIZE).unwrap().as_ref(), Some(&f));
    }
});
