//! A connection's outbound queue: bounded in bytes, drained in batches by its writer.
//!
//! Fan-out pushes into it without ever waiting; the socket's writer takes everything queued
//! at once and hands it to the kernel in as few vectored writes as it takes. A client that
//! reads too slowly fills its queue and is closed with [`CloseReason::SlowConsumer`], so it
//! never delays others nor grows memory without bound.
//!
//! Fan-out may also write for an idle writer ([`Outbox::flush`]): most events find every
//! writer idle, and a write made where the event is costs no task wake-up and poll per
//! socket, which were about 30 % of a delivery's user-space instructions.

use std::future::poll_fn;
use std::io;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use crate::deflate::{self, Agreement, DeflateSettings, Mode, SocketContext};
use crate::protocol::CloseReason;
use crate::sink::{Sink, Written, write_some};

/// One WebSocket frame as it goes on the wire, shared by every recipient (reference
/// counted, never copied). A server's frames are not masked, so an event is framed once
/// for all its sockets and a writer only hands the bytes to the kernel.
///
/// An event's frame may also go compressed (permessage-deflate): on each socket's own
/// stream when it reaches few sockets, else in a form made once, by the first socket that
/// agreed to compression, and shared like the frame.
#[derive(Clone, Debug)]
pub struct Frame {
    wire: Bytes,
    deflatable: Option<Arc<Deflatable>>,
}

/// How a frame goes compressed. Its shared forms are made when first needed: one per
/// window size (almost always only the full window's, which every client whose window
/// holds the payload shares).
#[derive(Debug)]
struct Deflatable {
    route: Route,
    /// Whether the payload is long enough to go compressed without context.
    alone: bool,
    level: u32,
    /// The frame as it is, for its text (it enters the window of every client that gets
    /// a compressed form).
    plain: Bytes,
    /// The whole compressed frame (RSV1 set) per window, 9 to 15 bits; `None` when
    /// deflate gains nothing.
    wire: [OnceLock<Option<Bytes>>; 7],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// An event for few sockets: on each socket's own stream (with context) where the
    /// socket agreed to context, else in the shared form.
    PerSocket,
    /// An event for many sockets: once, in the shared form.
    Shared,
    /// A frame the node makes for one socket (authentication, `page_add`, a replay's
    /// result): on the socket's own stream when it holds one, else in a block of literals,
    /// which costs no compressor yet primes the client's window for the stream to come.
    Reply,
}

/// What every reply shares: it has no shared form.
static REPLY: LazyLock<Arc<Deflatable>> = LazyLock::new(|| {
    Arc::new(Deflatable {
        route: Route::Reply,
        alone: false,
        level: 0,
        plain: Bytes::new(),
        wire: Default::default(),
    })
});

impl PartialEq for Frame {
    fn eq(&self, other: &Frame) -> bool {
        self.wire == other.wire
    }
}

impl Eq for Frame {}

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

impl Frame {
    /// A text frame.
    pub fn text(text: &str) -> Frame {
        Frame::encode(OP_TEXT, &[text.as_bytes()])
    }

    /// A text frame the node makes for one socket alone (authentication, `page_add`, a
    /// replay's result): it goes compressed on the socket's own context, never shared.
    pub fn reply(text: &str) -> Frame {
        Frame {
            deflatable: Some(REPLY.clone()),
            ..Frame::text(text)
        }
    }

    /// A ping without payload: the client's pong shows it is still there.
    pub fn ping() -> Frame {
        Frame::framed(Bytes::from_static(&[0x80 | OP_PING, 0]))
    }

    /// The answer to a client's ping, with its payload.
    pub fn pong(payload: &[u8]) -> Frame {
        Frame::encode(OP_PONG, &[payload])
    }

    /// A close frame with the reason's code and text.
    pub fn close(reason: CloseReason) -> Frame {
        Frame::encode(
            OP_CLOSE,
            &[&reason.code().to_be_bytes(), reason.text().as_bytes()],
        )
    }

    /// An event's text frame: the payload, with its history id (when it has one) written
    /// in as `_event_id`, last, so that it wins over any `_event_id` the payload had.
    /// A checked payload is a JSON object, so it ends with `}`.
    pub fn event(payload: &str, id: u64) -> Frame {
        if id == 0 {
            return Frame::text(payload);
        }
        let body = payload.trim_end();
        let Some(open) = body.strip_suffix('}') else {
            return Frame::text(payload);
        };
        let id = format!(",\"_event_id\":{id}}}");
        Frame::encode(OP_TEXT, &[open.as_bytes(), id.as_bytes()])
    }

    /// Bytes that are frames already (the rest of a frame a write sent only in part).
    pub fn framed(bytes: Bytes) -> Frame {
        Frame {
            wire: bytes,
            deflatable: None,
        }
    }

