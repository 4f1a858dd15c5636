//! QuantumLayer plugins as OCI artifacts.
//!
//! A plugin is pushed in the CNCF wasm artifact layout (the one `wkg` and wasmCloud use): an OCI
//! image manifest whose config has the media type [`WASM_CONFIG_MEDIA_TYPE`] and whose single
//! layer is the `application/wasm` binary. The plugin manifest travels as the annotation
//! [`MANIFEST_ANNOTATION`], so a catalog shows it without downloading the component.
//!
//! Pulling checks everything it is handed: the manifest's digest against the reference (or
//! pins it), its size, its shape, and every blob's size and digest while it streams into the
//! local [`BlobStore`]. A mismatch stores nothing.

pub mod auth;
pub mod capsule;
pub mod sign;
pub mod store;

pub use auth::Credentials;
pub use capsule::PulledCapsule;
pub use oci_client::Reference;
pub use sign::{PrivateKey, PublicKey, SignaturePolicy, Verification};
pub use store::{BlobStore, digest_of};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{OCI_IMAGE_MEDIA_TYPE, OciDescriptor};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};
use qlayer_manifest::Manifest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// Config media type of a wasm artifact (CNCF TAG Runtime wasm OCI artifact layout).
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// Media type of the one layer: the WebAssembly binary.
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/wasm";
/// Annotation carrying the plugin manifest (TOML).
pub const MANIFEST_ANNOTATION: &str = "dev.quantumlayer.plugin.manifest";
/// Largest OCI manifest accepted.
pub const MAX_MANIFEST_BYTES: usize = 1024 * 1024;
/// Largest signature payload accepted.
pub const MAX_SIGNATURE_BYTES: u64 = 64 * 1024;

/// What went wrong talking to a registry or the store. Messages name the reference or digest.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The reference does not parse.
    #[error("`{reference}` is not a valid OCI reference: {problem}")]
    BadReference {
        /// What was given.
        reference: String,
        /// Why it does not parse.
        problem: String,
    },
    /// No such repository, tag or digest.
    #[error("{0} was not found in the registry")]
    NotFound(String),
    /// The host's egress proxy refused a destination the client was led to (a redirect, a token
    /// realm, a name that now resolves elsewhere): the operator's network policy.
    #[error("the host's network policy refused a connection made for {reference}: {message}")]
    NetworkPolicy {
        /// The reference.
        reference: String,
        /// The destination, and why.
        message: String,
    },
    /// The registry refused the credentials, or asked for some.
    #[error("the registry refused access to {reference}: {message}")]
    Unauthorized {
        /// The reference.
        reference: String,
        /// The registry's message.
        message: String,
    },
    /// The registry could not be reached, or answered with something unusable.
    #[error("{0}")]
    Transport(String),
    /// Content does not have the digest it should.
    #[error("{what} does not match its digest: expected {expected}, got {actual}; nothing of it was stored")]
    DigestMismatch {
        /// What was checked.
        what: String,
        /// The digest it should have.
        expected: String,
        /// The digest it has.
        actual: String,
    },
    /// A blob is not the size its descriptor says.
    #[error("blob {digest} is not the {expected} bytes its descriptor says (got {actual}); nothing of it was stored")]
    SizeMismatch {
        /// The blob.
        digest: String,
        /// The size it should have.
        expected: u64,
        /// The size it has.
        actual: String,
    },
    /// Something is larger than the host accepts.
    #[error("{what} is {size} bytes, more than the {limit}-byte limit")]
    TooLarge {
        /// What.
        what: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The artifact is not a QuantumLayer plugin in the wasm artifact layout.
    #[error("{reference} is not a QuantumLayer plugin artifact: {problem}")]
    NotAPlugin {
        /// The reference.
        reference: String,
        /// What is wrong.
        problem: String,
    },
    /// Input that is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The local store failed.
    #[error("local store: {0}")]
    Store(String),
}

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// Registries (`host:port`) that may be spoken to over plain HTTP. All others use TLS.
    pub insecure: Vec<String>,
    /// Where credentials come from.
    pub credentials: Credentials,
    /// Largest plugin binary accepted (default 256 MiB).
    pub max_blob_bytes: Option<u64>,
    /// A proxy (`http://host:port`) every connection goes through, for HTTP and HTTPS: the
    /// host's egress proxy, which checks each destination against the operator's network policy.
    pub proxy: Option<String>,
}

