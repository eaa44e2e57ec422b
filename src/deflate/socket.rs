//! A socket's own compression (permessage-deflate with context takeover).
//!
//! The client keeps one inflater for the whole connection, so its window holds the text of
//! every compressed message it got, whoever compressed it: the socket's own stream, the
//! shared form of a busy event, or a reply in a block of literals. This side mirrors that
//! window: its stream while the socket is busy, and always the last [`WINDOW_TAIL_BYTES`]
//! of it, so that a stream made later (the first event, or one after the socket idled)
//! starts from what the client holds rather than from nothing.

use super::TAIL;

/// How much of the client's window a socket keeps while it holds no stream: enough for a
/// session's replies (authentication, `page_add`) and most of a row update, little next to
/// an idle socket's other memory.
pub const WINDOW_TAIL_BYTES: usize = 1024;

/// A socket's compression state: the stream (while in use) and the tail of the client's
/// window.
pub struct SocketContext {
    level: u32,
    window_bits: u8,
    stream: Option<zlib_rs::Deflate>,
    tail: Vec<u8>,
}

/// zlib's memLevel for a socket's stream: its buffer of pending symbols holds 2^(4+6) of
/// them, enough for a row update in one block. With less, each block repeats its Huffman
/// tables (memLevel 1 sent 0.4 % more bytes on the bench's session once, summed offline
/// with zlib-rs); zlib's default (8) sends the same bytes for 44 KiB more RSS a busy
/// socket (320 against 276 KiB in the bench's memory part).
/// zlib-rs keeps a 128 KiB hash table whatever this is.
const MEM_LEVEL: i32 = 4;

impl SocketContext {
    /// Compression at zlib `level` (1 to 9) with a window of `window_bits` (9 to 15); no
    /// stream until one is needed.
    pub fn new(level: u32, window_bits: u8) -> SocketContext {
        SocketContext {
            level: level.clamp(1, 9),
            window_bits: window_bits.clamp(9, 15),
            stream: None,
            tail: Vec::new(),
        }
    }

    /// An event's payload compressed on the socket's stream, made (from the window's tail)
    /// when the socket holds none. A payload deflate cannot shrink still goes compressed,
    /// a few bytes longer (a stored block), so that the stream keeps its context. `None`
    /// only when zlib fails: the payload then goes plain and the stream is dropped.
    pub fn compress(&mut self, payload: &[u8]) -> Option<Vec<u8>> {
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => self.stream.insert(self.new_stream()?),
        };
        match deflate_message(stream, payload) {
            Some(compressed) => {
                self.remember(payload);
                Some(compressed)
            }
            None => {
                self.stream = None;
                None
            }
        }
    }

    /// A reply (a frame the node makes for this socket alone): on the stream when the
    /// socket holds one; else in a block of literals, two bytes longer than the payload
    /// and made without a compressor, so that a reply never costs a stream, yet enters the
    /// client's window for the stream that comes after it.
    pub fn compress_reply(&mut self, payload: &[u8]) -> Vec<u8> {
        if self.stream.is_some()
            && let Some(compressed) = self.compress(payload)
        {
            return compressed;
        }
        self.remember(payload);
        literal_block(payload)
    }

    /// A message the client inflated without this socket's stream (an event's shared
    /// form): its text is in the client's window now, so the stream takes it in as well.
    pub fn inflated_elsewhere(&mut self, payload: &[u8]) {
        self.remember(payload);
        if let Some(stream) = &mut self.stream
            && stream.set_dictionary(payload).is_err()
        {
            self.stream = None;
        }
    }

    /// Whether the socket holds a stream.
    pub fn holds_stream(&self) -> bool {
        self.stream.is_some()
    }

    /// The socket idles: its stream goes (the window's tail stays).
    pub fn idle(&mut self) {
        self.stream = None;
    }

    fn new_stream(&self) -> Option<zlib_rs::Deflate> {
        let config = zlib_rs::DeflateConfig {
            level: self.level as i32,
            window_bits: -i32::from(self.window_bits),
            mem_level: MEM_LEVEL,
            ..zlib_rs::DeflateConfig::default()
        };
        let mut stream = zlib_rs::Deflate::new_with_config(config);
        if !self.tail.is_empty() {
            stream.set_dictionary(&self.tail).ok()?;
        }
        Some(stream)
    }

    /// Keeps the last [`WINDOW_TAIL_BYTES`] of the client's window.
    fn remember(&mut self, payload: &[u8]) {
        if payload.len() >= WINDOW_TAIL_BYTES {
            self.tail.clear();
            self.tail
                .extend_from_slice(&payload[payload.len() - WINDOW_TAIL_BYTES..]);
            return;
        }
        let excess = (self.tail.len() + payload.len()).saturating_sub(WINDOW_TAIL_BYTES);
        self.tail.drain(..excess);
        self.tail.extend_from_slice(payload);
    }
}

