//! The gRPC contract and the nodes' bus messages, generated from `proto/channelgate/v1/`.
//!
//! A leaf: every layer may use these types, and this module uses none of them.

pub mod codec;

tonic::include_proto!("channelgate.v1");

/// Descriptors of the contract, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("channelgate_descriptor");
