//! A test provider that fetches the URL given as the last message and returns the status and
//! body, to exercise the host's outbound-HTTP grants (including redirects).

use qlayer_sdk::http::Request;
use qlayer_sdk::provider::{ChunkSource, Provider};
use qlayer_sdk::*;

struct Fetcher;
struct Empty;

impl ChunkSource for Empty {
    fn next_chunk(&mut self) -> Result<Option<CompletionChunk>, PluginError> {
        Ok(None)
    }
}

impl Provider for Fetcher {
    type Stream = Empty;
    fn models() -> Result<Vec<ModelInfo>, PluginError> {
        Ok(vec![])
    }
    fn complete(request: CompletionRequest) -> Result<Completion, PluginError> {
        let url = request.messages.last().map(Message::text).unwrap_or_default();
        let response = Request::get(url).send()?;
        let status = response.status();
        let body = response.text(1 << 20)?;
        Ok(Completion {
            model: "fetcher".into(),
            text: format!("{status} {body}"),
            tool_calls: vec![],
            finish_reason: FinishReason::Stop,
            usage: Usage { prompt_tokens: 0, completion_tokens: 0 },
        })
    }
    fn stream(_: CompletionRequest) -> Result<Empty, PluginError> {
        Ok(Empty)
    }
    fn embed(_: EmbeddingRequest) -> Result<Embeddings, PluginError> {
        Err(PluginError::InvalidInput("no embeddings".into()))
    }
}

qlayer_sdk::export_provider!(Fetcher);