/// One message through a stream with a sync flush, the flush's tail left off (RFC 7692).
fn deflate_message(stream: &mut zlib_rs::Deflate, payload: &[u8]) -> Option<Vec<u8>> {
    // Room for stored blocks and the flush: one call does it all.
    let mut out = vec![0u8; payload.len() + payload.len() / 1024 * 5 + 64];
    let (before_in, before_out) = (stream.total_in(), stream.total_out());
    stream
        .compress(payload, &mut out, zlib_rs::DeflateFlush::SyncFlush)
        .ok()?;
    let consumed = (stream.total_in() - before_in) as usize;
    out.truncate((stream.total_out() - before_out) as usize);
    if consumed != payload.len() || !out.ends_with(&TAIL) {
        return None;
    }
    out.truncate(out.len() - TAIL.len());
    Some(out)
}

/// `payload` as one deflate block of literals with the fixed Huffman codes, then the empty
/// stored block of a sync flush without its four bytes (RFC 7692): any inflater takes it,
/// and it needs no compressor.
pub fn literal_block(payload: &[u8]) -> Vec<u8> {
    let mut bits = Bits::with_capacity(payload.len() + 2);
    // Not the last block; type 01, fixed codes.
    bits.put(0b010, 3);
    for &byte in payload {
        // RFC 1951 §3.2.6: literals 0-143 are 8-bit codes from 0x30, 144-255 9-bit codes
        // from 0x190. Huffman codes go most significant bit first.
        let (code, len) = match byte {
            0..=143 => (0x30 + u32::from(byte), 8),
            _ => (0x190 + u32::from(byte) - 144, 9),
        };
        bits.put(reversed(code, len), len);
    }
    // End of block (code 256: seven zero bits), then an empty stored block's header.
    bits.put(0, 7);
    bits.put(0, 3);
    bits.finish()
}

fn reversed(code: u32, len: u32) -> u32 {
    code.reverse_bits() >> (32 - len)
}

/// Bits packed least significant first, as deflate writes them.
struct Bits {
    out: Vec<u8>,
    acc: u64,
    count: u32,
}

impl Bits {
    fn with_capacity(bytes: usize) -> Bits {
        Bits {
            out: Vec::with_capacity(bytes),
            acc: 0,
            count: 0,
        }
    }

