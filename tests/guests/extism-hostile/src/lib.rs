//! A hostile Extism tool for the host's tests: `loop` spins forever, `grow` allocates without
//! end, `fetch:<url>` makes a request, `fail` returns an invalid-input error, `log:N` logs N
//! lines, `forge` logs a message with a newline and a forged line in it, anything else is echoed.
// Built for wasm32-unknown-unknown by tests/build.rs; empty on other targets (`cargo test --workspace`).
#![cfg(target_arch = "wasm32")]

use extism_pdk::*;

#[plugin_fn]
pub fn invoke(input: String) -> FnResult<String> {
    if input == "loop" {
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
    if input == "grow" {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(vec![1u8; 1 << 20]);
            std::hint::black_box(&hoard);
        }
    }
    if let Some(url) = input.strip_prefix("fetch:") {
        let response = http::request::<()>(&HttpRequest::new(url), None)?;
        return Ok(format!("{} {}", response.status_code(), String::from_utf8_lossy(&response.body())));
    }
    if let Some(n) = input.strip_prefix("log:") {
        let n: usize = n.parse().unwrap_or(0);
        for i in 0..n {
            info!("extism flood line {i}");
        }
        return Ok(format!("wrote {n}"));
    }
    if input == "forge" {
        info!("innocent\nlevel=ERROR tenant=other forged line");
        return Ok("forged".into());
    }
    if input == "fail" {
        return Err(WithReturnCode::from(Error::msg("invalid-input: told to fail")));
    }
    Ok(format!("echo:{input}"))
}
