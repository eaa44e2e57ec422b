//! The WebSocket frame decoder (`transport::frames::Decoder`) on any bytes, and on client
//! frames built from parts (opcode, flags, mask, length encoding, payload, and now and
//! then a broken rule), fed whole and split into reads at arbitrary points. What a socket
//! makes of the bytes must not depend on how reads split them, no message may pass the
//! limit, and well-formed frames must decode to the messages RFC 6455 says.

#![no_main]

use arbitrary::Arbitrary;
use channelgate::protocol::CloseReason;
use channelgate::transport::frames::{Decoder, Message};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    limit: Limit,
    wire: Wire,
    /// Where reads end, as offsets into the bytes.
    splits: Vec<u16>,
}

#[derive(Debug, Arbitrary)]
enum Limit {
    Small(u8),
    Any(u16),
}

#[derive(Debug, Arbitrary)]
enum Wire {
    Raw(Vec<u8>),
    Frames(Vec<FrameIn>),
}

#[derive(Debug, Arbitrary)]
struct FrameIn {
    op: Op,
    fin: bool,
    mask: [u8; 4],
    length: Length,
    payload: Payload,
    broken: Option<Broken>,
}

#[derive(Debug, Clone, Copy, PartialEq, Arbitrary)]
enum Op {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

/// How the payload length is written: RFC 6455 wants the shortest, the decoder takes any.
#[derive(Debug, Arbitrary)]
enum Length {
    Shortest,
    Sixteen,
    SixtyFour,
}

#[derive(Debug, Arbitrary)]
enum Payload {
    Bytes(Vec<u8>),
    Text(String),
    Filled { len: u32, byte: u8 },
}

/// A rule the frame breaks.
#[derive(Debug, Arbitrary)]
enum Broken {
    /// RSV bits (made non-zero).
    Reserved(u8),
    Unmasked,
    /// A reserved opcode (3-7 or 11-15).
    Opcode(u8),
    /// A declared length that is not the payload's.
    Length(u64),
}

impl Op {
    fn code(self) -> u8 {
        match self {
            Op::Continuation => 0x0,
            Op::Text => 0x1,
            Op::Binary => 0x2,
            Op::Close => 0x8,
            Op::Ping => 0x9,
            Op::Pong => 0xA,
        }
    }

    fn is_control(self) -> bool {
        matches!(self, Op::Close | Op::Ping | Op::Pong)
    }
}

impl Payload {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Payload::Bytes(bytes) => bytes.clone(),
            Payload::Text(text) => text.as_bytes().to_vec(),
            // Up to a little past 64 KiB: past the 16-bit length and the largest limit.
            Payload::Filled { len, byte } => vec![*byte; (*len % 70_000) as usize],
        }
    }
}

impl FrameIn {
    fn wire(&self) -> Vec<u8> {
        let payload = self.payload.bytes();
        let mut first = self.op.code() | if self.fin { 0x80 } else { 0 };
        let mut masked = true;
        let mut len = payload.len() as u64;
        match self.broken {
            None => {}
            Some(Broken::Reserved(bits)) => first |= (bits & 0x70).max(0x10),
            Some(Broken::Unmasked) => masked = false,
            Some(Broken::Opcode(op)) => {
                let reserved = [3, 4, 5, 6, 7, 11, 12, 13, 14, 15];
                first = (first & 0xf0) | reserved[usize::from(op) % reserved.len()];
            }
            Some(Broken::Length(lie)) => len = lie,
        }
        let mut out = vec![first];
        let mask_bit = if masked { 0x80 } else { 0 };
        match self.length {
            Length::Shortest if len < 126 => out.push(mask_bit | len as u8),
            Length::Shortest | Length::Sixteen if len <= 0xffff => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&len.to_be_bytes());
            }
        }
        if masked {
            out.extend_from_slice(&self.mask);
            out.extend(
                payload
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ self.mask[i % 4]),
            );
        } else {
            out.extend_from_slice(&payload);
        }
        out
    }
}

/// What a socket makes of a byte stream: the messages it handles, and how it ends. The
/// reader (`transport::ws`) stops at the first close message, and otherwise at the first
/// broken rule, after handling the messages before it.
#[derive(Debug, PartialEq)]
enum End {
    Open,
    Closed,
    Broken(CloseReason),
}

