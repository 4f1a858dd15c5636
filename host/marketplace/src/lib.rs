//! Installs from OCI registries per tenant: grants, signature policy, the blob store.
//! May depend on: `qlayer-runtime`, `qlayer-db`, `qlayer-registry`, `qlayer-manifest`.
//!
//! The marketplace: plugins published to OCI registries and installed per tenant.
//!
//! - **Publish**: `push` sends a plugin in the wasm artifact layout and, with a key, attaches a
//!   cosign-format signature over the manifest digest.
//! - **Install** resolves a reference to a digest, shows what the plugin asks for, refuses it
//!   unless the network it asks for is granted (config keys and secrets it may go without),
//!   checks its signature under the tenant's policy,
//!   streams the binary into the content-addressed store (verified), checks the host can load it,
//!   and records the install pinned to that digest with exactly the grants given.
//! - **Load** needs no registry: the binary comes from the local store, re-verified, and the
//!   compiled code from the compile cache.
//! - **Upgrade** moves an install to the highest semantic-version tag above it (or, for an install
//!   from a non-version tag such as `latest`, to where that tag points now), with the same grants.
//!
//! Install records live in the database (every node sharing it sees the same installs), blobs in
//! `<data dir>/store` (a node pulls a blob it lacks from the registry by its pinned digest), the
//! operator's settings in `<data dir>/marketplace.toml`. Another tenant's install is reported exactly like a
//! missing one.

use anyhow::{Context as _, bail};
use qlayer_db::Db;
use qlayer_registry::{
    BlobStore, CatalogEntry, Credentials, PrivateKey, PublicKey, Reference, Registry, RegistryConfig, RegistryError,
    Resolved, SignaturePolicy, Verification, parse_reference,
};
use qlayer_runtime::{Format, Grants, HostPattern, Installed, Kind, Manifest, Runtime, Secret};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The operator's marketplace settings (`<data dir>/marketplace.toml`). Unknown keys are errors.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MarketplaceConfig {
    /// Registries (`host:port`) that may be used over plain HTTP.
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// What to do with an unsigned or badly signed plugin, unless a tenant says otherwise.
    #[serde(default)]
    pub signature_policy: SignaturePolicy,
    /// Public keys (SPKI PEM files) of trusted publishers. `<data dir>/trusted-keys/*.pub` are
    /// trusted too.
    #[serde(default)]
    pub trusted_keys: Vec<PathBuf>,
    /// docker's `config.json` to read registry credentials from (default: `$DOCKER_CONFIG` or
    /// `~/.docker/config.json`).
    #[serde(default)]
    pub docker_config: Option<PathBuf>,
    /// Per-tenant settings.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    /// The operator's network policy for the registry client (the service sets it, not the
    /// file): when set, every connection the client makes (to a registry, its token realm, a
    /// redirected blob download) goes through an egress proxy that checks the destination's
    /// addresses when it connects. `None` (the operator's own CLI): unchecked.
    #[serde(skip)]
    pub egress: Option<qlayer_runtime::NetworkPolicy>,
}

/// Settings for one tenant.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TenantConfig {
    /// This tenant's signature policy.
    pub signature_policy: Option<SignaturePolicy>,
    /// Environment variables of the host this tenant may name in `secret` grants through the
    /// service's API (a tenant must not read the host's other secrets into its plugins).
    #[serde(default)]
    pub secret_env: Vec<String>,
}