/// A plugin artifact as the registry describes it, before anything is downloaded.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The reference asked for.
    pub reference: Reference,
    /// The same artifact pinned by digest.
    pub pinned: Reference,
    /// `sha256:<hex>` of the OCI manifest: what installs pin and signatures sign.
    pub digest: String,
    /// The plugin manifest from the annotation.
    pub manifest: Manifest,
    /// The wasm layer.
    pub layer: Descriptor,
    /// The OCI manifest's annotations.
    pub annotations: BTreeMap<String, String>,
}

/// A content descriptor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type.
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// An OCI image manifest, as much of it as plugins use.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    /// Always 2.
    pub schema_version: u32,
    /// The OCI image manifest media type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// The layers.
    pub layers: Vec<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// The wasm artifact config (`application/vnd.wasm.config.v0+json`), as `wkg` writes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WasmConfig {
    /// `wasm`.
    pub architecture: String,
    /// `wasip2` for components, `none` for Extism modules.
    pub os: String,
    /// The layers' digests.
    pub layer_digests: Vec<String>,
    /// What a component imports and exports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<ComponentInfo>,
}

/// The component part of [`WasmConfig`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ComponentInfo {
    /// Imported interface names.
    pub imports: Vec<String>,
    /// Exported interface names.
    pub exports: Vec<String>,
}

/// A repository in a registry's catalog, with its plugin tags.
#[derive(Debug, Clone, Serialize)]
pub struct CatalogEntry {
    /// `registry/repository`.
    pub repository: String,
    /// Its tags, highest semantic version first; signature tags left out.
    pub tags: Vec<String>,
    /// The manifest of the newest tag (highest semantic version, else `latest`, else the last).
    pub latest: Option<Manifest>,
    /// The tag `latest` describes.
    pub latest_tag: Option<String>,
}

/// A registry client for plugin artifacts.
pub struct Registry {
    /// The client, or why none could be made (no CA certificates on the system, say): the
    /// error is each operation's, so what never reaches a registry (a local `qlayer run`) works.
    client: Result<Client, String>,
    config: RegistryConfig,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("insecure", &self.config.insecure).finish()
    }
}

/// Parses an OCI reference (`registry/repository[:tag][@digest]`).
pub fn parse_reference(reference: &str) -> Result<Reference, RegistryError> {
    reference
        .parse::<Reference>()
        .map_err(|e| RegistryError::BadReference { reference: reference.to_string(), problem: e.to_string() })
}

/// Installs rustls' ring provider as the process default (reqwest is built without one). Safe to
/// call more than once.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// How the host's egress proxy begins the body of a `403` for a destination its network policy
/// refuses (see `qlayer_runtime::egress`).
pub const EGRESS_REFUSED: &str = "refused by the host's network policy:";

