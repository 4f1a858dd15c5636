//! The semantic cache on Qdrant (`[cache] qdrant = "http://host:6334"`, its gRPC port), for nodes
//! that share one: a collection per embedding model (cosine distance, created at its first
//! answer with that model's size), each point an answer with its tenant, partition and expiry as
//! payload, and every query filtered by tenant and partition. When Qdrant does not answer (500
//! ms a call), requests are served without the cache and Qdrant is left alone for 5 s.

use crate::cache::Kept;
use crate::table::Deployment;
use qdrant_client::Qdrant;
use qdrant_client::qdrant::value::Kind;
use qdrant_client::qdrant::{
    Condition, CreateCollectionBuilder, CreateFieldIndexCollectionBuilder, Distance, FieldType, Filter, PointStruct,
    QueryPointsBuilder, Range, UpsertPointsBuilder, Value, VectorParamsBuilder,
};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long one call to Qdrant may take.
const CALL: Duration = Duration::from_millis(500);
/// How long Qdrant is left alone after a call failed.
const BACK_OFF: Duration = Duration::from_secs(5);

/// Why Qdrant could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// It refused the vector (another size than the collection's).
    Vector(String),
    /// It did not answer, or failed.
    Unavailable(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Vector(m) => write!(f, "Qdrant refused the embedding: {m}"),
            StoreError::Unavailable(m) => write!(f, "Qdrant is unavailable: {m}"),
        }
    }
}

/// Where an answer is kept: the embedding model's collection, the tenant, the partition.
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    /// The tenant's embedding model (its name in the tenant's table).
    pub embedding_model: &'a str,
    /// The tenant's id.
    pub tenant: &'a str,
    /// The request's partition ([`crate::semantic::partition`]).
    pub partition: &'a [u8; 32],
}

/// The semantic cache's index on Qdrant.
pub struct QdrantIndex {
    client: Qdrant,
    url: String,
    known: Mutex<HashSet<String>>,
    down_until: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for QdrantIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QdrantIndex").field("url", &self.url).finish()
    }
}

