//! The OpenAI-compatible gateway of `qlayer serve`: the official `openai` Python SDK against it,
//! routing (fallback on retryable errors only, breakers, all deployments cooling down), streams
//! cut by the upstream, metering that sums to what the upstream reported, and tenant isolation.
//! The upstream is the local OpenAI-compatible test server (`qlayer_tests::TestServer`, a test
//! double), reached through the real `openai` provider plugin installed from a real registry.

use crate::api::{Svc, service};
use qlayer_db::Backend;
use qlayer_tests::TestServer;
use serde_json::{Value, json};
use std::time::Duration;

/// A service whose tenant `acme` has the openai plugin installed, asking `upstream`.
async fn gateway_service(tweak: impl FnOnce(&mut qlayer_api::serve::ServeConfig)) -> (Svc, TestServer, String, String) {
    let upstream = TestServer::start().await;
    let svc = service(Backend::Sqlite, true, |c| {
        // The test server is on loopback, which the operator opens here as one would for a
        // local Ollama.
        c.network.allow = vec!["127.0.0.1".into()];
        // The install below pushes, pulls and compiles the provider while other tests share the
        // machine's two cores (factory runs compile seven plugins in a debug build): under that
        // load it has taken over the default 30 s. What these tests check is not install time.
        c.limits.request_timeout_ms = 120_000;
        tweak(c);
    })
    .await;
    let (tenant, acme) = svc.tenant("acme").await;
    let grants = json!({
        "hosts": [upstream.url().trim_start_matches("http://")],
        "config": {"base_url": format!("{}/v1", upstream.url())}
    });
    let wasm = qlayer_bundled::bundled_plugin("openai").unwrap();
    let r = svc.install_with(&acme, "providers/openai", wasm, Some(grants)).await;
    assert_eq!(r.status, 201, "{r:?}");
    (svc, upstream, tenant, acme)
}

/// Installs for `key`'s tenant the provider built against contract 0.1.0 (`echo-v0-1`) and
/// makes it model `legacy`.
async fn legacy_model(svc: &Svc, key: &str) {
    let wasm = qlayer_tests::guest_with(
        "qlayer-test-provider-v0-1",
        "name = \"echo-v0-1\"\nversion = \"0.1.0\"\nkind = \"provider\"\ndescription = \"built against contract 0.1.0\"\n",
    );
    let r = svc.install_with(key, "providers/echo-v0-1", &wasm, None).await;
    assert_eq!(r.status, 201, "{r:?}");
    model(svc, key, "legacy", json!({"deployments": [{"plugin": "echo-v0-1", "model": "echo"}]})).await;
}

async fn model(svc: &Svc, key: &str, name: &str, spec: Value) {
    let r = svc.put(&format!("/v1/models/{name}"), key, spec).await;
    assert_eq!(r.status, 200, "{r:?}");
}

fn deployment(model: &str) -> Value {
    json!({"plugin": "openai", "model": model, "input_price": 1.0, "output_price": 2.0})
}

