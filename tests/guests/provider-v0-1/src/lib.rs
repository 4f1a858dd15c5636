//! A `provider-plugin` of `quantumlayer:plugin@0.1.0`, bound with wit-bindgen directly against
//! `wit/0.1.0` (the SDK has moved to 0.2.0). It echoes the last message (`v0.1.0 echo: <text>`),
//! streams it a word at a time, reports the request's `json-output` flag and `max-tokens` in the
//! answer so tests can see what reached it, and logs through the 0.1.0 `host` import. Asked
//! `count`, it says how many calls its instance has answered; `trap` traps; `spin-ms N`
//! busy-waits N ms first.
#![allow(unsafe_code)]

wit_bindgen::generate!({
    path: "../../../wit/0.1.0",
    world: "provider-plugin",
});

use exports::quantumlayer::plugin::provider::{
    Completion, CompletionChunk, CompletionRequest, EmbeddingRequest, Embeddings, Guest, GuestCompletionStream,
    ModelInfo, PluginError,
};
use quantumlayer::plugin::host;
use quantumlayer::plugin::types::{LogLevel, Usage};
use std::cell::RefCell;

struct Echo;

/// Calls answered by this instance: `count` reports it, so tests see whether an instance is reused.
static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn answer(request: &CompletionRequest) -> Result<String, PluginError> {
    let last = request.messages.last().ok_or_else(|| PluginError::InvalidInput("`messages` is empty".into()))?;
    let calls = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    match last.content.as_str() {
        "count" => return Ok(format!("v0.1.0 echo: call {calls} of this instance")),
        "trap" => panic!("trapping on purpose"),
        spin if spin.starts_with("spin-ms ") => {
            let ms: u64 = spin[8..].parse().map_err(|_| PluginError::InvalidInput("bad number".into()))?;
            let start = std::time::Instant::now();
            while start.elapsed().as_millis() < u128::from(ms) {
                std::hint::spin_loop();
            }
        }
        _ => {}
    }
    host::log(LogLevel::Info, &format!("0.1.0 provider answering {} messages", request.messages.len()));
    let mut text = format!("v0.1.0 echo: {}", last.content);
    if request.json_output {
        text.push_str(" [json-output]");
    }
    if let Some(max) = request.max_tokens {
        text.push_str(&format!(" [max-tokens {max}]"));
    }
    Ok(text)
}

fn usage(text: &str) -> Usage {
    Usage { prompt_tokens: 4, completion_tokens: text.split_whitespace().count() as u32 }
}

struct Words {
    pieces: RefCell<Vec<String>>,
    usage: RefCell<Option<Usage>>,
}

impl GuestCompletionStream for Words {
    fn next(&self) -> Result<Option<CompletionChunk>, PluginError> {
        let mut pieces = self.pieces.borrow_mut();
        let Some(delta) = pieces.pop() else { return Ok(None) };
        let last = pieces.is_empty();
        Ok(Some(CompletionChunk {
            delta,
            finish_reason: last.then(|| "stop".to_string()),
            usage: if last { self.usage.borrow_mut().take() } else { None },
        }))
    }
}

impl Guest for Echo {
    type CompletionStream = Words;

    fn models() -> Result<Vec<ModelInfo>, PluginError> {
        Ok(vec![ModelInfo { id: "echo-v0-1".into(), owned_by: "qlayer tests".into() }])
    }

    fn complete(request: CompletionRequest) -> Result<Completion, PluginError> {
        let text = answer(&request)?;
        Ok(Completion { model: "echo-v0-1".into(), usage: usage(&text), text, finish_reason: "stop".into() })
    }

    fn stream(
        request: CompletionRequest,
    ) -> Result<exports::quantumlayer::plugin::provider::CompletionStream, PluginError> {
        let text = answer(&request)?;
        let pieces: Vec<String> = text.split_inclusive(' ').rev().map(str::to_string).collect();
        Ok(exports::quantumlayer::plugin::provider::CompletionStream::new(Words {
            pieces: RefCell::new(pieces),
            usage: RefCell::new(Some(usage(&text))),
        }))
    }

    fn embed(request: EmbeddingRequest) -> Result<Embeddings, PluginError> {
        Ok(Embeddings {
            model: "echo-v0-1".into(),
            vectors: request.inputs.iter().map(|t| vec![t.len() as f32, 1.0]).collect(),
            usage: Usage { prompt_tokens: request.inputs.len() as u32, completion_tokens: 0 },
        })
    }
}

export!(Echo);
