//! Role agents: implement [`Agent`] and export it with [`export_agent!`](crate::export_agent).
//! Agents reach models only through [`complete`] (the host's `llm` import), which the host routes
//! through the tenant's providers and quotas.
//!
//! ```
//! use qlayer_sdk::{agent::Agent, *};
//!
//! struct Summariser;
//! impl Agent for Summariser {
//!     fn role() -> String { "summariser".into() }
//!     fn run(task: Task) -> Result<AgentOutput, PluginError> {
//!         let reply = qlayer_sdk::agent::complete(&CompletionRequest::new(
//!             vec![Message::new(Role::User, task.requirement)],
//!         ))?;
//!         Ok(AgentOutput { artifacts: vec![Artifact::text("SUMMARY.md", reply.text)], summary: "summarised".into() })
//!     }
//! }
//! qlayer_sdk::export_agent!(Summariser);
//! ```

use crate::{AgentOutput, Completion, CompletionRequest, Message, PluginError, ResponseFormat, Role, Task, Usage};
use serde::de::DeserializeOwned;
use std::marker::PhantomData;

#[doc(hidden)]
#[allow(missing_docs, unsafe_code, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "quantumlayer:plugin/agent-plugin",
        with: {
            "quantumlayer:plugin/types@0.2.0": crate::__bindings::quantumlayer::plugin::types,
            "quantumlayer:plugin/host@0.2.0": crate::__bindings::quantumlayer::plugin::host,
        },
        pub_export_macro: true,
        export_macro_name: "__export_agent_world",
        default_bindings_module: "qlayer_sdk::agent::bindings",
    });
}

/// A role agent.
pub trait Agent: 'static {
    /// The role played, such as `product-manager`.
    fn role() -> String;
    /// Does the task.
    fn run(task: Task) -> Result<AgentOutput, PluginError>;
}

/// Asks the host for a completion.
///
/// ```no_run
/// # use qlayer_sdk::*;
/// let reply = qlayer_sdk::agent::complete(&CompletionRequest {
///     max_tokens: Some(100),
///     ..CompletionRequest::new(vec![Message::new(Role::User, "hi")])
/// })?;
/// # Ok::<(), PluginError>(())
/// ```
pub fn complete(request: &CompletionRequest) -> Result<Completion, PluginError> {
    bindings::quantumlayer::plugin::llm::complete(request)
}

pub use bindings::quantumlayer::plugin::tools::ToolInfo;

/// The tools this step was granted (the pipeline names them); empty when none are.
pub fn tools() -> Vec<ToolInfo> {
    bindings::quantumlayer::plugin::tools::list()
}

/// Invokes granted tool `name` with JSON input and returns its JSON output. The host runs it in
/// the tool's own sandbox for this tenant; a name not granted is [`PluginError::InvalidInput`].
///
/// ```no_run
/// let out = qlayer_sdk::agent::invoke_tool("text-stats", r#"{"text": "hello world"}"#)?;
/// # Ok::<(), qlayer_sdk::PluginError>(())
/// ```
pub fn invoke_tool(name: &str, input_json: &str) -> Result<String, PluginError> {
    bindings::quantumlayer::plugin::tools::invoke(name, input_json)
}

/// A value parsed from the model's JSON reply, with the usage of every attempt.
#[derive(Debug)]
pub struct JsonReply<T> {
    /// The parsed value.
    pub value: T,
    /// Tokens used over all attempts.
    pub usage: Usage,
    /// How many completions it took.
    pub attempts: u32,
}

