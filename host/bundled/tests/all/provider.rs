//! The `openai` provider plugin against the local OpenAI-compatible test server (a test double):
//! plain, streaming, embeddings, models, and every upstream failure mapped to the right error.

use qlayer_bundled::{self as embedded, ProviderChoice};
use qlayer_runtime::{
    CallErrorKind, CompletionRequest, EmbeddingRequest, Installed, Message, PluginError, Role, Runtime, Secret,
};
use qlayer_tests::{TestServer, runtime};
use std::time::Duration;

fn request(model: &str) -> CompletionRequest {
    CompletionRequest {
        model: model.into(),
        messages: vec![
            Message { role: Role::System, content: "be brief".into() },
            Message { role: Role::User, content: "hi".into() },
        ],
        max_tokens: Some(16),
        temperature: Some(0.0),
        stop: vec![],
        json_output: false,
    }
}

async fn openai(rt: &Runtime, server: &TestServer, key: Option<&str>) -> Installed {
    let choice =
        ProviderChoice::OpenAi { base_url: format!("{}/v1", server.url()), model: None, api_key: key.map(Secret::new) };
    embedded::install_provider(rt, &choice, None).await.unwrap()
}

async fn fails_with(installed: &Installed, model: &str) -> PluginError {
    let err = installed.provider("t").await.unwrap().complete(&request(model)).await.unwrap_err();
    match err.kind {
        CallErrorKind::Plugin(e) => e,
        other => panic!("expected a plugin error for {model}, got {other:?}"),
    }
}

#[tokio::test]
async fn plain_completion_with_usage_and_bearer_key() {
    let server = TestServer::start().await;
    let rt = runtime();
    let installed = openai(&rt, &server, Some("sk-test-key")).await;
    let reply = installed.provider("t").await.unwrap().complete(&request("ok")).await.unwrap();
    assert_eq!(reply.text, "echo: hi");
    assert_eq!(reply.model, "ok");
    assert_eq!(reply.finish_reason, "stop");
    assert_eq!((reply.usage.prompt_tokens, reply.usage.completion_tokens), (7, 3));
    let seen = server.requests();
    assert_eq!(seen[0].path, "/v1/chat/completions");
    assert_eq!(seen[0].authorization.as_deref(), Some("Bearer sk-test-key"));
    let body: serde_json::Value = serde_json::from_str(&seen[0].body).unwrap();
    assert_eq!(body["max_tokens"], 16);
    assert_eq!(body["messages"][0]["role"], "system");
}

#[tokio::test]
async fn no_key_means_no_authorization_header() {
    // Local servers (Ollama, vLLM, llama.cpp) need no key, and none is invented.
    let server = TestServer::start().await;
    let rt = runtime();
    let installed = openai(&rt, &server, None).await;
    installed.provider("t").await.unwrap().complete(&request("ok")).await.unwrap();
    assert_eq!(server.requests()[0].authorization, None);
}

#[tokio::test]
async fn streaming_yields_chunks_then_usage_then_ends() {
    let server = TestServer::start().await;
    let rt = runtime();
    let installed = openai(&rt, &server, None).await;
    let mut provider = installed.provider("t").await.unwrap();
    let mut stream = provider.stream(&request("ok")).await.unwrap();
    let (mut text, mut usage, mut finish) = (String::new(), None, None);
    while let Some(chunk) = stream.next().await.unwrap() {
        text.push_str(&chunk.delta);
        usage = chunk.usage.or(usage);
        finish = chunk.finish_reason.or(finish);
    }
    assert_eq!(text, "echo: hi");
    assert_eq!(finish.as_deref(), Some("stop"));
    let usage = usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (5, 2));
    let body: serde_json::Value = serde_json::from_str(&server.requests()[0].body).unwrap();
    assert_eq!(body["stream"], true);
}

#[tokio::test]
async fn a_stream_cut_before_done_is_an_error_not_a_clean_end() {
    let server = TestServer::start().await;
    let rt = runtime();
    let installed = openai(&rt, &server, None).await;
    let mut provider = installed.provider("t").await.unwrap();
    let mut stream = provider.stream(&request("cut-stream")).await.unwrap();
    let mut result = Ok(None);
    for _ in 0..10 {
        result = stream.next().await;
        if !matches!(result, Ok(Some(_))) {
            break;
        }
    }
    let err = result.unwrap_err();
    assert!(matches!(&err.kind, CallErrorKind::Plugin(PluginError::Unavailable(m)) if m.contains("[DONE]")), "{err}");
}

