//! The sandbox: engine, pooling, limits, grants, outbound policy, compile cache, component and
//! Extism loading, the bindings of each WIT version.
//! May depend on: `qlayer-manifest`, `qlayer-registry`.
//!
//! The sandbox: one wasmtime `Engine` for the process, a plugin per loaded component, and a fresh
//! `Store` per tenant instance.
//!
//! - The pooling allocator pre-reserves instance slots, so instantiating from an `InstancePre`
//!   costs microseconds. A permit per live instance keeps the pool from overflowing: a caller
//!   beyond the pool waits for a slot instead of failing.
//! - Epoch interruption bounds guest execution: a ticker thread bumps the epoch every
//!   [`EPOCH_TICK`]; on each tick a running guest yields to the async executor (so one busy plugin
//!   never starves other tasks on its thread) and is stopped once its call's deadline has passed.
//!   Time spent waiting in host calls (HTTP, the `llm` import) is bounded by a timer around the
//!   whole call.
//! - Each store gets a memory limit from the manifest, clamped by [`HostPolicy`]. A refused
//!   growth is remembered so the trap it causes is reported as out-of-memory.
//! - Tenants never share a store or linear memory: every instance has its own store.
//! - Memory returns when an instance ends: its linear memory and tables are reset (madvise) as
//!   soon as its slot is freed, so the pool keeps address space, not pages; and large host-side
//!   buffers (outputs, bodies) are given back to the OS when freed (see [`memory`]).

mod bindings;
mod cache;
mod compat;
pub mod egress;
mod extism_tool;
mod grants;
mod logs;
pub mod memory;
pub mod network;
mod outbound;
mod state;
pub mod warm;

pub use extism_tool::ExtismInstance;
pub use warm::{WarmProvider, WarmStats};

pub use bindings::types::{
    AgentOutput, Artifact, Completion, CompletionChunk, CompletionRequest, ContentPart, Diagnostic, EmbeddingRequest,
    Embeddings, FinishReason, ImageUrl, JsonSchema, Message, ModelInfo, PluginError, ResponseFormat, Role, Severity,
    Task, ToolCall, ToolCallDelta, ToolChoice, ToolDefinition, Usage,
};
pub use bindings::v0_2::agent::quantumlayer::plugin::tools::ToolInfo;
pub use compat::{Unexpressible, unexpressible_in_v0_1};
pub use grants::{GrantError, Grants, Secret};
pub use network::NetworkPolicy;
pub use qlayer_manifest::{Format, HostPattern, InputChecker, Kind, Manifest, ToolSpec};

use anyhow::Context as _;
use bindings::{v0_1, v0_2, v0_3};
use compat::Conv;
use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use state::StoreState;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::{Component, Linker, ResourceAny};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, UpdateDeadline};

/// How often the epoch advances. A running guest yields to the executor once per tick and is
/// checked against its deadline, so a deadline is enforced to within about one tick.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Limits the host imposes whatever a manifest asks for.
#[derive(Debug, Clone)]
pub struct HostPolicy {
    /// Memory a plugin gets when its manifest does not say, in MiB.
    pub default_memory_mb: u32,
    /// The most memory any plugin gets, in MiB.
    pub max_memory_mb: u32,
    /// Call deadline when the manifest does not say.
    pub default_timeout: Duration,
    /// The longest deadline any call gets.
    pub max_timeout: Duration,
    /// Live instances the pool holds at once; more callers wait for a slot.
    pub max_instances: u32,
    /// Largest output of one call when the manifest does not say, in KiB.
    pub default_output_kb: u32,
    /// The largest output any call may return, in KiB.
    pub max_output_kb: u32,
    /// Outbound requests one tenant's instances may have in flight at once, components' and
    /// Extism plugins' together ([`outbound::PER_TENANT`] by default).
    pub outbound_per_tenant: usize,
    /// Provider instances kept idle between calls at most (see [`warm`]; 0 keeps none), never
    /// more than a quarter of `max_instances`.
    pub warm_instances: usize,
}

impl Default for HostPolicy {
    fn default() -> Self {
        HostPolicy {
            default_memory_mb: 64,
            max_memory_mb: 512,
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(300),
            max_instances: 1000,
            default_output_kb: 4 * 1024,
            max_output_kb: 64 * 1024,
            outbound_per_tenant: outbound::PER_TENANT,
            warm_instances: warm::MAX_IDLE,
        }
    }
}

/// Where a data directory's compiled plugins are cached: `$QLAYER_CACHE_DIR` when set (several
/// data directories on one machine, or a read-only root with the cache on a volume, may share
/// one), else `<data dir>/cache`. Entries are keyed by the component's digest and the engine's
/// settings, so sharing is safe.
pub fn cache_dir(data_dir: &std::path::Path) -> PathBuf {
    match std::env::var_os("QLAYER_CACHE_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => data_dir.join("cache"),
    }
}

/// How to build a [`Runtime`].
#[derive(Debug, Clone, Default)]
pub struct RuntimeConfig {
    /// Where compiled components are cached; `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
    /// Limits for every plugin.
    pub policy: HostPolicy,
    /// Which non-public addresses plugins may reach (none by default).
    pub network: NetworkPolicy,
}

/// Why a component could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The manifest is missing or malformed.
    #[error(transparent)]
    Manifest(#[from] qlayer_manifest::ManifestError),
    /// A core module where a component is expected.
    #[error(
        "`{0}` is a core WebAssembly module, not a component; build it for wasm32-wasip2 (or with `qlayer plugin build`)"
    )]
    NotComponent(String),
    /// The component does not match the world its manifest declares.
    #[error("plugin `{plugin}` declares kind `{kind}` (world `{world}`) but {problem}")]
    WrongWorld {
        /// The plugin.
        plugin: String,
        /// The declared kind.
        kind: Kind,
        /// The kind's world.
        world: &'static str,
        /// What does not match.
        problem: String,
    },
    /// wasmtime refused the component.
    #[error("plugin `{plugin}` could not be compiled: {message}")]
    Compile {
        /// The plugin.
        plugin: String,
        /// wasmtime's message.
        message: String,
    },
}

/// What went wrong in one plugin call. The host and every other tenant carry on.
#[derive(Debug)]
pub struct CallError {
    /// The plugin that was called.
    pub plugin: Arc<str>,
    /// The tenant it was called for.
    pub tenant: Arc<str>,
    /// What happened.
    pub kind: CallErrorKind,
}

/// The kinds of [`CallError`].
#[derive(Debug)]
pub enum CallErrorKind {
    /// The plugin returned an error of the contract's `plugin-error` variant.
    Plugin(PluginError),
    /// The call ran past its deadline and was stopped.
    Timeout(Duration),
    /// The plugin tried to grow its memory past its limit.
    OutOfMemory {
        /// The limit, in bytes.
        limit: usize,
        /// The size it asked for, in bytes.
        requested: usize,
    },
    /// The guest trapped (a panic, an `unreachable`, a bad memory access...).
    Trap(String),
    /// The instance was left unusable by an earlier trap, timeout or out-of-memory.
    Poisoned,
    /// The call returned more than its output limit (the manifest's `output-kb`, clamped by
    /// the host policy); nothing of it is kept.
    OutputTooLarge {
        /// The limit, in bytes.
        limit: usize,
        /// What it returned, in bytes.
        size: usize,
    },
}

impl CallError {
    /// Whether retrying the same call may succeed (rate limits, unavailability, timeouts).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            CallErrorKind::Timeout(_)
                | CallErrorKind::Plugin(
                    PluginError::RateLimited(_) | PluginError::Unavailable(_) | PluginError::Timeout
                )
        )
    }

    /// The error as the contract's variant, for handing to another plugin (an agent's `llm` call).
    pub fn to_plugin_error(&self) -> PluginError {
        match &self.kind {
            CallErrorKind::Plugin(e) => e.clone(),
            CallErrorKind::Timeout(_) => PluginError::Timeout,
            _ => PluginError::Internal(self.to_string()),
        }
    }
}

/// A plugin error in words.
pub fn describe(e: &PluginError) -> String {
    match e {
        PluginError::InvalidInput(m) => format!("invalid input: {m}"),
        PluginError::Unauthorized(m) => format!("unauthorized: {m}"),
        PluginError::RateLimited(Some(ms)) => format!("rate limited: retry after {ms} ms"),
        PluginError::RateLimited(None) => "rate limited".to_string(),
        PluginError::Unavailable(m) => format!("unavailable: {m}"),
        PluginError::Timeout => "timed out".to_string(),
        PluginError::Internal(m) => format!("internal error: {m}"),
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = format!("plugin `{}` (tenant `{}`)", self.plugin, self.tenant);
        match &self.kind {
            CallErrorKind::Plugin(e) => write!(f, "{who}: {}", describe(e)),
            CallErrorKind::Timeout(d) => write!(f, "{who} ran past its {} ms deadline and was stopped", d.as_millis()),
            CallErrorKind::OutOfMemory { limit, requested: 0 } => {
                write!(f, "{who} ran out of memory: it asked for more than its limit of {limit} bytes")
            }
            CallErrorKind::OutOfMemory { limit, requested } => {
                write!(f, "{who} ran out of memory: it asked for {requested} bytes, past its limit of {limit} bytes")
            }
            CallErrorKind::Trap(m) => write!(f, "{who} trapped: {m}"),
            CallErrorKind::Poisoned => write!(f, "{who}: this instance failed earlier and cannot be used again"),
            CallErrorKind::OutputTooLarge { limit, size } => {
                write!(f, "{who} returned {size} bytes, past its output limit of {limit} bytes (limits.output-kb)")
            }
        }
    }
}

