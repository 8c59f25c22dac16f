//! swarmnet's gRPC API: the messages and the client and server stubs generated from
//! `proto/swarmnet.proto` (protoc from Debian's protobuf-compiler). The orchestrator serves it;
//! netd (assignment stream, heartbeats) and the CLI are its clients. Pure wire types: no
//! behaviour lives here.

#![allow(
    clippy::all,
    missing_debug_implementations,
    rust_2018_idioms,
    reason = "generated code"
)]

tonic::include_proto!("swarmnet.v1");
