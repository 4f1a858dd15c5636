//! The latency the OpenAI-compatible gateway adds, against a `qlayer serve` process (SQLite, the
//! embedded default) whose tenant routes model `bench` through the real `openai` provider plugin
//! (installed from a local registry) to an instant OpenAI-compatible mock upstream (a test double
//! in this process, on its own two threads). Each figure is measured against the mock called
//! directly in the same run:
//!
//! - 1 request in flight: p50 and p99 of whole completions, and the time to first token of
//!   streams (a fresh connection each, as SDKs open streams);
//! - an open-loop load at fixed rates over 16 keep-alive connections (latency from each request's
//!   due time), up to saturation, and the highest rate with p99 added under 5 ms;
//! - the server's resident memory idle, at the end of the load, and after it;
//! - the host's own time per request as the server reports it (`x-qlayer-overhead-ms`).
//!
//! Run: `cargo bench -p qlayer --bench gateway`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod load;

use load::{exchange, ms, open_loop, percentile, rss_mib};
use std::io::{BufRead as _, Read as _, Write as _};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const BODY: &str = r#"{"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}"#;
/// The paced stream: this many chunks, one every `PACE`; a gap over ten times `PACE` is a stall.
const PACED_CHUNKS: usize = 20;
const PACE: Duration = Duration::from_millis(10);
const PACED_BODY: &str = r#"{"model": "paced", "stream": true, "messages": [{"role": "user", "content": "hi"}]}"#;
const STREAM_BODY: &str = r#"{"model": "bench", "stream": true, "messages": [{"role": "user", "content": "hi"}]}"#;

/// The instant upstream: a canned completion, or five chunks and `[DONE]`.
fn start_mock() -> SocketAddr {
    let port = qlayer_tests::free_port();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let reply = serde_json::json!({
                "id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": "mock",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "pong"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
            })
            .to_string();
            let mut events = String::new();
            for word in ["a", "b", "c", "d", "e"] {
                events.push_str(&format!(
                    "data: {}\n\n",
                    serde_json::json!({"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": null}]})
                ));
            }
            events.push_str(&format!(
                "data: {}\n\ndata: [DONE]\n\n",
                serde_json::json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 5}})
            ));
            let app = axum::Router::new().route(
                "/v1/chat/completions",
                axum::routing::post(move |body: String| {
                    let (reply, events) = (reply.clone(), events.clone());
                    async move {
                        use axum::response::IntoResponse as _;
                        let sse = [(axum::http::header::CONTENT_TYPE, "text/event-stream")];
                        if body.contains("\"paced\"") {
                            // PACED_CHUNKS chunks, one every PACE.
                            let chunks = futures::stream::unfold(0usize, |n| async move {
                                if n > PACED_CHUNKS {
                                    return None;
                                }
                                tokio::time::sleep(PACE).await;
                                let event = if n == PACED_CHUNKS {
                                    "data: {\"choices\": [{\"index\": 0, \"delta\": {}, \"finish_reason\": \"stop\"}]}\n\ndata: [DONE]\n\n".to_string()
                                } else {
                                    format!("data: {{\"choices\": [{{\"index\": 0, \"delta\": {{\"content\": \"w{n} \"}}}}]}}\n\n")
                                };
                                Some((Ok::<_, std::convert::Infallible>(event), n + 1))
                            });
                            (sse, axum::body::Body::from_stream(chunks)).into_response()
                        } else if body.contains("\"stream\":true") || body.contains("\"stream\": true") {
                            (sse, events).into_response()
                        } else {
                            ([(axum::http::header::CONTENT_TYPE, "application/json")], reply).into_response()
                        }
                    }
                }),
            );
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    format!("127.0.0.1:{port}").parse().unwrap()
}

/// `n` requests one after another on one keep-alive connection: latencies sorted, and the mean
/// of `x-qlayer-overhead-ms` when the server sends it.
fn one_in_flight(addr: SocketAddr, request: &str, n: usize) -> (Vec<Duration>, Option<f64>) {
    let mut stream = std::io::BufReader::new(std::net::TcpStream::connect(addr).unwrap());
    stream.get_ref().set_nodelay(true).unwrap();
    let mut latencies = Vec::with_capacity(n);
    for _ in 0..n {
        let began = Instant::now();
        assert_eq!(exchange(&mut stream, request.as_bytes()).unwrap(), 200);
        latencies.push(began.elapsed());
    }
    latencies.sort();
    (latencies, None)
}