/// The collection of `embedding_model`'s vectors: its name made safe, with a hash so that two
/// names made safe alike stay apart.
pub fn collection(embedding_model: &str) -> String {
    use sha2::Digest;
    let safe: String =
        embedding_model.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).take(64).collect();
    let hash = sha2::Sha256::digest(embedding_model.as_bytes());
    format!("qlayer_{safe}_{:02x}{:02x}{:02x}{:02x}", hash[0], hash[1], hash[2], hash[3])
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn hex(partition: &[u8; 32]) -> String {
    partition.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(payload: &HashMap<String, Value>, key: &str) -> Option<String> {
    match payload.get(key)?.kind.as_ref()? {
        Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

impl QdrantIndex {
    /// A client of the Qdrant at `url` (its gRPC port). Nothing is asked of it yet.
    pub fn connect(url: &str) -> Result<QdrantIndex, String> {
        let client = Qdrant::from_url(url)
            .timeout(CALL)
            .connect_timeout(CALL)
            .skip_compatibility_check()
            .build()
            .map_err(|e| format!("[cache] qdrant `{url}`: {e}"))?;
        Ok(QdrantIndex { client, url: url.to_string(), known: Mutex::default(), down_until: Mutex::default() })
    }

    /// Runs `call` unless Qdrant failed in the last seconds; a failure starts the back-off.
    async fn guarded<T, F>(&self, call: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, qdrant_client::QdrantError>>,
    {
        if let Some(until) = *self.down_until.lock().unwrap_or_else(|p| p.into_inner())
            && Instant::now() < until
        {
            return Err(StoreError::Unavailable(format!("{} failed in the last {} s", self.url, BACK_OFF.as_secs())));
        }
        let outcome = match tokio::time::timeout(CALL, call).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer from {} within {} ms", self.url, CALL.as_millis()),
        };
        if outcome.contains("dimension") {
            return Err(StoreError::Vector(outcome));
        }
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + BACK_OFF);
        Err(StoreError::Unavailable(outcome))
    }

    /// The closest answer for `tenant` in `partition` with a similarity of at least `threshold`.
    pub async fn lookup(
        &self,
        at: Place<'_>,
        vector: &[f32],
        threshold: f64,
    ) -> Result<Option<(Kept, Deployment, f64)>, StoreError> {
        let Place { embedding_model, tenant, partition } = at;
        let name = collection(embedding_model);
        if !self.known.lock().unwrap_or_else(|p| p.into_inner()).contains(&name) {
            let exists = self.guarded(self.client.collection_exists(&name)).await?;
            if !exists {
                return Ok(None);
            }
            self.known.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone());
        }
        let filter = Filter::must([
            Condition::matches("tenant", tenant.to_string()),
            Condition::matches("partition", hex(partition)),
            Condition::range("expires_ms", Range { gt: Some(now_ms() as f64), ..Default::default() }),
        ]);
        let query = QueryPointsBuilder::new(&name)
            .query(vector.to_vec())
            .filter(filter)
            .limit(1)
            .with_payload(true)
            .score_threshold(threshold as f32);
        let found = self.guarded(self.client.query(query)).await?;
        let Some(point) = found.result.into_iter().next() else { return Ok(None) };
        let kept = text(&point.payload, "answer").and_then(|a| crate::semantic::kept_from_json(&a).ok());
        let deployment = text(&point.payload, "deployment").and_then(|d| serde_json::from_str(&d).ok());
        match (kept, deployment) {
            (Some(kept), Some(deployment)) => Ok(Some((kept, deployment, f64::from(point.score)))),
            _ => Err(StoreError::Unavailable(format!("a point in `{name}` has no answer this node can read"))),
        }
    }

    /// Keeps `kept` for `tenant` in `partition` under `vector` for `ttl`, creating the model's
    /// collection at its first answer.
    pub async fn insert(
        &self,
        at: Place<'_>,
        vector: Vec<f32>,
        kept: &Kept,
        deployment: &Deployment,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let Place { embedding_model, tenant, partition } = at;
        let name = collection(embedding_model);
        if !self.known.lock().unwrap_or_else(|p| p.into_inner()).contains(&name) {
            if !self.guarded(self.client.collection_exists(&name)).await? {
                let create = CreateCollectionBuilder::new(&name)
                    .vectors_config(VectorParamsBuilder::new(vector.len() as u64, Distance::Cosine));
                match self.guarded(self.client.create_collection(create)).await {
                    // Every query filters by these: indexed, Qdrant need not scan for them.
                    Ok(_) => {
                        for (field, kind) in [
                            ("tenant", FieldType::Keyword),
                            ("partition", FieldType::Keyword),
                            ("expires_ms", FieldType::Integer),
                        ] {
                            let index = CreateFieldIndexCollectionBuilder::new(&name, field, kind).wait(true);
                            self.guarded(self.client.create_field_index(index)).await?;
                        }
                    }
                    // Another node may have made it meanwhile (and indexes it).
                    Err(e) => {
                        if !self.guarded(self.client.collection_exists(&name)).await? {
                            return Err(e);
                        }
                    }
                }
            }
            self.known.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone());
        }
        let answer = crate::semantic::kept_to_json(kept);
        let deployment = serde_json::to_string(deployment).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let mut payload = qdrant_client::Payload::new();
        payload.insert("tenant", tenant.to_string());
        payload.insert("partition", hex(partition));
        payload.insert("expires_ms", now_ms() + ttl.as_millis() as i64);
        payload.insert("answer", answer);
        payload.insert("deployment", deployment);
        let point = PointStruct::new(fastrand::u64(..), vector, payload);
        self.guarded(self.client.upsert_points(UpsertPointsBuilder::new(&name, vec![point]).wait(true))).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::collection;

    #[test]
    fn collections_are_named_safely_and_apart() {
        assert!(collection("text-embedding-3-small").starts_with("qlayer_text-embedding-3-small_"));
        assert!(collection("org/model:v1").starts_with("qlayer_org_model_v1_"));
        assert_ne!(collection("a/b"), collection("a:b"));
    }
}
