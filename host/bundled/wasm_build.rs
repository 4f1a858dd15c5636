//! Shared by the build scripts that build plugins for wasm (`host/bundled`'s, the first-party
//! plugins; `tests`', the test guests and marketplace examples): a nested `cargo build
//! --release` into `<target>/plugins`, a target directory of its own, so the outer build's lock
//! is never contended, and the manifest embedding.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `<target>/plugins`, from the build script's OUT_DIR (`<target>/<profile>/build/<pkg>-<hash>/out`):
/// one plugin build shared by every profile and every crate that needs plugins.
pub fn plugin_target(out_dir: &Path) -> PathBuf {
    out_dir.ancestors().nth(4).map(Path::to_path_buf).unwrap_or_else(|| out_dir.to_path_buf()).join("plugins")
}

/// Where `package`'s wasm lands after [`cargo_build`] for `target`.
pub fn built(plugin_target: &Path, target: &str, package: &str) -> PathBuf {
    plugin_target.join(target).join("release").join(format!("{}.wasm", package.replace('-', "_")))
}

/// Reads a built binary and embeds the manifest from its crate's qlayer-plugin.toml.
pub fn with_manifest(workspace: &Path, package: &str, dir: &str, raw: &Path) -> (String, Vec<u8>) {
    let wasm = std::fs::read(raw).unwrap_or_else(|e| fail(&format!("reading {}: {e}", raw.display())));
    let toml_path = workspace.join(dir).join("qlayer-plugin.toml");
    let text =
        std::fs::read_to_string(&toml_path).unwrap_or_else(|e| fail(&format!("reading {}: {e}", toml_path.display())));
    let manifest =
        qlayer_manifest::Manifest::from_toml(&text).unwrap_or_else(|e| fail(&format!("{}: {e}", toml_path.display())));
    let with_manifest = qlayer_manifest::embed(&wasm, &manifest).unwrap_or_else(|e| fail(&format!("{package}: {e}")));
    (manifest.name, with_manifest)
}

/// A nested `cargo build --release --target <target>` of `packages` into `target_dir`.
pub fn cargo_build(workspace: &Path, target_dir: &Path, target: &str, packages: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace).args(["build", "--release", "--target", target, "--target-dir"]).arg(target_dir);
    for package in packages {
        cmd.args(["-p", package]);
    }
    // Settings of the outer build that must not leak into the wasm build.
    for var in
        ["CARGO_ENCODED_RUSTFLAGS", "RUSTFLAGS", "CARGO_BUILD_TARGET", "CARGO_TARGET_DIR", "CARGO_BUILD_RUSTFLAGS"]
    {
        cmd.env_remove(var);
    }
    for (key, _) in std::env::vars() {
        if key.starts_with("CARGO_PROFILE_") || key.starts_with("CARGO_FEATURE_") || key.starts_with("CARGO_CFG_") {
            cmd.env_remove(key);
        }
    }
    // Small binaries: no debug info in the shipped plugins.
    cmd.env("CARGO_PROFILE_RELEASE_DEBUG", "false").env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo");
    let status = cmd.status().unwrap_or_else(|e| fail(&format!("could not run cargo to build the plugins: {e}")));
    if !status.success() {
        fail(&format!(
            "building the plugins for {target} failed (see above). The toolchain in rust-toolchain.toml lists the \
             target; with another toolchain run `rustup target add {target}`."
        ));
    }
}

pub fn env(key: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| fail(&format!("{key} is not set")))
}

pub fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1)
}