impl std::error::Error for CallError {}

/// Something that answers an agent's `llm.complete` for a tenant: the host's router.
pub trait LlmHandler: Send + Sync {
    /// One completion for `tenant`.
    fn complete<'a>(
        &'a self,
        tenant: &'a str,
        request: CompletionRequest,
    ) -> BoxFuture<'a, Result<Completion, PluginError>>;
}

/// What answers an agent's `tools` import for a tenant: the tools its step was granted, each call
/// run by the host in the tool's own instance.
pub trait ToolHandler: Send + Sync {
    /// The granted tools.
    fn list<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, Vec<ToolInfo>>;
    /// Invokes granted tool `name`; a name not granted is `invalid-input`.
    fn invoke<'a>(
        &'a self,
        tenant: &'a str,
        name: &'a str,
        input_json: &'a str,
    ) -> BoxFuture<'a, Result<String, PluginError>>;
}

struct Shared {
    engine: Engine,
    linkers: [Linker<StoreState>; 4],
    /// A provider's or tool's linker without wasi:http, for installs granted no host.
    closed_linker: Linker<StoreState>,
    tenant_logs: Arc<logs::TenantBudgets>,
    outbound: Arc<outbound::Outbound>,
    /// Extism modules compiled for an install, by plugin digest, grants and limits.
    extism_compiled: std::sync::Mutex<std::collections::HashMap<String, Vec<Arc<extism_tool::Compiled>>>>,
    /// Plugins loaded (compiled or read from the compile cache, checked and pre-linked), by
    /// digest: a call of an installed plugin does not load it again. A digest names the bytes,
    /// so an entry is never stale.
    loaded: std::sync::Mutex<std::collections::HashMap<String, Arc<Loaded>>>,
    /// Plugins loaded so far (misses of `loaded`).
    loads: std::sync::atomic::AtomicUsize,
    policy: HostPolicy,
    cache: Option<cache::CompiledCache>,
    slots: Arc<Semaphore>,
    /// Provider instances kept idle between calls (see [`warm`]).
    warm: Arc<warm::WarmPool>,
    stop_ticker: Arc<AtomicBool>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

/// The plugin host runtime. Cheap to clone; clones share the engine and the instance pool.
#[derive(Clone)]
pub struct Runtime {
    shared: Arc<Shared>,
}

impl Runtime {
    /// Builds the engine, the linkers for each world, and starts the epoch ticker.
    pub fn new(config: RuntimeConfig) -> anyhow::Result<Self> {
        memory::return_large_frees_to_the_os();
        let policy = config.policy;
        let instances = policy.max_instances.max(1);
        let mut pool = PoolingAllocationConfig::default();
        // A Rust component built for wasm32-wasip2 has a few core instances (the program and the
        // adapter shims), one memory and a couple of tables.
        pool.total_component_instances(instances)
            .total_core_instances(instances * 4)
            .total_memories(instances * 2)
            .total_tables(instances * 4)
            .total_stacks(instances)
            .max_memory_size(policy.max_memory_mb as usize * 1024 * 1024)
            // A freed slot is reset with madvise at once, and keeps nothing resident. Batching
            // those calls and keeping each slot's first 128 KiB of memory and 64 KiB of tables
            // (reset with memset) saved about 2 µs of a 20 µs instantiation, but a finished
            // 512 MiB instance stayed resident until 15 more had ended, and every slot that ever
            // held an instance kept its pages: 150 MiB idle after 1,000 concurrent instances.
            .decommit_batch_size(1)
            .linear_memory_keep_resident(0)
            .table_keep_resident(0);
        let mut wasm = Config::new();
        wasm.epoch_interruption(true)
            .wasm_component_model(true)
            // Plugins target WASI p2 and sync-lowered exports; the component-model-async
            // machinery (p3 streams, concurrent calls) is not used, and leaving its per-store
            // state out makes instantiation and every call cheaper.
            .concurrency_support(false)
            // One memory per core module, as every toolchain we support emits; the memories of a
            // component's core instances count together against the plugin's limit.
            .wasm_multi_memory(false)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&wasm).map_err(anyhow::Error::from).context("creating the wasmtime engine")?;

