//! Plugins from other component languages, and tools over MCP, in one run:
//!
//! 1. The same echo tool scaffolded in Rust, Python (componentize-py) and JavaScript
//!    (componentize-js) by `qlayer plugin new` and built by `qlayer plugin build`: its size, the
//!    compile with an empty cache, the load from the compile cache (a restarted host), the first
//!    instance from the `InstancePre`, the first call, then the median of a new instance and of
//!    a warm call. The Rust one is the baseline.
//! 2. An MCP `tools/call` of the Rust echo tool over Streamable HTTP to a `qlayer serve` process
//!    (SQLite, the embedded default), at 1 in flight and at fixed rates in an open loop (16
//!    keep-alive connections, latency from each request's due time); the baseline is the same
//!    tool invoked in process on a warm instance in the same run.
//!
//! Run: `cargo bench -p qlayer --bench languages` (needs python3 with venv, node and npm, and
//! Debian's docker-registry, as the tests do).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod load;

use load::{exchange, open_loop, percentile};
use qlayer_runtime::{Grants, HostPolicy, Runtime, RuntimeConfig};
use std::path::Path;
use std::time::{Duration, Instant};

fn runtime(cache: &Path) -> Runtime {
    Runtime::new(RuntimeConfig {
        cache_dir: Some(cache.to_path_buf()),
        policy: HostPolicy { max_instances: 64, ..Default::default() },
        ..Default::default()
    })
    .unwrap()
}

/// Milliseconds with three decimals: these figures go down to microseconds.
fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

fn median(mut all: Vec<Duration>) -> Duration {
    all.sort();
    all[all.len() / 2]
}

