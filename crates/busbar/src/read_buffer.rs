//! A connection's read buffer, and the earlier ones it takes back.
//!
//! Received messages point into the buffer they were read into (no copy), so when the buffer
//! fills up it is usually still shared with messages the application has not dropped yet, and a
//! new one must be allocated. Allocated afresh each time, at 64 KiB a turn, the allocator hands
//! the memory back to the system and the kernel faults in zeroed pages again on the next read
//! (about 6 % of the bench client's CPU in 1 KiB pub/sub). So the buffer let go of is kept, empty,
//! among a few [`SPARE_BUFFERS`]; when the application keeps up, it has dropped what pointed into
//! one of them by the time the current one fills, and that one is taken back instead.
//!
//! What this keeps alive: at most [`SPARE_BUFFERS`] buffers beside the current one, each under
//! one and a half [`READ_BUFFER`]s, once a connection has filled one, until it closes (a
//! connection that never filled one keeps none). A frame larger than half a buffer grows the
//! buffer as before, and a buffer grown so is let go of, not kept.

use std::collections::VecDeque;

use bytes::BytesMut;

/// Room a read takes, at least: the buffer is renewed when less is left than an eighth of it.
pub(crate) const READ_BUFFER: usize = 64 * 1024;
/// Earlier buffers kept to be taken back.
pub(crate) const SPARE_BUFFERS: usize = 3;

/// The bytes read and not decoded yet, and earlier buffers to take back.
#[derive(Debug, Default)]
pub(crate) struct ReadBuffer {
    buf: BytesMut,
    /// Oldest first; each empty, still shared with messages when it was put here.
    spare: VecDeque<BytesMut>,
    /// `buf` is of the usual size (allocated here, or a spare taken back): worth keeping as a
    /// spare. Not the empty one a connection starts with, nor one grown for a large frame.
    usual: bool,
}

impl ReadBuffer {
    /// The bytes read and not decoded yet (frames are split off the front).
    pub(crate) fn bytes(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Makes room for a read of at least an eighth of [`READ_BUFFER`]: in place when nothing
    /// else points into the buffer any more, else in a spare buffer nothing points into, else in
    /// a new one. What is left undecoded (the start of a frame) moves along.
    pub(crate) fn make_room(&mut self) {
        // A buffer nothing else points into is taken back whole (its start included): asking
        // for half of one is enough to tell that it is a full-sized one.
        if self.buf.capacity() - self.buf.len() >= READ_BUFFER / 8 || self.buf.try_reclaim(READ_BUFFER / 2) {
            return;
        }
        let left = self.buf.len();
        if left > READ_BUFFER / 2 {
            // A frame larger than a buffer, coming in: grow this one as a `Vec` grows (doubling,
            // so the bytes already read are copied a bounded number of times), and keep no spare
            // of that size.
            self.buf.reserve(READ_BUFFER);
            self.usual = false;
            return;
        }
        let next = match self.spare.iter_mut().position(|b| b.try_reclaim(left + READ_BUFFER / 2)) {
            Some(i) => self.spare.remove(i).unwrap_or_default(),
            None => BytesMut::with_capacity(READ_BUFFER + left),
        };
        let mut old = std::mem::replace(&mut self.buf, next);
        self.buf.extend_from_slice(&old);
        if !std::mem::replace(&mut self.usual, true) {
            return;
        }
        old.clear();
        if self.spare.len() == SPARE_BUFFERS {
            // The oldest is the likeliest to be pinned for good (by a topic kept for reuse).
            self.spare.pop_front();
        }
        self.spare.push_back(old);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fills the buffer as reads would, leaving `partial` bytes of a frame cut short.
    fn fill(rb: &mut ReadBuffer, partial: usize) -> Vec<bytes::Bytes> {
        rb.make_room();
        let room = rb.bytes().capacity() - rb.bytes().len();
        let before = rb.bytes().len();
        rb.bytes().extend(std::iter::repeat_n(7u8, room));
        // "Decode" everything but the last `partial` bytes, as messages that point into it.
        let whole = before + room - partial;
        let mut taken = Vec::new();
        let mut decoded = rb.bytes().split_to(whole);
        while !decoded.is_empty() {
            taken.push(decoded.split_to(decoded.len().min(1000)).freeze());
        }
        taken
    }

    #[test]
    fn a_buffer_nothing_points_into_is_taken_back() {
        let mut rb = ReadBuffer::default();
        let held = fill(&mut rb, 10);
        let first = held[0].as_ptr();
        // Still held: a new buffer, the first kept aside.
        let held_too = fill(&mut rb, 3);
        assert_ne!(held_too[0].as_ptr(), first);
        assert_eq!(rb.spare.len(), 1, "the first buffer (not the empty one it started with)");
        // The application drops what it had from the first buffer: it comes back, the three
        // bytes of the frame cut short moved to its front.
        drop(held);
        rb.make_room();
        assert_eq!(rb.bytes().as_ptr(), first);
        assert_eq!(&rb.bytes()[..], &[7, 7, 7]);
        assert!(rb.bytes().capacity() >= READ_BUFFER);
        drop(held_too);
    }

    #[test]
    fn a_buffer_no_longer_shared_is_reused_in_place() {
        let mut rb = ReadBuffer::default();
        let held = fill(&mut rb, 5);
        let ptr = held[0].as_ptr();
        drop(held);
        rb.make_room();
        assert_eq!(rb.bytes().as_ptr(), ptr);
        assert_eq!(rb.bytes().len(), 5);
    }

    #[test]
    fn a_frame_larger_than_a_buffer_grows_it_by_doubling() {
        let mut rb = ReadBuffer::default();
        let held = fill(&mut rb, 0);
        // Reads of one frame of a few buffers' size: nothing is decoded, the buffer fills.
        let mut grown = 0;
        while rb.bytes().len() < 16 * READ_BUFFER {
            rb.make_room();
            grown += 1;
            let room = rb.bytes().capacity() - rb.bytes().len();
            rb.bytes().extend(std::iter::repeat_n(1u8, room));
        }
        // Doubling: about log2(16) growths (a buffer at a time would take 16, copying all that
        // was read each time).
        assert!(grown <= 7, "grown {grown} times");
        // The large frame decoded and held (the grown buffer full and shared): the next read
        // goes to another buffer, and the grown one is let go of, not kept as a spare.
        let spares = rb.spare.len();
        let large = rb.bytes().split().freeze();
        let small = fill(&mut rb, 0);
        assert_eq!(rb.spare.len(), spares, "no spare kept of a large frame's size");
        assert!(rb.bytes().capacity() < READ_BUFFER * 3 / 2);
        drop((held, large, small));
    }

    #[test]
    fn spares_are_bounded() {
        let mut rb = ReadBuffer::default();
        let mut all_held = Vec::new();
        for _ in 0..SPARE_BUFFERS * 3 {
            all_held.push(fill(&mut rb, 1));
            assert!(rb.spare.len() <= SPARE_BUFFERS);
        }
        assert_eq!(rb.spare.len(), SPARE_BUFFERS);
    }
}