        let linkers = [
            linker_for(&engine, Kind::Provider)?,
            linker_for(&engine, Kind::Agent)?,
            linker_for(&engine, Kind::Validator)?,
            linker_for(&engine, Kind::Tool)?,
        ];
        let closed_linker = base_linker(&engine)?;
        let cache = match config.cache_dir {
            Some(dir) => Some(cache::CompiledCache::open(dir, &engine)?),
            None => None,
        };
        let stop_ticker = Arc::new(AtomicBool::new(false));
        let warm = Arc::new(warm::WarmPool::new(instances as usize, policy.warm_instances));
        {
            let (engine, stop, pool) = (engine.weak(), stop_ticker.clone(), Arc::downgrade(&warm));
            // Idle warm instances are swept about once a second.
            let sweep_every = (Duration::from_secs(1).as_millis() / EPOCH_TICK.as_millis()).max(1) as u32;
            std::thread::Builder::new()
                .name("qlayer-epoch".into())
                .spawn(move || {
                    let mut ticks = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        match engine.upgrade() {
                            Some(engine) => engine.increment_epoch(),
                            None => return,
                        }
                        ticks = ticks.wrapping_add(1);
                        if ticks.is_multiple_of(sweep_every)
                            && let Some(pool) = pool.upgrade()
                        {
                            pool.sweep();
                        }
                    }
                })
                .context("starting the epoch ticker")?;
        }
        Ok(Runtime {
            shared: Arc::new(Shared {
                engine,
                linkers,
                closed_linker,
                tenant_logs: Arc::default(),
                outbound: Arc::new(outbound::Outbound::new(config.network, policy.outbound_per_tenant)),
                extism_compiled: Default::default(),
                loaded: Default::default(),
                loads: Default::default(),
                policy,
                cache,
                slots: Arc::new(Semaphore::new(instances as usize)),
                warm,
                stop_ticker,
            }),
        })
    }

    /// The imports and exports `wasm` declares (a core module's imports as `module::name`), for
    /// `qlayer plugin inspect`; empty lists when it does not compile.
    pub fn interface(&self, wasm: &[u8]) -> (Vec<String>, Vec<String>) {
        if !qlayer_manifest::is_component(wasm) {
            // A core module (an Extism plugin): its imports and exported functions.
            return match wasmtime::Module::new(&Engine::default(), wasm) {
                Ok(module) => (
                    module.imports().map(|i| format!("{}::{}", i.module(), i.name())).collect(),
                    module.exports().map(|e| e.name().to_string()).collect(),
                ),
                Err(_) => (Vec::new(), Vec::new()),
            };
        }
        match wasmtime::component::Component::new(&self.shared.engine, wasm) {
            Ok(component) => {
                let ty = component.component_type();
                (
                    ty.imports(&self.shared.engine).map(|(n, _)| n.to_string()).collect(),
                    ty.exports(&self.shared.engine).map(|(n, _)| n.to_string()).collect(),
                )
            }
            Err(_) => (Vec::new(), Vec::new()),
        }
    }

    /// The engine (for benchmarks and tools).
    pub fn engine(&self) -> &Engine {
        &self.shared.engine
    }

    /// The policy in force.
    pub fn policy(&self) -> &HostPolicy {
        &self.shared.policy
    }

    /// The operator's network policy, which every plugin connection and grant passes.
    pub fn network(&self) -> &NetworkPolicy {
        self.shared.outbound.policy()
    }

    /// How many times a plugin was loaded (compiled or read from the compile cache, checked and
    /// pre-linked) since the runtime started; loading a digest already loaded does not count.
    pub fn plugin_loads(&self) -> usize {
        self.shared.loads.load(Ordering::Relaxed)
    }

    /// The warm provider pool's counters (see [`Installed::warm_provider`]).
    pub fn warm_stats(&self) -> WarmStats {
        self.shared.warm.stats()
    }

    /// The plugin with this (checked) digest, when it is loaded already: what a caller holding
    /// only the digest can use instead of reading and checking the bytes again.
    pub fn loaded(&self, digest: &str) -> Option<Arc<Plugin>> {
        let loaded = self.shared.loaded.lock().unwrap_or_else(|p| p.into_inner()).get(digest).cloned()?;
        Some(Arc::new(Plugin {
            manifest: loaded.manifest.clone(),
            digest: digest.to_string(),
            size: loaded.size,
            pre: loaded.pre.clone(),
            input: loaded.input.clone(),
            shared: self.shared.clone(),
        }))
    }

    /// Extism modules compiled and kept for reuse by later installs with the same grants.
    pub fn compiled_extism_modules(&self) -> usize {
        self.shared.extism_compiled.lock().map(|c| c.values().map(Vec::len).sum()).unwrap_or(0)
    }

    /// Outbound requests the process may have in flight (from its file-handle limit).
    pub fn outbound_limit(&self) -> usize {
        self.shared.outbound.process_limit()
    }

    /// Loads a plugin: reads its manifest, compiles it (or loads the cached compilation), checks
    /// that it matches its declared world, and pre-links it. Nothing of the plugin runs.
    pub fn load(&self, wasm: &[u8]) -> Result<Arc<Plugin>, LoadError> {
        self.load_with_digest(wasm, format!("sha256:{}", hex::encode(Sha256::digest(wasm))))
    }

    /// [`Runtime::load`] for bytes whose `sha256:<hex>` digest the caller has just verified (the
    /// marketplace's store does), so they are not hashed twice. The digest keys the compile cache:
    /// passing a wrong one would load another plugin's cached code, so only pass a checked one.
    pub fn load_with_digest(&self, wasm: &[u8], digest: String) -> Result<Arc<Plugin>, LoadError> {
        if let Some(plugin) = self.loaded(&digest) {
            return Ok(plugin);
        }
        let plugin = self.load_uncached(wasm, digest)?;
        self.shared.loads.fetch_add(1, Ordering::Relaxed);
        let mut loaded = self.shared.loaded.lock().unwrap_or_else(|p| p.into_inner());
        let held: usize = loaded.values().map(|l| l.size).sum();
        if loaded.len() >= MAX_LOADED || held + plugin.size > MAX_LOADED_BYTES {
            loaded.clear();
        }
        let entry = Loaded {
            manifest: plugin.manifest.clone(),
            size: plugin.size,
            pre: plugin.pre.clone(),
            input: plugin.input.clone(),
        };
        loaded.insert(plugin.digest.clone(), Arc::new(entry));
        Ok(plugin)
    }

    fn load_uncached(&self, wasm: &[u8], digest: String) -> Result<Arc<Plugin>, LoadError> {
        let manifest = qlayer_manifest::extract(wasm)?;
        let is_component = qlayer_manifest::is_component(wasm);
        if manifest.format == Format::Extism {
            if is_component {
                return Err(LoadError::WrongWorld {
                    plugin: manifest.name.clone(),
                    kind: manifest.kind,
                    world: manifest.kind.world(),
                    problem: "its manifest says `format = \"extism\"` but it is a component".into(),
                });
            }
            extism_tool::check_module(wasm).map_err(|problem| LoadError::WrongWorld {
                plugin: manifest.name.clone(),
                kind: manifest.kind,
                world: "extism tool",
                problem,
            })?;
            let pre = Arc::new(Pre::Extism(Arc::from(wasm)));
            let input = input_checker(&manifest);
            return Ok(Arc::new(Plugin {
                manifest,
                digest,
                size: wasm.len(),
                pre,
                input,
                shared: self.shared.clone(),
            }));
        }
        if !is_component {
            return Err(LoadError::NotComponent(manifest.name));
        }
        let compile_error =
            |e: anyhow::Error| LoadError::Compile { plugin: manifest.name.clone(), message: format!("{e:#}") };
        let component = match &self.shared.cache {
            Some(cache) => cache.load_or_compile(&self.shared.engine, &digest, wasm).map_err(compile_error)?,
            None => Component::new(&self.shared.engine, wasm).map_err(|e| compile_error(e.into()))?,
        };
        let contract = check_world(&self.shared.engine, &component, &manifest)?;
        let linker = &self.shared.linkers[kind_index(manifest.kind)];
        let pre = if matches!(manifest.kind, Kind::Agent | Kind::Validator)
            && imports_http(&self.shared.engine, &component)
        {
            // A toolchain's runtime may import wasi:http (componentize-js does) even where its
            // world has no network: it links, and every call traps, naming the function.
            let mut linker = linker.clone();
            stub_http(&mut linker, &self.shared.engine, &component).and_then(|()| linker.instantiate_pre(&component))
        } else {
            linker.instantiate_pre(&component)
        };
        let pre = pre.map_err(|e| LoadError::WrongWorld {
            plugin: manifest.name.clone(),
            kind: manifest.kind,
            world: manifest.kind.world(),
            problem: format!("cannot be linked: {e:#}"),
        })?;
        let wrong = |e: wasmtime::Error| LoadError::WrongWorld {
            plugin: manifest.name.clone(),
            kind: manifest.kind,
            world: manifest.kind.world(),
            problem: format!("its exports do not match: {e:#}"),
        };
        let closed = || {
            let mut linker = self.shared.closed_linker.clone();
            stub_http(&mut linker, &self.shared.engine, &component)?;
            linker.instantiate_pre(&component)
        };
        // The world's typed pre-linked component, of the contract version it exports (a world
        // 0.3.0 did not change has no 0.3.0 binding: `check_world` refuses such an export).
        macro_rules! bind {
            ($world:ident :: $pre_ty:ident, $pre:expr) => {
                match contract {
                    Contract::V0_1 => Bound::V0_1(v0_1::$world::$pre_ty::new($pre).map_err(wrong)?),
                    Contract::V0_2 => Bound::V0_2(v0_2::$world::$pre_ty::new($pre).map_err(wrong)?),
                    Contract::V0_3 => {
                        return Err(LoadError::WrongWorld {
                            plugin: manifest.name.clone(),
                            kind: manifest.kind,
                            world: manifest.kind.world(),
                            problem: format!("{} has no 0.3.0 `{}` interface", Contract::V0_3, manifest.kind.export()),
                        });
                    }
                }
            };
            ($world:ident :: $pre_ty:ident, $pre:expr, v0_3) => {
                match contract {
                    Contract::V0_1 => Bound::V0_1(v0_1::$world::$pre_ty::new($pre).map_err(wrong)?),
                    Contract::V0_2 => Bound::V0_2(v0_2::$world::$pre_ty::new($pre).map_err(wrong)?),
                    Contract::V0_3 => Bound::V0_3(v0_3::$world::$pre_ty::new($pre).map_err(wrong)?),
                }
            };
        }
        let pre = match manifest.kind {
            Kind::Provider => Pre::Provider {
                open: bind!(provider::ProviderPluginPre, pre),
                closed: bind!(provider::ProviderPluginPre, closed().map_err(wrong)?),
            },
            Kind::Agent => Pre::Agent(bind!(agent::AgentPluginPre, pre, v0_3)),
            Kind::Validator => Pre::Validator(bind!(validator::ValidatorPluginPre, pre, v0_3)),
            Kind::Tool => Pre::Tool {
                open: bind!(tool::ToolPluginPre, pre),
                closed: bind!(tool::ToolPluginPre, closed().map_err(wrong)?),
            },
        };
        let input = input_checker(&manifest);
        Ok(Arc::new(Plugin {
            manifest,
            digest,
            size: wasm.len(),
            pre: Arc::new(pre),
            input,
            shared: self.shared.clone(),
        }))
    }

    /// Reads and loads a component file.
    pub fn load_file(&self, path: &std::path::Path) -> anyhow::Result<Arc<Plugin>> {
        let wasm = std::fs::read(path).with_context(|| format!("reading plugin {}", path.display()))?;
        self.load(&wasm).with_context(|| format!("loading plugin {}", path.display()))
    }
}

/// A tool's compiled input schema (see [`qlayer_manifest::ToolSpec`]).
fn input_checker(manifest: &Manifest) -> Option<Arc<InputChecker>> {
    manifest.tool.as_ref().and_then(|t| t.input_checker()).map(Arc::new)
}

fn kind_index(kind: Kind) -> usize {
    match kind {
        Kind::Provider => 0,
        Kind::Agent => 1,
        Kind::Validator => 2,
        Kind::Tool => 3,
    }
}

/// What every kind links: WASI (granting nothing) and the `host` and `types` interfaces.
fn base_linker(engine: &Engine) -> anyhow::Result<Linker<StoreState>> {
    use wasmtime::component::HasSelf;
    let mut linker = Linker::new(engine);
    // Every WASI interface is linked so that components built by ordinary toolchains load, but
    // the context behind them grants nothing: no preopened directories, no environment, no
    // sockets.
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    // Every contract version: their interfaces have different names, so one linker serves all.
    // (0.3.0 uses 0.2.0's `host`, and adds its own `types`.)
    v0_3::types::add_to_linker::<_, HasSelf<StoreState>>(&mut linker, |s| s)?;
    v0_2::host::add_to_linker::<_, HasSelf<StoreState>>(&mut linker, |s| s)?;
    v0_2::types::add_to_linker::<_, HasSelf<StoreState>>(&mut linker, |s| s)?;
    v0_1::host::add_to_linker::<_, HasSelf<StoreState>>(&mut linker, |s| s)?;
    v0_1::types::add_to_linker::<_, HasSelf<StoreState>>(&mut linker, |s| s)?;
    Ok(linker)
}

fn linker_for(engine: &Engine, kind: Kind) -> anyhow::Result<Linker<StoreState>> {
    use wasmtime::component::HasSelf;
    // Only providers and tools get wasi:http, and only when their install grants a host (see
    // `Pre`); their requests pass the outbound policy.
    let mut linker = base_linker(engine)?;
    match kind {
        Kind::Provider | Kind::Tool => wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?,
        Kind::Agent => {
            v0_2::llm::add_to_linker::<_, HasSelf<StoreState>>(&mut linker, |s| s)?;
            v0_2::agent::quantumlayer::plugin::tools::add_to_linker::<_, HasSelf<StoreState>>(&mut linker, |s| s)?;
            v0_1::llm::add_to_linker::<_, HasSelf<StoreState>>(&mut linker, |s| s)?;
        }
        Kind::Validator => {}
    }
    Ok(linker)
}

