//! Plugin authoring: `qlayer plugin new` scaffolds a crate that builds as is, `qlayer plugin
//! build` compiles it to a component with its manifest embedded (and checks that the host loads
//! it), `qlayer plugin inspect` shows what a component is and asks for.

use anyhow::{Context as _, bail};
use qlayer_runtime::{Kind, Manifest, Runtime, RuntimeConfig};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The toolchain file of this workspace, copied into scaffolded crates so they build with the
/// same compiler and the wasm32-wasip2 target.
const TOOLCHAIN: &str = include_str!("../../../rust-toolchain.toml");

/// Creates a new plugin crate of `kind` named `name` in `dir`.
pub fn new_plugin(kind: Kind, name: &str, dir: &Path, sdk: &Path) -> anyhow::Result<()> {
    // The manifest's rules decide what a valid name is.
    let manifest = Manifest {
        name: name.to_string(),
        version: "0.1.0".into(),
        kind,
        format: Default::default(),
        description: format!("A {kind} plugin."),
        capabilities: Default::default(),
        limits: Default::default(),
    };
    manifest.validate()?;
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!("{} already exists and is not empty", dir.display());
    }
    if !sdk.join("Cargo.toml").is_file() {
        bail!("no qlayer-sdk at {} (pass --sdk with the path to the SDK crate)", sdk.display());
    }
    std::fs::create_dir_all(dir.join("src")).with_context(|| format!("creating {}", dir.display()))?;
    let sdk = sdk.canonicalize()?;
    let cargo = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
qlayer-sdk = {{ path = {sdk:?}, features = ["{kind}"] }}
serde_json = "1"

[profile.release]
opt-level = "s"
debug = false

# A plugin is its own workspace, even when created inside another one.
[workspace]
"#,
        sdk = sdk.display().to_string()
    );
    let limits = match kind {
        Kind::Agent => "memory-mb = 64\ntimeout-ms = 120000",
        _ => "memory-mb = 32\ntimeout-ms = 10000",
    };
    let capabilities = match kind {
        Kind::Provider => {
            "# outbound-hosts = [\"api.example.com\"]\n# config = [\"base_url\"]\n# secrets = [\"api_key\"]"
        }
        _ => "# config = [\"some_key\"]",
    };
    let plugin_toml = format!(
        "name = \"{name}\"\nversion = \"0.1.0\"\nkind = \"{kind}\"\ndescription = \"A {kind} plugin.\"\n\n[capabilities]\n{capabilities}\n\n[limits]\n{limits}\n"
    );
    write(dir, "Cargo.toml", &cargo)?;
    write(dir, "qlayer-plugin.toml", &plugin_toml)?;
    write(dir, "rust-toolchain.toml", TOOLCHAIN)?;
    write(dir, ".gitignore", "/target\n")?;
    write(dir, "src/lib.rs", template(kind))?;
    Ok(())
}

