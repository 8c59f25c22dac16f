//! Compiles the gRPC wire types (api/proto) with protoc (Debian: protobuf-compiler).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/swarmnet.proto");
    tonic_build::configure().compile_protos(&["proto/swarmnet.proto"], &["proto"])?;
    Ok(())
}