/// Defines every `wasi:http` import of `component` as functions that trap, naming themselves (see
/// [`unknown_http_import`]), and its resources as types nothing can create.
fn stub_http(linker: &mut Linker<StoreState>, engine: &Engine, component: &Component) -> wasmtime::Result<()> {
    use wasmtime::component::ResourceType;
    use wasmtime::component::types::ComponentItem;
    use wasmtime_wasi::p2;
    struct NoHttp;
    for (name, item) in component.component_type().imports(engine) {
        let ComponentItem::ComponentInstance(instance) = item.ty else { continue };
        if !name.starts_with("wasi:http/") {
            continue;
        }
        let mut stubs = linker.instance(name)?;
        for (export, item) in instance.exports(engine) {
            match item.ty {
                ComponentItem::ComponentFunc(_) => {
                    let full = format!("{name}#{export}");
                    stubs.func_new(export, move |_, _, _, _| {
                        Err(wasmtime::Error::msg(format!("unknown import: `{full}` has not been defined")))
                    })?;
                }
                ComponentItem::Resource(_) => {
                    // wasi:http/types re-exports wasi:io's resources under their own names; those
                    // must be the very types the WASI linker gave wasi:io.
                    let ty = match export {
                        "input-stream" => ResourceType::host::<p2::DynInputStream>(),
                        "output-stream" => ResourceType::host::<p2::DynOutputStream>(),
                        "io-error" => ResourceType::host::<p2::IoError>(),
                        "pollable" => ResourceType::host::<p2::DynPollable>(),
                        _ => ResourceType::host::<NoHttp>(),
                    };
                    stubs.resource(export, ty, |_, _| Ok(()))?
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// The WASI 0.2 packages the host links, every interface of each. A component may import them
/// at 0.2.0 or any later 0.2.x: the linker matches semver-compatible versions, and an interface a
/// later patch added that the host does not have is named when linking fails. What is behind
/// them grants nothing: no preopened directories, an empty environment, no arguments, sockets
/// and name lookups refused when called. `wasi:http` is linked for real only for providers and
/// tools whose install grants a host; for the others every wasi:http function traps, naming
/// itself.
pub const WASI_PACKAGES: [&str; 7] =
    ["wasi:cli", "wasi:clocks", "wasi:filesystem", "wasi:http", "wasi:io", "wasi:random", "wasi:sockets"];

/// Whether a plugin of `kind` may import `name`; the error says why not. Standard-toolchain
/// components (componentize-py, jco, TinyGo, wasi-libc) import WASI interfaces whether or not
/// they use them, so every WASI 0.2 import is allowed and denied at call time instead.
pub fn check_import(kind: Kind, name: &str) -> Result<(), String> {
    let (base, version) = match name.split_once('@') {
        Some((base, version)) => (base, Some(version)),
        None => (name, None),
    };
    if matches!(base, "quantumlayer:plugin/host" | "quantumlayer:plugin/types")
        || (kind == Kind::Agent && matches!(base, "quantumlayer:plugin/llm" | "quantumlayer:plugin/tools"))
    {
        return Ok(());
    }
    if base.starts_with("quantumlayer:plugin/") {
        return Err(format!("imports `{name}`, which a {kind} plugin may not use"));
    }
    let package = base.split('/').next().unwrap_or(base);
    if !WASI_PACKAGES.contains(&package) {
        return Err(format!(
            "imports `{name}`, which the host does not provide (it links {} at 0.2.x, and the quantumlayer:plugin interfaces of the {kind} world)",
            WASI_PACKAGES.join(", ")
        ));
    }
    let Some(version) = version else {
        return Err(format!("imports `{name}` without a version; the host links {package} 0.2.x"));
    };
    if !wasi_0_2(version) {
        return Err(format!(
            "imports `{name}`, WASI version {version}, which this host does not link (it links {package} 0.2.0 and later 0.2.x)"
        ));
    }
    Ok(())
}

/// `0.2.N` without a pre-release tag (the WASI 0.2 release candidates differ in shape).
fn wasi_0_2(version: &str) -> bool {
    version.strip_prefix("0.2.").is_some_and(|patch| !patch.is_empty() && patch.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `component` imports any wasi:http interface.
fn imports_http(engine: &Engine, component: &Component) -> bool {
    component.component_type().imports(engine).any(|(name, _)| name.starts_with("wasi:http/"))
}

/// Functions each kind's export must contain.
fn required_functions(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Provider => &["models", "complete", "stream", "embed", "[method]completion-stream.next"],
        Kind::Agent => &["role", "run"],
        Kind::Validator => &["validate"],
        Kind::Tool => &["invoke"],
    }
}

fn check_world(engine: &Engine, component: &Component, manifest: &Manifest) -> Result<Contract, LoadError> {
    use wasmtime::component::types::ComponentItem;
    let kind = manifest.kind;
    let wrong =
        |problem: String| LoadError::WrongWorld { plugin: manifest.name.clone(), kind, world: kind.world(), problem };
    let ty = component.component_type();
    let want = format!("quantumlayer:plugin/{}", kind.export());
    let exports: Vec<(String, ComponentItem)> = ty.exports(engine).map(|(n, i)| (n.to_string(), i.ty)).collect();
    let bound = Contract::of_kind(kind);
    let versions = || bound.iter().map(|c| c.version()).collect::<Vec<_>>().join(", ");
    let Some((name, item)) = exports.iter().find(|(n, _)| n.split('@').next() == Some(&want)) else {
        let names: Vec<&str> = exports.iter().map(|(n, _)| n.as_str()).collect();
        return Err(wrong(format!(
            "does not export `{want}@{}` (or another version the host binds: {}); it exports: {}",
            bound.last().map_or("", |c| c.version()),
            versions(),
            if names.is_empty() { "nothing".to_string() } else { names.join(", ") }
        )));
    };
    let version = name.split('@').nth(1).unwrap_or("");
    let Some(contract) = bound.iter().copied().find(|c| c.version() == version) else {
        return Err(wrong(format!(
            "exports `{name}`, a contract version this host does not bind (it binds {})",
            versions()
        )));
    };
    let ComponentItem::ComponentInstance(instance) = item else {
        return Err(wrong(format!("exports `{want}` as something other than an interface")));
    };
    let members: Vec<String> = instance.exports(engine).map(|(n, _)| n.to_string()).collect();
    let missing: Vec<&str> =
        required_functions(kind).iter().copied().filter(|f| !members.iter().any(|m| m == f)).collect();
    if !missing.is_empty() {
        return Err(wrong(format!("its `{want}` export lacks {}", missing.join(", "))));
    }
    for (name, _) in ty.imports(engine) {
        check_import(kind, name).map_err(wrong)?;
    }
    Ok(contract)
}

/// A version of the plugin contract (the WIT package `quantumlayer:plugin`) the host binds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Contract {
    /// `quantumlayer:plugin@0.1.0`: text messages, no tools.
    V0_1,
    /// `quantumlayer:plugin@0.2.0`: tools, content parts, response formats, typed finish reasons.
    V0_2,
    /// `quantumlayer:plugin@0.3.0`: a column in diagnostics (validators, and agents' feedback).
    V0_3,
}

impl Contract {
    /// Every version bound, oldest first.
    pub const ALL: [Contract; 3] = [Contract::V0_1, Contract::V0_2, Contract::V0_3];
    /// The version the SDK and first-party plugins build against.
    pub const LATEST: Contract = Contract::V0_3;

    /// `0.1.0`, `0.2.0`, `0.3.0`.
    pub fn version(self) -> &'static str {
        match self {
            Contract::V0_1 => "0.1.0",
            Contract::V0_2 => "0.2.0",
            Contract::V0_3 => "0.3.0",
        }
    }

    /// The versions of `kind`'s export interface, oldest first. 0.3.0 changed only validators'
    /// and agents' (diagnostics gained a column): its providers and tools export 0.2.0's.
    pub fn of_kind(kind: Kind) -> &'static [Contract] {
        match kind {
            Kind::Agent | Kind::Validator => &Contract::ALL,
            Kind::Provider | Kind::Tool => &[Contract::V0_1, Contract::V0_2],
        }
    }
}

impl fmt::Display for Contract {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "quantumlayer:plugin@{}", self.version())
    }
}

/// One of the things that exist per contract version: pre-linked components, bindings. A world
/// that 0.3.0 did not change (provider, tool) has no 0.3.0 thing: its `C` is uninhabited.
#[derive(Clone)]
pub enum Bound<A, B, C = std::convert::Infallible> {
    /// For a `quantumlayer:plugin@0.1.0` component.
    V0_1(A),
    /// For a `quantumlayer:plugin@0.2.0` component.
    V0_2(B),
    /// For a `quantumlayer:plugin@0.3.0` component.
    V0_3(C),
}

impl<A, B, C> Bound<A, B, C> {
    fn contract(&self) -> Contract {
        match self {
            Bound::V0_1(_) => Contract::V0_1,
            Bound::V0_2(_) => Contract::V0_2,
            Bound::V0_3(_) => Contract::V0_3,
        }
    }
}

type ProviderPre = Bound<v0_1::provider::ProviderPluginPre<StoreState>, v0_2::provider::ProviderPluginPre<StoreState>>;
type AgentPre = Bound<
    v0_1::agent::AgentPluginPre<StoreState>,
    v0_2::agent::AgentPluginPre<StoreState>,
    v0_3::agent::AgentPluginPre<StoreState>,
>;
type ValidatorPre = Bound<
    v0_1::validator::ValidatorPluginPre<StoreState>,
    v0_2::validator::ValidatorPluginPre<StoreState>,
    v0_3::validator::ValidatorPluginPre<StoreState>,
>;
type ToolPre = Bound<v0_1::tool::ToolPluginPre<StoreState>, v0_2::tool::ToolPluginPre<StoreState>>;

/// Instantiates a [`Bound`] pre-linked component in `store`, keeping its version (`v0_3` for the
/// worlds that have a 0.3.0 one).
macro_rules! instantiate {
    ($pre:expr, $store:expr) => {
        async {
            Ok::<_, wasmtime::Error>(match $pre {
                Bound::V0_1(p) => Bound::V0_1(Arc::new(p.instantiate_async($store).await?)),
                Bound::V0_2(p) => Bound::V0_2(Arc::new(p.instantiate_async($store).await?)),
                Bound::V0_3(never) => match *never {},
            })
        }
    };
    ($pre:expr, $store:expr, v0_3) => {
        async {
            Ok::<_, wasmtime::Error>(match $pre {
                Bound::V0_1(p) => Bound::V0_1(Arc::new(p.instantiate_async($store).await?)),
                Bound::V0_2(p) => Bound::V0_2(Arc::new(p.instantiate_async($store).await?)),
                Bound::V0_3(p) => Bound::V0_3(Arc::new(p.instantiate_async($store).await?)),
            })
        }
    };
}

/// A pre-linked component. Providers and tools have two: `open` with wasi:http, for installs
/// granted an outbound host, and `closed`, where every wasi:http function traps, for installs
/// granted none, so that such a plugin cannot make the host hold anything for it (header maps,
/// requests, bodies) however it misbehaves.
enum Pre {
    Provider {
        open: ProviderPre,
        closed: ProviderPre,
    },
    Agent(AgentPre),
    Validator(ValidatorPre),
    Tool {
        open: ToolPre,
        closed: ToolPre,
    },
    /// An Extism module: compiled per install, since its grants and config are bound at compile.
    Extism(Arc<[u8]>),
}

/// A loaded plugin: its manifest, digest and pre-linked component. Install it to use it.
pub struct Plugin {
    manifest: Manifest,
    digest: String,
    size: usize,
    pre: Arc<Pre>,
    /// A tool's input schema, compiled.
    input: Option<Arc<InputChecker>>,
    shared: Arc<Shared>,
}

/// What a loaded plugin keeps across calls (all but the runtime it belongs to, so the runtime
/// can keep it without holding itself).
struct Loaded {
    manifest: Manifest,
    size: usize,
    pre: Arc<Pre>,
    input: Option<Arc<InputChecker>>,
}

/// Loaded plugins kept at most (all are dropped when more are loaded: a plugin loads again in
/// about a millisecond from the compile cache).
const MAX_LOADED: usize = 256;
/// Their binaries' sizes together, at most (an Extism plugin keeps its bytes to compile from,
/// and tenants choose what they install).
const MAX_LOADED_BYTES: usize = 512 << 20;

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin").field("name", &self.manifest.name).field("digest", &self.digest).finish()
    }
}