fn write(dir: &Path, file: &str, text: &str) -> anyhow::Result<()> {
    let path = dir.join(file);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

fn template(kind: Kind) -> &'static str {
    match kind {
        Kind::Tool => {
            r#"//! A tool plugin: JSON in, JSON out.
use qlayer_sdk::{PluginError, tool::Tool};

struct Plugin;

impl Tool for Plugin {
    fn invoke(input_json: String) -> Result<String, PluginError> {
        let input: serde_json::Value = serde_json::from_str(&input_json)
            .map_err(|e| PluginError::InvalidInput(format!("input is not JSON: {e}")))?;
        Ok(serde_json::json!({ "echo": input }).to_string())
    }
}

qlayer_sdk::export_tool!(Plugin);
"#
        }
        Kind::Validator => {
            r#"//! A validator plugin: flags TODO markers left in files.
use qlayer_sdk::{validator::Validator, *};

struct Plugin;

impl Validator for Plugin {
    fn validate(artifacts: Vec<Artifact>) -> Result<Vec<Diagnostic>, PluginError> {
        let mut found = Vec::new();
        for a in &artifacts {
            let Some(text) = a.as_text() else { continue };
            for (i, line) in text.lines().enumerate() {
                if line.contains("TODO") {
                    found.push(Diagnostic {
                        severity: Severity::Warning,
                        rule: "todo-marker".into(),
                        path: Some(a.path.clone()),
                        line: Some(i as u32 + 1),
                        message: "a TODO marker is left in the file".into(),
                    });
                }
            }
        }
        Ok(found)
    }
}

qlayer_sdk::export_validator!(Plugin);
"#
        }
        Kind::Agent => {
            r#"//! An agent plugin: asks the model (through the host) to summarise the requirement.
use qlayer_sdk::{agent::Agent, *};

struct Plugin;

impl Agent for Plugin {
    fn role() -> String {
        "summariser".into()
    }

    fn run(task: Task) -> Result<AgentOutput, PluginError> {
        let reply = qlayer_sdk::agent::complete(&CompletionRequest {
            max_tokens: Some(400),
            ..CompletionRequest::new(vec![
                Message::new(Role::System, "Role: summariser.\nSummarise the requirement in one paragraph."),
                Message::new(Role::User, task.requirement),
            ])
        })?;
        Ok(AgentOutput { artifacts: vec![Artifact::text("SUMMARY.md", reply.text)], summary: "summary written".into() })
    }
}

qlayer_sdk::export_agent!(Plugin);
"#
        }
        Kind::Provider => {
            r#"//! A provider plugin: echoes the last message back (replace with calls to your API through
//! `qlayer_sdk::http`).
use qlayer_sdk::provider::{ChunkSource, Provider};
use qlayer_sdk::*;

struct Plugin;

fn reply(request: &CompletionRequest) -> Result<String, PluginError> {
    request.messages.last().map(Message::text).ok_or_else(|| PluginError::InvalidInput("no messages".into()))
}

struct Once(Option<String>);

impl ChunkSource for Once {
    fn next_chunk(&mut self) -> Result<Option<CompletionChunk>, PluginError> {
        Ok(self.0.take().map(|delta| CompletionChunk {
            delta,
            tool_calls: vec![],
            finish_reason: Some(FinishReason::Stop),
            usage: None,
        }))
    }
}

impl Provider for Plugin {
    type Stream = Once;
    fn models() -> Result<Vec<ModelInfo>, PluginError> {
        Ok(vec![ModelInfo { id: "echo".into(), owned_by: "me".into() }])
    }
    fn complete(request: CompletionRequest) -> Result<Completion, PluginError> {
        let text = reply(&request)?;
        Ok(Completion {
            model: "echo".into(),
            text,
            tool_calls: vec![],
            finish_reason: FinishReason::Stop,
            usage: Usage { prompt_tokens: 0, completion_tokens: 0 },
        })
    }
    fn stream(request: CompletionRequest) -> Result<Once, PluginError> {
        Ok(Once(Some(reply(&request)?)))
    }
    fn embed(_: EmbeddingRequest) -> Result<Embeddings, PluginError> {
        Err(PluginError::InvalidInput("this provider has no embeddings".into()))
    }
}

qlayer_sdk::export_provider!(Plugin);
"#
        }
    }
}

