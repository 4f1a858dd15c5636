//! A test guest that misbehaves on request: `loop` spins forever, `alloc` grows memory without
//! end, `panic` traps, `sleep-ms N` busy-waits, `print` writes to stdout, `fail-until T` is
//! unavailable until the unix time T (ms), `rate-limited N` asks to be retried after N ms,
//! `headers N BYTES` makes the host hold N wasi:http header maps of BYTES each, `log N` and
//! `print N` write N lines through `host.log` and stdout, `raw-get AUTHORITY` sends a raw wasi:http
//! GET to http://AUTHORITY/plain (no URL parsing on the guest's side) and reports what happened,
//! `big N` answers N bytes, `json-array N` a JSON array of one-digit numbers N bytes long, `fan-out N AUTHORITY` sends N such GETs at once and holds every response until all answered, `forge` logs a message with a newline
//! and a forged log line in it, `tcp ADDR` connects a TCP socket to ADDR (std's wasi:sockets),
//! `udp ADDR` sends a datagram to it, `resolve NAME` looks NAME up, `sockets N` opens N TCP
//! sockets and holds them; anything else is echoed. `{"op": "..."}` is the same as its `op`.

use qlayer_sdk::{PluginError, tool::Tool};

struct Hostile;

impl Tool for Hostile {
    fn invoke(input: String) -> Result<String, PluginError> {
        // Callers that can only send JSON objects (MCP) send `{"op": "..."}`.
        let op = match serde_json::from_str::<serde_json::Value>(&input) {
            Ok(serde_json::Value::Object(o)) if o.get("op").is_some_and(|v| v.is_string()) => {
                o["op"].as_str().unwrap_or_default().to_string()
            }
            _ => input.clone(),
        };
        let op = op.trim();
        match op {
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    let mut block = vec![0u8; 1 << 20];
                    block[0] = 1;
                    hoard.push(std::hint::black_box(block));
                }
            }
            "panic" => panic!("hostile guest panics on purpose"),
            "print" => {
                println!("hello from the guest's stdout");
                qlayer_sdk::host::info("hello from host.log");
                Ok("printed".into())
            }
            "forge" => {
                qlayer_sdk::host::info("innocent\nlevel=ERROR tenant=other forged line");
                Ok("forged".into())
            }
            other if other.starts_with("big ") => {
                let n: usize = other[4..].parse().map_err(|_| PluginError::InvalidInput("bad number".into()))?;
                Ok("x".repeat(n))
            }
            other if other.starts_with("json-array ") => {
                let n: usize = other[11..].parse().map_err(|_| PluginError::InvalidInput("bad number".into()))?;
                // `[` + k - 1 times `7,` + `7]`: 2k + 1 bytes.
                let k = (n.saturating_sub(1) / 2).max(1);
                Ok(format!("[{}7]", "7,".repeat(k - 1)))
            }
            other if other.starts_with("raw-get ") => {
                use wasi::http::types::{Fields, OutgoingRequest, Scheme};
                let request = OutgoingRequest::new(Fields::new());
                request.set_scheme(Some(&Scheme::Http)).map_err(|_| PluginError::InvalidInput("scheme".into()))?;
                request
                    .set_authority(Some(&other[8..]))
                    .map_err(|_| PluginError::InvalidInput("authority refused by set-authority".into()))?;
                request.set_path_with_query(Some("/plain")).map_err(|_| PluginError::InvalidInput("path".into()))?;
                let pending = match wasi::http::outgoing_handler::handle(request, None) {
                    Ok(pending) => pending,
                    Err(e) => return Ok(format!("refused: {e:?}")),
                };
                pending.subscribe().block();
                Ok(match pending.get() {
                    Some(Ok(Ok(response))) => format!("status {}", response.status()),
                    Some(Ok(Err(e))) => format!("refused: {e:?}"),
                    other => format!("no response: {other:?}"),
                })
            }
            other if other.starts_with("fan-out ") => {
                // `fan-out N AUTHORITY`: N GETs at once, all held until every one has answered.
                use wasi::http::types::{Fields, OutgoingRequest, Scheme};
                let (n, authority) = other[8..].split_once(' ').unwrap_or(("0", ""));
                let n: usize = n.parse().map_err(|_| PluginError::InvalidInput("bad number".into()))?;
                let mut pending = Vec::new();
                for _ in 0..n {
                    let request = OutgoingRequest::new(Fields::new());
                    let _ = request.set_scheme(Some(&Scheme::Http));
                    let _ = request.set_authority(Some(authority));
                    let _ = request.set_path_with_query(Some("/plain"));
                    pending.push(wasi::http::outgoing_handler::handle(request, None));
                }
                let (mut ok, mut refused, mut errors) = (Vec::new(), 0, std::collections::BTreeSet::new());
                for p in pending {
                    match p {
                        Ok(future) => {
                            future.subscribe().block();
                            match future.get() {
                                Some(Ok(Ok(response))) => ok.push(response),
                                Some(Ok(Err(e))) => {
                                    refused += 1;
                                    errors.insert(format!("{e:?}"));
                                }
                                other => {
                                    refused += 1;
                                    errors.insert(format!("{other:?}"));
                                }
                            }
                        }
                        Err(e) => {
                            refused += 1;
                            errors.insert(format!("{e:?}"));
                        }
                    }
                }
                Ok(format!("ok {}, refused {refused} {}", ok.len(), errors.into_iter().collect::<Vec<_>>().join(",")))
            }
            other if other.starts_with("headers ") => {
                let (n, bytes) = other[8..].split_once(' ').unwrap_or((&other[8..], "1024"));
                let n: usize = n.parse().map_err(|_| PluginError::InvalidInput("bad number".into()))?;
                let bytes: usize = bytes.parse().map_err(|_| PluginError::InvalidInput("bad number".into()))?;
                let value = vec![b'a'; bytes];
                let mut held = Vec::new();
                for i in 0..n {
                    let fields = wasi::http::types::Fields::new();
                    fields
                        .append("x-big", &value)
                        .map_err(|e| PluginError::InvalidInput(format!("header map {i} refused: {e:?}")))?;
                    held.push(fields);
                }
                Ok(format!("holding {}", held.len()))
            }
            other if other.starts_with("log ") || other.starts_with("print ") => {
                let (what, n) = other.split_once(' ').unwrap_or(("log", "0"));
                let n: usize = n.parse().map_err(|_| PluginError::InvalidInput("bad number".into()))?;
                for i in 0..n {
                    if what == "log" {
                        qlayer_sdk::host::info(&format!("flood line {i}"));
                    } else {
                        println!("flood line {i}");
                    }
                }
                Ok(format!("wrote {n}"))
            }
            "env" => Ok(format!("{}", std::env::vars().count())),
            "fs" => Ok(match std::fs::read_dir("/") {
                Ok(_) => "filesystem visible".into(),
                Err(e) => format!("no filesystem: {e}"),
            }),
            other if other.starts_with("tcp ") => Ok(match std::net::TcpStream::connect(&other[4..]) {
                Ok(_) => "connected".into(),
                Err(e) => format!("tcp refused: {e}"),
            }),
            other if other.starts_with("udp ") => {
                Ok(match std::net::UdpSocket::bind("0.0.0.0:0").and_then(|s| s.send_to(b"hello", &other[4..])) {
                    Ok(n) => format!("sent {n}"),
                    Err(e) => format!("udp refused: {e}"),
                })
            }
            other if other.starts_with("resolve ") => {
                use std::net::ToSocketAddrs;
                Ok(match (&other[8..], 80).to_socket_addrs() {
                    Ok(addrs) => format!("resolved {}", addrs.count()),
                    Err(e) => format!("lookup refused: {e}"),
                })
            }
            other if other.starts_with("sockets ") => {
                let n: usize = other[8..].parse().map_err(|_| PluginError::InvalidInput("bad number".into()))?;
                let mut held = Vec::new();
                for i in 0..n {
                    match std::net::TcpListener::bind("127.0.0.1:0") {
                        Ok(s) => held.push(s),
                        Err(e) => return Ok(format!("socket {i} refused: {e}")),
                    }
                }
                Ok(format!("holding {}", held.len()))
            }
            "fail-retryable" => Err(PluginError::Unavailable("failing on purpose".into())),
            "fail-fatal" => Err(PluginError::InvalidInput("failing on purpose".into())),
            other if other.starts_with("fail-until ") => {
                let until: u128 = other[11..].parse().map_err(|_| PluginError::InvalidInput("bad number".into()))?;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0);
                if now < until {
                    Err(PluginError::Unavailable(format!("unavailable for {} ms more", until - now)))
                } else {
                    Ok("recovered".into())
                }
            }
            other if other.starts_with("rate-limited ") => {
                let ms: u64 = other[13..].parse().map_err(|_| PluginError::InvalidInput("bad number".into()))?;
                Err(PluginError::RateLimited(Some(ms)))
            }
            other if other.starts_with("sleep-ms ") => {
                // `sleep-ms N [tag]`: busy-waits N ms, answers `slept [tag]`.
                let (ms, tag) = other[9..].split_once(' ').unwrap_or((&other[9..], ""));
                let ms: u64 = ms.parse().map_err(|_| PluginError::InvalidInput("bad number".into()))?;
                let start = std::time::Instant::now();
                while start.elapsed().as_millis() < ms as u128 {
                    std::hint::spin_loop();
                }
                Ok(if tag.is_empty() { "slept".into() } else { format!("slept {tag}") })
            }
            other => Ok(other.to_string()),
        }
    }
}

qlayer_sdk::export_tool!(Hostile);
