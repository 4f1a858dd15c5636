//! The software factory's steps (agents, validators, the repair verdict), reports and capsules.
//! May depend on: `qlayer-runtime`, `qlayer-gateway`.
//!
//! The software factory's parts: the steps of a pipeline ([`pipeline`]; by default requirement →
//! product-manager (PRD) → architect (design, file plan) → developer (sources) and devops
//! (deployment) → qa-engineer (acceptance tests) → reviewer (findings) → validators), with a
//! bounded repair loop (diagnostics and findings go back to the step that owns the file); the run
//! report,
//! and the tar.gz capsule of the files and the report. `qlayer-jobs` runs these steps as the
//! tasks of a DAG job on the scheduler.
//!
//! Every step runs as a plugin in its own sandboxed instance; the agents reach models only
//! through the [`Router`].

pub mod pipeline;
pub mod tools;

use anyhow::{Context as _, bail};
use qlayer_gateway::{Router, TokenCount};
use qlayer_runtime::{
    AgentOutput, Artifact, CallError, Diagnostic, Installed, LlmHandler, Severity, Task, ToolHandler,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// The longest requirement accepted, in characters (so at most 64 KiB of UTF-8).
pub const MAX_REQUIREMENT_CHARS: usize = 16 * 1024;
/// The rule of a validator's `info` diagnostic that names a file it did not check (its type is
/// not one it reads): a file that no validator checked is named in the run's report and status.
pub const UNCHECKED: &str = "unchecked";

/// The files of `given` that a validator's findings `found` say it checked: all but those it
/// named with an `info` diagnostic of rule [`UNCHECKED`]. A validator that reads files for
/// something other than their language (tests, secrets, words) says so with one such diagnostic
/// without a path: it checks none, so it never hides a file no parser read.
pub fn checked_files<'a>(found: &[DiagnosticReport], given: &'a [Artifact]) -> Vec<&'a str> {
    let skipped: Vec<&str> = found
        .iter()
        .filter(|d| d.rule == UNCHECKED && !d.is_error())
        .map(|d| d.path.as_deref().unwrap_or(""))
        .collect();
    if skipped.contains(&"") {
        return Vec::new();
    }
    given.iter().map(|f| f.path.as_str()).filter(|p| !skipped.contains(p)).collect()
}
/// The media type of an agent's findings artifact (as the SDK's
/// `qlayer_sdk::agent::FINDINGS_MEDIA_TYPE`): `{"findings": [{"severity", "rule", "path", "line",
/// "message"}]}`. A reviewer writes one; the run treats its findings as validators' diagnostics.
pub const FINDINGS_MEDIA_TYPE: &str = "application/vnd.qlayer.findings+json";
/// The most findings one agent step may report.
pub const MAX_FINDINGS: usize = 1000;
/// The name of the report written beside the generated files.
pub const REPORT_FILE: &str = "qlayer-run.json";

/// One step of a run, as recorded in the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Tool calls its agent made (itself, or the host for the model's tool calls).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tool_calls: u32,
    /// What its model calls cost at the prices of the tenant's model table, in the report's
    /// `currency` (none for a step on the run's provider, which has no price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A file written by the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileReport {
    /// Relative path.
    pub path: String,
    /// Size in bytes.
    pub bytes: usize,
    /// `sha256:` of the content.
    pub sha256: String,
}

/// The run report, written as `qlayer-run.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// The pipeline's name (`default`, a stored one's, or none for an unnamed inline one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    /// Repair rounds run.
    pub repair_rounds: u32,
    /// Every step, in order.
    pub steps: Vec<StepReport>,
    /// The final diagnostics.
    pub diagnostics: Vec<DiagnosticReport>,
    /// The files written.
    pub files: Vec<FileReport>,
    /// The files no validator checked (none ran on them, or each that did could not read them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unchecked: Vec<String>,
    /// Tokens over the whole run.
    pub tokens: TokenCount,
    /// What the steps that asked models of the tenant's table cost, at its prices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    /// The currency of `cost` and of the steps' costs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    /// Milliseconds over the whole run.
    pub duration_ms: u64,
    /// Seconds since the Unix epoch when the run started.
    pub started_at: u64,
}

/// A diagnostic in the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiagnosticReport {
    /// `error`, `warning` or `info`.
    pub severity: String,
    /// The rule.
    pub rule: String,
    /// The file.
    pub path: Option<String>,
    /// The line (1-based).
    pub line: Option<u32>,
    /// The column within the line (1-based, in characters), when the validator gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<u32>,
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
    let chars = requirement.chars().count();
    if chars > MAX_REQUIREMENT_CHARS {
        bail!("the requirement is {chars} characters; the limit is {MAX_REQUIREMENT_CHARS}");
    }
    prepare_out(out, force)
}

