//! Client frames off the wire (RFC 6455, the server's side), decoded from whatever bytes a
//! read brought.
//!
//! Pure: the socket's reader feeds bytes in and gets whole messages out. An idle socket
//! holds no buffer at all: bytes are kept only for a frame that arrived in parts, or a
//! message sent in fragments. Client frames must be masked; control frames are short and
//! never fragmented; a text message must be UTF-8 and no message may exceed the limit.

use crate::protocol::CloseReason;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// The largest payload of a control frame.
const MAX_CONTROL_PAYLOAD: usize = 125;

/// A whole message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Text(String),
    /// The protocol is JSON text; a binary message is refused, its bytes unread.
    Binary,
    /// To be answered with a pong carrying the same payload.
    Ping(Vec<u8>),
    Pong,
    Close,
}

/// A fragmented message being put together.
#[derive(Debug)]
struct Fragments {
    text: bool,
    /// Sent compressed (permessage-deflate: RSV1 on its first frame).
    compressed: bool,
    payload: Vec<u8>,
}

/// Turns the bytes a client sends into [`Message`] messages.
#[derive(Debug)]
pub struct Decoder {
    max_message: usize,
    /// Whether the client may send compressed messages (permessage-deflate was agreed).
    inflate: bool,
    /// The start of a frame whose rest has not arrived yet.
    partial: Vec<u8>,
    message: Option<Fragments>,
    /// A close came: nothing after it counts, in this read or the next.
    closed: bool,
}

/// A frame's header, once enough bytes are there to read it.
struct Header {
    fin: bool,
    opcode: u8,
    compressed: bool,
    mask: [u8; 4],
    /// Header bytes, mask included.
    len: usize,
    payload: usize,
}

impl Decoder {
    pub fn new(max_message: usize) -> Decoder {
        Decoder {
            max_message,
            inflate: false,
            partial: Vec::new(),
            message: None,
            closed: false,
        }
    }

    /// A decoder that takes compressed messages too (permessage-deflate was agreed): each
    /// is inflated, and its inflated size is held to the message limit.
    pub fn inflating(mut self) -> Decoder {
        self.inflate = true;
        self
    }

