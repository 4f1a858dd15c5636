//! `qlayer capsule pull` and `qlayer run --push`: a run's capsule as an OCI artifact (its files
//! as a tar.gz layer, its report as the config; see `qlayer_registry::capsule`).

use anyhow::{Context as _, bail};
use qlayer_factory::{self as factory, CapsuleContents};
use qlayer_marketplace::Marketplace;
use qlayer_registry::PrivateKey;
use std::path::Path;

/// Pushes the capsule of a finished run (`bytes`, already checked by `factory::unpack` into
/// `contents`) to `reference`, signed with `key` when given. Returns the manifest digest.
pub async fn push(
    market: &Marketplace,
    reference: &str,
    key: Option<&PrivateKey>,
    bytes: &[u8],
    contents: &CapsuleContents,
    name: &str,
) -> anyhow::Result<String> {
    let annotations = factory::capsule_annotations(name, &contents.report);
    market
        .push_capsule(reference, &contents.report_bytes, bytes, annotations, key)
        .await
        .with_context(|| format!("pushing the capsule to {reference}"))
}

/// `qlayer capsule pull REF --out DIR`: pulls the capsule (the manifest's and both blobs'
/// digests checked), checks its signature under the marketplace's policy, checks that the
/// report in its config is the one in its files and that every file is the one the report lists,
/// and only then writes the files and `qlayer-run.json` into `out`.
pub async fn pull(market: &Marketplace, reference: &str, out: &Path, force: bool) -> anyhow::Result<()> {
    factory::prepare_out(out, force)?;
    let policy = market.config().signature_policy;
    let progress = crate::progress::Progress::quiet_start();
    progress.start("pull", &format!("pulling {reference}: manifest, layers, signature"));
    let pulled = market.pull_capsule(reference, policy).await;
    progress.finish_quietly("pull");
    let pulled = pulled?;
    let capsule = &pulled.capsule;
    let contents = factory::read_capsule(&capsule.files).with_context(|| format!("the capsule {reference}"))?;
    if contents.report_bytes != capsule.report {
        bail!(
            "the capsule {reference} is inconsistent: the report in its config is not the {} in its files",
            factory::REPORT_FILE
        );
    }
    factory::unpack(&capsule.files, out)?;
    let signature = match &pulled.verification {
        Some(verification) => verification.to_string(),
        None => "signature not checked (policy off)".into(),
    };
    if let Some(warning) = &pulled.warning {
        eprintln!("warning: {warning}");
    }
    let report = &contents.report;
    println!("pulled {}@{} ({signature})", reference.split('@').next().unwrap_or(reference), capsule.digest);
    println!(
        "{}: {} — {} files and {} in {}",
        report.status,
        report.stop_reason,
        contents.files.len(),
        factory::REPORT_FILE,
        out.display()
    );
    Ok(())
}
