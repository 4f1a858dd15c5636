//! `qlayer serve`: the multi-tenant service: its configuration (TOML file, environment, flags, in
//! that order of precedence; unknown keys are errors that quote the key), the state store (SQLite
//! in the data dir by default, PostgreSQL with a URL), the admin bootstrap, the REST API
//! ([`crate::api`]), the job executor, and graceful shutdown: requests in flight and running jobs
//! get the grace period; jobs not finished by then stay in the store and resume at the next start.

use anyhow::Context as _;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The service's configuration file (`qlayer.toml`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeConfig {
    /// Listening addresses and request limits.
    #[serde(default)]
    pub server: ServerConfig,
    /// Where state lives.
    #[serde(default)]
    pub database: DatabaseConfig,
    /// Access.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Request limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The job executor.
    #[serde(default)]
    pub jobs: JobsConfig,
    /// What plugins, and the host on a tenant's behalf, may reach besides public addresses.
    #[serde(default)]
    pub network: NetworkConfig,
    /// The OpenAI-compatible gateway.
    #[serde(default)]
    pub gateway: GatewaySection,
    /// Where the gateway's semantic cache lives.
    #[serde(default)]
    pub cache: CacheSection,
    /// The MCP server at `/mcp`.
    #[serde(default)]
    pub mcp: crate::mcp::McpSection,
    /// Where runs' capsules may be published (`POST /v1/runs/{id}/publish`).
    #[serde(default)]
    pub capsules: CapsulesSection,
}

/// `[capsules]`: publishing runs' capsules to OCI registries.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CapsulesSection {
    /// Repositories a tenant may publish under, `{tenant}` standing for its name:
    /// `registry.example.com/capsules/{tenant}` lets tenant `acme` push to
    /// `registry.example.com/capsules/acme/<name>:<tag>`. The service pushes with its own
    /// registry credentials, so nothing else is allowed. Empty (the default): publishing is off.
    #[serde(default)]
    pub publish_to: Vec<String>,
    /// A private key (PEM, from `qlayer plugin keygen`) the service signs every capsule it
    /// publishes with.
    #[serde(default)]
    pub signing_key: Option<PathBuf>,
}

impl CapsulesSection {
    /// Reads the signing key (at start, so a bad path stops the service with the key named).
    pub fn load(&self) -> anyhow::Result<crate::jobs::Capsules> {
        for prefix in &self.publish_to {
            let probe = format!("{}/x:1", prefix.replace("{tenant}", "t"));
            qlayer_registry::parse_reference(&probe)
                .map_err(|e| anyhow::anyhow!("[capsules] publish-to `{prefix}` is not a repository: {e}"))?;
        }
        let key = match &self.signing_key {
            Some(path) => Some(std::sync::Arc::new(
                qlayer_marketplace::read_key(path)
                    .with_context(|| format!("[capsules] signing-key {}", path.display()))?,
            )),
            None => None,
        };
        Ok(crate::jobs::Capsules { publish_to: self.publish_to.clone(), key })
    }
}

/// `[cache]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CacheSection {
    /// A Qdrant's gRPC URL (`http://qdrant:6334`) that holds the semantic cache for every node
    /// sharing it; without one, each node keeps its own in its data dir.
    #[serde(default)]
    pub qdrant: Option<String>,
}

impl CacheSection {
    /// Checks the URL (the message names the key).
    pub fn qdrant(&self) -> anyhow::Result<Option<String>> {
        let Some(url) = &self.qdrant else { return Ok(None) };
        let parsed = url::Url::parse(url).with_context(|| format!("[cache] qdrant `{url}` is not a URL"))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            anyhow::bail!("[cache] qdrant `{url}` must be an http:// or https:// URL of Qdrant's gRPC port");
        }
        Ok(Some(url.clone()))
    }
}

