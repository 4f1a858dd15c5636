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
        world: "quantumlayer:plugin/agent-plugin@0.3.0",
        with: {
            "quantumlayer:plugin/types@0.2.0": crate::__bindings::quantumlayer::plugin0_2_0::types,
            "quantumlayer:plugin/host@0.2.0": crate::__bindings::quantumlayer::plugin0_2_0::host,
            "quantumlayer:plugin/types@0.3.0": crate::__bindings::quantumlayer::plugin0_3_0::types,
            "quantumlayer:plugin/llm@0.2.0": generate,
            "quantumlayer:plugin/tools@0.2.0": generate,
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
    bindings::quantumlayer::plugin0_2_0::llm::complete(request)
}

pub use bindings::quantumlayer::plugin0_2_0::tools::ToolInfo;

/// The tools this step was granted (the pipeline names them); empty when none are.
pub fn tools() -> Vec<ToolInfo> {
    bindings::quantumlayer::plugin0_2_0::tools::list()
}

/// Invokes granted tool `name` with JSON input and returns its JSON output. The host runs it in
/// the tool's own sandbox for this tenant; a name not granted is [`PluginError::InvalidInput`].
///
/// ```no_run
/// let out = qlayer_sdk::agent::invoke_tool("text-stats", r#"{"text": "hello world"}"#)?;
/// # Ok::<(), qlayer_sdk::PluginError>(())
/// ```
pub fn invoke_tool(name: &str, input_json: &str) -> Result<String, PluginError> {
    bindings::quantumlayer::plugin0_2_0::tools::invoke(name, input_json)
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

/// Which of a fanned-out step's agents this task is (the pipeline's `fan-out`): shard `index`
/// (1-based) of `of`, each writing its share of the file plan at the same time as the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// 1 to `of`.
    pub index: u32,
    /// How many shards the step runs as.
    pub of: u32,
}

/// The task's shard (its options' `shard`: `{"index": i, "of": n}`), when its step fans out.
pub fn shard(task: &Task) -> Option<Shard> {
    let options: serde_json::Value = serde_json::from_str(&task.options_json).ok()?;
    let shard = options.get("shard")?;
    let (index, of) = (shard.get("index")?.as_u64()?, shard.get("of")?.as_u64()?);
    let (index, of) = (u32::try_from(index).ok()?, u32::try_from(of).ok()?);
    (of > 1 && (1..=of).contains(&index)).then_some(Shard { index, of })
}

/// The architect's file plan (the task's `docs/DESIGN.json` input), split for `owner`: the
/// paths it gives `owner`, and those it gives anyone else. Both empty when there is no design or
/// it has no file plan.
///
/// When the task is a shard of a fanned-out step ([`shard`]), `owner`'s files are split by
/// module ([`shard_modules`]) and only this shard's are its own: the other shards' go with
/// everyone else's ([`split_plan`] keeps them apart).
pub fn file_plan(task: &Task, owner: &str) -> (Vec<String>, Vec<String>) {
    let SplitPlan { mine, mut others, siblings } = split_plan(task, owner);
    others.extend(siblings);
    (mine, others)
}

/// A file plan split for one owner's task ([`split_plan`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SplitPlan {
    /// The files this task writes.
    pub mine: Vec<String>,
    /// The files the other shards of its step write (empty when the step does not fan out).
    pub siblings: Vec<String>,
    /// The files other steps write.
    pub others: Vec<String>,
}

/// [`file_plan`], with the files of the task's sibling shards apart from other steps'.
pub fn split_plan(task: &Task, owner: &str) -> SplitPlan {
    let design = input(task, DESIGN_PATH).and_then(|d| serde_json::from_str::<serde_json::Value>(d).ok());
    let files = design.as_ref().and_then(|d| d.get("files")?.as_array().cloned()).unwrap_or_default();
    let (mut owned, mut split) = (Vec::new(), SplitPlan::default());
    for f in &files {
        let Some(path) = f.get("path").and_then(serde_json::Value::as_str) else { continue };
        match f.get("owner").and_then(serde_json::Value::as_str) == Some(owner) {
            true => {
                let module = f.get("module").and_then(serde_json::Value::as_str).unwrap_or_default();
                owned.push((path.to_string(), module.to_string()));
            }
            false => split.others.push(path.to_string()),
        }
    }
    let Some(shard) = shard(task) else {
        split.mine = owned.into_iter().map(|(p, _)| p).collect();
        return split;
    };
    let shards = shard_modules(&owned, shard.of);
    for (path, module) in owned {
        match shards.get(&module) == Some(&shard.index) {
            true => split.mine.push(path),
            false => split.siblings.push(path),
        }
    }
    split
}