/// Asks for JSON and parses it as `T`. When the reply is not valid, the error is sent back to the
/// model and it is asked again, at most `max_attempts` times in all (weaker models often need one
/// correction; an endless loop helps no one). `check` validates the parsed value beyond its shape.
///
/// Once the attempts are spent it fails with [`PluginError::InvalidInput`] naming the last
/// problem: a model that does not give usable JSON is not an outage, so the host neither retries
/// the step nor counts it against the plugin's circuit breaker. Errors of the completion itself
/// (the provider unavailable, rate limited, ...) are returned as they are.
///
/// ```no_run
/// # use qlayer_sdk::*;
/// #[derive(serde::Deserialize)]
/// struct Plan { steps: Vec<String> }
/// let reply = qlayer_sdk::agent::complete_json::<Plan>(
///     vec![Message::new(Role::User, "Plan a todo app as {\"steps\": [...]}")],
///     3,
///     |plan| if plan.steps.is_empty() { Err("`steps` is empty".into()) } else { Ok(()) },
/// )?;
/// # Ok::<(), PluginError>(())
/// ```
pub fn complete_json<T: DeserializeOwned>(
    mut messages: Vec<Message>,
    max_attempts: u32,
    check: impl Fn(&T) -> Result<(), String>,
) -> Result<JsonReply<T>, PluginError> {
    let mut usage = Usage { prompt_tokens: 0, completion_tokens: 0 };
    let mut last_problem = String::new();
    for attempt in 1..=max_attempts.max(1) {
        let reply = complete(&CompletionRequest {
            temperature: Some(0.2),
            response_format: ResponseFormat::JsonObject,
            ..CompletionRequest::new(messages.clone())
        })?;
        usage.prompt_tokens += reply.usage.prompt_tokens;
        usage.completion_tokens += reply.usage.completion_tokens;
        let problem = match crate::json::extract::<T>(&reply.text) {
            Ok(value) => match check(&value) {
                Ok(()) => return Ok(JsonReply { value, usage, attempts: attempt }),
                Err(problem) => format!(
                    "Your previous reply could not be used: {problem}. Reply with only the corrected JSON object."
                ),
            },
            Err(e) => e.feedback(),
        };
        crate::host::warn(&format!("attempt {attempt}/{max_attempts}: {problem}"));
        messages.push(Message::new(Role::Assistant, reply.text));
        messages.push(Message::new(Role::User, problem.clone()));
        last_problem = problem;
    }
    Err(PluginError::InvalidInput(format!(
        "the model gave no usable JSON after {max_attempts} attempts; last problem: {last_problem}"
    )))
}

/// The media type of an agent's findings artifact: a reviewer's (or any agent's) JSON list of
/// diagnostics, `{"findings": [{"severity", "rule", "path", "line", "message"}]}`. The host reads
/// it like a validator's diagnostics: errors feed the repair loop, and the run's report lists them
/// under the step's name. The artifact is also one of the project's files.
pub const FINDINGS_MEDIA_TYPE: &str = "application/vnd.qlayer.findings+json";

/// The path of the architect's design, with its file plan (`files`: `path`, `owner`, `purpose`).
pub const DESIGN_PATH: &str = "docs/DESIGN.json";
/// The path of the product manager's PRD.
pub const PRD_PATH: &str = "docs/PRD.json";

/// A file as a model writes it in a JSON reply (`{"path": ..., "content": ...}`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileReply {
    /// Relative path.
    pub path: String,
    /// The whole file.
    pub content: String,
}

impl FileReply {
    /// As an artifact.
    pub fn artifact(self) -> crate::Artifact {
        crate::Artifact::text(self.path, self.content)
    }
}

/// Checks a path a model gave: relative, no `..` or empty parts, no drive, no control characters.
///
/// ```
/// assert!(qlayer_sdk::agent::check_path("src/main.rs").is_ok());
/// assert!(qlayer_sdk::agent::check_path("../etc/passwd").is_err());
/// ```
pub fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.starts_with('/') || path.starts_with('\\') || path.contains(':') {
        return Err(format!("path `{path}` must be relative"));
    }
    if path.split(['/', '\\']).any(|part| part == ".." || part.is_empty()) {
        return Err(format!("path `{path}` must not contain `..` or empty parts"));
    }
    if path.chars().any(|c| c.is_control()) {
        return Err(format!("path {path:?} contains control characters"));
    }
    Ok(())
}

