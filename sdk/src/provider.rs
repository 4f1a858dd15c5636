//! LLM providers: implement [`Provider`] and export it with [`export_provider!`](crate::export_provider).
//!
//! ```
//! use qlayer_sdk::provider::{ChunkSource, Provider};
//! use qlayer_sdk::*;
//!
//! struct Constant;
//! struct Done;
//! impl ChunkSource for Done {
//!     fn next_chunk(&mut self) -> Result<Option<CompletionChunk>, PluginError> { Ok(None) }
//! }
//! impl Provider for Constant {
//!     type Stream = Done;
//!     fn models() -> Result<Vec<ModelInfo>, PluginError> {
//!         Ok(vec![ModelInfo { id: "constant".into(), owned_by: "me".into() }])
//!     }
//!     fn complete(r: CompletionRequest) -> Result<Completion, PluginError> {
//!         Ok(Completion { model: r.model, text: "hi".into(), tool_calls: vec![],
//!                         finish_reason: FinishReason::Stop,
//!                         usage: Usage { prompt_tokens: 1, completion_tokens: 1 } })
//!     }
//!     fn stream(_: CompletionRequest) -> Result<Done, PluginError> { Ok(Done) }
//!     fn embed(_: EmbeddingRequest) -> Result<Embeddings, PluginError> {
//!         Err(PluginError::InvalidInput("no embeddings".into()))
//!     }
//! }
//! qlayer_sdk::export_provider!(Constant);
//! ```

use crate::{Completion, CompletionChunk, CompletionRequest, EmbeddingRequest, Embeddings, ModelInfo, PluginError};
use std::cell::RefCell;
use std::marker::PhantomData;

#[doc(hidden)]
#[allow(missing_docs, unsafe_code, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "quantumlayer:plugin/provider-plugin@0.3.0",
        with: {
            "quantumlayer:plugin/types@0.2.0": crate::__bindings::quantumlayer::plugin0_2_0::types,
            "quantumlayer:plugin/host@0.2.0": crate::__bindings::quantumlayer::plugin0_2_0::host,
            "quantumlayer:plugin/provider@0.2.0": generate,
        },
        pub_export_macro: true,
        export_macro_name: "__export_provider_world",
        default_bindings_module: "qlayer_sdk::provider::bindings",
    });
}

use bindings::exports::quantumlayer::plugin0_2_0::provider as wit;

/// An LLM provider. Each function is one call from the host.
pub trait Provider: 'static {
    /// What [`Provider::stream`] returns.
    type Stream: ChunkSource;
    /// The models served.
    fn models() -> Result<Vec<ModelInfo>, PluginError>;
    /// A whole completion.
    fn complete(request: CompletionRequest) -> Result<Completion, PluginError>;
    /// Starts a streamed completion.
    fn stream(request: CompletionRequest) -> Result<Self::Stream, PluginError>;
    /// Embeddings.
    fn embed(request: EmbeddingRequest) -> Result<Embeddings, PluginError>;
}

/// The chunks of a streamed completion, pulled one at a time by the host.
pub trait ChunkSource: 'static {
    /// The next chunk; `Ok(None)` once the stream ended cleanly. An upstream that stopped before
    /// its end marker must be an error, never `Ok(None)`.
    fn next_chunk(&mut self) -> Result<Option<CompletionChunk>, PluginError>;
}

#[doc(hidden)]
pub struct Adapter<T>(PhantomData<T>);

#[doc(hidden)]
pub struct StreamAdapter<S>(RefCell<S>);

impl<S: ChunkSource> wit::GuestCompletionStream for StreamAdapter<S> {
    fn next(&self) -> Result<Option<CompletionChunk>, PluginError> {
        self.0.borrow_mut().next_chunk()
    }
}

impl<T: Provider> wit::Guest for Adapter<T> {
    type CompletionStream = StreamAdapter<T::Stream>;
    fn models() -> Result<Vec<ModelInfo>, PluginError> {
        T::models()
    }
    fn complete(request: CompletionRequest) -> Result<Completion, PluginError> {
        T::complete(request)
    }
    fn stream(request: CompletionRequest) -> Result<wit::CompletionStream, PluginError> {
        T::stream(request).map(|s| wit::CompletionStream::new(StreamAdapter(RefCell::new(s))))
    }
    fn embed(request: EmbeddingRequest) -> Result<Embeddings, PluginError> {
        T::embed(request)
    }
}