/// Which shard (1 to `of`) writes each module of `files` (path, module): whole modules, the
/// largest first (ties in plan order) to the shard with the fewest files so far (ties to the
/// lowest). Files with no module are one module, `""`, and always shard 1's (a project's
/// manifest and README belong together). The same plan always gives the same split, so every
/// shard computes it alike.
///
/// ```
/// let files = [("Cargo.toml", ""), ("src/a.rs", "a"), ("src/a/x.rs", "a"), ("src/b.rs", "b")]
///     .map(|(p, m)| (p.to_string(), m.to_string()));
/// let split = qlayer_sdk::agent::shard_modules(&files, 2);
/// assert_eq!((split[""], split["a"], split["b"]), (1, 2, 1));
/// ```
pub fn shard_modules(files: &[(String, String)], of: u32) -> std::collections::BTreeMap<String, u32> {
    let mut modules: Vec<(&str, usize)> = Vec::new();
    for (_, module) in files {
        match modules.iter_mut().find(|entry| entry.0 == module.as_str()) {
            Some(entry) => entry.1 += 1,
            None => modules.push((module.as_str(), 1)),
        }
    }
    let project = modules.iter().position(|(m, _)| m.is_empty()).map(|i| modules.remove(i));
    modules.sort_by_key(|m| std::cmp::Reverse(m.1));
    let mut load = vec![0usize; of.max(1) as usize];
    let mut split = std::collections::BTreeMap::new();
    for (module, n) in project.into_iter().chain(modules) {
        let least = match module.is_empty() {
            true => 0,
            false => (0..load.len()).min_by_key(|&i| (load[i], i)).unwrap_or(0),
        };
        load[least] += n;
        split.insert(module.to_string(), least as u32 + 1);
    }
    split
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

/// Diagnostics as a list for a prompt: `- [rule] path:line:column: message`.
pub fn feedback_text(feedback: &[crate::Diagnostic]) -> String {
    feedback
        .iter()
        .map(|d| {
            let place = match (&d.path, d.line) {
                (Some(p), Some(l)) => match d.column {
                    Some(c) => format!("{p}:{l}:{c}"),
                    None => format!("{p}:{l}"),
                },
                (Some(p), None) => p.clone(),
                _ => "project".into(),
            };
            format!("- [{}] {place}: {}", d.rule, d.message)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The run's options (the task's `options_json`) as a prompt line, or nothing when there are
/// none. A shard's place (`shard`, see [`shard`]) is for the agent, not the model, and is left out.
pub fn options_line(task: &Task) -> String {
    let mut options = task.options_json.trim().to_string();
    if let Ok(serde_json::Value::Object(mut map)) = serde_json::from_str(&options)
        && map.remove("shard").is_some()
    {
        options = serde_json::Value::Object(map).to_string();
    }
    match options.as_str() {
        "" | "{}" => String::new(),
        options => format!("\nOptions (honour them): {options}"),
    }
}

#[doc(hidden)]
pub struct Adapter<T>(PhantomData<T>);

impl<T: Agent> bindings::exports::quantumlayer::plugin0_3_0::agent::Guest for Adapter<T> {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::Artifact;

    fn task(design: serde_json::Value, options: &str) -> Task {
        Task {
            requirement: "r".into(),
            inputs: vec![Artifact::text(DESIGN_PATH, design.to_string())],
            feedback: vec![],
            options_json: options.into(),
        }
    }

    #[test]
    fn a_shard_owns_whole_modules_and_the_others_are_theirs() {
        let design = serde_json::json!({"files": [
            {"path": "Cargo.toml", "owner": "developer", "purpose": "p"},
            {"path": "src/store.rs", "owner": "developer", "purpose": "p", "module": "store"},
            {"path": "src/store/sql.rs", "owner": "developer", "purpose": "p", "module": "store"},
            {"path": "src/api.rs", "owner": "developer", "purpose": "p", "module": "api"},
            {"path": "src/cli.rs", "owner": "developer", "purpose": "p", "module": "cli"},
            {"path": "tests/it.rs", "owner": "qa-engineer", "purpose": "p"},
        ]});
        let whole = file_plan(&task(design.clone(), "{}"), "developer");
        assert_eq!(whole.0.len(), 5);
        assert_eq!(whole.1, ["tests/it.rs"]);
        let shard = |i: u32| {
            file_plan(
                &task(design.clone(), &format!(r#"{{"language":"rust","shard":{{"index":{i},"of":3}}}}"#)),
                "developer",
            )
        };
        // `store` (2 files) to the emptiest shard after the manifest's, then `api` and `cli`.
        assert_eq!(shard(1).0, ["Cargo.toml", "src/cli.rs"]);
        assert_eq!(shard(2).0, ["src/store.rs", "src/store/sql.rs"]);
        assert_eq!(shard(3).0, ["src/api.rs"]);
        let t = task(design.clone(), r#"{"shard":{"index":3,"of":3}}"#);
        assert_eq!(
            split_plan(&t, "developer").siblings,
            ["Cargo.toml", "src/store.rs", "src/store/sql.rs", "src/cli.rs"]
        );
        assert_eq!(split_plan(&t, "developer").others, ["tests/it.rs"]);
        for i in 1..=3 {
            let (mine, theirs) = shard(i);
            assert_eq!(mine.len() + theirs.len(), 6, "every file is someone's");
            assert!(mine.iter().all(|p| !theirs.contains(p)));
        }
        let t = task(design, r#"{"language":"rust","shard":{"index":2,"of":3}}"#);
        assert_eq!(super::shard(&t), Some(Shard { index: 2, of: 3 }));
        assert_eq!(options_line(&t), "\nOptions (honour them): {\"language\":\"rust\"}", "the model is not told");
        let only = Task { options_json: r#"{"shard":{"index":1,"of":2}}"#.into(), ..t };
        assert_eq!(options_line(&only), "");
        for bad in [
            r#"{"shard":{"index":3,"of":2}}"#,
            r#"{"shard":{"index":0,"of":2}}"#,
            r#"{"shard":{"index":1,"of":1}}"#,
            "x",
        ] {
            assert_eq!(super::shard(&Task { options_json: bad.into(), ..only.clone() }), None, "{bad}");
        }
    }

    #[test]
    fn more_shards_than_modules_leave_some_with_nothing() {
        let files = [("README.md", ""), ("a.py", "a")].map(|(p, m)| (p.to_string(), m.to_string()));
        let split = shard_modules(&files, 4);
        assert_eq!(split.values().copied().collect::<Vec<_>>(), [1, 2]);
    }
}
