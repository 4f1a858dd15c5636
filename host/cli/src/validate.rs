//! `qlayer validate DIR`: the factory's validators (bundled or installed) on any directory, so a
//! user can check a project the factory did not write. Each validator runs in its own sandboxed
//! instance with the project's files as its input; nothing of the project runs on the host.

use anyhow::{Context as _, bail};
use qlayer_factory::DiagnosticReport;
use qlayer_factory::pipeline::{self, PluginRef};
use qlayer_marketplace::Marketplace;
use qlayer_runtime::{Artifact, Grants, Installed, Kind, Runtime};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The most files a directory may hold for validation.
pub const MAX_FILES: usize = 10_000;
/// The most bytes its files may hold together.
pub const MAX_BYTES: u64 = 64 << 20;
/// Directories never read: version control, build output, dependencies.
const SKIPPED_DIRS: &[&str] = &[".git", ".hg", ".svn", "target", "node_modules", "__pycache__", ".venv", "venv"];

/// What a directory holds for the validators.
pub struct Project {
    /// Its UTF-8 files, by relative path (`/`-separated), in path order.
    pub files: Vec<Artifact>,
    /// Files that are not UTF-8 text (no validator reads them).
    pub binary: Vec<String>,
}

/// Reads `dir`'s regular files (symbolic links are not followed), skipping [`SKIPPED_DIRS`].
pub fn read_project(dir: &Path) -> anyhow::Result<Project> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let mut project = Project { files: vec![], binary: vec![] };
    let (mut count, mut bytes) = (0usize, 0u64);
    let mut todo: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(at) = todo.pop() {
        let entries = std::fs::read_dir(&at).with_context(|| format!("reading {}", at.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("reading {}", at.display()))?;
            let kind = entry.file_type()?;
            let path = entry.path();
            let name = entry.file_name();
            if kind.is_dir() {
                if !SKIPPED_DIRS.iter().any(|s| name == *s) {
                    todo.push(path);
                }
                continue;
            }
            if !kind.is_file() {
                continue;
            }
            count += 1;
            bytes += entry.metadata()?.len();
            if count > MAX_FILES {
                bail!("{} holds more than {MAX_FILES} files; validate a smaller directory", dir.display());
            }
            if bytes > MAX_BYTES {
                bail!("{}'s files hold more than {} MiB; validate a smaller directory", dir.display(), MAX_BYTES >> 20);
            }
            let relative = path.strip_prefix(dir).context("a file outside the directory")?;
            let relative: Vec<String> =
                relative.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
            let relative = relative.join("/");
            let content = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            if std::str::from_utf8(&content).is_err() {
                project.binary.push(relative);
                continue;
            }
            project.files.push(Artifact { path: relative, media_type: "text/plain".into(), content });
        }
    }
    project.files.sort_by(|a, b| a.path.cmp(&b.path));
    project.binary.sort();
    Ok(project)
}

/// A validator named on the command line: bundled (`syntax`) or `installed:<name>[@sha256:…]`,
/// loaded for `tenant`.
pub async fn load_validator(
    runtime: &Runtime,
    marketplace: &Marketplace,
    tenant: &str,
    reference: &str,
) -> anyhow::Result<Installed> {
    match pipeline::plugin_ref(reference).map_err(|e| anyhow::anyhow!("--validator {e}"))? {
        PluginRef::Bundled(name) => {
            if !qlayer_bundled::VALIDATORS.contains(&name) {
                bail!(
                    "--validator `{name}` is not a bundled validator (bundled: {}); an installed one is `installed:<name>`",
                    qlayer_bundled::VALIDATORS.join(", ")
                );
            }
            let wasm =
                qlayer_bundled::bundled_plugin(name).context("a bundled validator is missing from this build")?;
            Ok(runtime.load(wasm)?.install(Grants::default())?)
        }
        PluginRef::Installed { name, digest } => {
            let install = marketplace.get(tenant, name).await?;
            qlayer_jobs::check_install(&install, Kind::Validator, digest)
                .map_err(|e| anyhow::anyhow!("--validator installed:{name}: {e}"))?;
            marketplace.load_install(runtime, &install).await
        }
    }
}

/// What the validators found.
pub struct Findings {
    /// Every diagnostic, by validator.
    pub diagnostics: Vec<DiagnosticReport>,
    /// Files no validator read.
    pub unchecked: Vec<String>,
}

/// Runs each validator on `files` in its own instance for `tenant`.
pub async fn validate(validators: &[Installed], tenant: &str, files: &[Artifact]) -> anyhow::Result<Findings> {
    let mut diagnostics = Vec::new();
    let mut checked = BTreeSet::new();
    for validator in validators {
        let name = validator.plugin().manifest().name.clone();
        let (_, found) = qlayer_factory::validate_step(&name, validator, tenant, files).await;
        let found = found.map_err(|e| anyhow::anyhow!("validator `{name}`: {e}"))?;
        checked.extend(qlayer_factory::checked_files(&found, files).into_iter().map(str::to_string));
        diagnostics.extend(found);
    }
    let unchecked = files.iter().map(|f| f.path.clone()).filter(|p| !checked.contains(p)).collect();
    Ok(Findings { diagnostics, unchecked })
}
