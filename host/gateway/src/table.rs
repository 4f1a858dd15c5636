//! A tenant's model table: each model name clients ask for maps to deployments (an installed
//! provider plugin and the upstream model it is asked for), a routing strategy, prices and
//! limits. Tables are data: set through the API, stored in the database, read by every node.

use serde::{Deserialize, Serialize};

/// How a model's deployments are tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// In table order: the first healthy one, the others as a fallback chain.
    #[default]
    Priority,
    /// At random in proportion to `weight`; the others, also by weight, as fallbacks.
    Weighted,
    /// Fewest requests in flight on this node first.
    LeastBusy,
    /// Lowest recent latency (moving average) first; one request in ten explores another.
    Latency,
    /// Cheapest first by the price table (input plus output price).
    Cost,
}

impl Strategy {
    /// The name used in tables and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Priority => "priority",
            Strategy::Weighted => "weighted",
            Strategy::LeastBusy => "least-busy",
            Strategy::Latency => "latency",
            Strategy::Cost => "cost",
        }
    }
}

/// One way of serving a model name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    /// An installed provider plugin of the tenant (by its install name).
    #[schema(pattern = r"^[a-z0-9_-]{1,64}$")]
    pub plugin: String,
    /// The model the plugin asks its upstream for; empty for the plugin's configured default.
    #[serde(default)]
    #[schema(max_length = 256, pattern = r"^[^\u0000-\u001f\u007f-\u009f]*$")]
    pub model: String,
    /// Share of traffic under `weighted` (0: only as a fallback).
    #[serde(default = "one")]
    #[schema(maximum = 1_000_000)]
    pub weight: u32,
    /// Price per million input tokens, in the table's currency.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1_000_000)]
    pub input_price: f64,
    /// Price per million output tokens.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1_000_000)]
    pub output_price: f64,
    /// The upstream's own limit of requests per minute for this deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub rpm: Option<u32>,
    /// The upstream's own limit of tokens per minute for this deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub tpm: Option<u32>,
}

fn one() -> u32 {
    1
}

impl Deployment {
    /// `plugin`'s `model`, at no price, weight 1 and without limits of its own.
    pub fn of(plugin: &str, model: &str) -> Deployment {
        Deployment {
            plugin: plugin.to_string(),
            model: model.to_string(),
            weight: 1,
            input_price: 0.0,
            output_price: 0.0,
            rpm: None,
            tpm: None,
        }
    }

    /// `plugin/model`, as usage records and metrics name it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.plugin, self.model)
    }

    /// The cost of a request's tokens, in billionths of the currency unit.
    pub fn cost_nanos(&self, prompt_tokens: u64, completion_tokens: u64) -> i64 {
        // price per million tokens × tokens × 1e9 / 1e6.
        let nanos = (prompt_tokens as f64 * self.input_price + completion_tokens as f64 * self.output_price) * 1_000.0;
        nanos.round().clamp(0.0, i64::MAX as f64) as i64
    }
}

/// A model name's entry in a tenant's table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// How the deployments are tried.
    #[serde(default)]
    pub strategy: Strategy,
    /// 1 to 16 deployments.
    #[schema(min_items = 1, max_items = 16)]
    pub deployments: Vec<Deployment>,
    /// Keep this model's answers (opt-in): a request the same as one answered within the time
    /// is answered again at no upstream cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,
}

/// A model's cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheSpec {
    /// How long an answer is kept, in seconds (1 to 604800, a week).
    #[schema(minimum = 1, maximum = 604_800)]
    pub ttl_secs: u32,
    /// Also answer requests that mean the same (opt-in): the conversation is embedded and an
    /// answer kept for one close enough serves it, when the model, tools and parameters are
    /// the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub semantic: Option<SemanticSpec>,
}

/// A model's semantic cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SemanticSpec {
    /// A model name of the tenant's that serves embeddings: it embeds each conversation (and is
    /// metered and held to the limits as any embedding is).
    pub embedding_model: String,
    /// The least cosine similarity for a hit, above 0 and at most 1 (1: the same conversation
    /// in all but wording the embedding ignores; 0.95 is a careful start).
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub threshold: f64,
}

/// The longest a model's answers are kept.
pub const MAX_CACHE_TTL_SECS: u32 = 604_800;

/// The most deployments one model name may have.
pub const MAX_DEPLOYMENTS: usize = 16;

/// Whether `name` may be a model name: 1-128 characters of letters, digits and `-._:/@`
/// (`gpt-4o-mini`, `ft:gpt-4o:org:x`, `meta/llama-3.1-8b`), starting with a letter or digit.
pub fn valid_model_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-._:/@".contains(c))
}

