//! `qlayer probe URL`: one plain-HTTP GET, for a container's health check where the image has
//! no shell and no curl (deploy/Dockerfile). Exit 0 on a 2xx answer, 1 otherwise, with the
//! status line or the error on stderr.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

/// Where a probe goes: `http://host:port/path` (port 80 when it is not given).
#[derive(Debug, PartialEq)]
struct Target {
    host: String,
    port: u16,
    path: String,
}

fn parse(url: &str) -> Result<Target, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("`{url}`: give an http:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
            (host, port.parse::<u16>().map_err(|_| format!("`{url}`: the port `{port}` is not a number"))?)
        }
        _ => (authority, 80),
    };
    if host.is_empty() {
        return Err(format!("`{url}` names no host"));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    Ok(Target { host, port, path: path.to_string() })
}

fn get(target: &Target, timeout: Duration) -> Result<String, String> {
    let addr = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .map_err(|e| format!("{}: {e}", target.host))?
        .next()
        .ok_or_else(|| format!("{} resolves to no address", target.host))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| e.to_string())?;
    let request = format!("GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: qlayer-probe\r\n\r\n", target.path, target.host);
    stream.write_all(request.as_bytes()).map_err(|e| format!("{addr}: {e}"))?;
    // The status line is all a probe needs; a few KiB bound what a wrong server can send.
    let mut head = Vec::new();
    stream.take(4096).read_to_end(&mut head).map_err(|e| format!("{addr}: {e}"))?;
    let text = String::from_utf8_lossy(&head);
    Ok(text.lines().next().unwrap_or_default().to_string())
}

/// Whether `url` answers 2xx, waiting at most `timeout_ms` for each of connecting, sending and
/// reading; the error says what it answered instead.
pub fn check(url: &str, timeout_ms: u64) -> Result<(), String> {
    let status = parse(url).and_then(|t| get(&t, Duration::from_millis(timeout_ms.max(1))))?;
    match status.split_whitespace().nth(1) {
        Some(code) if code.starts_with('2') => Ok(()),
        _ if status.is_empty() => Err(format!("{url} closed the connection without an answer")),
        _ => Err(format!("{url} answered `{status}`")),
    }
}

/// [`check`], as the command's exit code (the reason on stderr).
pub fn probe(url: &str, timeout_ms: u64) -> ExitCode {
    match check(url, timeout_ms) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("not ready: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn urls_are_read_or_refused_by_name() {
        let t = parse("http://127.0.0.1:8080/readyz").unwrap();
        assert_eq!(t, Target { host: "127.0.0.1".into(), port: 8080, path: "/readyz".into() });
        assert_eq!(parse("http://localhost").unwrap().port, 80);
        assert_eq!(parse("http://[::1]:9/x").unwrap().host, "::1");
        assert!(parse("https://x/readyz").unwrap_err().contains("http://"));
        assert!(parse("http://x:port/").unwrap_err().contains("`port`"));
    }

    #[test]
    fn a_2xx_is_ready_and_anything_else_is_not() {
        let serve = |answer: &'static str| {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            std::thread::spawn(move || {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                s.write_all(answer.as_bytes()).unwrap();
            });
            format!("http://127.0.0.1:{port}/readyz")
        };
        assert_eq!(check(&serve("HTTP/1.1 200 OK\r\n\r\nready"), 2000), Ok(()));
        let e = check(&serve("HTTP/1.1 503 Service Unavailable\r\n\r\n"), 2000).unwrap_err();
        assert!(e.ends_with("answered `HTTP/1.1 503 Service Unavailable`"), "{e}");
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        assert!(check(&format!("http://127.0.0.1:{closed}/readyz"), 2000).is_err());
    }
}
