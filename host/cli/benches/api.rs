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
//! Run: `cargo bench -p qlayer --bench api`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::process::{Command, Stdio};
use std::time::Duration;

mod load;
use load::{ADMIN, ms, open_loop, percentile};

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let data = tempfile::tempdir().unwrap();
    let (_server, port) = load::serve(data.path(), "[limits]\nrequests-per-second = 0\n");
    let base = format!("http://127.0.0.1:{port}");
    qlayer_registry::install_tls_provider();
    let client = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(256).build().unwrap();
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
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The machine's floor, in the same run: a bare axum server (one route, no middleware) on its
    // own two-thread runtime, answered the same way.
    let bare_port = qlayer_tests::free_port();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", bare_port)).await.unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    let bare: std::net::SocketAddr = format!("127.0.0.1:{bare_port}").parse().unwrap();
    let route_path = route.trim_start_matches(&base).to_string();
    // Warm up caches.
    open_loop(addr, &load::get(addr, &route_path, Some(&key)), 500, 2, 8);

    println!("open loop over 8 keep-alive connections, 5 s per rate; latency from each request's due time (ms)");
    println!(
        "{:>7}  {:>22}  {:>22}  {:>28}",
        "req/s", "bare axum p50 / p99", "GET /healthz p50 / p99", "GET /v1/tenants/{id} p50 / p99"
    );
    let mut best = None;
    for rate in [250u32, 500, 1000, 2000, 3000, 4000, 5000, 6000, 8000, 10000] {
        let (bare_lat, _) = open_loop(bare, &load::get(bare, "/", None), rate, 5, 8);
        let (base_lat, base_fail) = open_loop(addr, &load::get(addr, "/healthz", None), rate, 5, 8);
        let (lat, fail) = open_loop(addr, &load::get(addr, &route_path, Some(&key)), rate, 5, 8);
        let p99 = percentile(&lat, 0.99);
        println!(
            "{rate:>7}  {:>10} / {:>9}  {:>10} / {:>9}  {:>14} / {:>11}{}",
            ms(percentile(&bare_lat, 0.50)),
            ms(percentile(&bare_lat, 0.99)),
            ms(percentile(&base_lat, 0.50)),
            ms(percentile(&base_lat, 0.99)),
            ms(percentile(&lat, 0.50)),
            ms(p99),
            if base_fail + fail > 0 { format!("  ({} failed)", base_fail + fail) } else { String::new() }
        );
        if p99 < Duration::from_millis(5) && fail == 0 {
            best = Some(rate);
        }
        if lat.len() < (u64::from(rate) * 5 * 9 / 10) as usize || percentile(&lat, 0.5) > Duration::from_millis(50) {
            // Saturated: the server no longer keeps up at all.
            break;
        }
    }
    match best {
        Some(rate) => println!("highest rate with p99 < 5 ms for GET /v1/tenants/{{id}}: {rate} req/s"),
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
