//! Generates the gRPC code for `proto/quota/v1/quota.proto` and Envoy's rate limit service
//! (`proto/envoy/…`) with a vendored `protoc`, so a fresh machine needs nothing installed, and
//! writes the descriptor sets that gRPC reflection serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("quota_descriptor.bin"))
        .compile_protos(&["proto/quota/v1/quota.proto"], &["proto"])?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("rls_descriptor.bin"))
        .compile_protos(&["proto/envoy/service/ratelimit/v3/rls.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
