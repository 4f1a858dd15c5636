//! The semantic cache's embedded index: answers kept with the embedding of the conversation that
//! asked for them, found again by a request whose conversation embeds close enough (cosine
//! similarity at least the model's threshold) and whose model, tools and parameters are the same
//! (its *partition*: tenant, model name, embedding model, streaming or not, and the request less
//! its messages and user). Partitions never mix tenants. In this process, bounded in entries,
//! saved to a file in the data dir and read back at start.

use crate::cache::Kept;
use crate::table::Deployment;
use qlayer_runtime::{Completion, CompletionChunk, CompletionRequest, FinishReason, ToolCall, ToolCallDelta, Usage};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

/// The partition of a request: what must be the same, besides a close conversation, for an
/// answer to serve it.
pub fn partition(
    tenant_id: &str,
    model: &str,
    embedding_model: &str,
    stream: bool,
    request: &CompletionRequest,
) -> [u8; 32] {
    let mut request = request.clone();
    request.messages.clear();
    request.user = None;
    request.model.clear();
    crate::cache::digest(&[tenant_id, model, embedding_model, if stream { "stream" } else { "whole" }], &request)
}

/// The text of a request's conversation, as it is embedded: each message's role and text, one a
/// line, with the tool calls and results it carries.
pub fn conversation(request: &CompletionRequest) -> String {
    let mut text = String::new();
    for m in &request.messages {
        let _ = writeln!(text, "{:?}: {}", m.role, m.text());
        for call in &m.tool_calls {
            let _ = writeln!(text, "call {}({})", call.name, call.arguments);
        }
    }
    text
}

/// Why a vector cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VectorError {
    /// It has another length than the partition's vectors (another embedding model behind the
    /// same name, or a deployment that answers wrongly).
    Dimension {
        /// The partition's.
        expected: usize,
        /// This vector's.
        got: usize,
    },
    /// Empty, or not finite, or all zero.
    Unusable,
}

impl std::fmt::Display for VectorError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VectorError::Dimension { expected, got } => {
                write!(f, "the embedding has {got} dimensions where this model's cache has {expected}")
            }
            VectorError::Unusable => write!(f, "the embedding is empty, all zero or not finite"),
        }
    }
}

/// `v` scaled to length 1.
fn normalised(v: &[f32]) -> Result<Vec<f32>, VectorError> {
    let norm = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
    if v.is_empty() || !norm.is_finite() || norm == 0.0 {
        return Err(VectorError::Unusable);
    }
    Ok(v.iter().map(|x| (f64::from(*x) / norm) as f32).collect())
}

struct Entry {
    vector: Vec<f32>,
    kept: Kept,
    deployment: Deployment,
    expires_ms: i64,
    seq: u64,
}

#[derive(Default)]
struct Inner {
    partitions: HashMap<[u8; 32], Vec<Entry>>,
    count: usize,
    seq: u64,
    dirty: bool,
}