async fn chat(svc: &Svc, key: &str, model: &str) -> crate::api::Reply {
    svc.post("/v1/chat/completions", key, json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
        .await
}

/// Polls `/v1/usage` until `requests` are recorded (records are written off the request path).
pub(crate) async fn usage(svc: &Svc, key: &str, query: &str, requests: i64) -> Value {
    let mut last = Value::Null;
    for _ in 0..200 {
        let r = svc.get(&format!("/v1/usage?{query}"), key).await;
        assert_eq!(r.status, 200, "{r:?}");
        let total: i64 = r.body["data"].as_array().unwrap().iter().map(|g| g["requests"].as_i64().unwrap()).sum();
        if total >= requests {
            return r.body;
        }
        last = r.body;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("usage never reached {requests} requests: {last}");
}

/// The official SDK: models, a completion field for field, a stream with usage, a cut stream,
/// tool calls whole and streamed (arguments reassembled) and a tool result sent back, structured
/// output through `parse()`, a provider built against contract 0.1.0 still serving, embeddings as
/// base64 and floats, and errors as the SDK's own exception classes (unknown model, unknown field,
/// `n`, tools the 0.1.0 provider cannot express, a tool choice naming no tool, a bad key, another
/// tenant's model).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_sdk_works_against_the_gateway() {
    let python = qlayer_tests::python_tool("python", &["openai==3.57.0"]);
    let (svc, upstream, _tenant, acme) = gateway_service(|_| {}).await;
    model(&svc, &acme, "chat", json!({"deployments": [deployment("ok")]})).await;
    model(&svc, &acme, "cut", json!({"deployments": [deployment("cut-stream")]})).await;
    model(&svc, &acme, "embed", json!({"deployments": [deployment("text-embedding-test")]})).await;
    legacy_model(&svc, &acme).await;
    let (_, other) = svc.tenant("other").await;
    let stdout = run_sdk_script(python, "openai_sdk.py", &svc.base, &acme, &other).await;
    for check in [
        "models",
        "completion",
        "stream",
        "cut stream",
        "tools",
        "structured output",
        "contract 0.1.0",
        "embeddings",
        "errors",
    ] {
        assert!(stdout.contains(&format!("{check}: ok")), "{check} ran: {stdout}");
    }
    // The upstream got the contract's request in its own shape, with the deployment's model.
    let seen = upstream.requests();
    let first = seen.iter().find(|s| s.path == "/v1/chat/completions").unwrap();
    let body: Value = serde_json::from_str(&first.body).unwrap();
    assert_eq!((body["model"].as_str(), body["max_tokens"].as_u64()), (Some("ok"), Some(16)), "{body}");
    svc.stop().await;
}

/// The official `anthropic` SDK against `/v1/messages`, through the same openai provider plugin:
/// a message, a stream's event sequence with usage, a cut stream, and errors as its own classes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_anthropic_sdk_works_against_the_messages_endpoint() {
    let python = qlayer_tests::python_tool("python", &["anthropic==2.16.0"]);
    let (svc, upstream, _tenant, acme) = gateway_service(|_| {}).await;
    model(&svc, &acme, "chat", json!({"deployments": [deployment("ok")]})).await;
    model(&svc, &acme, "cut", json!({"deployments": [deployment("cut-stream")]})).await;
    legacy_model(&svc, &acme).await;
    anthropic_model(&svc, &upstream, &acme).await;
    let stdout = run_sdk_script(python, "anthropic_sdk.py", &svc.base, &acme, "").await;
    for check in
        ["message", "stream", "cut stream", "tool use", "contract 0.1.0", "count tokens", "anthropic plugin", "errors"]
    {
        assert!(stdout.contains(&format!("{check}: ok")), "{check} ran: {stdout}");
    }
    let report = usage(&svc, &acme, "", 3).await;
    assert!(report["data"][0]["requests"].as_i64().unwrap() >= 3, "{report}");
    // Anthropic's tools reached the upstream in OpenAI's shape, translated by the gateway.
    let seen = upstream.requests();
    let with_tools: Value = seen
        .iter()
        .filter_map(|s| serde_json::from_str::<Value>(&s.body).ok())
        .find(|b| b["tools"].is_array())
        .unwrap();
    assert_eq!(with_tools["tools"][0]["function"]["name"], "get_weather", "{with_tools}");
    assert_eq!(with_tools["tool_choice"], json!({"type": "function", "function": {"name": "get_weather"}}));
    svc.stop().await;
}

