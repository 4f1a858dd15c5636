//! Plugin authoring: `qlayer plugin new` scaffolds a project (Rust, Python or JavaScript) that
//! builds as is, `qlayer plugin build` compiles it to a component with its manifest embedded (and
//! checks that the host loads it), `qlayer plugin pack` does the same for a component any
//! toolchain built, `qlayer plugin inspect` shows what a component is and asks for.

use anyhow::{Context as _, bail};
use qlayer_runtime::{Kind, Manifest, Runtime, RuntimeConfig};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The toolchain file of this workspace, copied into scaffolded crates so they build with the
/// same compiler and the wasm32-wasip2 target.
const TOOLCHAIN: &str = include_str!("../../../rust-toolchain.toml");

/// The contract the Python and JavaScript scaffolds build against (their `wit/plugin.wit`), and the
/// 0.2.0 it uses (their `wit/deps/plugin-0.2.0/plugin.wit`).
const CONTRACT: &str = include_str!("../../../wit/plugin.wit");
const CONTRACT_0_2: &str = include_str!("../../../wit/deps/plugin-0.2.0/plugin.wit");

/// Writes the contract into the scaffold's `wit/`, the layout componentize-py and jco read.
fn write_contract(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("wit/deps/plugin-0.2.0"))?;
    write(dir, "wit/plugin.wit", CONTRACT)?;
    write(dir, "wit/deps/plugin-0.2.0/plugin.wit", CONTRACT_0_2)
}

/// The language of a scaffolded plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// A crate on the qlayer SDK, built with cargo for wasm32-wasip2.
    Rust,
    /// `app.py`, built with componentize-py (PyPI).
    Python,
    /// `app.js`, built with componentize-js (npm, the engine behind `jco componentize`).
    Js,
}

impl Lang {
    /// How the CLI names it.
    pub fn name(self) -> &'static str {
        match self {
            Lang::Rust => "Rust",
            Lang::Python => "Python",
            Lang::Js => "JavaScript",
        }
    }
}

/// The componentize-py release the Python scaffold is written for and its README installs.
pub const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";
/// The npm packages the JavaScript scaffold pins.
const COMPONENTIZE_JS_VERSION: &str = "0.23.0";
const JCO_VERSION: &str = "1.35.0";

/// Creates a new plugin project of `kind` named `name` in `dir`, in `lang`; `sdk` is the Rust
/// SDK crate a Rust plugin depends on.
pub fn new_plugin(kind: Kind, name: &str, dir: &Path, lang: Lang, sdk: &Path) -> anyhow::Result<()> {
    // The manifest's rules decide what a valid name is.
    let manifest = Manifest {
        name: name.to_string(),
        version: "0.1.0".into(),
        kind,
        format: Default::default(),
        description: format!("A {kind} plugin."),
        capabilities: Default::default(),
        limits: Default::default(),
        tool: None,
    };
    manifest.validate()?;
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!("{} already exists and is not empty", dir.display());
    }
    if lang == Lang::Rust && !sdk.join("Cargo.toml").is_file() {
        bail!("no qlayer-sdk at {} (pass --sdk with the path to the SDK crate)", sdk.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Interpreted runtimes are larger and slower to start than a Rust component.
    let limits = match (kind, lang) {
        (Kind::Agent, _) => "memory-mb = 128\ntimeout-ms = 120000",
        (_, Lang::Rust) => "memory-mb = 32\ntimeout-ms = 10000",
        (_, Lang::Python | Lang::Js) => "memory-mb = 128\ntimeout-ms = 10000",
    };
    let capabilities = match kind {
        Kind::Provider => {
            "# outbound-hosts = [\"api.example.com\"]\n# config = [\"base_url\"]\n# secrets = [\"api_key\"]"
        }
        Kind::Tool => "# outbound-hosts = [\"api.example.com\"]\n# config = [\"some_key\"]",
        _ => "# config = [\"some_key\"]",
    };
    let tool = match kind {
        Kind::Tool => {
            "\n# What agents and MCP clients are told. The host checks every call's input against the\n\
             # JSON Schema before the plugin runs, and refuses what does not match, naming the field.\n\
             [tool]\n\
             description = \"Echoes its input back as {\\\"echo\\\": input}.\"\n\
             [tool.input-schema]\n\
             type = \"object\"\n\
             # required = [\"text\"]\n\
             # properties.text = { type = \"string\", description = \"What to echo.\" }\n"
        }
        _ => "",
    };
    let plugin_toml = format!(
        "name = \"{name}\"\nversion = \"0.1.0\"\nkind = \"{kind}\"\ndescription = \"A {kind} plugin.\"\n\n[capabilities]\n{capabilities}\n\n[limits]\n{limits}\n{tool}"
    );
    Manifest::from_toml(&plugin_toml)?;
    write(dir, "qlayer-plugin.toml", &plugin_toml)?;
    write(dir, "README.md", &readme(kind, name, lang))?;
    match lang {
        Lang::Rust => {
            std::fs::create_dir_all(dir.join("src"))?;
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
            write(dir, "Cargo.toml", &cargo)?;
            write(dir, "rust-toolchain.toml", TOOLCHAIN)?;
            write(dir, ".gitignore", "/target\n")?;
            write(dir, "src/lib.rs", template(kind))?;
        }
        Lang::Python => {
            write_contract(dir)?;
            write(dir, "app.py", python_template(kind))?;
            write(dir, ".gitignore", "/target\n__pycache__/\n/wit_world/\n/componentize_py_*\n/poll_loop.py\n")?;
        }
        Lang::Js => {
            write_contract(dir)?;
            write(dir, "app.js", js_template(kind))?;
            let package = serde_json::json!({
                "name": name,
                "version": "0.1.0",
                "private": true,
                "type": "module",
                "description": format!("A {kind} plugin for QuantumLayer."),
                "scripts": { "build": "qlayer plugin build ." },
                "devDependencies": {
                    "@bytecodealliance/componentize-js": COMPONENTIZE_JS_VERSION,
                    "@bytecodealliance/jco": JCO_VERSION,
                },
            });
            write(dir, "package.json", &(serde_json::to_string_pretty(&package)? + "\n"))?;
            write(dir, ".gitignore", "/target\n/node_modules\n")?;
        }
    }
    Ok(())
}

fn python_template(kind: Kind) -> &'static str {
    match kind {
        Kind::Tool => include_str!("templates/python/tool.py"),
        Kind::Validator => include_str!("templates/python/validator.py"),
        Kind::Agent => include_str!("templates/python/agent.py"),
        Kind::Provider => include_str!("templates/python/provider.py"),
    }
}

