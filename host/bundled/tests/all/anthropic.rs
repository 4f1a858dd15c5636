//! The `anthropic` provider plugin against the local Anthropic-compatible test server (a test
//! double that checks the Messages wire format: headers, fields, alternating roles, blocks): text,
//! streams, tool use whole and streamed, a tool round trip, structured output, and every upstream
//! failure mapped to the contract's errors.

use qlayer_runtime::{
    CompletionRequest, FinishReason, Grants, HostPattern, Installed, JsonSchema, Message, PluginError, ResponseFormat,
    Role, Secret, ToolChoice, ToolDefinition,
};
use qlayer_tests::{TestServer, runtime};
use serde_json::{Value, json};

fn install(rt: &qlayer_runtime::Runtime, server: &TestServer, key: Option<&str>) -> Installed {
    let plugin = rt.load(qlayer_bundled::bundled_plugin("anthropic").unwrap()).unwrap();
    let mut grants = Grants::default();
    grants.outbound_hosts.push(HostPattern::parse(&server.addr.to_string()).unwrap());
    grants.config.insert("base_url".into(), server.url());
    if let Some(key) = key {
        grants.secrets.insert("api_key".into(), Secret::new(key));
    }
    plugin.install(grants).unwrap()
}

fn ask(model: &str, text: &str) -> CompletionRequest {
    CompletionRequest::new(model, vec![Message::new(Role::System, "be brief"), Message::new(Role::User, text)])
}

fn weather() -> ToolDefinition {
    ToolDefinition {
        name: "get_weather".into(),
        description: Some("The weather now".into()),
        parameters_json: r#"{"type":"object","properties":{"text":{"type":"string"}}}"#.into(),
        strict: false,
    }
}

fn body(server: &TestServer, i: usize) -> Value {
    serde_json::from_str(&server.requests()[i].body).unwrap()
}

#[tokio::test]
async fn a_message_with_its_headers_system_prompt_and_cached_input_counted() {
    let server = TestServer::start().await;
    let rt = runtime();
    let mut p = install(&rt, &server, Some("sk-ant-test")).provider("t").await.unwrap();
    let reply = p.complete(&ask("claude-test", "hi")).await.unwrap();
    assert_eq!((reply.text.as_str(), reply.finish_reason.clone()), ("echo: hi", FinishReason::Stop));
    assert_eq!((reply.usage.prompt_tokens, reply.usage.completion_tokens), (9, 3), "cache reads count as input");
    let seen = &server.requests()[0];
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!((seen.header("x-api-key"), seen.header("anthropic-version")), (Some("sk-ant-test"), Some("2023-06-01")));
    assert_eq!(seen.authorization, None);
    let sent = body(&server, 0);
    assert_eq!(sent["system"], "be brief");
    assert_eq!(sent["max_tokens"], 4096, "the API requires max_tokens; the configured default is sent");
    assert_eq!(sent["messages"], json!([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]));

    let mut stream = p.stream(&ask("claude-test", "there")).await.unwrap();
    let (mut text, mut usage, mut finish) = (String::new(), None, None);
    while let Some(c) = stream.next().await.unwrap() {
        text.push_str(&c.delta);
        usage = c.usage.or(usage);
        finish = c.finish_reason.or(finish);
    }
    assert_eq!((text.as_str(), finish), ("echo: there", Some(FinishReason::Stop)));
    let usage = usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (5, 2));
}

