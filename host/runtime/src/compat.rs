//! Conversions between the contract versions the host binds: an older component is called with
//! the runtime's values (0.2.0's, with 0.3.0's diagnostics and tasks) turned into its version's,
//! and its answers turned into the runtime's.
//!
//! Going up never loses anything (a 0.1.0 or 0.2.0 diagnostic has no column). Going down, a
//! request that uses what 0.1.0 cannot express (tools, images, a JSON schema, `top-p`, `seed`) is
//! refused with the feature's name: never sent with the feature silently dropped. The one thing
//! dropped going down is a feedback diagnostic's column, for an agent that has nowhere to put it.

use crate::bindings::{v0_1::types as v1, v0_2::types as v2, v0_3::types as v3};

/// A conversion between the two versions' types (`From` cannot be implemented for `Vec`s and
/// `Option`s of them).
pub(crate) trait Conv<T> {
    fn conv(self) -> T;
}

macro_rules! identity {
    ($($t:ty),*) => { $(impl Conv<$t> for $t { fn conv(self) -> $t { self } })* };
}
identity!(String, u8, u32, u64, f32, bool, wasmtime::component::ResourceAny);

impl<A: Conv<B>, B> Conv<Vec<B>> for Vec<A> {
    fn conv(self) -> Vec<B> {
        self.into_iter().map(Conv::conv).collect()
    }
}

impl<A: Conv<B>, B> Conv<Option<B>> for Option<A> {
    fn conv(self) -> Option<B> {
        self.map(Conv::conv)
    }
}

/// A record with the same fields in both versions.
macro_rules! record {
    ($from:ident => $to:ident: $ty:ident { $($field:ident),* $(,)? }) => {
        impl Conv<$to::$ty> for $from::$ty {
            fn conv(self) -> $to::$ty {
                $to::$ty { $($field: self.$field.conv()),* }
            }
        }
    };
}

/// An enum with the same cases in both versions.
macro_rules! cases {
    ($from:ident => $to:ident: $ty:ident { $($case:ident),* $(,)? }) => {
        impl Conv<$to::$ty> for $from::$ty {
            fn conv(self) -> $to::$ty {
                match self { $($from::$ty::$case => $to::$ty::$case),* }
            }
        }
    };
}

record!(v1 => v2: Usage { prompt_tokens, completion_tokens });
record!(v2 => v1: Usage { prompt_tokens, completion_tokens });
record!(v1 => v2: ModelInfo { id, owned_by });
record!(v2 => v1: EmbeddingRequest { model, inputs });
record!(v1 => v2: Embeddings { model, vectors, usage });
record!(v1 => v2: Artifact { path, media_type, content });
record!(v2 => v1: Artifact { path, media_type, content });
record!(v3 => v1: Diagnostic { severity, rule, path, line, message });
record!(v3 => v2: Diagnostic { severity, rule, path, line, message });
record!(v3 => v1: Task { requirement, inputs, feedback, options_json });
record!(v3 => v2: Task { requirement, inputs, feedback, options_json });
record!(v1 => v2: AgentOutput { artifacts, summary });
cases!(v1 => v2: Severity { Error, Warning, Info });
identity!(v2::Severity, v2::Artifact);

impl Conv<v3::Diagnostic> for v1::Diagnostic {
    fn conv(self) -> v3::Diagnostic {
        let v1::Diagnostic { severity, rule, path, line, message } = self;
        v3::Diagnostic { severity: severity.conv(), rule, path, line, column: None, message }
    }
}

impl Conv<v3::Diagnostic> for v2::Diagnostic {
    fn conv(self) -> v3::Diagnostic {
        let v2::Diagnostic { severity, rule, path, line, message } = self;
        v3::Diagnostic { severity, rule, path, line, column: None, message }
    }
}
cases!(v2 => v1: Severity { Error, Warning, Info });
cases!(v1 => v2: Role { System, User, Assistant, Tool });
cases!(v2 => v1: Role { System, User, Assistant, Tool });
cases!(v1 => v2: LogLevel { Trace, Debug, Info, Warn, Error });

impl Conv<v2::PluginError> for v1::PluginError {
    fn conv(self) -> v2::PluginError {
        match self {
            v1::PluginError::InvalidInput(m) => v2::PluginError::InvalidInput(m),
            v1::PluginError::Unauthorized(m) => v2::PluginError::Unauthorized(m),
            v1::PluginError::RateLimited(after) => v2::PluginError::RateLimited(after),
            v1::PluginError::Unavailable(m) => v2::PluginError::Unavailable(m),
            v1::PluginError::Timeout => v2::PluginError::Timeout,
            v1::PluginError::Internal(m) => v2::PluginError::Internal(m),
        }
    }
}

