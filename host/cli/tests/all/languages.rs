//! Plugins from other component languages, as an author makes them: `qlayer plugin new --lang
//! python|js`, `qlayer plugin build` (componentize-py from PyPI, componentize-js from npm),
//! `qlayer plugin pack`, then push to a real registry, install and run in the sandbox.

use qlayer_tests::{TestRegistry, npm_tool, python_tool};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A Python tool that tries what the sandbox denies: a TCP connection and a file read.
const PYTHON_PROBE: &str = r#"
import json, socket
from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import types

class Tool(exports.Tool):
    def invoke(self, input_json: str) -> str:
        try:
            data = json.loads(input_json)
        except ValueError as e:
            raise Err(types.PluginError_InvalidInput(f"input is not JSON: {e}"))
        if data.get("connect"):
            host, port = data["connect"].rsplit(":", 1)
            try:
                socket.create_connection((host, int(port)), timeout=2)
                return "connected"
            except Exception as e:
                return f"socket refused: {type(e).__name__}: {e}"
        if data.get("read"):
            try:
                with open(data["read"]) as f:
                    return "read: " + f.read(100)
            except Exception as e:
                return f"read refused: {type(e).__name__}: {e}"
        return json.dumps({"python echo": data})
"#;

struct Author {
    tmp: tempfile::TempDir,
    data: PathBuf,
    registry: TestRegistry,
    path: std::ffi::OsString,
}

impl Author {
    fn new() -> Self {
        let componentize_py = python_tool("componentize-py", &["componentize-py==0.25.1"]);
        let componentize_js = npm_tool("componentize-js", "@bytecodealliance/componentize-js@0.23.0", None);
        let mut dirs =
            vec![componentize_py.parent().unwrap().to_path_buf(), componentize_js.parent().unwrap().to_path_buf()];
        dirs.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
        let tmp = tempfile::tempdir().unwrap();
        Author {
            data: tmp.path().join("data"),
            tmp,
            registry: TestRegistry::start(),
            path: std::env::join_paths(dirs).unwrap(),
        }
    }

