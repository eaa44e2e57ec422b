//! The node's edges: the WebSocket/HTTP listener and the gRPC API.

pub mod api_key;
pub mod frames;
pub mod grpc;
pub mod http;
mod keepalive;
mod race;
pub mod ws;