/// `[gateway]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GatewaySection {
    /// One line to front an OpenAI-compatible upstream (`http://127.0.0.1:11434/v1` for a local
    /// Ollama) for every tenant: the bundled openai provider, as plugin `upstream`, granted that
    /// host (which the operator's network policy then allows); a model name a tenant's table
    /// lacks is asked of the upstream as it is.
    #[serde(default)]
    pub upstream: Option<String>,
    /// The environment variable holding the upstream's key, sent as a bearer token.
    #[serde(default)]
    pub upstream_key_env: Option<String>,
    /// Model entries every tenant has (its own entry of the same name wins).
    #[serde(default)]
    pub models: std::collections::BTreeMap<String, qlayer_gateway::table::ModelSpec>,
    /// Requests this node serves at once, shared fairly between tenants by their weights (each
    /// tenant's `max_running` applies too); more wait their turn.
    #[serde(default = "default_gateway_concurrency")]
    pub concurrency: usize,
    /// Retries of one deployment on a retryable error (rate limited, unavailable, timeout)
    /// before falling back to the next (0-5).
    #[serde(default = "default_gateway_retries")]
    pub retries: u32,
    /// Failures in a row that make a deployment cool down (0: never).
    #[serde(default = "default_gateway_breaker")]
    pub breaker_failures: u32,
    /// How long a deployment first cools down, in ms; doubles while its probes fail.
    #[serde(default = "default_gateway_cooldown")]
    pub breaker_cooldown_ms: i64,
    /// Provider instances kept idle between requests, for the next request of the same tenant
    /// and install (0 keeps none: every request instantiates its provider); never more than a
    /// quarter of the node's instance slots.
    #[serde(default = "default_warm_instances")]
    pub warm_instances: usize,
    /// How long a node draws on quota leased from the database before giving back what it has
    /// not used (50-60000 ms): longer asks the database less often; shorter strands less quota
    /// on a node that does not use it, and a limit held at full rate admits 60 s / (60 s +
    /// this) of it.
    #[serde(default = "default_quota_lease")]
    pub quota_lease_ms: u64,
    /// Output tokens reserved against token limits for a request without `max_tokens`
    /// (1-1000000).
    #[serde(default = "default_reserve_tokens")]
    pub reserve_tokens: u32,
    /// The price table's currency, three capital letters (budgets are in it).
    #[serde(default = "default_currency")]
    pub currency: String,
    /// What this node's exact cache of answers may hold, in MiB (0-65536; 0 keeps none).
    /// A model keeps answers only when its entry says `cache = { ttl_secs = N }`.
    #[serde(default = "default_cache_mib")]
    pub cache_mib: usize,
    /// The most answers this node's semantic cache keeps (0-10000000; 0 keeps none). A model
    /// uses it only when its entry says `cache.semantic`.
    #[serde(default = "default_semantic_entries")]
    pub semantic_entries: usize,
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            upstream: None,
            upstream_key_env: None,
            models: Default::default(),
            concurrency: default_gateway_concurrency(),
            retries: default_gateway_retries(),
            breaker_failures: default_gateway_breaker(),
            breaker_cooldown_ms: default_gateway_cooldown(),
            warm_instances: default_warm_instances(),
            quota_lease_ms: default_quota_lease(),
            reserve_tokens: default_reserve_tokens(),
            currency: default_currency(),
            cache_mib: default_cache_mib(),
            semantic_entries: default_semantic_entries(),
        }
    }
}

fn default_semantic_entries() -> usize {
    10_000
}

fn default_cache_mib() -> usize {
    64
}

fn default_quota_lease() -> u64 {
    2_000
}
fn default_reserve_tokens() -> u32 {
    4_096
}
fn default_currency() -> String {
    "USD".into()
}

fn default_warm_instances() -> usize {
    qlayer_runtime::warm::MAX_IDLE
}

fn default_gateway_concurrency() -> usize {
    512
}
fn default_gateway_retries() -> u32 {
    1
}
fn default_gateway_breaker() -> u32 {
    3
}
fn default_gateway_cooldown() -> i64 {
    5_000
}

/// The plugin name of `[gateway] upstream`'s provider.
pub const UPSTREAM: &str = "upstream";

impl GatewaySection {
    /// The bundled openai provider for `[gateway] upstream`, granted exactly its host, base URL
    /// and key; `None` without one.
    pub fn upstream(&self, runtime: &qlayer_runtime::Runtime) -> anyhow::Result<Option<qlayer_runtime::Installed>> {
        let Some(url) = &self.upstream else { return Ok(None) };
        let key = match &self.upstream_key_env {
            Some(var) => Some(
                std::env::var(var)
                    .with_context(|| format!("[gateway] upstream-key-env names `{var}`, which is not set"))?,
            ),
            None => None,
        };
        let choice = qlayer_bundled::ProviderChoice::from_flags("openai", Some(url.clone()), None, key, None)
            .context("[gateway] upstream")?;
        let (name, grants) = choice.bundled_grants()?.context("the openai provider is bundled")?;
        let wasm = qlayer_bundled::bundled_plugin(name).context("the openai provider is in this build")?;
        Ok(Some(runtime.load(wasm)?.install(grants)?))
    }