#[tokio::test]
async fn tool_use_whole_and_streamed_and_a_tool_result_round_trip() {
    let server = TestServer::start().await;
    let rt = runtime();
    let mut p = install(&rt, &server, Some("k")).provider("t").await.unwrap();
    let request = CompletionRequest {
        tools: vec![weather()],
        tool_choice: Some(ToolChoice::Named("get_weather".into())),
        parallel_tool_calls: Some(false),
        top_k: Some(20),
        user: Some("end-user".into()),
        ..ask("claude-test", "weather in Oslo?")
    };
    let reply = p.complete(&request).await.unwrap();
    assert_eq!(reply.finish_reason, FinishReason::ToolCalls);
    assert_eq!((reply.tool_calls[0].id.as_str(), reply.tool_calls[0].name.as_str()), ("toolu_test_1", "get_weather"));
    assert_eq!(
        serde_json::from_str::<Value>(&reply.tool_calls[0].arguments).unwrap(),
        json!({"text": "weather in Oslo?"})
    );
    let sent = body(&server, 0);
    assert_eq!(
        sent["tools"],
        json!([{"name": "get_weather", "description": "The weather now",
                "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}}}])
    );
    assert_eq!(sent["tool_choice"], json!({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true}));
    assert_eq!((sent["top_k"].clone(), sent["metadata"].clone()), (json!(20), json!({"user_id": "end-user"})));

    let mut stream = p.stream(&request).await.unwrap();
    let (mut args, mut pieces, mut first) = (String::new(), 0, None);
    while let Some(c) = stream.next().await.unwrap() {
        for t in c.tool_calls {
            assert_eq!(t.index, 0);
            if t.id.is_some() {
                first = Some((t.id, t.name));
            }
            args.push_str(&t.arguments);
            pieces += 1;
        }
    }
    assert_eq!(first, Some((Some("toolu_test_1".into()), Some("get_weather".into()))));
    assert!(pieces >= 3, "{pieces}");
    assert_eq!(args, reply.tool_calls[0].arguments);

    let mut call = Message::new(Role::Assistant, "");
    call.content.clear();
    call.tool_calls = reply.tool_calls.clone();
    let mut result = Message::new(Role::Tool, "sunny");
    result.tool_call_id = Some("toolu_test_1".into());
    let mut follow_up = CompletionRequest { tool_choice: None, ..request.clone() };
    follow_up.messages.extend([call, result]);
    let answer = p.complete(&follow_up).await.unwrap();
    assert_eq!(answer.text, "echo: tool said: sunny");
    let sent = body(&server, 2);
    assert_eq!(sent["messages"][1]["content"][0]["type"], "tool_use");
    assert_eq!(
        sent["messages"][2],
        json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_test_1", "content": [{"type": "text", "text": "sunny"}]}]})
    );
}

#[tokio::test]
async fn structured_output_json_mode_and_what_the_api_lacks() {
    let server = TestServer::start().await;
    let rt = runtime();
    let installed = install(&rt, &server, Some("k"));
    let mut p = installed.provider("t").await.unwrap();
    let schema = CompletionRequest {
        response_format: ResponseFormat::JsonSchema(JsonSchema {
            name: "city".into(),
            description: None,
            schema_json: r#"{"type":"object","properties":{"name":{"type":"string"},"population":{"type":"integer"}}}"#
                .into(),
            strict: true,
        }),
        ..ask("claude-test", "a city")
    };
    let reply = p.complete(&schema).await.unwrap();
    assert_eq!(serde_json::from_str::<Value>(&reply.text).unwrap(), json!({"name": "echo: a city", "population": 1}));
    let seen = &server.requests()[0];
    assert!(seen.header("anthropic-beta").is_some_and(|b| b.contains("structured-outputs")), "{:?}", seen.headers);
    assert_eq!(body(&server, 0)["output_format"]["type"], "json_schema");

    let json_mode = CompletionRequest { response_format: ResponseFormat::JsonObject, ..ask("claude-test", "x") };
    p.complete(&json_mode).await.unwrap();
    assert!(
        body(&server, 1)["system"].as_str().unwrap().contains("one JSON object"),
        "JSON mode is asked in the system prompt"
    );

    let seeded = CompletionRequest { seed: Some(1), ..ask("claude-test", "x") };
    assert!(
        matches!(crate::plugin_error(&installed, &seeded).await, PluginError::InvalidInput(m) if m.contains("seed"))
    );
    let e =
        p.embed(&qlayer_runtime::EmbeddingRequest { model: "x".into(), inputs: vec!["a".into()] }).await.unwrap_err();
    assert!(e.to_string().contains("no embeddings"), "{e}");
    assert_eq!(server.requests().len(), 2, "refused requests are not sent");
}

#[tokio::test]
async fn upstream_failures_map_to_the_contract() {
    let server = TestServer::start().await;
    let rt = runtime();
    let installed = install(&rt, &server, Some("k"));
    assert_eq!(crate::plugin_error(&installed, &ask("rate-limit", "x")).await, PluginError::RateLimited(Some(2000)));
    assert!(
        matches!(crate::plugin_error(&installed, &ask("overloaded", "x")).await, PluginError::Unavailable(m) if m.contains("529"))
    );
    let no_key = install(&rt, &server, None);
    assert!(
        matches!(crate::plugin_error(&no_key, &ask("claude-test", "x")).await, PluginError::Unauthorized(m) if m.contains("401"))
    );
    let mut p = installed.provider("t").await.unwrap();
    let mut stream = p.stream(&ask("cut-stream", "x")).await.unwrap();
    let mut result = stream.next().await;
    while matches!(result, Ok(Some(_))) {
        result = stream.next().await;
    }
    assert!(matches!(result, Err(e) if e.to_string().contains("message_stop")));
}