impl MarketplaceConfig {
    /// Reads `<data dir>/marketplace.toml`, or the defaults when there is none.
    pub fn load(data_dir: &Path) -> anyhow::Result<Self> {
        let path = data_dir.join("marketplace.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The environment variables `tenant` may name in secret grants through the API.
    pub fn secret_env_for(&self, tenant: &str) -> Vec<String> {
        self.tenants.get(tenant).map(|t| t.secret_env.clone()).unwrap_or_default()
    }

    /// The policy in force for `tenant`.
    pub fn policy_for(&self, tenant: &str) -> SignaturePolicy {
        self.tenants.get(tenant).and_then(|t| t.signature_policy).unwrap_or(self.signature_policy)
    }
}

/// What an operator grants at install, as given on the command line:
/// `host:<host[:port]>`, `config:<key>=<value>`, `secret:<key>=<ENV_VAR>` (the secret is read
/// from that environment variable each time the plugin loads; its value is never stored).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantSpec {
    /// Outbound hosts.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Config values.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Secret key → environment variable holding it.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
}

impl GrantSpec {
    /// Parses `--grant` values.
    pub fn parse(items: &[String]) -> anyhow::Result<Self> {
        let mut spec = GrantSpec::default();
        for item in items {
            let bad = || {
                anyhow::anyhow!(
                    "--grant `{item}`: expected host:<host[:port]>, config:<key>=<value> or secret:<key>=<ENV_VAR>"
                )
            };
            let (what, rest) = item.split_once(':').ok_or_else(bad)?;
            match what {
                "host" => {
                    HostPattern::parse(rest).map_err(|e| anyhow::anyhow!("--grant `{item}`: {e}"))?;
                    spec.hosts.push(rest.to_string());
                }
                "config" => {
                    let (k, v) = rest.split_once('=').ok_or_else(bad)?;
                    spec.config.insert(k.to_string(), v.to_string());
                }
                "secret" => {
                    let (k, var) = rest.split_once('=').ok_or_else(bad)?;
                    if var.is_empty() {
                        return Err(bad());
                    }
                    spec.secrets.insert(k.to_string(), var.to_string());
                }
                _ => return Err(bad()),
            }
        }
        Ok(spec)
    }

    fn merge(&mut self, other: &GrantSpec) {
        for h in &other.hosts {
            if !self.hosts.contains(h) {
                self.hosts.push(h.clone());
            }
        }
        self.config.extend(other.config.clone());
        self.secrets.extend(other.secrets.clone());
    }

    /// The network access `manifest` asks for that this spec does not grant, as the `--grant`
    /// flags to pass. A plugin that asks for hosts gets none unless the operator names them, so
    /// such an install stops here. (Config keys and secrets are values the plugin reads when
    /// present and does without otherwise, e.g. no API key for a local Ollama; see
    /// [`GrantSpec::not_granted`].)
    pub fn missing(&self, manifest: &Manifest) -> Vec<String> {
        let caps = &manifest.capabilities;
        if caps.outbound_hosts.is_empty() || !self.hosts.is_empty() {
            return Vec::new();
        }
        caps.outbound_hosts
            .iter()
            .map(
                |asked| {
                    if asked == "*" { "--grant host:<host[:port]>".into() } else { format!("--grant host:{asked}") }
                },
            )
            .collect()
    }

    /// Config keys and secrets `manifest` asks for that this spec leaves unset, as the flags that
    /// would set them.
    pub fn not_granted(&self, manifest: &Manifest) -> Vec<String> {
        let caps = &manifest.capabilities;
        let config =
            caps.config.iter().filter(|k| !self.config.contains_key(*k)).map(|k| format!("--grant config:{k}=<value>"));
        let secrets = caps
            .secrets
            .iter()
            .filter(|k| !self.secrets.contains_key(*k))
            .map(|k| format!("--grant secret:{k}=<ENV_VAR>"));
        config.chain(secrets).collect()
    }

