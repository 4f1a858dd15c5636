//! The marketplace through the command line: `qlayer plugin push/search/info/install/list/call/remove`
//! against a real registry (Debian's `docker-registry`, started per test on a free loopback port).

use qlayer_tests::{TestRegistry, marketplace_plugin};
use std::path::Path;

/// `qlayer plugin keygen PREFIX`: the private and public key files.
fn keygen(prefix: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qlayer"))
        .args(["plugin", "keygen"])
        .arg(prefix)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (prefix.with_extension("key"), prefix.with_extension("pub"))
}

fn cli(args: &[&str], data: &Path, registry: &TestRegistry) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qlayer"))
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .args(["--insecure-registry", &registry.addr])
        .env_remove("QLAYER_SIGNATURE_POLICY")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_publishes_searches_installs_calls_and_removes() {
    let registry = TestRegistry::start();
    let data = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let d = data.path();
    let stats_file = keys.path().join("text-stats.wasm");
    std::fs::write(&stats_file, marketplace_plugin("text-stats")).unwrap();
    let stats = format!("{}/tools/text-stats:1.0.0", registry.addr);
    let scripted = format!("{}/first-party/scripted:0.1.0", registry.addr);
    let prefix = keys.path().join("alice");

    let (key, public) = keygen(&prefix);

    let (ok, stdout, stderr) = cli(&["plugin", "push", stats_file.to_str().unwrap(), &stats], d, &registry);
    assert!(ok && stdout.contains("pushed"), "{stdout}{stderr}");
    let (ok, stdout, stderr) =
        cli(&["plugin", "push", "bundled:scripted", &scripted, "--sign", key.to_str().unwrap()], d, &registry);
    assert!(ok && stdout.contains("(signed)"), "{stdout}{stderr}");

    let (ok, stdout, _) = cli(&["plugin", "search", &registry.addr], d, &registry);
    assert!(ok && stdout.contains("text-stats 1.0.0") && stdout.contains("scripted 0.1.0"), "{stdout}");
    let (ok, stdout, _) = cli(&["plugin", "info", &stats], d, &registry);
    assert!(ok && stdout.contains("signature: not signed"), "{stdout}");

    let (ok, stdout, stderr) = cli(&["plugin", "install", &stats, "--tenant", "acme"], d, &registry);
    assert!(ok && stdout.contains("installed text-stats 1.0.0 for tenant `acme`"), "{stdout}{stderr}");
    assert!(stderr.contains("warning") && stderr.contains("not signed"), "{stderr}");
    let (ok, stdout, _) = cli(&["plugin", "list", "--tenant", "acme"], d, &registry);
    assert!(ok && stdout.contains("text-stats 1.0.0"), "{stdout}");
    let (ok, stdout, stderr) =
        cli(&["plugin", "call", "text-stats", r#"{"text":"two words"}"#, "--tenant", "acme"], d, &registry);
    assert!(ok && stdout.contains("\"words\":2"), "{stdout}{stderr}");
    let (ok, _, stderr) = cli(&["plugin", "call", "text-stats", "{}", "--tenant", "globex"], d, &registry);
    assert!(!ok && stderr.contains("not installed for tenant `globex`"), "{stderr}");
    // The call is a job through the scheduler: an input that breaks the tool's schema is
    // refused naming the field, before the plugin runs.
    let (ok, _, stderr) = cli(&["plugin", "call", "text-stats", r#"{"txt":"typo"}"#, "--tenant", "acme"], d, &registry);
    assert!(!ok && stderr.contains("'txt' was unexpected") && stderr.contains("\"text\" is a required"), "{stderr}");

    let (ok, stdout, stderr) = cli(
        &[
            "plugin",
            "install",
            &scripted,
            "--tenant",
            "acme",
            "--signature-policy",
            "require",
            "--trusted-key",
            public.to_str().unwrap(),
        ],
        d,
        &registry,
    );
    assert!(ok && stdout.contains("signed by trusted key `alice`"), "{stdout}{stderr}");
    let (ok, _, stderr) = cli(&["plugin", "call", "scripted", "{}", "--tenant", "acme"], d, &registry);
    assert!(!ok && stderr.contains("is a provider plugin; `qlayer plugin call` invokes tool plugins"), "{stderr}");
    // The flagship job runs on the provider installed from the registry.
    let out_dir = keys.path().join("project");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_qlayer"))
        .args(["run", "A todo list CLI", "--provider", "installed:scripted", "--tenant", "acme", "--out"])
        .arg(&out_dir)
        .arg("--data-dir")
        .arg(d)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("provider: installed plugin `scripted` (tenant `acme`)"), "{stdout}");
    assert!(out_dir.join("qlayer-run.json").exists());
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_qlayer"))
        .args(["run", "x", "--provider", "installed:text-stats", "--tenant", "acme", "--out"])
        .arg(keys.path().join("p2"))
        .arg("--data-dir")
        .arg(d)
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("is a tool plugin, not a provider"));

    let (ok, _, stderr) =
        cli(&["plugin", "install", &stats, "--tenant", "strict", "--signature-policy", "require"], d, &registry);
    assert!(!ok && stderr.contains("not signed"), "{stderr}");
    let (ok, _, stderr) = cli(&["plugin", "install", &stats, "--tenant", "x", "--grant", "bogus"], d, &registry);
    assert!(!ok && stderr.contains("--grant `bogus`"), "{stderr}");

    let (ok, stdout, _) = cli(&["plugin", "remove", "text-stats", "--tenant", "acme"], d, &registry);
    assert!(ok && stdout.contains("removed text-stats"), "{stdout}");
    let (ok, stdout, _) = cli(&["plugin", "list", "--tenant", "acme"], d, &registry);
    assert!(ok && !stdout.contains("text-stats") && stdout.contains("scripted"), "{stdout}");
}

/// `qlayer models set/list/remove` and `qlayer usage` on the service's database: a file's
/// entries are checked (each deployment an installed provider) before any is written, and usage
/// sums print per group.
#[test]
fn qlayer_models_and_usage_manage_a_tenants_gateway_table() {
    let registry = TestRegistry::start();
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let db = rt.block_on(qlayer_db::Db::open_sqlite(&d.join("qlayer.db"))).unwrap();
    let tenant = rt.block_on(db.create_tenant("acme")).unwrap();
    let scripted = format!("{}/first-party/scripted:0.1.0", registry.addr);
    let stats_file = d.join("text-stats.wasm");
    std::fs::write(&stats_file, marketplace_plugin("text-stats")).unwrap();
    let stats = format!("{}/tools/text-stats:1.0.0", registry.addr);
    for args in [
        vec!["plugin", "push", "bundled:scripted", scripted.as_str()],
        vec!["plugin", "push", stats_file.to_str().unwrap(), stats.as_str()],
        vec!["plugin", "install", scripted.as_str(), "--tenant", "acme"],
        vec!["plugin", "install", stats.as_str(), "--tenant", "acme"],
    ] {
        let (ok, stdout, stderr) = cli(&args, d, &registry);
        assert!(ok, "{args:?}: {stdout}{stderr}");
    }
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_qlayer"))
            .args(args)
            .arg("--data-dir")
            .arg(d)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let file = d.join("models.toml");
    std::fs::write(&file, "[models.chat]\nstrategy = \"cost\"\ndeployments = [{ plugin = \"scripted\", input_price = 0.5 }]\n\n[models.tool]\ndeployments = [{ plugin = \"text-stats\" }]\n").unwrap();
    let (ok, _, stderr) = run(&["models", "set", file.to_str().unwrap(), "--tenant", "acme"]);
    assert!(
        !ok && stderr.contains("models.tool.deployments[0]: plugin `text-stats` is a tool plugin, not a provider"),
        "{stderr}"
    );
    assert!(rt.block_on(db.models(&tenant.id)).unwrap().is_empty(), "nothing is written when one entry is bad");
    std::fs::write(
        &file,
        "[models.chat]\nstrategy = \"cost\"\ndeployments = [{ plugin = \"scripted\", input_price = 0.5 }]\n",
    )
    .unwrap();
    let (ok, _, stderr) = run(&["models", "set", file.to_str().unwrap(), "--tenant", "acme"]);
    assert!(ok && stderr.contains("model `chat` set"), "{stderr}");
    let (ok, stdout, _) = run(&["models", "list", "--tenant", "acme"]);
    assert!(ok && stdout.contains("chat\tcost\tscripted/"), "{stdout}");
    std::fs::write(&file, "[models.bad]\ndeployments = [{ plugin = \"nope\" }]\n").unwrap();
    let (ok, _, stderr) = run(&["models", "set", file.to_str().unwrap(), "--tenant", "acme"]);
    assert!(!ok && stderr.contains("no plugin `nope` is installed for `acme`"), "{stderr}");
    rt.block_on(db.record_usage(&[qlayer_db::UsageRecord {
        tenant_id: tenant.id.clone(),
        key_id: "key_1".into(),
        endpoint: "chat".into(),
        model: "chat".into(),
        deployment: "scripted/".into(),
        prompt_tokens: 1_000,
        completion_tokens: 10,
        cost_nanos: 500_000,
        latency_us: 5,
        ttft_us: None,
        cache: "off".into(),
        status: "ok".into(),
        at: 1,
    }]))
    .unwrap();
    let (ok, stdout, stderr) = run(&["usage", "--tenant", "acme", "--group-by", "model"]);
    assert!(ok && stdout.contains("chat\t1\t0\t0\t1000\t10\t0.000500000"), "{stdout}{stderr}");
    let (ok, _, stderr) = run(&["usage", "--tenant", "acme", "--group-by", "week"]);
    assert!(!ok && stderr.contains("--group-by `week`"), "{stderr}");
    let (ok, _, stderr) = run(&["models", "remove", "chat", "--tenant", "acme"]);
    assert!(ok && stderr.contains("removed"), "{stderr}");
    let (ok, _, stderr) = run(&["models", "remove", "chat", "--tenant", "acme"]);
    assert!(!ok && stderr.contains("has no model `chat`"), "{stderr}");
}

/// The official Python SDK (`mcp` from PyPI) starts `qlayer mcp` as a stdio server, lists the
/// tenant's tools and calls one; another tenant's tool is unknown to it.
const STDIO_CLIENT: &str = r#"
import asyncio, json, sys
from mcp import Client, StdioServerParameters

async def main(command, mode, *args):
    params = StdioServerParameters(command=command, args=list(args))
    async with Client(params, mode=mode) as client:
        tools = await client.list_tools()
        ok = await client.call_tool("text-stats", {"text": "one two two"})
        try:
            await client.call_tool("url-check", {"url": "https://example.com/"})
            other = "called"
        except Exception as e:
            other = str(e)
        print(json.dumps({"tools": [t.name for t in tools.tools], "text": ok.content[0].text, "other": other}))

asyncio.run(main(*sys.argv[1:]))
"#;

#[test]
fn qlayer_mcp_serves_a_tenants_tools_over_stdio_to_the_python_sdk() {
    let python = qlayer_tests::python_tool("python", &["mcp==2.3.0"]);
    let registry = TestRegistry::start();
    let data = tempfile::tempdir().unwrap();
    let d = data.path();
    let file = d.join("text-stats.wasm");
    std::fs::write(&file, marketplace_plugin("text-stats")).unwrap();
    let stats = format!("{}/tools/text-stats:1.0.0", registry.addr);
    let (ok, out, err) = cli(&["plugin", "push", file.to_str().unwrap(), &stats], d, &registry);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = cli(&["plugin", "install", &stats, "--tenant", "acme"], d, &registry);
    assert!(ok, "{out}{err}");
    // Another tenant's tool, which acme's server must not offer.
    let check = d.join("url-check.wasm");
    std::fs::write(&check, marketplace_plugin("url-check")).unwrap();
    let url_check = format!("{}/tools/url-check:1.0.0", registry.addr);
    let (ok, out, err) = cli(&["plugin", "push", check.to_str().unwrap(), &url_check], d, &registry);
    assert!(ok, "{out}{err}");
    let (ok, out, err) =
        cli(&["plugin", "install", &url_check, "--tenant", "globex", "--grant", "host:example.com"], d, &registry);
    assert!(ok, "{out}{err}");

    let script = d.join("client.py");
    std::fs::write(&script, STDIO_CLIENT).unwrap();
    for mode in ["legacy", "auto"] {
        let out = std::process::Command::new(&python)
            .arg(&script)
            .args([env!("CARGO_BIN_EXE_qlayer"), mode, "mcp", "--tenant", "acme", "--data-dir"])
            .arg(d)
            .args(["--insecure-registry", &registry.addr])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{mode}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        let got: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(got["tools"], serde_json::json!(["text-stats"]), "{mode}: {got}");
        assert!(got["text"].as_str().unwrap().contains("\"words\":3"), "{mode}: {got}");
        assert!(got["other"].as_str().unwrap().contains("unknown tool `url-check`"), "{mode}: {got}");
    }
}

/// `qlayer run --push REF --sign KEY` publishes the run's capsule (the files as a tar.gz layer, the
/// report as the config); `qlayer capsule pull` verifies digest and signature and writes the same
/// files. A capsule whose blob was altered in the registry, one signed by no trusted key, and a
/// plugin pulled as a capsule are refused, and nothing is written.
#[test]
fn a_run_pushes_its_capsule_and_pull_verifies_and_unpacks_it() {
    let registry = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let prefix = tmp.path().join("alice");
    let (key, public) = keygen(&prefix);
    let capsule = format!("{}/capsules/todo:1", registry.addr);
    let built = tmp.path().join("built");

    // A bad reference or key is refused before anything runs (nothing is written).
    let refused_run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_qlayer"))
            .args(["run", "a todo list CLI", "--out"])
            .arg(&built)
            .args(extra)
            .env("QLAYER_DATA_DIR", &data)
            .output()
            .unwrap();
        assert!(!built.exists(), "nothing ran");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, stderr) = refused_run(&["--push", "not a ref!"]);
    assert!(code == Some(1) && stderr.contains("--push") && stderr.contains("not a valid OCI reference"), "{stderr}");
    let pinned = format!("{}/capsules/todo@sha256:{}", registry.addr, "a".repeat(64));
    let (code, stderr) = refused_run(&["--push", &pinned]);
    assert!(code == Some(1) && stderr.contains("give a tag and no digest"), "{stderr}");
    let (code, stderr) = refused_run(&["--push", &capsule, "--sign", "/nonexistent.key"]);
    assert!(code == Some(1) && stderr.contains("--sign"), "{stderr}");
    let (ok, _, stderr) =
        cli(&["capsule", "pull", "not a ref!", "--out", tmp.path().join("x").to_str().unwrap()], &data, &registry);
    assert!(!ok && stderr.contains("not a valid OCI reference"), "{stderr}");

    let run = std::process::Command::new(env!("CARGO_BIN_EXE_qlayer"))
        .args(["run", "a todo list CLI", "--approve-all", "--out"])
        .arg(&built)
        .args(["--push", &capsule, "--sign", key.to_str().unwrap(), "--insecure-registry", &registry.addr])
        .env("QLAYER_DATA_DIR", &data)
        .env_remove("QLAYER_BASE_URL")
        .env_remove("QLAYER_PROVIDER")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}{}", String::from_utf8_lossy(&run.stderr));
    assert!(
        stdout.contains(&format!("pushed the capsule to {capsule}@sha256:")) && stdout.contains("(signed)"),
        "{stdout}"
    );

    let pull = |out: &Path, extra: &[&str]| {
        let mut args = vec!["capsule", "pull", capsule.as_str(), "--out", out.to_str().unwrap()];
        args.extend(extra);
        cli(&args, &data, &registry)
    };
    let trusted = ["--signature-policy", "require", "--trusted-key", public.to_str().unwrap()];
    let pulled = tmp.path().join("pulled");
    let (ok, stdout, stderr) = pull(&pulled, &trusted);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("signed by trusted key") && stdout.contains("passed:"), "{stdout}");
    // The same files, and the same report.
    let listing = |dir: &Path| {
        let mut files = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    files.push((p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap()));
                }
            }
        }
        files.sort();
        files
    };
    let built_files = listing(&built);
    assert!(built_files.len() > 5, "{built_files:?}");
    assert_eq!(listing(&pulled), built_files);

    // Another publisher's key only: refused under `require`, nothing written.
    let (_, stranger_public) = keygen(&tmp.path().join("mallory"));
    let strange = ["--signature-policy", "require", "--trusted-key", stranger_public.to_str().unwrap()];
    let refused = tmp.path().join("refused");
    let (ok, _, stderr) = pull(&refused, &strange);
    assert!(!ok && stderr.contains("refused the capsule") && stderr.contains("none of its 1 signature"), "{stderr}");
    assert_eq!(std::fs::read_dir(&refused).map(|d| d.count()).unwrap_or(0), 0);

    // A plugin is not a capsule.
    let plugin = format!("{}/tools/text-stats:1.0.0", registry.addr);
    let wasm = tmp.path().join("text-stats.wasm");
    std::fs::write(&wasm, marketplace_plugin("text-stats")).unwrap();
    assert!(cli(&["plugin", "push", wasm.to_str().unwrap(), &plugin], &data, &registry).0);
    let (ok, _, stderr) =
        cli(&["capsule", "pull", &plugin, "--out", tmp.path().join("p").to_str().unwrap()], &data, &registry);
    assert!(!ok && stderr.contains("is not a run capsule") && stderr.contains("config media type"), "{stderr}");

    // The files' blob altered in the registry: its digest no longer matches, nothing is written.
    let manifest = capsule_manifest(&registry, "capsules/todo", "1");
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().to_string();
    assert_eq!(manifest["layers"][0]["mediaType"], "application/vnd.quantumlayer.capsule.layer.v1.tar+gzip");
    assert_eq!(manifest["config"]["mediaType"], "application/vnd.quantumlayer.capsule.config.v1+json");
    assert_eq!(manifest["annotations"]["dev.quantumlayer.capsule.status"], "passed");
    let path = registry.blob_path(&layer);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let tampered = tmp.path().join("tampered");
    let (ok, _, stderr) = pull(&tampered, &trusted);
    assert!(!ok && stderr.contains("does not match its digest"), "{stderr}");
    assert_eq!(std::fs::read_dir(&tampered).map(|d| d.count()).unwrap_or(0), 0);
}

/// The OCI manifest at `repository:tag`, read over the distribution API.
fn capsule_manifest(registry: &TestRegistry, repository: &str, tag: &str) -> serde_json::Value {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(&registry.addr).unwrap();
    write!(
        stream,
        "GET /v2/{repository}/manifests/{tag} HTTP/1.0\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let body = response.split("\r\n\r\n").nth(1).unwrap();
    serde_json::from_str(body).unwrap()
}