#[tokio::test]
async fn upstream_failures_map_to_the_contract() {
    let server = TestServer::start().await;
    let rt = runtime();
    let installed = openai(&rt, &server, None).await;
    assert_eq!(fails_with(&installed, "rate-limit").await, PluginError::RateLimited(Some(2000)));
    assert!(
        matches!(fails_with(&installed, "error-500").await, PluginError::Unavailable(m) if m.contains("500") && m.contains("upstream exploded"))
    );
    assert!(matches!(fails_with(&installed, "unauthorized").await, PluginError::Unauthorized(m) if m.contains("401")));
    assert!(
        matches!(fails_with(&installed, "malformed").await, PluginError::Unavailable(m) if m.contains("malformed"))
    );
}

#[tokio::test]
async fn a_slow_upstream_past_the_deadline_is_a_timeout() {
    let server = TestServer::start().await;
    let rt = runtime();
    // The host's per-call deadline (1 s) is shorter than the upstream's 3 s.
    let installed = openai(&rt, &server, None).await.with_timeout(Duration::from_secs(1));
    let err = installed.provider("t").await.unwrap().complete(&request("slow")).await.unwrap_err();
    assert!(matches!(err.kind, CallErrorKind::Timeout(_)), "{err}");
    assert!(err.is_retryable());
}

#[tokio::test]
async fn a_slow_upstream_past_the_configured_http_timeout_is_a_plugin_timeout() {
    let server = TestServer::start().await;
    let rt = runtime();
    let plugin = rt.load(embedded::bundled_plugin("openai").unwrap()).unwrap();
    let mut grants = qlayer_runtime::Grants::default();
    grants.outbound_hosts.push(qlayer_runtime::HostPattern::parse(&server.addr.to_string()).unwrap());
    grants.config.insert("base_url".into(), format!("{}/v1", server.url()));
    grants.config.insert("timeout_ms".into(), "300".into());
    let installed = plugin.install(grants).unwrap();
    assert_eq!(fails_with(&installed, "slow").await, PluginError::Timeout);
}

#[tokio::test]
async fn models_and_embeddings() {
    let server = TestServer::start().await;
    let rt = runtime();
    let installed = openai(&rt, &server, None).await;
    let mut provider = installed.provider("t").await.unwrap();
    let models = provider.models().await.unwrap();
    assert_eq!(models.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["ok", "slow"]);
    let embeddings = provider
        .embed(&EmbeddingRequest { model: "emb".into(), inputs: vec!["a".into(), "b".into(), "c".into()] })
        .await
        .unwrap();
    // The server answers in reverse index order; vectors come back in input order.
    assert_eq!(embeddings.vectors.iter().map(|v| v[0]).collect::<Vec<_>>(), [0.0, 1.0, 2.0]);
}

#[tokio::test]
async fn a_request_without_a_model_and_no_default_is_invalid_input() {
    let server = TestServer::start().await;
    let rt = runtime();
    let installed = openai(&rt, &server, None).await;
    let err = fails_with(&installed, "").await;
    assert!(matches!(err, PluginError::InvalidInput(m) if m.contains("no model")));
    assert!(server.requests().is_empty());
}

#[tokio::test]
async fn the_scripted_provider_is_deterministic_and_streams() {
    let rt = runtime();
    let installed = embedded::install_provider(&rt, &ProviderChoice::Scripted { script: None }, None).await.unwrap();
    let mut p = installed.provider("t").await.unwrap();
    let a = p.complete(&request("")).await.unwrap();
    let b = p.complete(&request("")).await.unwrap();
    assert_eq!(a.text, b.text);
    assert!(a.text.contains("test double"), "the scripted provider must say what it is: {}", a.text);
    let mut stream = p.stream(&request("")).await.unwrap();
    let mut text = String::new();
    while let Some(c) = stream.next().await.unwrap() {
        text.push_str(&c.delta);
    }
    assert_eq!(text, a.text);
}

#[test]
fn secrets_never_reach_the_logs_even_at_trace_level() {
    let key = "sk-very-secret-4f1d2a";
    let logs = qlayer_tests::capture_logs(|| {
        qlayer_tests::current_thread().block_on(async {
            let server = TestServer::start().await;
            let rt = runtime();
            let installed = openai(&rt, &server, Some(key)).await;
            let mut p = installed.provider("t").await.unwrap();
            p.complete(&request("ok")).await.unwrap();
            let _ = p.complete(&request("unauthorized")).await;
            assert_eq!(server.requests()[0].authorization.as_deref(), Some(format!("Bearer {key}").as_str()));
        });
    });
    assert!(logs.contains("outbound request"), "the host logs each outbound request: {logs}");
    assert!(!logs.contains(key), "the API key leaked into the logs");
}