    /// The grants, with secrets read from their environment variables.
    pub fn to_grants(&self) -> anyhow::Result<Grants> {
        let mut grants = Grants::default();
        for h in &self.hosts {
            grants.outbound_hosts.push(HostPattern::parse(h).map_err(anyhow::Error::msg)?);
        }
        grants.config = self.config.clone();
        for (key, var) in &self.secrets {
            let value = std::env::var(var).with_context(|| {
                format!("secret `{key}` is granted from the environment variable {var}, which is not set")
            })?;
            grants.secrets.insert(key.clone(), Secret::new(value));
        }
        Ok(grants)
    }
}

/// One plugin installed for one tenant, pinned by digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Install {
    /// The tenant.
    pub tenant: String,
    /// The plugin's name (from its manifest).
    pub name: String,
    /// Its version.
    pub version: String,
    /// Its kind.
    pub kind: Kind,
    /// Component or Extism.
    pub format: Format,
    /// `registry/repository` it came from.
    pub repository: String,
    /// The tag it was installed from, if any.
    pub tag: Option<String>,
    /// The OCI manifest digest it is pinned to.
    pub digest: String,
    /// The digest of the plugin binary in the local store.
    pub blob: String,
    /// The binary's size.
    pub size: u64,
    /// What was granted.
    pub grants: GrantSpec,
    /// What the signature check found.
    pub signature: String,
    /// Seconds since the Unix epoch.
    pub installed_at: u64,
}

impl Install {
    /// `registry/repository@digest`.
    pub fn pinned(&self) -> String {
        format!("{}@{}", self.repository, self.digest)
    }
}

/// Why an install was refused before anything was stored.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// Capabilities were asked for and not granted.
    #[error("plugin `{plugin}` asks for capabilities that were not granted; to install it, pass: {}", missing.join(" "))]
    NotGranted {
        /// The plugin.
        plugin: String,
        /// The flags to pass.
        missing: Vec<String>,
    },
    /// The signature policy refused it.
    #[error("refused {reference}: {verification} (signature policy `require` for tenant `{tenant}`)")]
    Signature {
        /// The reference.
        reference: String,
        /// The tenant.
        tenant: String,
        /// What the check found.
        verification: Verification,
    },
    /// Already installed.
    #[error(
        "plugin `{name}` is already installed for tenant `{tenant}` ({pinned}); use `qlayer plugin upgrade {name}` or remove it first"
    )]
    AlreadyInstalled {
        /// The plugin.
        name: String,
        /// The tenant.
        tenant: String,
        /// What is installed.
        pinned: String,
    },
    /// The reference's registry is an address the operator's network policy refuses.
    #[error("registry `{registry}` cannot be used: {reason}")]
    NetworkPolicy {
        /// The registry (`host[:port]`).
        registry: String,
        /// Why.
        reason: String,
    },
    /// Not installed (or installed only for another tenant: they look the same).
    #[error("plugin `{name}` is not installed for tenant `{tenant}`")]
    NotInstalled {
        /// The plugin.
        name: String,
        /// The tenant.
        tenant: String,
    },
}

/// What an install or upgrade did.
#[derive(Debug, Clone)]
pub struct InstallOutcome {
    /// The record written.
    pub install: Install,
    /// The manifest of what was installed (what it asks for).
    pub manifest: Manifest,
    /// The signature check.
    pub verification: Option<Verification>,
    /// A warning to show (policy `warn` and a signature that did not verify).
    pub warning: Option<String>,
    /// For an upgrade: the version it replaced.
    pub replaced: Option<String>,
}

/// A capsule pulled from a registry, with its signature check.
#[derive(Debug, Clone)]
pub struct PulledCapsuleOutcome {
    /// The capsule, its blobs checked against their digests.
    pub capsule: qlayer_registry::PulledCapsule,
    /// The signature check (none under policy `off`).
    pub verification: Option<Verification>,
    /// A warning to show (policy `warn` and a signature that did not verify).
    pub warning: Option<String>,
}

/// What `info` shows about a reference.
#[derive(Debug, Clone)]
pub struct Info {
    /// The resolved artifact.
    pub resolved: Resolved,
    /// The signature check against the trusted keys.
    pub verification: Verification,
}

/// The marketplace over one data directory.
pub struct Marketplace {
    data_dir: PathBuf,
    config: MarketplaceConfig,
    registry: Registry,
    store: BlobStore,
    keys: Vec<PublicKey>,
    db: Db,
    /// The registry client's egress proxy, when `config.egress` is set; stops with the marketplace.
    _egress: Option<qlayer_runtime::egress::EgressProxy>,
}