/// Prepares an output directory: created if missing, empty unless `force`, writable.
pub fn prepare_out(out: &Path, force: bool) -> anyhow::Result<()> {
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

fn severity(s: Severity) -> &'static str {
    match s {
        Severity::Error => "error",
        Severity::Warning => "warning",
        Severity::Info => "info",
    }
}

impl DiagnosticReport {
    /// A validator's finding, named with the validator.
    pub fn new(d: Diagnostic, validator: &str) -> Self {
        DiagnosticReport {
            severity: severity(d.severity).to_string(),
            rule: d.rule,
            path: d.path,
            line: d.line,
            column: d.line.and(d.column),
            message: d.message,
            validator: validator.to_string(),
        }
    }

    /// Where it is: `path:line:column`, `path:line`, `path`, or empty for the whole project.
    pub fn place(&self) -> String {
        match (&self.path, self.line, self.column) {
            (Some(p), Some(l), Some(c)) => format!("{p}:{l}:{c}"),
            (Some(p), Some(l), None) => format!("{p}:{l}"),
            (Some(p), None, _) => p.clone(),
            _ => String::new(),
        }
    }

    /// Whether it is an error (what the repair rounds fix).
    pub fn is_error(&self) -> bool {
        self.severity == "error"
    }

    /// Back to the plugin contract's type, for the developer's feedback.
    pub fn diagnostic(&self) -> Diagnostic {
        Diagnostic {
            severity: match self.severity.as_str() {
                "error" => Severity::Error,
                "warning" => Severity::Warning,
                _ => Severity::Info,
            },
            rule: self.rule.clone(),
            path: self.path.clone(),
            line: self.line,
            column: self.column,
            message: self.message.clone(),
        }
    }
}

/// An artifact as it travels between the steps of a run (as JSON): its content as text when it
/// is UTF-8, else as hex.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredArtifact {
    /// Relative path.
    pub path: String,
    /// Its media type.
    pub media_type: String,
    /// The content, when it is UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The content as hex, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hex: Option<String>,
}

impl From<&Artifact> for StoredArtifact {
    fn from(a: &Artifact) -> Self {
        let (text, hex) = match std::str::from_utf8(&a.content) {
            Ok(text) => (Some(text.to_string()), None),
            Err(_) => (None, Some(hex::encode(&a.content))),
        };
        StoredArtifact { path: a.path.clone(), media_type: a.media_type.clone(), text, hex }
    }
}

impl StoredArtifact {
    /// Back to the plugin contract's type.
    pub fn artifact(&self) -> Result<Artifact, String> {
        let content = match (&self.text, &self.hex) {
            (Some(text), None) => text.clone().into_bytes(),
            (None, Some(h)) => hex::decode(h).map_err(|e| format!("artifact {}: bad hex: {e}", self.path))?,
            _ => return Err(format!("artifact {}: give exactly one of `text` and `hex`", self.path)),
        };
        Ok(Artifact { path: self.path.clone(), media_type: self.media_type.clone(), content })
    }
}

/// The report of `step`, run by `plugin` since `began`, having spent `tokens`: `outcome` is its
/// summary, or why it failed.
pub fn step_report(
    step: &str,
    plugin: &Installed,
    began: Instant,
    tokens: TokenCount,
    outcome: Result<&str, String>,
) -> StepReport {
    let manifest = plugin.plugin().manifest();
    let (outcome, summary) = match outcome {
        Ok(s) => ("ok", s.to_string()),
        Err(s) => ("failed", s),
    };
    StepReport {
        step: step.to_string(),
        plugin: manifest.name.clone(),
        version: manifest.version.clone(),
        digest: plugin.plugin().digest().to_string(),
        duration_ms: began.elapsed().as_millis() as u64,
        tokens,
        outcome: outcome.to_string(),
        summary,
        tool_calls: 0,
        cost: None,
    }
}

/// What a step's agent reaches: models (through `llm`, which spends from `router`) and the
/// tools its step was granted.
pub struct Access {
    /// The run's router: what the step spent is read from it.
    pub router: Arc<Router>,
    /// What answers the agent's `llm` calls: the router, or a [`tools::ToolLoop`] over it.
    pub llm: Arc<dyn LlmHandler>,
    /// What answers its `tools` calls; `None` grants none.
    pub tools: Option<Arc<dyn ToolHandler>>,
}