/// Claude Code itself (the npm package, pinned) against the host in print mode: its request
/// (adaptive thinking, an effort, a context edit, `system` messages under their beta, two dozen
/// tools) is accepted and served through the openai provider plugin to the test upstream, which
/// calls Claude Code's first tool (`Agent`) with arguments streamed in three pieces; Claude Code
/// reassembles them, runs the tool (which refuses the arguments: they are the test upstream's,
/// not the tool's), sends the result back in a second request, and prints the answer to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_works_against_the_messages_endpoint() {
    let claude = qlayer_tests::npm_tool("claude", "@anthropic-ai/claude-code@2.1.197", Some("install.cjs"));
    let (svc, upstream, _tenant, acme) = gateway_service(|_| {}).await;
    model(&svc, &acme, "chat", json!({"deployments": [deployment("ok")]})).await;
    let (home, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (base, key) = (svc.base.clone(), acme.clone());
    let (home_dir, work_dir) = (home.path().to_path_buf(), work.path().to_path_buf());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(claude)
            .args(["-p", "Say hello", "--model", "chat"])
            .current_dir(work_dir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", home_dir)
            .env("ANTHROPIC_BASE_URL", base)
            .env("ANTHROPIC_API_KEY", key)
            .env("DISABLE_TELEMETRY", "1")
            .env("DISABLE_AUTOUPDATER", "1")
            .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // The answer to the tool's result, whose error shows Claude Code parsed the streamed
    // arguments into an object and checked it against the tool's schema.
    assert!(stdout.contains("echo: tool said:") && stdout.contains("InputValidationError"), "{stdout}\n{stderr}");
    let asked: Vec<Value> = upstream
        .requests()
        .iter()
        .filter(|s| s.path == "/v1/chat/completions")
        .filter_map(|s| serde_json::from_str::<Value>(&s.body).ok())
        .collect();
    // Its tools reached the upstream in OpenAI's shape, and its tool result came back as a
    // `tool` message answering the call.
    let names: Vec<&str> =
        asked[0]["tools"].as_array().unwrap().iter().filter_map(|t| t["function"]["name"].as_str()).collect();
    assert!(names.contains(&"Bash") && names.contains(&"Read"), "{names:?}");
    let answered = asked.iter().any(|b| {
        b["messages"]
            .as_array()
            .and_then(|m| m.last())
            .is_some_and(|m| m["role"] == "tool" && m["tool_call_id"] == "call_test_1")
    });
    assert!(answered, "a tool result went back: {asked:?}");
    svc.stop().await;
}

/// Runs one of `tests/sdk/*.py` with the service's base URL and keys; returns its output.
async fn run_sdk_script(python: std::path::PathBuf, script: &str, base: &str, key: &str, other: &str) -> String {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sdk").join(script);
    let (base, key, other) = (base.to_string(), key.to_string(), other.to_string());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .env("QLAYER_BASE", base)
            .env("QLAYER_KEY", key)
            .env("QLAYER_OTHER_KEY", other)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "the SDK script failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// Fallback happens on retryable errors only: a rate-limited deployment falls back to the next;
/// an upstream that refuses the plugin's key does not (the next is never asked). A deployment
/// that keeps failing cools down, and when every deployment of a model cools down the client
/// gets 503 with a Retry-After saying when the first comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_falls_back_on_retryable_errors_only_and_cools_failing_deployments_down() {
    let (svc, upstream, _tenant, acme) = gateway_service(|c| {
        c.gateway.retries = 0;
        c.gateway.breaker_failures = 2;
        c.gateway.breaker_cooldown_ms = 60_000;
    })
    .await;
    model(&svc, &acme, "fallback", json!({"deployments": [deployment("rate-limit"), deployment("ok")]})).await;
    let r = chat(&svc, &acme, "fallback").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.headers["x-qlayer-deployment"], "openai/ok");
    assert_eq!(r.body["choices"][0]["message"]["content"], "echo: hi");
    // Where the time went, stage by stage; the upstream's wait is its own stage.
    let timing = r.headers["server-timing"].to_str().unwrap();
    let stages: Vec<(&str, f64)> = timing
        .split(", ")
        .map(|s| (s.split(';').next().unwrap(), s.rsplit("dur=").next().unwrap().parse().unwrap()))
        .collect();
    let names: Vec<&str> = stages.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["auth", "admit", "table", "instance", "plugin", "upstream", "meter", "render"], "{timing}");
    assert!(stages.iter().all(|(_, d)| *d >= 0.0) && stages[5].1 > 0.0, "{timing}");

    model(&svc, &acme, "strict", json!({"deployments": [deployment("unauthorized"), deployment("ok")]})).await;
    let asked_before = upstream.requests().len();
    let r = chat(&svc, &acme, "strict").await;
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.body["error"]["code"], "upstream_unauthorized", "{r:?}");
    assert_eq!(r.body["error"]["type"], "server_error");
    assert!(r.body["error"]["message"].as_str().unwrap().contains("openai/unauthorized"), "{r:?}");
    assert_eq!(upstream.requests().len(), asked_before + 1, "no fallback after a non-retryable error");

    // error-500 is `unavailable`: retryable; with one deployment, two failures open its circuit.
    model(&svc, &acme, "down", json!({"deployments": [deployment("error-500")]})).await;
    for _ in 0..2 {
        let r = chat(&svc, &acme, "down").await;
        assert_eq!((r.status, r.body["error"]["code"].as_str()), (503, Some("upstream_unavailable")), "{r:?}");
    }
    let asked_before = upstream.requests().len();
    let r = chat(&svc, &acme, "down").await;
    assert_eq!((r.status, r.body["error"]["code"].as_str()), (503, Some("no_healthy_deployment")), "{r:?}");
    let retry_after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((50..=60).contains(&retry_after), "says when the first deployment may be tried: {retry_after}");
    assert_eq!(upstream.requests().len(), asked_before, "a cooling deployment is not asked");
    // Another model sharing no deployment with it is unaffected.
    assert_eq!(chat(&svc, &acme, "fallback").await.status, 200);
    svc.stop().await;
}