impl Plugin {
    /// The manifest read from the component.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    /// `sha256:<hex>` of the component bytes.
    pub fn digest(&self) -> &str {
        &self.digest
    }
    /// Size of the component in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The contract version the component was built against; `None` for an Extism module.
    pub fn contract(&self) -> Option<Contract> {
        match &*self.pre {
            Pre::Provider { open, .. } => Some(open.contract()),
            Pre::Agent(pre) => Some(pre.contract()),
            Pre::Validator(pre) => Some(pre.contract()),
            Pre::Tool { open, .. } => Some(open.contract()),
            Pre::Extism(_) => None,
        }
    }

    /// Records what this install may use, after checking every grant was asked for. The limits
    /// are the manifest's, clamped by the host policy.
    pub fn install(self: &Arc<Self>, grants: Grants) -> Result<Installed, GrantError> {
        grants.check(&self.manifest)?;
        for grant in &grants.outbound_hosts {
            self.shared.outbound.policy().check_grant(grant).map_err(|refused| GrantError::NetworkPolicy {
                plugin: self.manifest.name.clone(),
                host: grant.to_string(),
                reason: refused.to_string(),
            })?;
        }
        let policy = &self.shared.policy;
        let memory_mb = self.manifest.limits.memory_mb.unwrap_or(policy.default_memory_mb).min(policy.max_memory_mb);
        let timeout = self
            .manifest
            .limits
            .timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(policy.default_timeout)
            .min(policy.max_timeout);
        let output_bytes = self.manifest.limits.output_kb.unwrap_or(policy.default_output_kb).min(policy.max_output_kb)
            as usize
            * 1024;
        let grants = Arc::new(grants);
        let memory_bytes = memory_mb as usize * 1024 * 1024;
        if let Pre::Extism(wasm) = &*self.pre {
            // Compiled (or found compiled) here, so a module the host cannot prepare is refused
            // at install; its instances lease compilations from the cache (see any_tool).
            self.compiled_extism(wasm, &grants, memory_bytes, timeout, false)?;
        }
        Ok(Installed { plugin: self.clone(), grants, memory_bytes, output_bytes, timeout, extism_timeout: timeout })
    }
}

impl Plugin {
    /// The Extism module compiled for these grants and limits: from the runtime's cache when an
    /// install with the same ones compiled it before (every call of a job loads its plugin
    /// again), else compiled now, off the async workers, so a large module does not stall the
    /// other requests on this thread.
    ///
    /// `lease`: for an instance, which holds the compilation until its last call has stopped. A
    /// leased compilation is one no live instance holds (only the cache does): Extism stops a
    /// call (its deadline, or a cancel) by bumping the epoch of the compilation's engine, which
    /// stops every call running on that engine at that moment, so two live instances, of one
    /// tenant or of two, never share one. One after another they may.
    fn compiled_extism(
        &self,
        wasm: &Arc<[u8]>,
        grants: &Arc<Grants>,
        memory_bytes: usize,
        timeout: Duration,
        lease: bool,
    ) -> Result<Arc<extism_tool::Compiled>, GrantError> {
        let mut key = format!("{}|{memory_bytes}|{}", self.digest, timeout.as_millis());
        for host in &grants.outbound_hosts {
            key.push_str(&format!("|h:{host}"));
        }
        for (k, v) in &grants.config {
            key.push_str(&format!("|c:{k}={}", hex::encode(Sha256::digest(v.as_bytes()))));
        }
        for (k, v) in &grants.secrets {
            key.push_str(&format!("|s:{k}={}", hex::encode(Sha256::digest(v.expose().as_bytes()))));
        }
        let cache = &self.shared.extism_compiled;
        let free = |c: &Arc<extism_tool::Compiled>| !lease || Arc::strong_count(c) == 1;
        if let Some(compiled) =
            cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key).and_then(|all| all.iter().find(|c| free(c)))
        {
            return Ok(compiled.clone());
        }
        let compile = || {
            extism_tool::compile(
                &self.manifest.name,
                wasm,
                grants.clone(),
                memory_bytes,
                timeout,
                self.shared.outbound.clone(),
                self.shared.cache.as_ref().and_then(cache::CompiledCache::extism),
            )
        };
        let compiled = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(compile)
            }
            _ => compile(),
        }
        .map_err(|e| GrantError::Prepare { plugin: self.manifest.name.clone(), message: format!("{e:#}") })?;
        let compiled = Arc::new(compiled);
        let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_COMPILED_EXTISM {
            cache.clear();
        }
        let kept = cache.entry(key).or_default();
        // Beyond this many at once, further instances compile without being kept.
        if kept.len() < MAX_COMPILED_PER_KEY {
            kept.push(compiled.clone());
        }
        Ok(compiled)
    }
}

/// Compilations kept for one plugin version, grants and limits: as many as its live instances
/// at once, up to this.
const MAX_COMPILED_PER_KEY: usize = 8;

/// Compiled Extism modules the runtime keeps (one per plugin version, grants and limits).
const MAX_COMPILED_EXTISM: usize = 128;

/// A plugin with the grants and limits of one install. Instantiate it per tenant.
#[derive(Clone)]
pub struct Installed {
    plugin: Arc<Plugin>,
    grants: Arc<Grants>,
    memory_bytes: usize,
    output_bytes: usize,
    timeout: Duration,
    /// The deadline an Extism compilation carries: the install's, whatever `with_timeout` sets
    /// for a call (which stops it sooner).
    extism_timeout: Duration,
}