    /// The upstream's `host[:port]`, which the operator allows by naming it.
    pub fn upstream_host(&self) -> anyhow::Result<Option<String>> {
        let Some(url) = &self.upstream else { return Ok(None) };
        let parsed = url::Url::parse(url).with_context(|| format!("[gateway] upstream `{url}` is not a URL"))?;
        let host = parsed.host_str().with_context(|| format!("[gateway] upstream `{url}` has no host"))?;
        Ok(Some(match parsed.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.trim_matches(['[', ']']).to_string(),
        }))
    }

    /// The gateway's configuration, after checking the ranges (the message names the key).
    pub fn config(&self) -> anyhow::Result<qlayer_gateway::service::GatewayConfig> {
        if !(1..=100_000).contains(&self.concurrency) {
            anyhow::bail!("[gateway] concurrency must be 1 to 100000");
        }
        if self.retries > 5 {
            anyhow::bail!("[gateway] retries must be 0 to 5");
        }
        if !(1..=3_600_000).contains(&self.breaker_cooldown_ms) {
            anyhow::bail!("[gateway] breaker-cooldown-ms must be 1 to 3600000");
        }
        if self.warm_instances > 10_000 {
            anyhow::bail!("[gateway] warm-instances must be 0 to 10000");
        }
        if !(50..=60_000).contains(&self.quota_lease_ms) {
            anyhow::bail!("[gateway] quota-lease-ms must be 50 to 60000");
        }
        if !(1..=1_000_000).contains(&self.reserve_tokens) {
            anyhow::bail!("[gateway] reserve-tokens must be 1 to 1000000");
        }
        if self.cache_mib > 65_536 {
            anyhow::bail!("[gateway] cache-mib must be 0 to 65536");
        }
        if self.semantic_entries > 10_000_000 {
            anyhow::bail!("[gateway] semantic-entries must be 0 to 10000000");
        }
        if self.currency.len() != 3 || !self.currency.chars().all(|c| c.is_ascii_uppercase()) {
            anyhow::bail!("[gateway] currency must be three capital letters, such as USD");
        }
        for (name, spec) in &self.models {
            spec.check(name).map_err(|e| anyhow::anyhow!("[gateway.models.{name}] {e}"))?;
        }
        Ok(qlayer_gateway::service::GatewayConfig {
            defaults: self.models.iter().map(|(n, s)| (n.clone(), std::sync::Arc::new(s.clone()))).collect(),
            passthrough: self.upstream.as_ref().map(|_| UPSTREAM.to_string()),
            retries: self.retries,
            quota_lease: std::time::Duration::from_millis(self.quota_lease_ms),
            reserve_tokens: self.reserve_tokens,
            currency: self.currency.clone(),
            cache_bytes: self.cache_mib << 20,
            semantic_entries: self.semantic_entries,
            breaker: qlayer_scheduler::breaker::BreakerPolicy {
                failures: self.breaker_failures,
                cooldown_ms: self.breaker_cooldown_ms,
                max_cooldown_ms: (self.breaker_cooldown_ms * 12).max(60_000),
            },
            ..Default::default()
        })
    }
}

/// `[network]`: by default plugins and tenant-requested installs reach public addresses only
/// (no loopback, private, link-local, multicast or unspecified addresses); `allow` opens what
/// really is internal.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NetworkConfig {
    /// Addresses, CIDR ranges and host names (each optionally with `:port`; without, every
    /// port) that may be reached although they are not public: `["10.0.0.0/8", "llm.lan:8000"]`.
    #[serde(default)]
    pub allow: Vec<String>,
}

impl NetworkConfig {
    /// The runtime's network policy. An entry that cannot be read is an error naming it.
    pub fn policy(&self) -> anyhow::Result<qlayer_runtime::NetworkPolicy> {
        qlayer_runtime::NetworkPolicy::new(&self.allow).map_err(|e| anyhow::anyhow!("[network] {e}"))
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LimitsConfig {
    /// Largest request body, in bytes (larger gets 413).
    #[serde(default = "default_body")]
    pub max_body_bytes: usize,
    /// Requests per second per tenant, on average (0: no limit; over it gets 429 and Retry-After).
    #[serde(default = "default_rate")]
    pub requests_per_second: f64,
    /// Requests a tenant may send at once above the rate.
    #[serde(default = "default_burst")]
    pub burst: f64,
    /// How long a request may take (longer gets 503 `timeout`).
    #[serde(default = "default_timeout")]
    pub request_timeout_ms: u64,
    /// Failed authentications per second per client address, on average (0: no limit); past it
    /// the client gets 429 and Retry-After before its key is looked at.
    #[serde(default = "default_auth_rate")]
    pub auth_failures_per_second: f64,
    /// Failed authentications a client address may have at once above that rate.
    #[serde(default = "default_auth_burst")]
    pub auth_failure_burst: f64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_body_bytes: default_body(),
            requests_per_second: default_rate(),
            burst: default_burst(),
            request_timeout_ms: default_timeout(),
            auth_failures_per_second: default_auth_rate(),
            auth_failure_burst: default_auth_burst(),
        }
    }
}

fn default_auth_rate() -> f64 {
    1.0
}
fn default_auth_burst() -> f64 {
    20.0
}

fn default_body() -> usize {
    1024 * 1024
}
fn default_rate() -> f64 {
    100.0
}
fn default_burst() -> f64 {
    200.0
}
fn default_timeout() -> u64 {
    30_000
}

/// `[jobs]`: the core scheduler.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct JobsConfig {
    /// Tasks this node runs at once (1-4096).
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Tasks one tenant may run at once on this node (0: only `concurrency`); a tenant's own
    /// `max_running` overrides it.
    #[serde(default)]
    pub tenant_concurrency: usize,
    /// Open tasks a tenant may have before submissions get 429 `queue_full` (0: no limit).
    #[serde(default = "default_max_open")]
    pub max_open_per_tenant: i64,
    /// How long a task's lease lasts without renewal (1000-600000 ms): how soon a dead node's
    /// tasks run elsewhere.
    #[serde(default = "default_lease")]
    pub lease_ms: i64,
    /// Attempts a task gets unless its job says otherwise (1-20).
    #[serde(default = "default_attempts")]
    pub max_attempts: i32,
    /// First retry delay (ms); doubles per attempt, with jitter.
    #[serde(default = "default_retry_base")]
    pub retry_base_ms: i64,
    /// Longest retry delay (ms).
    #[serde(default = "default_retry_max")]
    pub retry_max_ms: i64,
    /// Failures in a row that open a plugin's circuit for a tenant (0: no breakers).
    #[serde(default = "default_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open circuit first waits before a probe (ms); doubles while probes fail.
    #[serde(default = "default_breaker_cooldown")]
    pub breaker_cooldown_ms: i64,
    /// Scale mode: `nats://host:4222`; tasks travel on a JetStream work-queue stream and every
    /// node sharing the database runs them. Without it, the queue is in the database.
    #[serde(default)]
    pub queue: Option<String>,
    /// Scale mode: deliveries of a task's message after which it goes to the dead-letter
    /// subject instead of running (2-1000).
    #[serde(default = "default_max_deliver")]
    pub max_deliver: i64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig {
            concurrency: default_concurrency(),
            tenant_concurrency: 0,
            max_open_per_tenant: default_max_open(),
            lease_ms: default_lease(),
            max_attempts: default_attempts(),
            retry_base_ms: default_retry_base(),
            retry_max_ms: default_retry_max(),
            breaker_failures: default_breaker_failures(),
            breaker_cooldown_ms: default_breaker_cooldown(),
            queue: None,
            max_deliver: default_max_deliver(),
        }
    }
}

