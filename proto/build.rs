//! Generates the tonic/prost code for every .proto of the crate, with a file descriptor set
//! so the worker can serve gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc keeps the build free of system packages.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = ["neox/v1/generate.proto", "neox/shard/v1/shard.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("neox_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    Ok(())
}