/// The embedded index of one node.
pub struct SemanticIndex {
    max_entries: usize,
    path: Option<PathBuf>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for SemanticIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SemanticIndex").field("max_entries", &self.max_entries).field("path", &self.path).finish()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl SemanticIndex {
    /// An index of at most `max_entries`, kept in `path` (read now if it exists: a file that
    /// cannot be read is logged and set aside, and the index starts empty).
    pub fn new(max_entries: usize, path: Option<PathBuf>) -> SemanticIndex {
        let index = SemanticIndex { max_entries, path, inner: Mutex::default() };
        if let Some(path) = &index.path
            && path.exists()
        {
            match std::fs::read(path).map_err(|e| e.to_string()).and_then(|b| index.load(&b)) {
                Ok(n) => tracing::info!(path = %path.display(), entries = n, "semantic cache read"),
                Err(e) => {
                    tracing::warn!(path = %path.display(), "the semantic cache file cannot be read, starting empty: {e}");
                    let _ = std::fs::rename(path, path.with_extension("unreadable"));
                }
            }
        }
        index
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The closest answer in `partition` to `vector` with a similarity of at least `threshold`,
    /// and that similarity.
    pub fn lookup(
        &self,
        partition: &[u8; 32],
        vector: &[f32],
        threshold: f64,
    ) -> Result<Option<(Kept, Deployment, f64)>, VectorError> {
        let vector = normalised(vector)?;
        let now = now_ms();
        let inner = self.lock();
        let Some(entries) = inner.partitions.get(partition) else { return Ok(None) };
        if let Some(first) = entries.first()
            && first.vector.len() != vector.len()
        {
            return Err(VectorError::Dimension { expected: first.vector.len(), got: vector.len() });
        }
        let best = entries
            .iter()
            .filter(|e| e.expires_ms > now)
            .map(|e| (e, e.vector.iter().zip(&vector).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>()))
            .max_by(|a, b| a.1.total_cmp(&b.1));
        Ok(best.filter(|(_, s)| *s >= threshold).map(|(e, s)| (e.kept.clone(), e.deployment.clone(), s)))
    }

    /// Keeps `kept` under `vector` in `partition` for `ttl`, making room by dropping expired
    /// entries, then the oldest.
    pub fn insert(
        &self,
        partition: [u8; 32],
        vector: &[f32],
        kept: Kept,
        deployment: Deployment,
        ttl: Duration,
    ) -> Result<(), VectorError> {
        let vector = normalised(vector)?;
        let expires_ms = now_ms() + ttl.as_millis() as i64;
        let mut inner = self.lock();
        if let Some(first) = inner.partitions.get(&partition).and_then(|e| e.first())
            && first.vector.len() != vector.len()
        {
            return Err(VectorError::Dimension { expected: first.vector.len(), got: vector.len() });
        }
        inner.seq += 1;
        let seq = inner.seq;
        inner.partitions.entry(partition).or_default().push(Entry { vector, kept, deployment, expires_ms, seq });
        inner.count += 1;
        inner.dirty = true;
        if inner.count > self.max_entries {
            evict(&mut inner, self.max_entries);
        }
        metrics::gauge!("qlayer_gateway_semantic_cache_entries").set(inner.count as f64);
        Ok(())
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.lock().count
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the entries that have not expired to the file, if anything changed since the last
    /// time (a temporary file renamed over the old one, so a crash leaves one or the other).
    pub fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        let text = {
            let mut inner = self.lock();
            if !inner.dirty {
                return Ok(());
            }
            inner.dirty = false;
            let now = now_ms();
            let saved: Vec<Saved> = inner
                .partitions
                .iter()
                .flat_map(|(p, entries)| entries.iter().filter(|e| e.expires_ms > now).map(|e| Saved::of(p, e)))
                .collect();
            serde_json::to_vec(&saved).map_err(std::io::Error::other)?
        };
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }

    fn load(&self, bytes: &[u8]) -> Result<usize, String> {
        let saved: Vec<Saved> = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        let now = now_ms();
        let mut inner = self.lock();
        let mut n = 0;
        for s in saved.into_iter().filter(|s| s.expires_ms > now) {
            let mut partition = [0u8; 32];
            hex_decode(&s.partition, &mut partition).ok_or("a partition is not 64 hex digits")?;
            let vector = normalised(&s.vector).map_err(|e| e.to_string())?;
            inner.seq += 1;
            let seq = inner.seq;
            let entry = Entry { vector, kept: s.kept.into(), deployment: s.deployment, expires_ms: s.expires_ms, seq };
            inner.partitions.entry(partition).or_default().push(entry);
            inner.count += 1;
            n += 1;
        }
        evict(&mut inner, self.max_entries);
        Ok(n)
    }
}

/// An answer as JSON text (for Qdrant's payload).
pub(crate) fn kept_to_json(kept: &Kept) -> String {
    serde_json::to_string(&SavedKept::from(kept)).unwrap_or_default()
}

/// An answer from [`kept_to_json`]'s text.
pub(crate) fn kept_from_json(text: &str) -> Result<Kept, String> {
    serde_json::from_str::<SavedKept>(text).map(Kept::from).map_err(|e| e.to_string())
}

/// Drops expired entries, then the oldest, until at most `max` remain.
fn evict(inner: &mut Inner, max: usize) {
    let now = now_ms();
    for entries in inner.partitions.values_mut() {
        entries.retain(|e| e.expires_ms > now);
    }
    let mut count: usize = inner.partitions.values().map(Vec::len).sum();
    if count > max {
        let mut seqs: Vec<u64> = inner.partitions.values().flatten().map(|e| e.seq).collect();
        seqs.sort_unstable();
        let keep_from = seqs[count - max];
        for entries in inner.partitions.values_mut() {
            entries.retain(|e| e.seq >= keep_from);
        }
        count = inner.partitions.values().map(Vec::len).sum();
    }
    inner.partitions.retain(|_, entries| !entries.is_empty());
    inner.count = count;
}

fn hex_decode(text: &str, out: &mut [u8; 32]) -> Option<()> {
    if text.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(())
}

/// An entry as the file keeps it.
#[derive(Serialize, Deserialize)]
struct Saved {
    partition: String,
    vector: Vec<f32>,
    deployment: Deployment,
    expires_ms: i64,
    kept: SavedKept,
}

impl Saved {
    fn of(partition: &[u8; 32], e: &Entry) -> Saved {
        Saved {
            partition: partition.iter().map(|b| format!("{b:02x}")).collect(),
            vector: e.vector.clone(),
            deployment: e.deployment.clone(),
            expires_ms: e.expires_ms,
            kept: (&e.kept).into(),
        }
    }
}

#[derive(Serialize, Deserialize)]
enum SavedKept {
    Whole(SavedCompletion),
    Stream(Vec<SavedChunk>),
}

#[derive(Serialize, Deserialize)]
struct SavedCompletion {
    model: String,
    text: String,
    tool_calls: Vec<(String, String, String)>,
    finish: String,
    usage: (u32, u32),
}

#[derive(Serialize, Deserialize)]
struct SavedChunk {
    delta: String,
    tool_calls: Vec<(u32, Option<String>, Option<String>, String)>,
    finish: Option<String>,
    usage: Option<(u32, u32)>,
}

fn finish_text(f: &FinishReason) -> String {
    match f {
        FinishReason::Stop => "stop".into(),
        FinishReason::Length => "length".into(),
        FinishReason::ToolCalls => "tool_calls".into(),
        FinishReason::ContentFilter => "content_filter".into(),
        FinishReason::Other(s) => format!("other:{s}"),
    }
}

fn finish_of(s: &str) -> FinishReason {
    match s {
        "stop" => FinishReason::Stop,
        "length" => FinishReason::Length,
        "tool_calls" => FinishReason::ToolCalls,
        "content_filter" => FinishReason::ContentFilter,
        other => FinishReason::Other(other.strip_prefix("other:").unwrap_or(other).to_string()),
    }
}

impl From<&Kept> for SavedKept {
    fn from(k: &Kept) -> SavedKept {
        match k {
            Kept::Whole(c) => SavedKept::Whole(SavedCompletion {
                model: c.model.clone(),
                text: c.text.clone(),
                tool_calls: c.tool_calls.iter().map(|t| (t.id.clone(), t.name.clone(), t.arguments.clone())).collect(),
                finish: finish_text(&c.finish_reason),
                usage: (c.usage.prompt_tokens, c.usage.completion_tokens),
            }),
            Kept::Stream(chunks) => SavedKept::Stream(
                chunks
                    .iter()
                    .map(|c| SavedChunk {
                        delta: c.delta.clone(),
                        tool_calls: c
                            .tool_calls
                            .iter()
                            .map(|t| (t.index, t.id.clone(), t.name.clone(), t.arguments.clone()))
                            .collect(),
                        finish: c.finish_reason.as_ref().map(finish_text),
                        usage: c.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
                    })
                    .collect(),
            ),
        }
    }
}

impl From<SavedKept> for Kept {
    fn from(k: SavedKept) -> Kept {
        let usage = |(prompt_tokens, completion_tokens)| Usage { prompt_tokens, completion_tokens };
        match k {
            SavedKept::Whole(c) => Kept::Whole(Completion {
                model: c.model,
                text: c.text,
                tool_calls: c
                    .tool_calls
                    .into_iter()
                    .map(|(id, name, arguments)| ToolCall { id, name, arguments })
                    .collect(),
                finish_reason: finish_of(&c.finish),
                usage: usage(c.usage),
            }),
            SavedKept::Stream(chunks) => Kept::Stream(
                chunks
                    .into_iter()
                    .map(|c| CompletionChunk {
                        delta: c.delta,
                        tool_calls: c
                            .tool_calls
                            .into_iter()
                            .map(|(index, id, name, arguments)| ToolCallDelta { index, id, name, arguments })
                            .collect(),
                        finish_reason: c.finish.as_deref().map(finish_of),
                        usage: c.usage.map(usage),
                    })
                    .collect(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use qlayer_runtime::{Message, Role};

    fn answer(text: &str) -> Kept {
        Kept::Whole(Completion {
            model: "m".into(),
            text: text.into(),
            tool_calls: vec![ToolCall { id: "c1".into(), name: "f".into(), arguments: "{}".into() }],
            finish_reason: FinishReason::Other("odd".into()),
            usage: Usage { prompt_tokens: 3, completion_tokens: 4 },
        })
    }

    fn text(kept: &Kept) -> String {
        match kept {
            Kept::Whole(c) => c.text.clone(),
            Kept::Stream(chunks) => chunks.iter().map(|c| c.delta.as_str()).collect(),
        }
    }

    #[test]
    fn the_closest_answer_above_the_threshold_in_the_same_partition_is_found() {
        let index = SemanticIndex::new(100, None);
        let p = [1; 32];
        index.insert(p, &[1.0, 0.0, 0.0], answer("east"), Deployment::of("p", "m"), Duration::from_secs(60)).unwrap();
        index.insert(p, &[0.0, 1.0, 0.0], answer("north"), Deployment::of("p", "m"), Duration::from_secs(60)).unwrap();
        let (kept, _, similarity) = index.lookup(&p, &[0.9, 0.1, 0.0], 0.9).unwrap().unwrap();
        assert_eq!(text(&kept), "east");
        assert!(similarity > 0.99);
        assert!(index.lookup(&p, &[0.7, 0.7, 0.0], 0.9).unwrap().is_none(), "between both: under the threshold");
        assert!(index.lookup(&[2; 32], &[1.0, 0.0, 0.0], 0.1).unwrap().is_none(), "another partition");
        assert_eq!(index.lookup(&p, &[1.0, 0.0], 0.5).unwrap_err(), VectorError::Dimension { expected: 3, got: 2 });
        assert_eq!(
            index
                .insert(p, &[0.0, 0.0, 0.0], answer("x"), Deployment::of("p", "m"), Duration::from_secs(1))
                .unwrap_err(),
            VectorError::Unusable
        );
        assert_eq!(
            index
                .insert(p, &[f32::NAN, 1.0, 0.0], answer("x"), Deployment::of("p", "m"), Duration::from_secs(1))
                .unwrap_err(),
            VectorError::Unusable
        );
    }

    #[test]
    fn partitions_hold_the_tenant_the_model_and_the_parameters_not_the_messages() {
        let a = CompletionRequest::new("", vec![Message::new(Role::User, "hi")]);
        let b = CompletionRequest::new("", vec![Message::new(Role::User, "hello there")]);
        assert_eq!(partition("t", "m", "e", false, &a), partition("t", "m", "e", false, &b));
        assert_ne!(partition("t", "m", "e", false, &a), partition("u", "m", "e", false, &a));
        assert_ne!(partition("t", "m", "e", false, &a), partition("t", "m", "f", false, &a));
        let mut hot = a.clone();
        hot.temperature = Some(1.0);
        assert_ne!(partition("t", "m", "e", false, &a), partition("t", "m", "e", false, &hot));
        assert!(conversation(&b).contains("hello there"));
    }

    #[test]
    fn the_oldest_go_first_and_the_file_keeps_what_has_not_expired() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("semantic-cache.json");
        let index = SemanticIndex::new(2, Some(path.clone()));
        let stream = Kept::Stream(vec![CompletionChunk {
            delta: "str".into(),
            tool_calls: vec![ToolCallDelta { index: 0, id: Some("c".into()), name: None, arguments: "{".into() }],
            finish_reason: Some(FinishReason::ToolCalls),
            usage: Some(Usage { prompt_tokens: 1, completion_tokens: 2 }),
        }]);
        index.insert([1; 32], &[1.0, 0.0], answer("one"), Deployment::of("p", "m"), Duration::from_secs(60)).unwrap();
        index.insert([1; 32], &[0.0, 1.0], stream, Deployment::of("p", "m"), Duration::from_secs(60)).unwrap();
        index.insert([2; 32], &[1.0, 1.0], answer("three"), Deployment::of("p", "m"), Duration::from_secs(60)).unwrap();
        assert_eq!(index.len(), 2);
        assert!(index.lookup(&[1; 32], &[1.0, 0.0], 0.99).unwrap().is_none(), "the oldest went");
        index.save().unwrap();
        let again = SemanticIndex::new(10, Some(path.clone()));
        assert_eq!(again.len(), 2);
        let (kept, _, _) = again.lookup(&[1; 32], &[0.0, 1.0], 0.99).unwrap().unwrap();
        assert!(
            matches!(&kept, Kept::Stream(c) if c[0].tool_calls[0].arguments == "{" && c[0].finish_reason == Some(FinishReason::ToolCalls))
        );
        let (kept, _, _) = again.lookup(&[2; 32], &[2.0, 2.0], 0.99).unwrap().unwrap();
        assert!(
            matches!(&kept, Kept::Whole(c) if c.finish_reason == FinishReason::Other("odd".into()) && c.usage.completion_tokens == 4)
        );
        // A file that cannot be read is set aside; the index starts empty.
        std::fs::write(&path, "not json").unwrap();
        assert!(SemanticIndex::new(10, Some(path.clone())).is_empty());
        assert!(path.with_extension("unreadable").exists());
    }
}