    fn put(&mut self, value: u32, len: u32) {
        self.acc |= u64::from(value) << self.count;
        self.count += len;
        while self.count >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.count -= 8;
        }
    }

    /// The bytes, the last one padded with zero bits.
    fn finish(mut self) -> Vec<u8> {
        if self.count > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    /// A client's inflater, kept across messages (context takeover).
    struct Client(Decompress);

    impl Client {
        fn new() -> Client {
            Client(Decompress::new(false))
        }

        fn inflate(&mut self, message: &[u8]) -> Vec<u8> {
            let input = [message, &TAIL[..]].concat();
            let mut out = Vec::with_capacity(64 * 1024);
            self.0
                .decompress_vec(&input, &mut out, FlushDecompress::Sync)
                .expect("inflates");
            out
        }
    }

    fn row(n: u32) -> String {
        format!(
            r#"{{"type":"rows_updated","table_id":7,"rows":[{{"id":{n},"field_1":"same text"}}]}}"#
        )
    }

    #[test]
    fn a_block_of_literals_inflates_to_its_payload_and_costs_two_bytes() {
        let every_byte: Vec<u8> = (0..=255).collect();
        for payload in [&b"{\"type\":\"page_add\"}"[..], b"", &every_byte] {
            let block = literal_block(payload);
            assert_eq!(Client::new().inflate(&block), payload);
        }
        let ascii = br#"{"type":"authentication","success":true}"#;
        assert_eq!(literal_block(ascii).len(), ascii.len() + 2);
    }

    #[test]
    fn a_socket_stream_refers_back_to_earlier_messages() {
        let mut context = SocketContext::new(9, 11);
        let mut client = Client::new();
        let mut sizes = Vec::new();
        for n in 0..5 {
            let plain = row(n);
            let compressed = context.compress(plain.as_bytes()).expect("compressed");
            sizes.push(compressed.len());
            assert_eq!(client.inflate(&compressed), plain.as_bytes());
        }
        assert!(sizes[4] < sizes[0] / 2, "{sizes:?}");
    }

    #[test]
    fn a_new_stream_starts_from_what_the_client_holds() {
        let mut context = SocketContext::new(9, 15);
        let mut client = Client::new();
        // Replies before any stream, an event's shared form, then the first event.
        let reply = br#"{"type":"page_add","page":"table","parameters":{"table_id":7}}"#;
        assert_eq!(client.inflate(&context.compress_reply(reply)), reply);
        assert!(!context.holds_stream(), "a reply makes no stream");
        let shared = row(1);
        let shared_form = crate::deflate::compress(shared.as_bytes(), 6, 15).expect("smaller");
        assert_eq!(client.inflate(&shared_form), shared.as_bytes());
        context.inflated_elsewhere(shared.as_bytes());
        let event = row(2);
        let primed = context.compress(event.as_bytes()).expect("compressed");
        assert_eq!(client.inflate(&primed), event.as_bytes());
        let cold = SocketContext::new(9, 15)
            .compress(event.as_bytes())
            .expect("compressed");
        assert!(
            primed.len() * 3 < cold.len(),
            "{} {}",
            primed.len(),
            cold.len()
        );

        // The socket idles; the next stream still refers back into the tail, and shared
        // forms in between reach a live stream too.
        context.idle();
        assert!(!context.holds_stream());
        let event = row(3);
        let after_idle = context.compress(event.as_bytes()).expect("compressed");
        assert_eq!(client.inflate(&after_idle), event.as_bytes());
        assert!(after_idle.len() * 3 < cold.len());
        let shared = row(4);
        let shared_form = crate::deflate::compress(shared.as_bytes(), 6, 15).expect("smaller");
        assert_eq!(client.inflate(&shared_form), shared.as_bytes());
        context.inflated_elsewhere(shared.as_bytes());
        let reply = br#"{"type":"replay_events_result","force_refresh":false}"#;
        assert_eq!(client.inflate(&context.compress_reply(reply)), reply);
        let event = row(5);
        assert_eq!(
            client.inflate(&context.compress(event.as_bytes()).expect("compressed")),
            event.as_bytes()
        );
    }

    #[test]
    fn the_tail_keeps_the_last_bytes_only() {
        let mut context = SocketContext::new(9, 15);
        let long = vec![b'x'; 3000];
        context.inflated_elsewhere(&long);
        assert_eq!(context.tail.len(), WINDOW_TAIL_BYTES);
        for n in 0..100 {
            context.inflated_elsewhere(row(n).as_bytes());
        }
        assert_eq!(context.tail.len(), WINDOW_TAIL_BYTES);
        assert!(context.tail.ends_with(row(99).as_bytes()));
        assert!(context.tail.capacity() <= 2 * WINDOW_TAIL_BYTES);
    }

    #[test]
    fn an_incompressible_event_keeps_the_context() {
        let mut context = SocketContext::new(9, 15);
        let mut client = Client::new();
        let noise: Vec<u8> = (0..200u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for payload in [row(1).into_bytes(), noise, row(2).into_bytes()] {
            let compressed = context.compress(&payload).expect("compressed");
            assert!(compressed.len() <= payload.len() + 8);
            assert_eq!(client.inflate(&compressed), payload);
        }
        assert!(context.holds_stream());
    }
}