impl Access {
    /// Models through `router`, no tools.
    pub fn router(router: Arc<Router>) -> Self {
        Access { llm: router.clone(), router, tools: None }
    }
}

/// Runs one agent step (`step` names it in the report): a fresh instance of `agent`, reaching
/// models and tools through `access`, gets `task`.
pub async fn agent_step(
    step: &str,
    agent: &Installed,
    access: Access,
    tenant: &str,
    task: Task,
) -> (StepReport, Result<AgentOutput, CallError>) {
    let (began, spent) = (Instant::now(), access.router.spent());
    let result = async {
        let mut instance = agent.agent_with_tools(tenant, access.llm, access.tools).await?;
        let mut out = instance.run(&task).await?;
        // Where artifacts enter the host: every path gets its one spelling (`./docs/a.md` and
        // `docs//a.md` are `docs/a.md`), so that every later comparison of paths is right.
        out.artifacts = canonical_artifacts(std::mem::take(&mut out.artifacts)).map_err(|message| CallError {
            plugin: Arc::from(agent.plugin().manifest().name.as_str()),
            tenant: Arc::from(tenant),
            kind: qlayer_runtime::CallErrorKind::Plugin(qlayer_runtime::PluginError::InvalidInput(message)),
        })?;
        Ok::<_, CallError>(out)
    }
    .await;
    let outcome = match &result {
        Ok(out) => Ok(out.summary.as_str()),
        Err(e) => Err(e.to_string()),
    };
    (step_report(step, agent, began, access.router.spent().since(spent), outcome), result)
}

/// The findings of an agent's output (its artifacts of [`FINDINGS_MEDIA_TYPE`]), as diagnostics
/// found by `step`. A malformed findings artifact is an error that names it and what is wrong.
pub fn findings(artifacts: &[Artifact], step: &str) -> Result<Vec<DiagnosticReport>, String> {
    #[derive(Deserialize)]
    struct Findings {
        findings: Vec<Finding>,
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Finding {
        severity: String,
        rule: String,
        #[serde(default)]
        path: Option<String>,
        #[serde(default)]
        line: Option<u32>,
        #[serde(default)]
        column: Option<u32>,
        message: String,
    }
    let mut out = Vec::new();
    for artifact in artifacts.iter().filter(|a| a.media_type == FINDINGS_MEDIA_TYPE) {
        let at = |e: String| format!("the findings in `{}` ({FINDINGS_MEDIA_TYPE}): {e}", artifact.path);
        let mut de = serde_json::Deserializer::from_slice(&artifact.content);
        let found: Findings = serde_path_to_error::deserialize(&mut de).map_err(|e| at(e.to_string()))?;
        if out.len() + found.findings.len() > MAX_FINDINGS {
            return Err(at(format!("more than {MAX_FINDINGS} findings")));
        }
        for (i, f) in found.findings.into_iter().enumerate() {
            if !matches!(f.severity.as_str(), "error" | "warning" | "info") {
                return Err(at(format!("findings[{i}].severity is {:?}: use error, warning or info", f.severity)));
            }
            if f.rule.is_empty() || f.rule.len() > 128 || f.rule.chars().any(char::is_control) {
                return Err(at(format!("findings[{i}].rule: 1-128 characters, no control characters")));
            }
            let path =
                f.path.map(|p| canonical_path(&p)).transpose().map_err(|e| at(format!("findings[{i}].path: {e}")))?;
            out.push(DiagnosticReport {
                severity: f.severity,
                rule: f.rule,
                path,
                line: f.line,
                column: f.line.and(f.column),
                message: f.message,
                validator: step.to_string(),
            });
        }
    }
    Ok(out)
}

/// Runs one validator over every artifact so far (`step` names it in the report).
pub async fn validate_step(
    step: &str,
    validator: &Installed,
    tenant: &str,
    all: &[Artifact],
) -> (StepReport, Result<Vec<DiagnosticReport>, CallError>) {
    let began = Instant::now();
    let name = validator.plugin().manifest().name.clone();
    let result = async {
        let mut v = validator.validator(tenant).await?;
        v.validate(all).await
    }
    .await
    .map(|found| found.into_iter().map(|d| DiagnosticReport::new(d, &name)).collect::<Vec<_>>())
    .or_else(|e| stopped(e, &name));
    let summary = result.as_ref().map(|found| {
        let errors = found.iter().filter(|d| d.is_error()).count();
        let warnings = found.iter().filter(|d| d.severity == "warning").count();
        match tests_summary(found) {
            Some(t) => {
                format!("{errors} errors, {warnings} warnings; {} of {} tests passed in the sandbox", t.passed, t.ran)
            }
            None => format!("{errors} errors, {warnings} warnings"),
        }
    });
    let outcome = match &summary {
        Ok(s) => Ok(s.as_str()),
        Err(e) => Err(e.to_string()),
    };
    (step_report(step, validator, began, TokenCount::default(), outcome), result)
}

/// The rule of the error a validator stopped at its instance's limits leaves.
pub const VALIDATOR_STOPPED: &str = "validator-stopped";

/// A validator the sandbox stopped at its limits (time, memory, a trap such as a stack
/// overflow) is a finding about the project it read (what it ran or parsed made it so: a
/// generated test that loops in code the test runner's budgets cannot see, a file nested deeper
/// than a parser's stack), not a failed step: the run keeps its data, and the error goes to the
/// repair rounds like any other. Other failures (a plugin's own error) stay errors.
fn stopped(e: CallError, validator: &str) -> Result<Vec<DiagnosticReport>, CallError> {
    use qlayer_runtime::CallErrorKind::{OutOfMemory, Timeout, Trap};
    let why = match &e.kind {
        Timeout(d) => format!("ran past its time limit of {} ms", d.as_millis()),
        OutOfMemory { limit, .. } => format!("ran out of its memory limit of {} MiB", limit >> 20),
        Trap(m) => format!("trapped ({})", m.lines().next().unwrap_or("")),
        _ => return Err(e),
    };
    Ok(vec![DiagnosticReport {
        severity: "error".into(),
        rule: VALIDATOR_STOPPED.into(),
        path: None,
        line: None,
        column: None,
        message: format!("the sandbox stopped validator `{validator}` on this project: it {why}"),
        validator: validator.to_string(),
    }])
}

/// The rule of a failing test's assertion (the `tests` validator's): the test's file and line,
/// though the code it tests may be what is wrong, so every repeated step sees it.
pub const TEST_FAILED: &str = "test-failed";

/// The rule of the summary the `tests` validator (the project's tests run in the sandbox) leaves.
pub const TESTS_SUMMARY: &str = "tests-summary";

/// What the project's tests did in the sandbox, read from the `tests` validator's summary
/// (`4 tests ran in the sandbox: 3 passed, 1 failed, 0 skipped; 0 not run`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestsRun {
    /// Tests run (passed, failed and skipped).
    pub ran: u32,
    /// Tests passed.
    pub passed: u32,
    /// Tests not run (they need what the sandbox lacks).
    pub not_run: u32,
}

