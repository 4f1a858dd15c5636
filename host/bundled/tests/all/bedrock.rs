//! The `bedrock` provider plugin against the local Bedrock test double, which verifies every
//! request's AWS Signature Version 4 with its own implementation and checks Converse's wire
//! format: text, streams (the binary event stream), tool use whole and streamed, a tool round
//! trip, and every failure mapped to the contract's errors.

use qlayer_runtime::{
    CallErrorKind, CompletionRequest, FinishReason, Grants, HostPattern, Installed, JsonSchema, Message, PluginError,
    ResponseFormat, Role, Secret, ToolChoice, ToolDefinition,
};
use qlayer_tests::bedrock::{ACCESS_KEY, SECRET_KEY};
use qlayer_tests::{TestServer, runtime};
use serde_json::{Value, json};

fn grants(server: &TestServer, secret: &str) -> Grants {
    let mut grants = Grants::default();
    grants.outbound_hosts.push(HostPattern::parse(&server.addr.to_string()).unwrap());
    grants.config.insert("base_url".into(), server.url());
    grants.config.insert("region".into(), "eu-west-1".into());
    grants.secrets.insert("access_key_id".into(), Secret::new(ACCESS_KEY));
    grants.secrets.insert("secret_access_key".into(), Secret::new(secret));
    grants
}

fn install(rt: &qlayer_runtime::Runtime, grants: Grants) -> Installed {
    rt.load(qlayer_bundled::bundled_plugin("bedrock").unwrap()).unwrap().install(grants).unwrap()
}

fn ask(model: &str, text: &str) -> CompletionRequest {
    CompletionRequest {
        max_tokens: Some(64),
        temperature: Some(0.5),
        ..CompletionRequest::new(model, vec![Message::new(Role::System, "be brief"), Message::new(Role::User, text)])
    }
}

#[tokio::test]
async fn signed_converse_and_converse_stream_with_a_model_id_that_needs_encoding() {
    let server = TestServer::start().await;
    let rt = runtime();
    let mut g = grants(&server, SECRET_KEY);
    g.secrets.insert("session_token".into(), Secret::new("sts-session-token"));
    let mut p = install(&rt, g).provider("t").await.unwrap();
    // A model id with a colon, as Bedrock's are: sent percent-encoded, signed double-encoded.
    let model = "anthropic.claude-3-haiku-20240307-v1:0";
    let reply = p.complete(&ask(model, "hi")).await.unwrap();
    assert_eq!(
        (reply.text.as_str(), reply.finish_reason.clone(), reply.model.as_str()),
        ("echo: hi", FinishReason::Stop, model)
    );
    assert_eq!((reply.usage.prompt_tokens, reply.usage.completion_tokens), (7, 3));
    let seen = &server.requests()[0];
    assert_eq!(seen.path, "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse");
    let auth = seen.authorization.clone().unwrap();
    assert!(auth.starts_with(&format!("AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/")), "{auth}");
    assert!(auth.contains("/eu-west-1/bedrock/aws4_request") && auth.contains("x-amz-security-token"), "{auth}");
    assert_eq!(seen.header("x-amz-security-token"), Some("sts-session-token"));
    let sent: Value = serde_json::from_str(&seen.body).unwrap();
    assert_eq!(sent["system"], json!([{"text": "be brief"}]));
    assert_eq!(sent["inferenceConfig"], json!({"maxTokens": 64, "temperature": 0.5}));
    assert_eq!(sent["messages"], json!([{"role": "user", "content": [{"text": "hi"}]}]));

    let mut stream = p.stream(&ask(model, "there")).await.unwrap();
    let (mut text, mut usage, mut finish) = (String::new(), None, None);
    while let Some(c) = stream.next().await.unwrap() {
        text.push_str(&c.delta);
        usage = c.usage.or(usage);
        finish = c.finish_reason.or(finish);
    }
    assert_eq!((text.as_str(), finish), ("echo: there", Some(FinishReason::Stop)));
    let usage = usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (5, 2));
    assert!(server.requests()[1].path.ends_with("/converse-stream"));
}

#[tokio::test]
async fn a_wrong_secret_fails_the_signature_check_and_no_secret_is_named() {
    let server = TestServer::start().await;
    let rt = runtime();
    let installed = install(&rt, grants(&server, "not-the-secret"));
    let e = crate::plugin_error(&installed, &ask("m", "x")).await;
    assert!(
        matches!(&e, PluginError::Unauthorized(m) if m.contains("InvalidSignatureException") && m.contains("signature")),
        "{e:?}"
    );
    let mut g = grants(&server, SECRET_KEY);
    g.secrets.clear();
    let e = crate::plugin_error(&install(&rt, g), &ask("m", "x")).await;
    assert!(matches!(&e, PluginError::Unauthorized(m) if m.contains("secret_access_key")), "{e:?}");
    let mut g = grants(&server, SECRET_KEY);
    g.config.remove("region");
    let e = crate::plugin_error(&install(&rt, g), &ask("m", "x")).await;
    assert!(matches!(&e, PluginError::InvalidInput(m) if m.contains("region")), "{e:?}");
    assert_eq!(server.requests().len(), 1, "requests that cannot be signed are not sent");
}