impl fmt::Debug for Installed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Installed")
            .field("plugin", &self.plugin.manifest.name)
            .field("memory_bytes", &self.memory_bytes)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Installed {
    /// The plugin.
    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.plugin
    }
    /// The memory limit in force, in bytes.
    pub fn memory_limit(&self) -> usize {
        self.memory_bytes
    }
    /// The per-call deadline in force.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    /// The largest output one call may return, in bytes.
    pub fn output_limit(&self) -> usize {
        self.output_bytes
    }

    /// Overrides the per-call deadline (still clamped by the host policy).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.min(self.plugin.shared.policy.max_timeout);
        self
    }

    fn store(&self, tenant: &str, llm: Option<Arc<dyn LlmHandler>>) -> Store<StoreState> {
        let state = StoreState::new(
            Arc::from(tenant),
            Arc::from(self.plugin.manifest.name.as_str()),
            self.grants.clone(),
            self.memory_bytes,
            llm,
            self.plugin.shared.tenant_logs.clone(),
            self.plugin.shared.outbound.clone(),
        );
        let mut store = Store::new(&self.plugin.shared.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|ctx| {
            if Instant::now() >= ctx.data().deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        store
    }

    async fn slot(&self) -> OwnedSemaphorePermit {
        // An idle warm instance gives its slot up to a caller that finds none free.
        loop {
            match self.plugin.shared.slots.clone().try_acquire_owned() {
                Ok(permit) => return permit,
                Err(_) if self.plugin.shared.warm.evict_oldest() => continue,
                Err(_) => break,
            }
        }
        // The semaphore is never closed, so acquiring only waits.
        loop {
            if let Ok(permit) = self.plugin.shared.slots.clone().acquire_owned().await {
                return permit;
            }
        }
    }

    /// Takes a pool slot and prepares a store for `tenant`, with this install's limits.
    async fn begin(
        &self,
        tenant: &str,
        llm: Option<Arc<dyn LlmHandler>>,
    ) -> ((OwnedSemaphorePermit, Store<StoreState>), tokio::time::Instant) {
        let permit = self.slot().await;
        let mut store = self.store(tenant, llm);
        let deadline = Instant::now() + self.timeout;
        store.data_mut().deadline = deadline;
        ((permit, store), host_wait_deadline(deadline))
    }

    /// Finishes an instantiation started by [`Installed::begin`].
    fn finish<B>(
        &self,
        (slot, store): (OwnedSemaphorePermit, Store<StoreState>),
        outcome: Option<wasmtime::Result<B>>,
    ) -> Result<Instance<B>, CallError> {
        match outcome {
            Some(Ok(bindings)) => Ok(Instance {
                store,
                bindings,
                input: self.plugin.input.clone(),
                timeout: self.timeout,
                output_limit: self.output_bytes,
                poisoned: false,
                in_call: false,
                _slot: slot,
            }),
            Some(Err(e)) => Err(classify(&store, e, self.timeout)),
            None => Err(error_of(&store, CallErrorKind::Timeout(self.timeout))),
        }
    }

    /// A live provider instance for `tenant`.
    pub async fn provider(&self, tenant: &str) -> Result<ProviderInstance, CallError> {
        let Pre::Provider { open, closed } = &*self.plugin.pre else {
            return Err(self.wrong_kind(tenant, Kind::Provider));
        };
        let pre = if self.grants.outbound_hosts.is_empty() { closed } else { open };
        let (mut begun, deadline) = self.begin(tenant, None).await;
        let outcome = bounded(deadline, instantiate!(pre, &mut begun.1)).await;
        self.finish(begun, outcome)
    }

    /// A provider instance for `tenant`, warm when one is idle (made for the same tenant, plugin,
    /// limits and equal grants) and fresh otherwise; it goes back to the pool when dropped if it
    /// is fit for another call (see [`WarmProvider`]).
    pub async fn warm_provider(&self, tenant: &str) -> Result<WarmProvider, CallError> {
        let pool = &self.plugin.shared.warm;
        if !pool.enabled() || !matches!(&*self.plugin.pre, Pre::Provider { .. }) {
            return self.provider(tenant).await.map(WarmProvider::cold);
        }
        let key = warm::Key::new(tenant, &self.plugin.digest, self.memory_bytes, self.output_bytes);
        let (instance, uses) = match pool.take(&key, &self.grants) {
            Some((mut instance, uses)) => {
                instance.timeout = self.timeout;
                instance.take_outbound_wait();
                (instance, uses + 1)
            }
            None => (self.provider(tenant).await?, 1),
        };
        let home = warm::Home { pool: pool.clone(), key, grants: self.grants.clone(), uses };
        Ok(WarmProvider::new(instance, Some(home)))
    }

    /// A live agent instance for `tenant`, whose `llm` calls go to `llm`; it is granted no tools.
    pub async fn agent(&self, tenant: &str, llm: Arc<dyn LlmHandler>) -> Result<AgentInstance, CallError> {
        self.agent_with_tools(tenant, llm, None).await
    }

    /// A live agent instance for `tenant`, whose `llm` calls go to `llm` and whose `tools` calls go
    /// to `tools` (none granted when `None`).
    pub async fn agent_with_tools(
        &self,
        tenant: &str,
        llm: Arc<dyn LlmHandler>,
        tools: Option<Arc<dyn ToolHandler>>,
    ) -> Result<AgentInstance, CallError> {
        let Pre::Agent(pre) = &*self.plugin.pre else { return Err(self.wrong_kind(tenant, Kind::Agent)) };
        let (mut begun, deadline) = self.begin(tenant, Some(llm)).await;
        begun.1.data_mut().tools = tools;
        let outcome = bounded(deadline, instantiate!(pre, &mut begun.1, v0_3)).await;
        self.finish(begun, outcome)
    }

    /// A live validator instance for `tenant`.
    pub async fn validator(&self, tenant: &str) -> Result<ValidatorInstance, CallError> {
        let Pre::Validator(pre) = &*self.plugin.pre else { return Err(self.wrong_kind(tenant, Kind::Validator)) };
        let (mut begun, deadline) = self.begin(tenant, None).await;
        let outcome = bounded(deadline, instantiate!(pre, &mut begun.1, v0_3)).await;
        self.finish(begun, outcome)
    }

    /// A live tool instance for `tenant`.
    pub async fn tool(&self, tenant: &str) -> Result<ToolInstance, CallError> {
        let Pre::Tool { open, closed } = &*self.plugin.pre else {
            if let Pre::Extism(_) = &*self.plugin.pre {
                return Err(CallError {
                    plugin: Arc::from(self.plugin.manifest.name.as_str()),
                    tenant: Arc::from(tenant),
                    kind: CallErrorKind::Plugin(PluginError::InvalidInput(
                        "this tool is an Extism module; open it with `any_tool`".into(),
                    )),
                });
            }
            return Err(self.wrong_kind(tenant, Kind::Tool));
        };
        let pre = if self.grants.outbound_hosts.is_empty() { closed } else { open };
        let (mut begun, deadline) = self.begin(tenant, None).await;
        let outcome = bounded(deadline, instantiate!(pre, &mut begun.1)).await;
        self.finish(begun, outcome)
    }

    /// A live tool instance for `tenant`, whatever its format (component or Extism).
    pub async fn any_tool(&self, tenant: &str) -> Result<AnyTool, CallError> {
        let Pre::Extism(wasm) = &*self.plugin.pre else { return self.tool(tenant).await.map(AnyTool::Component) };
        // A compilation no other live instance runs on: see compiled_extism.
        let compiled = self
            .plugin
            .compiled_extism(wasm, &self.grants, self.memory_bytes, self.extism_timeout, true)
            .map_err(|e| CallError {
                plugin: Arc::from(self.plugin.manifest.name.as_str()),
                tenant: Arc::from(tenant),
                kind: CallErrorKind::Trap(format!("instantiation failed: {e}")),
            })?;
        let slot = self.slot().await;
        let (name, tenant): (Arc<str>, Arc<str>) = (Arc::from(self.plugin.manifest.name.as_str()), Arc::from(tenant));
        let for_instance = compiled.clone();
        let plugin = tokio::task::spawn_blocking(move || extism_tool::instantiate(&for_instance))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
            .and_then(|r| r)
            .map_err(|e| CallError {
                plugin: name.clone(),
                tenant: tenant.clone(),
                kind: CallErrorKind::Trap(format!("instantiation failed: {e:#}")),
            })?;
        let log = Arc::new(logs::LogMeter::new(tenant.clone(), name.clone(), self.plugin.shared.tenant_logs.clone()));
        let id = plugin.id.as_u128();
        let logs = compiled.logs.clone();
        logs.lock().unwrap_or_else(|p| p.into_inner()).insert(id, log.clone());
        Ok(AnyTool::Extism(Box::new(ExtismInstance {
            plugin: Some(plugin),
            name,
            tenant,
            timeout: self.timeout,
            memory_bytes: self.memory_bytes,
            output_limit: self.output_bytes,
            log,
            logs,
            id,
            poisoned: false,
            slot: Some(slot),
            lease: Some(compiled),
            input: self.plugin.input.clone(),
        })))
    }

    fn wrong_kind(&self, tenant: &str, wanted: Kind) -> CallError {
        CallError {
            plugin: Arc::from(self.plugin.manifest.name.as_str()),
            tenant: Arc::from(tenant),
            kind: CallErrorKind::Plugin(PluginError::InvalidInput(format!(
                "plugin is a {} plugin, not a {wanted} plugin",
                self.plugin.manifest.kind
            ))),
        }
    }
}

/// When waiting on the host must give up: a few epoch ticks after the guest's own deadline, so
/// that a guest running at its deadline is stopped by the epoch (and reported as such) first.
fn host_wait_deadline(guest_deadline: Instant) -> tokio::time::Instant {
    tokio::time::Instant::from_std(guest_deadline + EPOCH_TICK * 4)
}

/// Runs `fut` until `deadline`. Guest code is already bounded by the epoch deadline, so the
/// timer is armed only if the first poll does not finish the call, i.e. when the guest waits on
/// the host (an HTTP response, an `llm` call, a sleep). Most calls never pay for a timer.
async fn bounded<F: Future>(deadline: tokio::time::Instant, fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    if let std::task::Poll::Ready(out) = futures::poll!(fut.as_mut()) {
        return Some(out);
    }
    tokio::time::timeout_at(deadline, fut).await.ok()
}

fn error_of(store: &Store<StoreState>, kind: CallErrorKind) -> CallError {
    CallError { plugin: store.data().plugin.clone(), tenant: store.data().tenant.clone(), kind }
}

/// Turns a wasmtime error from a call into the kind of failure it was.
fn classify(store: &Store<StoreState>, e: wasmtime::Error, timeout: Duration) -> CallError {
    let limiter = &store.data().limiter;
    let kind = if let Some(requested) = limiter.refused_growth {
        CallErrorKind::OutOfMemory { limit: limiter.memory_bytes, requested }
    } else if matches!(e.downcast_ref::<wasmtime::Trap>(), Some(wasmtime::Trap::Interrupt)) {
        CallErrorKind::Timeout(timeout)
    } else if e.chain().any(|c| matches!(c.downcast_ref(), Some(wasmtime::component::ResourceTableError::Full))) {
        CallErrorKind::Trap(format!(
            "it held more than {} host resources (header maps, requests, streams) at once, the limit of one instance",
            state::MAX_RESOURCES
        ))
    } else {
        let message = format!("{e:#}");
        if message.contains("total size of fields exceeds limit") {
            return error_of(
                store,
                CallErrorKind::Trap(format!(
                    "it built a header map larger than its limit of {} bytes (a share of its memory limit)",
                    state::field_bytes(limiter.memory_bytes)
                )),
            );
        }
        match unknown_http_import(&message) {
            Some(import) => CallErrorKind::Trap(format!(
                "it used wasi:http (`{import}`), but it has no HTTP: only providers and tools whose install grants an outbound host do"
            )),
            None => CallErrorKind::Trap(message),
        }
    };
    error_of(store, kind)
}

/// The wasi:http function named in a trap of the `closed` linker (see [`Pre`]), if it is one.
fn unknown_http_import(message: &str) -> Option<&str> {
    let rest = message.split("unknown import: `").nth(1)?;
    let import = rest.split('`').next()?;
    import.starts_with("wasi:http/").then_some(import)
}

/// A live plugin instance in its own store, for one tenant. A trap, timeout or out-of-memory
/// poisons it; later calls fail fast with [`CallErrorKind::Poisoned`], so take a new instance.
pub struct Instance<B> {
    store: Store<StoreState>,
    bindings: B,
    /// A tool's input schema, checked before each call enters the guest.
    input: Option<Arc<InputChecker>>,
    timeout: Duration,
    output_limit: usize,
    poisoned: bool,
    /// A guest call began and has not finished: its future was dropped midway.
    in_call: bool,
    _slot: OwnedSemaphorePermit,
}

/// A live provider.
pub type ProviderInstance = Instance<Bound<Arc<v0_1::provider::ProviderPlugin>, Arc<v0_2::provider::ProviderPlugin>>>;
/// A live agent.
pub type AgentInstance =
    Instance<Bound<Arc<v0_1::agent::AgentPlugin>, Arc<v0_2::agent::AgentPlugin>, Arc<v0_3::agent::AgentPlugin>>>;
/// A live validator.
pub type ValidatorInstance = Instance<
    Bound<
        Arc<v0_1::validator::ValidatorPlugin>,
        Arc<v0_2::validator::ValidatorPlugin>,
        Arc<v0_3::validator::ValidatorPlugin>,
    >,
>;
/// A live tool.
pub type ToolInstance = Instance<Bound<Arc<v0_1::tool::ToolPlugin>, Arc<v0_2::tool::ToolPlugin>>>;

/// A live tool of either format.
pub enum AnyTool {
    /// A `tool-plugin` component.
    Component(ToolInstance),
    /// An Extism module (boxed: an `extism::Plugin` is large).
    Extism(Box<ExtismInstance>),
}

impl AnyTool {
    /// Invokes the tool with `input_json`.
    pub async fn invoke(&mut self, input_json: &str) -> Result<String, CallError> {
        match self {
            AnyTool::Component(tool) => tool.invoke(input_json).await,
            AnyTool::Extism(tool) => tool.invoke(input_json).await,
        }
    }
}

impl<B: Send + Sync> Instance<B> {
    /// The tenant this instance belongs to.
    pub fn tenant(&self) -> &str {
        &self.store.data().tenant
    }

    fn tenant_name(&self) -> Arc<str> {
        self.store.data().tenant.clone()
    }

    fn plugin_name(&self) -> Arc<str> {
        self.store.data().plugin.clone()
    }

    /// Whether an earlier failure left this instance unusable.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Time this instance's outbound requests waited for their upstream's response head since
    /// the last take (overlapping requests count each), for a breakdown of a call's time.
    pub fn take_outbound_wait(&mut self) -> Duration {
        self.store.data().take_outbound_wait()
    }

    /// Whether another call may use this instance: not poisoned, and no call was abandoned midway.
    pub(crate) fn reusable(&self) -> bool {
        !self.poisoned && !self.in_call
    }

    /// Refuses an output of `size` bytes past this instance's output limit.
    fn within_output(&self, size: usize) -> Result<(), CallError> {
        if size > self.output_limit {
            return Err(error_of(&self.store, CallErrorKind::OutputTooLarge { limit: self.output_limit, size }));
        }
        Ok(())
    }

    /// Arms the deadline for one guest call; fails fast on a poisoned instance.
    fn begin(&mut self) -> Result<tokio::time::Instant, CallError> {
        if self.poisoned {
            return Err(error_of(&self.store, CallErrorKind::Poisoned));
        }
        let deadline = Instant::now() + self.timeout;
        self.store.data_mut().deadline = deadline;
        self.store.data_mut().limiter.refused_growth = None;
        self.in_call = true;
        // The epoch callback stops guest code at the deadline; the caller's timer bounds time
        // spent waiting inside host calls.
        Ok(host_wait_deadline(deadline))
    }

    /// Turns the outcome of one guest call into a typed result; a trap, timeout or
    /// out-of-memory poisons the instance.
    fn finish<T>(&mut self, outcome: Option<wasmtime::Result<Result<T, PluginError>>>) -> Result<T, CallError> {
        self.in_call = false;
        self.store.data().log.end_call();
        match outcome {
            Some(Ok(Ok(value))) => Ok(value),
            Some(Ok(Err(plugin_error))) => Err(error_of(&self.store, CallErrorKind::Plugin(plugin_error))),
            Some(Err(e)) => {
                self.poisoned = true;
                Err(classify(&self.store, e, self.timeout))
            }
            None => {
                self.poisoned = true;
                Err(error_of(&self.store, CallErrorKind::Timeout(self.timeout)))
            }
        }
    }
}

impl<A, B, C> Instance<Bound<A, B, C>> {
    /// The contract version of the component behind this instance.
    pub fn contract(&self) -> Contract {
        self.bindings.contract()
    }
}

/// Calls one export of an instance under its deadline:
/// `guest_call!(self, bindings.iface().call_x(&mut self.store, args..)[, conversion of the outcome])`.
macro_rules! guest_call {
    ($inst:ident, $call:expr) => {{
        let deadline = $inst.begin()?;
        let outcome = bounded(deadline, $call).await;
        $inst.finish(outcome)
    }};
    ($inst:ident, $call:expr, $up:expr) => {{
        let deadline = $inst.begin()?;
        let outcome = bounded(deadline, $call).await.map($up);
        $inst.finish(outcome)
    }};
}

/// A 0.1.0 call's outcome as the 0.2.0 types.
fn up<A: Conv<B>, B>(
    outcome: wasmtime::Result<Result<A, v0_1::types::PluginError>>,
) -> wasmtime::Result<Result<B, PluginError>> {
    outcome.map(|r| r.map(Conv::conv).map_err(Conv::conv))
}

/// The bytes of a completion's answer, for the output limit.
fn completion_size(c: &Completion) -> usize {
    c.text.len() + c.tool_calls.iter().map(|t| t.id.len() + t.name.len() + t.arguments.len()).sum::<usize>()
}

impl ProviderInstance {
    /// The models the provider serves.
    pub async fn models(&mut self) -> Result<Vec<ModelInfo>, CallError> {
        match self.bindings.clone() {
            Bound::V0_1(b) => guest_call!(self, b.quantumlayer_plugin_provider().call_models(&mut self.store), up),
            Bound::V0_2(b) => guest_call!(self, b.quantumlayer_plugin_provider().call_models(&mut self.store)),
        }
    }

    /// `request` for this instance's contract: for a 0.1.0 component, the request turned into
    /// 0.1.0's types, or an error naming what 0.1.0 cannot express.
    fn downgrade(&self, request: &CompletionRequest) -> Result<v0_1::types::CompletionRequest, CallError> {
        compat::downgrade(request).map_err(|feature| {
            error_of(
                &self.store,
                CallErrorKind::Plugin(PluginError::InvalidInput(format!(
                    "the request uses {}, which plugin `{}` cannot express: it is built against {}",
                    feature.describe(),
                    self.store.data().plugin,
                    Contract::V0_1
                ))),
            )
        })
    }

    /// One completion.
    pub async fn complete(&mut self, request: &CompletionRequest) -> Result<Completion, CallError> {
        let completion = match self.bindings.clone() {
            Bound::V0_1(b) => {
                let old = self.downgrade(request)?;
                guest_call!(self, b.quantumlayer_plugin_provider().call_complete(&mut self.store, &old), up)?
            }
            Bound::V0_2(b) => {
                guest_call!(self, b.quantumlayer_plugin_provider().call_complete(&mut self.store, request))?
            }
        };
        self.within_output(completion_size(&completion))?;
        Ok(completion)
    }

    /// Embeddings.
    pub async fn embed(&mut self, request: &EmbeddingRequest) -> Result<Embeddings, CallError> {
        match self.bindings.clone() {
            Bound::V0_1(b) => {
                let old = request.clone().conv();
                guest_call!(self, b.quantumlayer_plugin_provider().call_embed(&mut self.store, &old), up)
            }
            Bound::V0_2(b) => guest_call!(self, b.quantumlayer_plugin_provider().call_embed(&mut self.store, request)),
        }
    }

    /// Starts a stream and returns the guest's resource.
    async fn start_stream(&mut self, request: &CompletionRequest) -> Result<ResourceAny, CallError> {
        match self.bindings.clone() {
            Bound::V0_1(b) => {
                let old = self.downgrade(request)?;
                guest_call!(self, b.quantumlayer_plugin_provider().call_stream(&mut self.store, &old), up)
            }
            Bound::V0_2(b) => guest_call!(self, b.quantumlayer_plugin_provider().call_stream(&mut self.store, request)),
        }
    }

    /// Starts a streamed completion; read it with [`ChunkStream::next`].
    pub async fn stream(&mut self, request: &CompletionRequest) -> Result<ChunkStream<'_>, CallError> {
        let handle = self.start_stream(request).await?;
        Ok(ChunkStream { instance: self, handle: Some(handle) })
    }

    /// Starts a streamed completion that keeps this instance; read it with
    /// [`OwnedChunkStream::next`].
    pub async fn into_stream(self, request: &CompletionRequest) -> Result<OwnedChunkStream, CallError> {
        WarmProvider::cold(self).into_stream(request).await
    }

    /// Calls a trivial export (`models`) and discards the answer; for measuring call overhead.
    #[doc(hidden)]
    pub async fn ping(&mut self) -> Result<usize, CallError> {
        self.models().await.map(|m| m.len())
    }
}