/// The sandboxed tests' counts in `diagnostics`, when a `tests` validator ran (summed over its
/// summaries: one per validator step).
pub fn tests_summary(diagnostics: &[DiagnosticReport]) -> Option<TestsRun> {
    let mut total: Option<TestsRun> = None;
    for d in diagnostics.iter().filter(|d| d.rule == TESTS_SUMMARY && !d.is_error()) {
        let numbers: Vec<u32> = d
            .message
            .split(|c: char| !c.is_ascii_digit())
            .filter(|w| !w.is_empty())
            .filter_map(|w| w.parse().ok())
            .collect();
        // ran, passed, failed, skipped, not run
        let [ran, passed, _, _, not_run] = numbers[..] else { continue };
        let t = total.get_or_insert_with(TestsRun::default);
        t.ran += ran;
        t.passed += passed;
        t.not_run += not_run;
    }
    total
}

/// How a run that got through its steps ends: `passed` without errors (validators' diagnostics
/// and agents' findings), else `failed-validation` (errors left after `rounds` repair rounds, the
/// limit, naming who found them). Either way the
/// reason names the files no validator checked (`unchecked`), so nothing passes unseen.
pub fn verdict(diagnostics: &[DiagnosticReport], rounds: u32, unchecked: &[String]) -> (&'static str, String) {
    let errors = diagnostics.iter().filter(|d| d.is_error()).count();
    let (status, mut reason) = if errors == 0 {
        ("passed", "every validator passed".to_string())
    } else {
        let mut from: Vec<&str> = diagnostics.iter().filter(|d| d.is_error()).map(|d| d.validator.as_str()).collect();
        from.sort();
        from.dedup();
        let from = from.join(", ");
        (
            "failed-validation",
            format!("{errors} errors remain (found by {from}) after {rounds} repair rounds (the limit)"),
        )
    };
    if let Some(t) = tests_summary(diagnostics) {
        reason.push_str(&format!("; {} of {} tests passed in the sandbox", t.passed, t.ran));
        if t.not_run > 0 {
            reason.push_str(&format!(" ({} not run)", t.not_run));
        }
    }
    if !unchecked.is_empty() {
        let mut named: Vec<&str> = unchecked.iter().take(5).map(String::as_str).collect();
        if unchecked.len() > 5 {
            named.push("…");
        }
        let files = if unchecked.len() == 1 { "file" } else { "files" };
        reason.push_str(&format!("; but no validator checked {} {files}: {}", unchecked.len(), named.join(", ")));
    }
    (status, reason)
}