#[tokio::test]
async fn tool_use_whole_and_streamed_and_a_tool_result_round_trip() {
    let server = TestServer::start().await;
    let rt = runtime();
    let mut p = install(&rt, grants(&server, SECRET_KEY)).provider("t").await.unwrap();
    let request = CompletionRequest {
        tools: vec![ToolDefinition {
            name: "get_weather".into(),
            description: Some("The weather now".into()),
            parameters_json: r#"{"type":"object","properties":{"text":{"type":"string"}}}"#.into(),
            strict: false,
        }],
        tool_choice: Some(ToolChoice::Named("get_weather".into())),
        top_k: Some(5),
        user: Some("end-user".into()),
        ..ask("m", "weather in Oslo?")
    };
    let reply = p.complete(&request).await.unwrap();
    assert_eq!(reply.finish_reason, FinishReason::ToolCalls);
    assert_eq!((reply.tool_calls[0].id.as_str(), reply.tool_calls[0].name.as_str()), ("tooluse_test_1", "get_weather"));
    assert_eq!(
        serde_json::from_str::<Value>(&reply.tool_calls[0].arguments).unwrap(),
        json!({"text": "weather in Oslo?"})
    );
    let sent: Value = serde_json::from_str(&server.requests()[0].body).unwrap();
    assert_eq!(
        sent["toolConfig"],
        json!({"tools": [{"toolSpec": {"name": "get_weather", "description": "The weather now",
            "inputSchema": {"json": {"type": "object", "properties": {"text": {"type": "string"}}}}}}],
            "toolChoice": {"tool": {"name": "get_weather"}}})
    );
    assert_eq!(
        (sent["additionalModelRequestFields"].clone(), sent["requestMetadata"].clone()),
        (json!({"top_k": 5}), json!({"user": "end-user"}))
    );

    let mut stream = p.stream(&request).await.unwrap();
    let (mut args, mut first, mut finish) = (String::new(), None, None);
    while let Some(c) = stream.next().await.unwrap() {
        for t in c.tool_calls {
            if t.id.is_some() {
                first = Some((t.id, t.name));
            }
            args.push_str(&t.arguments);
        }
        finish = c.finish_reason.or(finish);
    }
    assert_eq!(first, Some((Some("tooluse_test_1".into()), Some("get_weather".into()))));
    assert_eq!((args.as_str(), finish), (reply.tool_calls[0].arguments.as_str(), Some(FinishReason::ToolCalls)));

    let mut call = Message::new(Role::Assistant, "");
    call.content.clear();
    call.tool_calls = reply.tool_calls.clone();
    let mut result = Message::new(Role::Tool, "sunny");
    result.tool_call_id = Some("tooluse_test_1".into());
    let mut follow_up = CompletionRequest { tool_choice: None, ..request };
    follow_up.messages.extend([call, result]);
    assert_eq!(p.complete(&follow_up).await.unwrap().text, "echo: tool said: sunny");
}

#[tokio::test]
async fn throttling_cut_streams_and_what_converse_cannot_say() {
    let server = TestServer::start().await;
    let rt = runtime();
    let installed = install(&rt, grants(&server, SECRET_KEY));
    assert_eq!(crate::plugin_error(&installed, &ask("rate-limit", "x")).await, PluginError::RateLimited(None));
    let mut p = installed.provider("t").await.unwrap();
    for (model, says) in [("stream-throttled", None), ("cut-stream", Some("messageStop"))] {
        let mut stream = p.stream(&ask(model, "x")).await.unwrap();
        let mut result = stream.next().await;
        while matches!(result, Ok(Some(_))) {
            result = stream.next().await;
        }
        let e = result.unwrap_err();
        match says {
            None => assert!(matches!(e.kind, CallErrorKind::Plugin(PluginError::RateLimited(_))), "{e}"),
            Some(word) => assert!(e.to_string().contains(word), "{e}"),
        }
    }
    let before = server.requests().len();
    let schema = CompletionRequest {
        response_format: ResponseFormat::JsonSchema(JsonSchema {
            name: "x".into(),
            description: None,
            schema_json: "{}".into(),
            strict: false,
        }),
        ..ask("m", "x")
    };
    let none = CompletionRequest { tool_choice: Some(ToolChoice::None), ..ask("m", "x") };
    let seeded = CompletionRequest { seed: Some(1), ..ask("m", "x") };
    for (request, word) in [(schema, "JSON schema"), (none, "`none`"), (seeded, "seed")] {
        assert!(
            matches!(crate::plugin_error(&installed, &request).await, PluginError::InvalidInput(m) if m.contains(word)),
            "{word}"
        );
    }
    assert_eq!(server.requests().len(), before, "refused requests are not sent");
}
