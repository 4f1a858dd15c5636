//! The gateway's own request, between the wire formats ([`crate::openai`],
//! [`crate::anthropic`]) and the contract: the contract's completion request, whether to stream,
//! and what the request needs a provider to be able to express.

use qlayer_runtime::CompletionRequest;

/// What a request asks for that a provider's contract must be able to express: everything
/// 0.2.0 can say that 0.1.0 cannot.
pub use qlayer_runtime::Unexpressible as Feature;

/// The request field that asks for `feature`, as OpenAI names it.
pub fn field(feature: Feature) -> &'static str {
    match feature {
        Feature::Tools => "tools",
        Feature::ToolChoice => "tool_choice",
        Feature::ToolMessages | Feature::ImageInput => "messages",
        Feature::TopP => "top_p",
        Feature::TopK => "top_k",
        Feature::Seed => "seed",
        Feature::JsonSchema => "response_format",
    }
}

/// A parsed chat completion request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The API it came through, for usage records: `chat` (OpenAI's) or `messages` (Anthropic's).
    pub endpoint: &'static str,
    /// The model name asked for.
    pub model: String,
    /// In the contract's shape (its `model` is filled per deployment).
    pub request: CompletionRequest,
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// Fields accepted and checked that no provider can act on yet (hints for models that
    /// reason, which the contract cannot carry): the response names them in
    /// `x-qlayer-unused`, so they are never ignored silently.
    pub unused: Vec<&'static str>,
}

impl ChatRequest {
    /// What a provider needs to be able to express to serve it, beyond contract 0.1.0.
    pub fn needs(&self) -> Vec<Feature> {
        qlayer_runtime::unexpressible_in_v0_1(&self.request)
    }

    /// The bytes of the prompt (text, tool calls and tool definitions), for estimates.
    pub fn prompt_bytes(&self) -> usize {
        let messages: usize = self
            .request
            .messages
            .iter()
            .map(|m| {
                m.content
                    .iter()
                    .map(|p| match p {
                        qlayer_runtime::ContentPart::Text(t) => t.len(),
                        qlayer_runtime::ContentPart::ImageUrl(_) => 0,
                    })
                    .sum::<usize>()
                    + m.tool_calls.iter().map(|c| c.name.len() + c.arguments.len()).sum::<usize>()
            })
            .sum();
        let tools: usize = self
            .request
            .tools
            .iter()
            .map(|t| t.name.len() + t.description.as_ref().map_or(0, String::len) + t.parameters_json.len())
            .sum();
        messages + tools
    }
}

/// Renders a provider's stream in one API's event format.
pub trait StreamWriter: Send + 'static {
    /// The events for one chunk (none for an empty one).
    fn chunk(&mut self, chunk: &qlayer_runtime::CompletionChunk, out: &mut String);
    /// The events of a clean end, with the API's end marker.
    fn end(&mut self, out: &mut String);
    /// The event of a stream cut short: an error, and no end marker.
    fn error(&self, e: &crate::GatewayError, out: &mut String);
}
