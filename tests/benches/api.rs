//! Latency of the service's API on loopback, against a `qlayer serve` process (SQLite, the
//! embedded default), measured from a second process:
//!
//! - an open-loop load at fixed request rates (each request timed from when it was due, so a
//!   stalled server is not hidden: no coordinated omission): p50 and p99 of a trivial
//!   authenticated route (`GET /v1/tenants/{own id}`: key lookup, tenant lookup, JSON), with
//!   `GET /healthz` (no auth, no database) as the baseline in the same run; then the highest
//!   rate held with p99 under 5 ms;
//! - `wrk` (Debian's, closed loop) for the most requests per second, when it is installed.
//!
//! Run: `cargo bench -p qlayer-tests --bench api` (builds `qlayer` first with
//! `cargo build --release -p qlayer-host`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::process::{Command, Stdio};
use std::time::Duration;

const ADMIN: &str = "ql_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn qlayer_binary() -> std::path::PathBuf {
    // target/release/deps/api-<hash> → target/release/qlayer
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("qlayer");
    assert!(bin.exists(), "{} is missing: run `cargo build --release -p qlayer-host` first", bin.display());
    bin
}

struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Sends `rate` requests per second for `secs` seconds, each on time whatever the answers do;
/// returns the latencies from each request's due time, sorted, and the count of failures.
async fn open_loop(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    rate: u32,
    secs: u64,
) -> (Vec<Duration>, usize) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let total = u64::from(rate) * secs;
    for _ in 0..total {
        let due = ticker.tick().await;
        let (client, url, tx) = (client.clone(), url.to_string(), tx.clone());
        let key = key.map(str::to_string);
        tokio::spawn(async move {
            let mut req = client.get(&url);
            if let Some(key) = key {
                req = req.header("authorization", format!("Bearer {key}"));
            }
            let ok = match req.send().await {
                Ok(res) => res.status().is_success() && res.bytes().await.is_ok(),
                Err(_) => false,
            };
            let _ = tx.send((due.elapsed(), ok));
        });
    }
    drop(tx);
    let mut latencies = Vec::with_capacity(total as usize);
    let mut failures = 0;
    while let Some((latency, ok)) = rx.recv().await {
        if ok {
            latencies.push(latency);
        } else {
            failures += 1;
        }
    }
    latencies.sort();
    (latencies, failures)
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let data = tempfile::tempdir().unwrap();
    let port = qlayer_tests::free_port();
    let grpc = qlayer_tests::free_port();
    let config = data.path().join("qlayer.toml");
    std::fs::write(&config, "[limits]\nrequests-per-second = 0\n").unwrap();
    let child = Command::new(qlayer_binary())
        .args(["--log", "error", "serve", "--config"])
        .arg(&config)
        .args(["--rest-addr", &format!("127.0.0.1:{port}"), "--grpc-addr", &format!("127.0.0.1:{grpc}"), "--data-dir"])
        .arg(data.path())
        .env("QLAYER_ADMIN_KEY", ADMIN)
        .env_remove("QLAYER_DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _server = Server(child);
    let base = format!("http://127.0.0.1:{port}");
    qlayer_registry::install_tls_provider();
    let client = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(256).build().unwrap();
    for _ in 0..200 {
        if client.get(format!("{base}/healthz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let created: serde_json::Value = client
        .post(format!("{base}/v1/tenants"))
        .header("authorization", format!("Bearer {ADMIN}"))
        .header("content-type", "application/json")
        .body(r#"{"name": "bench"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["api_key"].as_str().unwrap().to_string();
    let route = format!("{base}/v1/tenants/{}", created["tenant"]["id"].as_str().unwrap());
    let health = format!("{base}/healthz");
    // Warm up connections and caches.
    open_loop(&client, &route, Some(&key), 500, 2).await;

    println!("open loop, 5 s per rate; latency from each request's due time (ms)");
    println!("{:>7}  {:>24}  {:>24}", "req/s", "GET /healthz p50 / p99", "GET /v1/tenants/{id} p50 / p99");
    let mut best = None;
    for rate in [250u32, 500, 1000, 2000, 3000, 4000, 5000, 6000, 8000] {
        let (base_lat, base_fail) = open_loop(&client, &health, None, rate, 5).await;
        let (lat, fail) = open_loop(&client, &route, Some(&key), rate, 5).await;
        let p99 = percentile(&lat, 0.99);
        println!(
            "{rate:>7}  {:>11} / {:>10}  {:>11} / {:>10}{}",
            ms(percentile(&base_lat, 0.50)),
            ms(percentile(&base_lat, 0.99)),
            ms(percentile(&lat, 0.50)),
            ms(p99),
            if base_fail + fail > 0 { format!("  ({} failed)", base_fail + fail) } else { String::new() }
        );
        if p99 < Duration::from_millis(5) && fail == 0 {
            best = Some(rate);
        } else {
            break;
        }
    }
    match best {
        Some(rate) => println!("highest rate held with p99 < 5 ms: {rate} req/s"),
        None => println!("no rate held p99 < 5 ms"),
    }

    if Command::new("wrk").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok() {
        for (label, url, auth) in [("GET /healthz", &health, false), ("GET /v1/tenants/{id}", &route, true)] {
            let mut cmd = Command::new("wrk");
            cmd.args(["-t2", "-c32", "-d10s", "--latency"]);
            if auth {
                cmd.args(["-H", &format!("Authorization: Bearer {key}")]);
            }
            let out = cmd.arg(url).output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            let rps = text.lines().find(|l| l.starts_with("Requests/sec")).unwrap_or("Requests/sec: ?");
            let p50 = text.lines().find(|l| l.trim_start().starts_with("50%")).unwrap_or("50% ?").trim().to_string();
            let p99 = text.lines().find(|l| l.trim_start().starts_with("99%")).unwrap_or("99% ?").trim().to_string();
            println!("wrk -t2 -c32 -d10s {label}: {rps}; latency {p50}, {p99}");
        }
    } else {
        println!("wrk is not installed (apt-get install wrk): closed-loop figures skipped");
    }
}