fn js_template(kind: Kind) -> &'static str {
    match kind {
        Kind::Tool => include_str!("templates/js/tool.js"),
        Kind::Validator => include_str!("templates/js/validator.js"),
        Kind::Agent => include_str!("templates/js/agent.js"),
        Kind::Provider => include_str!("templates/js/provider.js"),
    }
}

/// The scaffold's README: how to build, inspect and try the plugin locally.
fn readme(kind: Kind, name: &str, lang: Lang) -> String {
    let world = kind.world();
    let (source, setup, edit) = match lang {
        Lang::Rust => (
            "src/lib.rs",
            "The Rust toolchain `rust-toolchain.toml` names, with the `wasm32-wasip2` target \
             (`rustup toolchain install` installs both).",
            "The SDK (`qlayer-sdk`) has the contract's types and the `export_*!` macros.".to_string(),
        ),
        Lang::Python => (
            "app.py",
            "Python 3.10 or later and componentize-py: `pip install componentize-py==0.25.1` (in a \
             virtual environment `.venv` here, or anywhere on `PATH`).",
            format!(
                "For your editor, `componentize-py -d wit -w {world} bindings .` writes the generated \
                 types (`wit_world`). Errors of the contract's `plugin-error` variant are raised as \
                 `componentize_py_types.Err(types.PluginError_InvalidInput(\"...\"))`."
            ),
        ),
        Lang::Js => (
            "app.js",
            "Node.js 18 or later; `qlayer plugin build` runs `npm install` here the first time \
             (componentize-js and jco, pinned in package.json).",
            "Records are objects with camelCase fields, variants `{ tag, val }`, enums strings; \
             throw `{ tag: \"invalid-input\", val: \"...\" }` to return a `plugin-error`."
                .to_string(),
        ),
    };
    let try_it = match kind {
        Kind::Tool => format!(
            "qlayer plugin install localhost:5000/plugins/{name}:0.1.0 --insecure-registry localhost:5000\n\
             qlayer plugin call {name} '{{\"hello\": \"world\"}}'"
        ),
        _ => format!(
            "qlayer plugin install localhost:5000/plugins/{name}:0.1.0 --insecure-registry localhost:5000\n\
             qlayer plugin list   # then name it in a pipeline, or in the tenant's model table for a provider"
        ),
    };
    format!(
        "# {name}\n\n\
         A QuantumLayer `{kind}` plugin (world `{world}` of `quantumlayer:plugin@0.3.0`, in \
         `wit/plugin.wit`, which uses 0.2.0 in `wit/deps/`).\n\n\
         ## Build\n\n\
         Needs: {setup}\n\n\
         ```sh\n\
         qlayer plugin build .          # builds the component, embeds qlayer-plugin.toml, checks the host loads it\n\
         qlayer plugin inspect target/qlayer/{name}-0.1.0.wasm   # what it imports, exports and asks for\n\
         ```\n\n\
         The code is in `{source}`. {edit}\n\n\
         The manifest, `qlayer-plugin.toml`, says what the plugin asks for (outbound hosts, \
         configuration keys, secrets) and its limits; nothing is granted by asking. In the \
         sandbox the plugin has no files, no environment and no sockets: a file read or a socket \
         fails with an error, and HTTP reaches only the hosts its install grants.\n\n\
         ## Try it locally\n\n\
         Run an OCI registry on localhost:5000 (Debian's `docker-registry`, or \
         `docker run -p 5000:5000 registry:2`), then:\n\n\
         ```sh\n\
         qlayer plugin push target/qlayer/{name}-0.1.0.wasm localhost:5000/plugins/{name}:0.1.0 --insecure-registry localhost:5000\n\
         {try_it}\n\
         ```\n\n\
         A component built some other way becomes a plugin with \
         `qlayer plugin pack COMPONENT --manifest qlayer-plugin.toml`.\n"
    )
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
                        column: line.find("TODO").map(|at| line[..at].chars().count() as u32 + 1),
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

/// Builds the plugin project in `dir` (a Rust crate, a Python `app.py` or a JavaScript `app.js`,
/// as `plugin new` writes them) and writes the component, manifest embedded, to `out`, or to
/// `<target>/qlayer/<name>-<version>.wasm`. Returns the path written.
pub fn build_plugin(dir: &Path, out: Option<&Path>) -> anyhow::Result<PathBuf> {
    let manifest_path = dir.join("qlayer-plugin.toml");
    let text = std::fs::read_to_string(&manifest_path).with_context(|| {
        format!("reading {} (every plugin needs one; `qlayer plugin new` writes it)", manifest_path.display())
    })?;
    let manifest = Manifest::from_toml(&text).with_context(|| format!("in {}", manifest_path.display()))?;
    let lang = if dir.join("Cargo.toml").is_file() {
        Lang::Rust
    } else if dir.join("app.py").is_file() {
        Lang::Python
    } else if dir.join("app.js").is_file() {
        Lang::Js
    } else {
        bail!(
            "{} has no Cargo.toml, app.py or app.js to build (a component built another way becomes a plugin with `qlayer plugin pack`)",
            dir.display()
        );
    };
    if lang != Lang::Rust && manifest.format != qlayer_manifest::Format::Component {
        bail!(
            "`format = \"{}\"` is for Rust tools built with extism-pdk; remove it from {}",
            manifest.format,
            manifest_path.display()
        );
    }
    let (wasm, target_dir) = match lang {
        Lang::Rust => build_rust(dir, &manifest)?,
        Lang::Python => (build_python(dir, &manifest)?, dir.join("target")),
        Lang::Js => (build_js(dir, &manifest)?, dir.join("target")),
    };
    let component = pack(&wasm, &manifest).context("the built component does not load in the host")?;
    let out = match out {
        Some(p) => p.to_path_buf(),
        None => target_dir.join("qlayer").join(format!("{}-{}.wasm", manifest.name, manifest.version)),
    };
    write_plugin(&out, &component)?;
    Ok(out)
}

/// A program the project installed for itself (`.venv/bin`, `node_modules/.bin`), else on `PATH`.
fn program(dir: &Path, local: &str, name: &str) -> PathBuf {
    let path = dir.join(local).join(name);
    if path.is_file() { path } else { PathBuf::from(name) }
}

/// `name` in a directory of `PATH`, if it is there.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

fn run_tool(mut command: Command, what: &str, install: &str) -> anyhow::Result<()> {
    let status = match command.status() {
        Ok(status) => status,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{what} is not installed ({install})")
        }
        Err(e) => return Err(e).with_context(|| format!("running {what}")),
    };
    if !status.success() {
        bail!("{what} failed ({status}; see above)");
    }
    Ok(())
}

