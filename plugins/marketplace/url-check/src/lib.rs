//! `url-check`: a marketplace tool built as an Extism plugin (a core module from `extism-pdk`).
//!
//! Input: `{"url": "https://..."}`. Output: `{"url", "status", "bytes", "content_type", "ok"}`.
//! Requests go through the host, which lets them reach only the hosts granted at install.
// Built for wasm32-unknown-unknown by tests/build.rs; empty on other targets (`cargo test --workspace`).
#![cfg(target_arch = "wasm32")]

use extism_pdk::*;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    url: String,
}

#[plugin_fn]
pub fn invoke(input: String) -> FnResult<String> {
    let input: Input = serde_json::from_str(&input)
        .map_err(|e| Error::msg(format!("invalid-input: expected {{\"url\": string}}: {e}")))?;
    if !(input.url.starts_with("http://") || input.url.starts_with("https://")) {
        return Err(WithReturnCode::from(Error::msg(format!("invalid-input: `{}` is not an http(s) URL", input.url))));
    }
    let request = HttpRequest::new(&input.url).with_method("GET");
    let response = http::request::<()>(&request, None)?;
    let status = response.status_code();
    let content_type =
        response.headers().iter().find(|(k, _)| k.eq_ignore_ascii_case("content-type")).map(|(_, v)| v.clone());
    let output = serde_json::json!({
        "url": input.url,
        "status": status,
        "bytes": response.body().len(),
        "content_type": content_type,
        "ok": (200..300).contains(&status),
    });
    Ok(output.to_string())
}
