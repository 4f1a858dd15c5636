//! Resident memory of a `qlayer serve` process (SQLite, the embedded default) before, at the
//! peak of and after each of: 500 SSE streams held open at once, and a burst of large JSON
//! outputs stored and served. The server runs as its own process; a thread samples its
//! `/proc/<pid>/status` every 2 ms for the peak, and "after" is read once the step is over and the
//! server has been idle for 1 s. The baseline in the same run: what one of those outputs costs
//! parsed into a `serde_json::Value` tree (measured in this process), the way the server held
//! outputs before they were kept as text.
//!
//! Run: `cargo bench -p qlayer --bench serve_memory --profile dev` (memory, not speed, is the
//! figure; a release build gives the same shape).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use qlayer_tests::{ADMIN, TestRegistry, guest_with};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

const STREAMS: usize = 500;
const OUTPUTS: usize = 16;
const OUTPUT_BYTES: usize = 32 << 20;

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The resident set of `pid` in bytes.
fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Samples `pid`'s resident set every 2 ms, keeping the highest since the last `reset`.
struct Sampler {
    pid: u32,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let (peak, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (p, s) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Relaxed) {
                p.fetch_max(rss_of(pid), Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Sampler { pid, peak, stop }
    }

    fn reset(&self) -> u64 {
        let now = rss_of(self.pid);
        self.peak.store(now, Relaxed);
        now
    }

    fn peak(&self) -> u64 {
        self.peak.load(Relaxed).max(rss_of(self.pid))
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

/// The resident set of this process in bytes.
fn own_rss() -> u64 {
    rss_of(std::process::id())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let registry = TestRegistry::start();
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("marketplace.toml"), format!("insecure-registries = [\"{}\"]\n", registry.addr))
        .unwrap();
    let config = data.path().join("qlayer.toml");
    // One task at a time, so that the streamed jobs stay queued behind a long one.
    std::fs::write(&config, "[limits]\nrequests-per-second = 0\n[jobs]\nconcurrency = 1\n").unwrap();
    let (rest, grpc) = (qlayer_tests::free_port(), qlayer_tests::free_port());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_qlayer"))
        .args(["--log", "error", "serve", "--config"])
        .arg(&config)
        .args(["--rest-addr", &format!("127.0.0.1:{rest}"), "--grpc-addr", &format!("127.0.0.1:{grpc}"), "--data-dir"])
        .arg(data.path())
        .env("QLAYER_ADMIN_KEY", ADMIN)
        .env_remove("QLAYER_DATABASE_URL")
        .env_remove("QLAYER_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let _server = Server(child);
    let base = format!("http://127.0.0.1:{rest}");
    qlayer_registry::install_tls_provider();
    let http = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(STREAMS + 16).build().unwrap();
    for _ in 0..400 {
        if http.get(format!("{base}/healthz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let created: serde_json::Value = http
        .post(format!("{base}/v1/tenants"))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"name": "bench"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["api_key"].as_str().unwrap().to_string();
    // The hostile test guest, allowed 64 MiB outputs.
    let reference = format!("{}/bench/hostile:1.0.0", registry.addr);
    let pusher = tempfile::tempdir().unwrap();
    let market = qlayer_marketplace::Marketplace::open_local(
        pusher.path(),
        qlayer_marketplace::MarketplaceConfig {
            insecure_registries: vec![registry.addr.clone()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let wasm = guest_with(
        "qlayer-test-hostile",
        "name = \"hostile\"\nversion = \"0.1.0\"\nkind = \"tool\"\ndescription = \"misbehaves on request\"\n[limits]\nmemory-mb = 256\ntimeout-ms = 60000\noutput-kb = 65536\n",
    );
    market.push(&wasm, &reference, None).await.unwrap();
    let installed = http
        .post(format!("{base}/v1/plugins"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"reference": reference}))
        .send()
        .await
        .unwrap();
    assert_eq!(installed.status().as_u16(), 201, "{}", installed.text().await.unwrap());
    let submit = |input: String| {
        let (http, base, key) = (http.clone(), base.clone(), key.clone());
        async move {
            let body = serde_json::json!({"kind": "call", "input": {"plugin": "hostile", "input": input}});
            let r = http.post(format!("{base}/v1/jobs")).bearer_auth(&key).json(&body).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 201);
            r.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_string()
        }
    };
    // Warm up: the plugin compiled and one job through.
    let warm = submit("hello".into()).await;
    wait_done(&http, &base, &key, &warm).await;
    let sampler = Sampler::start(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!("qlayer serve (SQLite), pid {pid}: resident set before, at the peak of and 1 s after each step");
    println!("{:<58} {:>11} {:>11} {:>11}", "step", "before", "peak", "after");

    // 500 SSE streams: one job keeps the node busy for 8 s while 500 others queue behind it,
    // each followed by its own stream until it ends.
    let before = sampler.reset();
    let long = submit("sleep-ms 8000".into()).await;
    let mut jobs = Vec::new();
    for n in 0..STREAMS {
        jobs.push(submit(format!("queued {n}")).await);
    }
    let streams: Vec<_> = jobs
        .iter()
        .map(|id| {
            let (http, base, key, id) = (http.clone(), base.clone(), key.clone(), id.clone());
            tokio::spawn(async move { follow(&http, &base, &key, &id).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let open = sampler.peak();
    let mut ended = 0;
    for s in streams {
        ended += usize::from(s.await.unwrap());
    }
    wait_done(&http, &base, &key, &long).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_of(pid);
    assert_eq!(ended, STREAMS, "every stream ends with its job's success");
    row(&format!("{STREAMS} SSE streams open at once (peak while open)"), before, open, after);
    row(&format!("  the whole step ({STREAMS} jobs run and streamed)"), before, sampler.peak(), after);

    // A burst of large outputs: 16 jobs each returning a 32 MiB JSON array (stored), then each
    // job read back over REST, 16 at once (served).
    let before = sampler.reset();
    let mut big = Vec::new();
    for _ in 0..OUTPUTS {
        big.push(submit(format!("json-array {OUTPUT_BYTES}")).await);
    }
    for id in &big {
        wait_done(&http, &base, &key, id).await;
    }
    let stored = sampler.peak();
    let reads: Vec<_> = big
        .iter()
        .map(|id| {
            let (http, url, key) = (http.clone(), format!("{base}/v1/jobs/{id}"), key.clone());
            tokio::spawn(
                async move { http.get(url).bearer_auth(key).send().await.unwrap().bytes().await.unwrap().len() },
            )
        })
        .collect();
    let mut served = 0;
    for r in reads {
        served += r.await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_of(pid);
    assert!(served > OUTPUTS * OUTPUT_BYTES, "every output is served whole");
    row(
        &format!("{OUTPUTS} outputs of {} MiB JSON, stored (one at a time)", OUTPUT_BYTES >> 20),
        before,
        stored,
        after,
    );
    row(&format!("  and served, {OUTPUTS} GETs at once"), before, sampler.peak(), after);

    // The baseline: one such output as a tree, in this process.
    let text = format!("[{}7]", "7,".repeat(OUTPUT_BYTES / 2 - 1));
    let start = own_rss();
    let tree: serde_json::Value = serde_json::from_str(&text).unwrap();
    let grown = own_rss().saturating_sub(start);
    println!(
        "baseline: one {} MiB output parsed into a serde_json::Value tree costs {} ({} elements)",
        OUTPUT_BYTES >> 20,
        mib(grown),
        tree.as_array().map_or(0, Vec::len)
    );
}

fn row(label: &str, before: u64, peak: u64, after: u64) {
    let delta = after as i64 - before as i64;
    println!(
        "{label:<58} {:>11} {:>11} {:>11} ({}{:.1})",
        mib(before),
        mib(peak),
        mib(after),
        if delta >= 0 { "+" } else { "" },
        delta as f64 / 1048576.0
    );
}

/// Follows `id`'s events until it ends (not its `GET`, which would serve its output each time);
/// true when it succeeded.
async fn follow(http: &reqwest::Client, base: &str, key: &str, id: &str) -> bool {
    let mut r = http
        .get(format!("{base}/v1/jobs/{id}/events"))
        .bearer_auth(key)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut text = Vec::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        text.extend_from_slice(&chunk);
    }
    String::from_utf8_lossy(&text).contains("event: succeeded")
}

async fn wait_done(http: &reqwest::Client, base: &str, key: &str, id: &str) {
    assert!(follow(http, base, key, id).await, "job {id} did not succeed");
}