impl Conv<v1::PluginError> for v2::PluginError {
    fn conv(self) -> v1::PluginError {
        match self {
            v2::PluginError::InvalidInput(m) => v1::PluginError::InvalidInput(m),
            v2::PluginError::Unauthorized(m) => v1::PluginError::Unauthorized(m),
            v2::PluginError::RateLimited(after) => v1::PluginError::RateLimited(after),
            v2::PluginError::Unavailable(m) => v1::PluginError::Unavailable(m),
            v2::PluginError::Timeout => v1::PluginError::Timeout,
            v2::PluginError::Internal(m) => v1::PluginError::Internal(m),
        }
    }
}

/// 0.1.0's free-form finish reason, typed.
pub(crate) fn finish_reason(reason: String) -> v2::FinishReason {
    match reason.as_str() {
        "stop" => v2::FinishReason::Stop,
        "length" => v2::FinishReason::Length,
        "content_filter" => v2::FinishReason::ContentFilter,
        "tool_calls" => v2::FinishReason::ToolCalls,
        _ => v2::FinishReason::Other(reason),
    }
}

fn finish_reason_down(reason: v2::FinishReason) -> String {
    match reason {
        v2::FinishReason::Stop => "stop".into(),
        v2::FinishReason::Length => "length".into(),
        v2::FinishReason::ToolCalls => "tool_calls".into(),
        v2::FinishReason::ContentFilter => "content_filter".into(),
        v2::FinishReason::Other(other) => other,
    }
}

impl Conv<v2::Completion> for v1::Completion {
    fn conv(self) -> v2::Completion {
        v2::Completion {
            model: self.model,
            text: self.text,
            tool_calls: Vec::new(),
            finish_reason: finish_reason(self.finish_reason),
            usage: self.usage.conv(),
        }
    }
}

impl Conv<v2::CompletionChunk> for v1::CompletionChunk {
    fn conv(self) -> v2::CompletionChunk {
        v2::CompletionChunk {
            delta: self.delta,
            tool_calls: Vec::new(),
            finish_reason: self.finish_reason.map(finish_reason),
            usage: self.usage.conv(),
        }
    }
}

/// An agent's 0.1.0 `llm` request: everything it can say, 0.2.0 says too.
impl Conv<v2::CompletionRequest> for v1::CompletionRequest {
    fn conv(self) -> v2::CompletionRequest {
        v2::CompletionRequest {
            model: self.model,
            messages: self
                .messages
                .into_iter()
                .map(|m| v2::Message {
                    role: m.role.conv(),
                    content: vec![v2::ContentPart::Text(m.content)],
                    tool_calls: Vec::new(),
                    tool_call_id: None,
                    name: None,
                })
                .collect(),
            tools: Vec::new(),
            tool_choice: None,
            parallel_tool_calls: None,
            response_format: if self.json_output { v2::ResponseFormat::JsonObject } else { v2::ResponseFormat::Text },
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: None,
            top_k: None,
            seed: None,
            stop: self.stop,
            user: None,
        }
    }
}

/// The answer to an agent's 0.1.0 `llm` request, which asked for no tools. Tool calls the model
/// made anyway cannot be expressed; the finish reason still says `tool_calls`.
impl Conv<v1::Completion> for v2::Completion {
    fn conv(self) -> v1::Completion {
        v1::Completion {
            model: self.model,
            text: self.text,
            finish_reason: finish_reason_down(self.finish_reason),
            usage: self.usage.conv(),
        }
    }
}

/// A feature of a 0.2.0 request that 0.1.0 cannot express.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unexpressible {
    /// Tool definitions.
    Tools,
    /// A tool choice other than `none`.
    ToolChoice,
    /// Tool calls or tool results in the messages.
    ToolMessages,
    /// An image part in a message.
    ImageInput,
    /// A JSON schema for the answer.
    JsonSchema,
    /// `top-p`.
    TopP,
    /// `top-k`.
    TopK,
    /// `seed`.
    Seed,
}