    /// This event's frame, to go compressed to sockets that agreed to it (`None`:
    /// compression is off): per socket when it reaches at most `settings.context_fanout`
    /// sockets of the node (whatever its length: with context even a short one shrinks),
    /// else in a shared form when its payload has at least `settings.min_bytes`.
    pub fn deflatable(mut self, settings: Option<DeflateSettings>, recipients: usize) -> Frame {
        let Some(settings) = settings else {
            return self;
        };
        let alone = self.payload().len() >= settings.min_bytes;
        let route = if recipients <= settings.context_fanout {
            Route::PerSocket
        } else if alone {
            Route::Shared
        } else {
            return self;
        };
        self.deflatable = Some(Arc::new(Deflatable {
            route,
            alone,
            level: settings.level,
            plain: self.wire.clone(),
            wire: Default::default(),
        }));
        self
    }

    /// Whether this frame goes compressed on the socket's own context (the socket agreed
    /// to context, and the frame is a reply or an event that reaches few sockets).
    fn goes_per_socket(&self, agreement: &Agreement) -> bool {
        agreement.server_context
            && self
                .deflatable
                .as_ref()
                .is_some_and(|d| d.route != Route::Shared)
    }

    /// Whether this is a compressed frame (RSV1).
    pub fn is_compressed(&self) -> bool {
        self.wire.first().is_some_and(|first| first & 0x40 != 0)
    }

    /// The frame compressed on a socket's own context: an event on its stream, a reply
    /// on its stream or in a block of literals; itself (plain) when zlib fails.
    fn compressed_on(self, context: &mut SocketContext) -> Frame {
        let payload = self.payload();
        let compressed = match &self.deflatable {
            Some(deflatable) if deflatable.route == Route::Reply => {
                Some(context.compress_reply(payload))
            }
            _ => context.compress(payload),
        };
        match compressed {
            Some(compressed) => {
                deflate::count(Mode::PerSocket, payload.len(), compressed.len());
                Frame::framed(Frame::encode_with(0x80 | 0x40 | OP_TEXT, &[&compressed]))
            }
            None => Frame::framed(self.wire),
        }
    }

    /// The text a shared compressed form carries, which enters its client's window.
    fn shared_text(&self) -> Option<&[u8]> {
        let deflatable = self.deflatable.as_ref()?;
        (self.is_compressed() && deflatable.route != Route::Reply)
            .then(|| payload_of(&deflatable.plain))
    }

    /// The frame as it goes to a socket with this agreement: compressed in the shared form
    /// when it can be and gains by it, else as it is (or left for the socket's own stream).
    fn for_socket(self, agreement: &Agreement) -> Frame {
        let Some(deflatable) = &self.deflatable else {
            return self;
        };
        if self.goes_per_socket(agreement) || !deflatable.alone {
            return self;
        }
        let payload = self.payload();
        let Some(window) = agreement.window_for(payload.len()) else {
            return self;
        };
        let Some(slot) = deflatable.wire.get(usize::from(window).saturating_sub(9)) else {
            return self;
        };
        let compressed = slot.get_or_init(|| {
            deflate::compress(payload, deflatable.level, window)
                .map(|compressed| Frame::encode_with(0x80 | 0x40 | OP_TEXT, &[&compressed]))
        });
        match compressed {
            Some(wire) => {
                let header = self.wire.len() - payload.len();
                deflate::count(
                    Mode::Shared,
                    payload.len(),
                    wire.len().saturating_sub(header),
                );
                Frame {
                    wire: wire.clone(),
                    deflatable: self.deflatable.clone(),
                }
            }
            None => self,
        }
    }

    /// The payload: what follows the header.
    fn payload(&self) -> &[u8] {
        payload_of(&self.wire)
    }

    fn encode(opcode: u8, parts: &[&[u8]]) -> Frame {
        Frame::framed(Frame::encode_with(0x80 | opcode, parts))
    }

    /// A frame's bytes: the first byte (FIN, RSV and opcode), the length, the parts.
    fn encode_with(first: u8, parts: &[&[u8]]) -> Bytes {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut wire = Vec::with_capacity(len + 10);
        wire.push(first);
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
        wire.into()
    }

    /// The frame's bytes on the wire.
    pub fn wire(&self) -> &Bytes {
        &self.wire
    }

    pub fn len(&self) -> usize {
        self.wire.len()
    }

    pub fn is_empty(&self) -> bool {
        self.wire.is_empty()
    }
}

/// A server frame's payload: what follows the header (a server's frames carry no mask).
fn payload_of(wire: &[u8]) -> &[u8] {
    let header = match wire.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => return &[],
    };
    wire.get(header..).unwrap_or_default()
}

impl From<String> for Frame {
    fn from(text: String) -> Frame {
        Frame::text(&text)
    }
}

/// Whom a frame queued in an empty outbox wakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// The writer, now.
    Now,
    /// The writer only when it is busy; an idle one is left to [`Outbox::flush`].
    Busy,
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
    /// permessage-deflate, when the socket agreed to it: event frames go compressed.
    deflate: OnceLock<(Agreement, DeflateSettings)>,
}

/// Event ids a connection kept of what it got live, so that a replay leaves them out.
#[derive(Default)]
enum LiveIds {
    /// History is off: nothing to replay, nothing to keep.
    #[default]
    Off,
    Kept(Vec<u64>),
    /// More than [`LIVE_IDS_KEPT`] arrived: a replay can no longer tell what is new.
    Overflowed,
}