/// componentize-py: `app.py` and `wit/` into a component of the kind's world.
fn build_python(dir: &Path, manifest: &Manifest) -> anyhow::Result<Vec<u8>> {
    let raw = dir.join("target").join(format!("{}.component.wasm", manifest.name));
    std::fs::create_dir_all(dir.join("target"))?;
    let mut command = Command::new(program(dir, ".venv/bin", "componentize-py"));
    command.current_dir(dir).args(["-d", "wit", "-w", manifest.kind.world(), "componentize", "app", "-o"]).arg(&raw);
    run_tool(command, "componentize-py", &format!("pip install {COMPONENTIZE_PY}"))?;
    std::fs::read(&raw).with_context(|| format!("reading {}", raw.display()))
}

/// componentize-js (what `jco componentize` runs): `app.js` and `wit/` into a component of the
/// kind's world. Runs `npm install` first when the project has no `node_modules`.
fn build_js(dir: &Path, manifest: &Manifest) -> anyhow::Result<Vec<u8>> {
    let local = dir.join("node_modules/.bin/componentize-js");
    let bin = match on_path("componentize-js") {
        Some(global) if !local.is_file() => global,
        _ => {
            if !local.is_file() && dir.join("package.json").is_file() {
                let mut npm = Command::new("npm");
                npm.current_dir(dir).args(["install", "--no-audit", "--no-fund", "--loglevel=error"]);
                run_tool(npm, "npm install", "install Node.js 18 or later with npm")?;
            }
            local
        }
    };
    let raw = dir.join("target").join(format!("{}.component.wasm", manifest.name));
    std::fs::create_dir_all(dir.join("target"))?;
    let mut command = Command::new(bin);
    command.current_dir(dir).args(["app.js", "--wit", "wit", "--world-name", manifest.kind.world(), "--out"]).arg(&raw);
    run_tool(
        command,
        "componentize-js",
        &format!("npm install @bytecodealliance/componentize-js@{COMPONENTIZE_JS_VERSION}"),
    )?;
    std::fs::read(&raw).with_context(|| format!("reading {}", raw.display()))
}