fn outcome<'a>(limit: usize, reads: impl IntoIterator<Item = &'a [u8]>) -> (Vec<Message>, End) {
    let mut decoder = Decoder::new(limit);
    let mut messages = Vec::new();
    for read in reads {
        let verdict = decoder.feed(read, &mut messages);
        if let Some(close) = messages.iter().position(|m| *m == Message::Close) {
            messages.truncate(close + 1);
            return (messages, End::Closed);
        }
        if let Err(reason) = verdict {
            return (messages, End::Broken(reason));
        }
    }
    (messages, End::Open)
}

/// The messages RFC 6455 (and the gateway's limit) make of well-formed frames, and how the
/// stream ends; `None` once a frame's declared length is a lie, which reframes the rest.
fn expected(frames: &[FrameIn], limit: usize) -> Option<(Vec<Message>, End)> {
    let mut messages = Vec::new();
    let mut fragments: Option<(bool, Vec<u8>)> = None;
    for frame in frames {
        let broken =
            |messages: Vec<Message>| Some((messages, End::Broken(CloseReason::ProtocolError)));
        match frame.broken {
            None => {}
            Some(Broken::Length(_)) => return None,
            Some(_) => return broken(messages),
        }
        let payload = frame.payload.bytes();
        if frame.op.is_control() {
            if !frame.fin || payload.len() > 125 {
                return broken(messages);
            }
            match frame.op {
                Op::Close => {
                    messages.push(Message::Close);
                    return Some((messages, End::Closed));
                }
                Op::Ping => messages.push(Message::Ping(payload)),
                _ => messages.push(Message::Pong),
            }
            continue;
        }
        let so_far = fragments.as_ref().map_or(0, |(_, bytes)| bytes.len());
        if payload.len() + so_far > limit {
            return Some((messages, End::Broken(CloseReason::MessageTooBig)));
        }
        let (text, mut bytes) = match (frame.op, fragments.take()) {
            (Op::Continuation, Some(started)) => started,
            (Op::Continuation, None) | (_, Some(_)) => return broken(messages),
            (op, None) => (op == Op::Text, Vec::new()),
        };
        bytes.extend_from_slice(&payload);
        if !frame.fin {
            fragments = Some((text, bytes));
        } else if !text {
            messages.push(Message::Binary);
        } else {
            match String::from_utf8(bytes) {
                Ok(text) => messages.push(Message::Text(text)),
                Err(_) => return Some((messages, End::Broken(CloseReason::InvalidUtf8))),
            }
        }
    }
    Some((messages, End::Open))
}

fuzz_target!(|input: Input| {
    let limit = match input.limit {
        Limit::Small(limit) => usize::from(limit),
        Limit::Any(limit) => usize::from(limit),
    };
    let bytes = match &input.wire {
        Wire::Raw(bytes) => bytes.clone(),
        Wire::Frames(frames) => frames.iter().flat_map(FrameIn::wire).collect(),
    };

    let whole = outcome(limit, [bytes.as_slice()]);
    for message in &whole.0 {
        match message {
            Message::Text(text) => assert!(text.len() <= limit, "a text of {} bytes", text.len()),
            Message::Ping(payload) => assert!(payload.len() <= 125),
            _ => {}
        }
    }
    if let Wire::Frames(frames) = &input.wire
        && let Some(expected) = expected(frames, limit)
    {
        assert_eq!(whole, expected, "{frames:?}");
    }

    // The same bytes in reads that end at the given offsets, and one byte a read.
    let mut cuts: Vec<usize> = input
        .splits
        .iter()
        .map(|at| usize::from(*at).min(bytes.len()))
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut reads = Vec::new();
    let mut start = 0;
    for cut in cuts.into_iter().chain([bytes.len()]) {
        reads.push(&bytes[start..cut]);
        start = cut;
    }
    assert_eq!(outcome(limit, reads), whole, "split reads");
    if bytes.len() <= 1024 {
        assert_eq!(outcome(limit, bytes.chunks(1)), whole, "one byte a read");
    }
});
