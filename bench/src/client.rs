//! A lean WebSocket client for the scenarios' subscribers: the handshake and the framing are
//! done by hand over one read buffer, so a delivery costs the load generator one parse and no
//! allocation. The generator shares the machine with the server under test; the cheaper it
//! reads, the more of what a table shows is the server's own limit.
//!
//! It speaks just what a subscriber needs (RFC 6455): text frames out, masked; unmasked
//! frames in, of any length; pings answered; a close ends the socket.
//!
//! With [`offer_deflate`] every socket of the process offers `permessage-deflate` (RFC
//! 7692) as a browser does (`permessage-deflate; client_max_window_bits`); when the server
//! takes it, frames with RSV1 set are inflated by the socket's own inflater, kept across
//! messages (the server may compress with context), and handed on inflated. Each socket
//! counts the bytes of the frames it read (headers included: what its TCP socket read after
//! the handshake) in [`Client::wire_bytes`].

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use flate2::{Decompress, FlushDecompress, Status};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The sample key of RFC 6455 §1.3; the server only needs a well-formed one.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// Where a read starts; grows for a frame that does not fit.
const READ_BUFFER_BYTES: usize = 4096;

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;
const RSV1: u8 = 0x40;
/// What a sync flush ends a message with; RFC 7692 leaves it off the wire.
const DEFLATE_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

static OFFER_DEFLATE: AtomicBool = AtomicBool::new(false);

/// From now on, every socket this process opens offers permessage-deflate (the compression
/// benchmark's binary does; loadgen's sockets offer nothing).
#[allow(dead_code)]
pub fn offer_deflate(on: bool) {
    OFFER_DEFLATE.store(on, Ordering::Relaxed);
}

/// One frame from the server, borrowed from the read buffer.
pub enum Frame<'a> {
    Text(&'a [u8]),
    Close,
    /// Binary, pong or a continuation: nothing a subscriber looks at.
    Other,
}

pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Unparsed input is `buf[start..end]`.
    start: usize,
    end: usize,
    /// Pongs owed for pings read (and automatic replies), sent before the next read.
    pongs: Vec<Vec<u8>>,
    mask_seed: u32,
    /// A text frame starting with `.0` is answered with the text `.1` (Pusher's
    /// application-level ping), see [`Client::answer_text`].
    auto_reply: Option<(&'static [u8], &'static str)>,
    /// The inflater, when the server took permessage-deflate, and what it last inflated.
    inflater: Option<Box<Decompress>>,
    inflated: Vec<u8>,
    /// Bytes of the frames read since the handshake (or since the count was last reset),
    /// headers included, and how many of them were compressed.
    pub wire_bytes: u64,
    pub wire_frames: u64,
    pub compressed_frames: u64,
    /// The server's `Sec-WebSocket-Extensions` answer, if any.
    pub extensions: Option<String>,
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl Client {
    /// Sends the upgrade request for `path` (with its query) and waits for `101`.
    pub async fn connect(mut stream: TcpStream, host: &str, path: &str) -> io::Result<Client> {
        let offer = if OFFER_DEFLATE.load(Ordering::Relaxed) {
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        } else {
            ""
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut client = Client {
            stream,
            buf: vec![0; READ_BUFFER_BYTES],
            start: 0,
            end: 0,
            pongs: Vec::new(),
            mask_seed: 0x9e37_79b9,
            auto_reply: None,
            inflater: None,
            inflated: Vec::new(),
            wire_bytes: 0,
            wire_frames: 0,
            compressed_frames: 0,
            extensions: None,
        };
        loop {
            if let Some(head_end) = find(&client.buf[..client.end], b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&client.buf[..head_end]);
                if !head.starts_with("HTTP/1.1 101") {
                    let status = head.lines().next().unwrap_or("").to_owned();
                    return Err(invalid(format!("upgrade refused: {status}")));
                }
                client.extensions = head
                    .lines()
                    .filter_map(|line| line.split_once(':'))
                    .find(|(name, _)| name.trim().eq_ignore_ascii_case("sec-websocket-extensions"))
                    .map(|(_, value)| value.trim().to_owned());
                if client
                    .extensions
                    .as_deref()
                    .is_some_and(|e| e.to_ascii_lowercase().contains("permessage-deflate"))
                {
                    // Raw deflate with the largest window: it inflates any smaller one.
                    client.inflater = Some(Box::new(Decompress::new(false)));
                }
                client.start = head_end + 4;
                return Ok(client);
            }
            if client.end == client.buf.len() {
                return Err(invalid("upgrade response head too long".into()));
            }
            let n = client.stream.read(&mut client.buf[client.end..]).await?;
            if n == 0 {
                return Err(invalid("closed during the upgrade".into()));
            }
            client.end += n;
        }
    }

    /// Sends one text frame, masked as a client must.
    pub async fn send_text(&mut self, text: &str) -> io::Result<()> {
        let frame = masked(self.next_mask(), OP_TEXT, text.as_bytes());
        self.stream.write_all(&frame).await
    }

    /// From now on, answers every text frame that starts with `prefix` with the text `reply`
    /// (sent with the pongs, before the next read); the frame is still handed on.
    pub fn answer_text(&mut self, prefix: &'static [u8], reply: &'static str) {
        self.auto_reply = Some((prefix, reply));
    }

    /// xorshift: a load generator's masks need not be secret, only present.
    fn next_mask(&mut self) -> [u8; 4] {
        self.mask_seed ^= self.mask_seed << 13;
        self.mask_seed ^= self.mask_seed >> 17;
        self.mask_seed ^= self.mask_seed << 5;
        self.mask_seed.to_be_bytes()
    }

    /// Waits for input and hands every whole frame buffered to `each`. Returns `false` once
    /// the server closed the socket (a close frame or end of stream).
    pub async fn read_frames(&mut self, each: impl FnMut(Frame<'_>)) -> io::Result<bool> {
        Ok(self.read_frames_until(None, each).await?.unwrap_or(true))
    }

    /// As [`Client::read_frames`], but stops waiting for input at `deadline` (`None` back),
    /// losing nothing: a socket that also sends reads between its sends this way.
    pub async fn read_frames_until(
        &mut self,
        deadline: Option<tokio::time::Instant>,
        mut each: impl FnMut(Frame<'_>),
    ) -> io::Result<Option<bool>> {
        for pong in std::mem::take(&mut self.pongs) {
            self.stream.write_all(&pong).await?;
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.next_frame().is_none() {
            self.make_room();
            // A read is cancel-safe: given up, it took nothing from the socket.
            let read = self.stream.read(&mut self.buf[self.end..]);
            let n = match deadline {
                None => read.await?,
                Some(deadline) => match tokio::time::timeout_at(deadline, read).await {
                    Ok(n) => n?,
                    Err(_) => return Ok(None),
                },
            };
            if n == 0 {
                return Ok(Some(false));
            }
            self.end += n;
        }
        while let Some((first, payload)) = self.next_frame() {
            self.wire_bytes += (payload.end - self.start) as u64;
            self.wire_frames += 1;
            self.start = payload.end;
            let opcode = first & 0x0f;
            match opcode {
                OP_TEXT if first & RSV1 != 0 => {
                    self.compressed_frames += 1;
                    let Some(inflater) = self.inflater.as_mut() else {
                        return Err(invalid("a compressed frame without the extension".into()));
                    };
                    self.inflated.clear();
                    inflate(inflater, &self.buf[payload.clone()], &mut self.inflated)?;
                    inflate(inflater, &DEFLATE_TAIL, &mut self.inflated)?;
                    if let Some((prefix, reply)) = self.auto_reply
                        && self.inflated.starts_with(prefix)
                    {
                        let frame = masked(self.next_mask(), OP_TEXT, reply.as_bytes());
                        self.pongs.push(frame);
                    }
                    each(Frame::Text(&self.inflated));
                }
                OP_TEXT => {
                    if let Some((prefix, reply)) = self.auto_reply
                        && self.buf[payload.clone()].starts_with(prefix)
                    {
                        let frame = masked(self.next_mask(), OP_TEXT, reply.as_bytes());
                        self.pongs.push(frame);
                    }
                    each(Frame::Text(&self.buf[payload]));
                }
                OP_CLOSE => {
                    each(Frame::Close);
                    return Ok(Some(false));
                }
                OP_PING => {
                    let pong = masked(self.next_mask(), OP_PONG, &self.buf[payload]);
                    self.pongs.push(pong);
                }
                _ => each(Frame::Other),
            }
        }
        Ok(Some(true))
    }

    /// Subscribes to the page of table `table_id` and waits for its `page_add`.
    pub async fn subscribe_table(&mut self, table_id: usize) -> Result<(), String> {
        self.send_text(&format!(r#"{{"page":"table","table_id":{table_id}}}"#))
            .await
            .map_err(|e| e.to_string())?;
        self.await_answer(b"page_add", &[b"page_rejected"]).await
    }

    /// Reads until a text frame holds `accept` (`Ok`) or one of `reject` (`Err` with the
    /// frame); other frames, and whatever follows the answer in the same read, are dropped.
    pub async fn await_answer(&mut self, accept: &[u8], reject: &[&[u8]]) -> Result<(), String> {
        let name = String::from_utf8_lossy(accept).into_owned();
        let mut answer = None;
        while answer.is_none() {
            let open = self
                .read_frames(|frame| {
                    if let Frame::Text(text) = frame
                        && answer.is_none()
                    {
                        if find(text, accept).is_some() {
                            answer = Some(Ok(()));
                        } else if reject.iter().any(|r| find(text, r).is_some()) {
                            let text = String::from_utf8_lossy(text);
                            answer = Some(Err(format!("refused, waiting for {name}: {text}")));
                        }
                    }
                })
                .await
                .map_err(|e| format!("before {name}: {e}"))?;
            if !open && answer.is_none() {
                return Err(format!("socket closed before {name}"));
            }
        }
        answer.unwrap_or(Ok(()))
    }

    /// The next whole frame's first byte (FIN, RSV and opcode) and payload range in the
    /// buffer, if it is all there.
    fn next_frame(&self) -> Option<(u8, std::ops::Range<usize>)> {
        let input = &self.buf[self.start..self.end];
        let (&first, &second) = (input.first()?, input.get(1)?);
        let (len, header) = match second & 0x7f {
            126 => (
                u16::from_be_bytes([*input.get(2)?, *input.get(3)?]) as usize,
                4,
            ),
            127 => {
                let bytes: [u8; 8] = input.get(2..10)?.try_into().ok()?;
                (u64::from_be_bytes(bytes) as usize, 10)
            }
            n => (n as usize, 2),
        };
        if input.len() < header + len {
            return None;
        }
        let payload = self.start + header..self.start + header + len;
        Some((first, payload))
    }

    /// Moves unparsed input to the front, and grows the buffer for a frame that won't fit.
    fn make_room(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            let len = self.buf.len() * 2;
            self.buf.resize(len, 0);
        }
    }
}

/// Inflates `input` onto the end of `out`, with the stream's context kept (a server may
/// compress with context takeover). A stream the server ended (BFINAL) starts over.
fn inflate(inflater: &mut Decompress, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    let mut offset = 0;
    loop {
        if out.capacity() - out.len() < 4096 {
            out.reserve(out.capacity().max(4096));
        }
        let before_in = inflater.total_in();
        let status = inflater
            .decompress_vec(&input[offset..], out, FlushDecompress::Sync)
            .map_err(|e| invalid(format!("inflate: {e}")))?;
        offset += (inflater.total_in() - before_in) as usize;
        match status {
            Status::StreamEnd => {
                inflater.reset(false);
                return Ok(());
            }
            _ if offset >= input.len() && out.len() < out.capacity() => return Ok(()),
            _ => {}
        }
    }
}

/// A client frame: header, mask and the masked payload.
fn masked(mask: [u8; 4], opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 14);
    frame.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_split_and_long_frames_and_answers_pings() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut head = vec![0; 1024];
            let n = socket.read(&mut head).await.unwrap();
            assert!(String::from_utf8_lossy(&head[..n]).starts_with("GET /ws/core/?x=1 "));
            let long = "y".repeat(70_000);
            let mut out = b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x02hi\x89\x01p".to_vec();
            out.extend_from_slice(&[0x81, 127]);
            out.extend_from_slice(&(long.len() as u64).to_be_bytes());
            out.extend_from_slice(long.as_bytes());
            // The last frame arrives in two writes.
            socket.write_all(&out[..out.len() - 10]).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            socket.write_all(&out[out.len() - 10..]).await.unwrap();
            let mut pong = [0u8; 7];
            socket.read_exact(&mut pong).await.unwrap();
            assert_eq!(pong[0], 0x8A, "a pong");
            assert_eq!(
                pong[6] ^ pong[2],
                b'p',
                "carrying the ping's payload, masked"
            );
            socket.write_all(&[0x88, 0]).await.unwrap();
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut client = Client::connect(stream, "x", "/ws/core/?x=1").await.unwrap();
        let mut texts = Vec::new();
        while client
            .read_frames(|frame| {
                if let Frame::Text(t) = frame {
                    texts.push(t.len());
                }
            })
            .await
            .unwrap()
        {}
        assert_eq!(texts, [2, 70_000]);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn answers_a_text_that_starts_with_the_prefix() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut head = vec![0; 1024];
            let _ = socket.read(&mut head).await.unwrap();
            let mut out = b"HTTP/1.1 101 Switching Protocols\r\n\r\n".to_vec();
            for text in [&b"ping?"[..], b"no ping", b"ping!"] {
                out.extend_from_slice(&[0x81, text.len() as u8]);
                out.extend_from_slice(text);
            }
            socket.write_all(&out).await.unwrap();
            // Two answers, masked: header, length, mask, "pong".
            let mut answers = [0u8; 20];
            socket.read_exact(&mut answers).await.unwrap();
            for answer in answers.chunks(10) {
                assert_eq!(answer[..2], [0x81, 0x80 | 4]);
                let text: Vec<u8> = (0..4).map(|i| answer[6 + i] ^ answer[2 + i]).collect();
                assert_eq!(text, b"pong");
            }
            socket.write_all(&[0x88, 0]).await.unwrap();
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut client = Client::connect(stream, "x", "/").await.unwrap();
        client.answer_text(b"ping", "pong");
        let mut texts = 0;
        while client
            .read_frames(|frame| {
                if let Frame::Text(_) = frame {
                    texts += 1;
                }
            })
            .await
            .unwrap()
        {}
        assert_eq!(texts, 3, "answered frames are still handed on");
        server.await.unwrap();
    }
}