/// cargo: the crate in `dir` for wasm32-wasip2 (or wasm32-unknown-unknown for an Extism tool).
/// Returns the core module or component and cargo's target directory.
fn build_rust(dir: &Path, manifest: &Manifest) -> anyhow::Result<(Vec<u8>, PathBuf)> {
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
    Ok((wasm, target_dir))
}

/// Embeds `manifest` in `wasm` (replacing any manifest it carries) and checks that the host
/// loads the result: the component exports the world of the manifest's kind, imports nothing
/// it may not, and an Extism module is what its `format` says. `plugin pack` and `plugin build`
/// both write what this returns, so neither produces something the host would refuse.
pub fn pack(wasm: &[u8], manifest: &Manifest) -> anyhow::Result<Vec<u8>> {
    let plugin = qlayer_manifest::replace(wasm, manifest)?;
    checking_runtime()?.load(&plugin)?;
    Ok(plugin)
}

/// `qlayer plugin pack`: reads a component (or Extism module) built by any toolchain and a
/// manifest file, and writes the plugin to `out` (default: `<name>-<version>.wasm` beside the
/// component). Returns the path written.
pub fn pack_file(component: &Path, manifest_path: &Path, out: Option<&Path>) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string(manifest_path)
        .with_context(|| format!("reading the manifest {}", manifest_path.display()))?;
    let manifest = Manifest::from_toml(&text).with_context(|| format!("in {}", manifest_path.display()))?;
    let wasm = std::fs::read(component).with_context(|| format!("reading {}", component.display()))?;
    let plugin = pack(&wasm, &manifest).with_context(|| format!("packing {}", component.display()))?;
    let out = match out {
        Some(p) => p.to_path_buf(),
        None => {
            component.parent().unwrap_or(Path::new(".")).join(format!("{}-{}.wasm", manifest.name, manifest.version))
        }
    };
    write_plugin(&out, &plugin)?;
    Ok(out)
}

fn write_plugin(out: &Path, plugin: &[u8]) -> anyhow::Result<()> {
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(out, plugin).with_context(|| format!("writing {}", out.display()))
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
    let runtime = checking_runtime()?;
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

/// A runtime that only loads, to check what the host would say.
fn checking_runtime() -> anyhow::Result<Runtime> {
    Runtime::new(RuntimeConfig {
        policy: qlayer_runtime::HostPolicy { max_instances: 1, ..Default::default() },
        cache_dir: None,
        ..Default::default()
    })
}