/// The name in the report of `step`'s round `round` (0 is the first): `developer`,
/// `developer (repair 1)`.
pub fn step_label(step: &str, round: u32) -> String {
    if round == 0 { step.to_string() } else { format!("{step} (repair {round})") }
}

/// The name in the report of a validator's check.
pub fn validate_step_name(validator: &str) -> String {
    format!("validate: {validator}")
}

/// The one spelling of a plugin-supplied relative path: its normal components joined by `/`
/// (`./docs//PRD.json` is `docs/PRD.json`), refusing what [`safe_join`] refuses.
pub fn canonical_path(relative: &str) -> Result<String, String> {
    let joined = safe_join(Path::new(""), relative).map_err(|e| format!("{e:#}"))?;
    let parts: Vec<&str> = joined.components().filter_map(|c| c.as_os_str().to_str()).collect();
    if parts.is_empty() {
        return Err(format!("refusing the path {relative:?}: it names no file"));
    }
    Ok(parts.join("/"))
}

/// `artifacts` with canonical paths; of two with the same path, the later one (as writing them
/// out in order would leave).
pub fn canonical_artifacts(artifacts: Vec<Artifact>) -> Result<Vec<Artifact>, String> {
    let mut out: Vec<Artifact> = Vec::with_capacity(artifacts.len());
    for mut a in artifacts {
        a.path = canonical_path(&a.path).map_err(|e| format!("artifact path: {e}"))?;
        out.retain(|b| b.path != a.path);
        out.push(a);
    }
    Ok(out)
}

/// The files of several steps' outputs, given in pipeline order: each step's files, except one
/// whose path an earlier step wrote (a file has one owner step: the product manager's document
/// is not the developer's to rewrite). Paths are canonical. Returns the files and each one's
/// owner.
pub fn merge_files(
    outputs: Vec<(String, Vec<Artifact>)>,
) -> (Vec<Artifact>, std::collections::HashMap<String, String>) {
    let mut files = Vec::new();
    let mut owners = std::collections::HashMap::new();
    for (step, artifacts) in outputs {
        for file in artifacts {
            if owners.contains_key(&file.path) {
                continue;
            }
            owners.insert(file.path.clone(), step.clone());
            files.push(file);
        }
    }
    (files, owners)
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

/// What the report says of each file (its path checked like [`safe_join`]).
pub fn file_reports(files: &[Artifact]) -> anyhow::Result<Vec<FileReport>> {
    files
        .iter()
        .map(|file| {
            safe_join(Path::new("."), &file.path)?;
            Ok(file_report(file))
        })
        .collect()
}

fn file_report(file: &Artifact) -> FileReport {
    FileReport {
        path: file.path.clone(),
        bytes: file.content.len(),
        sha256: format!("sha256:{}", hex::encode(Sha256::digest(&file.content))),
    }
}

/// Packs `files` and the report (as `qlayer-run.json`) as a gzip-compressed tar under the folder
/// `name/`, in path order, with fixed times and modes so the same run gives the same bytes. A
/// later file with the same path replaces an earlier one, as writing them out would.
pub fn capsule(name: &str, files: &[Artifact], report: &RunReport) -> anyhow::Result<Vec<u8>> {
    let root = Path::new(name);
    let mut entries = std::collections::BTreeMap::new();
    for file in files {
        let path = safe_join(root, &file.path)?;
        entries.insert(path, file.content.as_slice());
    }
    let json = serde_json::to_vec_pretty(report)?;
    entries.insert(root.join(REPORT_FILE), json.as_slice());
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(encoder);
    for (path, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, path, data)?;
    }
    Ok(tar.into_inner()?.finish()?)
}

/// The capsule manifest's annotation with the run's status (`passed`, `failed-validation`).
pub const CAPSULE_STATUS_ANNOTATION: &str = "dev.quantumlayer.capsule.status";