    fn qlayer(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_qlayer"))
            .args(args)
            .env("PATH", &self.path)
            .env_remove("QLAYER_SIGNATURE_POLICY")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn market(&self, args: &[&str]) -> (bool, String, String) {
        let data = self.data.to_str().unwrap();
        let mut all = args.to_vec();
        all.extend(["--data-dir", data, "--insecure-registry", &self.registry.addr]);
        self.qlayer(&all)
    }

    /// `plugin new` then `plugin build`; returns the project and the built plugin.
    fn scaffold_and_build(&self, kind: &str, name: &str, lang: &str, app: Option<(&str, &str)>) -> (PathBuf, PathBuf) {
        let dir = self.tmp.path().join(name);
        let (ok, out, err) =
            self.qlayer(&["plugin", "new", kind, name, "--lang", lang, "--dir", dir.to_str().unwrap()]);
        assert!(ok, "{out}{err}");
        if let Some((file, text)) = app {
            std::fs::write(dir.join(file), text).unwrap();
        }
        let (ok, out, err) = self.qlayer(&["plugin", "build", dir.to_str().unwrap()]);
        assert!(ok && out.contains("built"), "{out}{err}");
        let built = dir.join("target/qlayer").join(format!("{name}-0.1.0.wasm"));
        assert!(built.is_file(), "{out}");
        (dir, built)
    }

    fn publish_and_install(&self, built: &Path, name: &str) {
        let reference = format!("{}/plugins/{name}:0.1.0", self.registry.addr);
        let (ok, out, err) = self.market(&["plugin", "push", built.to_str().unwrap(), &reference]);
        assert!(ok && out.contains("pushed"), "{out}{err}");
        let (ok, out, err) = self.market(&["plugin", "install", &reference, "--tenant", "acme"]);
        assert!(ok && out.contains(&format!("installed {name} 0.1.0")), "{out}{err}");
    }

    fn call(&self, name: &str, input: &str) -> (bool, String, String) {
        self.market(&["plugin", "call", name, input, "--tenant", "acme"])
    }
}

#[test]
fn python_and_javascript_plugins_scaffold_build_install_and_run_in_the_sandbox() {
    let author = Author::new();

    // A Python tool (componentize-py imports wasi:sockets and wasi:filesystem whatever the
    // program uses): it loads, and the sandbox refuses the socket and the file at call time.
    let (_, built) = author.scaffold_and_build("tool", "py-probe", "python", Some(("app.py", PYTHON_PROBE)));
    author.publish_and_install(&built, "py-probe");
    let (ok, out, err) = author.call("py-probe", r#"{"a": 1}"#);
    assert!(ok && out.contains(r#"{"python echo": {"a": 1}}"#), "{out}{err}");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (ok, out, err) = author.call("py-probe", &format!(r#"{{"connect": "{}"}}"#, listener.local_addr().unwrap()));
    assert!(ok && out.starts_with("socket refused"), "{out}{err}");
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "nothing connected to the listener");
    // A file that certainly exists on the host.
    let secret = author.tmp.path().join("host-secret.txt");
    std::fs::write(&secret, "the operator's secret").unwrap();
    let (ok, out, err) = author.call("py-probe", &format!(r#"{{"read": "{}"}}"#, secret.display()));
    assert!(ok && out.starts_with("read refused") && !out.contains("operator"), "{out}{err}");
    let (ok, out, err) = author.call("py-probe", "not json");
    assert!(!ok && err.contains("input is not JSON"), "{out}{err}");

    // The JavaScript tool exactly as scaffolded.
    let (_, built) = author.scaffold_and_build("tool", "js-echo", "js", None);
    author.publish_and_install(&built, "js-echo");
    let (ok, out, err) = author.call("js-echo", r#"{"b":[1,2]}"#);
    assert!(ok && out.contains(r#"{"echo":{"b":[1,2]}}"#), "{out}{err}");
    let (ok, out, err) = author.call("js-echo", "{oops");
    assert!(!ok && err.contains("input is not JSON"), "{out}{err}");

    // The Python validator exactly as scaffolded, run from its install.
    let (_, built) = author.scaffold_and_build("validator", "py-todos", "python", None);
    author.publish_and_install(&built, "py-todos");
    let diagnostics = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let config = qlayer_marketplace::MarketplaceConfig {
            insecure_registries: vec![author.registry.addr.clone()],
            ..Default::default()
        };
        let market = qlayer_marketplace::Marketplace::open_local(&author.data, config).await.unwrap();
        let runtime = qlayer_runtime::Runtime::new(Default::default()).unwrap();
        let installed = market.load(&runtime, "acme", "py-todos").await.unwrap();
        let artifacts = vec![
            qlayer_runtime::Artifact {
                path: "a.py".into(),
                media_type: "text/x-python".into(),
                content: "x = 1\n# é TODO: y\n".as_bytes().to_vec(),
            },
            qlayer_runtime::Artifact {
                path: "b.bin".into(),
                media_type: "application/octet-stream".into(),
                content: vec![0xff, 0xfe],
            },
        ];
        let mut validator = installed.validator("acme").await.unwrap();
        validator.validate(&artifacts).await.unwrap()
    });
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    assert_eq!(diagnostics[0].rule, "todo-marker");
    assert_eq!(diagnostics[0].path.as_deref(), Some("a.py"));
    assert_eq!(diagnostics[0].line, Some(2));
    // 0.3.0's column, in characters (`é` is two bytes).
    assert_eq!(diagnostics[0].column, Some(5));
}

#[test]
fn plugin_pack_embeds_and_replaces_a_manifest_and_refuses_what_the_host_would() {
    let author = Author::new();
    let (dir, _) = author.scaffold_and_build("tool", "packed", "python", None);
    // What componentize-py wrote, without a manifest: no plugin yet.
    let raw = dir.join("target/packed.component.wasm");
    let (ok, _, err) = author.qlayer(&["plugin", "inspect", raw.to_str().unwrap()]);
    assert!(!ok && err.contains("no plugin manifest"), "{err}");

    let manifest = dir.join("qlayer-plugin.toml");
    let out = author.tmp.path().join("packed.wasm");
    let (ok, stdout, err) = author.qlayer(&[
        "plugin",
        "pack",
        raw.to_str().unwrap(),
        "--manifest",
        manifest.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok && stdout.contains("tool plugin `packed` 0.1.0"), "{stdout}{err}");
    let (ok, stdout, err) = author.qlayer(&["plugin", "inspect", out.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(info["load_error"].is_null(), "{info}");
    let imports = info["imports"].to_string();
    assert!(imports.contains("wasi:sockets/"), "componentize-py imports sockets: {imports}");

    // Packing a plugin again replaces its manifest: one manifest, the new one.
    let text = std::fs::read_to_string(&manifest).unwrap();
    let bumped = author.tmp.path().join("bumped.toml");
    std::fs::write(&bumped, text.replace("version = \"0.1.0\"", "version = \"0.2.0\"")).unwrap();
    let (ok, stdout, err) =
        author.qlayer(&["plugin", "pack", out.to_str().unwrap(), "--manifest", bumped.to_str().unwrap()]);
    assert!(ok, "{stdout}{err}");
    let repacked = author.tmp.path().join("packed-0.2.0.wasm");
    let (ok, stdout, err) = author.qlayer(&["plugin", "inspect", repacked.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["manifest"]["version"], "0.2.0");

    // A manifest of another kind: refused, naming what the component lacks; nothing written.
    let wrong = author.tmp.path().join("wrong.toml");
    std::fs::write(&wrong, "name = \"packed\"\nversion = \"0.1.0\"\nkind = \"validator\"\ndescription = \"d\"\n")
        .unwrap();
    let nothing = author.tmp.path().join("nothing.wasm");
    let (ok, _, err) = author.qlayer(&[
        "plugin",
        "pack",
        raw.to_str().unwrap(),
        "--manifest",
        wrong.to_str().unwrap(),
        "--out",
        nothing.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("quantumlayer:plugin/validator"), "{err}");
    assert!(!nothing.exists());
    // A broken manifest and a file that is not WebAssembly name what is wrong.
    std::fs::write(&wrong, text.replace("name = ", "nmae = ")).unwrap();
    let (ok, _, err) = author.qlayer(&["plugin", "pack", raw.to_str().unwrap(), "--manifest", wrong.to_str().unwrap()]);
    assert!(!ok && err.contains("nmae"), "{err}");
    let (ok, _, err) =
        author.qlayer(&["plugin", "pack", manifest.to_str().unwrap(), "--manifest", manifest.to_str().unwrap()]);
    assert!(!ok && err.contains("not a WebAssembly binary"), "{err}");
}

#[test]
fn the_python_and_javascript_provider_and_validator_templates_run_in_the_host() {
    let author = Author::new();
    let runtime = qlayer_runtime::Runtime::new(Default::default()).unwrap();
    let tokio = tokio::runtime::Runtime::new().unwrap();
    for lang in ["python", "js"] {
        // A provider: models, a whole completion and a stream (the exported resource).
        let (_, built) = author.scaffold_and_build("provider", &format!("echo-{lang}"), lang, None);
        let installed = runtime.load(&std::fs::read(&built).unwrap()).unwrap().install(Default::default()).unwrap();
        let request = qlayer_runtime::CompletionRequest::new(
            "",
            vec![qlayer_runtime::Message::new(qlayer_runtime::Role::User, "hello there")],
        );
        let (models, text, streamed) = tokio.block_on(async {
            let mut provider = installed.provider("t").await.unwrap();
            let models = provider.models().await.unwrap();
            let text = provider.complete(&request).await.unwrap().text;
            let mut stream = provider.stream(&request).await.unwrap();
            let mut streamed = String::new();
            while let Some(chunk) = stream.next().await.unwrap() {
                streamed.push_str(&chunk.delta);
            }
            (models, text, streamed)
        });
        assert_eq!(models[0].id, "echo", "{lang}");
        assert_eq!(text, "hello there", "{lang}");
        assert_eq!(streamed, "hello there", "{lang}");

        // A validator (the JavaScript runtime imports wasi:http, linked as stubs for a kind
        // without network).
        let (_, built) = author.scaffold_and_build("validator", &format!("todos-{lang}"), lang, None);
        let installed = runtime.load(&std::fs::read(&built).unwrap()).unwrap().install(Default::default()).unwrap();
        let artifacts = vec![qlayer_runtime::Artifact {
            path: "x.js".into(),
            media_type: "text/javascript".into(),
            content: "a();\n\n// ü TODO later\n".as_bytes().to_vec(),
        }];
        let found =
            tokio.block_on(async { installed.validator("t").await.unwrap().validate(&artifacts).await.unwrap() });
        assert_eq!(found.len(), 1, "{lang}: {found:?}");
        assert_eq!(
            (found[0].line, found[0].column, found[0].rule.as_str()),
            (Some(3), Some(6), "todo-marker"),
            "{lang}"
        );
    }
}