/// Ids a connection keeps of its live events. Baserow's client asks for its replay right
/// after connecting, when it has got a few at most.
const LIVE_IDS_KEPT: usize = 256;

#[derive(Default)]
struct State {
    /// Frames in wire order. A plain vector, not a deque: the writer takes them all at
    /// once, by swapping it with its own emptied batch, so no frame is ever moved twice.
    frames: Vec<Frame>,
    bytes: usize,
    close: Option<CloseReason>,
    writer: Option<Waker>,
    /// Whether the writer is waiting; it keeps its waker here between waits, so a
    /// delivery costs a wake, not a waker clone and drop as well.
    parked: bool,
    /// Whether the writer waits for frames holding none: it has nothing on its way to the
    /// socket, so a frame written by someone else cannot overtake one of its own.
    writer_idle: bool,
    /// The socket, for [`Outbox::flush`]; dropped when the connection ends.
    sink: Option<Arc<dyn Sink>>,
    /// Whether the first queued frame is the rest of one whose beginning a flush wrote: it
    /// goes out whatever else is dropped, or the stream would be garbled.
    first_begun: bool,
    /// A ping waits to go with the next frame queued ([`Outbox::owe_ping`]).
    ping_owed: bool,
    live_ids: LiveIds,
    /// While a replay runs, the event frames that arrive meanwhile (with their ids), to be
    /// sent once the replay is queued.
    held: Option<Vec<(u64, Frame)>>,
    held_bytes: usize,
    /// The highest id a replay sent or its client had: a live event at or below it that
    /// arrives later (its publication reached this node after the history was read, or
    /// the node delivered it late) is one the client has already.
    seen_through: u64,
    /// The socket's own compression (permessage-deflate with context): frames are
    /// compressed on it as they are queued, in the order they go on the wire. Its stream
    /// is made when first needed and dropped when the socket idles ([`Outbox::idle`]).
    own_context: Option<SocketContext>,
}

impl State {
    fn park(&mut self, cx: &Context<'_>) {
        match &self.writer {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => self.writer = Some(cx.waker().clone()),
        }
        self.parked = true;
    }

    /// Wakes a parked writer, keeping its waker. A writer busy with a batch has not
    /// parked: it finds the new frames when it comes back.
    fn wake_parked(&mut self) {
        if std::mem::take(&mut self.parked)
            && let Some(writer) = &self.writer
        {
            writer.wake_by_ref();
        }
    }
}

impl Outbox {
    pub fn new(limit_bytes: usize) -> Self {
        Outbox {
            state: Mutex::default(),
            limit_bytes,
            deflate: OnceLock::new(),
        }
    }

