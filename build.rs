//! Generates the gRPC code for `proto/quota/v1/quota.proto` and Envoy's rate limit service
//! (`proto/envoy/…`) with a vendored `protoc`, so a fresh machine needs nothing installed, and
//! writes the descriptor sets that gRPC reflection serves.
//!
//! quota.v1's messages also get the proto3 JSON mapping (`pbjson-build`: serde implementations
//! generated from the same descriptors), which the JSON door and `quotactl --json` share, so no
//! JSON form of a message is written by hand. Its well-known types come from `pbjson-types`,
//! but for `Timestamp` (`src/api/wkt.rs`: the mapping's `Z`-normalized RFC 3339 string).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let quota_descriptor = out_dir.join("quota_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&quota_descriptor)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .extern_path(".google.protobuf.Timestamp", "crate::api::wkt::Timestamp")
        .compile_protos(&["proto/quota/v1/quota.proto"], &["proto"])?;
    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&quota_descriptor)?)?
        .emit_fields()
        .build(&[".quota.v1"])?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("rls_descriptor.bin"))
        .compile_protos(&["proto/envoy/service/ratelimit/v3/rls.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