fn default_max_deliver() -> i64 {
    20
}

fn default_concurrency() -> usize {
    16
}
fn default_max_open() -> i64 {
    10_000
}
fn default_lease() -> i64 {
    15_000
}
fn default_attempts() -> i32 {
    5
}
fn default_retry_base() -> i64 {
    200
}
fn default_retry_max() -> i64 {
    30_000
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_cooldown() -> i64 {
    5_000
}

impl JobsConfig {
    /// The scheduler's configuration for node `node_id`, after checking the ranges (the
    /// message names the key).
    pub fn scheduler(&self, node_id: String) -> anyhow::Result<qlayer_scheduler::SchedulerConfig> {
        let check = |ok: bool, key: &str, range: &str| {
            if ok { Ok(()) } else { Err(anyhow::anyhow!("[jobs] {key} must be {range}")) }
        };
        check((1..=4096).contains(&self.concurrency), "concurrency", "1 to 4096")?;
        check((1_000..=600_000).contains(&self.lease_ms), "lease-ms", "1000 to 600000")?;
        check((1..=20).contains(&self.max_attempts), "max-attempts", "1 to 20")?;
        check((1..=60_000).contains(&self.retry_base_ms), "retry-base-ms", "1 to 60000")?;
        check(
            (self.retry_base_ms..=3_600_000).contains(&self.retry_max_ms),
            "retry-max-ms",
            "retry-base-ms to 3600000",
        )?;
        check((1..=3_600_000).contains(&self.breaker_cooldown_ms), "breaker-cooldown-ms", "1 to 3600000")?;
        check(self.max_open_per_tenant >= 0, "max-open-per-tenant", "0 or more")?;
        check((2..=1000).contains(&self.max_deliver), "max-deliver", "2 to 1000")?;
        if let Some(url) = &self.queue {
            check(url.starts_with("nats://") || url.starts_with("tls://"), "queue", "a nats:// or tls:// URL")?;
        }
        Ok(qlayer_scheduler::SchedulerConfig {
            node_id,
            concurrency: self.concurrency,
            tenant_concurrency: self.tenant_concurrency,
            lease_ms: self.lease_ms,
            max_attempts: self.max_attempts,
            retry_base_ms: self.retry_base_ms,
            retry_max_ms: self.retry_max_ms,
            breaker: qlayer_scheduler::breaker::BreakerPolicy {
                failures: self.breaker_failures,
                cooldown_ms: self.breaker_cooldown_ms,
                max_cooldown_ms: (self.breaker_cooldown_ms * 12).max(60_000),
            },
            max_open_per_tenant: self.max_open_per_tenant,
            queue_url: self.queue.clone(),
            max_deliver: self.max_deliver,
            interactive_concurrency: default_gateway_concurrency(),
        })
    }
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServerConfig {
    /// REST (and OpenAI-compatible) address.
    #[serde(default = "default_rest")]
    pub rest_addr: SocketAddr,
    /// gRPC address.
    #[serde(default = "default_grpc")]
    pub grpc_addr: SocketAddr,
    /// How long in-flight requests get to finish at shutdown.
    #[serde(default = "default_grace")]
    pub shutdown_grace_ms: u64,
    /// How long a REST client may take to send a request's headers, and an idle keep-alive
    /// connection may wait for its next request, before the connection is closed.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            rest_addr: default_rest(),
            grpc_addr: default_grpc(),
            shutdown_grace_ms: default_grace(),
            header_timeout_ms: default_header_timeout(),
        }
    }
}

fn default_header_timeout() -> u64 {
    10_000
}

fn default_rest() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_grpc() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}

fn default_grace() -> u64 {
    10_000
}

/// `[database]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DatabaseConfig {
    /// `sqlite://<path>` or `postgres://...`; default: `<data dir>/qlayer.db`.
    pub url: Option<String>,
}

/// `[auth]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AuthConfig {
    /// An admin key (`ql_` + 64 hex digits) to register at start; without one, a key is generated
    /// on first start and printed once.
    pub admin_key: Option<String>,
}

