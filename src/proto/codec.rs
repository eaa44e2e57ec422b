//! The codec of every generated gRPC service and client: prost's, with smaller buffers.
//!
//! tonic allocates a decode buffer and an encode buffer for every call, 8 KiB each by
//! default; a Publish request and its answer are a few hundred bytes, and an 8 KiB block is
//! beyond the allocator's per-thread cache, so each call paid two slow allocations and two
//! slow frees for space it never touched. These buffers start at [`BUFFER_BYTES`] and grow
//! to fit a larger message (the message limits are set on the services, not here).

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Where a call's buffers start: a typical Publish fits, and a block this small stays in
/// the allocator's per-thread cache.
const BUFFER_BYTES: usize = 1024;
/// tonic's default: how much a streaming response gathers before it is sent.
const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD)
}

/// prost encoding and decoding with [`BUFFER_BYTES`] buffers; `build.rs` names it as the
/// generated code's codec.
#[derive(Debug, Clone, Copy)]
pub struct SmallBuffers<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBuffers<T, U> {
    fn default() -> Self {
        SmallBuffers(PhantomData)
    }
}

impl<T, U> Codec for SmallBuffers<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
