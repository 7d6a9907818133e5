//! The wire format of Chorus: the `chorus.v1` protobuf messages and the tonic clients and
//! servers generated from them, plus the encoded descriptor set for gRPC reflection.
//!
//! This crate holds generated code only. Domain types and the conversions between them and
//! these messages live in `chorus-core`; nothing here knows about experiments beyond their shape.

pub mod codec;

/// Generated `chorus.v1` types, clients and servers.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("chorus.v1");
}

/// The encoded `FileDescriptorSet` of every Chorus proto, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/chorus_descriptor.bin"));

/// Largest gRPC message either side accepts. Control-plane messages carry object-store keys,
/// never tensors, so 16 MiB leaves ample room for a large spec or a report batch.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
