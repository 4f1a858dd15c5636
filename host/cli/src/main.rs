//! The `qlayer` command line: `serve`, `run`, `plugin`, `audit`.
//! May depend on: any crate of the workspace (it is the top).
//!
//! `qlayer`: the QuantumLayer plugin host's command line.
#![allow(clippy::print_stdout)] // this is the CLI's own output code

mod capsule;
mod eval;
mod local;
mod probe;
mod progress;
mod scaffold;
mod telemetry;
mod validate;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use local::{LocalRun, Update};
use qlayer_bundled::{self as embedded, ProviderChoice};
use qlayer_factory as factory;
use qlayer_jobs::RunInput;
use qlayer_marketplace::{self as marketplace, GrantSpec, Marketplace, MarketplaceConfig};
use qlayer_runtime::{Kind, Runtime, RuntimeConfig};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "qlayer",
    version,
    about = "QuantumLayer: a sandboxed WebAssembly plugin host for AI software factories"
)]
struct Cli {
    /// Log filter (tracing's env-filter syntax), e.g. `info` or `qlayer_runtime=debug`. Default:
    /// `info` for `serve`, `warn` otherwise.
    #[arg(long, env = "QLAYER_LOG", global = true)]
    log: Option<String>,
    /// `json` (one object per line, with the request id, tenant and plugin fields) or `text`.
    /// Default: `json` for `serve`, `text` otherwise.
    #[arg(long, env = "QLAYER_LOG_FORMAT", global = true, value_parser = ["json", "text"])]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Turn a requirement into a validated project: product-manager → architect → developer and
    /// devops → qa-engineer → reviewer → validators → review, with bounded repair rounds, run as a job through the core scheduler in this
    /// process. Writes the files and qlayer-run.json into --out.
    Run(RunArgs),
    /// Run a suite of requirements (a TOML file of `[[case]]` tables with `name` and
    /// `requirement`) through one pipeline and provider, each as `qlayer run` would (every gate
    /// approved), and print a row per requirement and the totals: validators passed, files
    /// checked, errors left, repair rounds, tokens, cost, time. Writes each project and
    /// eval.json into --out. Exits 3 when a requirement did not pass.
    Eval(EvalArgs),
    /// Run the factory's validators on any directory (every bundled one by default, or those
    /// named), each in its own sandbox; print their findings and the files none could check.
    /// Exits 3 when errors remain.
    Validate {
        /// The project directory (`.git`, `target`, `node_modules` and the like are skipped).
        dir: PathBuf,
        /// A validator: bundled (`syntax`) or `installed:<name>[@sha256:<hex>]`; repeat for more.
        #[arg(long = "validator")]
        validators: Vec<String>,
        /// The tenant whose installed validators `installed:` names.
        #[arg(long, default_value = embedded::LOCAL_TENANT)]
        tenant: String,
        #[command(flatten)]
        market: MarketArgs,
    },
    /// Write, build and inspect plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Run capsules as OCI artifacts (`qlayer run --push REF` pushes one).
    #[command(subcommand)]
    Capsule(CapsuleCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// API keys, straight in the service's database: how an operator on the host issues a key
    /// for a tenant that lost its admin keys (or for the `system` tenant itself).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// A tenant's gateway model table, straight in the service's database (running nodes see a
    /// change within a second).
    #[command(subcommand)]
    Models(ModelsCommand),
    /// A tenant's gateway usage: requests, tokens and cost, summed per group.
    Usage {
        /// The tenant's name.
        #[arg(long)]
        tenant: String,
        /// day, model, key or deployment; one total when left out.
        #[arg(long)]
        group_by: Option<String>,
        /// From this time (unix ms).
        #[arg(long)]
        from: Option<i64>,
        /// Up to this time (unix ms).
        #[arg(long)]
        to: Option<i64>,
        /// Only this model name.
        #[arg(long)]
        model: Option<String>,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Serve a tenant's installed tool plugins as an MCP server over stdio, for local MCP
    /// clients (editors, desktop assistants): each call runs in the tool's sandbox with its
    /// install's grants. `qlayer serve` offers the same at /mcp over HTTP.
    Mcp {
        /// The tenant whose tools to serve.
        #[arg(long, default_value = embedded::LOCAL_TENANT)]
        tenant: String,
        #[command(flatten)]
        market: MarketArgs,
    },
    /// Ask a running service whether it is ready: one HTTP GET; exit 0 on a 2xx answer, 1
    /// otherwise. For container health checks where the image has no shell or curl.
    Probe {
        /// The URL to ask.
        #[arg(default_value = "http://127.0.0.1:8080/readyz")]
        url: String,
        /// Milliseconds to wait for each of connecting, sending and reading.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// Run the multi-tenant service (REST and gRPC). Config: --config file, then QLAYER_* environment,
    /// then flags.
    Serve {
        /// A qlayer.toml config file (unknown keys are errors).
        #[arg(long, env = "QLAYER_CONFIG")]
        config: Option<PathBuf>,
        /// REST address, e.g. 127.0.0.1:8080.
        #[arg(long)]
        rest_addr: Option<std::net::SocketAddr>,
        /// gRPC address, e.g. 127.0.0.1:50051.
        #[arg(long)]
        grpc_addr: Option<std::net::SocketAddr>,
        /// sqlite://<path> or postgres://... (default: <data dir>/qlayer.db).
        #[arg(long)]
        database: Option<String>,
        /// Data directory.
        #[arg(long, env = "QLAYER_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Scale mode: nats://host:4222 (JetStream); nodes sharing the database then share the
        /// work. Default: the queue is in the database.
        #[arg(long)]
        queue: Option<String>,
        /// Export traces over OTLP/gRPC to this collector, e.g. http://127.0.0.1:4317.
        #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
        otlp_endpoint: Option<String>,
        /// Front an OpenAI-compatible upstream for every tenant's gateway calls, e.g.
        /// http://127.0.0.1:11434/v1 for a local Ollama ([gateway] upstream).
        #[arg(long)]
        upstream: Option<String>,
    },
}

#[derive(Subcommand)]
enum CapsuleCommand {
    /// Pull a run's capsule from a registry, check it (the manifest's and blobs' digests, the
    /// signature under the signature policy, every file against the run report) and write its
    /// files and qlayer-run.json into --out. Nothing is written from a capsule that fails.
    Pull {
        /// The capsule's reference, e.g. registry.example.com/capsules/todo:1 or …@sha256:<hex>.
        reference: String,
        /// Directory for the files (created if missing; must be empty).
        #[arg(long, short)]
        out: PathBuf,
        /// Overwrite files in a non-empty --out.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        market: MarketArgs,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Walk the hash chain; report the first record that was changed, removed or moved.
    Verify {
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

/// Where the service's database is.
#[derive(Subcommand)]
enum ModelsCommand {
    /// The tenant's model names, strategies and deployments.
    List {
        /// The tenant's name.
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Sets the models of a TOML file (`[models.NAME]` with `strategy` and `deployments`, as
    /// `PUT /v1/models/{name}` takes them); each deployment must name an installed provider.
    Set {
        /// The TOML file.
        file: PathBuf,
        /// The tenant's name.
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Removes a model name from the tenant's table.
    Remove {
        /// The model name.
        name: String,
        /// The tenant's name.
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

#[derive(clap::Args)]
struct DatabaseArgs {
    /// sqlite://<path> or postgres://... (default: the SQLite file in the data dir).
    #[arg(long, env = "QLAYER_DATABASE_URL")]
    database: Option<String>,
    /// Data directory.
    #[arg(long, env = "QLAYER_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

impl DatabaseArgs {
    /// The database URL: the one given, else the data dir's SQLite file, which must exist.
    fn url(&self) -> anyhow::Result<String> {
        match &self.database {
            Some(url) => Ok(url.clone()),
            None => {
                let dir = self.data_dir.clone().unwrap_or_else(embedded::default_data_dir);
                let path = dir.join("qlayer.db");
                if !path.exists() {
                    anyhow::bail!("no database at {} (pass --database)", path.display());
                }
                Ok(format!("sqlite://{}", path.display()))
            }
        }
    }
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Issue a key for a tenant and print it once (recorded in the audit log as `cli`).
    Create {
        /// The tenant's name (`system` for operators).
        #[arg(long)]
        tenant: String,
        /// admin, developer or viewer.
        #[arg(long, default_value = "admin")]
        role: String,
        /// A label for the key.
        #[arg(long, default_value = "issued with qlayer keys")]
        name: String,
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// List a tenant's keys (never the keys themselves: they are stored hashed).
    List {
        /// The tenant's name.
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

#[derive(clap::Args)]
struct EvalArgs {
    /// The suite: `[[case]]` tables with `name`, `requirement` and optionally `language`, and an
    /// optional top-level `language` for every case.
    suite: PathBuf,
    /// Directory for each case's project (`<out>/<name>/`) and eval.json (created if missing;
    /// must be empty).
    #[arg(long, short)]
    out: PathBuf,
    /// Overwrite files in a non-empty --out.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    llm: LlmArgs,
    /// Print the results as JSON (what eval.json holds) instead of the table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    settings: RunSettings,
}

/// How a run (or each run of an eval) goes: its pipeline, repair rounds, token budget, and where
/// its plugins and install records are.
#[derive(clap::Args)]
struct RunSettings {
    /// A pipeline definition (TOML, or JSON for a `.json` file) instead of the bundled default:
    /// its steps, their role plugins (bundled or installed), validators, tools and repair policy.
    #[arg(long)]
    pipeline: Option<PathBuf>,
    /// Repair rounds after the first validation (default: the pipeline's, 2 in the default one).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=qlayer_jobs::MAX_REPAIR_ROUNDS as i64))]
    max_repair_rounds: Option<u32>,
    /// Tokens a run may spend.
    #[arg(long, default_value_t = 500_000, value_parser = clap::value_parser!(u64).range(1..))]
    token_budget: u64,
    /// Where compiled plugins are cached (and installed plugins live).
    #[arg(long, env = "QLAYER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The tenant a run belongs to (and whose installed plugins it may use).
    #[arg(long, default_value = embedded::LOCAL_TENANT)]
    tenant: String,
    /// Where the install records are (for `installed:` plugins): sqlite://<path> or
    /// postgres://... (default: the data dir's qlayer.db).
    #[arg(long, env = "QLAYER_DATABASE_URL")]
    database: Option<String>,
}

/// The model provider of a run (or of every run of an eval).
#[derive(clap::Args)]
struct LlmArgs {
    /// `scripted` (offline test double), `openai` (any OpenAI-compatible endpoint), or
    /// `installed:<name>` (a provider installed with `qlayer plugin install`). Defaults to openai
    /// when a base URL is given, else scripted.
    #[arg(long, env = "QLAYER_PROVIDER")]
    provider: Option<String>,
    /// Base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:11434/v1 for Ollama.
    #[arg(long, env = "QLAYER_BASE_URL")]
    base_url: Option<String>,
    /// Model name to ask the provider for.
    #[arg(long, env = "QLAYER_MODEL")]
    model: Option<String>,
    /// API key for the provider (sent as a bearer token; never logged).
    #[arg(long, env = "QLAYER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// A script (JSON) for the scripted provider.
    #[arg(long)]
    script: Option<PathBuf>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// What to build, in plain words.
    requirement: String,
    /// Directory for the generated files and the report (created if missing; must be empty).
    #[arg(long, short)]
    out: PathBuf,
    /// Overwrite files in a non-empty --out.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    llm: LlmArgs,
    /// Programming language to ask for (passed to the agents as an option).
    #[arg(long)]
    language: Option<String>,
    #[command(flatten)]
    settings: RunSettings,
    /// Approve every approval gate of the pipeline without asking (by default the run asks at
    /// each gate on the terminal: approve, or reject with a comment for the step).
    #[arg(long)]
    approve_all: bool,
    /// Push the capsule of a run that passed to this OCI reference (a tag, e.g.
    /// registry.example.com/capsules/todo:1): the files as a tar.gz layer, the run report (every
    /// plugin with its digest, the validators' findings) as the config. `qlayer capsule pull`
    /// reads it back.
    #[arg(long, value_name = "REF")]
    push: Option<String>,
    /// Sign the pushed capsule with this private key (PEM, from `qlayer plugin keygen`).
    #[arg(long, value_name = "KEY", requires = "push")]
    sign: Option<PathBuf>,
    /// A registry (host:port) that may be used over plain HTTP, for --push.
    #[arg(long, env = "QLAYER_INSECURE_REGISTRIES", value_delimiter = ',')]
    insecure_registry: Vec<String>,
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Scaffold a plugin project that builds as is, in Rust, Python or JavaScript.
    New {
        /// provider, agent, validator or tool.
        kind: Kind,
        /// The plugin's name (lowercase letters, digits, `-`).
        name: String,
        /// Where to create it (default: ./<name>).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The language: rust (the SDK crate), python (componentize-py) or js (componentize-js).
        #[arg(long, value_enum, default_value = "rust")]
        lang: scaffold::Lang,
        /// The qlayer-sdk crate to depend on (default: the SDK this binary was built with).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Build a plugin project (Rust, Python or JavaScript) into a component with its manifest
    /// embedded.
    Build {
        /// The plugin crate (default: the current directory).
        dir: Option<PathBuf>,
        /// Where to write the component.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Embed (or replace) the manifest in a component or Extism module built by any toolchain
    /// (componentize-py, jco, cargo-component, TinyGo...), checking that the host loads it.
    Pack {
        /// The component or module.
        component: PathBuf,
        /// The manifest to embed.
        #[arg(long, default_value = "qlayer-plugin.toml")]
        manifest: PathBuf,
        /// Where to write the plugin (default: `<name>-<version>.wasm` beside the component).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Show a component's manifest, world, imports and exports.
    Inspect {
        /// The component file.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Publish a plugin to an OCI registry (wasm artifact layout), optionally signed.
    Push {
        /// A built plugin file, or `bundled:<name>` for a first-party plugin of this binary.
        file: String,
        /// Where to push, with a tag: registry.example.com/tools/name:1.0.0
        reference: String,
        /// Sign the pushed digest with this private key (PKCS#8 PEM, from `qlayer plugin keygen`).
        #[arg(long)]
        sign: Option<PathBuf>,
        #[command(flatten)]
        market: MarketArgs,
    },
    /// List the plugins in a registry (repositories, tags and manifests), filtered by text.
    Search {
        /// The registry (host[:port]); default $QLAYER_REGISTRY.
        registry: Option<String>,
        /// Words to look for in names and descriptions.
        text: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        market: MarketArgs,
    },
    /// Show what a plugin in a registry is and asks for, and whether its signature verifies.
    Info {
        /// registry/repository:tag or registry/repository@sha256:...
        reference: String,
        #[command(flatten)]
        market: MarketArgs,
    },
    /// Install a plugin from a registry for a tenant, pinned to its digest.
    Install {
        /// registry/repository:tag or registry/repository@sha256:...
        reference: String,
        /// The tenant to install for.
        #[arg(long, default_value = embedded::LOCAL_TENANT)]
        tenant: String,
        /// Grant a capability: host:<host[:port]>, config:<key>=<value>, secret:<key>=<ENV_VAR>.
        #[arg(long)]
        grant: Vec<String>,
        #[command(flatten)]
        market: MarketArgs,
    },
    /// List a tenant's installed plugins.
    List {
        /// The tenant.
        #[arg(long, default_value = embedded::LOCAL_TENANT)]
        tenant: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        market: MarketArgs,
    },
    /// Move an installed plugin to the newest version (semver tags), keeping its grants.
    Upgrade {
        /// The installed plugin's name.
        name: String,
        /// The tenant.
        #[arg(long, default_value = embedded::LOCAL_TENANT)]
        tenant: String,
        /// Extra grants, for a version that asks for more.
        #[arg(long)]
        grant: Vec<String>,
        #[command(flatten)]
        market: MarketArgs,
    },
    /// Remove an installed plugin.
    Remove {
        /// The installed plugin's name.
        name: String,
        /// The tenant.
        #[arg(long, default_value = embedded::LOCAL_TENANT)]
        tenant: String,
        #[command(flatten)]
        market: MarketArgs,
    },
    /// Invoke an installed tool plugin with a JSON input and print its output (a one-task job
    /// through the core scheduler in this process: retryable failures are retried with backoff).
    Call {
        /// The installed tool's name.
        name: String,
        /// The input JSON.
        input: String,
        /// The tenant.
        #[arg(long, default_value = embedded::LOCAL_TENANT)]
        tenant: String,
        #[command(flatten)]
        market: MarketArgs,
    },
    /// Create a signing key pair: <prefix>.key (private) and <prefix>.pub (give it to operators).
    Keygen {
        /// Path prefix for the two files.
        prefix: PathBuf,
    },
}

/// Where the marketplace keeps its state and how it trusts registries and publishers. Each flag
/// adds to `<data dir>/marketplace.toml`.
#[derive(clap::Args)]
struct MarketArgs {
    /// Data directory (local store, compile cache, marketplace.toml).
    #[arg(long, env = "QLAYER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Where the install records are: sqlite://<path> or postgres://... (default: the data
    /// dir's qlayer.db, the one `qlayer serve` uses by default). Give a scale-mode service's
    /// database to install for all its nodes.
    #[arg(long, env = "QLAYER_DATABASE_URL")]
    database: Option<String>,
    /// A registry (host:port) that may be used over plain HTTP.
    #[arg(long, env = "QLAYER_INSECURE_REGISTRIES", value_delimiter = ',')]
    insecure_registry: Vec<String>,
    /// require, warn or off (overrides marketplace.toml for this command).
    #[arg(long, env = "QLAYER_SIGNATURE_POLICY")]
    signature_policy: Option<qlayer_registry::SignaturePolicy>,
    /// A trusted publisher's public key (PEM).
    #[arg(long)]
    trusted_key: Vec<PathBuf>,
    /// A non-public address, CIDR range or host name (optionally :port) plugins may reach, such
    /// as a local model server (127.0.0.1:11434); by default they reach public addresses only.
    #[arg(long, env = "QLAYER_NETWORK_ALLOW", value_delimiter = ',')]
    network_allow: Vec<String>,
}

impl MarketArgs {
    fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(embedded::default_data_dir)
    }

    async fn open(&self) -> anyhow::Result<Marketplace> {
        let data_dir = self.data_dir();
        let mut config = MarketplaceConfig::load(&data_dir)?;
        config.insecure_registries.extend(self.insecure_registry.iter().filter(|r| !r.is_empty()).cloned());
        if let Some(policy) = self.signature_policy {
            config.signature_policy = policy;
            config.tenants.clear();
        }
        config.trusted_keys.extend(self.trusted_key.iter().cloned());
        match &self.database {
            Some(url) => {
                let db = qlayer_db::Db::open(url).await.context("opening the database")?;
                Marketplace::open(data_dir, config, db).await
            }
            None => Marketplace::open_local(data_dir, config).await,
        }
    }

    fn runtime(&self) -> anyhow::Result<Runtime> {
        let allow: Vec<&String> = self.network_allow.iter().filter(|a| !a.is_empty()).collect();
        let network =
            qlayer_runtime::NetworkPolicy::new(&allow).map_err(|e| anyhow::anyhow!("--network-allow: {e}"))?;
        Runtime::new(RuntimeConfig {
            cache_dir: Some(qlayer_runtime::cache_dir(&self.data_dir())),
            network,
            ..Default::default()
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve { .. });
    // `serve` gets its runtime first: an OTLP exporter's connection lives on it.
    let tokio = match serving.then(|| tokio::runtime::Builder::new_multi_thread().enable_all().build()).transpose() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let otlp = match (&tokio, &cli.command) {
        (Some(rt), Command::Serve { otlp_endpoint: Some(endpoint), .. }) => {
            let _entered = rt.enter();
            match crate::telemetry::otlp_provider(endpoint) {
                Ok(provider) => Some(provider),
                Err(e) => {
                    eprintln!("error: OTLP export to {endpoint}: {e:#}");
                    return ExitCode::from(1);
                }
            }
        }
        _ => None,
    };
    init_logging(&cli, serving, otlp.as_ref());
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Eval(args) => eval_suite(args),
        Command::Plugin(cmd) => plugin(cmd).map(|()| ExitCode::SUCCESS),
        Command::Capsule(CapsuleCommand::Pull { reference, out, force, market }) => {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(async { capsule::pull(&market.open().await?, &reference, &out, force).await })
                })
                .map(|()| ExitCode::SUCCESS)
        }
        Command::Validate { dir, validators, tenant, market } => validate_dir(&dir, validators, &tenant, &market),
        Command::Audit(cmd) => audit(cmd),
        Command::Keys(cmd) => keys(cmd).map(|()| ExitCode::SUCCESS),
        Command::Models(cmd) => models(cmd).map(|()| ExitCode::SUCCESS),
        Command::Usage { tenant, group_by, from, to, model, db } => {
            usage(&tenant, group_by, from, to, model, &db).map(|()| ExitCode::SUCCESS)
        }
        Command::Mcp { tenant, market } => mcp_stdio(tenant, market).map(|()| ExitCode::SUCCESS),
        Command::Probe { url, timeout_ms } => Ok(probe::probe(&url, timeout_ms)),
        Command::Serve { config, rest_addr, grpc_addr, database, data_dir, queue, otlp_endpoint: _, upstream } => {
            match &tokio {
                Some(rt) => {
                    serve_command(rt, ServeFlags { config, rest_addr, grpc_addr, database, data_dir, queue, upstream })
                        .map(|()| ExitCode::SUCCESS)
                }
                None => Err(anyhow::anyhow!("no runtime")),
            }
        }
    };
    if let Some(provider) = otlp {
        // Flush what is batched before exiting, while the runtime holding its connection runs.
        if let Err(e) = provider.shutdown() {
            eprintln!("warning: OTLP export at shutdown: {e}");
        }
    }
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Log lines to stderr (JSON for `serve` by default) and, when configured, spans over OTLP.
/// `qlayer mcp`: the tenant's tools over stdio (stdout carries the protocol; logs go to stderr).
fn validate_dir(
    dir: &std::path::Path,
    validators: Vec<String>,
    tenant: &str,
    market: &MarketArgs,
) -> anyhow::Result<ExitCode> {
    let project = validate::read_project(dir)?;
    let names = match validators.is_empty() {
        true => embedded::VALIDATORS.iter().map(ToString::to_string).collect(),
        false => validators,
    };
    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let found = tokio.block_on(async {
        let runtime = market.runtime()?;
        let marketplace = market.open().await?;
        let mut loaded = Vec::new();
        for name in &names {
            loaded.push(validate::load_validator(&runtime, &marketplace, tenant, name).await?);
        }
        validate::validate(&loaded, tenant, &project.files).await
    })?;
    println!("qlayer validate: {} files in {} (validators: {})", project.files.len(), dir.display(), names.join(", "));
    for d in found.diagnostics.iter().filter(|d| d.severity != "info") {
        println!("  {} [{}] {} {} ({})", d.severity, d.rule, d.place(), d.message, d.validator);
    }
    if let Some(t) = qlayer_factory::tests_summary(&found.diagnostics) {
        println!("  tests: {} of {} passed in the sandbox, {} not run", t.passed, t.ran, t.not_run);
    }
    if !found.unchecked.is_empty() {
        println!("  not checked (no validator reads them): {}", found.unchecked.join(", "));
    }
    if !project.binary.is_empty() {
        println!("  not checked (not UTF-8 text): {}", project.binary.join(", "));
    }
    let errors = found.diagnostics.iter().filter(|d| d.is_error()).count();
    let warnings = found.diagnostics.iter().filter(|d| d.severity == "warning").count();
    let unchecked = found.unchecked.len() + project.binary.len();
    let verdict = if errors == 0 { "passed" } else { "failed" };
    println!("{verdict}: {errors} errors, {warnings} warnings, {unchecked} files not checked");
    Ok(if errors == 0 { ExitCode::SUCCESS } else { ExitCode::from(3) })
}

fn mcp_stdio(tenant: String, market: MarketArgs) -> anyhow::Result<()> {
    use qlayer_api::mcp::{McpCaller, McpTools};
    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    tokio.block_on(async {
        let marketplace = std::sync::Arc::new(market.open().await?);
        let runtime = std::sync::Arc::new(market.runtime()?);
        let db = match &market.database {
            Some(url) => qlayer_db::Db::open(url).await?,
            None => qlayer_db::Db::open_sqlite(&market.data_dir().join("qlayer.db")).await?,
        };
        // A tenant of the service's database, or the CLI's own (installs made with --tenant).
        let (tenant_id, tenant_name) = match db.tenant_named(&tenant).await? {
            Some(t) => (t.id, t.name),
            None => (tenant.clone(), tenant),
        };
        let caller = McpCaller { tenant_id, tenant_name, actor: "local".into(), can_call: true };
        let admission = qlayer_scheduler::interactive::Admission::new(16, 16);
        let tools = McpTools::local(marketplace, runtime, admission, db, caller);
        let service = rmcp::ServiceExt::serve(tools, rmcp::transport::stdio()).await?;
        service.waiting().await?;
        Ok(())
    })
}

fn init_logging(cli: &Cli, serving: bool, otlp: Option<&opentelemetry_sdk::trace::SdkTracerProvider>) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let level = cli.log.as_deref().unwrap_or(if serving { "info" } else { "warn" });
    let filter =
        tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let json = cli.log_format.as_deref().unwrap_or(if serving { "json" } else { "text" }) == "json";
    let lines: Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync> = if json {
        Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .with_writer(std::io::stderr),
        )
    } else {
        Box::new(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
    };
    let otel = otlp.map(crate::telemetry::layer);
    tracing_subscriber::registry().with(lines).with(otel).with(filter).init();
}

/// `qlayer serve`'s flags, which override the config file and the environment.
struct ServeFlags {
    config: Option<PathBuf>,
    rest_addr: Option<std::net::SocketAddr>,
    grpc_addr: Option<std::net::SocketAddr>,
    database: Option<String>,
    data_dir: Option<PathBuf>,
    queue: Option<String>,
    upstream: Option<String>,
}

fn serve_command(tokio: &tokio::runtime::Runtime, flags: ServeFlags) -> anyhow::Result<()> {
    let ServeFlags { config, rest_addr, grpc_addr, database, data_dir, queue, upstream } = flags;
    let mut cfg = match &config {
        Some(path) => qlayer_api::serve::ServeConfig::from_file(path)?,
        None => qlayer_api::serve::ServeConfig::default(),
    };
    cfg.apply_env()?;
    if let Some(addr) = rest_addr {
        cfg.server.rest_addr = addr;
    }
    if let Some(addr) = grpc_addr {
        cfg.server.grpc_addr = addr;
    }
    if let Some(url) = database {
        cfg.database.url = Some(url);
    }
    if let Some(url) = queue {
        cfg.jobs.queue = Some(url);
    }
    if let Some(url) = upstream {
        cfg.gateway.upstream = Some(url);
    }
    let data_dir = data_dir.unwrap_or_else(embedded::default_data_dir);
    tokio.block_on(qlayer_api::serve::serve(cfg, data_dir))
}

fn audit(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    let AuditCommand::Verify { db } = cmd;
    let url = db.url()?;
    let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    tokio.block_on(async {
        let db = qlayer_db::Db::open(&url).await?;
        Ok(match db.verify_audit().await? {
            qlayer_db::AuditCheck::Intact { records, head } => {
                println!("audit log intact: {records} records, head {head}");
                ExitCode::SUCCESS
            }
            qlayer_db::AuditCheck::Broken { seq, problem } => {
                println!("audit log BROKEN at record {seq}: {problem}");
                ExitCode::from(3)
            }
        })
    })
}

/// A TOML file of model entries for `qlayer models set`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelsFile {
    models: std::collections::BTreeMap<String, qlayer_gateway::table::ModelSpec>,
}

/// Opens the database and finds the tenant named `name`.
async fn open_tenant(db: &DatabaseArgs, name: &str) -> anyhow::Result<(qlayer_db::Db, qlayer_db::Tenant)> {
    let db = qlayer_db::Db::open(&db.url()?).await.context("opening the database")?;
    let tenant = db.tenant_named(name).await?.with_context(|| format!("no tenant named `{name}` in this database"))?;
    Ok((db, tenant))
}

fn models(cmd: ModelsCommand) -> anyhow::Result<()> {
    let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    tokio.block_on(async move {
        match cmd {
            ModelsCommand::List { tenant, db } => {
                let (db, tenant) = open_tenant(&db, &tenant).await?;
                for entry in db.models(&tenant.id).await? {
                    let spec: qlayer_gateway::table::ModelSpec = serde_json::from_str(&entry.spec)?;
                    let deployments: Vec<String> = spec.deployments.iter().map(|d| d.key()).collect();
                    println!("{}\t{}\t{}", entry.name, spec.strategy.as_str(), deployments.join(", "));
                }
                db.close().await;
            }
            ModelsCommand::Set { file, tenant, db } => {
                let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
                let parsed: ModelsFile = toml::from_str(&text).with_context(|| format!("{}", file.display()))?;
                let (db, tenant) = open_tenant(&db, &tenant).await?;
                // Every entry is checked before any is written.
                for (name, spec) in &parsed.models {
                    spec.check(name).map_err(|e| anyhow::anyhow!("{}: models.{name}: {e}", file.display()))?;
                    for (i, d) in spec.deployments.iter().enumerate() {
                        let record = db.install(&tenant.name, &d.plugin).await?.with_context(|| {
                            format!(
                                "models.{name}.deployments[{i}]: no plugin `{}` is installed for `{}`",
                                d.plugin, tenant.name
                            )
                        })?;
                        let install: qlayer_marketplace::Install = serde_json::from_str(&record)?;
                        if install.kind != qlayer_runtime::Kind::Provider {
                            anyhow::bail!(
                                "models.{name}.deployments[{i}]: plugin `{}` is a {} plugin, not a provider",
                                d.plugin,
                                install.kind
                            );
                        }
                    }
                }
                for (name, spec) in &parsed.models {
                    db.put_model(&tenant.id, name, &serde_json::to_string(spec)?).await?;
                    db.audit(qlayer_db::AuditEntry {
                        actor: "cli".into(),
                        tenant_id: tenant.id.clone(),
                        action: "model.put".into(),
                        target: name.clone(),
                        outcome: "ok".into(),
                    })
                    .await?;
                    eprintln!("model `{name}` set for tenant `{}`", tenant.name);
                }
                db.close().await;
            }
            ModelsCommand::Remove { name, tenant, db } => {
                let (db, tenant) = open_tenant(&db, &tenant).await?;
                if !db.delete_model(&tenant.id, &name).await? {
                    anyhow::bail!("tenant `{}` has no model `{name}`", tenant.name);
                }
                db.audit(qlayer_db::AuditEntry {
                    actor: "cli".into(),
                    tenant_id: tenant.id.clone(),
                    action: "model.delete".into(),
                    target: name.clone(),
                    outcome: "ok".into(),
                })
                .await?;
                eprintln!("model `{name}` removed for tenant `{}`", tenant.name);
                db.close().await;
            }
        }
        Ok(())
    })
}

fn usage(
    tenant: &str,
    group_by: Option<String>,
    from: Option<i64>,
    to: Option<i64>,
    model: Option<String>,
    db: &DatabaseArgs,
) -> anyhow::Result<()> {
    use qlayer_db::UsageGroup;
    let group = match group_by.as_deref() {
        None => UsageGroup::All,
        Some("day") => UsageGroup::Day,
        Some("model") => UsageGroup::Model,
        Some("key") => UsageGroup::Key,
        Some("deployment") => UsageGroup::Deployment,
        Some(other) => anyhow::bail!("--group-by `{other}` is not one of day, model, key, deployment"),
    };
    let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    tokio.block_on(async move {
        let (db, tenant) = open_tenant(db, tenant).await?;
        let filter = qlayer_db::UsageFilter { from, to, key_id: None, model };
        println!("group\trequests\terrors\tcache_hits\tprompt_tokens\tcompletion_tokens\tcost");
        for s in db.usage(&tenant.id, &filter, group).await? {
            println!(
                "{}\t{}\t{}\t{}\t{}\t{}\t{:.9}",
                if s.key.is_empty() { "total" } else { &s.key },
                s.requests,
                s.errors,
                s.cache_hits,
                s.prompt_tokens,
                s.completion_tokens,
                s.cost_nanos as f64 / 1e9
            );
        }
        db.close().await;
        Ok(())
    })
}

fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    let (tenant_name, url) = match &cmd {
        KeysCommand::Create { tenant, db, .. } | KeysCommand::List { tenant, db, .. } => (tenant.clone(), db.url()?),
    };
    let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    tokio.block_on(async move {
        let db = qlayer_db::Db::open(&url).await.context("opening the database")?;
        let tenant = db
            .tenant_named(&tenant_name)
            .await?
            .with_context(|| format!("no tenant named `{tenant_name}` in this database"))?;
        match cmd {
            KeysCommand::Create { role, name, .. } => {
                let role: qlayer_db::Role = role.parse().map_err(|e| anyhow::anyhow!("--role: {e}"))?;
                let (key, secret) =
                    db.create_key(&tenant.id, &name, role).await?.context("the tenant was removed meanwhile")?;
                db.audit(qlayer_db::AuditEntry {
                    actor: "cli".into(),
                    tenant_id: tenant.id.clone(),
                    action: "key.create".into(),
                    target: key.id.clone(),
                    outcome: "ok".into(),
                })
                .await?;
                println!("{}", secret.expose());
                eprintln!(
                    "key {} ({role}) for tenant `{}` ({}): shown once, store it now",
                    key.id, tenant.name, tenant.id
                );
            }
            KeysCommand::List { .. } => {
                for key in db.keys(&tenant.id).await? {
                    let state = if key.revoked_at.is_some() { "revoked" } else { "active" };
                    println!("{}\t{}\t{state}\t{}", key.id, key.role, key.name);
                }
            }
        }
        db.close().await;
        Ok(())
    })
}

/// The provider `llm` names, for a run of `tenant`.
fn provider_choice(llm: &LlmArgs, tenant: &str) -> anyhow::Result<ProviderChoice> {
    let script = match &llm.script {
        Some(path) => {
            Some(std::fs::read_to_string(path).with_context(|| format!("reading --script {}", path.display()))?)
        }
        None => None,
    };
    let provider = llm
        .provider
        .clone()
        .unwrap_or_else(|| if llm.base_url.is_some() { "openai".into() } else { "scripted".into() });
    let choice = match provider.strip_prefix("installed:") {
        Some(name) => {
            if llm.base_url.is_some() || script.is_some() {
                anyhow::bail!(
                    "--base-url and --script are for the bundled providers; an installed one has its own grants"
                );
            }
            ProviderChoice::Installed { name: name.to_string(), tenant: tenant.to_string() }
        }
        None => {
            ProviderChoice::from_flags(&provider, llm.base_url.clone(), llm.model.clone(), llm.api_key.clone(), script)?
        }
    };
    Ok(choice)
}

/// A `--pipeline` file (TOML, or JSON for a `.json` file), checked.
fn read_pipeline(path: Option<&std::path::Path>) -> anyhow::Result<Option<qlayer_jobs::PipelineChoice>> {
    let pipeline = match path {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading --pipeline {}", path.display()))?;
            let parsed = if path.extension().is_some_and(|e| e == "json") {
                serde_json::from_str(&text).map_err(|e| e.to_string()).and_then(qlayer_jobs::Pipeline::from_json)
            } else {
                qlayer_jobs::Pipeline::from_toml(&text)
            };
            let pipeline = parsed.map_err(|e| anyhow::anyhow!("--pipeline {}: {e}", path.display()))?;
            Some(qlayer_jobs::PipelineChoice::Inline(Box::new(pipeline)))
        }
        None => None,
    };
    Ok(pipeline)
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let choice = provider_choice(&args.llm, &args.settings.tenant)?;
    let pipeline = read_pipeline(args.settings.pipeline.as_deref())?;
    // A push's reference and key are checked before anything runs.
    if let Some(reference) = &args.push {
        let parsed = qlayer_registry::parse_reference(reference).map_err(|e| anyhow::anyhow!("--push: {e}"))?;
        if parsed.tag().is_none() || parsed.digest().is_some() {
            anyhow::bail!("--push {reference}: give a tag and no digest, e.g. registry.example.com/capsules/todo:1");
        }
    }
    let signing_key = args.sign.as_deref().map(marketplace::read_key).transpose().context("--sign")?;
    factory::prepare(&args.requirement, &args.out, args.force)?;
    let input = RunInput {
        requirement: args.requirement.clone(),
        provider: None,
        script: None,
        options: args.language.as_ref().map(|language| serde_json::json!({ "language": language })),
        max_repair_rounds: args.settings.max_repair_rounds,
        token_budget: Some(args.settings.token_budget),
        pipeline,
    };
    input.check().map_err(anyhow::Error::msg)?;

    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    tokio.block_on(async {
        let data_dir = args.settings.data_dir.clone().unwrap_or_else(embedded::default_data_dir);
        let runtime = Runtime::new(RuntimeConfig {
            cache_dir: Some(qlayer_runtime::cache_dir(&data_dir)),
            ..Default::default()
        })?;
        let market_args = local_market(&data_dir, args.settings.database.clone(), args.insecure_registry.clone());
        let marketplace = market_args.open().await?;
        // An installed provider is checked before anything runs.
        if let ProviderChoice::Installed { name, tenant } = &choice {
            let install = marketplace.get(tenant, name).await?;
            if install.kind != Kind::Provider {
                anyhow::bail!("installed plugin `{name}` is a {} plugin, not a provider", install.kind);
            }
        }
        println!("qlayer run: {:?}", args.requirement);
        println!("  provider: {}", choice.label());
        let progress = std::sync::Arc::new(progress::Progress::new());
        let run = LocalRun {
            runtime: std::sync::Arc::new(runtime),
            marketplace,
            provider: choice,
            tenant: args.settings.tenant.clone(),
            input,
            gate: if args.approve_all {
                Box::new(|_: &str| Ok(approve_all()))
            } else {
                // The question is asked with the spinners out of the way.
                let progress = progress.clone();
                Box::new(move |gate: &str| progress.suspend(|| ask_at_gate(gate)))
            },
        };
        let finished = local::run(run, &|update| print_update(&progress, update)).await?;
        let report = finished.report;
        let mut pushed = None;
        match &finished.capsule {
            Some(capsule) => {
                let contents = factory::unpack(capsule, &args.out)?;
                if let Some(reference) = &args.push {
                    if report.passed() {
                        let name = run_name(&args.out);
                        let digest = capsule::push(
                            &market_args.open().await?,
                            reference,
                            signing_key.as_ref(),
                            capsule,
                            &contents,
                            &name,
                        )
                        .await?;
                        pushed = Some(format!(
                            "pushed the capsule to {reference}@{digest}{}",
                            if signing_key.is_some() { " (signed)" } else { "" }
                        ));
                    } else {
                        pushed = Some(format!("not pushed to {reference}: the run did not pass"));
                    }
                }
            }
            None => {
                let path = args.out.join(factory::REPORT_FILE);
                std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        for d in report.diagnostics.iter().filter(|d| d.severity != "info") {
            println!("  {} [{}] {} {}", d.severity, d.rule, d.place(), d.message);
        }
        // What was built, checked and spent; the verdict stays the last line.
        for line in run_summary(&report, &args.out) {
            println!("{line}");
        }
        println!(
            "{}: {} — {} files and {} in {} ({} tokens, {:.2}s)",
            report.status,
            report.stop_reason,
            report.files.len(),
            factory::REPORT_FILE,
            args.out.display(),
            report.tokens.total(),
            report.duration_ms as f64 / 1000.0
        );
        if let Some(pushed) = pushed {
            println!("{pushed}");
        }
        Ok(if report.passed() { ExitCode::SUCCESS } else { ExitCode::from(3) })
    })
}

/// A run's progress on standard output, a line per step.
fn print_update(progress: &progress::Progress, update: Update) {
    match update {
        Update::Started { task, attempt } if attempt > 1 => {
            progress.start(&task, &format!("{task} (attempt {attempt})"))
        }
        Update::Started { task, .. } => progress.start(&task, &task),
        Update::Step { task, report: s } => progress.finish(
            &task,
            &format!(
                "  {} {:<24} {}  [{} ms, {} tokens]",
                if s.outcome == "ok" { "✓" } else { "✗" },
                s.step,
                s.summary,
                s.duration_ms,
                s.tokens.total()
            ),
        ),
        Update::Ended { task } => progress.finish_quietly(&task),
        Update::Repair { round, errors } => {
            progress.line(&format!("  ↻ repair round {round}: {errors} error(s) to fix"))
        }
        Update::Failed { task, error } => progress.finish(&task, &format!("  ✗ {task}: {error}")),
    }
}

/// The one-screen summary above a run's status line: what was built, checked and spent.
fn run_summary(report: &factory::RunReport, out: &std::path::Path) -> Vec<String> {
    let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
    for f in &report.files {
        let p = f.path.to_ascii_lowercase();
        let name = p.rsplit('/').next().unwrap_or_default();
        let kind = if p.starts_with("docs/") || name.ends_with(".md") {
            "documents"
        } else if name.starts_with("dockerfile")
            || name.starts_with("compose")
            || name.starts_with("docker-compose")
            || p.starts_with(".github/")
            || p.starts_with("k8s/")
            || p.starts_with("kubernetes/")
            || p.starts_with("deploy/")
        {
            "deployment"
        } else if p.starts_with("tests/")
            || p.contains("/tests/")
            || name.starts_with("test_")
            || name.contains("_test.")
            || name.contains(".test.")
        {
            "tests"
        } else {
            "sources"
        };
        *kinds.entry(kind).or_default() += 1;
    }
    let kinds: Vec<String> = ["sources", "tests", "deployment", "documents"]
        .iter()
        .filter_map(|k| kinds.get(k).map(|n| format!("{n} {k}")))
        .collect();
    let validators: Vec<&str> = report
        .steps
        .iter()
        .filter_map(|s| s.step.strip_prefix("validate: "))
        .map(|v| v.split(' ').next().unwrap_or(v))
        .collect();
    let mut unique: Vec<&str> = Vec::new();
    for v in validators {
        if !unique.contains(&v) {
            unique.push(v);
        }
    }
    let count = |severity: &str| report.diagnostics.iter().filter(|d| d.severity == severity).count();
    let read = match report.unchecked.len() {
        0 => "every file read".to_string(),
        n => format!("{n} file{} read by none", if n == 1 { "" } else { "s" }),
    };
    let agents = report.steps.iter().filter(|s| !s.step.starts_with("validate: ")).count();
    let cost = match (report.cost, &report.currency) {
        (Some(cost), Some(currency)) => format!(", {cost:.4} {currency}"),
        _ => String::new(),
    };
    let mut lines = vec![
        format!(
            "  built    {} files in {}: {} (and {})",
            report.files.len(),
            out.display(),
            if kinds.is_empty() { "none".to_string() } else { kinds.join(", ") },
            factory::REPORT_FILE
        ),
        format!(
            "  checked  {} validator{}{}: {} errors, {} warnings; {read}",
            unique.len(),
            if unique.len() == 1 { "" } else { "s" },
            if unique.is_empty() { String::new() } else { format!(" ({})", unique.join(", ")) },
            count("error"),
            count("warning"),
        ),
    ];
    if let Some(tests) = factory::tests_summary(&report.diagnostics) {
        lines.push(format!(
            "  tests    {} of {} passed in the sandbox{}",
            tests.passed,
            tests.ran,
            if tests.not_run > 0 { format!(", {} not run", tests.not_run) } else { String::new() }
        ));
    }
    lines.push(format!(
        "  spent    {} tokens ({} prompt, {} completion) over {agents} agent step{}{cost}; {} repair round{}; {:.2} s",
        report.tokens.total(),
        report.tokens.prompt,
        report.tokens.completion,
        if agents == 1 { "" } else { "s" },
        report.repair_rounds,
        if report.repair_rounds == 1 { "" } else { "s" },
        report.duration_ms as f64 / 1000.0
    ));
    lines
}

/// The marketplace of a local run: the data dir's, with the database and insecure registries given.
fn local_market(data_dir: &std::path::Path, database: Option<String>, insecure_registry: Vec<String>) -> MarketArgs {
    MarketArgs {
        data_dir: Some(data_dir.to_path_buf()),
        database,
        insecure_registry,
        signature_policy: None,
        trusted_key: vec![],
        network_allow: std::env::var("QLAYER_NETWORK_ALLOW")
            .map(|v| v.split(',').map(|a| a.trim().to_string()).collect())
            .unwrap_or_default(),
    }
}

/// A capsule's title: the name of the directory the run wrote.
fn run_name(out: &std::path::Path) -> String {
    std::path::absolute(out)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "run".into())
}

/// `qlayer eval`: every case of the suite through a scheduler in this process, one after the
/// other, sharing one runtime (plugins compile once); a line per case as it ends, then the table.
fn eval_suite(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let suite = eval::Suite::load(&args.suite)?;
    let choice = provider_choice(&args.llm, &args.settings.tenant)?;
    let pipeline = read_pipeline(args.settings.pipeline.as_deref())?;
    factory::prepare_out(&args.out, args.force)?;
    let mut inputs = Vec::new();
    for case in &suite.cases {
        let language = case.language.as_ref().or(suite.language.as_ref());
        let input = RunInput {
            requirement: case.requirement.clone(),
            provider: None,
            script: None,
            options: language.map(|language| serde_json::json!({ "language": language })),
            max_repair_rounds: args.settings.max_repair_rounds,
            token_budget: Some(args.settings.token_budget),
            pipeline: pipeline.clone(),
        };
        input.check().map_err(|e| anyhow::anyhow!("case `{}`: {e}", case.name))?;
        inputs.push(input);
    }
    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let results = tokio.block_on(async {
        let data_dir = args.settings.data_dir.clone().unwrap_or_else(embedded::default_data_dir);
        let runtime = std::sync::Arc::new(Runtime::new(RuntimeConfig {
            cache_dir: Some(qlayer_runtime::cache_dir(&data_dir)),
            ..Default::default()
        })?);
        let market_args = local_market(&data_dir, args.settings.database.clone(), vec![]);
        if let ProviderChoice::Installed { name, tenant } = &choice {
            let install = market_args.open().await?.get(tenant, name).await?;
            if install.kind != Kind::Provider {
                anyhow::bail!("installed plugin `{name}` is a {} plugin, not a provider", install.kind);
            }
        }
        if !args.json {
            println!("qlayer eval: {} case(s) from {}", suite.cases.len(), args.suite.display());
            println!("  provider: {}", choice.label());
        }
        let mut rows = Vec::new();
        // A spinner per case on a terminal (saying its current step); its line once it ends.
        let progress = progress::Progress::quiet_start();
        for (n, (case, input)) in suite.cases.iter().zip(inputs).enumerate() {
            let out = args.out.join(&case.name);
            factory::prepare(&case.requirement, &out, args.force)?;
            let run = LocalRun {
                runtime: runtime.clone(),
                marketplace: market_args.open().await?,
                provider: choice.clone(),
                tenant: args.settings.tenant.clone(),
                input,
                gate: Box::new(|_: &str| Ok(approve_all())),
            };
            let label = format!("[{}/{}] {}", n + 1, suite.cases.len(), case.name);
            if !args.json {
                progress.start(&case.name, &label);
            }
            let on = |update: Update| {
                if let (false, Update::Started { task, .. }) = (args.json, &update) {
                    progress.message(&case.name, &format!("{label}: {task}"));
                }
            };
            let finished = local::run(run, &on).await.with_context(|| format!("case `{}`", case.name))?;
            match &finished.capsule {
                Some(capsule) => {
                    factory::unpack(capsule, &out)?;
                }
                None => {
                    let path = out.join(factory::REPORT_FILE);
                    std::fs::write(&path, serde_json::to_vec_pretty(&finished.report)?)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
            }
            let row = eval::CaseResult::of(&case.name, &finished.report);
            if !args.json {
                progress.finish(
                    &case.name,
                    &format!(
                        "  [{}/{}] {}: {} — {} ({:.1}s)",
                        n + 1,
                        suite.cases.len(),
                        case.name,
                        row.status,
                        row.stop_reason,
                        row.duration_ms as f64 / 1000.0
                    ),
                );
            }
            rows.push(row);
        }
        Ok(eval::Results::new(choice.label(), rows))
    })?;
    let json = serde_json::to_string_pretty(&results)?;
    let path = args.out.join("eval.json");
    std::fs::write(&path, &json).with_context(|| format!("writing {}", path.display()))?;
    if args.json {
        println!("{json}");
    } else {
        print!("\n{}", results.table());
        println!("projects and eval.json in {}", args.out.display());
    }
    Ok(if results.all_passed() { ExitCode::SUCCESS } else { ExitCode::from(3) })
}

/// `--approve-all`'s decision.
fn approve_all() -> qlayer_jobs::GateDecision {
    qlayer_jobs::GateDecision { approved: true, comment: Some("--approve-all".into()), by: Some("cli".into()) }
}

/// Asks on the terminal at an approval gate: `y` approves; `n` and a comment rejects (the comment
/// goes back to the gated step). Standard input closed is an error that says what to do.
fn ask_at_gate(gate: &str) -> anyhow::Result<qlayer_jobs::GateDecision> {
    use std::io::{BufRead as _, Write as _};
    let (base, round) = qlayer_factory::pipeline::split_round(gate);
    let step = base.strip_prefix(qlayer_factory::pipeline::GATE_PREFIX).unwrap_or(base);
    let mut lines = std::io::stdin().lock();
    let mut read = |prompt: &str| -> anyhow::Result<String> {
        print!("{prompt}");
        std::io::stdout().flush()?;
        let mut line = String::new();
        if lines.read_line(&mut line)? == 0 {
            anyhow::bail!(
                "the run waits at the gate after `{step}` and standard input is closed: answer on a terminal, or pass --approve-all"
            );
        }
        Ok(line.trim().to_string())
    };
    let repair = if round > 0 { format!(" (repair {round})") } else { String::new() };
    println!("  ⏸ gate after `{step}`{repair}: its files are done and checked.");
    loop {
        let answer = read("  approve? [y]es, or [n]o and why: ")?;
        let (first, rest) = answer.split_once([' ', ':', ',']).unwrap_or((answer.as_str(), ""));
        match first.to_lowercase().as_str() {
            "y" | "yes" => {
                return Ok(qlayer_jobs::GateDecision { approved: true, comment: None, by: Some("cli".into()) });
            }
            "n" | "no" => {
                let mut comment = rest.trim_start_matches([':', ',', ' ']).to_string();
                while comment.trim().is_empty() {
                    comment = read("  why? (this goes back to the step): ")?;
                }
                return Ok(qlayer_jobs::GateDecision {
                    approved: false,
                    comment: Some(comment),
                    by: Some("cli".into()),
                });
            }
            _ => {}
        }
    }
}

fn plugin(cmd: PluginCommand) -> anyhow::Result<()> {
    match cmd {
        PluginCommand::Push { .. }
        | PluginCommand::Search { .. }
        | PluginCommand::Info { .. }
        | PluginCommand::Install { .. }
        | PluginCommand::List { .. }
        | PluginCommand::Upgrade { .. }
        | PluginCommand::Remove { .. }
        | PluginCommand::Call { .. } => {
            let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            return tokio.block_on(market(cmd));
        }
        PluginCommand::Keygen { prefix } => {
            let (private, public) = marketplace::keygen(&prefix)?;
            println!("private key: {} (keep it secret; pass it to `qlayer plugin push --sign`)", private.display());
            println!(
                "public key:  {} (operators trust it with --trusted-key or <data dir>/trusted-keys/)",
                public.display()
            );
        }
        PluginCommand::New { kind, name, dir, lang, sdk } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            let sdk = sdk.unwrap_or_else(|| PathBuf::from(embedded::bundled::SDK_PATH));
            scaffold::new_plugin(kind, &name, &dir, lang, &sdk)?;
            println!("created {kind} plugin `{name}` in {} ({})", dir.display(), lang.name());
            println!("build it with: qlayer plugin build {}", dir.display());
        }
        PluginCommand::Build { dir, out } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from("."));
            // The language's toolchain shows its own progress on the terminal (a spinner over
            // it would garble it); this line says what runs.
            eprintln!("building the plugin in {} (the toolchain's own progress follows)", dir.display());
            let path = scaffold::build_plugin(&dir, out.as_deref())?;
            let info = scaffold::inspect(&path)?;
            println!("built {} ({} bytes, {})", path.display(), info.size, info.digest);
        }
        PluginCommand::Pack { component, manifest, out } => {
            let path = scaffold::pack_file(&component, &manifest, out.as_deref())?;
            let info = scaffold::inspect(&path)?;
            println!(
                "packed {} ({} plugin `{}` {}, {} bytes, {})",
                path.display(),
                info.manifest.kind,
                info.manifest.name,
                info.manifest.version,
                info.size,
                info.digest
            );
        }
        PluginCommand::Inspect { file, json } => {
            let info = scaffold::inspect(&file)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                let m = &info.manifest;
                println!("{} {} ({} plugin, world {})", m.name, m.version, m.kind, info.world);
                println!("  {}", m.description);
                println!("  digest:  {}  ({} bytes)", info.digest, info.size);
                println!(
                    "  asks for: outbound hosts [{}], config [{}], secrets [{}]",
                    m.capabilities.outbound_hosts.join(", "),
                    m.capabilities.config.join(", "),
                    m.capabilities.secrets.join(", ")
                );
                println!(
                    "  limits:  memory {} MiB, timeout {} ms",
                    m.limits.memory_mb.map(|v| v.to_string()).unwrap_or_else(|| "default".into()),
                    m.limits.timeout_ms.map(|v| v.to_string()).unwrap_or_else(|| "default".into())
                );
                println!("  loads:   {}", info.load_error.as_deref().unwrap_or("yes"));
                println!("  imports: {}", info.imports.join(", "));
                println!("  exports: {}", info.exports.join(", "));
            }
            if info.load_error.is_some() {
                anyhow::bail!("the host would refuse this component");
            }
        }
    }
    Ok(())
}

fn print_manifest(m: &qlayer_runtime::Manifest) {
    println!("{} {} ({} plugin, {} format)", m.name, m.version, m.kind, m.format);
    println!("  {}", m.description);
    let list = |v: &[String]| if v.is_empty() { "none".to_string() } else { v.join(", ") };
    println!(
        "  asks for: outbound hosts [{}], config [{}], secrets [{}]",
        list(&m.capabilities.outbound_hosts),
        list(&m.capabilities.config),
        list(&m.capabilities.secrets)
    );
}

async fn market(cmd: PluginCommand) -> anyhow::Result<()> {
    match cmd {
        PluginCommand::Push { file, reference, sign, market } => {
            let wasm = match file.strip_prefix("bundled:") {
                Some(name) => embedded::bundled_plugin(name)
                    .with_context(|| {
                        let names: Vec<&str> = embedded::bundled::PLUGINS.iter().map(|(n, _)| *n).collect();
                        format!("no bundled plugin `{name}` (this build has: {})", names.join(", "))
                    })?
                    .to_vec(),
                None => std::fs::read(&file).with_context(|| format!("reading {file}"))?,
            };
            let key = sign.as_deref().map(marketplace::read_key).transpose()?;
            let progress = progress::Progress::quiet_start();
            progress.start("push", &format!("pushing to {reference}"));
            let digest = async { market.open().await?.push(&wasm, &reference, key.as_ref()).await }.await;
            progress.finish_quietly("push");
            let digest = digest?;
            println!("pushed {reference}@{digest}{}", if key.is_some() { " (signed)" } else { "" });
        }
        PluginCommand::Search { registry, text, json, market } => {
            let registry = registry
                .or_else(|| std::env::var("QLAYER_REGISTRY").ok())
                .context("give a registry (host[:port]) or set QLAYER_REGISTRY")?;
            let entries = market.open().await?.search(&registry, text.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else if entries.is_empty() {
                println!(
                    "no plugins found in {registry}{}",
                    text.map(|t| format!(" matching `{t}`")).unwrap_or_default()
                );
            } else {
                for e in entries {
                    if let Some(m) = &e.latest {
                        println!(
                            "{}:{}  {} {} ({}, {})",
                            e.repository,
                            e.latest_tag.as_deref().unwrap_or(""),
                            m.name,
                            m.version,
                            m.kind,
                            m.format
                        );
                        println!("    {}", m.description);
                        println!("    tags: {}", e.tags.join(", "));
                    }
                }
            }
        }
        PluginCommand::Info { reference, market } => {
            let info = market.open().await?.info(&reference).await?;
            print_manifest(&info.resolved.manifest);
            println!("  digest:    {}", info.resolved.digest);
            println!("  binary:    {} ({} bytes)", info.resolved.layer.digest, info.resolved.layer.size);
            println!("  signature: {}", info.verification);
        }
        PluginCommand::Install { reference, tenant, grant, market } => {
            let grants = GrantSpec::parse(&grant)?;
            let progress = progress::Progress::quiet_start();
            progress.start("install", &format!("installing {reference}: pull, verify, compile"));
            let outcome =
                async { market.open().await?.install(&market.runtime()?, &reference, &tenant, &grants).await }.await;
            progress.finish_quietly("install");
            let outcome = outcome?;
            print_manifest(&outcome.manifest);
            if let Some(w) = &outcome.warning {
                eprintln!("warning: {w}");
            }
            let i = &outcome.install;
            println!("installed {} {} for tenant `{}`, pinned to {}", i.name, i.version, i.tenant, i.pinned());
            println!("  signature: {}", i.signature);
            let unset = i.grants.not_granted(&outcome.manifest);
            if !unset.is_empty() {
                println!("  not granted (the plugin does without): {}", unset.join(" "));
            }
            println!(
                "  granted: hosts [{}], config [{}], secrets [{}]",
                i.grants.hosts.join(", "),
                i.grants.config.keys().cloned().collect::<Vec<_>>().join(", "),
                i.grants.secrets.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        PluginCommand::List { tenant, json, market } => {
            let installs = market.open().await?.list(&tenant).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&installs)?);
            } else if installs.is_empty() {
                println!("no plugins installed for tenant `{tenant}`");
            } else {
                for i in installs {
                    println!("{} {} ({}, {})  {}", i.name, i.version, i.kind, i.format, i.pinned());
                }
            }
        }
        PluginCommand::Upgrade { name, tenant, grant, market } => {
            let grants = GrantSpec::parse(&grant)?;
            let progress = progress::Progress::quiet_start();
            progress.start("upgrade", &format!("upgrading {name}: newer tags, pull, verify, compile"));
            let upgraded =
                async { market.open().await?.upgrade(&market.runtime()?, &tenant, &name, &grants).await }.await;
            progress.finish_quietly("upgrade");
            match upgraded? {
                Some(outcome) => {
                    if let Some(w) = &outcome.warning {
                        eprintln!("warning: {w}");
                    }
                    let i = &outcome.install;
                    println!(
                        "upgraded {} {} → {} for tenant `{}`, pinned to {}",
                        i.name,
                        outcome.replaced.as_deref().unwrap_or("?"),
                        i.version,
                        i.tenant,
                        i.pinned()
                    );
                }
                None => println!("{name} is already the newest version for tenant `{tenant}`"),
            }
        }
        PluginCommand::Remove { name, tenant, market } => {
            let removed = market.open().await?.remove(&tenant, &name).await?;
            println!("removed {} {} for tenant `{}`", removed.name, removed.version, removed.tenant);
        }
        PluginCommand::Call { name, input, tenant, market } => {
            let runtime = std::sync::Arc::new(market.runtime()?);
            let output = local::call(runtime, market.open().await?, &tenant, &name, &input).await?;
            match output.read::<String>() {
                Ok(text) => println!("{text}"),
                Err(_) => println!("{output}"),
            }
        }
        _ => anyhow::bail!("not a marketplace command"),
    }
    Ok(())
}
