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
        world: "quantumlayer:plugin/provider-plugin",
        with: {
            "quantumlayer:plugin/types@0.2.0": crate::__bindings::quantumlayer::plugin::types,
            "quantumlayer:plugin/host@0.2.0": crate::__bindings::quantumlayer::plugin::host,
        },
        pub_export_macro: true,
        export_macro_name: "__export_provider_world",
        default_bindings_module: "qlayer_sdk::provider::bindings",
    });
}

use bindings::exports::quantumlayer::plugin::provider as wit;

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
