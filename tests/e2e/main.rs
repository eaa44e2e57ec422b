//! End-to-end tests: a real node on free ports, real WebSocket clients, a real tonic client.

mod authorizer;
mod backend;
mod backpressure;
mod browser;
mod cluster;
mod common;
mod connect;
mod console;
mod console_browser;
mod delivery;
mod exactly_once;
mod grpc_api;
mod identity;
mod limits;
mod pages;
mod presence;
mod protocol;
mod redis_cluster;
mod redis_server;
mod replay;
mod revocation;
mod sharded;
mod shutdown;