/// Time to the first content of a stream, on a fresh connection per stream, read to its end.
fn ttft(addr: SocketAddr, request: &str, n: usize) -> Vec<Duration> {
    let mut firsts = Vec::with_capacity(n);
    for _ in 0..n {
        let began = Instant::now();
        let tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut stream = std::io::BufReader::new(tcp);
        let request = request.replacen("HTTP/1.1\r\n", "HTTP/1.1\r\nConnection: close\r\n", 1);
        stream.get_mut().write_all(request.as_bytes()).unwrap();
        let mut line = String::new();
        let mut first = None;
        while stream.read_line(&mut line).unwrap() > 0 {
            if first.is_none() && line.contains("\"content\"") {
                first = Some(began.elapsed());
            }
            line.clear();
        }
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        firsts.push(first.expect("the stream carried content"));
    }
    firsts.sort();
    firsts
}

/// `n` paced streams at once, each on its own connection: the longest gap between two reads of
/// any stream (the first read counts from the request), and how many streams ended without
/// their end marker.
async fn held(addr: SocketAddr, request: String, n: usize) -> (Duration, usize) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let request = request.replacen("HTTP/1.1\r\n", "HTTP/1.1\r\nConnection: close\r\n", 1);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let request = request.clone();
        tasks.spawn(async move {
            let Ok(mut tcp) = tokio::net::TcpStream::connect(addr).await else { return (Duration::MAX, false) };
            if tcp.write_all(request.as_bytes()).await.is_err() {
                return (Duration::MAX, false);
            }
            let (mut last, mut worst, mut seen) = (Instant::now(), Duration::ZERO, Vec::new());
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => {
                        worst = worst.max(last.elapsed());
                        last = Instant::now();
                        seen.extend_from_slice(&buf[..k]);
                    }
                }
            }
            (worst, seen.windows(12).any(|w| w == b"data: [DONE]"))
        });
    }
    let (mut worst, mut cut) = (Duration::ZERO, 0);
    while let Some(Ok((gap, done))) = tasks.join_next().await {
        worst = worst.max(gap);
        cut += usize::from(!done);
    }
    (worst, cut)
}

fn added(via: Duration, direct: Duration) -> String {
    format!("{:+.3}", (via.as_secs_f64() - direct.as_secs_f64()) * 1000.0)
}