impl ServeConfig {
    /// Reads a config file. Unknown keys and bad values are errors that quote the key and line.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("config {}", path.display()))
    }

    /// Parses config text.
    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let config: Self = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            anyhow::anyhow!("{}{}", e.message(), line.map(|l| format!(" (line {l})")).unwrap_or_default())
        })?;
        config.network.policy()?;
        Ok(config)
    }

    /// Applies `QLAYER_REST_ADDR`, `QLAYER_GRPC_ADDR`, `QLAYER_DATABASE_URL`, `QLAYER_ADMIN_KEY` (when
    /// not empty),
    /// `QLAYER_QUEUE`, `QLAYER_UPSTREAM` (`[gateway] upstream`) and `QLAYER_NETWORK_ALLOW`
    /// (comma-separated, added to `[network] allow`).
    pub fn apply_env(&mut self) -> anyhow::Result<()> {
        if let Ok(allow) = std::env::var("QLAYER_NETWORK_ALLOW") {
            self.network.allow.extend(allow.split(',').map(str::trim).filter(|a| !a.is_empty()).map(String::from));
            self.network.policy().context("QLAYER_NETWORK_ALLOW")?;
        }
        if let Ok(addr) = std::env::var("QLAYER_REST_ADDR") {
            self.server.rest_addr = addr
                .parse()
                .with_context(|| format!("QLAYER_REST_ADDR `{addr}` is not an address like 127.0.0.1:8080"))?;
        }
        if let Ok(addr) = std::env::var("QLAYER_GRPC_ADDR") {
            self.server.grpc_addr = addr
                .parse()
                .with_context(|| format!("QLAYER_GRPC_ADDR `{addr}` is not an address like 127.0.0.1:50051"))?;
        }
        if let Ok(url) = std::env::var("QLAYER_DATABASE_URL") {
            self.database.url = Some(url);
        }
        // Empty is unset: a Kubernetes Secret or compose variable left blank means "generate one
        // at first start", not an invalid key.
        if let Ok(key) = std::env::var("QLAYER_ADMIN_KEY")
            && !key.is_empty()
        {
            self.auth.admin_key = Some(key);
        }
        if let Ok(queue) = std::env::var("QLAYER_QUEUE") {
            self.jobs.queue = Some(queue);
        }
        if let Ok(upstream) = std::env::var("QLAYER_UPSTREAM") {
            self.gateway.upstream = Some(upstream);
        }
        Ok(())
    }
}

/// A started service (see [`start`]).
pub struct Running {
    /// Where REST listens.
    pub rest_addr: SocketAddr,
    /// Where gRPC listens.
    pub grpc_addr: SocketAddr,
    /// The admin key generated at first start, to show once.
    pub first_admin_key: Option<String>,
    /// The store.
    pub db: qlayer_db::Db,
    stop: tokio::sync::watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    grpc: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    runner: std::sync::Arc<qlayer_jobs::JobRunner>,
    gateway: std::sync::Arc<qlayer_gateway::service::Gateway>,
    grace: Duration,
    _node: qlayer_scheduler::NodeIdentity,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").field("rest_addr", &self.rest_addr).finish()
    }
}