/// `qlayer plugin new tool <name> --lang <lang>` then `plugin build`; returns the plugin.
fn scaffold(dir: &Path, lang: &str, path: &std::ffi::OsStr) -> Vec<u8> {
    let name = format!("echo-{lang}");
    let project = dir.join(&name);
    let run = |args: &[&str]| {
        let out = std::process::Command::new(load::qlayer_binary())
            .args(args)
            .env("PATH", path)
            .env("CARGO_TARGET_DIR", qlayer_bundled::bundled::PLUGIN_TARGET_DIR)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(&["plugin", "new", "tool", &name, "--lang", lang, "--dir", project.to_str().unwrap()]);
    let out = dir.join(format!("{name}.wasm"));
    run(&["plugin", "build", project.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    std::fs::read(out).unwrap()
}

struct Costs {
    size: usize,
    compile: Duration,
    cached_load: Duration,
    first_instance: Duration,
    first_call: Duration,
    instance: Duration,
    warm_call: Duration,
}

async fn costs(wasm: &[u8], dir: &Path) -> Costs {
    let cache = tempfile::tempdir_in(dir).unwrap();
    let started = Instant::now();
    runtime(cache.path()).load(wasm).unwrap();
    let compile = started.elapsed();
    // A restarted host: a new runtime on the same cache directory.
    let rt = runtime(cache.path());
    let started = Instant::now();
    let plugin = rt.load(wasm).unwrap();
    let cached_load = started.elapsed();
    let installed = plugin.install(Grants::default()).unwrap();
    let started = Instant::now();
    let mut tool = installed.any_tool("t").await.unwrap();
    let first_instance = started.elapsed();
    let started = Instant::now();
    assert!(tool.invoke(r#"{"a": 1}"#).await.unwrap().contains("echo"));
    let first_call = started.elapsed();
    let mut instances = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        let fresh = installed.any_tool("t").await.unwrap();
        instances.push(started.elapsed());
        drop(fresh);
    }
    let mut warm = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        tool.invoke(r#"{"a": 1}"#).await.unwrap();
        warm.push(started.elapsed());
    }
    Costs {
        size: wasm.len(),
        compile,
        cached_load,
        first_instance,
        first_call,
        instance: median(instances),
        warm_call: median(warm),
    }
}

fn mcp_request(addr: std::net::SocketAddr, key: &str, id: u64) -> String {
    let body = format!(
        r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"echo-rust","arguments":{{"a":1}}}}}}"#
    );
    format!(
        "POST /mcp HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\nMCP-Protocol-Version: 2025-11-25\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn main() {
    let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let componentize_py = qlayer_tests::python_tool("componentize-py", &["componentize-py==0.25.1"]);
    let componentize_js = qlayer_tests::npm_tool("componentize-js", "@bytecodealliance/componentize-js@0.23.0", None);
    let mut dirs =
        vec![componentize_py.parent().unwrap().to_path_buf(), componentize_js.parent().unwrap().to_path_buf()];
    dirs.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    let path = std::env::join_paths(dirs).unwrap();

    // 1. The same tool in three languages.
    let plugins: Vec<(&str, Vec<u8>)> =
        ["rust", "python", "js"].iter().map(|lang| (*lang, scaffold(dir.path(), lang, &path))).collect();
    println!("\n## The echo tool in three languages (ms; median of 20 instances and 200 warm calls)\n");
    println!(
        "| language | size | compile (empty cache) | load from cache | first instance | first call | new instance | warm call |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (lang, wasm) in &plugins {
        let c = tokio.block_on(costs(wasm, dir.path()));
        println!(
            "| {lang} | {:.1} MiB | {} | {} | {} | {} | {} | {} |",
            c.size as f64 / (1 << 20) as f64,
            ms(c.compile),
            ms(c.cached_load),
            ms(c.first_instance),
            ms(c.first_call),
            ms(c.instance),
            ms(c.warm_call)
        );
    }

    // 2. MCP tools/call over Streamable HTTP.
    let rust = &plugins[0].1;
    let registry = qlayer_tests::TestRegistry::start();
    qlayer_registry::install_tls_provider();
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("marketplace.toml"), format!("insecure-registries = [\"{}\"]\n", registry.addr))
        .unwrap();
    let (_server, port) = load::serve(data.path(), "[limits]\nrequests-per-second = 0\n");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let key = tokio.block_on(async {
        let base = format!("http://{addr}");
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let key = load::create_tenant(&client, &base, "bench").await;
        let reference = format!("{}/bench/echo-rust:0.1.0", registry.addr);
        load::push(&registry, data.path(), rust, &reference).await;
        let r = client
            .post(format!("{base}/v1/plugins"))
            .bearer_auth(&key)
            .json(&serde_json::json!({"reference": reference}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        key
    });

    // The baseline: the same tool called in this process as an MCP call calls it (a new
    // instance from the loaded plugin, the schema check, the call), without HTTP, the key, the
    // install lookup, admission, JSON-RPC and the audit record.
    let direct = tokio.block_on(async {
        let rt = runtime(dir.path());
        let installed = rt.load(rust).unwrap().install(Grants::default()).unwrap();
        let mut all = Vec::new();
        for _ in 0..2000 {
            let started = Instant::now();
            installed.any_tool("t").await.unwrap().invoke(r#"{"a":1}"#).await.unwrap();
            all.push(started.elapsed());
        }
        all.sort();
        all
    });
    let mut stream = std::io::BufReader::new(std::net::TcpStream::connect(addr).unwrap());
    stream.get_ref().set_nodelay(true).unwrap();
    for id in 0..200 {
        assert_eq!(exchange(&mut stream, mcp_request(addr, &key, id).as_bytes()).unwrap(), 200);
    }
    let mut one = Vec::new();
    for id in 0..2000 {
        let request = mcp_request(addr, &key, id);
        let started = Instant::now();
        assert_eq!(exchange(&mut stream, request.as_bytes()).unwrap(), 200);
        one.push(started.elapsed());
    }
    one.sort();
    println!("\n## MCP tools/call of the Rust echo tool (ms)\n");
    println!("| | p50 | p99 |");
    println!("| --- | ---: | ---: |");
    println!(
        "| in process: new instance + call (baseline) | {} | {} |",
        ms(percentile(&direct, 0.5)),
        ms(percentile(&direct, 0.99))
    );
    println!("| MCP over HTTP, 1 in flight | {} | {} |", ms(percentile(&one, 0.5)), ms(percentile(&one, 0.99)));

    println!("\n| req/s (open loop, 16 connections, 3 s) | p50 | p99 | failed |");
    println!("| ---: | ---: | ---: | ---: |");
    let mut best = None;
    for rate in [100, 250, 500, 1000, 2000, 3000, 4000] {
        let (latencies, failed) = open_loop(addr, &mcp_request(addr, &key, 1), rate, 3, 16);
        let p99 = percentile(&latencies, 0.99);
        println!("| {rate} | {} | {} | {failed} |", ms(percentile(&latencies, 0.5)), ms(p99));
        if p99 < Duration::from_millis(5) && failed == 0 {
            best = Some(rate);
        }
    }
    println!("\nHighest rate with p99 under 5 ms: {}", best.map_or("none".to_string(), |r| format!("{r} req/s")));
    drop(dir);
}