/// The annotations of a capsule pushed as an OCI artifact: its title (the run's name), the
/// requirement as its description (the first 256 characters), the run's status and pipeline.
pub fn capsule_annotations(name: &str, report: &RunReport) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    out.insert("org.opencontainers.image.title".to_string(), name.to_string());
    out.insert("org.opencontainers.image.description".to_string(), report.requirement.chars().take(256).collect());
    out.insert(CAPSULE_STATUS_ANNOTATION.to_string(), report.status.clone());
    if let Some(pipeline) = &report.pipeline {
        out.insert("dev.quantumlayer.capsule.pipeline".to_string(), pipeline.clone());
    }
    out
}

/// The most entries a capsule may hold.
pub const MAX_CAPSULE_FILES: usize = 10_000;
/// The most bytes a capsule's files may unpack to (a gzip bomb stops here).
pub const MAX_CAPSULE_UNPACKED_BYTES: u64 = 512 * 1024 * 1024;

/// What a capsule holds, read into memory and checked: its report and its files.
#[derive(Debug, Clone)]
pub struct CapsuleContents {
    /// The bytes of `qlayer-run.json`.
    pub report_bytes: Vec<u8>,
    /// The report they hold.
    pub report: RunReport,
    /// The files (relative paths, without the capsule's top folder), in the capsule's order.
    pub files: Vec<(String, Vec<u8>)>,
}

/// Reads a capsule (from a run, a download or a registry: it is not trusted) and checks it: one
/// top folder; regular files only (a symlink, hard link or device is refused, naming it); every
/// path relative and inside the folder, none twice; at most [`MAX_CAPSULE_FILES`] entries and
/// [`MAX_CAPSULE_UNPACKED_BYTES`] bytes; a `qlayer-run.json` report; and exactly the files the
/// report lists, each with the size and sha256 it gives.
pub fn read_capsule(capsule: &[u8]) -> anyhow::Result<CapsuleContents> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(capsule));
    let mut top: Option<std::ffi::OsString> = None;
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut report_bytes = None;
    let mut seen = std::collections::BTreeSet::new();
    let mut total: u64 = 0;
    let mut entries = 0usize;
    for entry in archive.entries().context("reading the capsule")? {
        let mut entry = entry.context("reading the capsule")?;
        entries += 1;
        if entries > MAX_CAPSULE_FILES {
            bail!("the capsule holds more than {MAX_CAPSULE_FILES} entries");
        }
        let path = entry.path().context("reading the capsule")?.into_owned();
        let shown = path.display().to_string();
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            continue;
        }
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            let what = if kind.is_symlink() {
                "a symbolic link"
            } else if kind.is_hard_link() {
                "a hard link"
            } else {
                "not a regular file"
            };
            bail!("the capsule's entry `{shown}` is {what}: a capsule holds only regular files");
        }
        let mut parts = path.components();
        match (parts.next(), &top) {
            (Some(Component::Normal(first)), None) => top = Some(first.to_os_string()),
            (Some(Component::Normal(first)), Some(top)) if first == top.as_os_str() => {}
            _ => bail!("the capsule's entry `{shown}` is not inside its one top folder"),
        }
        let relative = parts.as_path().to_str().context("a capsule path is not UTF-8")?.to_string();
        safe_join(Path::new("."), &relative).with_context(|| format!("the capsule's entry `{shown}`"))?;
        let relative = canonical_path(&relative).map_err(|e| anyhow::anyhow!("the capsule's entry `{shown}`: {e}"))?;
        if !seen.insert(relative.clone()) {
            bail!("the capsule holds `{relative}` twice");
        }
        let size = entry.header().size().context("reading the capsule")?;
        total = total.saturating_add(size);
        if total > MAX_CAPSULE_UNPACKED_BYTES {
            bail!("the capsule unpacks to more than {MAX_CAPSULE_UNPACKED_BYTES} bytes");
        }
        let mut bytes = Vec::with_capacity(size.min(1 << 20) as usize);
        std::io::Read::read_to_end(&mut std::io::Read::take(&mut entry, size), &mut bytes)
            .with_context(|| format!("reading `{shown}` from the capsule"))?;
        if relative == REPORT_FILE {
            report_bytes = Some(bytes);
        } else {
            files.push((relative, bytes));
        }
    }
    let report_bytes = report_bytes.with_context(|| format!("the capsule has no {REPORT_FILE}"))?;
    let report: RunReport = serde_json::from_slice(&report_bytes)
        .with_context(|| format!("the capsule's {REPORT_FILE} is not a run report"))?;
    let listed: std::collections::BTreeMap<&str, &FileReport> =
        report.files.iter().map(|f| (f.path.as_str(), f)).collect();
    for (path, bytes) in &files {
        let Some(entry) = listed.get(path.as_str()) else {
            bail!("the capsule holds `{path}`, which its report does not list");
        };
        let sha256 = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        if entry.sha256 != sha256 || entry.bytes != bytes.len() {
            bail!(
                "`{path}` in the capsule is not the file its report lists ({} bytes, {}): it is {} bytes, {sha256}",
                entry.bytes,
                entry.sha256,
                bytes.len()
            );
        }
    }
    if let Some(missing) = report.files.iter().find(|f| !seen.contains(&f.path)) {
        bail!("the capsule lacks `{}`, which its report lists", missing.path);
    }
    Ok(CapsuleContents { report_bytes, report, files })
}