    /// Decodes `bytes` (what one read brought) into messages, appended to `out`. A broken
    /// rule ends the connection with its close reason; the messages before it stand.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Message>) -> Result<(), CloseReason> {
        if self.closed {
            return Ok(());
        }
        if self.partial.is_empty() {
            let used = self.decode(bytes, out)?;
            self.partial.extend_from_slice(&bytes[used..]);
        } else {
            let mut buffer = std::mem::take(&mut self.partial);
            buffer.extend_from_slice(bytes);
            let used = self.decode(&buffer, out)?;
            buffer.drain(..used);
            self.partial = buffer;
        }
        if self.partial.is_empty() && self.partial.capacity() > 0 {
            // Give the memory back: an idle socket holds nothing.
            self.partial = Vec::new();
        }
        Ok(())
    }

    /// Decodes the whole frames at the start of `buf`; returns the bytes used.
    fn decode(&mut self, buf: &[u8], out: &mut Vec<Message>) -> Result<usize, CloseReason> {
        let mut used = 0;
        while let Some(header) = self.header(&buf[used..])? {
            let end = used + header.len + header.payload;
            if buf.len() < end {
                break;
            }
            let mut payload = buf[used + header.len..end].to_vec();
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= header.mask[i % 4];
            }
            used = end;
            if let Some(message) = self.frame(&header, payload)? {
                let close = message == Message::Close;
                out.push(message);
                if close {
                    self.closed = true;
                    self.message = None;
                    return Ok(buf.len());
                }
            }
        }
        Ok(used)
    }

    /// Reads a header at the start of `buf`; `None` until all of it is there.
    fn header(&self, buf: &[u8]) -> Result<Option<Header>, CloseReason> {
        let [first, second, ..] = *buf else {
            return Ok(None);
        };
        let (fin, opcode, compressed) = (first & 0x80 != 0, first & 0x0f, first & 0x40 != 0);
        // RSV1 marks a compressed message, on its first frame only, once agreed; the
        // other RSV bits belong to no extension.
        let first_of_message = matches!(opcode, OP_TEXT | OP_BINARY);
        if first & 0x30 != 0 || (compressed && !(self.inflate && first_of_message)) {
            return Err(CloseReason::ProtocolError);
        }
        if second & 0x80 == 0 {
            // Every frame from a client is masked.
            return Err(CloseReason::ProtocolError);
        }
        let (payload, mut len) = match second & 0x7f {
            126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4),
            127 if buf.len() >= 10 => {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(&buf[2..10]);
                (u64::from_be_bytes(bytes), 10)
            }
            126 | 127 => return Ok(None),
            short => (u64::from(short), 2),
        };
        match opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !fin || payload > MAX_CONTROL_PAYLOAD as u64 {
                    return Err(CloseReason::ProtocolError);
                }
            }
            OP_CONTINUATION | OP_TEXT | OP_BINARY => {
                let so_far = self.message.as_ref().map_or(0, |m| m.payload.len()) as u64;
                if payload.saturating_add(so_far) > self.max_message as u64 {
                    return Err(CloseReason::MessageTooBig);
                }
            }
            _ => return Err(CloseReason::ProtocolError),
        }
        if buf.len() < len + 4 {
            return Ok(None);
        }
        let mask = [buf[len], buf[len + 1], buf[len + 2], buf[len + 3]];
        len += 4;
        Ok(Some(Header {
            fin,
            opcode,
            compressed,
            mask,
            len,
            // Below the message limit, so it fits.
            payload: payload as usize,
        }))
    }

    /// One whole frame: a message, a part of one, or a broken rule.
    fn frame(&mut self, header: &Header, payload: Vec<u8>) -> Result<Option<Message>, CloseReason> {
        let (fin, opcode) = (header.fin, header.opcode);
        let (text, compressed, payload) = match (opcode, self.message.take()) {
            (OP_PING, message) => {
                self.message = message;
                return Ok(Some(Message::Ping(payload)));
            }
            (OP_PONG, message) => {
                self.message = message;
                return Ok(Some(Message::Pong));
            }
            (OP_CLOSE, _) => return Ok(Some(Message::Close)),
            (OP_CONTINUATION, Some(mut message)) => {
                message.payload.extend_from_slice(&payload);
                (message.text, message.compressed, message.payload)
            }
            // A part of no message, or a new message inside a fragmented one.
            (OP_CONTINUATION, None) | (_, Some(_)) => return Err(CloseReason::ProtocolError),
            (_, None) => (opcode == OP_TEXT, header.compressed, payload),
        };
        if !fin {
            self.message = Some(Fragments {
                text,
                compressed,
                payload,
            });
            return Ok(None);
        }
        if !text {
            return Ok(Some(Message::Binary));
        }
        let payload = if compressed {
            crate::deflate::inflate(&payload, self.max_message)?
        } else {
            payload
        };
        String::from_utf8(payload)
            .map(|text| Some(Message::Text(text)))
            .map_err(|_| CloseReason::InvalidUtf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: masked with a fixed key.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn decode(decoder: &mut Decoder, bytes: &[u8]) -> Result<Vec<Message>, CloseReason> {
        let mut out = Vec::new();
        decoder.feed(bytes, &mut out).map(|()| out)
    }

    fn text(s: &str) -> Message {
        Message::Text(s.into())
    }

    #[test]
    fn whole_frames_split_anywhere_and_several_per_read() {
        let long = "x".repeat(300);
        let mut wire = frame(0x81, b"{\"type\":\"ping\"}");
        wire.extend(frame(0x89, b"hi"));
        wire.extend(frame(0x81, long.as_bytes()));
        wire.extend(frame(0x8A, b""));
        let expected = vec![
            text("{\"type\":\"ping\"}"),
            Message::Ping(b"hi".to_vec()),
            text(&long),
            Message::Pong,
        ];
        for split in 0..wire.len() {
            let mut decoder = Decoder::new(1024);
            let mut got = decode(&mut decoder, &wire[..split]).unwrap();
            got.extend(decode(&mut decoder, &wire[split..]).unwrap());
            assert_eq!(got, expected, "split at {split}");
            assert_eq!(decoder.partial.capacity(), 0, "nothing kept once whole");
        }
    }

    #[test]
    fn fragments_make_one_message_with_control_frames_between() {
        let mut decoder = Decoder::new(1024);
        let mut wire = frame(0x01, b"{\"a\":");
        wire.extend(frame(0x89, b"p"));
        wire.extend(frame(0x00, b"1"));
        wire.extend(frame(0x80, b"}"));
        assert_eq!(
            decode(&mut decoder, &wire).unwrap(),
            vec![Message::Ping(b"p".to_vec()), text("{\"a\":1}")]
        );
        let mut binary = frame(0x02, b"ab");
        binary.extend(frame(0x80, b"c"));
        assert_eq!(
            decode(&mut decoder, &binary).unwrap(),
            vec![Message::Binary]
        );
    }

    #[test]
    fn broken_rules_close_with_their_codes() {
        let mut unmasked = frame(0x81, b"hi");
        unmasked[1] &= 0x7f;
        let mut oversized_ping = vec![0x89, 0x80 | 126, 0, 200];
        oversized_ping.extend([0; 4 + 200]);
        let cases = [
            (frame(0xC1, b"hi"), CloseReason::ProtocolError), // RSV1
            (unmasked, CloseReason::ProtocolError),
            (frame(0x83, b""), CloseReason::ProtocolError), // reserved opcode
            (frame(0x09, b""), CloseReason::ProtocolError), // fragmented ping
            (oversized_ping, CloseReason::ProtocolError),
            (frame(0x80, b"x"), CloseReason::ProtocolError), // continuation of nothing
            (
                [frame(0x01, b"a"), frame(0x81, b"b")].concat(),
                CloseReason::ProtocolError,
            ),
            (frame(0x81, &[b'{', 0xff, b'}']), CloseReason::InvalidUtf8),
            (frame(0x81, &[b'x'; 65]), CloseReason::MessageTooBig),
            (
                [frame(0x01, &[b'x'; 40]), frame(0x80, &[b'x'; 40])].concat(),
                CloseReason::MessageTooBig,
            ),
        ];
        for (wire, reason) in cases {
            let mut decoder = Decoder::new(64);
            assert_eq!(decode(&mut decoder, &wire), Err(reason), "{wire:02x?}");
        }
    }

    #[test]
    fn a_huge_declared_length_is_refused_before_its_bytes_arrive() {
        let mut decoder = Decoder::new(1 << 16);
        let header = [0x81, 0x80 | 127, 0, 0, 0, 1, 0, 0, 0, 0];
        assert_eq!(
            decode(&mut decoder, &header),
            Err(CloseReason::MessageTooBig)
        );
    }

    #[test]
    fn nothing_after_a_close_is_read() {
        let mut decoder = Decoder::new(64);
        let wire = [frame(0x88, &[0x03, 0xe8]), frame(0x81, b"late")].concat();
        assert_eq!(decode(&mut decoder, &wire).unwrap(), vec![Message::Close]);
        // Nor in a later read.
        let mut decoder = Decoder::new(64);
        assert_eq!(
            decode(&mut decoder, &wire[..8]).unwrap(),
            vec![Message::Close]
        );
        assert_eq!(decode(&mut decoder, &wire[8..]).unwrap(), vec![]);
    }
}
