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
    /// What its `Cache-Control` header asks of the cache (set by the route from the header).
    pub cache: crate::cache::Directives,
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

    /// The most prompt tokens it can use ([`prompt_bound`]), which limits reserve, given its
    /// [`ChatRequest::prompt_bytes`].
    pub fn prompt_bound(&self, bytes: usize) -> u64 {
        let images = self
            .request
            .messages
            .iter()
            .flat_map(|m| &m.content)
            .filter(|p| matches!(p, qlayer_runtime::ContentPart::ImageUrl(_)))
            .count();
        prompt_bound(bytes, self.request.messages.len(), images, self.request.tools.len())
    }
}

/// Tokens no prompt of `bytes` bytes in `messages` messages with `images` images and `tools`
/// tool definitions can pass, as limits reserve them: every token of a byte-level tokenizer (the
/// GPT, Llama, Claude and Mistral families) covers at least one byte, and what a chat template
/// adds per message and per tool, and what an image costs, stays under the allowances here
/// (OpenAI's and Anthropic's largest image is about 2,500 tokens).
pub fn prompt_bound(bytes: usize, messages: usize, images: usize, tools: usize) -> u64 {
    const BASE: u64 = 64;
    const PER_MESSAGE: u64 = 16;
    const PER_TOOL: u64 = 32;
    const PER_IMAGE: u64 = 2_500;
    BASE + bytes as u64 + PER_MESSAGE * messages as u64 + PER_TOOL * tools as u64 + PER_IMAGE * images as u64
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