/// A streamed completion being read from a provider instance.
pub struct ChunkStream<'a> {
    instance: &'a mut ProviderInstance,
    handle: Option<ResourceAny>,
}

impl ChunkStream<'_> {
    /// The next chunk, or `None` once the stream has ended cleanly.
    pub async fn next(&mut self) -> Result<Option<CompletionChunk>, CallError> {
        next_chunk(self.instance, &mut self.handle).await
    }
}

/// A streamed completion that owns its provider instance (to hand to a response body): dropping
/// it stops the guest and its upstream request.
pub struct OwnedChunkStream {
    instance: WarmProvider,
    handle: Option<ResourceAny>,
}

impl OwnedChunkStream {
    fn new(instance: WarmProvider, handle: ResourceAny) -> Self {
        OwnedChunkStream { instance, handle: Some(handle) }
    }

    /// See [`Instance::take_outbound_wait`].
    pub fn take_outbound_wait(&mut self) -> Duration {
        self.instance.take_outbound_wait()
    }

    /// The next chunk, or `None` once the stream has ended cleanly.
    pub async fn next(&mut self) -> Result<Option<CompletionChunk>, CallError> {
        next_chunk(self.instance.live()?, &mut self.handle).await
    }
}

impl Drop for OwnedChunkStream {
    fn drop(&mut self) {
        if self.handle.is_some() {
            // Left before its end: the guest still holds the stream and its upstream request.
            self.instance.discard();
        }
    }
}