impl Registry {
    /// A client with `config`.
    pub fn new(config: RegistryConfig) -> Self {
        install_tls_provider();
        // `Client::new` falls back to a default client when the configured one cannot be made,
        // and that one panics for the same reason (no CA certificates): the error is kept instead.
        let client = Client::try_from(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(config.insecure.clone()),
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(60)),
            user_agent: concat!("qlayer/", env!("CARGO_PKG_VERSION")),
            http_proxy: config.proxy.clone(),
            https_proxy: config.proxy.clone(),
            ..Default::default()
        })
        .map_err(|e| {
            format!(
                "no registry client could be made: {e} (is the system's CA certificate store there? \
                 On Debian: apt-get install ca-certificates; or set SSL_CERT_FILE to a PEM bundle)"
            )
        });
        Registry { client, config }
    }

    fn client(&self) -> Result<&Client, RegistryError> {
        self.client.as_ref().map_err(|e| RegistryError::Transport(e.clone()))
    }

    fn max_blob(&self) -> u64 {
        self.config.max_blob_bytes.unwrap_or(256 * 1024 * 1024)
    }

    fn auth(&self, reference: &Reference) -> RegistryAuth {
        self.config.credentials.for_registry(reference.resolve_registry())
    }

    /// Turns a client error into one that says what to do.
    fn error(&self, reference: &Reference, e: oci_client::errors::OciDistributionError) -> RegistryError {
        use oci_client::errors::OciDistributionError as E;
        let registry = reference.resolve_registry();
        match e {
            E::ImageManifestNotFoundError(_) => RegistryError::NotFound(reference.whole()),
            E::AuthenticationFailure(m) | E::UnauthorizedError { url: m } => {
                RegistryError::Unauthorized { reference: reference.whole(), message: m }
            }
            E::RegistryError { envelope, .. }
                if envelope.errors.iter().any(|e| {
                    matches!(
                        e.code,
                        oci_client::errors::OciErrorCode::ManifestUnknown
                            | oci_client::errors::OciErrorCode::NameUnknown
                            | oci_client::errors::OciErrorCode::BlobUnknown
                    )
                }) =>
            {
                RegistryError::NotFound(reference.whole())
            }
            E::RegistryError { envelope, .. }
                if envelope.errors.iter().any(|e| {
                    matches!(
                        e.code,
                        oci_client::errors::OciErrorCode::Unauthorized | oci_client::errors::OciErrorCode::Denied
                    )
                }) =>
            {
                RegistryError::Unauthorized { reference: reference.whole(), message: envelope.to_string() }
            }
            // The client checks what it downloads against the digest it asked for.
            E::DigestError(oci_client::errors::DigestError::VerificationError { expected, actual }) => {
                RegistryError::DigestMismatch {
                    what: format!("blob {expected} of {}", reference.whole()),
                    expected,
                    actual,
                }
            }
            E::ServerError { code: 404, .. } => RegistryError::NotFound(reference.whole()),
            E::ServerError { code: 403, message, .. } if message.starts_with(EGRESS_REFUSED) => {
                let message = message[EGRESS_REFUSED.len()..].trim_start().to_string();
                RegistryError::NetworkPolicy { reference: reference.whole(), message }
            }
            E::ServerError { code: 401 | 403, message, .. } => {
                RegistryError::Unauthorized { reference: reference.whole(), message }
            }
            other => {
                // reqwest's chain says each layer once ("error sending request for url (…): client
                // error (Connect): tcp connect error: Connection refused"): name the URL and the
                // root cause only. TLS is worth mentioning only when a connection was made.
                let (mut message, unreachable) = match &other {
                    E::RequestError(inner) => {
                        let mut root: &dyn std::error::Error = inner;
                        let mut unreachable = false;
                        while let Some(next) = root.source() {
                            unreachable |= next.to_string().starts_with("dns error")
                                || next.downcast_ref::<std::io::Error>().is_some_and(|io| {
                                    matches!(
                                        io.kind(),
                                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::HostUnreachable
                                    )
                                });
                            root = next;
                        }
                        let url = inner.url().map(|u| u.to_string()).unwrap_or_else(|| registry.to_string());
                        let what = if inner.is_timeout() {
                            "timed out reaching"
                        } else if inner.is_connect() {
                            "cannot connect to"
                        } else {
                            "request failed:"
                        };
                        (format!("registry {registry}: {what} {url}: {root}"), unreachable)
                    }
                    other => (format!("registry {registry}: {other}"), false),
                };
                if !unreachable && !self.config.insecure.iter().any(|r| r == registry) {
                    message.push_str(&format!(
                        " (TLS is required for {registry}; if it serves plain HTTP on a trusted network, list it as an insecure registry, e.g. --insecure-registry {registry})"
                    ));
                }
                RegistryError::Transport(message)
            }
        }
    }

    /// Pushes a plugin binary (component or Extism module with its embedded manifest) to
    /// `reference` (which must carry a tag). Returns the manifest digest.
    pub async fn push(&self, reference: &Reference, wasm: &[u8]) -> Result<String, RegistryError> {
        let manifest = qlayer_manifest::extract(wasm).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        if reference.tag().is_none() || reference.digest().is_some() {
            return Err(RegistryError::BadReference {
                reference: reference.whole(),
                problem: "a push needs a tag and no digest, e.g. registry.example.com/tools/name:1.0.0".into(),
            });
        }
        let is_component = qlayer_manifest::is_component(wasm);
        let layer_digest = digest_of(wasm);
        let config = WasmConfig {
            architecture: "wasm".into(),
            os: if is_component { "wasip2".into() } else { "none".into() },
            layer_digests: vec![layer_digest.clone()],
            component: is_component.then(|| component_info(wasm)),
        };
        let config_bytes = serde_json::to_vec(&config).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let mut annotations = BTreeMap::new();
        annotations.insert("org.opencontainers.image.title".to_string(), manifest.name.clone());
        annotations.insert("org.opencontainers.image.version".to_string(), manifest.version.clone());
        annotations.insert("org.opencontainers.image.description".to_string(), manifest.description.clone());
        annotations.insert(MANIFEST_ANNOTATION.to_string(), manifest.to_toml());
        let oci = ImageManifest {
            schema_version: 2,
            media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_string()),
            config: Descriptor {
                media_type: WASM_CONFIG_MEDIA_TYPE.into(),
                digest: digest_of(&config_bytes),
                size: config_bytes.len() as u64,
                annotations: None,
            },
            layers: vec![Descriptor {
                media_type: WASM_LAYER_MEDIA_TYPE.into(),
                digest: layer_digest.clone(),
                size: wasm.len() as u64,
                annotations: Some(BTreeMap::from([(
                    "org.opencontainers.image.title".to_string(),
                    format!("{}.wasm", manifest.name),
                )])),
            }],
            annotations: Some(annotations),
        };
        let manifest_bytes = serde_json::to_vec(&oci).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        self.push_parts(
            reference,
            &[(config_bytes, oci.config.digest.clone()), (wasm.to_vec(), layer_digest)],
            manifest_bytes,
        )
        .await
    }

    async fn push_parts(
        &self,
        reference: &Reference,
        blobs: &[(Vec<u8>, String)],
        manifest_bytes: Vec<u8>,
    ) -> Result<String, RegistryError> {
        let auth = self.auth(reference);
        self.client()?.auth(reference, &auth, RegistryOperation::Push).await.map_err(|e| self.error(reference, e))?;
        for (bytes, digest) in blobs {
            let exists = self.client()?.blob_exists(reference, digest).await.unwrap_or(false);
            if !exists {
                self.client()?
                    .push_blob(reference, bytes.clone(), digest)
                    .await
                    .map_err(|e| self.error(reference, e))?;
            }
        }
        let digest = digest_of(&manifest_bytes);
        let content_type = http::HeaderValue::from_static(OCI_IMAGE_MEDIA_TYPE);
        self.client()?
            .push_manifest_raw(reference, manifest_bytes, content_type)
            .await
            .map_err(|e| self.error(reference, e))?;
        Ok(digest)
    }

    /// Signs the artifact at `repository` (any reference into it) with `digest`, and pushes the
    /// signature next to it under [`sign::signature_tag`].
    pub async fn sign(&self, repository: &Reference, digest: &str, key: &PrivateKey) -> Result<(), RegistryError> {
        let identity = format!("{}/{}", repository.registry(), repository.repository());
        let payload = sign::payload(&identity, digest);
        let signature = key.sign(&payload);
        self.attach_signature(repository, digest, payload, signature).await
    }

    /// Pushes a signature artifact (payload and base64 signature) for `digest` in `repository`.
    /// Exposed so tests and tools can attach a signature made elsewhere.
    pub async fn attach_signature(
        &self,
        repository: &Reference,
        digest: &str,
        payload: Vec<u8>,
        signature_b64: String,
    ) -> Result<(), RegistryError> {
        let tag = sign::signature_tag(store::sha256_hex(digest).map(|_| digest)?);
        let target = Reference::with_tag(repository.registry().to_string(), repository.repository().to_string(), tag);
        // cosign's signature image: an (empty-rootfs) image config and one payload layer.
        let config_bytes =
            br#"{"architecture":"","config":{},"created":"0001-01-01T00:00:00Z","history":[{"created":"0001-01-01T00:00:00Z"}],"os":"","rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec();
        let payload_digest = digest_of(&payload);
        let oci = ImageManifest {
            schema_version: 2,
            media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_string()),
            config: Descriptor {
                media_type: "application/vnd.oci.image.config.v1+json".into(),
                digest: digest_of(&config_bytes),
                size: config_bytes.len() as u64,
                annotations: None,
            },
            layers: vec![Descriptor {
                media_type: sign::SIMPLE_SIGNING_MEDIA_TYPE.into(),
                digest: payload_digest.clone(),
                size: payload.len() as u64,
                annotations: Some(BTreeMap::from([(sign::SIGNATURE_ANNOTATION.to_string(), signature_b64)])),
            }],
            annotations: None,
        };
        let manifest_bytes = serde_json::to_vec(&oci).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        let config_digest = oci.config.digest.clone();
        self.push_parts(&target, &[(config_bytes, config_digest), (payload, payload_digest)], manifest_bytes).await?;
        Ok(())
    }

    /// Fetches and checks an OCI manifest; returns it with its digest.
    async fn fetch_manifest(&self, reference: &Reference) -> Result<(ImageManifest, String), RegistryError> {
        let auth = self.auth(reference);
        let (bytes, _header_digest) = self
            .client()?
            .pull_manifest_raw(reference, &auth, &[OCI_IMAGE_MEDIA_TYPE])
            .await
            .map_err(|e| self.error(reference, e))?;
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(RegistryError::TooLarge {
                what: format!("the manifest of {}", reference.whole()),
                size: bytes.len() as u64,
                limit: MAX_MANIFEST_BYTES as u64,
            });
        }
        let digest = digest_of(&bytes);
        if let Some(expected) = reference.digest()
            && expected != digest
        {
            return Err(RegistryError::DigestMismatch {
                what: format!("the manifest of {}", reference.whole()),
                expected: expected.to_string(),
                actual: digest,
            });
        }
        let manifest: ImageManifest = serde_json::from_slice(&bytes).map_err(|e| RegistryError::NotAPlugin {
            reference: reference.whole(),
            problem: format!("its manifest is not an OCI image manifest: {e}"),
        })?;
        Ok((manifest, digest))
    }

    /// Resolves `reference` to a pinned plugin artifact and reads its plugin manifest from the
    /// annotation. Downloads only the OCI manifest.
    pub async fn resolve(&self, reference: &Reference) -> Result<Resolved, RegistryError> {
        let (oci, digest) = self.fetch_manifest(reference).await?;
        let not_plugin = |problem: String| RegistryError::NotAPlugin { reference: reference.whole(), problem };
        if oci.config.media_type != WASM_CONFIG_MEDIA_TYPE {
            return Err(not_plugin(format!(
                "its config media type is `{}`, not `{WASM_CONFIG_MEDIA_TYPE}`",
                oci.config.media_type
            )));
        }
        let layer = match oci.layers.as_slice() {
            [one] if one.media_type == WASM_LAYER_MEDIA_TYPE => one.clone(),
            [one] => {
                return Err(not_plugin(format!("its layer is `{}`, not `{WASM_LAYER_MEDIA_TYPE}`", one.media_type)));
            }
            many => return Err(not_plugin(format!("it has {} layers; a plugin has exactly one", many.len()))),
        };
        store::sha256_hex(&layer.digest)?;
        if layer.size > self.max_blob() {
            return Err(RegistryError::TooLarge {
                what: format!("the plugin binary of {}", reference.whole()),
                size: layer.size,
                limit: self.max_blob(),
            });
        }
        let annotations = oci.annotations.clone().unwrap_or_default();
        let manifest = match annotations.get(MANIFEST_ANNOTATION) {
            Some(text) => Manifest::from_toml(text).map_err(|e| not_plugin(e.to_string()))?,
            // Pushed by another tool (wkg, oras): the manifest is only in the binary's own custom
            // section, so the binary is fetched (within the size limit, digest checked) to read it.
            None => {
                let wasm = self.blob_in_memory(reference, &layer, self.max_blob()).await?;
                qlayer_manifest::extract(&wasm).map_err(|e| {
                    not_plugin(format!(
                        "it has no `{MANIFEST_ANNOTATION}` annotation and its binary carries no readable manifest: {e}"
                    ))
                })?
            }
        };
        let pinned = Reference::with_digest(
            reference.registry().to_string(),
            reference.repository().to_string(),
            digest.clone(),
        );
        Ok(Resolved { reference: reference.clone(), pinned, digest, manifest, layer, annotations })
    }

    /// Downloads the plugin binary of `resolved` into `store`, verifying size and digest while
    /// it streams. Returns the bytes, read back from the store.
    pub async fn fetch(&self, resolved: &Resolved, store: &BlobStore) -> Result<Vec<u8>, RegistryError> {
        let layer = &resolved.layer;
        if !store.contains(&layer.digest) {
            let descriptor = OciDescriptor {
                media_type: layer.media_type.clone(),
                digest: layer.digest.clone(),
                size: layer.size as i64,
                ..Default::default()
            };
            let stream = self
                .client()?
                .pull_blob_stream(&resolved.pinned, &descriptor)
                .await
                .map_err(|e| self.error(&resolved.pinned, e))?;
            if let Some(length) = stream.content_length
                && length != layer.size
            {
                return Err(RegistryError::SizeMismatch {
                    digest: layer.digest.clone(),
                    expected: layer.size,
                    actual: length.to_string(),
                });
            }
            store.put_stream(&layer.digest, layer.size, stream.stream).await?;
        }
        store.read(&layer.digest)
    }

    /// Downloads a blob of at most `limit` bytes into memory, checking its size and digest: a
    /// signature, or a plugin binary whose manifest is only in its own custom section.
    async fn blob_in_memory(
        &self,
        reference: &Reference,
        descriptor: &Descriptor,
        limit: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        if descriptor.size > limit {
            return Err(RegistryError::TooLarge {
                what: format!("blob {}", descriptor.digest),
                size: descriptor.size,
                limit,
            });
        }
        let oci_descriptor = OciDescriptor {
            media_type: descriptor.media_type.clone(),
            digest: descriptor.digest.clone(),
            size: descriptor.size as i64,
            ..Default::default()
        };
        let mut out = Vec::new();
        self.client()?.pull_blob(reference, &oci_descriptor, &mut out).await.map_err(|e| self.error(reference, e))?;
        let actual = digest_of(&out);
        if actual != descriptor.digest || out.len() as u64 != descriptor.size {
            return Err(RegistryError::DigestMismatch {
                what: format!("blob {}", descriptor.digest),
                expected: descriptor.digest.clone(),
                actual,
            });
        }
        Ok(out)
    }

    /// Checks the signatures attached to `resolved` against `keys`.
    pub async fn verify(&self, resolved: &Resolved, keys: &[PublicKey]) -> Result<Verification, RegistryError> {
        self.verify_digest(&resolved.reference, &resolved.digest, keys).await
    }

    /// Checks the signatures attached to the artifact `digest` in `repository` (any reference
    /// into it) against `keys`.
    pub async fn verify_digest(
        &self,
        repository: &Reference,
        digest: &str,
        keys: &[PublicKey],
    ) -> Result<Verification, RegistryError> {
        let tag = sign::signature_tag(digest);
        let target = Reference::with_tag(repository.registry().to_string(), repository.repository().to_string(), tag);
        let (oci, _) = match self.fetch_manifest(&target).await {
            Ok(found) => found,
            Err(RegistryError::NotFound(_)) => return Ok(Verification::Unsigned),
            Err(RegistryError::NotAPlugin { problem, .. }) => return Ok(Verification::Malformed(problem)),
            Err(e) => return Err(e),
        };
        let layers: Vec<&Descriptor> =
            oci.layers.iter().filter(|l| l.media_type == sign::SIMPLE_SIGNING_MEDIA_TYPE).collect();
        if layers.is_empty() {
            return Ok(Verification::Malformed("no simple-signing layer".into()));
        }
        let mut outcome = Verification::WrongKey { signatures: layers.len() };
        for layer in &layers {
            let Some(signature) = layer.annotations.as_ref().and_then(|a| a.get(sign::SIGNATURE_ANNOTATION)) else {
                continue;
            };
            let payload = self.blob_in_memory(&target, layer, MAX_SIGNATURE_BYTES).await?;
            match sign::check(&payload, signature, digest, keys) {
                Verification::Verified { key } => return Ok(Verification::Verified { key }),
                Verification::WrongKey { .. } => {}
                other => outcome = other,
            }
        }
        if let Verification::WrongKey { .. } = outcome {
            outcome = Verification::WrongKey { signatures: layers.len() };
        }
        Ok(outcome)
    }

    /// Tags of a repository (any reference into it).
    pub async fn tags(&self, repository: &Reference) -> Result<Vec<String>, RegistryError> {
        let auth = self.auth(repository);
        let mut tags = Vec::new();
        let mut last: Option<String> = None;
        loop {
            let page = self
                .client()?
                .list_tags(repository, &auth, Some(1000), last.as_deref())
                .await
                .map_err(|e| self.error(repository, e))?;
            let done = page.tags.len() < 1000;
            last = page.tags.last().cloned();
            tags.extend(page.tags);
            if done || last.is_none() || tags.len() > 100_000 {
                break;
            }
        }
        Ok(tags)
    }

    /// The plugins in `registry`: its catalog, each repository's tags, and the manifest of each
    /// repository's newest tag. Repositories that hold no plugin are left out. `text` filters on
    /// the repository name, plugin name and description (case-insensitive).
    pub async fn search(&self, registry: &str, text: Option<&str>) -> Result<Vec<CatalogEntry>, RegistryError> {
        let probe = Reference::with_tag(registry.to_string(), "catalog".into(), "latest".into());
        let auth = self.auth(&probe);
        let mut repositories = Vec::new();
        let mut last: Option<String> = None;
        loop {
            let page = self
                .client()?
                .catalog(&probe, &auth, Some(1000), last.as_deref())
                .await
                .map_err(|e| self.error(&probe, e))?;
            let done = page.repositories.len() < 1000;
            last = page.repositories.last().cloned();
            repositories.extend(page.repositories);
            if done || last.is_none() || repositories.len() > 100_000 {
                break;
            }
        }
        let needle = text.map(str::to_lowercase);
        let mut out = Vec::new();
        for repository in repositories {
            let any = Reference::with_tag(registry.to_string(), repository.clone(), "latest".into());
            let mut tags: Vec<String> = self.tags(&any).await?.into_iter().filter(|t| !t.ends_with(".sig")).collect();
            if tags.is_empty() {
                continue;
            }
            sort_tags(&mut tags);
            let newest = tags[0].clone();
            let reference = Reference::with_tag(registry.to_string(), repository.clone(), newest.clone());
            let latest = match self.resolve(&reference).await {
                Ok(resolved) => resolved.manifest,
                Err(RegistryError::NotAPlugin { .. }) => continue,
                Err(e) => return Err(e),
            };
            if let Some(needle) = &needle {
                let hay = format!("{repository} {} {}", latest.name, latest.description).to_lowercase();
                if !hay.contains(needle.as_str()) {
                    continue;
                }
            }
            out.push(CatalogEntry {
                repository: format!("{registry}/{repository}"),
                tags,
                latest: Some(latest),
                latest_tag: Some(newest),
            });
        }
        Ok(out)
    }
}