impl ModelSpec {
    /// Checks the entry for model `name`; the message names the field at fault.
    pub fn check(&self, name: &str) -> Result<(), String> {
        if !valid_model_name(name) {
            return Err(format!(
                "model name `{}` must be 1-128 letters, digits or `-._:/@`, starting with a letter or digit",
                name.escape_debug()
            ));
        }
        if self.deployments.is_empty() || self.deployments.len() > MAX_DEPLOYMENTS {
            return Err(format!(
                "deployments: a model has 1 to {MAX_DEPLOYMENTS} deployments, this one has {}",
                self.deployments.len()
            ));
        }
        for (i, d) in self.deployments.iter().enumerate() {
            let at = format!("deployments[{i}]");
            if !(1..=64).contains(&d.plugin.len())
                || !d.plugin.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
            {
                return Err(format!("{at}.plugin `{}` is not a plugin name", d.plugin.escape_debug()));
            }
            if d.model.chars().count() > 256 || d.model.chars().any(char::is_control) {
                return Err(format!("{at}.model must be at most 256 characters, none of them control characters"));
            }
            for (field, price) in [("input_price", d.input_price), ("output_price", d.output_price)] {
                if !price.is_finite() || !(0.0..=1_000_000.0).contains(&price) {
                    return Err(format!("{at}.{field} must be a price per million tokens from 0 to 1000000"));
                }
            }
            if d.weight > 1_000_000 {
                return Err(format!("{at}.weight must be 0 to 1000000"));
            }
            if d.rpm == Some(0) || d.tpm == Some(0) {
                return Err(format!("{at}: rpm and tpm are limits of at least 1 (leave them out for none)"));
            }
            if self.deployments[..i].iter().any(|e| e.plugin == d.plugin && e.model == d.model) {
                return Err(format!("{at} repeats deployment `{}`", d.key()));
            }
        }
        if let Some(cache) = &self.cache
            && !(1..=MAX_CACHE_TTL_SECS).contains(&cache.ttl_secs)
        {
            return Err(format!("cache.ttl_secs must be 1 to {MAX_CACHE_TTL_SECS} (a week)"));
        }
        if let Some(semantic) = self.cache.as_ref().and_then(|c| c.semantic.as_ref()) {
            if !(semantic.threshold > 0.0 && semantic.threshold <= 1.0) {
                return Err(format!(
                    "cache.semantic.threshold must be above 0 and at most 1, not {}",
                    semantic.threshold
                ));
            }
            if !valid_model_name(&semantic.embedding_model) {
                return Err("cache.semantic.embedding_model must be a model name of the tenant's".into());
            }
        }
        if self.strategy == Strategy::Weighted && self.deployments.iter().all(|d| d.weight == 0) {
            return Err("deployments: under `weighted`, at least one deployment needs a weight above 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec(json: &str) -> Result<ModelSpec, String> {
        let spec: ModelSpec = serde_json::from_str(json).map_err(|e| e.to_string())?;
        spec.check("gpt-4o-mini").map(|()| spec)
    }

    #[test]
    fn a_table_entry_is_checked_field_by_field() {
        let ok =
            spec(r#"{"deployments": [{"plugin": "openai", "model": "gpt-4o-mini", "input_price": 0.15}]}"#).unwrap();
        assert_eq!(ok.strategy, Strategy::Priority);
        assert_eq!(ok.deployments[0].weight, 1);
        for (json, says) in [
            (r#"{"deployments": []}"#, "1 to 16 deployments"),
            (r#"{"deployments": [{"plugin": "Open AI"}]}"#, "deployments[0].plugin"),
            (r#"{"deployments": [{"plugin": "a", "input_price": -1}]}"#, "deployments[0].input_price"),
            (r#"{"deployments": [{"plugin": "a"}, {"plugin": "a"}]}"#, "deployments[1] repeats"),
            (r#"{"deployments": [{"plugin": "a", "rpm": 0}]}"#, "rpm and tpm"),
            (r#"{"strategy": "weighted", "deployments": [{"plugin": "a", "weight": 0}]}"#, "weight above 0"),
            (r#"{"strategy": "fastest", "deployments": [{"plugin": "a"}]}"#, "unknown variant `fastest`"),
            (r#"{"deployments": [{"plugin": "a", "temperature": 1}]}"#, "unknown field `temperature`"),
            (r#"{"deployments": [{"plugin": "a"}], "cache": {"ttl_secs": 0}}"#, "cache.ttl_secs must be 1 to"),
            (r#"{"deployments": [{"plugin": "a"}], "cache": {"ttl_secs": 9999999}}"#, "cache.ttl_secs must be 1 to"),
            (r#"{"deployments": [{"plugin": "a"}], "cache": {"ttl": 5}}"#, "unknown field `ttl`"),
            (
                r#"{"deployments": [{"plugin": "a"}], "cache": {"ttl_secs": 5, "semantic": {"embedding_model": "e", "threshold": 1.5}}}"#,
                "cache.semantic.threshold must be above 0 and at most 1",
            ),
            (
                r#"{"deployments": [{"plugin": "a"}], "cache": {"ttl_secs": 5, "semantic": {"embedding_model": "e", "threshold": 0}}}"#,
                "cache.semantic.threshold",
            ),
            (
                r#"{"deployments": [{"plugin": "a"}], "cache": {"ttl_secs": 5, "semantic": {"embedding_model": "", "threshold": 0.9}}}"#,
                "cache.semantic.embedding_model",
            ),
        ] {
            let e = spec(json).unwrap_err();
            assert!(e.contains(says), "{json}: {e}");
        }
        let e = ok.check("bad name\n").unwrap_err();
        assert!(e.contains("model name"), "{e}");
    }

    #[test]
    fn cost_is_counted_in_billionths_from_prices_per_million() {
        let d = Deployment {
            plugin: "p".into(),
            model: "m".into(),
            weight: 1,
            input_price: 0.15,
            output_price: 0.6,
            rpm: None,
            tpm: None,
        };
        // 1,000 in × 0.15/M + 500 out × 0.60/M = 0.00045 = 450,000 nanos.
        assert_eq!(d.cost_nanos(1_000, 500), 450_000);
        assert_eq!(d.cost_nanos(0, 0), 0);
    }
}