/// A stream the upstream cuts after its first chunks: the client gets those chunks, then an error
/// event, and never `[DONE]`; the usage of what was streamed is metered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_stream_ends_with_an_error_event_and_no_done() {
    let (svc, _upstream, _tenant, acme) = gateway_service(|_| {}).await;
    model(&svc, &acme, "cut", json!({"deployments": [deployment("cut-stream")]})).await;
    let r = svc
        .post(
            "/v1/chat/completions",
            &acme,
            json!({"model": "cut", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(r.status, 200, "the first chunk came, so the stream started: {r:?}");
    let events: Vec<&str> = r.text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(!r.text.contains("data: [DONE]"), "{}", r.text);
    let last: Value = serde_json::from_str(events.last().unwrap().trim_start_matches("data: ")).unwrap();
    assert!(last["error"]["message"].as_str().unwrap().contains("openai/cut-stream"), "{last}");
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e.trim_start_matches("data: ")).unwrap())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, "echo: hi", "every chunk before the cut, in order");
    let report = usage(&svc, &acme, "", 1).await;
    assert_eq!(report["data"][0]["errors"], 1, "{report}");
    assert!(report["data"][0]["completion_tokens"].as_i64().unwrap() > 0, "what was streamed is charged: {report}");
    svc.stop().await;
}