    /// An outbox that keeps the ids of the events it queues, for replays.
    pub fn with_history(limit_bytes: usize) -> Self {
        let outbox = Outbox::new(limit_bytes);
        outbox.lock().live_ids = LiveIds::Kept(Vec::new());
        outbox
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere cannot leave `State` half-updated, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame, or closes the connection as a slow consumer when it would not fit.
    pub fn push(&self, frame: Frame) -> Pushed {
        self.push_event(frame, 0)
    }

    /// A ping is due. It goes with the next frame queued, in the same write, rather than
    /// in a system call of its own (and the pong comes back while the node is busy with
    /// that frame's event); [`Outbox::pay_ping`] sends it alone if no frame came. A writer
    /// with frames on their way takes it with them at once.
    pub fn owe_ping(&self) {
        {
            let mut state = self.lock();
            if state.frames.is_empty() && state.writer_idle && state.close.is_none() {
                state.ping_owed = true;
                return;
            }
        }
        self.push(Frame::ping());
    }

    /// Sends an owed ping that no frame took along.
    pub fn pay_ping(&self) {
        if std::mem::take(&mut self.lock().ping_owed) {
            self.push(Frame::ping());
        }
    }

    /// The socket that [`Outbox::flush`] writes to.
    pub fn attach(&self, sink: Arc<dyn Sink>) {
        self.lock().sink = Some(sink);
    }

    /// The connection is over: the socket is let go, so it closes with its task.
    pub fn detach(&self) {
        self.lock().sink = None;
    }

    /// Compresses event frames from now on, as the socket agreed at its handshake.
    pub fn compress(&self, agreement: Agreement, settings: DeflateSettings) {
        let _ = self.deflate.set((agreement, settings));
    }

    /// The frame in its shared compressed form where that is how it goes to this socket
    /// (made outside the lock: the first socket that needs it compresses it for all).
    fn shared_form(&self, frame: Frame) -> Frame {
        match self.deflate.get() {
            Some((agreement, _)) => frame.for_socket(agreement),
            None => frame,
        }
    }

    /// The frame as it goes on the wire now, after everything queued before it: compressed
    /// on the socket's own context, or, for a frame in the shared form, taken into that
    /// context (the client's window now holds its text).
    fn wire_form(&self, state: &mut State, frame: Frame) -> Frame {
        let Some((agreement, settings)) = self.deflate.get() else {
            return frame;
        };
        if !agreement.server_context {
            return frame;
        }
        let goes_per_socket = frame.goes_per_socket(agreement);
        let shared_text = frame.shared_text();
        if !goes_per_socket && shared_text.is_none() {
            return frame;
        }
        let context = state.own_context.get_or_insert_with(|| {
            let window = settings.window_bits.min(agreement.server_window_bits);
            SocketContext::new(settings.level, window)
        });
        if let Some(text) = shared_text {
            context.inflated_elsewhere(text);
            return frame;
        }
        frame.compressed_on(context)
    }

    /// Whether the socket holds its own deflate stream.
    pub fn holds_stream(&self) -> bool {
        self.deflate.get().is_some()
            && self
                .lock()
                .own_context
                .as_ref()
                .is_some_and(SocketContext::holds_stream)
    }

    /// The socket has been idle: its own deflate stream is dropped (the next event starts
    /// a new one from the window's tail), so an idle socket holds no compressor.
    pub fn idle(&self) {
        let mut state = self.lock();
        if state.frames.is_empty()
            && state.held.is_none()
            && let Some(context) = &mut state.own_context
        {
            context.idle();
        }
    }

    /// Queues an event's frame (`id` 0: one the history does not keep). While a replay
    /// runs, the frame waits until the replay is queued. The queue counts the bytes that
    /// go out: a compressed frame by its compressed size.
    pub fn push_event(&self, frame: Frame, id: u64) -> Pushed {
        self.push_with(frame, id, Wake::Now).0
    }

    /// Queues an event's frame as [`Outbox::push_event`] does, without waking an idle
    /// writer: `true` when the caller must [`Outbox::flush`] (the frames then wait for
    /// it). Fan-out flushes once it has let go of its locks.
    pub fn push_unflushed(&self, frame: Frame, id: u64) -> (Pushed, bool) {
        self.push_with(frame, id, Wake::Busy)
    }

    /// Writes what is queued straight to the socket when the writer is idle, and in as
    /// few system calls as it takes; what the socket does not take at once (it pushes
    /// back, or failed) is left to the writer, woken for it. Only under the lock, so
    /// nothing else writes meanwhile: an idle writer takes frames under it too.
    pub fn flush(&self) {
        let mut guard = self.lock();
        let state = &mut *guard;
        if state.frames.is_empty() {
            return;
        }
        if state.writer_idle
            && let Some(sink) = &state.sink
        {
            let mut written = Written::default();
            let result = write_some(&**sink, &state.frames, &mut written);
            let done: usize = state.frames.drain(..written.frames).map(|f| f.len()).sum();
            state.bytes -= done + written.bytes;
            if let Some(first) = state.frames.first_mut()
                && written.bytes > 0
            {
                *first = Frame::framed(first.wire().slice(written.bytes..));
                state.first_begun = true;
            }
            match result {
                Ok(()) if state.frames.is_empty() => return,
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                // The writer meets the error itself and ends the connection.
                Err(error) => tracing::debug!(%error, "socket write failed in fan-out"),
            }
        }
        state.wake_parked();
    }

    fn push_with(&self, frame: Frame, id: u64, wake: Wake) -> (Pushed, bool) {
        let frame = self.shared_form(frame);
        let mut state = self.lock();
        if state.close.is_some() {
            return (Pushed::Closed, false);
        }
        if id != 0 && id <= state.seen_through {
            return (Pushed::Queued, false);
        }
        // Held frames take their wire form when the replay is released, in wire order.
        let frame = if id != 0 && state.held.is_some() {
            frame
        } else {
            self.wire_form(&mut state, frame)
        };
        if state.bytes + state.held_bytes + frame.len() > self.limit_bytes {
            state.close = Some(CloseReason::SlowConsumer);
            let begun = match std::mem::take(&mut state.first_begun) {
                true => state.frames.drain(..).next(),
                false => None,
            };
            state.bytes = begun.as_ref().map_or(0, Frame::len);
            state.frames = begun.into_iter().collect();
            state.held = None;
            state.held_bytes = 0;
            let writer = state.writer.take();
            drop(state);
            if let Some(writer) = writer {
                writer.wake();
            }
            return (Pushed::Overflowed, false);
        }
        if id != 0 {
            let state = &mut *state;
            if let Some(held) = &mut state.held {
                state.held_bytes += frame.len();
                held.push((id, frame));
                return (Pushed::Queued, false);
            }
            if let LiveIds::Kept(ids) = &mut state.live_ids {
                if ids.len() < LIVE_IDS_KEPT {
                    ids.push(id);
                } else {
                    state.live_ids = LiveIds::Overflowed;
                }
            }
        }
        self.queue(state, frame, wake)
    }

    fn queue(
        &self,
        mut state: std::sync::MutexGuard<'_, State>,
        frame: Frame,
        wake: Wake,
    ) -> (Pushed, bool) {
        let first = state.frames.is_empty();
        state.bytes += frame.len();
        state.frames.push(frame);
        if std::mem::take(&mut state.ping_owed) {
            let ping = Frame::ping();
            state.bytes += ping.len();
            state.frames.push(ping);
        }
        // Only the first frame wakes: a writer with frames queued has not parked for
        // frames since (it may wait on the socket, and the queue's overflow). Waking under
        // the lock is a push onto the scheduler's queue, cheaper than taking the waker out.
        if !first {
            return (Pushed::Queued, false);
        }
        if wake == Wake::Busy && state.writer_idle && state.sink.is_some() {
            return (Pushed::Queued, true);
        }
        state.wake_parked();
        (Pushed::Queued, false)
    }

    /// A replay begins: event frames are held back from now on, until [`Outbox::release`].
    /// `false` when the connection got too many events live to tell them from replayed
    /// ones; nothing is held then.
    pub fn hold(&self) -> bool {
        let mut state = self.lock();
        if !matches!(state.live_ids, LiveIds::Kept(_)) {
            return false;
        }
        state.held.get_or_insert_with(Vec::new);
        true
    }

    /// The replay is ready: queues its events (leaving out each id the socket got live),
    /// then `result`, then the events held meanwhile, in one step so that nothing comes
    /// between. Returns how many replayed events were queued. The replay may take the
    /// queue past its limit: it is bounded by the replay limit, and a client that does not
    /// read it overflows on the next live event. `cursor`: the client has every id at or
    /// below it (0: nothing said), so held events and later live ones with those ids are
    /// left out, as are later live ones the replay sent.
    pub fn release(&self, replayed: Vec<(u64, Frame)>, result: Frame, cursor: u64) -> usize {
        let mut state = self.lock();
        let mut held = state.held.take().unwrap_or_default();
        held.retain(|(id, _)| *id > cursor);
        state.held_bytes = 0;
        if state.close.is_some() {
            return 0;
        }
        let seen = |id: &u64| {
            held.iter().any(|(held, _)| held == id)
                || matches!(&state.live_ids, LiveIds::Kept(ids) if ids.contains(id))
        };
        let fresh: Vec<(u64, Frame)> = replayed.into_iter().filter(|(id, _)| !seen(id)).collect();
        let sent = fresh.len();
        let last = fresh.iter().map(|(id, _)| *id).max().unwrap_or(0);
        state.seen_through = state.seen_through.max(last).max(cursor);
        if let LiveIds::Kept(ids) = &mut state.live_ids {
            ids.extend(fresh.iter().chain(&held).map(|(id, _)| *id));
            if ids.len() > LIVE_IDS_KEPT {
                state.live_ids = LiveIds::Overflowed;
            }
        }
        let was_empty = state.frames.is_empty();
        for frame in fresh
            .into_iter()
            .map(|(_, frame)| self.shared_form(frame))
            .chain([result])
            .chain(held.into_iter().map(|(_, frame)| frame))
        {
            let frame = self.wire_form(&mut state, frame);
            state.bytes += frame.len();
            state.frames.push(frame);
        }
        if was_empty {
            state.wake_parked();
        }
        sent
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
                if batch.is_empty() {
                    std::mem::swap(batch, &mut state.frames);
                } else {
                    batch.append(&mut state.frames);
                }
                state.bytes = 0;
                state.writer_idle = false;
                state.first_begun = false;
                if state.frames.capacity() > 64 {
                    // Give back what a burst grew, so idle connections stay small.
                    state.frames = Vec::new();
                }
                return Poll::Ready(None);
            }
            if let Some(reason) = state.close {
                state.writer_idle = false;
                return Poll::Ready(Some(reason));
            }
            state.park(cx);
            state.writer_idle = true;
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

    fn text_of(frame: &Frame) -> &str {
        std::str::from_utf8(&frame.wire()[2..]).unwrap()
    }

    #[test]
    fn an_event_frame_carries_its_id_last() {
        let frame = Frame::event(r#"{"type":"x","_event_id":1} "#, 42);
        assert_eq!(
            text_of(&frame),
            r#"{"type":"x","_event_id":1,"_event_id":42}"#
        );
        assert_eq!(
            text_of(&Frame::event(r#"{"type":"x"}"#, 0)),
            r#"{"type":"x"}"#
        );
    }

    #[tokio::test]
    async fn a_replay_leaves_out_what_came_live_and_sends_what_came_meanwhile_after() {
        let outbox = Outbox::with_history(10_000);
        let event = |id: u64| Frame::event(r#"{"type":"e"}"#, id);
        outbox.push_event(event(5), 5);
        assert!(outbox.hold());
        outbox.push_event(event(7), 7);
        outbox.push(Frame::text("{\"type\":\"pong\"}"));
        let replayed = [3, 5, 6, 7].map(|id| (id, event(id))).to_vec();
        assert_eq!(outbox.release(replayed, Frame::text("result"), 0), 2);
        let mut batch = Vec::new();
        outbox.next_batch(&mut batch).await;
        let texts: Vec<&str> = batch.iter().map(text_of).collect();
        assert_eq!(
            texts,
            [
                r#"{"type":"e","_event_id":5}"#,
                r#"{"type":"pong"}"#,
                r#"{"type":"e","_event_id":3}"#,
                r#"{"type":"e","_event_id":6}"#,
                "result",
                r#"{"type":"e","_event_id":7}"#,
            ]
        );
        // Event 6 reaches the node late: it was replayed, so it is not sent again.
        outbox.push_event(event(6), 6);
        outbox.push_event(event(8), 8);
        batch.clear();
        outbox.next_batch(&mut batch).await;
        let texts: Vec<&str> = batch.iter().map(text_of).collect();
        assert_eq!(texts, [r#"{"type":"e","_event_id":8}"#]);
    }

    #[tokio::test]
    async fn events_the_client_had_before_its_cursor_are_not_sent_again() {
        let outbox = Outbox::with_history(10_000);
        let event = |id: u64| Frame::event(r#"{"type":"e"}"#, id);
        assert!(outbox.hold());
        // Published before the socket joined, delivered by the node late: the client's
        // cursor (5) says it has them.
        outbox.push_event(event(4), 4);
        outbox.push_event(event(7), 7);
        outbox.release(vec![(6, event(6))], Frame::text("result"), 5);
        outbox.push_event(event(5), 5);
        outbox.push_event(event(8), 8);
        let mut batch = Vec::new();
        outbox.next_batch(&mut batch).await;
        let texts: Vec<&str> = batch.iter().map(text_of).collect();
        assert_eq!(
            texts,
            [
                r#"{"type":"e","_event_id":6}"#,
                "result",
                r#"{"type":"e","_event_id":7}"#,
                r#"{"type":"e","_event_id":8}"#,
            ]
        );
    }

    #[test]
    fn a_connection_that_got_too_much_live_cannot_replay() {
        let outbox = Outbox::with_history(1 << 20);
        for id in 1..=LIVE_IDS_KEPT as u64 + 1 {
            outbox.push_event(Frame::event(r#"{"type":"e"}"#, id), id);
        }
        assert!(!outbox.hold());
        assert!(!Outbox::new(100).hold());
    }

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

    const SETTINGS: DeflateSettings = DeflateSettings {
        context_fanout: 8,
        window_bits: 11,
        min_bytes: 64,
        level: 6,
    };

    fn compressing(limit_bytes: usize, server_context: bool) -> Outbox {
        let outbox = Outbox::new(limit_bytes);
        outbox.compress(
            Agreement {
                server_window_bits: 15,
                server_context,
            },
            SETTINGS,
        );
        outbox
    }

    fn big_event(n: usize, recipients: usize) -> Frame {
        let payload = format!(r#"{{"type":"rows","n":{n},"text":"{}"}}"#, "x".repeat(5000));
        Frame::event(&payload, 0).deflatable(Some(SETTINGS), recipients)
    }

    /// About 1.3 KB that deflate shrinks little on its own, the same for every `n` but
    /// `n`: with context, an event after another is a few bytes.
    fn row_event(n: usize, recipients: usize) -> Frame {
        let text: String = (0..400u64)
            .map(|i| format!("{:x}", i.wrapping_mul(2654435761) >> 20 & 0xfff))
            .collect();
        let payload = format!(r#"{{"type":"rows","n":{n},"text":"{text}"}}"#);
        Frame::event(&payload, 0).deflatable(Some(SETTINGS), recipients)
    }

    #[test]
    fn the_queue_counts_the_bytes_that_go_out_compressed() {
        // Twenty 5 KB events where 10 KB fit: compressed, per socket or shared, they do.
        for (server_context, recipients) in [(true, 1), (false, 1), (true, 100)] {
            let outbox = compressing(10_000, server_context);
            for n in 0..20 {
                assert_eq!(outbox.push(big_event(n, recipients)), Pushed::Queued);
            }
            assert!(outbox.lock().bytes < 10_000);
        }
        // Plain, the second no longer fits.
        let plain = Outbox::new(10_000);
        assert_eq!(plain.push(big_event(0, 1)), Pushed::Queued);
        assert_eq!(plain.push(big_event(1, 1)), Pushed::Overflowed);
    }

    /// What a client that keeps its inflater across messages reads from these frames.
    fn inflated(frames: &[Frame]) -> Vec<String> {
        let mut inflater = flate2::Decompress::new(false);
        frames
            .iter()
            .map(|frame| {
                if !frame.is_compressed() {
                    return String::from_utf8_lossy(frame.payload()).into_owned();
                }
                let input = [frame.payload(), &[0, 0, 0xff, 0xff][..]].concat();
                let mut out = Vec::with_capacity(64 * 1024);
                inflater
                    .decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)
                    .expect("inflates");
                String::from_utf8(out).expect("text")
            })
            .collect()
    }

    #[test]
    fn a_socket_keeps_its_context_across_replies_shared_frames_and_idling() {
        let outbox = compressing(1 << 20, true);
        let reply = r#"{"type":"page_add","page":"table","parameters":{"table_id":1}}"#;
        outbox.push(Frame::reply(reply));
        assert!(!outbox.holds_stream(), "a reply makes no stream");
        outbox.push(row_event(0, 1));
        assert!(outbox.holds_stream());
        // A shared frame between two of the socket's own: the client's window holds it,
        // and so does the stream.
        outbox.push(row_event(1, 100));
        outbox.push(row_event(2, 1));
        let frames: Vec<Frame> = outbox.lock().frames.drain(..).collect();
        assert!(frames.iter().all(Frame::is_compressed));
        assert_eq!(
            frames[0].payload().len(),
            reply.len() + 2,
            "a block of literals"
        );
        assert!(
            frames[3].len() * 4 < frames[2].len(),
            "the third event refers back to the shared one: {} {}",
            frames[3].len(),
            frames[2].len()
        );
        let idle_before = frames.clone();
        outbox.idle();
        assert!(!outbox.holds_stream());
        // After idling, a new stream starts from the tail of the client's window.
        outbox.push(row_event(3, 1));
        outbox.push(Frame::reply(reply));
        let after: Vec<Frame> = outbox.lock().frames.drain(..).collect();
        let all: Vec<Frame> = idle_before.into_iter().chain(after).collect();
        let texts = inflated(&all);
        assert_eq!(texts[0], reply);
        for (text, n) in texts[1..5].iter().zip(0..) {
            assert_eq!(text.as_bytes(), row_event(n, 1).payload());
        }
        assert_eq!(texts[5], reply);
        assert!(all[5].payload().len() < reply.len(), "on the stream");
    }

    #[test]
    fn a_stream_waits_for_the_queue_before_it_goes() {
        let outbox = compressing(1 << 20, true);
        outbox.push(big_event(0, 1));
        outbox.idle();
        assert!(outbox.holds_stream(), "frames still wait: kept");
        outbox.lock().frames.clear();
        outbox.idle();
        assert!(!outbox.holds_stream());
    }

    #[test]
    fn without_context_replies_go_plain_and_short_events_plain_or_per_socket() {
        let outbox = compressing(1 << 20, false);
        outbox.push(Frame::reply(r#"{"type":"pong"}"#));
        outbox.push(Frame::event(r#"{"type":"x"}"#, 0).deflatable(Some(SETTINGS), 100));
        assert!(outbox.lock().frames.iter().all(|f| !f.is_compressed()));
        let context = compressing(1 << 20, true);
        context.push(Frame::event(r#"{"type":"x"}"#, 0).deflatable(Some(SETTINGS), 1));
        context.push(Frame::event(r#"{"type":"x"}"#, 0).deflatable(Some(SETTINGS), 100));
        let frames: Vec<Frame> = context.lock().frames.drain(..).collect();
        assert!(frames[0].is_compressed(), "few sockets: with context");
        assert!(!frames[1].is_compressed(), "many, and short: plain");
        assert_eq!(inflated(&frames), [r#"{"type":"x"}"#; 2]);
    }

    /// Counts wake-ups, to tell whether a writer was woken.
    #[derive(Default)]
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// An outbox on a real socket, and the socket's other end.
    async fn on_a_socket(limit_bytes: usize) -> (Outbox, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (ours, theirs) = tokio::join!(ours, listener.accept());
        let outbox = Outbox::new(limit_bytes);
        outbox.attach(Arc::new(ours.unwrap()));
        (outbox, theirs.unwrap().0)
    }

    /// Reads until `n` bytes came.
    async fn read_bytes(peer: &mut tokio::net::TcpStream, n: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut got = vec![0; n];
        peer.read_exact(&mut got).await.unwrap();
        got
    }

    /// Runs `meanwhile` while the writer waits idle for frames; then, if it was given any,
    /// lets the writer take its batch. Returns what `meanwhile` returned and how often the
    /// writer was woken meanwhile.
    async fn while_idle<R>(
        outbox: &Outbox,
        batch: &mut Vec<Frame>,
        meanwhile: impl FnOnce() -> R,
    ) -> (R, usize) {
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        let mut writer = std::pin::pin!(outbox.next_batch(batch));
        let idle = writer.as_mut().poll(&mut Context::from_waker(&waker));
        assert!(idle.is_pending());
        let result = meanwhile();
        let woken = wakes.0.load(std::sync::atomic::Ordering::SeqCst);
        if !outbox.lock().frames.is_empty() {
            assert_eq!(writer.await, None);
        }
        (result, woken)
    }

    #[tokio::test]
    async fn fan_out_writes_for_an_idle_writer_without_waking_it() {
        let (outbox, mut peer) = on_a_socket(1 << 20).await;
        let mut batch = Vec::new();
        let (_, woken) = while_idle(&outbox, &mut batch, || {
            let (pushed, flush) = outbox.push_unflushed(frame(1), 7);
            assert_eq!((pushed, flush), (Pushed::Queued, true));
            // Queued behind it before the flush: goes in the same write, after it.
            assert_eq!(outbox.push(Frame::ping()), Pushed::Queued);
            outbox.flush();
        })
        .await;
        let expected = [frame(1).wire().to_vec(), Frame::ping().wire().to_vec()].concat();
        assert_eq!(read_bytes(&mut peer, expected.len()).await, expected);
        assert_eq!(woken, 0);
        assert!(batch.is_empty() && outbox.lock().frames.is_empty());
        assert_eq!(outbox.lock().bytes, 0);
    }

    #[tokio::test]
    async fn what_a_socket_does_not_take_is_left_to_the_writer_whole() {
        let (outbox, mut peer) = on_a_socket(64 << 20).await;
        // More than the socket's buffers hold while the peer reads nothing.
        let big = Frame::text(&"x".repeat(16 << 20));
        let expected = [big.wire().to_vec(), frame(2).wire().to_vec()].concat();
        let mut batch = Vec::new();
        let (written, woken) = while_idle(&outbox, &mut batch, || {
            assert!(outbox.push_unflushed(big.clone(), 1).1);
            outbox.push_unflushed(frame(2), 2);
            outbox.flush();
            expected.len() - outbox.lock().bytes
        })
        .await;
        assert_eq!(woken, 1);
        assert!(
            written > 0 && written < big.len(),
            "{written} bytes at once"
        );
        // The writer's batch starts where the socket stopped.
        let rest: Vec<u8> = batch.iter().flat_map(|f| f.wire().to_vec()).collect();
        assert_eq!(rest, expected[written..]);
        assert_eq!(read_bytes(&mut peer, written).await, expected[..written]);
    }

    #[tokio::test]
    async fn an_overflow_keeps_the_rest_of_a_frame_begun_on_the_wire() {
        let (outbox, mut peer) = on_a_socket(20 << 20).await;
        let big = Frame::text(&"x".repeat(16 << 20));
        let mut batch = Vec::new();
        let (written, _) = while_idle(&outbox, &mut batch, || {
            outbox.push_unflushed(big.clone(), 1);
            outbox.push_unflushed(frame(2), 2);
            outbox.flush();
            let written = big.len() + frame(2).len() - outbox.lock().bytes;
            // The peer still reads nothing: the next big frame does not fit.
            assert_eq!(outbox.push_event(big.clone(), 3), Pushed::Overflowed);
            written
        })
        .await;
        // Frame 2 and frame 3 are dropped; the rest of frame 1 is not.
        let rest: Vec<u8> = batch.iter().flat_map(|f| f.wire().to_vec()).collect();
        assert_eq!(rest, big.wire()[written..]);
        assert_eq!(read_bytes(&mut peer, written).await, big.wire()[..written]);
    }

    #[tokio::test]
    async fn nothing_is_written_while_the_writer_holds_a_batch() {
        let (outbox, peer) = on_a_socket(1 << 20).await;
        outbox.push(frame(1));
        let mut batch = Vec::new();
        assert_eq!(outbox.next_batch(&mut batch).await, None);
        // The writer has frame 1 in hand, not yet written: frame 2 must wait for it.
        assert_eq!(outbox.push_unflushed(frame(2), 2), (Pushed::Queued, false));
        outbox.flush();
        let mut byte = [0u8; 1];
        assert!(
            matches!(peer.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        );
        assert_eq!(outbox.lock().frames.len(), 1);
    }

    #[tokio::test]
    async fn a_due_ping_goes_out_with_the_next_event_in_its_write() {
        let (outbox, mut peer) = on_a_socket(1 << 20).await;
        let mut batch = Vec::new();
        let (_, woken) = while_idle(&outbox, &mut batch, || {
            outbox.owe_ping();
            // Nothing goes on its own: the ping waits for a frame to ride with.
            let mut byte = [0u8; 1];
            assert!(
                matches!(peer.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            );
            assert_eq!(outbox.push_unflushed(frame(1), 1), (Pushed::Queued, true));
            outbox.flush();
            // Paid already: nothing more to send.
            outbox.pay_ping();
        })
        .await;
        assert_eq!(woken, 0);
        let expected = [frame(1).wire().to_vec(), Frame::ping().wire().to_vec()].concat();
        assert_eq!(read_bytes(&mut peer, expected.len()).await, expected);
        assert!(batch.is_empty() && outbox.lock().frames.is_empty());
        assert_eq!(outbox.lock().bytes, 0);
    }

    #[tokio::test]
    async fn a_due_ping_no_event_took_along_is_sent_alone() {
        let (outbox, _peer) = on_a_socket(1 << 20).await;
        let mut batch = Vec::new();
        let (_, woken) = while_idle(&outbox, &mut batch, || {
            outbox.owe_ping();
            outbox.pay_ping();
        })
        .await;
        // The writer was woken for it and took it.
        assert_eq!(woken, 1);
        assert_eq!(batch, vec![Frame::ping()]);
    }

    #[tokio::test]
    async fn a_ping_due_while_frames_wait_goes_with_them_at_once() {
        let outbox = Outbox::new(1 << 20);
        outbox.push(frame(1));
        outbox.owe_ping();
        let mut batch = Vec::new();
        assert_eq!(outbox.next_batch(&mut batch).await, None);
        assert_eq!(batch, vec![frame(1), Frame::ping()]);
        // Nothing left owed.
        outbox.pay_ping();
        assert!(outbox.lock().frames.is_empty());
    }
}