impl Unexpressible {
    /// What the feature is, for an error message.
    pub fn describe(self) -> &'static str {
        match self {
            Unexpressible::Tools => "tool definitions",
            Unexpressible::ToolChoice => "a tool choice",
            Unexpressible::ToolMessages => "tool calls and tool results",
            Unexpressible::ImageInput => "image input",
            Unexpressible::JsonSchema => "structured output with a JSON schema",
            Unexpressible::TopP => "nucleus sampling (top-p)",
            Unexpressible::TopK => "top-k sampling",
            Unexpressible::Seed => "a sampling seed",
        }
    }
}

/// What of `request` contract 0.1.0 cannot express, in the order of the request's fields.
pub fn unexpressible_in_v0_1(request: &v2::CompletionRequest) -> Vec<Unexpressible> {
    let mut out = Vec::new();
    if !request.tools.is_empty() {
        out.push(Unexpressible::Tools);
    }
    if matches!(&request.tool_choice, Some(c) if *c != v2::ToolChoice::None) {
        out.push(Unexpressible::ToolChoice);
    }
    if request.messages.iter().any(|m| !m.tool_calls.is_empty() || m.tool_call_id.is_some()) {
        out.push(Unexpressible::ToolMessages);
    }
    if request.messages.iter().flat_map(|m| &m.content).any(|p| matches!(p, v2::ContentPart::ImageUrl(_))) {
        out.push(Unexpressible::ImageInput);
    }
    if matches!(request.response_format, v2::ResponseFormat::JsonSchema(_)) {
        out.push(Unexpressible::JsonSchema);
    }
    if request.top_p.is_some() {
        out.push(Unexpressible::TopP);
    }
    if request.top_k.is_some() {
        out.push(Unexpressible::TopK);
    }
    if request.seed.is_some() {
        out.push(Unexpressible::Seed);
    }
    out
}

/// `request` for a 0.1.0 provider, or the first feature it uses that 0.1.0 cannot express. Text
/// parts are joined; `user`, a name and `parallel-tool-calls` (meaningless without tools), which
/// do not change the answer, are left out.
pub(crate) fn downgrade(request: &v2::CompletionRequest) -> Result<v1::CompletionRequest, Unexpressible> {
    if let Some(first) = unexpressible_in_v0_1(request).first() {
        return Err(*first);
    }
    Ok(v1::CompletionRequest {
        model: request.model.clone(),
        messages: request.messages.iter().map(|m| v1::Message { role: m.role.conv(), content: m.text() }).collect(),
        max_tokens: request.max_tokens,
        temperature: request.temperature,
        stop: request.stop.clone(),
        json_output: request.response_format == v2::ResponseFormat::JsonObject,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn request() -> v2::CompletionRequest {
        v2::CompletionRequest::new("m", vec![v2::Message::new(v2::Role::User, "hi")])
    }

    #[test]
    fn a_plain_request_goes_down_and_back_up_unchanged() {
        let mut r = request();
        r.max_tokens = Some(5);
        r.temperature = Some(0.5);
        r.stop = vec!["x".into()];
        r.response_format = v2::ResponseFormat::JsonObject;
        let down = downgrade(&r).unwrap();
        assert!(down.json_output);
        assert_eq!(down.messages[0].content, "hi");
        assert_eq!(down.conv(), r);
    }

    #[test]
    fn what_0_1_0_cannot_say_is_named_not_dropped() {
        let mut r = request();
        r.seed = Some(1);
        r.top_p = Some(0.1);
        r.tools.push(v2::ToolDefinition {
            name: "f".into(),
            description: None,
            parameters_json: "{}".into(),
            strict: false,
        });
        assert_eq!(unexpressible_in_v0_1(&r), [Unexpressible::Tools, Unexpressible::TopP, Unexpressible::Seed]);
        assert_eq!(downgrade(&r).unwrap_err(), Unexpressible::Tools);
        let mut r = request();
        r.tool_choice = Some(v2::ToolChoice::None);
        r.messages[0].content.push(v2::ContentPart::ImageUrl(v2::ImageUrl { url: "data:,".into(), detail: None }));
        assert_eq!(unexpressible_in_v0_1(&r), [Unexpressible::ImageInput]);
    }

    #[test]
    fn finish_reasons_keep_what_the_upstream_said() {
        assert_eq!(finish_reason("length".into()), v2::FinishReason::Length);
        assert_eq!(finish_reason("eos".into()), v2::FinishReason::Other("eos".into()));
        assert_eq!(finish_reason_down(v2::FinishReason::ToolCalls), "tool_calls");
    }
}
