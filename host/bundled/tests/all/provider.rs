//! The `openai` provider plugin against the local OpenAI-compatible test server (a test double):
//! plain, streaming, embeddings, models, and every upstream failure mapped to the right error.

use qlayer_bundled::{self as embedded, ProviderChoice};
use qlayer_runtime::{
    CallErrorKind, CompletionRequest, ContentPart, EmbeddingRequest, FinishReason, ImageUrl, Installed, JsonSchema,
    Message, PluginError, ResponseFormat, Role, Runtime, Secret, ToolChoice, ToolDefinition,
};
use qlayer_tests::{TestServer, runtime};
use std::time::Duration;

fn request(model: &str) -> CompletionRequest {
    CompletionRequest {
        max_tokens: Some(16),
        temperature: Some(0.0),
        ..CompletionRequest::new(model, vec![Message::new(Role::System, "be brief"), Message::new(Role::User, "hi")])
    }
}

async fn openai(rt: &Runtime, server: &TestServer, key: Option<&str>) -> Installed {
    let choice =
        ProviderChoice::OpenAi { base_url: format!("{}/v1", server.url()), model: None, api_key: key.map(Secret::new) };
    embedded::install_provider(rt, &choice, None).await.unwrap()
}

async fn fails_with(installed: &Installed, model: &str) -> PluginError {
    crate::plugin_error(installed, &request(model)).await
}