/// Checks the files of a reply: 1 to `max_files`, each path valid ([`check_path`]) and given
/// once, each at most `max_bytes`.
pub fn check_files(files: &[FileReply], max_files: usize, max_bytes: usize) -> Result<(), String> {
    if files.is_empty() {
        return Err("`files` is empty".into());
    }
    if files.len() > max_files {
        return Err(format!("{} files is more than the {max_files} allowed", files.len()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for f in files {
        check_path(&f.path)?;
        if f.content.len() > max_bytes {
            return Err(format!("`{}` is larger than {max_bytes} bytes", f.path));
        }
        if !seen.insert(f.path.as_str()) {
            return Err(format!("`{}` appears twice", f.path));
        }
    }
    Ok(())
}

/// The text of the task's input artifact at `path`, if there is one and it is UTF-8.
pub fn input<'a>(task: &'a Task, path: &str) -> Option<&'a str> {
    task.inputs.iter().find(|a| a.path == path).and_then(crate::Artifact::as_text)
}

/// The task's PRD (its `docs/PRD.json` input): the text, and the JSON. An error names what is
/// missing or wrong.
pub fn prd(task: &Task) -> Result<(&str, serde_json::Value), crate::PluginError> {
    let text = input(task, PRD_PATH)
        .ok_or_else(|| crate::PluginError::InvalidInput(format!("the task has no {PRD_PATH} input")))?;
    let value = serde_json::from_str(text)
        .map_err(|e| crate::PluginError::InvalidInput(format!("{PRD_PATH} is not JSON: {e}")))?;
    Ok((text, value))
}

/// The strings of the JSON array `field` of `value` (a PRD's `acceptance_criteria`, say); empty
/// when there is none.
pub fn strings(value: &serde_json::Value, field: &str) -> Vec<String> {
    value
        .get(field)
        .and_then(serde_json::Value::as_array)
        .map(|items| items.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// The task's input files other than `except`, as `--- path` blocks, for a prompt.
pub fn files_text(task: &Task, except: &[&str]) -> String {
    task.inputs
        .iter()
        .filter(|a| !except.contains(&a.path.as_str()))
        .filter_map(|a| a.as_text().map(|t| format!("--- {}\n{t}\n", a.path)))
        .collect()
}

/// The architect's file plan (the task's `docs/DESIGN.json` input), split for `owner`: the
/// paths it gives `owner`, and those it gives anyone else. Both empty when there is no design or
/// it has no file plan.
pub fn file_plan(task: &Task, owner: &str) -> (Vec<String>, Vec<String>) {
    let design = input(task, DESIGN_PATH).and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok());
    let files = design.as_ref().and_then(|d| d.get("files")?.as_array().cloned()).unwrap_or_default();
    let (mut mine, mut theirs) = (Vec::new(), Vec::new());
    for f in &files {
        let Some(path) = f.get("path").and_then(serde_json::Value::as_str) else { continue };
        match f.get("owner").and_then(serde_json::Value::as_str) == Some(owner) {
            true => mine.push(path.to_string()),
            false => theirs.push(path.to_string()),
        }
    }
    (mine, theirs)
}

/// Checks written files against the file plan: each of `mine` is written, and none that the plan
/// gives another owner (`theirs`).
pub fn check_plan(files: &[FileReply], mine: &[String], theirs: &[String]) -> Result<(), String> {
    let written: Vec<String> = files.iter().map(|f| normal_path(&f.path)).collect();
    if let Some(missing) = mine.iter().find(|p| !written.contains(&normal_path(p))) {
        return Err(format!("the file plan gives you `{missing}`, and the reply does not write it"));
    }
    let theirs: Vec<String> = theirs.iter().map(|p| normal_path(p)).collect();
    if let Some(f) = files.iter().find(|f| theirs.contains(&normal_path(&f.path))) {
        return Err(format!("`{}` belongs to another step in the file plan; do not write it", f.path));
    }
    Ok(())
}

/// A relative path in one spelling: `./src//a.rs` is `src/a.rs` (as the host writes it).
///
/// ```
/// assert_eq!(qlayer_sdk::agent::normal_path("./src//a.rs"), "src/a.rs");
/// ```
pub fn normal_path(path: &str) -> String {
    path.split(['/', '\\']).filter(|p| !p.is_empty() && *p != ".").collect::<Vec<_>>().join("/")
}

/// Diagnostics as a list for a prompt: `- [rule] path:line: message`.
pub fn feedback_text(feedback: &[crate::Diagnostic]) -> String {
    feedback
        .iter()
        .map(|d| {
            let place = match (&d.path, d.line) {
                (Some(p), Some(l)) => format!("{p}:{l}"),
                (Some(p), None) => p.clone(),
                _ => "project".into(),
            };
            format!("- [{}] {place}: {}", d.rule, d.message)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The run's options (the task's `options_json`) as a prompt line, or nothing when there are none.
pub fn options_line(task: &Task) -> String {
    match task.options_json.trim() {
        "" | "{}" => String::new(),
        options => format!("\nOptions (honour them): {options}"),
    }
}

#[doc(hidden)]
pub struct Adapter<T>(PhantomData<T>);

impl<T: Agent> bindings::exports::quantumlayer::plugin::agent::Guest for Adapter<T> {
    fn role() -> String {
        T::role()
    }
    fn run(task: Task) -> Result<AgentOutput, PluginError> {
        T::run(task)
    }
}

/// Exports an [`Agent`] as this component's `agent` interface.
///
/// ```ignore
/// qlayer_sdk::export_agent!(MyAgent);
/// ```
#[macro_export]
macro_rules! export_agent {
    ($agent:ty) => {
        $crate::__export_world!(agent, Agent, __export_agent_world, $agent);
    };
}