impl std::fmt::Debug for Marketplace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Marketplace").field("data_dir", &self.data_dir).finish()
    }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Marketplace {
    /// Opens the marketplace in `data_dir` with `config` (see [`MarketplaceConfig::load`]),
    /// keeping its install records in `db`. Records left in `<data dir>/installs.json` by an
    /// earlier version are moved into `db` (the file is renamed `installs.json.imported`).
    pub async fn open(data_dir: impl Into<PathBuf>, config: MarketplaceConfig, db: Db) -> anyhow::Result<Self> {
        let data_dir = data_dir.into();
        let mut keys = Vec::new();
        for path in &config.trusted_keys {
            keys.push(PublicKey::from_file(path).map_err(anyhow::Error::msg)?);
        }
        if let Ok(entries) = std::fs::read_dir(data_dir.join("trusted-keys")) {
            let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
            paths.sort();
            for path in paths.into_iter().filter(|p| p.extension().is_some_and(|e| e == "pub")) {
                keys.push(PublicKey::from_file(&path).map_err(anyhow::Error::msg)?);
            }
        }
        let egress = match &config.egress {
            Some(policy) => Some(
                qlayer_runtime::egress::EgressProxy::start(policy.clone(), config.insecure_registries.clone())
                    .await
                    .context("starting the registry client's egress proxy")?,
            ),
            None => None,
        };
        let registry = Registry::new(RegistryConfig {
            insecure: config.insecure_registries.clone(),
            credentials: Credentials { docker_config: config.docker_config.clone() },
            max_blob_bytes: None,
            proxy: egress.as_ref().map(qlayer_runtime::egress::EgressProxy::url),
        });
        let market = Marketplace {
            store: BlobStore::new(data_dir.join("store")),
            data_dir,
            config,
            registry,
            keys,
            db,
            _egress: egress,
        };
        market.import_legacy_records().await?;
        Ok(market)
    }

    /// Opens the marketplace with its records in the data directory's own database
    /// (`<data dir>/qlayer.db`, the one `qlayer serve` uses by default).
    pub async fn open_local(data_dir: impl Into<PathBuf>, config: MarketplaceConfig) -> anyhow::Result<Self> {
        let data_dir = data_dir.into();
        std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
        let db = Db::open_sqlite(&data_dir.join("qlayer.db")).await?;
        Marketplace::open(data_dir, config, db).await
    }

    /// The registry client.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The local blob store.
    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    /// The settings in force.
    pub fn config(&self) -> &MarketplaceConfig {
        &self.config
    }

    /// Checks, for an install a tenant asked for, that `reference`'s registry is one the host
    /// may connect to on its behalf: listed by the operator (`insecure-registries`), or passing
    /// the runtime's network policy on every address it resolves to. Without this a tenant could
    /// make the host connect to any internal port and tell open from closed ones by the error.
    pub async fn check_registry(&self, runtime: &Runtime, reference: &str) -> anyhow::Result<()> {
        let reference = parse_reference(reference)?;
        let registry = reference.resolve_registry().to_string();
        if self.config.insecure_registries.iter().any(|r| r.eq_ignore_ascii_case(&registry)) {
            return Ok(());
        }
        // `host`, `host:port`, `[v6]` or `[v6]:port`; registries speak HTTPS unless listed.
        let (host, port) = match registry.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') || host.ends_with(']') => {
                (host.to_string(), port.parse::<u16>().unwrap_or(443))
            }
            _ => (registry.clone(), 443),
        };
        match runtime.network().resolve(&host, port).await {
            Ok(_) => Ok(()),
            Err(qlayer_runtime::network::ResolveError::Refused(refused)) => {
                Err(InstallError::NetworkPolicy { registry, reason: refused.to_string() }.into())
            }
            // A name that does not resolve fails the same way when pulling; say it here.
            Err(e) => Err(RegistryError::Transport(format!("registry `{registry}`: {e}")).into()),
        }
    }

    /// Moves the records of `<data dir>/installs.json` (where versions before the records moved
    /// to the database kept them) into the database, keeping any the database already has.
    async fn import_legacy_records(&self) -> anyhow::Result<()> {
        let path = self.data_dir.join("installs.json");
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Legacy {
            installs: Vec<Install>,
        }
        let legacy: Legacy = serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?;
        for install in &legacy.installs {
            self.db.insert_install(&install.tenant, &install.name, &install.blob, &record_of(install)?).await?;
        }
        let moved = self.data_dir.join("installs.json.imported");
        std::fs::rename(&path, &moved).with_context(|| format!("renaming {}", path.display()))?;
        tracing::info!(records = legacy.installs.len(), from = %path.display(), "imported install records into the database");
        Ok(())
    }

    /// The stored record of `tenant`'s install `name`, with its text (an upgrade replaces
    /// exactly that text, so a concurrent change is noticed).
    async fn stored(&self, tenant: &str, name: &str) -> anyhow::Result<Option<(Install, String)>> {
        match self.db.install(tenant, name).await? {
            Some(text) => Ok(Some((parse_record(&text)?, text))),
            None => Ok(None),
        }
    }

    /// Pushes a plugin binary to `reference` and, with `key`, signs it. Returns the digest.
    pub async fn push(&self, wasm: &[u8], reference: &str, key: Option<&PrivateKey>) -> anyhow::Result<String> {
        let reference = parse_reference(reference)?;
        let digest = self.registry.push(&reference, wasm).await?;
        if let Some(key) = key {
            self.registry.sign(&reference, &digest, key).await?;
        }
        Ok(digest)
    }

    /// Pushes a run's capsule (its report and its files' tar.gz; see
    /// [`qlayer_registry::capsule`]) to `reference` and, with `key`, signs it. Returns the
    /// manifest digest.
    pub async fn push_capsule(
        &self,
        reference: &str,
        report: &[u8],
        files: &[u8],
        annotations: BTreeMap<String, String>,
        key: Option<&PrivateKey>,
    ) -> anyhow::Result<String> {
        let reference = parse_reference(reference)?;
        let digest = self.registry.push_capsule(&reference, report, files, annotations).await?;
        if let Some(key) = key {
            self.registry.sign(&reference, &digest, key).await?;
        }
        Ok(digest)
    }

    /// Pulls the capsule at `reference` (every blob checked against its digest) and checks its
    /// signature with the trusted keys under `policy`: `require` refuses one no trusted key
    /// signed; `warn` returns it with a warning that says why.
    pub async fn pull_capsule(&self, reference: &str, policy: SignaturePolicy) -> anyhow::Result<PulledCapsuleOutcome> {
        let parsed = parse_reference(reference)?;
        let capsule = self.registry.pull_capsule(&parsed).await?;
        let verification = match policy {
            SignaturePolicy::Off => None,
            _ => Some(self.registry.verify_capsule(&capsule, &self.keys).await?),
        };
        let warning = under_policy(policy, verification.as_ref(), &format!("the capsule {reference}"), "accepted")
            .map_err(|v| anyhow::anyhow!("refused the capsule {reference}: {v} (signature policy `require`)"))?;
        Ok(PulledCapsuleOutcome { capsule, verification, warning })
    }

    /// The plugins in `registry`, optionally filtered by `text`.
    pub async fn search(&self, registry: &str, text: Option<&str>) -> anyhow::Result<Vec<CatalogEntry>> {
        Ok(self.registry.search(registry, text).await?)
    }

    /// What `reference` is, without downloading the plugin.
    pub async fn info(&self, reference: &str) -> anyhow::Result<Info> {
        let resolved = self.registry.resolve(&parse_reference(reference)?).await?;
        let verification = self.registry.verify(&resolved, &self.keys).await?;
        Ok(Info { resolved, verification })
    }

    /// Installs `reference` for `tenant` with `grants`.
    pub async fn install(
        &self,
        runtime: &Runtime,
        reference: &str,
        tenant: &str,
        grants: &GrantSpec,
    ) -> anyhow::Result<InstallOutcome> {
        let reference = parse_reference(reference)?;
        let resolved = self.registry.resolve(&reference).await?;
        if let Some((existing, _)) = self.stored(tenant, &resolved.manifest.name).await? {
            return Err(InstallError::AlreadyInstalled {
                pinned: existing.pinned(),
                name: existing.name,
                tenant: tenant.to_string(),
            }
            .into());
        }
        self.install_resolved(runtime, resolved, tenant, grants.clone(), None).await
    }

    async fn install_resolved(
        &self,
        runtime: &Runtime,
        resolved: Resolved,
        tenant: &str,
        grants: GrantSpec,
        replaced: Option<&(Install, String)>,
    ) -> anyhow::Result<InstallOutcome> {
        let manifest = resolved.manifest.clone();
        // Capabilities first: nothing is downloaded for an install that would be refused.
        let missing = grants.missing(&manifest);
        if !missing.is_empty() {
            return Err(InstallError::NotGranted { plugin: manifest.name.clone(), missing }.into());
        }
        let runtime_grants = grants.to_grants()?;
        runtime_grants.check(&manifest)?;

        let policy = self.config.policy_for(tenant);
        let verification = match policy {
            SignaturePolicy::Off => None,
            _ => Some(self.registry.verify(&resolved, &self.keys).await?),
        };
        let warning = under_policy(policy, verification.as_ref(), &resolved.reference.whole(), "installed anyway")
            .map_err(|verification| InstallError::Signature {
                reference: resolved.reference.whole(),
                tenant: tenant.to_string(),
                verification,
            })?;

        let was_stored = self.store.contains(&resolved.layer.digest);
        let wasm = self.registry.fetch(&resolved, &self.store).await?;
        let refuse = |e: anyhow::Error| -> anyhow::Error {
            if !was_stored {
                let _ = self.store.remove(&resolved.layer.digest);
            }
            e
        };
        let embedded = qlayer_manifest::extract(&wasm).map_err(|e| refuse(e.into()))?;
        if embedded != manifest {
            return Err(refuse(anyhow::anyhow!(
                "{}: the manifest inside the plugin differs from the one its artifact advertises; refusing it",
                resolved.reference.whole()
            )));
        }
        let plugin = runtime.load_with_digest(&wasm, resolved.layer.digest.clone()).map_err(|e| refuse(e.into()))?;
        plugin.install(runtime_grants).map_err(|e| refuse(e.into()))?;

        let install = Install {
            tenant: tenant.to_string(),
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            kind: manifest.kind,
            format: manifest.format,
            repository: format!("{}/{}", resolved.reference.registry(), resolved.reference.repository()),
            tag: resolved.reference.tag().map(str::to_string),
            digest: resolved.digest.clone(),
            blob: resolved.layer.digest.clone(),
            size: resolved.layer.size,
            grants,
            signature: verification
                .as_ref()
                .map(|v| v.to_string())
                .unwrap_or_else(|| "not checked (policy off)".into()),
            installed_at: now(),
        };
        let record = record_of(&install)?;
        match replaced {
            None => {
                if !self.db.insert_install(tenant, &install.name, &install.blob, &record).await? {
                    // Another process (or node) installed it meanwhile.
                    let pinned = match self.stored(tenant, &install.name).await? {
                        Some((existing, _)) => existing.pinned(),
                        None => "just removed again".into(),
                    };
                    return Err(InstallError::AlreadyInstalled {
                        name: install.name,
                        tenant: tenant.to_string(),
                        pinned,
                    }
                    .into());
                }
            }
            Some((old, old_record)) => {
                if !self.db.replace_install(tenant, &install.name, old_record, &install.blob, &record).await? {
                    bail!(
                        "plugin `{}` of tenant `{tenant}` was changed or removed while it was being upgraded; \
                         nothing was replaced, try again",
                        install.name
                    );
                }
                self.collect(&old.blob).await?;
            }
        }
        Ok(InstallOutcome {
            install,
            manifest,
            verification,
            warning,
            replaced: replaced.map(|(old, _)| old.version.clone()),
        })
    }

    /// The installs of `tenant`, by name.
    pub async fn list(&self, tenant: &str) -> anyhow::Result<Vec<Install>> {
        self.db.installs(tenant).await?.iter().map(|text| parse_record(text)).collect()
    }

    /// One install of `tenant`.
    pub async fn get(&self, tenant: &str, name: &str) -> anyhow::Result<Install> {
        match self.stored(tenant, name).await? {
            Some((install, _)) => Ok(install),
            None => Err(InstallError::NotInstalled { name: name.to_string(), tenant: tenant.to_string() }.into()),
        }
    }

    /// Removes an install; its blob leaves this node's store when no install uses it.
    pub async fn remove(&self, tenant: &str, name: &str) -> anyhow::Result<Install> {
        let text = self
            .db
            .delete_install(tenant, name)
            .await?
            .ok_or_else(|| InstallError::NotInstalled { name: name.to_string(), tenant: tenant.to_string() })?;
        let install = parse_record(&text)?;
        self.collect(&install.blob).await?;
        Ok(install)
    }

    /// Drops `blob` from this node's store when no install (of any tenant) uses it. Another
    /// node's copy stays until that node collects it; a node missing a blob pulls it again.
    async fn collect(&self, blob: &str) -> anyhow::Result<()> {
        if !self.db.blob_installed(blob).await? {
            self.store.remove(blob)?;
        }
        Ok(())
    }

    /// Upgrades an install: to the highest semantic-version tag above the installed version, or,
    /// when none is higher and it was installed from another tag, to where that tag now points.
    /// `extra` adds grants (a new version may ask for more). `Ok(None)`: already the newest.
    pub async fn upgrade(
        &self,
        runtime: &Runtime,
        tenant: &str,
        name: &str,
        extra: &GrantSpec,
    ) -> anyhow::Result<Option<InstallOutcome>> {
        let current_stored = self
            .stored(tenant, name)
            .await?
            .ok_or_else(|| InstallError::NotInstalled { name: name.to_string(), tenant: tenant.to_string() })?;
        let current = &current_stored.0;
        let repository = parse_reference(&format!("{}:latest", current.repository))?;
        let installed = semver::Version::parse(&current.version).ok();
        let mut tags: Vec<String> =
            self.registry.tags(&repository).await?.into_iter().filter(|t| !t.ends_with(".sig")).collect();
        qlayer_registry::sort_tags(&mut tags);
        let newer = tags.iter().find(|t| {
            matches!((semver::Version::parse(t), &installed), (Ok(v), Some(i)) if v > *i && (v.pre.is_empty() || !i.pre.is_empty()))
        });
        let target = match (newer, &current.tag) {
            (Some(tag), _) => tag.clone(),
            (None, Some(tag)) => tag.clone(),
            (None, None) => return Ok(None),
        };
        let reference =
            Reference::with_tag(repository.registry().to_string(), repository.repository().to_string(), target);
        let resolved = self.registry.resolve(&reference).await?;
        if resolved.digest == current.digest {
            return Ok(None);
        }
        if resolved.manifest.name != current.name {
            bail!(
                "{} holds plugin `{}`, not `{}`; refusing to replace one plugin with another",
                reference.whole(),
                resolved.manifest.name,
                current.name
            );
        }
        let mut grants = current.grants.clone();
        grants.merge(extra);
        self.install_resolved(runtime, resolved, tenant, grants, Some(&current_stored)).await.map(Some)
    }

    /// Loads an installed plugin for `tenant` with its recorded grants. The binary comes from
    /// this node's store; a node that does not have it yet (the install was made through another
    /// node sharing the database) pulls it from the registry by the pinned digest, verified.
    pub async fn load(&self, runtime: &Runtime, tenant: &str, name: &str) -> anyhow::Result<Installed> {
        let install = self.get(tenant, name).await?;
        self.load_install(runtime, &install).await
    }

    /// [`Marketplace::load`] for an install record the caller has just read (no second lookup).
    pub async fn load_install(&self, runtime: &Runtime, install: &Install) -> anyhow::Result<Installed> {
        let name = &install.name;
        // Loaded by an earlier call (from bytes checked against this digest then), or loaded now.
        let plugin = match runtime.loaded(&install.blob) {
            Some(plugin) => plugin,
            None => self.load_blob(runtime, install).await?,
        };
        if plugin.manifest().name != install.name || plugin.manifest().version != install.version {
            bail!("the stored binary of `{name}` is not the installed version; reinstall it");
        }
        Ok(plugin.install(install.grants.to_grants()?)?)
    }

    /// Reads (or pulls) an install's binary and loads it.
    async fn load_blob(
        &self,
        runtime: &Runtime,
        install: &Install,
    ) -> anyhow::Result<std::sync::Arc<qlayer_runtime::Plugin>> {
        let name = &install.name;
        let wasm = if self.store.contains(&install.blob) {
            self.store.read(&install.blob)?
        } else {
            let pinned = parse_reference(&install.pinned())?;
            let resolved = self
                .registry
                .resolve(&pinned)
                .await
                .with_context(|| format!("pulling installed plugin `{name}` ({})", install.pinned()))?;
            if resolved.layer.digest != install.blob {
                bail!(
                    "{} now names binary {}, not the installed {}; refusing it",
                    install.pinned(),
                    resolved.layer.digest,
                    install.blob
                );
            }
            self.registry
                .fetch(&resolved, &self.store)
                .await
                .with_context(|| format!("pulling installed plugin `{name}` ({})", install.pinned()))?
        };
        // The store has just checked the bytes against this digest.
        runtime
            .load_with_digest(&wasm, install.blob.clone())
            .with_context(|| format!("loading installed plugin `{name}`"))
    }
}