/// A conversation in the shape of APIs that take the system prompt apart and want turns that
/// alternate between `user` and `assistant` (Anthropic's Messages, Bedrock's Converse): system
/// messages joined, tool results in user turns, consecutive turns of one role merged, content
/// parts, tool calls and tool results rendered as the API's blocks by the given functions.
pub struct Turns<P, C, R> {
    /// A content part as a block.
    pub part: P,
    /// An assistant's tool call as a block, given its arguments as a JSON object.
    pub call: C,
    /// A tool result as a block: the call's id and the result's blocks.
    pub result: R,
}

impl<P, C, R> Turns<P, C, R>
where
    P: Fn(&crate::ContentPart) -> Result<serde_json::Value, PluginError>,
    C: Fn(&crate::ToolCall, serde_json::Value) -> serde_json::Value,
    R: Fn(&str, Vec<serde_json::Value>) -> serde_json::Value,
{
    /// The system prompt and the turns, `{"role", "content": [blocks]}`; an error when the
    /// conversation does not start with a user turn, a tool message names no call, or a call's
    /// arguments are not a JSON object (`api` names the API in that message).
    pub fn of(&self, request: &CompletionRequest, api: &str) -> Result<(String, Vec<serde_json::Value>), PluginError> {
        use crate::{ContentPart, Role};
        let blocks = |parts: &[ContentPart]| -> Result<Vec<serde_json::Value>, PluginError> {
            parts.iter().filter(|p| !matches!(p, ContentPart::Text(t) if t.is_empty())).map(&self.part).collect()
        };
        let mut system = Vec::new();
        let mut turns: Vec<(&'static str, Vec<serde_json::Value>)> = Vec::new();
        for m in &request.messages {
            let (role, content) = match m.role {
                Role::System => {
                    system.push(m.text());
                    continue;
                }
                Role::User => ("user", blocks(&m.content)?),
                Role::Assistant => {
                    let mut content = blocks(&m.content)?;
                    for c in &m.tool_calls {
                        content.push((self.call)(c, arguments_object(c, api)?));
                    }
                    ("assistant", content)
                }
                Role::Tool => {
                    let id = m.tool_call_id.as_deref().ok_or_else(|| {
                        PluginError::InvalidInput("a tool message must name the call it answers (tool-call-id)".into())
                    })?;
                    ("user", vec![(self.result)(id, blocks(&m.content)?)])
                }
            };
            if content.is_empty() {
                continue;
            }
            match turns.last_mut() {
                Some((last, blocks)) if *last == role => blocks.extend(content),
                _ => turns.push((role, content)),
            }
        }
        if turns.first().is_none_or(|(role, _)| *role != "user") {
            return Err(PluginError::InvalidInput(format!(
                "{api} needs the conversation to start with a user message"
            )));
        }
        let turns = turns.into_iter().map(|(role, content)| serde_json::json!({"role": role, "content": content}));
        Ok((system.join("\n\n"), turns.collect()))
    }
}

/// A tool call's arguments as the JSON object APIs with structured tool input want (`{}` for
/// none); other JSON is refused naming the call.
fn arguments_object(call: &crate::ToolCall, api: &str) -> Result<serde_json::Value, PluginError> {
    match serde_json::from_str::<serde_json::Value>(&call.arguments) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        _ if call.arguments.trim().is_empty() => Ok(serde_json::json!({})),
        _ => Err(PluginError::InvalidInput(format!(
            "the arguments of tool call `{}` are not a JSON object, which {api} needs",
            call.id
        ))),
    }
}

/// Exports a [`Provider`] as this component's `provider` interface.
///
/// ```ignore
/// qlayer_sdk::export_provider!(MyProvider);
/// ```
#[macro_export]
macro_rules! export_provider {
    ($provider:ty) => {
        $crate::__export_world!(provider, Provider, __export_provider_world, $provider);
    };
}