/// Builds the plugin crate in `dir` and writes the component (manifest embedded) to `out`, or to
/// `<target>/qlayer/<name>-<version>.wasm`. Returns the path written.
pub fn build_plugin(dir: &Path, out: Option<&Path>) -> anyhow::Result<PathBuf> {
    let manifest_path = dir.join("qlayer-plugin.toml");
    let text = std::fs::read_to_string(&manifest_path).with_context(|| {
        format!("reading {} (every plugin needs one; `qlayer plugin new` writes it)", manifest_path.display())
    })?;
    let manifest = Manifest::from_toml(&text).with_context(|| format!("in {}", manifest_path.display()))?;

    let metadata = Command::new("cargo")
        .current_dir(dir)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("running `cargo metadata` (is cargo installed?)")?;
    if !metadata.status.success() {
        bail!("cargo metadata failed in {}: {}", dir.display(), String::from_utf8_lossy(&metadata.stderr).trim());
    }
    let metadata: serde_json::Value = serde_json::from_slice(&metadata.stdout)?;
    let target_dir =
        PathBuf::from(metadata["target_directory"].as_str().context("cargo metadata has no target_directory")?);
    let dir_abs = dir.canonicalize()?;
    let package = metadata["packages"]
        .as_array()
        .and_then(|ps| {
            ps.iter().find(|p| {
                p["manifest_path"].as_str().map(|m| Path::new(m).parent() == Some(dir_abs.as_path())).unwrap_or(false)
            })
        })
        .context("no Cargo package in that directory")?;
    let package_name = package["name"].as_str().context("package without a name")?;
    let lib_name = package["targets"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "cdylib"))))
        .and_then(|t| t["name"].as_str())
        .with_context(|| {
            format!("package `{package_name}` has no cdylib target; add `[lib] crate-type = [\"cdylib\"]`")
        })?
        .replace('-', "_");

    // Components target WASI p2; Extism modules are plain core modules with no WASI.
    let target = match manifest.format {
        qlayer_manifest::Format::Component => "wasm32-wasip2",
        qlayer_manifest::Format::Extism => "wasm32-unknown-unknown",
    };
    let status = Command::new("cargo")
        .current_dir(dir)
        .args(["build", "--release", "--target", target, "-p", package_name])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of `{package_name}` for {target} failed (see above)");
    }
    let raw = target_dir.join(target).join("release").join(format!("{lib_name}.wasm"));
    let wasm = std::fs::read(&raw).with_context(|| format!("reading the built component {}", raw.display()))?;
    let component = qlayer_manifest::embed(&wasm, &manifest)?;

    // Refuse to produce something the host would refuse.
    let runtime = Runtime::new(RuntimeConfig::default())?;
    runtime.load(&component).context("the built component does not load in the host")?;

    let out = match out {
        Some(p) => p.to_path_buf(),
        None => target_dir.join("qlayer").join(format!("{}-{}.wasm", manifest.name, manifest.version)),
    };
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&out, &component).with_context(|| format!("writing {}", out.display()))?;
    Ok(out)
}

/// What `qlayer plugin inspect` shows.
#[derive(Debug, Serialize)]
pub struct Inspection {
    /// The manifest.
    pub manifest: Manifest,
    /// The world of the declared kind.
    pub world: &'static str,
    /// `sha256:` of the file.
    pub digest: String,
    /// Size in bytes.
    pub size: usize,
    /// Why the host would refuse it; `None` when it loads.
    pub load_error: Option<String>,
    /// The component's imports.
    pub imports: Vec<String>,
    /// The component's exports.
    pub exports: Vec<String>,
}

/// Reads a component's manifest, imports and exports, and whether the host would load it.
pub fn inspect(path: &Path) -> anyhow::Result<Inspection> {
    let wasm = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let manifest = qlayer_manifest::extract(&wasm).with_context(|| format!("{}", path.display()))?;
    let runtime = Runtime::new(RuntimeConfig {
        policy: qlayer_runtime::HostPolicy { max_instances: 1, ..Default::default() },
        cache_dir: None,
        ..Default::default()
    })?;
    let (imports, exports) = runtime.interface(&wasm);
    let load_error = runtime.load(&wasm).err().map(|e| e.to_string());
    Ok(Inspection {
        world: match manifest.format {
            qlayer_manifest::Format::Extism => "extism tool (exports `invoke`)",
            qlayer_manifest::Format::Component => manifest.kind.world(),
        },
        manifest,
        digest: format!("sha256:{}", hex::encode(Sha256::digest(&wasm))),
        size: wasm.len(),
        load_error,
        imports,
        exports,
    })
}