/// Opens the store (migrating it), bootstraps the admin key, picks up unfinished jobs and starts
/// listening. [`Running::stop`] shuts it down.
pub async fn start(config: ServeConfig, data_dir: PathBuf) -> anyhow::Result<Running> {
    let url = match &config.database.url {
        Some(url) => url.clone(),
        None => {
            std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
            format!("sqlite://{}", data_dir.join("qlayer.db").display())
        }
    };
    let node = qlayer_scheduler::NodeIdentity::claim(&data_dir)?;
    let mut scheduler_config = config.jobs.scheduler(node.id.clone())?;
    let mut gateway_config = config.gateway.config()?;
    // The semantic cache is kept in the data dir between runs (each node its own).
    gateway_config.semantic_path = Some(data_dir.join("semantic-cache.json"));
    gateway_config.qdrant = config.cache.qdrant()?;
    scheduler_config.interactive_concurrency = config.gateway.concurrency;
    let db = qlayer_db::Db::open(&url).await.context("opening the database")?;
    let first_admin_key =
        db.bootstrap_admin(config.auth.admin_key.as_deref()).await?.map(|secret| secret.expose().to_string());
    let mut network_config = config.network.clone();
    // The operator's own upstream is reachable because the operator named it.
    if let Some(host) = config.gateway.upstream_host()? {
        network_config.allow.push(host);
    }
    let network = network_config.policy()?;
    let runtime = std::sync::Arc::new(qlayer_runtime::Runtime::new(qlayer_runtime::RuntimeConfig {
        cache_dir: Some(qlayer_runtime::cache_dir(&data_dir)),
        network: network.clone(),
        policy: qlayer_runtime::HostPolicy { warm_instances: config.gateway.warm_instances, ..Default::default() },
    })?);
    // The registry client's connections pass the same policy as the plugins', when they connect.
    let market_config = qlayer_marketplace::MarketplaceConfig {
        egress: Some(network),
        ..qlayer_marketplace::MarketplaceConfig::load(&data_dir)?
    };
    let marketplace =
        std::sync::Arc::new(qlayer_marketplace::Marketplace::open(data_dir.clone(), market_config, db.clone()).await?);
    let runner = qlayer_jobs::JobRunner::new(
        qlayer_jobs::PluginExecutor::new(db.clone(), runtime, marketplace),
        scheduler_config,
    );
    let queued = runner.start().await?;
    tracing::info!(node = %node.id, queued, "scheduler started");
    let upstream = config.gateway.upstream(runner.runtime())?;
    let gateway = qlayer_gateway::service::Gateway::new(
        db.clone(),
        std::sync::Arc::new(crate::gateway::MarketProviders { runner: runner.clone(), upstream }),
        runner.scheduler().admission().clone(),
        gateway_config,
    );
    runner.set_gateway(&gateway);
    let state = crate::AppState {
        db: db.clone(),
        runner: runner.clone(),
        limiter: std::sync::Arc::new(crate::auth::RateLimiter::new(
            config.limits.requests_per_second,
            config.limits.burst,
        )),
        auth_guard: std::sync::Arc::new(crate::auth::AuthGuard::new(
            config.limits.auth_failures_per_second,
            config.limits.auth_failure_burst,
        )),
        limits: crate::Limits {
            max_body_bytes: config.limits.max_body_bytes,
            request_timeout: Duration::from_millis(config.limits.request_timeout_ms),
        },
        metrics: crate::metrics_handle(),
        gateway: Some(gateway.clone()),
        mcp: config.mcp.clone(),
        capsules: std::sync::Arc::new(config.capsules.load()?),
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    let grpc_routes =
        crate::grpc::Grpc::new(state.clone()).routes(config.limits.max_body_bytes)?.add_service(health_service);
    let listener = tokio::net::TcpListener::bind(config.server.rest_addr)
        .await
        .with_context(|| format!("listening on {}", config.server.rest_addr))?;
    let rest_addr = listener.local_addr()?;
    tracing::info!(addr = %rest_addr, backend = ?db.backend(), "qlayer serve: REST listening");
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(serve_rest(
        listener,
        crate::router(state),
        Duration::from_millis(config.server.header_timeout_ms.max(1)),
        stop_rx.clone(),
    ));
    let grpc_listener = tokio::net::TcpListener::bind(config.server.grpc_addr)
        .await
        .with_context(|| format!("listening on {} (gRPC)", config.server.grpc_addr))?;
    let grpc_addr = grpc_listener.local_addr()?;
    tracing::info!(addr = %grpc_addr, "qlayer serve: gRPC listening");
    let grpc = tokio::spawn({
        let mut rx = stop_rx.clone();
        let timeout = Duration::from_millis(config.limits.request_timeout_ms);
        let header_timeout = Duration::from_millis(config.server.header_timeout_ms.max(1));
        let incoming = with_preface(grpc_listener, header_timeout, stop_rx.clone());
        async move {
            tonic::transport::Server::builder()
                .timeout(timeout)
                // An idle connection is pinged; one that does not answer is closed.
                .http2_keepalive_interval(Some(header_timeout))
                .http2_keepalive_timeout(Some(header_timeout))
                .layer(tower::util::MapResponseLayer::new(crate::grpc::resource_exhausted))
                .add_routes(grpc_routes)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                    // Probes see the node going before its listener does.
                    health.set_service_status("", tonic_health::ServingStatus::NotServing).await;
                })
                .await
        }
    });
    Ok(Running {
        rest_addr,
        grpc_addr,
        grpc,
        first_admin_key,
        db,
        stop,
        server,
        runner,
        gateway,
        grace: Duration::from_millis(config.server.shutdown_grace_ms),
        _node: node,
    })
}

impl Running {
    /// Stops taking connections; requests in flight and running jobs get the grace period. Jobs
    /// not finished by then stay in the store and resume at the next start.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        let started = std::time::Instant::now();
        let requests = tokio::time::timeout(self.grace, self.server).await;
        if tokio::time::timeout(self.grace.saturating_sub(started.elapsed()), self.grpc).await.is_err() {
            tracing::warn!("gRPC calls in flight cut at the grace period");
        }
        self.runner.shutdown(self.grace.saturating_sub(started.elapsed())).await;
        // Usage records of the requests that finished are written before the store closes.
        self.gateway.shutdown().await;
        let outcome = match requests {
            Ok(joined) => joined.context("the server task failed")?.context("serving"),
            Err(_) => {
                tracing::warn!(grace_ms = self.grace.as_millis() as u64, "in-flight requests cut at the grace period");
                Ok(())
            }
        };
        self.db.close().await;
        outcome
    }
}

