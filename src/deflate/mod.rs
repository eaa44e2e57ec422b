//! permessage-deflate (RFC 7692): what a client offers and what the node answers, the
//! compression of event frames, and the bounded inflation of client messages.
//!
//! Pure (CPU only). Two ways to compress an event, chosen per event by how many sockets
//! of the node it reaches:
//! - shared: one raw deflate without context, made once and shared by every socket like
//!   the frame itself, so compressing costs once per event and not once per delivery;
//! - per socket (`auto`, for events that reach few sockets): each socket's own deflate
//!   stream with context takeover (a 15-bit window by default), which compresses a
//!   session's similar events far better (a row update after a row update), at one
//!   compression per delivery. The stream is made when the socket first needs it and
//!   dropped when it idles, so an idle socket holds no compressor.
//!
//! Whatever compressed a message, its text enters the client's window, and the socket's
//! context ([`SocketContext`]) follows that window: a shared frame in between is taken into
//! the stream rather than starting it over. The node asks `client_no_context_takeover` of
//! the client, so that an inflater lives only while a compressed client message is read.

use std::sync::atomic::{AtomicU64, Ordering};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::protocol::CloseReason;

mod socket;

pub use socket::SocketContext;

/// The extension's name in `Sec-WebSocket-Extensions`.
const NAME: &str = "permessage-deflate";
/// Window sizes a client may name (RFC 7692 §7.1.2).
const WINDOW_BITS: std::ops::RangeInclusive<u8> = 8..=15;
/// What a sync flush ends a message with; RFC 7692 leaves it off the wire.
pub(crate) const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Whether and how the node compresses (`--compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateSettings {
    /// Events that reach at most this many sockets of the node are compressed per socket,
    /// with context; more, once and shared. 0: always shared (`--compression shared`).
    pub context_fanout: usize,
    /// The window of a socket's own stream, in bits (9 to 15): its memory while in use.
    pub window_bits: u8,
    /// Frames whose payload is shorter go plain: deflate gains little on them.
    pub min_bytes: usize,
    /// zlib's level, 1 (fastest) to 9.
    pub level: u32,
}

/// What one client agreed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreement {
    /// The largest window the client lets the node's messages use, in bits.
    pub server_window_bits: u8,
    /// Whether the node may keep context across its messages to this client (the client
    /// did not ask `server_no_context_takeover`, and the node offered context).
    pub server_context: bool,
}

impl Agreement {
    /// The window a payload of `len` bytes is compressed with for this client: the full
    /// one when the payload fits the client's window (without context, a message refers
    /// back at most its own length), so that most clients share one compressed form; the
    /// client's own otherwise. `None`: no zlib window is that small (8 bits), plain.
    pub fn window_for(&self, len: usize) -> Option<u8> {
        if len <= 1 << self.server_window_bits {
            Some(15)
        } else if self.server_window_bits >= 9 {
            Some(self.server_window_bits)
        } else {
            None
        }
    }
}

/// The answer to a client's `Sec-WebSocket-Extensions` offers: the first permessage-deflate
/// offer the node can accept, with the response header's value. `None`: no extension (an
/// offer the node cannot accept never fails the handshake). `context`: whether the node
/// compresses with context (per socket) at all.
pub fn negotiate<'a>(
    headers: impl IntoIterator<Item = &'a str>,
    context: bool,
) -> Option<(Agreement, String)> {
    headers
        .into_iter()
        .flat_map(|header| header.split(','))
        .find_map(|offer| accept(offer, context))
}

/// One offer (`permessage-deflate; param=value; ...`): accepted, or `None` when it is
/// another extension or breaks RFC 7692's rules (unknown or repeated parameters, bad
/// values).
fn accept(offer: &str, context: bool) -> Option<(Agreement, String)> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(NAME) {
        return None;
    }
    let mut seen: Vec<String> = Vec::new();
    let mut server_window_bits = None;
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (param, None),
        };
        let name = name.to_ascii_lowercase();
        if seen.contains(&name) {
            return None;
        }
        match (name.as_str(), value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
            ("server_max_window_bits", Some(value)) => {
                server_window_bits = Some(window_bits(value)?);
            }
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", Some(value)) => {
                window_bits(value)?;
            }
            _ => return None,
        }
        seen.push(name);
    }
    // Without context the node says so (the client may then free its inflater between
    // messages); either way it asks the client to keep none.
    // A socket's own stream needs a window zlib can make (9 bits at least).
    let server_context = context
        && !seen.iter().any(|p| p == "server_no_context_takeover")
        && server_window_bits.unwrap_or(15) >= 9;
    let mut response = NAME.to_string();
    if !server_context {
        response.push_str("; server_no_context_takeover");
    }
    response.push_str("; client_no_context_takeover");
    if let Some(bits) = server_window_bits {
        response.push_str(&format!("; server_max_window_bits={bits}"));
    }
    let agreement = Agreement {
        server_window_bits: server_window_bits.unwrap_or(15),
        server_context,
    };
    Some((agreement, response))
}

/// A window size as RFC 7692 writes it: 8 to 15, digits only, no leading zero.
fn window_bits(value: &str) -> Option<u8> {
    if value.is_empty() || value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| WINDOW_BITS.contains(bits))
}

/// How a frame went compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Once for every socket, without context.
    Shared,
    /// On the socket's own stream, with context.
    PerSocket,
}

impl Mode {
    pub const ALL: [Mode; 2] = [Mode::Shared, Mode::PerSocket];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Shared => "shared",
            Mode::PerSocket => "per_socket",
        }
    }
}

/// Bytes of payloads sent compressed, before and after, by mode: for `/metrics`.
pub static PLAIN_BYTES: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
pub static COMPRESSED_BYTES: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// Counts one compressed delivery of `plain` payload bytes sent as `compressed`.
pub fn count(mode: Mode, plain: usize, compressed: usize) {
    PLAIN_BYTES[mode as usize].fetch_add(plain as u64, Ordering::Relaxed);
    COMPRESSED_BYTES[mode as usize].fetch_add(compressed as u64, Ordering::Relaxed);
}

/// A message's payload compressed on its own (no context, a window of `window_bits`, 9 to
/// 15), as permessage-deflate sends it; `None` when it would not come out smaller.
pub fn compress(payload: &[u8], level: u32, window_bits: u8) -> Option<Vec<u8>> {
    let mut deflater = Compress::new_with_window_bits(Compression::new(level), false, window_bits);
    // Room for incompressible data (stored blocks) and the flush: one call does it all.
    let mut out = Vec::with_capacity(payload.len() + payload.len() / 1024 * 5 + 64);
    deflater
        .compress_vec(payload, &mut out, FlushCompress::Sync)
        .ok()?;
    if deflater.total_in() as usize != payload.len() || !out.ends_with(&TAIL) {
        return None;
    }
    out.truncate(out.len() - TAIL.len());
    (out.len() < payload.len()).then_some(out)
}

/// Inflates one compressed client message, stopping with 1009 as soon as it passes
/// `max_bytes`: a small frame that inflates to gigabytes costs at most that much work.
pub fn inflate(compressed: &[u8], max_bytes: usize) -> Result<Vec<u8>, CloseReason> {
    let input = [compressed, &TAIL[..]].concat();
    let mut inflater = Decompress::new(false);
    let mut out: Vec<u8> = Vec::with_capacity((compressed.len() * 4).min(max_bytes + 1).max(64));
    loop {
        if out.len() > max_bytes {
            return Err(CloseReason::MessageTooBig);
        }
        if out.len() == out.capacity() {
            out.reserve(out.capacity().min(max_bytes + 1 - out.len()).max(64));
        }
        let before = (inflater.total_in(), out.len());
        let status = inflater
            .decompress_vec(
                &input[inflater.total_in() as usize..],
                &mut out,
                FlushDecompress::Sync,
            )
            .map_err(|_| CloseReason::InvalidPayload)?;
        let all_in = inflater.total_in() as usize == input.len();
        // Done once all went in and the output had room to spare; a call that moved
        // nothing means the input was cut short.
        if status == Status::StreamEnd
            || (all_in && out.len() < out.capacity())
            || before == (inflater.total_in(), out.len())
        {
            break;
        }
    }
    if out.len() > max_bytes {
        return Err(CloseReason::MessageTooBig);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(offer: &str) -> Option<String> {
        negotiate([offer], false).map(|(_, response)| response)
    }

    #[test]
    fn offers_are_answered_as_rfc_7692_allows() {
        let plain = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
        assert_eq!(answer("permessage-deflate").as_deref(), Some(plain));
        assert_eq!(
            answer("permessage-deflate; client_max_window_bits").as_deref(),
            Some(plain)
        );
        assert_eq!(
            answer("permessage-deflate; client_max_window_bits=10; server_no_context_takeover")
                .as_deref(),
            Some(plain)
        );
        assert_eq!(
            answer("permessage-deflate; server_max_window_bits=10").as_deref(),
            Some(format!("{plain}; server_max_window_bits=10").as_str())
        );
        assert_eq!(
            answer("permessage-deflate; server_max_window_bits=\"9\"").as_deref(),
            Some(format!("{plain}; server_max_window_bits=9").as_str())
        );
    }

    #[test]
    fn an_offer_the_node_cannot_accept_is_passed_over_for_the_next() {
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=abc",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; mystery",
            "x-webkit-deflate-frame",
        ] {
            assert_eq!(answer(bad), None, "{bad}");
        }
        let (agreement, _) = negotiate(
            [
                "x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=16",
                "permessage-deflate; server_max_window_bits=12",
            ],
            false,
        )
        .expect("the last offer is fine");
        assert_eq!(agreement.server_window_bits, 12);
        assert_eq!(agreement.window_for(4096), Some(15));
        assert_eq!(agreement.window_for(4097), Some(12));
        let tiny = Agreement {
            server_window_bits: 8,
            server_context: false,
        };
        assert_eq!(tiny.window_for(256), Some(15));
        assert_eq!(tiny.window_for(257), None);
    }

    #[test]
    fn with_context_the_node_keeps_it_unless_the_client_asks_otherwise() {
        let context = |offer: &str| negotiate([offer], true).expect("accepted");
        let (agreement, response) = context("permessage-deflate; client_max_window_bits");
        assert!(agreement.server_context);
        assert_eq!(response, "permessage-deflate; client_no_context_takeover");
        let (agreement, response) = context("permessage-deflate; server_no_context_takeover");
        assert!(!agreement.server_context);
        assert_eq!(
            response,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
    }

    #[test]
    fn a_compressed_payload_inflates_to_itself() {
        let payload =
            br#"{"type":"rows_created","rows":[{"id":1,"field_1":"a"},{"id":2,"field_1":"a"}]}"#
                .repeat(20);
        for window in [15, 9] {
            let compressed = compress(&payload, 6, window).expect("smaller");
            assert!(compressed.len() < payload.len() / 4);
            assert_eq!(inflate(&compressed, 1 << 20), Ok(payload.clone()));
        }
        assert_eq!(compress(b"{}", 6, 15), None, "no gain: plain");
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let bomb = compress(&vec![b'a'; 8 << 20], 9, 15).expect("smaller");
        assert!(bomb.len() < 16 * 1024, "{}", bomb.len());
        assert_eq!(inflate(&bomb, 1 << 20), Err(CloseReason::MessageTooBig));
        assert_eq!(
            inflate(b"\xff\xff garbage", 1 << 20),
            Err(CloseReason::InvalidPayload)
        );
    }
}