#[tokio::test]
async fn plain_completion_with_usage_and_bearer_key() {
    let server = TestServer::start().await;
    let rt = runtime();
    let installed = openai(&rt, &server, Some("sk-test-key")).await;
    let reply = installed.provider("t").await.unwrap().complete(&request("ok")).await.unwrap();
    assert_eq!(reply.text, "echo: hi");
    assert_eq!(reply.model, "ok");
    assert_eq!(reply.finish_reason, FinishReason::Stop);
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
    assert_eq!(finish, Some(FinishReason::Stop));
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

fn weather_tool() -> ToolDefinition {
    ToolDefinition {
        name: "get_weather".into(),
        description: Some("The weather now".into()),
        parameters_json: r#"{"type":"object","properties":{"text":{"type":"string"}},"required":["text"]}"#.into(),
        strict: true,
    }
}

#[tokio::test]
async fn tools_go_out_in_openai_shape_and_tool_calls_come_back_whole_and_streamed() {
    let server = TestServer::start().await;
    let rt = runtime();
    let installed = openai(&rt, &server, None).await;
    let mut p = installed.provider("t").await.unwrap();
    let ask = CompletionRequest {
        tools: vec![weather_tool()],
        tool_choice: Some(ToolChoice::Named("get_weather".into())),
        parallel_tool_calls: Some(false),
        top_p: Some(0.9),
        seed: Some(42),
        user: Some("end-user-1".into()),
        ..request("ok")
    };
    let reply = p.complete(&ask).await.unwrap();
    assert_eq!(reply.finish_reason, FinishReason::ToolCalls);
    assert_eq!(reply.tool_calls.len(), 1);
    assert_eq!((reply.tool_calls[0].id.as_str(), reply.tool_calls[0].name.as_str()), ("call_test_1", "get_weather"));
    assert_eq!(serde_json::from_str::<serde_json::Value>(&reply.tool_calls[0].arguments).unwrap()["text"], "hi");
    let body: serde_json::Value = serde_json::from_str(&server.requests()[0].body).unwrap();
    assert_eq!(
        body["tools"][0],
        serde_json::json!({"type": "function", "function": {"name": "get_weather", "description": "The weather now",
            "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}, "strict": true}})
    );
    assert_eq!(body["tool_choice"], serde_json::json!({"type": "function", "function": {"name": "get_weather"}}));
    assert_eq!(
        (body["parallel_tool_calls"].clone(), body["seed"].clone()),
        (serde_json::json!(false), serde_json::json!(42))
    );
    assert_eq!(
        (body["top_p"].as_f64().map(|p| (p * 10.0).round()), body["user"].clone()),
        (Some(9.0), serde_json::json!("end-user-1"))
    );

    // Streamed: the id and name first, the arguments in pieces that join to the whole.
    let mut stream = p.stream(&ask).await.unwrap();
    let (mut pieces, mut args, mut first, mut finish) = (0, String::new(), None, None);
    while let Some(chunk) = stream.next().await.unwrap() {
        for t in chunk.tool_calls {
            assert_eq!(t.index, 0);
            if first.is_none() {
                first = Some((t.id.clone(), t.name.clone()));
            } else {
                assert!(t.id.is_none() && t.name.is_none(), "only the first piece names the call");
            }
            pieces += 1;
            args.push_str(&t.arguments);
        }
        finish = chunk.finish_reason.or(finish);
    }
    assert_eq!(first, Some((Some("call_test_1".into()), Some("get_weather".into()))));
    assert!(pieces >= 3, "the arguments arrive in pieces: {pieces}");
    assert_eq!(args, reply.tool_calls[0].arguments);
    assert_eq!(finish, Some(FinishReason::ToolCalls));

    // The tool's result goes back as a `tool` message answering the call.
    let mut call = Message::new(Role::Assistant, "");
    call.content.clear();
    call.tool_calls = reply.tool_calls.clone();
    let mut result = Message::new(Role::Tool, "sunny, 21 C");
    result.tool_call_id = Some("call_test_1".into());
    let mut follow_up = ask.clone();
    follow_up.tool_choice = None;
    follow_up.messages.extend([call, result]);
    let answer = p.complete(&follow_up).await.unwrap();
    assert_eq!(answer.text, "echo: tool said: sunny, 21 C");
    let body: serde_json::Value = serde_json::from_str(&server.requests().last().unwrap().body).unwrap();
    assert_eq!(body["messages"][2]["tool_calls"][0]["function"]["name"], "get_weather");
    assert_eq!(body["messages"][2]["content"], serde_json::Value::Null);
    assert_eq!(
        body["messages"][3],
        serde_json::json!({"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_test_1"})
    );
}

#[tokio::test]
async fn a_json_schema_response_format_and_images_reach_the_upstream() {
    let server = TestServer::start().await;
    let rt = runtime();
    let installed = openai(&rt, &server, None).await;
    let mut ask = CompletionRequest {
        response_format: ResponseFormat::JsonSchema(JsonSchema {
            name: "city".into(),
            description: None,
            schema_json: r#"{"type":"object","properties":{"name":{"type":"string"},"population":{"type":"integer"}}}"#
                .into(),
            strict: true,
        }),
        ..request("ok")
    };
    ask.messages[1]
        .content
        .push(ContentPart::ImageUrl(ImageUrl { url: "data:image/png;base64,AA==".into(), detail: Some("low".into()) }));
    let reply = installed.provider("t").await.unwrap().complete(&ask).await.unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&reply.text).unwrap();
    assert_eq!(parsed["population"], 1);
    let body: serde_json::Value = serde_json::from_str(&server.requests()[0].body).unwrap();
    assert_eq!(body["response_format"]["type"], "json_schema");
    assert_eq!(body["response_format"]["json_schema"]["name"], "city");
    assert_eq!(body["response_format"]["json_schema"]["schema"]["properties"]["population"]["type"], "integer");
    assert_eq!(
        body["messages"][1]["content"],
        serde_json::json!([{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA==", "detail": "low"}}])
    );
    // A schema that is not JSON is refused before anything is sent.
    let mut bad = ask.clone();
    bad.response_format = ResponseFormat::JsonSchema(JsonSchema {
        name: "x".into(),
        description: None,
        schema_json: "{".into(),
        strict: false,
    });
    let err = installed.provider("t").await.unwrap().complete(&bad).await.unwrap_err();
    assert!(
        matches!(&err.kind, CallErrorKind::Plugin(PluginError::InvalidInput(m)) if m.contains("response schema `x`")),
        "{err}"
    );
    assert_eq!(server.requests().len(), 1);
}

fn preset_grants(server: &TestServer, preset: &str) -> qlayer_runtime::Grants {
    let mut grants = qlayer_runtime::Grants::default();
    grants.outbound_hosts.push(qlayer_runtime::HostPattern::parse(&server.addr.to_string()).unwrap());
    grants.config.insert("preset".into(), preset.into());
    grants.config.insert("base_url".into(), server.url());
    grants.secrets.insert("api_key".into(), Secret::new("azure-key-1"));
    grants
}

#[tokio::test]
async fn the_azure_preset_addresses_deployments_with_an_api_version_and_the_api_key_header() {
    let server = TestServer::start().await;
    let rt = runtime();
    let plugin = rt.load(embedded::bundled_plugin("openai").unwrap()).unwrap();
    let mut grants = preset_grants(&server, "azure");
    grants.config.insert("api_version".into(), "2024-10-21".into());
    let installed = plugin.install(grants).unwrap();
    let mut p = installed.provider("t").await.unwrap();
    let reply = p.complete(&request("gpt4o-prod")).await.unwrap();
    assert_eq!((reply.text.as_str(), reply.model.as_str()), ("echo: hi", "gpt4o-prod"));
    let mut stream = p.stream(&request("gpt4o-prod")).await.unwrap();
    let mut text = String::new();
    while let Some(c) = stream.next().await.unwrap() {
        text.push_str(&c.delta);
    }
    assert_eq!(text, "echo: hi");
    p.embed(&EmbeddingRequest { model: "ada-prod".into(), inputs: vec!["a".into()] }).await.unwrap();
    let seen = server.requests();
    assert_eq!(seen[0].path, "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21");
    assert_eq!(seen[2].path, "/openai/deployments/ada-prod/embeddings?api-version=2024-10-21");
    for s in &seen {
        assert_eq!((s.api_key.as_deref(), s.authorization.as_deref()), (Some("azure-key-1"), None), "{}", s.path);
    }
}

#[tokio::test]
async fn an_unknown_preset_and_azure_without_an_endpoint_are_refused_by_name() {
    let server = TestServer::start().await;
    let rt = runtime();
    let plugin = rt.load(embedded::bundled_plugin("openai").unwrap()).unwrap();
    let installed = plugin.install(preset_grants(&server, "openia")).unwrap();
    assert!(
        matches!(fails_with(&installed, "ok").await, PluginError::InvalidInput(m) if m.contains("`preset` is `openia`"))
    );
    let mut grants = preset_grants(&server, "azure");
    grants.config.remove("base_url");
    let installed = plugin.install(grants).unwrap();
    assert!(
        matches!(fails_with(&installed, "ok").await, PluginError::InvalidInput(m) if m.contains("needs config `base_url`"))
    );
    assert!(server.requests().is_empty());
}