async fn next_chunk(
    inst: &mut ProviderInstance,
    slot: &mut Option<ResourceAny>,
) -> Result<Option<CompletionChunk>, CallError> {
    let Some(handle) = *slot else { return Ok(None) };
    let chunk = match inst.bindings.clone() {
        Bound::V0_1(b) => {
            let guest = b.quantumlayer_plugin_provider().completion_stream();
            guest_call!(inst, guest.call_next(&mut inst.store, handle), up)
        }
        Bound::V0_2(b) => {
            let guest = b.quantumlayer_plugin_provider().completion_stream();
            guest_call!(inst, guest.call_next(&mut inst.store, handle))
        }
    };
    match chunk {
        Ok(Some(chunk)) => {
            let size = chunk.delta.len()
                + chunk
                    .tool_calls
                    .iter()
                    .map(|t| {
                        t.arguments.len()
                            + t.id.as_ref().map_or(0, String::len)
                            + t.name.as_ref().map_or(0, String::len)
                    })
                    .sum::<usize>();
            inst.within_output(size)?;
            Ok(Some(chunk))
        }
        other => {
            // Ended or failed: release the guest's resource (best effort; a poisoned store is
            // dropped with its instance anyway).
            *slot = None;
            if !inst.poisoned {
                inst.in_call = true;
                let _ = handle.resource_drop_async(&mut inst.store).await;
                inst.in_call = false;
            }
            other
        }
    }
}

impl AgentInstance {
    /// The role the agent plays.
    pub async fn role(&mut self) -> Result<String, CallError> {
        let deadline = self.begin()?;
        let outcome = match self.bindings.clone() {
            Bound::V0_1(b) => bounded(deadline, b.quantumlayer_plugin_agent().call_role(&mut self.store)).await,
            Bound::V0_2(b) => bounded(deadline, b.quantumlayer_plugin_agent().call_role(&mut self.store)).await,
            Bound::V0_3(b) => bounded(deadline, b.quantumlayer_plugin0_3_0_agent().call_role(&mut self.store)).await,
        };
        self.finish(outcome.map(|r| r.map(Ok)))
    }

    /// Runs the agent on a task.
    pub async fn run(&mut self, task: &Task) -> Result<AgentOutput, CallError> {
        let out: AgentOutput = match self.bindings.clone() {
            Bound::V0_1(b) => {
                let old = task.clone().conv();
                guest_call!(self, b.quantumlayer_plugin_agent().call_run(&mut self.store, &old), up)?
            }
            Bound::V0_2(b) => {
                let old = task.clone().conv();
                guest_call!(self, b.quantumlayer_plugin_agent().call_run(&mut self.store, &old))?
            }
            Bound::V0_3(b) => guest_call!(self, b.quantumlayer_plugin0_3_0_agent().call_run(&mut self.store, task))?,
        };
        let size = out.summary.len() + out.artifacts.iter().map(|a| a.path.len() + a.content.len()).sum::<usize>();
        self.within_output(size)?;
        Ok(out)
    }
}

impl ValidatorInstance {
    /// Validates artifacts.
    pub async fn validate(&mut self, artifacts: &[Artifact]) -> Result<Vec<Diagnostic>, CallError> {
        match self.bindings.clone() {
            Bound::V0_1(b) => {
                let old: Vec<v0_1::types::Artifact> = artifacts.to_vec().conv();
                guest_call!(self, b.quantumlayer_plugin_validator().call_validate(&mut self.store, &old), up)
            }
            Bound::V0_2(b) => {
                guest_call!(self, b.quantumlayer_plugin_validator().call_validate(&mut self.store, artifacts), |r| r
                    .map(|found| found.map(Conv::conv)))
            }
            Bound::V0_3(b) => {
                guest_call!(self, b.quantumlayer_plugin0_3_0_validator().call_validate(&mut self.store, artifacts))
            }
        }
    }
}

impl ToolInstance {
    /// Invokes the tool. An input that does not match the tool's input schema is refused as
    /// `invalid-input` naming the field, before the plugin runs.
    pub async fn invoke(&mut self, input_json: &str) -> Result<String, CallError> {
        if let Some(input) = &self.input {
            input
                .check(input_json)
                .map_err(|m| error_of(&self.store, CallErrorKind::Plugin(PluginError::InvalidInput(m))))?;
        }
        let out = match self.bindings.clone() {
            Bound::V0_1(b) => {
                guest_call!(self, b.quantumlayer_plugin_tool().call_invoke(&mut self.store, input_json), up)?
            }
            Bound::V0_2(b) => guest_call!(self, b.quantumlayer_plugin_tool().call_invoke(&mut self.store, input_json))?,
        };
        self.within_output(out.len())?;
        Ok(out)
    }
}

impl Message {
    /// A message of `role` with one text part.
    pub fn new(role: Role, text: impl Into<String>) -> Self {
        Message {
            role,
            content: vec![ContentPart::Text(text.into())],
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }

    /// The message's text parts, joined.
    pub fn text(&self) -> String {
        self.content
            .iter()
            .filter_map(|p| match p {
                ContentPart::Text(t) => Some(t.as_str()),
                ContentPart::ImageUrl(_) => None,
            })
            .collect()
    }
}

impl CompletionRequest {
    /// A request for `model` (empty for the provider's default) with everything else unset.
    pub fn new(model: impl Into<String>, messages: Vec<Message>) -> Self {
        CompletionRequest {
            model: model.into(),
            messages,
            tools: Vec::new(),
            tool_choice: None,
            parallel_tool_calls: None,
            response_format: ResponseFormat::Text,
            max_tokens: None,
            temperature: None,
            top_p: None,
            top_k: None,
            seed: None,
            stop: Vec::new(),
            user: None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_wasi_0_2_import_is_allowed_and_other_versions_are_named() {
        // What componentize-py 0.25 and jco emit, whatever the plugin uses.
        for name in [
            "wasi:sockets/network@0.2.9",
            "wasi:sockets/tcp@0.2.0",
            "wasi:sockets/ip-name-lookup@0.2.3",
            "wasi:cli/environment@0.2.0",
            "wasi:cli/terminal-stdout@0.2.12",
            "wasi:filesystem/preopens@0.2.6",
            "wasi:io/streams@0.2.0",
            "wasi:clocks/wall-clock@0.2.1",
            "wasi:random/insecure-seed@0.2.2",
            "wasi:http/types@0.2.4",
            "quantumlayer:plugin/host@0.2.0",
        ] {
            for kind in [Kind::Provider, Kind::Agent, Kind::Validator, Kind::Tool] {
                assert_eq!(check_import(kind, name), Ok(()), "{kind} {name}");
            }
        }
        let refused = |kind, name| check_import(kind, name).unwrap_err();
        let e = refused(Kind::Tool, "wasi:cli/environment@0.3.0");
        assert!(e.contains("WASI version 0.3.0") && e.contains("0.2.0 and later 0.2.x"), "{e}");
        let e = refused(Kind::Tool, "wasi:http/types@0.2.0-rc-2023-11-10");
        assert!(e.contains("0.2.0-rc-2023-11-10"), "{e}");
        let e = refused(Kind::Tool, "wasi:io/streams");
        assert!(e.contains("without a version"), "{e}");
        let e = refused(Kind::Tool, "wasi:keyvalue/store@0.2.0-draft");
        assert!(e.contains("does not provide") && e.contains("wasi:keyvalue/store"), "{e}");
        let e = refused(Kind::Validator, "quantumlayer:plugin/llm@0.2.0");
        assert!(e.contains("a validator plugin may not use"), "{e}");
        assert_eq!(check_import(Kind::Agent, "quantumlayer:plugin/tools@0.2.0"), Ok(()));
        let e = refused(Kind::Tool, "example:evil/backdoor@1.0.0");
        assert!(e.contains("example:evil/backdoor@1.0.0"), "{e}");
    }
}
