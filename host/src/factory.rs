//! The software factory: requirement → product-manager (PRD) → developer (files) → validators,
//! with a bounded repair loop (diagnostics go back to the developer), then the files and a JSON
//! run report are written to the output directory.
//!
//! Every step runs as a plugin in its own sandboxed instance; the agents reach models only
//! through the [`Router`].

use crate::router::{Router, TokenCount};
use crate::runtime::{Artifact, Diagnostic, Installed, LlmHandler, Severity, Task};
use anyhow::{Context as _, bail};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// The longest requirement accepted, in bytes.
pub const MAX_REQUIREMENT_BYTES: usize = 16 * 1024;
/// The name of the report written beside the generated files.
pub const REPORT_FILE: &str = "qlayer-run.json";

/// The plugins a run uses.
pub struct Pipeline {
    /// Writes the PRD.
    pub product_manager: Installed,
    /// Writes and repairs the files.
    pub developer: Installed,
    /// Check the files.
    pub validators: Vec<Installed>,
    /// Answers the agents' `llm` calls.
    pub router: Arc<Router>,
    /// Name of the provider chain, for the report.
    pub provider: String,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// The natural-language requirement.
    pub requirement: String,
    /// Free-form options for the agents (`{"language": "python"}`); `{}` when none.
    pub options_json: String,
    /// Repair rounds allowed after the first validation.
    pub max_repair_rounds: u32,
    /// The tenant the run belongs to.
    pub tenant: String,
}

/// Progress of a run, as it happens.
#[derive(Debug, Clone)]
pub enum Progress {
    /// A step started.
    Started {
        /// The step (`product-manager`, `developer`, `validate`, `repair 1`...).
        step: String,
    },
    /// A step finished.
    Finished(StepReport),
}

/// One step of a run, as recorded in the report.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// The step's name.
    pub step: String,
    /// The plugin that ran it.
    pub plugin: String,
    /// Its version.
    pub version: String,
    /// `sha256:` digest of its component.
    pub digest: String,
    /// Milliseconds it took.
    pub duration_ms: u64,
    /// Tokens it spent through the router.
    pub tokens: TokenCount,
    /// `ok` or `failed`.
    pub outcome: String,
    /// One line: what it produced or why it failed.
    pub summary: String,
}

/// A file written by the run.
#[derive(Debug, Clone, Serialize)]
pub struct FileReport {
    /// Relative path.
    pub path: String,
    /// Size in bytes.
    pub bytes: usize,
    /// `sha256:` of the content.
    pub sha256: String,
}

/// The run report, written as `qlayer-run.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The requirement, verbatim.
    pub requirement: String,
    /// `passed` (no validator errors), `failed-validation` (errors left after the repair rounds)
    /// or `failed` (a step failed).
    pub status: String,
    /// Why the run stopped, in words.
    pub stop_reason: String,
    /// The provider chain used.
    pub provider: String,
    /// Repair rounds run.
    pub repair_rounds: u32,
    /// Every step, in order.
    pub steps: Vec<StepReport>,
    /// The final diagnostics.
    pub diagnostics: Vec<DiagnosticReport>,
    /// The files written.
    pub files: Vec<FileReport>,
    /// Tokens over the whole run.
    pub tokens: TokenCount,
    /// Milliseconds over the whole run.
    pub duration_ms: u64,
    /// Seconds since the Unix epoch when the run started.
    pub started_at: u64,
}

/// A diagnostic in the report.
#[derive(Debug, Clone, Serialize)]
pub struct DiagnosticReport {
    /// `error`, `warning` or `info`.
    pub severity: &'static str,
    /// The rule.
    pub rule: String,
    /// The file.
    pub path: Option<String>,
    /// The line.
    pub line: Option<u32>,
    /// What is wrong.
    pub message: String,
    /// The validator that found it.
    pub validator: String,
}

impl RunReport {
    /// Whether the run produced files that passed every validator.
    pub fn passed(&self) -> bool {
        self.status == "passed"
    }
}

