//! A connection's outbound queue: bounded in bytes, drained in batches by its writer.
//!
//! Fan-out pushes into it without ever waiting; the socket's writer takes everything queued
//! at once and hands it to the kernel in as few vectored writes as it takes. A client that
//! reads too slowly fills its queue and is closed with [`CloseReason::SlowConsumer`], so it
//! never delays others nor grows memory without bound.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use crate::protocol::CloseReason;

/// One WebSocket frame as it goes on the wire, shared by every recipient (reference
/// counted, never copied). A server's frames are not masked, so an event is framed once
/// for all its sockets and a writer only hands the bytes to the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame(Bytes);

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;

impl Frame {
    /// A text frame.
    pub fn text(text: &str) -> Frame {
        Frame::encode(OP_TEXT, &[text.as_bytes()])
    }

    /// A close frame with the reason's code and text.
    pub fn close(reason: CloseReason) -> Frame {
        Frame::encode(
            OP_CLOSE,
            &[&reason.code().to_be_bytes(), reason.text().as_bytes()],
        )
    }

    /// Bytes that are frames already (what the WebSocket reader writes: pongs).
    pub fn framed(bytes: Bytes) -> Frame {
        Frame(bytes)
    }

    fn encode(opcode: u8, parts: &[&[u8]]) -> Frame {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut wire = Vec::with_capacity(len + 10);
        wire.push(0x80 | opcode);
        match len {
            0..=125 => wire.push(len as u8),
            126..=0xffff => {
                wire.push(126);
                wire.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                wire.push(127);
                wire.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        for part in parts {
            wire.extend_from_slice(part);
        }
        Frame(wire.into())
    }

    /// The frame's bytes on the wire.
    pub fn wire(&self) -> &Bytes {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Frame {
    fn from(text: String) -> Frame {
        Frame::text(&text)
    }
}

/// What became of a pushed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The queue was full: the frame was dropped and the connection is now closing as a
    /// slow consumer. Reported once per connection.
    Overflowed,
    /// The connection is already closing; the frame was dropped.
    Closed,
}

/// A bounded, byte-limited frame queue with a single consumer (the socket's writer).
///
/// A std mutex, not tokio's: it is held for a few pointer moves and never across `.await`.
/// The writer's waker sits under the same lock, so waking it costs no second lock: it is
/// woken when frames arrive in an empty queue, a close is requested or the queue overflows.
pub struct Outbox {
    state: Mutex<State>,
    limit_bytes: usize,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Frame>,
    bytes: usize,
    close: Option<CloseReason>,
    writer: Option<Waker>,
}

impl State {
    fn park(&mut self, cx: &Context<'_>) {
        match &self.writer {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => self.writer = Some(cx.waker().clone()),
        }
    }
}

impl Outbox {
    pub fn new(limit_bytes: usize) -> Self {
        Outbox {
            state: Mutex::default(),
            limit_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere cannot leave `State` half-updated, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame, or closes the connection as a slow consumer when it would not fit.
    pub fn push(&self, frame: Frame) -> Pushed {
        let mut state = self.lock();
        if state.close.is_some() {
            return Pushed::Closed;
        }
        if state.bytes + frame.len() > self.limit_bytes {
            state.close = Some(CloseReason::SlowConsumer);
            state.frames = VecDeque::new();
            state.bytes = 0;
            let writer = state.writer.take();
            drop(state);
            if let Some(writer) = writer {
                writer.wake();
            }
            return Pushed::Overflowed;
        }
        state.bytes += frame.len();
        state.frames.push_back(frame);
        // A writer with frames still queued has not parked since: no need to wake it.
        let writer = if state.frames.len() == 1 {
            state.writer.take()
        } else {
            None
        };
        drop(state);
        if let Some(writer) = writer {
            writer.wake();
        }
        Pushed::Queued
    }

    /// Asks the writer to close the connection once the frames queued so far are written.
    /// The first reason given wins.
    pub fn close(&self, reason: CloseReason) {
        let mut state = self.lock();
        if state.close.is_none() {
            state.close = Some(reason);
        }
        let writer = state.writer.take();
        drop(state);
        if let Some(writer) = writer {
            writer.wake();
        }
    }

    /// Whether a close was requested, and why.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.lock().close
    }

    /// Waits for work: moves every queued frame into `batch` and returns `None`, or, once
    /// the queue is empty and a close was requested, returns its reason.
    pub async fn next_batch(&self, batch: &mut Vec<Frame>) -> Option<CloseReason> {
        poll_fn(|cx| {
            let mut state = self.lock();
            if !state.frames.is_empty() {
                batch.extend(state.frames.drain(..));
                state.bytes = 0;
                if state.frames.capacity() > 64 {
                    // Give back what a burst grew, so idle connections stay small.
                    state.frames = VecDeque::new();
                }
                return Poll::Ready(None);
            }
            if let Some(reason) = state.close {
                return Poll::Ready(Some(reason));
            }
            state.park(cx);
            Poll::Pending
        })
        .await
    }

    /// Completes when the queue overflows: the writer races its socket write with this.
    pub async fn overflow(&self) {
        poll_fn(|cx| {
            let mut state = self.lock();
            if state.close == Some(CloseReason::SlowConsumer) {
                return Poll::Ready(());
            }
            state.park(cx);
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: usize) -> Frame {
        Frame::framed(Bytes::from(vec![b'x'; n]))
    }

    #[test]
    fn frames_carry_rfc_6455_headers() {
        assert_eq!(Frame::text("hi").wire().as_ref(), b"\x81\x02hi");
        let long = Frame::text(&"y".repeat(300));
        assert_eq!(long.wire()[..4], [0x81, 126, 1, 44]);
        assert_eq!(long.len(), 304);
        let huge = Frame::text(&"z".repeat(70_000));
        assert_eq!(huge.wire()[..2], [0x81, 127]);
        assert_eq!(huge.wire()[2..10], 70_000u64.to_be_bytes());
        let close = Frame::close(CloseReason::SlowConsumer);
        assert_eq!(close.wire()[0], 0x88);
        assert_eq!(close.wire()[2..4], 4008u16.to_be_bytes());
    }

    #[tokio::test]
    async fn batches_everything_queued() {
        let outbox = Outbox::new(100);
        assert_eq!(outbox.push(frame(10)), Pushed::Queued);
        assert_eq!(outbox.push(frame(20)), Pushed::Queued);
        let mut batch = Vec::new();
        assert_eq!(outbox.next_batch(&mut batch).await, None);
        assert_eq!(batch.len(), 2);
    }

    #[tokio::test]
    async fn overflow_drops_the_queue_and_closes_as_slow_consumer() {
        let outbox = Outbox::new(25);
        assert_eq!(outbox.push(frame(20)), Pushed::Queued);
        assert_eq!(outbox.push(frame(10)), Pushed::Overflowed);
        assert_eq!(outbox.push(frame(1)), Pushed::Closed);
        outbox.overflow().await;
        let mut batch = Vec::new();
        assert_eq!(
            outbox.next_batch(&mut batch).await,
            Some(CloseReason::SlowConsumer)
        );
        assert!(batch.is_empty());
    }

    #[tokio::test]
    async fn a_requested_close_comes_after_queued_frames() {
        let outbox = Outbox::new(100);
        outbox.push(frame(5));
        outbox.close(CloseReason::GoingAway);
        outbox.close(CloseReason::Normal);
        let mut batch = Vec::new();
        assert_eq!(outbox.next_batch(&mut batch).await, None);
        assert_eq!(batch.len(), 1);
        assert_eq!(
            outbox.next_batch(&mut batch).await,
            Some(CloseReason::GoingAway)
        );
    }
}
