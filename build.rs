//! Compiles the gRPC contract with the vendored protoc, so no system protoc is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through PROTOC; a build script runs on one thread.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("channelgate_descriptor.bin"))
        // prost's codec with per-call buffers sized for our messages (src/proto/codec.rs).
        .codec_path("crate::proto::codec::SmallBuffers")
        .compile_protos(
            &[
                "proto/channelgate/v1/gateway.proto",
                "proto/channelgate/v1/authorizer.proto",
                "proto/channelgate/v1/bus.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