/// A `qlayer serve` with `extra` config whose tenant `bench` has the `openai` plugin installed
/// from `registry` (pushed there first when `push`), granted the mock, and models `bench` and
/// `paced` on it: the server, its port and the tenant's key.
async fn gateway_server(
    registry: &qlayer_tests::TestRegistry,
    mock: SocketAddr,
    extra: &str,
    push: bool,
) -> (load::Server, u16, String, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("marketplace.toml"), format!("insecure-registries = [\"{}\"]\n", registry.addr))
        .unwrap();
    let (server, port) = load::serve(
        data.path(),
        &format!("[limits]\nrequests-per-second = 0\n[network]\nallow = [\"127.0.0.1\"]\n{extra}"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let send = |method: reqwest::Method, path: &str, key: &str, body: serde_json::Value| {
        client.request(method, format!("{base}{path}")).bearer_auth(key).json(&body).send()
    };
    let key = load::create_tenant(&client, &base, "bench").await;
    let reference = format!("{}/bench/openai:0.1.0", registry.addr);
    if push {
        load::push(registry, data.path(), qlayer_bundled::bundled_plugin("openai").unwrap(), &reference).await;
    }
    let grants = serde_json::json!({"hosts": [mock.to_string()], "config": {"base_url": format!("http://{mock}/v1")}});
    let r =
        send(reqwest::Method::POST, "/v1/plugins", &key, serde_json::json!({"reference": reference, "grants": grants}))
            .await
            .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    for (name, upstream) in [("bench", "mock"), ("paced", "paced")] {
        let r = send(
            reqwest::Method::PUT,
            &format!("/v1/models/{name}"),
            &key,
            serde_json::json!({"deployments": [{"plugin": "openai", "model": upstream}]}),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    (server, port, key, data)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let mock = start_mock();
    let registry = qlayer_tests::TestRegistry::start();
    qlayer_registry::install_tls_provider();
    let (server, port, key, _data) = gateway_server(&registry, mock, "", true).await;
    let pid = server.0.id();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let via = load::post(addr, "/v1/chat/completions", Some(&key), BODY);
    let direct = load::post(mock, "/v1/chat/completions", None, BODY);
    // Warm up: the plugin's first instance, connections, the caches.
    let _ = one_in_flight(addr, &via, 500);
    let idle = rss_mib(pid);

    println!("1 request in flight, 5,000 sequential requests on one keep-alive connection (ms)");
    let (d, _) = one_in_flight(mock, &direct, 5_000);
    let (g, _) = one_in_flight(addr, &via, 5_000);
    let (d50, d99, g50, g99) = (percentile(&d, 0.5), percentile(&d, 0.99), percentile(&g, 0.5), percentile(&g, 0.99));
    println!("  mock direct   p50 {} p99 {}", ms(d50), ms(d99));
    println!("  via gateway   p50 {} p99 {}", ms(g50), ms(g99));
    println!("  added         p50 {} p99 {}", added(g50, d50), added(g99, d99));
    {
        // The same with no warm provider instances: every request instantiates its provider.
        let (cold, cold_port, cold_key, _cold_data) =
            gateway_server(&registry, mock, "[gateway]\nwarm-instances = 0\n", false).await;
        let cold_addr: SocketAddr = format!("127.0.0.1:{cold_port}").parse().unwrap();
        let cold_via = load::post(cold_addr, "/v1/chat/completions", Some(&cold_key), BODY);
        let _ = one_in_flight(cold_addr, &cold_via, 500);
        let (c, _) = one_in_flight(cold_addr, &cold_via, 5_000);
        let (c50, c99) = (percentile(&c, 0.5), percentile(&c, 0.99));
        println!(
            "  via gateway, no warm instances ([gateway] warm-instances = 0), same run: p50 {} p99 {}, added p50 {} p99 {}",
            ms(c50),
            ms(c99),
            added(c50, d50),
            added(c99, d99)
        );
        drop(cold);
    }
    // The server's own account of its time, from its headers, over 1,000 requests: the host's
    // time, and the mean of each stage of `Server-Timing`.
    let mut overhead = Vec::new();
    let mut stages: Vec<(String, f64)> = Vec::new();
    for _ in 0..1_000 {
        let r = client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(BODY)
            .send()
            .await
            .unwrap();
        overhead.push(r.headers()["x-qlayer-overhead-ms"].to_str().unwrap().parse::<f64>().unwrap());
        for (i, stage) in r.headers()["server-timing"].to_str().unwrap().split(", ").enumerate() {
            let name = stage.split(';').next().unwrap().to_string();
            let dur: f64 = stage.rsplit("dur=").next().unwrap().parse().unwrap();
            match stages.get_mut(i) {
                Some((_, sum)) => *sum += dur,
                None => stages.push((name, dur)),
            }
        }
    }
    overhead.sort_by(f64::total_cmp);
    println!(
        "  x-qlayer-overhead-ms (host time, not the plugin call): p50 {:.3} p99 {:.3}",
        overhead[500], overhead[989]
    );
    let breakdown: Vec<String> = stages.iter().map(|(name, sum)| format!("{name} {:.3}", sum / 1_000.0)).collect();
    println!("  Server-Timing, mean per stage (ms): {}", breakdown.join(", "));

    println!("streams, 1 in flight, a fresh connection each: time to first token (ms), 1,000 streams");
    let sd = ttft(mock, &load::post(mock, "/v1/chat/completions", None, STREAM_BODY), 1_000);
    let sg = ttft(addr, &load::post(addr, "/v1/chat/completions", Some(&key), STREAM_BODY), 1_000);
    println!("  mock direct   p50 {} p99 {}", ms(percentile(&sd, 0.5)), ms(percentile(&sd, 0.99)));
    println!("  via gateway   p50 {} p99 {}", ms(percentile(&sg, 0.5)), ms(percentile(&sg, 0.99)));
    println!(
        "  added         p50 {} p99 {}",
        added(percentile(&sg, 0.5), percentile(&sd, 0.5)),
        added(percentile(&sg, 0.99), percentile(&sd, 0.99))
    );

    println!(
        "streams held at once: {PACED_CHUNKS} chunks each, one every {} ms; a stall is a gap over {} ms",
        PACE.as_millis(),
        PACE.as_millis() * 10
    );
    let mut most = None;
    for n in [64usize, 128, 256, 512, 1024] {
        let (dg, dc) = held(mock, load::post(mock, "/v1/chat/completions", None, PACED_BODY), n).await;
        let (gg, gc) = held(addr, load::post(addr, "/v1/chat/completions", Some(&key), PACED_BODY), n).await;
        println!(
            "  {n:>5} streams: longest gap mock direct {} ms{}, via gateway {} ms{}",
            ms(dg),
            if dc > 0 { format!(" ({dc} cut)") } else { String::new() },
            ms(gg),
            if gc > 0 { format!(" ({gc} cut)") } else { String::new() }
        );
        if gg <= PACE * 10 && gc == 0 {
            most = Some(n);
        } else {
            break;
        }
    }
    match most {
        Some(n) => println!("most streams held with no stall via the gateway: {n}"),
        None => println!("even 64 streams stalled via the gateway"),
    }

    println!("open loop over 16 keep-alive connections, 5 s per rate; latency from each request's due time (ms)");
    println!(
        "{:>7}  {:>22}  {:>22}  {:>16}  {:>9}",
        "req/s", "mock direct p50 / p99", "via gateway p50 / p99", "added p50 / p99", "RSS MiB"
    );
    let mut best = None;
    let mut peak = idle;
    for rate in [250u32, 500, 1000, 2000, 3000, 4000, 5000, 6000, 8000] {
        let (dl, _) = open_loop(mock, &direct, rate, 5, 16);
        let (gl, fail) = open_loop(addr, &via, rate, 5, 16);
        let rss = rss_mib(pid);
        peak = peak.max(rss);
        let (d50, d99, g50, g99) =
            (percentile(&dl, 0.5), percentile(&dl, 0.99), percentile(&gl, 0.5), percentile(&gl, 0.99));
        println!(
            "{rate:>7}  {:>10} / {:>9}  {:>10} / {:>9}  {:>7} / {:>7}  {rss:>9.1}{}",
            ms(d50),
            ms(d99),
            ms(g50),
            ms(g99),
            added(g50, d50),
            added(g99, d99),
            if fail > 0 { format!("  ({fail} failed)") } else { String::new() }
        );
        if g99.saturating_sub(d99) < Duration::from_millis(5) && fail == 0 {
            best = Some(rate);
        }
        if gl.len() < (u64::from(rate) * 5 * 9 / 10) as usize || percentile(&gl, 0.5) > Duration::from_millis(50) {
            println!("  saturated at {rate} req/s");
            break;
        }
    }
    match best {
        Some(rate) => println!("highest rate with p99 added < 5 ms: {rate} req/s"),
        None => println!("no rate held p99 added < 5 ms"),
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!(
        "resident memory of qlayer serve: idle {idle:.1} MiB, highest at a rate's end {peak:.1} MiB, 3 s after the load {:.1} MiB",
        rss_mib(pid)
    );
    // The soak (`SOAK_SECS=600`): a steady open loop, the server's resident memory each minute.
    let soak: u64 = std::env::var("SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    if soak > 0 {
        let rate = best.unwrap_or(250);
        println!("soak: {rate} req/s for {soak} s, 16 connections; each minute: p50 / p99 (ms), failures, RSS");
        let mut left = soak;
        while left > 0 {
            let step = left.min(60);
            let (gl, fail) = open_loop(addr, &via, rate, step, 16);
            left -= step;
            println!(
                "  {:>4} s  {} / {}  {fail} failed  {:.1} MiB",
                soak - left,
                ms(percentile(&gl, 0.5)),
                ms(percentile(&gl, 0.99)),
                rss_mib(pid)
            );
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        println!("  3 s after the soak: {:.1} MiB", rss_mib(pid));
    }
    drop(server);
}