/// Writes a capsule's files and report into `out` (without the capsule's top folder), after
/// [`read_capsule`] has checked all of it (nothing is written from a capsule that fails).
/// Returns the checked contents.
pub fn unpack(capsule: &[u8], out: &Path) -> anyhow::Result<CapsuleContents> {
    let contents = read_capsule(capsule)?;
    let report = (REPORT_FILE.to_string(), contents.report_bytes.clone());
    for (relative, bytes) in contents.files.iter().chain(std::iter::once(&report)) {
        let target = safe_join(out, relative)?;
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        // A link already in `out` is replaced, never followed.
        if std::fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(&target).with_context(|| format!("replacing {}", target.display()))?;
        }
        std::fs::write(&target, bytes).with_context(|| format!("writing {}", target.display()))?;
    }
    Ok(contents)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn artifact_paths_get_one_spelling_and_the_prd_is_not_replaced() {
        let art = |p: &str, c: &str| Artifact { path: p.into(), media_type: "text/plain".into(), content: c.into() };
        assert_eq!(canonical_path("./docs//PRD.json").unwrap(), "docs/PRD.json");
        assert_eq!(canonical_path("a/./b").unwrap(), "a/b");
        assert!(canonical_path("./").is_err());
        assert!(canonical_path("../x").is_err());
        let dev =
            canonical_artifacts(vec![art("./docs/PRD.json", "forged"), art("src/a.rs", "1"), art("src//a.rs", "2")])
                .unwrap();
        assert_eq!(dev.iter().map(|a| a.path.as_str()).collect::<Vec<_>>(), ["docs/PRD.json", "src/a.rs"]);
        assert_eq!(dev[1].content, b"2");
        let (files, owners) =
            merge_files(vec![("pm".into(), vec![art("docs/PRD.json", "the PRD")]), ("dev".into(), dev)]);
        assert_eq!(files.len(), 2);
        assert_eq!(files[0].content, b"the PRD");
        assert_eq!(owners["docs/PRD.json"], "pm");
        assert_eq!(owners["src/a.rs"], "dev");
    }

    #[test]
    fn findings_artifacts_become_diagnostics_and_bad_ones_are_named() {
        let art = |media: &str, c: &str| Artifact {
            path: "docs/REVIEW.json".into(),
            media_type: media.into(),
            content: c.as_bytes().to_vec(),
        };
        let good = art(
            FINDINGS_MEDIA_TYPE,
            r#"{"summary": "s", "findings": [{"severity": "error", "rule": "sql-injection", "path": "./app.py", "line": 3, "message": "m"}]}"#,
        );
        let found = findings(&[good, art("application/json", "not even json")], "reviewer").unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].path.as_deref(), found[0].line), (Some("app.py"), Some(3)));
        assert_eq!(found[0].validator, "reviewer");
        assert!(found[0].is_error());
        let bad = findings(
            &[art(FINDINGS_MEDIA_TYPE, r#"{"findings": [{"severity": "fatal", "rule": "r", "message": "m"}]}"#)],
            "r",
        );
        assert!(bad.unwrap_err().contains("findings[0].severity"));
        let bad = findings(
            &[art(
                FINDINGS_MEDIA_TYPE,
                r#"{"findings": [{"severity": "error", "rule": "r", "message": "m", "path": "../x"}]}"#,
            )],
            "r",
        );
        assert!(bad.unwrap_err().contains("findings[0].path"));
        let bad = findings(&[art(FINDINGS_MEDIA_TYPE, r#"{"findings": [{"severity": "error"}]}"#)], "r").unwrap_err();
        assert!(bad.contains("docs/REVIEW.json") && bad.contains("missing field"), "{bad}");
    }

    #[test]
    fn paths_cannot_escape_the_output_directory() {
        let root = Path::new("/tmp/out");
        assert_eq!(safe_join(root, "src/main.rs").unwrap(), PathBuf::from("/tmp/out/src/main.rs"));
        for bad in ["../x", "/etc/passwd", "a/../../b", ""] {
            assert!(safe_join(root, bad).is_err(), "{bad}");
        }
    }

    fn sample_report(files: &[Artifact]) -> RunReport {
        RunReport {
            requirement: "a todo list".into(),
            status: "passed".into(),
            stop_reason: "every validator passed".into(),
            provider: "scripted".into(),
            pipeline: None,
            repair_rounds: 0,
            steps: vec![],
            diagnostics: vec![],
            files: file_reports(files).unwrap(),
            unchecked: vec![],
            tokens: TokenCount::default(),
            cost: None,
            currency: None,
            duration_ms: 1,
            started_at: 0,
        }
    }

    /// A tar.gz with the entries given as they are (path, type, content), for capsules no run
    /// would write.
    fn raw_capsule(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        for (path, kind, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_mode(0o644);
            if kind.is_symlink() || kind.is_hard_link() {
                header.set_size(0);
                tar.append_link(&mut header, path, std::str::from_utf8(data).unwrap()).unwrap();
            } else {
                header.set_size(data.len() as u64);
                // Raw names: `append_data` refuses `..`, which an attacker's tar has.
                let name = header.as_old_mut();
                name.name[..path.len()].copy_from_slice(path.as_bytes());
                header.set_cksum();
                tar.append(&header, *data).unwrap();
            }
        }
        tar.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn a_capsule_unpacks_only_when_every_entry_is_a_listed_regular_file_inside_it() {
        let art = |p: &str, c: &str| Artifact { path: p.into(), media_type: "text/plain".into(), content: c.into() };
        let files = vec![art("src/main.rs", "fn main() {}\n"), art("README.md", "# todo\n")];
        let report = sample_report(&files);
        let packed = capsule("run-1", &files, &report).unwrap();
        let out = tempfile::tempdir().unwrap();
        let contents = unpack(&packed, out.path()).unwrap();
        assert_eq!(contents.files.len(), 2);
        assert_eq!(std::fs::read_to_string(out.path().join("src/main.rs")).unwrap(), "fn main() {}\n");
        let written: RunReport = serde_json::from_slice(&std::fs::read(out.path().join(REPORT_FILE)).unwrap()).unwrap();
        assert_eq!(written.files.len(), 2);

        let json = serde_json::to_vec(&report).unwrap();
        let regular = tar::EntryType::Regular;
        let refused = |entries: &[(&str, tar::EntryType, &[u8])], expected: &str| {
            let dir = tempfile::tempdir().unwrap();
            let err = format!("{:#}", unpack(&raw_capsule(entries), dir.path()).unwrap_err());
            assert!(err.contains(expected), "{expected:?} not in {err}");
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing written: {err}");
        };
        let main: &[u8] = b"fn main() {}\n";
        let readme: &[u8] = b"# todo\n";
        let base = [
            ("r/qlayer-run.json", regular, json.as_slice()),
            ("r/src/main.rs", regular, main),
            ("r/README.md", regular, readme),
        ];
        // As packed by hand, the same capsule is accepted.
        assert!(read_capsule(&raw_capsule(&base)).is_ok());
        refused(
            &[base[0], base[1], ("r/README.md", tar::EntryType::Symlink, b"/etc/passwd")],
            "`r/README.md` is a symbolic link",
        );
        refused(&[base[0], base[1], ("r/README.md", tar::EntryType::Link, b"r/src/main.rs")], "is a hard link");
        refused(&[base[0], base[1], base[2], ("r/../evil", regular, b"x")], "`r/../evil`");
        refused(&[base[0], base[1], base[2], ("other/x", regular, b"x")], "not inside its one top folder");
        refused(
            &[base[0], base[1], base[2], ("r/extra.txt", regular, b"x")],
            "`extra.txt`, which its report does not list",
        );
        refused(
            &[base[0], base[1], ("r/README.md", regular, b"# tampered")],
            "`README.md` in the capsule is not the file its report lists",
        );
        refused(&[base[0], base[1]], "lacks `README.md`");
        refused(&[base[1], base[2]], "has no qlayer-run.json");
        refused(&[base[0], base[1], base[2], base[2]], "holds `README.md` twice");
        let dir = tempfile::tempdir().unwrap();
        assert!(unpack(b"not a tar.gz", dir.path()).is_err());
    }
}
