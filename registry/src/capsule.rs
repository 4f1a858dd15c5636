//! Run capsules as OCI artifacts.
//!
//! A capsule is what a factory run produced: its files as a gzip-compressed tar (the same bytes
//! `GET /v1/runs/{id}/capsule` serves) and its report (`qlayer-run.json`: the requirement, every
//! step's plugin with its digest, the validators' findings, tokens and cost; the run's
//! provenance). Pushed as an OCI image manifest whose config is the report
//! ([`CAPSULE_CONFIG_MEDIA_TYPE`]) and whose one layer is the tar.gz
//! ([`CAPSULE_LAYER_MEDIA_TYPE`]), with `artifactType` [`CAPSULE_ARTIFACT_TYPE`] (OCI 1.1), so any
//! registry stores it, `oras`/`skopeo` can copy it, and a catalog tells it from a plugin by the
//! config's media type. Signatures are the same cosign-format signatures as plugins'.
//!
//! Pulling checks the manifest's digest (against a pinned reference), its shape, and the size
//! and digest of both blobs before returning anything.

use crate::{Descriptor, Reference, Registry, RegistryError, Verification, digest_of};
use oci_client::manifest::OCI_IMAGE_MEDIA_TYPE;
use std::collections::BTreeMap;

/// `artifactType` of a capsule's manifest.
pub const CAPSULE_ARTIFACT_TYPE: &str = "application/vnd.quantumlayer.capsule.v1";
/// Media type of a capsule's config: the run report (JSON).
pub const CAPSULE_CONFIG_MEDIA_TYPE: &str = "application/vnd.quantumlayer.capsule.config.v1+json";
/// Media type of a capsule's one layer: the files (and the report) as a gzip-compressed tar.
pub const CAPSULE_LAYER_MEDIA_TYPE: &str = "application/vnd.quantumlayer.capsule.layer.v1.tar+gzip";
/// Largest run report accepted from a registry.
pub const MAX_REPORT_BYTES: u64 = 16 * 1024 * 1024;

/// A capsule read back from a registry, every blob checked against its digest.
#[derive(Debug, Clone)]
pub struct PulledCapsule {
    /// The artifact pinned by digest.
    pub pinned: Reference,
    /// `sha256:<hex>` of the OCI manifest: what a signature signs.
    pub digest: String,
    /// The run report (the config blob).
    pub report: Vec<u8>,
    /// The files as a tar.gz (the layer).
    pub files: Vec<u8>,
    /// The manifest's annotations.
    pub annotations: BTreeMap<String, String>,
}

/// The manifest of a capsule, as [`Registry::push_capsule`] writes it.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct CapsuleManifest<'a> {
    schema_version: u32,
    media_type: &'a str,
    artifact_type: &'a str,
    config: &'a Descriptor,
    layers: &'a [Descriptor],
    annotations: &'a BTreeMap<String, String>,
}

impl Registry {
    /// Pushes a capsule (the run report and the files' tar.gz) to `reference`, which must carry a
    /// tag. `annotations` are added to the manifest's (a title, the run's status). Returns the
    /// manifest digest.
    pub async fn push_capsule(
        &self,
        reference: &Reference,
        report: &[u8],
        files: &[u8],
        annotations: BTreeMap<String, String>,
    ) -> Result<String, RegistryError> {
        if reference.tag().is_none() || reference.digest().is_some() {
            return Err(RegistryError::BadReference {
                reference: reference.whole(),
                problem: "a push needs a tag and no digest, e.g. registry.example.com/capsules/todo:1".into(),
            });
        }
        serde_json::from_slice::<serde_json::Value>(report)
            .map_err(|e| RegistryError::Invalid(format!("the capsule's report is not JSON: {e}")))?;
        let config = Descriptor {
            media_type: CAPSULE_CONFIG_MEDIA_TYPE.into(),
            digest: digest_of(report),
            size: report.len() as u64,
            annotations: None,
        };
        let layer = Descriptor {
            media_type: CAPSULE_LAYER_MEDIA_TYPE.into(),
            digest: digest_of(files),
            size: files.len() as u64,
            annotations: None,
        };
        let manifest = CapsuleManifest {
            schema_version: 2,
            media_type: OCI_IMAGE_MEDIA_TYPE,
            artifact_type: CAPSULE_ARTIFACT_TYPE,
            config: &config,
            layers: std::slice::from_ref(&layer),
            annotations: &annotations,
        };
        let manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| RegistryError::Invalid(e.to_string()))?;
        self.push_parts(
            reference,
            &[(report.to_vec(), config.digest.clone()), (files.to_vec(), layer.digest.clone())],
            manifest_bytes,
        )
        .await
    }

    /// Pulls the capsule at `reference`: its manifest (digest checked against a pinned
    /// reference), then the report and the files, each checked for size and digest. Something
    /// that is not a capsule (a plugin, an image) is refused by its media types before any blob
    /// is fetched.
    pub async fn pull_capsule(&self, reference: &Reference) -> Result<PulledCapsule, RegistryError> {
        let (oci, digest) = self.fetch_manifest(reference).await?;
        let not_capsule =
            |problem: String| RegistryError::Invalid(format!("{} is not a run capsule: {problem}", reference.whole()));
        if oci.config.media_type != CAPSULE_CONFIG_MEDIA_TYPE {
            return Err(not_capsule(format!(
                "its config media type is `{}`, not `{CAPSULE_CONFIG_MEDIA_TYPE}`",
                oci.config.media_type
            )));
        }
        let layer = match oci.layers.as_slice() {
            [one] if one.media_type == CAPSULE_LAYER_MEDIA_TYPE => one.clone(),
            [one] => {
                return Err(not_capsule(format!(
                    "its layer is `{}`, not `{CAPSULE_LAYER_MEDIA_TYPE}`",
                    one.media_type
                )));
            }
            many => return Err(not_capsule(format!("it has {} layers; a capsule has exactly one", many.len()))),
        };
        crate::store::sha256_hex(&oci.config.digest)?;
        crate::store::sha256_hex(&layer.digest)?;
        let pinned = Reference::with_digest(
            reference.registry().to_string(),
            reference.repository().to_string(),
            digest.clone(),
        );
        let report = self.blob_in_memory(&pinned, &oci.config, MAX_REPORT_BYTES).await?;
        let files = self.blob_in_memory(&pinned, &layer, self.max_blob()).await?;
        Ok(PulledCapsule { pinned, digest, report, files, annotations: oci.annotations.unwrap_or_default() })
    }

    /// Checks the signatures attached to the capsule `pulled` against `keys`.
    pub async fn verify_capsule(
        &self,
        pulled: &PulledCapsule,
        keys: &[crate::PublicKey],
    ) -> Result<Verification, RegistryError> {
        self.verify_digest(&pulled.pinned, &pulled.digest, keys).await
    }
}