/// Usage sums equal what the upstream reported, per model and per key, with the price table's
/// cost; another tenant sees none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_sums_what_the_upstream_reported_per_model_and_key() {
    let (svc, _upstream, _tenant, acme) = gateway_service(|_| {}).await;
    model(&svc, &acme, "chat", json!({"deployments": [deployment("ok")]})).await;
    model(&svc, &acme, "embed", json!({"deployments": [deployment("e")]})).await;
    let (dev_id, dev) = svc.key(&acme, "developer").await;
    for key in [&acme, &acme, &dev] {
        assert_eq!(chat(&svc, key, "chat").await.status, 200);
    }
    let r = svc
        .post(
            "/v1/chat/completions",
            &dev,
            json!({"model": "chat", "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert!(r.text.ends_with("data: [DONE]\n\n"), "{r:?}");
    let r = svc.post("/v1/embeddings", &acme, json!({"model": "embed", "input": ["a", "b"]})).await;
    assert_eq!(r.status, 200, "{r:?}");
    let by_model = usage(&svc, &acme, "group_by=model", 5).await;
    let group = |report: &Value, name: &str| {
        report["data"].as_array().unwrap().iter().find(|g| g["group"] == name).cloned().unwrap_or(Value::Null)
    };
    // Three whole completions of 7 + 3 tokens and a stream of 5 + 2, at 1 and 2 per million.
    let chat_usage = group(&by_model, "chat");
    assert_eq!(chat_usage["requests"], 4, "{by_model}");
    assert_eq!((chat_usage["prompt_tokens"].as_i64(), chat_usage["completion_tokens"].as_i64()), (Some(26), Some(11)));
    assert_eq!(chat_usage["cost_nanos"], (26 + 11 * 2) * 1000, "{chat_usage}");
    assert_eq!(group(&by_model, "embed")["prompt_tokens"], 3, "{by_model}");
    let by_key = usage(&svc, &acme, "group_by=key", 5).await;
    let dev_usage = group(&by_key, &dev_id);
    assert_eq!((dev_usage["requests"].as_i64(), dev_usage["prompt_tokens"].as_i64()), (Some(2), Some(12)), "{by_key}");
    let only_dev = usage(&svc, &acme, &format!("key={dev_id}"), 2).await;
    assert_eq!(only_dev["data"][0]["requests"], 2, "{only_dev}");
    // The gRPC mirror says the same.
    let endpoint = format!("http://{}", svc.running.as_ref().unwrap().grpc_addr);
    let channel = tonic::transport::Endpoint::from_shared(endpoint).unwrap().connect().await.unwrap();
    let bearer = format!("Bearer {acme}");
    let mut usage_client = qlayer_api::grpc::proto::usage_client::UsageClient::with_interceptor(
        channel,
        move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", bearer.parse().unwrap());
            Ok(req)
        },
    );
    let grpc = usage_client
        .get_usage(qlayer_api::grpc::proto::UsageRequest { group_by: "model".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let chat_row = grpc.data.iter().find(|g| g.group == "chat").unwrap();
    assert_eq!((chat_row.requests, chat_row.prompt_tokens, chat_row.cost_nanos), (4, 26, (26 + 11 * 2) * 1000));
    let e = usage_client
        .get_usage(qlayer_api::grpc::proto::UsageRequest { group_by: "week".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let (_, other) = svc.tenant("other").await;
    let theirs = svc.get("/v1/usage", &other).await;
    assert_eq!(theirs.body["data"], json!([]), "{theirs:?}");
    let r = svc.get("/v1/usage?group_by=week", &acme).await;
    assert_eq!((r.status, r.code()), (400, "invalid_request"), "{r:?}");
    svc.stop().await;
}

/// The model table through the API: admins set and remove entries, a deployment must name an
/// installed provider, viewers cannot change it, and errors are in OpenAI's shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_table_is_checked_and_kept_per_tenant() {
    let (svc, _upstream, _tenant, acme) = gateway_service(|_| {}).await;
    for (spec, says) in [
        (json!({"deployments": [{"plugin": "missing"}]}), "no plugin `missing` is installed"),
        (json!({"deployments": []}), "1 to 16 deployments"),
        (json!({"deployments": [{"plugin": "openai", "temperature": 1}]}), "temperature"),
        (json!({"strategy": "fastest", "deployments": [{"plugin": "openai"}]}), "fastest"),
    ] {
        let r = svc.put("/v1/models/m", &acme, spec.clone()).await;
        assert_eq!(r.status, 400, "{spec}: {r:?}");
        assert_eq!(r.body["error"]["type"], "invalid_request_error", "{r:?}");
        assert!(r.body["error"]["message"].as_str().unwrap().contains(says), "{spec}: {r:?}");
    }
    model(&svc, &acme, "m", json!({"strategy": "cost", "deployments": [deployment("ok")]})).await;
    let r = svc.get("/v1/models/m", &acme).await;
    assert_eq!((r.body["id"].as_str(), r.body["strategy"].as_str()), (Some("m"), Some("cost")), "{r:?}");
    let (_, viewer) = svc.key(&acme, "viewer").await;
    assert_eq!(svc.put("/v1/models/m", &viewer, json!({"deployments": [deployment("ok")]})).await.status, 403);
    let r = chat(&svc, &viewer, "m").await;
    assert_eq!((r.status, r.body["error"]["type"].as_str()), (403, Some("permission_error")), "{r:?}");
    assert_eq!(svc.get("/v1/models", &viewer).await.body["data"][0]["id"], "m");
    // Malformed JSON and an unauthenticated call, in OpenAI's shape too.
    let r = svc.send("POST", "/v1/chat/completions", Some(&acme), Some("{\"model\": ".into())).await;
    assert_eq!((r.status, r.body["error"]["code"].as_str()), (400, Some("malformed_json")), "{r:?}");
    let r = svc.send("POST", "/v1/chat/completions", None, Some("{}".into())).await;
    assert_eq!((r.status, r.body["error"]["type"].as_str()), (401, Some("authentication_error")), "{r:?}");
    let r = svc.delete("/v1/models/m", &acme).await;
    assert_eq!((r.status, r.body["deleted"].as_bool()), (200, Some(true)), "{r:?}");
    let r = chat(&svc, &acme, "m").await;
    assert_eq!((r.status, r.body["error"]["code"].as_str()), (404, Some("model_not_found")), "gone at once: {r:?}");
    assert_eq!(svc.delete("/v1/models/m", &acme).await.status, 404);
    svc.stop().await;
}

/// A client that leaves while the upstream is still working: the provider call is dropped with
/// the request (its admission slot frees at once, so with `[gateway] concurrency = 1` the next
/// request is served), and the request is metered as `client_closed` with the prompt it sent,
/// not as the answer the upstream would have given three seconds later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_the_upstream_call_and_is_charged_what_it_sent() {
    let (svc, upstream, _tenant, acme) = gateway_service(|c| c.gateway.concurrency = 1).await;
    model(&svc, &acme, "slow", json!({"deployments": [deployment("slow")]})).await;
    model(&svc, &acme, "chat", json!({"deployments": [deployment("ok")]})).await;
    let impatient = reqwest::Client::builder().no_proxy().timeout(Duration::from_millis(500)).build().unwrap();
    let gone = impatient
        .post(format!("{}/v1/chat/completions", svc.base))
        .bearer_auth(&acme)
        .json(&json!({"model": "slow", "messages": [{"role": "user", "content": "hi there you"}]}))
        .send()
        .await;
    assert!(gone.is_err(), "the client gave up: {gone:?}");
    assert!(upstream.requests().iter().any(|s| s.body.contains("\"slow\"")), "the upstream was asked");
    // The only slot is free again: this is served, not queued behind the abandoned call.
    let r = chat(&svc, &acme, "chat").await;
    assert_eq!(r.status, 200, "{r:?}");
    let report = usage(&svc, &acme, "group_by=model&model=slow", 1).await;
    let slow = &report["data"][0];
    assert_eq!(slow["errors"], 1, "metered as client_closed, not as an answer: {report}");
    assert_eq!((slow["prompt_tokens"].as_i64(), slow["completion_tokens"].as_i64()), (Some(3), Some(0)), "{report}");
    // Three seconds on, the upstream's late answer changed nothing.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let report = usage(&svc, &acme, "group_by=model&model=slow", 1).await;
    assert_eq!(report["data"][0]["requests"], 1, "{report}");
    svc.stop().await;
}

/// One line of server config fronts an OpenAI-compatible upstream for every tenant: a model name
/// no table has is asked of the upstream as it is, with no plugin installed and no model set; the
/// server's default entries apply to every tenant, and a tenant's own entry of the same name wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_line_of_config_fronts_an_upstream_for_every_tenant() {
    let upstream = TestServer::start().await;
    let url = format!("{}/v1", upstream.url());
    let svc = service(Backend::Sqlite, false, |c| {
        c.gateway.upstream = Some(url.clone());
        c.gateway.models.insert(
            "fast".into(),
            serde_json::from_value(json!({"deployments": [{"plugin": "upstream", "model": "ok"}]})).unwrap(),
        );
    })
    .await;
    let (_, acme) = svc.tenant("acme").await;
    let r = chat(&svc, &acme, "llama3.1").await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        (r.body["model"].as_str(), r.headers["x-qlayer-deployment"].to_str().unwrap()),
        (Some("llama3.1"), "upstream/llama3.1")
    );
    let asked: Value = serde_json::from_str(&upstream.requests().last().unwrap().body).unwrap();
    assert_eq!(asked["model"], "llama3.1", "asked of the upstream as it is");
    let r = chat(&svc, &acme, "fast").await;
    assert_eq!((r.status, r.headers["x-qlayer-deployment"].to_str().unwrap()), (200, "upstream/ok"), "{r:?}");
    // The list: the server's default, then the upstream's own models (the test server has
    // `ok` and `slow`).
    let listed = svc.get("/v1/models", &acme).await;
    let ids: Vec<&str> = listed.body["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["fast", "ok", "slow"], "{listed:?}");
    assert_eq!(svc.get("/v1/models/fast", &acme).await.body["deployments"][0]["model"], "ok");
    // The tenant's own entry wins over the default.
    svc.put("/v1/models/fast", &acme, json!({"deployments": [{"plugin": "upstream", "model": "slow"}]})).await;
    let (_, other) = svc.tenant("other").await;
    assert_eq!(
        chat(&svc, &other, "fast").await.headers["x-qlayer-deployment"],
        "upstream/ok",
        "other tenants keep the default"
    );
    let r = svc
        .send(
            "POST",
            "/v1/chat/completions",
            Some(&acme),
            Some(json!({"model": "bad name!", "messages": [{"role": "user", "content": "x"}]}).to_string()),
        )
        .await;
    assert_eq!((r.status, r.body["error"]["code"].as_str()), (404, Some("model_not_found")), "{r:?}");
    svc.stop().await;
}

/// Installs for `key`'s tenant the anthropic plugin, asking the test server's Anthropic double
/// with the key from `PATH` (an operator-offered variable, see `service`), as model `claude`.
async fn anthropic_model(svc: &Svc, upstream: &TestServer, key: &str) {
    let grants = json!({
        "hosts": [upstream.url().trim_start_matches("http://")],
        "config": {"base_url": upstream.url()},
        "secrets": {"api_key": "PATH"}
    });
    let wasm = qlayer_bundled::bundled_plugin("anthropic").unwrap();
    let r = svc.install_with(key, "providers/anthropic", wasm, Some(grants)).await;
    assert_eq!(r.status, 201, "{r:?}");
    model(svc, key, "claude", json!({"deployments": [{"plugin": "anthropic", "model": "claude-test"}]})).await;
}

/// One provider plugin serves either API and the gateway translates both ways: OpenAI's chat
/// completions with tools, routed to the `anthropic` plugin, reach the Anthropic test server
/// (which checks Anthropic's wire format) as `tool_use`/`tool_result` blocks, and its tool calls
/// come back in OpenAI's shape, whole and as streamed argument deltas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_requests_with_tools_are_served_by_the_anthropic_plugin() {
    let (svc, upstream, _tenant, acme) = gateway_service(|_| {}).await;
    anthropic_model(&svc, &upstream, &acme).await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}}]);
    let ask = json!([{"role": "user", "content": "weather in Oslo?"}]);
    let r = svc.post("/v1/chat/completions", &acme, json!({"model": "claude", "messages": ask, "tools": tools})).await;
    assert_eq!(r.status, 200, "{r:?}");
    let choice = &r.body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{}", r.body);
    let call = choice["message"]["tool_calls"][0].clone();
    assert_eq!((call["id"].as_str(), call["function"]["name"].as_str()), (Some("toolu_test_1"), Some("get_weather")));
    assert_eq!(
        serde_json::from_str::<Value>(call["function"]["arguments"].as_str().unwrap()).unwrap(),
        json!({"text": "weather in Oslo?"})
    );

    let r = svc
        .post(
            "/v1/chat/completions",
            &acme,
            json!({"model": "claude", "messages": ask, "tools": tools, "stream": true}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let mut args = String::new();
    for line in r.text.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|l| *l != "[DONE]") {
        let chunk: Value = serde_json::from_str(line).unwrap();
        if let Some(piece) = chunk["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str() {
            args.push_str(piece);
        }
    }
    assert_eq!(args, call["function"]["arguments"].as_str().unwrap(), "{}", r.text);
    assert!(r.text.contains(r#""finish_reason":"tool_calls""#) && r.text.ends_with("data: [DONE]\n\n"), "{}", r.text);

    let history = json!([{"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "toolu_test_1", "content": "sunny"}]);
    let r =
        svc.post("/v1/chat/completions", &acme, json!({"model": "claude", "messages": history, "tools": tools})).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["choices"][0]["message"]["content"], "echo: tool said: sunny");
    let sent: Value = serde_json::from_str(&upstream.requests().last().unwrap().body).unwrap();
    assert_eq!(sent["messages"][2]["content"][0]["type"], "tool_result", "{sent}");
    // The key came from the variable the operator offered, as Anthropic's header.
    let path = std::env::var("PATH").unwrap();
    assert_eq!(upstream.requests().last().unwrap().header("x-api-key"), Some(path.as_str()));
    svc.stop().await;
}
