//! What the service benches share: the `qlayer` binary, a server process killed on drop, a new
//! tenant and a plugin pushed to the test registry, raw HTTP/1.1 requests on keep-alive
//! connections, and an open-loop load generator.
#![allow(dead_code)]

use std::time::Duration;

pub fn qlayer_binary() -> std::path::PathBuf {
    // Cargo builds the package's binary, in the bench's profile, before its benches.
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_qlayer"))
}

/// The admin key the benches' servers start with.
pub const ADMIN: &str = "ql_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

pub struct Server(pub std::process::Child);

/// Starts `qlayer serve` on free loopback ports with `config` (TOML) in `data`, the embedded
/// default's SQLite there, and waits until `/healthz` answers. Returns it and its REST port.
pub fn serve(data: &std::path::Path, config: &str) -> (Server, u16) {
    let (port, grpc) = (qlayer_tests::free_port(), qlayer_tests::free_port());
    let path = data.join("qlayer.toml");
    std::fs::write(&path, config).unwrap();
    let child = std::process::Command::new(qlayer_binary())
        .args(["--log", "error", "serve", "--config"])
        .arg(&path)
        .args(["--rest-addr", &format!("127.0.0.1:{port}"), "--grpc-addr", &format!("127.0.0.1:{grpc}"), "--data-dir"])
        .arg(data)
        .env("QLAYER_ADMIN_KEY", ADMIN)
        .env_remove("QLAYER_DATABASE_URL")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let server = Server(child);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..200 {
        if let Ok(tcp) = std::net::TcpStream::connect(addr)
            && exchange(&mut std::io::BufReader::new(tcp), get(addr, "/healthz", None).as_bytes())
                .is_ok_and(|s| s == 200)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (server, port)
}

/// Creates tenant `name` on the server at `base` with the admin key; returns the tenant's admin key.
pub async fn create_tenant(client: &reqwest::Client, base: &str, name: &str) -> String {
    let created: serde_json::Value = client
        .post(format!("{base}/v1/tenants"))
        .bearer_auth(ADMIN)
        .json(&serde_json::json!({"name": name}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    created["api_key"].as_str().unwrap().to_string()
}

/// Pushes `wasm` to `reference` on the test registry, from a marketplace of its own in `dir`.
pub async fn push(registry: &qlayer_tests::TestRegistry, dir: &std::path::Path, wasm: &[u8], reference: &str) {
    let pusher = qlayer_marketplace::Marketplace::open_local(
        dir.join("pusher"),
        qlayer_marketplace::MarketplaceConfig {
            insecure_registries: vec![registry.addr.clone()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    pusher.push(wasm, reference, None).await.unwrap();
}

/// The resident set of `pid`, in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// A `GET` of `path` as raw HTTP/1.1, with a bearer key when given.
pub fn get(addr: std::net::SocketAddr, path: &str, key: Option<&str>) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{}\r\n",
        key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default()
    )
}

/// A JSON `POST` of `body` to `path` as raw HTTP/1.1, with a bearer key when given.
pub fn post(addr: std::net::SocketAddr, path: &str, key: Option<&str>, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default(),
        body.len()
    )
}

/// Sends `rate` requests per second for `secs` seconds over `connections` keep-alive HTTP/1.1
/// connections, one blocking thread each: request `n` is due at `start + n / rate` and is sent
/// then, or as soon as its connection is free when the server is behind; its latency is counted
/// from when it was due. Returns the latencies, sorted, and the count of failures.
pub fn open_loop(
    addr: std::net::SocketAddr,
    request: &str,
    rate: u32,
    secs: u64,
    connections: u64,
) -> (Vec<Duration>, usize) {
    let total = u64::from(rate) * secs;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let request = request.to_string();
    let start = std::time::Instant::now() + Duration::from_millis(20);
    let threads: Vec<_> = (0..connections)
        .map(|c| {
            let request = request.clone();
            std::thread::spawn(move || {
                let mut stream = std::io::BufReader::new(std::net::TcpStream::connect(addr).unwrap());
                stream.get_ref().set_nodelay(true).unwrap();
                let mut latencies = Vec::new();
                let mut failures = 0;
                let mut n = c;
                while n < total {
                    let due = start + interval * n as u32;
                    let now = std::time::Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    match exchange(&mut stream, request.as_bytes()) {
                        Ok(200) => latencies.push(due.elapsed()),
                        _ => failures += 1,
                    }
                    n += connections;
                }
                (latencies, failures)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(total as usize);
    let mut failures = 0;
    for t in threads {
        let (l, f) = t.join().unwrap();
        latencies.extend(l);
        failures += f;
    }
    latencies.sort();
    (latencies, failures)
}

/// One request and its whole response on a keep-alive connection; returns the status.
pub fn exchange(stream: &mut std::io::BufReader<std::net::TcpStream>, request: &[u8]) -> std::io::Result<u16> {
    use std::io::{BufRead as _, Read as _, Write as _};
    stream.get_mut().write_all(request)?;
    let mut line = String::new();
    stream.read_line(&mut line)?;
    let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut length = 0usize;
    loop {
        line.clear();
        stream.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body)?;
    Ok(status)
}

pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}