/// Checks the requirement and prepares the output directory, before any plugin runs.
pub fn prepare(requirement: &str, out: &Path, force: bool) -> anyhow::Result<()> {
    if requirement.trim().is_empty() {
        bail!("the requirement is empty: say what to build, e.g. qlayer run \"a todo list CLI\" --out todo");
    }
    if requirement.len() > MAX_REQUIREMENT_BYTES {
        bail!("the requirement is {} bytes; the limit is {MAX_REQUIREMENT_BYTES}", requirement.len());
    }
    if out.exists() && !out.is_dir() {
        bail!("--out {} exists and is not a directory", out.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create the output directory {}", out.display()))?;
    let non_empty = std::fs::read_dir(out)
        .with_context(|| format!("cannot read the output directory {}", out.display()))?
        .next()
        .is_some();
    if non_empty && !force {
        bail!("the output directory {} is not empty; choose another or pass --force to overwrite", out.display());
    }
    let probe = out.join(".qlayer-write-probe");
    std::fs::write(&probe, b"").with_context(|| format!("cannot write to the output directory {}", out.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn severity(s: Severity) -> &'static str {
    match s {
        Severity::Error => "error",
        Severity::Warning => "warning",
        Severity::Info => "info",
    }
}

struct Recorder<'a> {
    pipeline: &'a Pipeline,
    steps: Vec<StepReport>,
    progress: &'a (dyn Fn(Progress) + Send + Sync),
}

impl Recorder<'_> {
    fn start(&self, step: &str) -> (Instant, TokenCount) {
        (self.progress)(Progress::Started { step: step.to_string() });
        (Instant::now(), self.pipeline.router.spent())
    }

    fn finish(
        &mut self,
        step: &str,
        plugin: &Installed,
        began: (Instant, TokenCount),
        outcome: Result<String, String>,
    ) {
        let manifest = plugin.plugin().manifest();
        let (outcome, summary) = match outcome {
            Ok(s) => ("ok", s),
            Err(s) => ("failed", s),
        };
        let report = StepReport {
            step: step.to_string(),
            plugin: manifest.name.clone(),
            version: manifest.version.clone(),
            digest: plugin.plugin().digest().to_string(),
            duration_ms: began.0.elapsed().as_millis() as u64,
            tokens: self.pipeline.router.spent().since(began.1),
            outcome: outcome.to_string(),
            summary,
        };
        (self.progress)(Progress::Finished(report.clone()));
        self.steps.push(report);
    }
}

/// Runs the pipeline and writes the files and the report into `out` (prepared by [`prepare`]).
/// A failed step still writes the report, with the reason; the error is in `status`.
pub async fn run(
    pipeline: &Pipeline,
    request: &RunRequest,
    out: &Path,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> anyhow::Result<RunReport> {
    let started = Instant::now();
    let started_at = now_secs();
    let mut rec = Recorder { pipeline, steps: Vec::new(), progress };
    let outcome = steps(&mut rec, request).await;
    let (status, stop_reason, files, diagnostics, rounds) = match outcome {
        Ok(Outcome { files, diagnostics, rounds }) => {
            let errors = diagnostics.iter().filter(|(d, _)| d.severity == Severity::Error).count();
            if errors == 0 {
                ("passed", "every validator passed".to_string(), files, diagnostics, rounds)
            } else {
                let reason = format!("{errors} validator errors remain after {rounds} repair rounds (the limit)");
                ("failed-validation", reason, files, diagnostics, rounds)
            }
        }
        Err(reason) => ("failed", reason, Vec::new(), Vec::new(), 0),
    };
    let written = write_files(out, &files)?;
    let report = RunReport {
        requirement: request.requirement.clone(),
        status: status.to_string(),
        stop_reason,
        provider: pipeline.provider.clone(),
        repair_rounds: rounds,
        steps: rec.steps,
        diagnostics: diagnostics
            .into_iter()
            .map(|(d, validator)| DiagnosticReport {
                severity: severity(d.severity),
                rule: d.rule,
                path: d.path,
                line: d.line,
                message: d.message,
                validator,
            })
            .collect(),
        files: written,
        tokens: pipeline.router.spent(),
        duration_ms: started.elapsed().as_millis() as u64,
        started_at,
    };
    let json = serde_json::to_vec_pretty(&report)?;
    let path = out.join(REPORT_FILE);
    std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
    Ok(report)
}

struct Outcome {
    files: Vec<Artifact>,
    diagnostics: Vec<(Diagnostic, String)>,
    rounds: u32,
}

async fn steps(rec: &mut Recorder<'_>, request: &RunRequest) -> Result<Outcome, String> {
    let pipeline = rec.pipeline;
    let llm: Arc<dyn LlmHandler> = pipeline.router.clone();
    let tenant = request.tenant.as_str();
    let task = |inputs: Vec<Artifact>, feedback: Vec<Diagnostic>| Task {
        requirement: request.requirement.clone(),
        inputs,
        feedback,
        options_json: request.options_json.clone(),
    };

    // Product manager → PRD.
    let began = rec.start("product-manager");
    let result = async {
        let mut agent = pipeline.product_manager.agent(tenant, llm.clone()).await?;
        agent.run(&task(vec![], vec![])).await
    }
    .await;
    let prd = match result {
        Ok(out) => {
            rec.finish("product-manager", &pipeline.product_manager, began, Ok(out.summary.clone()));
            out.artifacts
        }
        Err(e) => {
            let reason = format!("product-manager failed: {e}");
            rec.finish("product-manager", &pipeline.product_manager, began, Err(e.to_string()));
            return Err(reason);
        }
    };

    let mut files: Vec<Artifact> = Vec::new();
    let mut feedback: Vec<Diagnostic> = Vec::new();
    let mut round = 0;
    loop {
        // Developer → files (or fixed files on a repair round).
        let step = if round == 0 { "developer".to_string() } else { format!("developer (repair {round})") };
        let began = rec.start(&step);
        let mut inputs = prd.clone();
        inputs.extend(files.iter().cloned());
        let result = async {
            let mut agent = pipeline.developer.agent(tenant, llm.clone()).await?;
            agent.run(&task(inputs, feedback.clone())).await
        }
        .await;
        match result {
            Ok(out) => {
                rec.finish(&step, &pipeline.developer, began, Ok(out.summary.clone()));
                files = out.artifacts;
            }
            Err(e) => {
                let reason = format!("{step} failed: {e}");
                rec.finish(&step, &pipeline.developer, began, Err(e.to_string()));
                return Err(reason);
            }
        }

        // Validators.
        let mut all = prd.clone();
        all.extend(files.iter().cloned());
        let mut diagnostics = Vec::new();
        for validator in &pipeline.validators {
            let name = validator.plugin().manifest().name.clone();
            let step = format!("validate: {name}");
            let began = rec.start(&step);
            let result = async {
                let mut v = validator.validator(tenant).await?;
                v.validate(&all).await
            }
            .await;
            match result {
                Ok(found) => {
                    let errors = found.iter().filter(|d| d.severity == Severity::Error).count();
                    rec.finish(&step, validator, began, Ok(format!("{errors} errors, {} findings", found.len())));
                    diagnostics.extend(found.into_iter().map(|d| (d, name.clone())));
                }
                Err(e) => {
                    let reason = format!("validator {name} failed: {e}");
                    rec.finish(&step, validator, began, Err(e.to_string()));
                    return Err(reason);
                }
            }
        }
        let errors: Vec<Diagnostic> =
            diagnostics.iter().filter(|(d, _)| d.severity == Severity::Error).map(|(d, _)| d.clone()).collect();
        if errors.is_empty() || round >= request.max_repair_rounds {
            let mut out = prd.clone();
            out.extend(files);
            return Ok(Outcome { files: out, diagnostics, rounds: round });
        }
        round += 1;
        feedback = errors;
    }
}

/// Joins a plugin-supplied relative path onto `root`, refusing anything that could escape it.
pub fn safe_join(root: &Path, relative: &str) -> anyhow::Result<PathBuf> {
    let path = Path::new(relative);
    if relative.is_empty() || relative.contains('\0') {
        bail!("refusing the empty or NUL-containing path {relative:?}");
    }
    let mut out = root.to_path_buf();
    for part in path.components() {
        match part {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => bail!("refusing the path {relative:?}: it must be relative and stay inside the output directory"),
        }
    }
    Ok(out)
}

fn write_files(out: &Path, files: &[Artifact]) -> anyhow::Result<Vec<FileReport>> {
    let mut written = Vec::with_capacity(files.len());
    for file in files {
        let path = safe_join(out, &file.path)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, &file.content).with_context(|| format!("writing {}", path.display()))?;
        written.push(FileReport {
            path: file.path.clone(),
            bytes: file.content.len(),
            sha256: format!("sha256:{}", hex::encode(Sha256::digest(&file.content))),
        });
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn paths_cannot_escape_the_output_directory() {
        let root = Path::new("/tmp/out");
        assert_eq!(safe_join(root, "src/main.rs").unwrap(), PathBuf::from("/tmp/out/src/main.rs"));
        for bad in ["../x", "/etc/passwd", "a/../../b", ""] {
            assert!(safe_join(root, bad).is_err(), "{bad}");
        }
    }
}