/// Serves REST on `listener` until `stop`, then lets open connections finish. Each connection
/// has a header-read timeout (a slow-header client is cut, and so is an idle keep-alive one) and
/// its address on every request, for the per-address limit on failed authentications.
async fn serve_rest(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    header_timeout: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Some(header_timeout));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    while let Some((stream, addr)) = accept_until_stopped(&listener, &mut stop).await {
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(axum::extract::ConnectInfo(addr));
            let mut app = app.clone();
            async move { tower::Service::call(&mut app, req.map(axum::body::Body::new)).await }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            // A connection that sends nothing is closed too: the protocol is only known (and
            // hyper's header timer only runs) once its first bytes arrive.
            let mut first = [0u8; 1];
            if !matches!(tokio::time::timeout(header_timeout, stream.peek(&mut first)).await, Ok(Ok(1..))) {
                return;
            }
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            let _ = watcher.watch(connection.into_owned()).await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// The next connection on `listener`, or `None` once `stop` is set. A failed accept (out of file
/// handles, say) is logged and retried after a pause instead of spinning.
async fn accept_until_stopped(
    listener: &tokio::net::TcpListener,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => return Some(accepted),
                Err(e) => {
                    tracing::warn!(error = %e, addr = ?listener.local_addr().ok(), "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = async { let _ = stop.wait_for(|stop| *stop).await; } => return None,
        }
    }
}

/// The HTTP/2 client preface every gRPC connection starts with.
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// gRPC's connections from `listener`, each handed to the server only once its whole HTTP/2
/// preface has arrived within `header_timeout` (hyper's HTTP/2 server has no timer before the
/// preface, so a client that connects and sends nothing, or half of it, would hold its socket
/// for ever). The preface is peeked, not read: the server reads it as usual.
fn with_preface(
    listener: tokio::net::TcpListener,
    header_timeout: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    let (ready, incoming) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                accepted = accept_until_stopped(&listener, &mut stop) => match accepted {
                    Some(accepted) => accepted,
                    None => break,
                },
                () = ready.closed() => break,
            };
            let ready = ready.clone();
            tokio::spawn(async move {
                if tokio::time::timeout(header_timeout, preface_arrived(&stream)).await.is_ok_and(|arrived| arrived) {
                    let _ = ready.send(Ok(stream)).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(incoming)
}

/// Waits until `stream` holds the 24 bytes of the HTTP/2 preface (or anything else that many
/// bytes long, which the server then refuses as it always did); false when it closes first.
async fn preface_arrived(stream: &tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; HTTP2_PREFACE.len()];
    loop {
        match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) if n == buf.len() => return true,
            // Part of it: peeking again at once would return the same bytes, so wait a little.
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Runs the service until SIGINT or SIGTERM, then stops as [`Running::stop`] does.
pub async fn serve(config: ServeConfig, data_dir: PathBuf) -> anyhow::Result<()> {
    // The handlers first: a SIGTERM that comes once the service answers must stop it cleanly
    // (registered after `start`, one that came in between killed the process).
    let signals = ShutdownSignals::install()?;
    let running = start(config, data_dir).await?;
    if let Some(secret) = &running.first_admin_key {
        // Shown once, to the operator's terminal; never through the logs.
        #[allow(clippy::print_stderr)]
        {
            // A block of its own among the JSON log lines, so it is not missed.
            let rule = "=".repeat(78);
            eprintln!(
                "\n{rule}\nqlayer: first start: admin API key (shown once, store it now):\n\n    {secret}\n\n\
                 It belongs to the `system` tenant (an operator). Set QLAYER_ADMIN_KEY or [auth] admin-key\n\
                 to choose your own instead.\n{rule}\n"
            );
        }
    }
    #[allow(clippy::print_stdout)]
    {
        println!("qlayer serve: REST on http://{}, gRPC on {}", running.rest_addr, running.grpc_addr);
    }
    signals.wait().await;
    tracing::info!("qlayer serve: shutting down");
    running.stop().await
}

/// SIGINT and SIGTERM, registered when made (tokio's `ctrl_c()` registers only once polled).
struct ShutdownSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(ShutdownSignals {
                interrupt: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
                terminate: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        Ok(ShutdownSignals {})
    }

    /// Until one of them comes.
    async fn wait(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn unknown_keys_are_errors_that_quote_the_key_and_line() {
        let err = ServeConfig::from_toml("[server]\nrest-addr = \"127.0.0.1:1\"\nrest-adr = \"x\"\n").unwrap_err();
        let message = format!("{err:#}");
        assert!(message.contains("rest-adr") && message.contains("line 3"), "{message}");
        let err = ServeConfig::from_toml("[databse]\nurl = \"x\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("databse"), "{err:#}");
        let err = ServeConfig::from_toml("[server]\nrest-addr = \"nowhere\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
        let ok = ServeConfig::from_toml(
            "[server]\nrest-addr = \"0.0.0.0:9000\"\n[database]\nurl = \"sqlite:///tmp/x.db\"\n",
        )
        .unwrap();
        assert_eq!(ok.server.rest_addr.port(), 9000);
        assert_eq!(ServeConfig::from_toml("").unwrap(), ServeConfig::default());
    }

    #[test]
    fn capsule_settings_are_checked_at_start_naming_the_key() {
        let ok = ServeConfig::from_toml("[capsules]\npublish-to = [\"r.example.com/capsules/{tenant}\"]\n").unwrap();
        assert_eq!(ok.capsules.load().unwrap().publish_to, ["r.example.com/capsules/{tenant}"]);
        let bad = ServeConfig::from_toml("[capsules]\npublish-to = [\"not a repo!\"]\n").unwrap();
        let message = format!("{:#}", bad.capsules.load().unwrap_err());
        assert!(message.contains("[capsules] publish-to `not a repo!`"), "{message}");
        let missing = ServeConfig::from_toml("[capsules]\nsigning-key = \"/nonexistent/capsules.key\"\n").unwrap();
        let message = format!("{:#}", missing.capsules.load().unwrap_err());
        assert!(message.contains("[capsules] signing-key /nonexistent/capsules.key"), "{message}");
        assert!(ServeConfig::from_toml("[capsules]\npublish = []\n").is_err(), "unknown keys too");
    }

    #[test]
    fn network_allow_entries_are_checked_when_the_config_is_read() {
        let ok = ServeConfig::from_toml("[network]\nallow = [\"10.0.0.0/8\", \"llm.lan:8000\"]\n").unwrap();
        assert_eq!(ok.network.allow.len(), 2);
        for bad in ["*", "10.0.0.0/40", "http://x"] {
            let err = ServeConfig::from_toml(&format!("[network]\nallow = [\"{bad}\"]\n")).unwrap_err();
            let message = format!("{err:#}");
            assert!(message.contains("[network]") && message.contains(bad), "{message}");
        }
        assert!(ServeConfig::from_toml("[network]\nalow = []\n").is_err(), "unknown keys too");
    }

    #[test]
    fn scheduler_settings_out_of_range_are_refused_naming_the_key() {
        for (text, key) in [
            ("[jobs]\nconcurrency = 0\n", "concurrency"),
            ("[jobs]\nlease-ms = 10\n", "lease-ms"),
            ("[jobs]\nmax-attempts = 50\n", "max-attempts"),
            ("[jobs]\nretry-base-ms = 500\nretry-max-ms = 100\n", "retry-max-ms"),
            ("[jobs]\nbreaker-cooldown-ms = 0\n", "breaker-cooldown-ms"),
            ("[jobs]\nmax-open-per-tenant = -1\n", "max-open-per-tenant"),
            ("[jobs]\nmax-deliver = 1\n", "max-deliver"),
            ("[jobs]\nqueue = \"http://127.0.0.1:4222\"\n", "queue"),
        ] {
            let config = ServeConfig::from_toml(text).unwrap();
            let err = config.jobs.scheduler("node".into()).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        let err = ServeConfig::from_toml("[jobs]\nconcurency = 2\n").unwrap_err();
        assert!(format!("{err:#}").contains("concurency"), "{err:#}");
        let ok = ServeConfig::from_toml("[jobs]\nqueue = \"nats://127.0.0.1:4222\"\n").unwrap();
        assert_eq!(ok.jobs.scheduler("node".into()).unwrap().queue_url.as_deref(), Some("nats://127.0.0.1:4222"));
    }

    #[test]
    fn gateway_settings_are_checked_naming_the_key() {
        for (text, says) in [
            ("[gateway]\nconcurrency = 0\n", "[gateway] concurrency"),
            ("[gateway]\nretries = 9\n", "[gateway] retries"),
            ("[gateway]\nbreaker-cooldown-ms = 0\n", "[gateway] breaker-cooldown-ms"),
            ("[gateway]\nwarm-instances = 20000\n", "[gateway] warm-instances"),
            ("[gateway]\nquota-lease-ms = 10\n", "[gateway] quota-lease-ms"),
            ("[gateway]\nreserve-tokens = 0\n", "[gateway] reserve-tokens"),
            ("[gateway]\ncache-mib = 100000\n", "[gateway] cache-mib"),
            ("[gateway]\nsemantic-entries = 99999999\n", "[gateway] semantic-entries"),
            ("[gateway]\ncurrency = \"usd\"\n", "[gateway] currency"),
            ("[gateway.models.fast]\ndeployments = []\n", "[gateway.models.fast] deployments"),
            ("[gateway.models.fast]\ndeployments = [{ plugin = \"Bad Name\" }]\n", "deployments[0].plugin"),
        ] {
            let config = ServeConfig::from_toml(text).unwrap();
            let err = config.gateway.config().unwrap_err();
            assert!(err.to_string().contains(says), "{text}: {err}");
        }
        for (text, says) in [
            ("[gateway]\nupstrem = \"x\"\n", "upstrem"),
            ("[gateway.models.fast]\ndeployments = [{ plugin = \"a\", temperature = 1 }]\n", "temperature"),
        ] {
            let err = ServeConfig::from_toml(text).unwrap_err();
            assert!(format!("{err:#}").contains(says), "{text}: {err:#}");
        }
        for (text, says) in [
            ("[cache]\nqdrant = \"not a url\"\n", "[cache] qdrant `not a url` is not a URL"),
            ("[cache]\nqdrant = \"ftp://q:6334\"\n", "gRPC port"),
        ] {
            let config = ServeConfig::from_toml(text).unwrap();
            assert!(config.cache.qdrant().unwrap_err().to_string().contains(says), "{text}");
        }
        assert!(ServeConfig::from_toml("[cache]\nqdrnt = \"x\"\n").is_err());
        let bad = ServeConfig::from_toml("[gateway]\nupstream = \"not a url\"\n").unwrap();
        assert!(bad.gateway.upstream_host().unwrap_err().to_string().contains("[gateway] upstream"));
        let ok = ServeConfig::from_toml(
            "[gateway]\nupstream = \"http://127.0.0.1:11434/v1\"\n[gateway.models.fast]\ndeployments = [{ plugin = \"upstream\", model = \"llama3.1\" }]\n",
        )
        .unwrap();
        assert_eq!(ok.gateway.upstream_host().unwrap().as_deref(), Some("127.0.0.1:11434"));
        let config = ok.gateway.config().unwrap();
        assert_eq!((config.passthrough.as_deref(), config.defaults.len()), (Some(UPSTREAM), 1));
    }
}