/// Orders tags newest first: semantic versions (highest first), then `latest`, then the rest
/// in reverse lexical order.
pub fn sort_tags(tags: &mut [String]) {
    tags.sort_by(|a, b| {
        let (va, vb) = (semver::Version::parse(a).ok(), semver::Version::parse(b).ok());
        match (va, vb) {
            (Some(a), Some(b)) => b.cmp(&a),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => match (a.as_str(), b.as_str()) {
                ("latest", _) => std::cmp::Ordering::Less,
                (_, "latest") => std::cmp::Ordering::Greater,
                _ => b.cmp(a),
            },
        }
    });
}

/// The import and export names of a component, for the artifact config.
fn component_info(wasm: &[u8]) -> ComponentInfo {
    use wasmparser::{Parser, Payload};
    let mut info = ComponentInfo::default();
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(wasm) {
        match payload {
            Ok(Payload::Version { .. }) => depth += 1,
            Ok(Payload::End(_)) => depth = depth.saturating_sub(1),
            Ok(Payload::ComponentImportSection(reader)) if depth == 1 => {
                info.imports.extend(reader.into_iter().filter_map(Result::ok).map(|i| i.name.name.to_string()));
            }
            Ok(Payload::ComponentExportSection(reader)) if depth == 1 => {
                info.exports.extend(reader.into_iter().filter_map(Result::ok).map(|e| e.name.name.to_string()));
            }
            Err(_) => break,
            _ => {}
        }
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_sort_newest_first() {
        let mut tags: Vec<String> =
            ["0.9.0", "latest", "1.10.0", "1.2.0", "dev"].iter().map(|s| s.to_string()).collect();
        sort_tags(&mut tags);
        assert_eq!(tags, ["1.10.0", "1.2.0", "0.9.0", "latest", "dev"]);
    }
}
