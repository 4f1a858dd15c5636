//! The first-party plugins, built for wasm by this crate's build script and baked in, and the
//! embedded default.
//! May depend on: `qlayer-runtime`, `qlayer-marketplace` (its build script: `qlayer-manifest`).
//!
//! The embedded default: the first-party plugins baked into this binary, installed for a local
//! tenant with exactly the grants a run needs. No server, no config files.

use anyhow::{Context as _, bail};
use qlayer_runtime::{Grants, HostPattern, Installed, Runtime, Secret};
use std::path::PathBuf;

/// The tenant used by local CLI runs.
pub const LOCAL_TENANT: &str = "local";

/// The first-party plugins baked in by the build script.
pub mod bundled {
    include!(concat!(env!("OUT_DIR"), "/bundled.rs"));
}

/// The bundled agent plugins: the roles a pipeline step may name without `installed:`.
pub const AGENTS: &[&str] = &["product-manager", "architect", "developer", "qa-engineer", "reviewer", "devops"];
/// The bundled validator plugins.
pub const VALIDATORS: &[&str] = &["syntax", "tests", "secrets", "deps", "hap"];

/// The baked-in component of a first-party plugin, by manifest name.
pub fn bundled_plugin(name: &str) -> Option<&'static [u8]> {
    bundled::PLUGINS.iter().find(|(n, _)| *n == name).map(|(_, wasm)| *wasm)
}

/// Which model provider a run uses.
#[derive(Debug, Clone)]
pub enum ProviderChoice {
    /// The offline test double.
    Scripted {
        /// A script (JSON) to answer from instead of the built-in rules.
        script: Option<String>,
    },
    /// Any OpenAI-compatible endpoint.
    OpenAi {
        /// e.g. `http://127.0.0.1:11434/v1` for Ollama.
        base_url: String,
        /// The model to ask for.
        model: Option<String>,
        /// Sent as a bearer token when set.
        api_key: Option<Secret>,
    },
    /// A provider installed from a registry (`qlayer plugin install`), with its recorded grants.
    Installed {
        /// The installed plugin's name.
        name: String,
        /// The tenant it is installed for.
        tenant: String,
    },
}

impl ProviderChoice {
    /// Parses `--provider` with its options.
    pub fn from_flags(
        provider: &str,
        base_url: Option<String>,
        model: Option<String>,
        api_key: Option<String>,
        script: Option<String>,
    ) -> anyhow::Result<Self> {
        match provider {
            "scripted" => {
                if base_url.is_some() {
                    bail!("--base-url is for --provider openai; the scripted provider is offline");
                }
                Ok(ProviderChoice::Scripted { script })
            }
            "openai" => {
                if script.is_some() {
                    bail!("--script is for --provider scripted");
                }
                let base_url = base_url.unwrap_or_else(|| "https://api.openai.com/v1".into());
                let parsed =
                    url::Url::parse(&base_url).with_context(|| format!("--base-url `{base_url}` is not a URL"))?;
                if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                    bail!("--base-url `{base_url}` must be an http:// or https:// URL with a host");
                }
                Ok(ProviderChoice::OpenAi {
                    base_url,
                    model,
                    api_key: api_key.filter(|k| !k.is_empty()).map(Secret::new),
                })
            }
            other => bail!(
                "unknown provider `{other}`: expected `scripted` (offline test double) or `openai` (any OpenAI-compatible endpoint)"
            ),
        }
    }

    /// A name for reports.
    pub fn label(&self) -> String {
        match self {
            ProviderChoice::Scripted { script: None } => "scripted (built-in rules; offline test double)".into(),
            ProviderChoice::Scripted { script: Some(_) } => "scripted (script; offline test double)".into(),
            ProviderChoice::OpenAi { base_url, model, .. } => {
                format!("openai at {base_url}{}", model.as_ref().map(|m| format!(" ({m})")).unwrap_or_default())
            }
            ProviderChoice::Installed { name, tenant, .. } => format!("installed plugin `{name}` (tenant `{tenant}`)"),
        }
    }
}

/// Where compiled components are cached: `$QLAYER_DATA_DIR/cache`, else the user's data dir.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("QLAYER_DATA_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(dir).join("qlayer");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/qlayer"),
        None => std::env::temp_dir().join("qlayer"),
    }
}

fn install_bundled(runtime: &Runtime, name: &str, grants: Grants) -> anyhow::Result<Installed> {
    let wasm = bundled_plugin(name).with_context(|| format!("the first-party plugin `{name}` is not in this build"))?;
    let plugin = runtime.load(wasm).with_context(|| format!("loading the bundled `{name}` plugin"))?;
    Ok(plugin.install(grants)?)
}

impl ProviderChoice {
    /// For a bundled provider: its name and exactly the grants it needs (the scripted provider its
    /// script; the openai provider its base URL's host, model and key). `None` for an installed one.
    pub fn bundled_grants(&self) -> anyhow::Result<Option<(&'static str, Grants)>> {
        let mut grants = Grants::default();
        match self {
            ProviderChoice::Scripted { script } => {
                if let Some(script) = script {
                    grants.config.insert("script".into(), script.clone());
                }
                Ok(Some(("scripted", grants)))
            }
            ProviderChoice::OpenAi { base_url, model, api_key } => {
                let url = url::Url::parse(base_url)?;
                let host = url.host_str().context("the base URL has no host")?;
                let host = match url.port() {
                    Some(port) => format!("{host}:{port}"),
                    None => host.to_string(),
                };
                grants.outbound_hosts.push(HostPattern::parse(&host).map_err(anyhow::Error::msg)?);
                grants.config.insert("base_url".into(), base_url.clone());
                if let Some(model) = model {
                    grants.config.insert("model".into(), model.clone());
                }
                if let Some(key) = api_key {
                    grants.secrets.insert("api_key".into(), key.clone());
                }
                Ok(Some(("openai", grants)))
            }
            ProviderChoice::Installed { .. } => Ok(None),
        }
    }
}

/// Installs the provider for `choice`, granting only what it needs (see
/// [`ProviderChoice::bundled_grants`]). An installed provider is loaded from `market`.
pub async fn install_provider(
    runtime: &Runtime,
    choice: &ProviderChoice,
    market: Option<&qlayer_marketplace::Marketplace>,
) -> anyhow::Result<Installed> {
    let ProviderChoice::Installed { name, tenant } = choice else {
        let (bundled, grants) = choice.bundled_grants()?.context("a bundled provider has grants")?;
        return install_bundled(runtime, bundled, grants);
    };
    let market = market.context("an installed provider needs the marketplace it is installed in")?;
    let installed = market.load(runtime, tenant, name).await?;
    let kind = installed.plugin().manifest().kind;
    if kind != qlayer_runtime::Kind::Provider {
        bail!("installed plugin `{name}` is a {kind} plugin, not a provider");
    }
    Ok(installed)
}