fn record_of(install: &Install) -> anyhow::Result<String> {
    Ok(serde_json::to_string(install)?)
}

fn parse_record(text: &str) -> anyhow::Result<Install> {
    serde_json::from_str(text).context("a stored install record is unreadable")
}

/// Applies a signature policy to a check (`None` under `off`): `Err` with the check when
/// `require` refuses it; otherwise the warning to show when `warn` lets through one that did not
/// verify (`what` names the artifact, `done` what happened anyway).
fn under_policy(
    policy: SignaturePolicy,
    verification: Option<&Verification>,
    what: &str,
    done: &str,
) -> Result<Option<String>, Verification> {
    match verification {
        None | Some(Verification::Verified { .. }) => Ok(None),
        Some(v) if policy == SignaturePolicy::Require => Err(v.clone()),
        Some(v) => Ok(Some(format!("{what}: {v} ({done}: signature policy `warn`)"))),
    }
}

/// Writes a new key pair: `<prefix>.key` (private, mode 0600) and `<prefix>.pub`.
pub fn keygen(prefix: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let key = PrivateKey::generate();
    let private = prefix.with_extension("key");
    let public = prefix.with_extension("pub");
    for path in [&private, &public] {
        if path.exists() {
            bail!("{} already exists; not overwriting a key", path.display());
        }
    }
    let pem = key.to_pem().map_err(anyhow::Error::msg)?;
    write_private(&private, pem.as_bytes())?;
    std::fs::write(&public, key.public().to_pem().map_err(anyhow::Error::msg)?)
        .with_context(|| format!("writing {}", public.display()))?;
    Ok((private, public))
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes).with_context(|| format!("writing {}", path.display()))
}

/// Reads a private key file for `--sign`.
pub fn read_key(path: &Path) -> anyhow::Result<PrivateKey> {
    PrivateKey::from_file(path).map_err(anyhow::Error::msg)
}

/// Is this error one of the registry's "not found" kind?
pub fn is_not_found(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<RegistryError>(), Some(RegistryError::NotFound(_)))
}
