//! Compiles `proto/qlayer/v1/qlayer.proto` (with protox: no protoc needed) into the gRPC
//! messages, servers and clients, and the descriptor set that reflection serves.

use std::path::{Path, PathBuf};

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| fail("CARGO_MANIFEST_DIR is not set")));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_else(|_| fail("OUT_DIR is not set")));
    compile_proto(&manifest_dir.join("../.."), &out_dir);
}

/// Compiles `proto/qlayer/v1/qlayer.proto` (with protox: no protoc needed) into the gRPC
/// messages, servers and clients, and writes the descriptor set that reflection serves.
fn compile_proto(workspace: &Path, out_dir: &Path) {
    use prost::Message as _;
    let root = workspace.join("proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let fds = protox::compile(["qlayer/v1/qlayer.proto"], [&root]).unwrap_or_else(|e| fail(&format!("proto: {e}")));
    std::fs::write(out_dir.join("qlayer_descriptor.bin"), fds.encode_to_vec())
        .unwrap_or_else(|e| fail(&format!("writing the descriptor set: {e}")));
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)
        .unwrap_or_else(|e| fail(&format!("generating the gRPC code: {e}")));
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1)
}
