//! The gateway's own request, between the wire formats ([`crate::openai`],
//! [`crate::anthropic`]) and the contract: the contract's completion request, whether to stream,
//! and what the request needs a provider to be able to express.

use qlayer_runtime::CompletionRequest;

/// What a request asks for that a provider must be able to express.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// Tool definitions (`tools`).
    Tools,
    /// `tool_choice`.
    ToolChoice,
    /// Assistant tool calls or `tool` messages in the conversation.
    ToolMessages,
    /// `top_p`.
    TopP,
    /// `seed`.
    Seed,
    /// `response_format` of type `json_schema`.
    JsonSchema,
    /// Image parts in a message.
    ImageInput,
    /// `top_k` (Anthropic's).
    TopK,
}

impl Feature {
    /// The request field that asks for it.
    pub fn field(self) -> &'static str {
        match self {
            Feature::Tools => "tools",
            Feature::ToolChoice => "tool_choice",
            Feature::ToolMessages => "messages",
            Feature::TopP => "top_p",
            Feature::Seed => "seed",
            Feature::JsonSchema => "response_format",
            Feature::ImageInput => "messages",
            Feature::TopK => "top_k",
        }
    }

    /// What it is, for people.
    pub fn what(self) -> &'static str {
        match self {
            Feature::Tools => "tool definitions",
            Feature::ToolChoice => "a tool choice",
            Feature::ToolMessages => "tool calls and tool results",
            Feature::TopP => "nucleus sampling (top_p)",
            Feature::Seed => "a sampling seed",
            Feature::JsonSchema => "structured output with a JSON schema",
            Feature::ImageInput => "image input",
            Feature::TopK => "top-k sampling",
        }
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
    /// What a provider needs to be able to express to serve it.
    pub needs: Vec<Feature>,
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
