//! The protobuf codec every Chorus service and client uses: prost's, with a small first buffer.
//!
//! A coordinator holds one open `Assignments` stream per worker for the worker's whole life,
//! and each open stream keeps its encode buffer. With tonic's default of 8 KiB that buffer was
//! a quarter of what one worker cost the coordinator in memory; commands are a few hundred
//! bytes, so 1 KiB holds them, and a larger message (a listing page) grows the buffer as it is
//! written.

use std::marker::PhantomData;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// First size of a message buffer.
const BUFFER_BYTES: usize = 1024;
/// How much a stream writes before it yields to other tasks (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// Prost encoding with small first buffers.
#[derive(Debug, Clone)]
pub struct CompactCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for CompactCodec<T, U> {
    fn default() -> Self {
        CompactCodec(PhantomData)
    }
}

impl<T, U> Codec for CompactCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }
}
