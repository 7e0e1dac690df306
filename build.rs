//! Compiles the protocols in `proto/` with tonic-prost-build, using the
//! `protoc` shipped by the protoc-bin-vendored crate (no system protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/tripod/buildd/v1/builder.proto",
        "proto/tripod/executor/v1/executor.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(config, &protos, &["proto"])?;
    Ok(())
}
