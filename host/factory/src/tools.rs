//! A step's tools in its agent's completions: when the agent asks a model without tools of its
//! own, and its step was granted tools, the model is offered them; its tool calls are run (each
//! in the tool's own sandboxed instance, by the step's [`ToolHandler`]) and their results fed
//! back, for at most the step's `tool-rounds` rounds. The last round's request allows no tool,
//! so the model has to answer. The agent gets only the final completion: an agent written in
//! any language gains the tools its pipeline step grants without code of its own.
//!
//! An agent that gives its own tools keeps the conversation to itself: its completion comes
//! back as the model gave it (it can still invoke the granted tools through its `tools` import).

use futures::future::BoxFuture;
use qlayer_runtime::{
    Completion, CompletionRequest, ContentPart, LlmHandler, Message, PluginError, Role, ToolChoice, ToolDefinition,
    ToolHandler, describe,
};
use std::sync::Arc;

/// An [`LlmHandler`] that runs the model's calls of the step's tools.
pub struct ToolLoop {
    llm: Arc<dyn LlmHandler>,
    tools: Arc<dyn ToolHandler>,
    rounds: u32,
}

impl ToolLoop {
    /// Completions through `llm`, with `tools` offered for up to `rounds` rounds of calls.
    pub fn new(llm: Arc<dyn LlmHandler>, tools: Arc<dyn ToolHandler>, rounds: u32) -> Self {
        ToolLoop { llm, tools, rounds: rounds.max(1) }
    }
}

fn text(s: String) -> Vec<ContentPart> {
    if s.is_empty() { vec![] } else { vec![ContentPart::Text(s)] }
}

impl LlmHandler for ToolLoop {
    fn complete<'a>(
        &'a self,
        tenant: &'a str,
        mut request: CompletionRequest,
    ) -> BoxFuture<'a, Result<Completion, PluginError>> {
        Box::pin(async move {
            if !request.tools.is_empty() {
                return self.llm.complete(tenant, request).await;
            }
            let granted = self.tools.list(tenant).await;
            if granted.is_empty() {
                return self.llm.complete(tenant, request).await;
            }
            request.tools = granted
                .into_iter()
                .map(|t| ToolDefinition {
                    name: t.name,
                    description: (!t.description.is_empty()).then_some(t.description),
                    parameters_json: t.input_schema_json,
                    strict: false,
                })
                .collect();
            let mut round = 0;
            loop {
                if round == self.rounds {
                    request.tool_choice = Some(ToolChoice::None);
                }
                let completion = self.llm.complete(tenant, request.clone()).await?;
                if completion.tool_calls.is_empty() || round == self.rounds {
                    return Ok(completion);
                }
                round += 1;
                let calls = completion.tool_calls.clone();
                request.messages.push(Message {
                    role: Role::Assistant,
                    content: text(completion.text),
                    tool_calls: calls.clone(),
                    tool_call_id: None,
                    name: None,
                });
                for call in calls {
                    // A failed call is the model's to see (and to correct), not the step's end.
                    let answer = match self.tools.invoke(tenant, &call.name, &call.arguments).await {
                        Ok(output) => output,
                        Err(e) => format!("error: {}", describe(&e)),
                    };
                    request.messages.push(Message {
                        role: Role::Tool,
                        content: text(answer),
                        tool_calls: vec![],
                        tool_call_id: Some(call.id),
                        name: None,
                    });
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use qlayer_runtime::{FinishReason, ResponseFormat, ToolCall, ToolInfo, Usage};
    use std::sync::Mutex;

    /// A model that calls `echo` while it may, and records every request it gets.
    struct Model {
        seen: Mutex<Vec<CompletionRequest>>,
    }

    impl LlmHandler for Model {
        fn complete<'a>(&'a self, _: &'a str, r: CompletionRequest) -> BoxFuture<'a, Result<Completion, PluginError>> {
            Box::pin(async move {
                let calls = match (&r.tool_choice, r.tools.is_empty()) {
                    (Some(ToolChoice::None), _) | (_, true) => vec![],
                    _ => vec![ToolCall { id: "c".into(), name: "echo".into(), arguments: "{\"n\":1}".into() }],
                };
                self.seen.lock().unwrap().push(r);
                Ok(Completion {
                    model: "m".into(),
                    text: if calls.is_empty() { "done".into() } else { String::new() },
                    finish_reason: if calls.is_empty() { FinishReason::Stop } else { FinishReason::ToolCalls },
                    tool_calls: calls,
                    usage: Usage { prompt_tokens: 1, completion_tokens: 1 },
                })
            })
        }
    }

    struct Echo;

    impl ToolHandler for Echo {
        fn list<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Vec<ToolInfo>> {
            Box::pin(async {
                vec![ToolInfo { name: "echo".into(), description: "echoes".into(), input_schema_json: "{}".into() }]
            })
        }
        fn invoke<'a>(&'a self, _: &'a str, _: &'a str, input: &'a str) -> BoxFuture<'a, Result<String, PluginError>> {
            Box::pin(async move { Ok(format!("echo {input}")) })
        }
    }

    fn ask(tools: Vec<qlayer_runtime::ToolDefinition>) -> CompletionRequest {
        CompletionRequest {
            model: String::new(),
            messages: vec![Message {
                role: Role::User,
                content: vec![ContentPart::Text("hi".into())],
                tool_calls: vec![],
                tool_call_id: None,
                name: None,
            }],
            tools,
            tool_choice: None,
            parallel_tool_calls: None,
            response_format: ResponseFormat::Text,
            max_tokens: None,
            temperature: None,
            top_p: None,
            top_k: None,
            seed: None,
            stop: vec![],
            user: None,
        }
    }

    #[tokio::test]
    async fn the_models_tool_calls_run_and_feed_back_for_at_most_the_rounds_allowed() {
        let model = Arc::new(Model { seen: Mutex::default() });
        let looped = ToolLoop::new(model.clone(), Arc::new(Echo), 3);
        let answer = looped.complete("t", ask(vec![])).await.unwrap();
        assert_eq!(answer.text, "done");
        let seen = model.seen.lock().unwrap();
        // Three rounds of calls, then a request that allows no tool.
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[0].tools[0].name, "echo");
        assert!(seen[..3].iter().all(|r| r.tool_choice.is_none()));
        assert!(matches!(seen[3].tool_choice, Some(ToolChoice::None)));
        let last = &seen[3].messages;
        assert_eq!(last.len(), 1 + 3 * 2);
        assert_eq!(last[1].role, Role::Assistant);
        assert_eq!(last[1].tool_calls[0].name, "echo");
        assert_eq!(last[2].role, Role::Tool);
        assert_eq!(last[2].tool_call_id.as_deref(), Some("c"));
        assert!(matches!(&last[2].content[0], ContentPart::Text(t) if t == "echo {\"n\":1}"));
    }

    #[tokio::test]
    async fn an_agent_that_gives_its_own_tools_keeps_the_conversation() {
        let model = Arc::new(Model { seen: Mutex::default() });
        let looped = ToolLoop::new(model.clone(), Arc::new(Echo), 3);
        let own = qlayer_runtime::ToolDefinition {
            name: "mine".into(),
            description: None,
            parameters_json: "{}".into(),
            strict: false,
        };
        let answer = looped.complete("t", ask(vec![own])).await.unwrap();
        assert_eq!(answer.tool_calls.len(), 1, "the model's call comes back to the agent");
        assert_eq!(model.seen.lock().unwrap().len(), 1);
    }
}
