//! Pipelines as data: which steps a factory run has, the role plugin of each, what each waits
//! for, the validators after it, the tools its agent is granted, and the repair policy.
//!
//! A pipeline is a TOML (or JSON) document ([`DEFAULT`] is the bundled one). This module reads
//! and checks it on its own (names, references, cycles, ranges) and plans its tasks: round 0 is
//! every step, each followed by its validators, then the `review`; a repair round repeats the
//! steps `repair.steps` names, and their validators, then its own review. Whether the plugins it
//! names exist for a tenant, and are of the right kind, is checked where the installs are
//! (`qlayer-jobs`).
//!
//! Plugin references: `developer` is a bundled plugin; `installed:my-reviewer` the tenant's
//! install of that name; `installed:my-reviewer@sha256:<64 hex>` the same, pinned: the run
//! refuses to start (and a step refuses to run) unless the install has that digest (its OCI
//! manifest digest or its binary's). Tools are always installed: `text-stats`, optionally
//! pinned the same way.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};

/// The bundled default pipeline.
pub const DEFAULT: &str = include_str!("../pipelines/default.toml");
/// The most steps a pipeline may have.
pub const MAX_STEPS: usize = 32;
/// The most validators, and the most tools, one step may have.
pub const MAX_PER_STEP: usize = 16;
/// The most rounds of model tool calls a step may allow.
pub const MAX_TOOL_ROUNDS: u32 = 16;
/// The prefix of an approval gate's task name: `approve-<step>`.
pub const GATE_PREFIX: &str = "approve-";
/// Rounds of model tool calls a step allows when it does not say.
pub const DEFAULT_TOOL_ROUNDS: u32 = 4;
/// The most repair rounds a pipeline may ask for.
pub const MAX_REPAIR_ROUNDS: u32 = 5;
/// The most agent tasks one step may fan out to.
pub const MAX_FAN_OUT: u32 = 16;
/// What joins a fanned-out step's name and its shard's number in a task name:
/// `developer-shard-2`.
pub const SHARD_INFIX: &str = "-shard-";
/// Repair rounds when neither the pipeline nor the run says.
pub const DEFAULT_REPAIR_ROUNDS: u32 = 2;

/// A pipeline definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Its name (1-64 of `a-z`, `0-9`, `-`, `_`); a stored pipeline is named by its path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[a-z0-9][a-z0-9_-]{0,63}$")]
    pub name: Option<String>,
    /// What it is for, in words (at most 1,024 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 1024)]
    pub description: Option<String>,
    /// 1-32 steps, in any order that `after` makes a DAG of.
    #[serde(deserialize_with = "tables")]
    #[schema(min_items = 1, max_items = 32)]
    pub steps: Vec<Step>,
    /// Which steps repeat, and how often, while validator errors remain.
    #[serde(default, deserialize_with = "table")]
    pub repair: Repair,
    /// Configuration for bundled plugins, by plugin name: the keys each reads through
    /// `host.config` (its manifest names them), such as `[config.hap] words = "abuse:darn"`. An
    /// installed plugin's configuration is its install's grants.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, BTreeMap<String, String>>,
}

/// Plugins a pipeline may configure, keys per plugin, and the length of a value (bytes).
const MAX_CONFIGURED: usize = 16;
const MAX_CONFIG_KEYS: usize = 32;
const MAX_CONFIG_VALUE: usize = 64 * 1024;

/// One step: an agent plugin's run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Step {
    /// Unique in the pipeline: 1-48 of `a-z`, `0-9`, `-`, `_`; not `review`, not starting with
    /// `review-` or `validate-`, without `-repair-` (task names are made of these).
    #[schema(pattern = r"^[a-z0-9][a-z0-9_-]{0,47}$")]
    pub name: String,
    /// The agent plugin: a bundled role (`product-manager`, `architect`, `developer`,
    /// `qa-engineer`, `reviewer`, `devops`) or `installed:<name>[@sha256:<hex>]`.
    #[schema(pattern = r"^([a-z0-9][a-z0-9_-]{0,63}|installed:[a-z0-9][a-z0-9_-]{0,63}(@sha256:[0-9a-f]{64})?)$")]
    pub role: String,
    /// Steps whose files this one needs: it runs after them and gets their files (and their
    /// own dependencies').
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// Validators run on the files so far once the step is done: bundled (`syntax`) or
    /// `installed:<name>[@sha256:<hex>]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub validators: Vec<String>,
    /// Installed tool plugins granted to the step's agent (`<name>[@sha256:<hex>]`): it may list
    /// and invoke them, and when it asks a model without tools of its own, the model is offered
    /// them and its tool calls are run and fed back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
    /// Rounds of model tool calls per completion (1-16, default 4); the last round's request
    /// allows no tool, so the model must answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 16)]
    pub tool_rounds: Option<u32>,
    /// The model its agent asks: a model name of the tenant's table on `qlayer serve` (through
    /// the gateway: its routing, limits, budgets and prices; a run's usage is under the key id
    /// `run:<run id>`), or, for `qlayer run`, the model the run's provider asks its upstream for.
    /// Default: the run's provider and its default model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 256, pattern = r"^[^\u0000-\u001f\u007f-\u009f]+$")]
    pub model: Option<String>,
    /// Options for this step's agent, over the run's (`{"language": "go"}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub options: Option<serde_json::Map<String, serde_json::Value>>,
    /// An approval gate: the run pauses after this step and its validators (status `waiting`)
    /// until a person approves (`POST /v1/runs/{id}/approve`) or rejects it with a comment
    /// (`.../reject`), which goes back to the step as feedback in the next repair round; the
    /// steps after it wait. A gated step, and every step after it, must repeat in repair rounds.
    #[serde(default, skip_serializing_if = "is_false")]
    pub gate: bool,
    /// Runs the step as this many agent tasks at once (1-16, default 1), `<step>-shard-1` to
    /// `<step>-shard-<n>`. Each is told its shard (`{"shard": {"index": i, "of": n}}` in its
    /// options) and writes its share of the file plan: the SDK's `file_plan` splits the step's
    /// files by module, whole modules to a shard, the most files first to the least loaded
    /// shard. The steps and validators after it wait for every shard; in a repair round, an
    /// error in a file goes back to the shard that wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 16)]
    pub fan_out: Option<u32>,
}

/// Which of a fanned-out step's agent tasks one is: `index` (1-based) of `of`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// 1 to `of`.
    pub index: u32,
    /// The step's `fan-out`.
    pub of: u32,
}

impl Step {
    /// How many agent tasks the step runs as: its `fan-out`, else 1.
    pub fn shards(&self) -> u32 {
        self.fan_out.unwrap_or(1).max(1)
    }

    /// The base name of shard `index` (1-based) of this step: `<step>-shard-<index>`.
    pub fn shard_task(&self, index: u32) -> String {
        format!("{}{SHARD_INFIX}{index}", self.name)
    }

    /// The base names of the step's agent tasks: its name, or one per shard when it fans out.
    pub fn agent_tasks(&self) -> Vec<String> {
        match self.shards() {
            1 => vec![self.name.clone()],
            n => (1..=n).map(|i| self.shard_task(i)).collect(),
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The repair policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Repair {
    /// Repair rounds after the first validation (0-5, default 2); a run's `max_repair_rounds`
    /// overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 5)]
    pub rounds: Option<u32>,
    /// The steps a repair round repeats, with the errors as feedback (default: every step that
    /// has validators).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<String>>,
}

/// What went wrong reading a table, with its path inside it (`after: invalid type…`).
fn located<E: serde::de::Error>(prefix: &str, e: serde_path_to_error::Error<serde_json::Error>) -> E {
    let path = e.path().to_string();
    let at = if path == "." {
        prefix.to_string()
    } else if prefix.is_empty() {
        path
    } else {
        format!("{prefix}.{path}")
    };
    if at.is_empty() { E::custom(e.inner()) } else { E::custom(format!("{at}: {}", e.inner())) }
}

/// `T` from a table only: serde's derive also reads a struct from a sequence of its fields'
/// values, which no pipeline means.
fn table<'de, D: serde::Deserializer<'de>, T: serde::de::DeserializeOwned>(d: D) -> Result<T, D::Error> {
    let map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
    serde_path_to_error::deserialize(serde_json::Value::Object(map)).map_err(|e| located("", e))
}

/// A list of `T`, each from a table (see [`table`]); an error names the item (`[1].after: …`).
fn tables<'de, D: serde::Deserializer<'de>, T: serde::de::DeserializeOwned>(d: D) -> Result<Vec<T>, D::Error> {
    let items = Vec::<serde_json::Map<String, serde_json::Value>>::deserialize(d)?;
    items
        .into_iter()
        .enumerate()
        .map(|(i, map)| {
            serde_path_to_error::deserialize(serde_json::Value::Object(map)).map_err(|e| located(&format!("[{i}]"), e))
        })
        .collect()
}

/// The nodes of a dependency graph (each with the names it waits for, all of them nodes) that
/// no order can run: those on a cycle or behind one, by name; empty for a DAG (Kahn's algorithm).
pub fn unordered<'a>(nodes: &[(&'a str, &[String])]) -> Vec<&'a str> {
    let mut waiting: HashMap<&str, usize> = nodes.iter().map(|(name, after)| (*name, after.len())).collect();
    let mut ready: Vec<&str> = waiting.iter().filter(|(_, n)| **n == 0).map(|(k, _)| *k).collect();
    while let Some(done) = ready.pop() {
        for (name, _) in nodes.iter().filter(|(_, after)| after.iter().any(|d| d == done)) {
            if let Some(n) = waiting.get_mut(name) {
                *n -= 1;
                if *n == 0 {
                    ready.push(name);
                }
            }
        }
    }
    let mut stuck: Vec<&str> = waiting.into_iter().filter(|(_, n)| *n > 0).map(|(k, _)| k).collect();
    stuck.sort();
    stuck
}

/// A plugin a pipeline names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginRef<'a> {
    /// A first-party plugin baked into the binary.
    Bundled(&'a str),
    /// The tenant's install of this name, optionally pinned to a digest.
    Installed {
        /// The install's name.
        name: &'a str,
        /// `sha256:<hex>`, when pinned.
        digest: Option<&'a str>,
    },
}

impl PluginRef<'_> {
    /// The plugin's name, without its source or pin.
    pub fn name(&self) -> &str {
        match self {
            PluginRef::Bundled(name) | PluginRef::Installed { name, .. } => name,
        }
    }
}

fn valid_name(name: &str, max: usize) -> bool {
    (1..=max).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// Whether `name` may name a pipeline: 1-64 of `a-z`, `0-9`, `-`, `_`, starting with a letter or
/// digit (a stored one's path, and its `name`).
pub fn valid_pipeline_name(name: &str) -> bool {
    valid_name(name, 64)
}

fn installed_ref(text: &str) -> Result<PluginRef<'_>, String> {
    let (name, digest) = match text.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (text, None),
    };
    if !valid_name(name, 64) {
        return Err(format!("`{text}`: an install name is 1-64 of a-z, 0-9, `-`, `_`"));
    }
    if let Some(d) = digest {
        let hex = d.strip_prefix("sha256:").unwrap_or_default();
        if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)) {
            return Err(format!("`{text}`: a pin is `@sha256:` and 64 lowercase hex digits"));
        }
    }
    Ok(PluginRef::Installed { name, digest })
}

/// Reads a role or validator reference: a bundled name, or `installed:<name>[@sha256:<hex>]`.
pub fn plugin_ref(text: &str) -> Result<PluginRef<'_>, String> {
    match text.strip_prefix("installed:") {
        Some(rest) => installed_ref(rest),
        None if valid_name(text, 64) => Ok(PluginRef::Bundled(text)),
        None => Err(format!("`{text}` is neither a bundled plugin's name nor `installed:<name>[@sha256:<hex>]`")),
    }
}

/// Reads a tool reference: `<name>[@sha256:<hex>]` (or with `installed:` before it).
pub fn tool_ref(text: &str) -> Result<PluginRef<'_>, String> {
    installed_ref(text.strip_prefix("installed:").unwrap_or(text))
}

/// What a task of a run is, by its name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TaskRole<'a> {
    /// A step's agent.
    Agent(&'a Step),
    /// One shard of a fanned-out step's agent.
    Shard(&'a Step, Shard),
    /// A validator after a step.
    Validate {
        /// The step it checks the files of.
        step: &'a Step,
        /// The validator's reference, as the step gives it.
        validator: &'a str,
    },
    /// The approval gate after a step.
    Gate(&'a Step),
    /// The end of a round.
    Review,
}

/// A task as planned (the scheduler's task, without its attempts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTask {
    /// Unique in the run.
    pub name: String,
    /// `agent`, `validate` or `review`.
    pub kind: &'static str,
    /// The plugin reference (`factory` for a review).
    pub plugin: String,
    /// Tasks it waits for.
    pub after: Vec<String>,
}

/// The name of `base`'s task in repair round `round` (0: the first).
pub fn round_name(base: &str, round: u32) -> String {
    if round == 0 { base.to_string() } else { format!("{base}-repair-{round}") }
}

/// A task name's base and round.
pub fn split_round(name: &str) -> (&str, u32) {
    match name.rsplit_once("-repair-").and_then(|(base, n)| Some((base, n.parse().ok()?))) {
        Some((base, round)) => (base, round),
        None => (name, 0),
    }
}

/// Where a problem is: `steps[1] (`developer`)`.
fn at(i: usize, step: &Step) -> String {
    format!("steps[{i}] (`{}`)", step.name)
}

impl Pipeline {
    /// The bundled default pipeline.
    pub fn default_pipeline() -> Pipeline {
        // Parsed once per process: every step of a run on the default pipeline asks for it.
        static PARSED: std::sync::OnceLock<Pipeline> = std::sync::OnceLock::new();
        #[allow(clippy::expect_used)] // The bundled text is checked by a test.
        PARSED.get_or_init(|| Pipeline::from_toml(DEFAULT).expect("the bundled default pipeline is valid")).clone()
    }

    /// Reads and checks a pipeline from TOML; the message names the key or step at fault.
    pub fn from_toml(text: &str) -> Result<Pipeline, String> {
        // Read as a tree first, so that an error names its path as a JSON pipeline's does.
        let value: serde_json::Value = toml::from_str(text).map_err(|e| format!("not TOML: {}", e.message().trim()))?;
        Pipeline::from_json(value)
    }

    /// Reads and checks a pipeline from JSON.
    pub fn from_json(value: serde_json::Value) -> Result<Pipeline, String> {
        let pipeline: Pipeline = serde_path_to_error::deserialize(value).map_err(|e| {
            let (path, inner) = (e.path().to_string(), e.inner().to_string());
            match path.as_str() {
                "." => format!("not a pipeline: {inner}"),
                // An item's own path follows its list's: `steps[1].after: …`.
                _ if inner.starts_with('[') => format!("{path}{inner}"),
                _ => format!("{path}: {inner}"),
            }
        })?;
        pipeline.check()?;
        Ok(pipeline)
    }

    /// Checks what can be checked without the tenant's installs.
    pub fn check(&self) -> Result<(), String> {
        if let Some(name) = &self.name
            && !valid_pipeline_name(name)
        {
            return Err(format!("name `{name}`: use 1-64 of a-z, 0-9, `-`, `_`, starting with a letter or digit"));
        }
        if self.description.as_ref().is_some_and(|d| d.chars().count() > 1024) {
            return Err("description: at most 1,024 characters".into());
        }
        if self.config.len() > MAX_CONFIGURED {
            return Err(format!("config: at most {MAX_CONFIGURED} plugins, not {}", self.config.len()));
        }
        for (plugin, keys) in &self.config {
            if keys.len() > MAX_CONFIG_KEYS {
                return Err(format!("config.{plugin}: at most {MAX_CONFIG_KEYS} keys, not {}", keys.len()));
            }
            if let Some((key, _)) = keys.iter().find(|(_, v)| v.len() > MAX_CONFIG_VALUE) {
                return Err(format!("config.{plugin}.{key}: at most {} KiB", MAX_CONFIG_VALUE / 1024));
            }
        }
        if self.steps.is_empty() || self.steps.len() > MAX_STEPS {
            return Err(format!("steps: a pipeline has 1 to {MAX_STEPS} steps, not {}", self.steps.len()));
        }
        let mut names = HashSet::new();
        for (i, step) in self.steps.iter().enumerate() {
            let reserved = step.name == "review"
                || step.name.starts_with("review-")
                || step.name.starts_with("validate-")
                || step.name.starts_with(GATE_PREFIX)
                || step.name.contains("-repair-")
                || step.name.contains(SHARD_INFIX);
            if !valid_name(&step.name, 48) || reserved {
                return Err(format!(
                    "{}: name: use 1-48 of a-z, 0-9, `-`, `_`; not `review`, `review-…`, `validate-…`, `approve-…`, `…-repair-…` or `…-shard-…`",
                    at(i, step)
                ));
            }
            if !names.insert(step.name.as_str()) {
                return Err(format!("{}: name: another step has this name", at(i, step)));
            }
        }
        for (i, step) in self.steps.iter().enumerate() {
            plugin_ref(&step.role).map_err(|e| format!("{}: role {e}", at(i, step)))?;
            let mut seen = HashSet::new();
            for dep in &step.after {
                if !names.contains(dep.as_str()) {
                    return Err(format!("{}: after: no step is named `{dep}`", at(i, step)));
                }
                if dep == &step.name {
                    return Err(format!("{}: after: a step cannot wait for itself", at(i, step)));
                }
                if !seen.insert(dep) {
                    return Err(format!("{}: after: `{dep}` is named twice", at(i, step)));
                }
            }
            for (field, list) in [("validators", &step.validators), ("tools", &step.tools)] {
                if list.len() > MAX_PER_STEP {
                    return Err(format!("{}: {field}: at most {MAX_PER_STEP}, not {}", at(i, step), list.len()));
                }
                let mut seen = HashSet::new();
                for entry in list {
                    let parsed = if field == "tools" { tool_ref(entry) } else { plugin_ref(entry) };
                    let parsed = parsed.map_err(|e| format!("{}: {field}: {e}", at(i, step)))?;
                    if !seen.insert(parsed.name().to_string()) {
                        return Err(format!("{}: {field}: `{}` is named twice", at(i, step), parsed.name()));
                    }
                }
            }
            if let Some(model) = &step.model
                && (model.is_empty() || model.chars().count() > 256 || model.chars().any(char::is_control))
            {
                return Err(format!("{}: model: 1-256 characters, no control characters", at(i, step)));
            }
            if step.tool_rounds.is_some_and(|n| n == 0 || n > MAX_TOOL_ROUNDS) {
                return Err(format!("{}: tool-rounds: 1 to {MAX_TOOL_ROUNDS}", at(i, step)));
            }
            if step.fan_out.is_some_and(|n| n == 0 || n > MAX_FAN_OUT) {
                return Err(format!("{}: fan-out: 1 to {MAX_FAN_OUT} agent tasks", at(i, step)));
            }
        }
        self.check_acyclic()?;
        if self.repair.rounds.is_some_and(|n| n > MAX_REPAIR_ROUNDS) {
            return Err(format!("repair.rounds: 0 to {MAX_REPAIR_ROUNDS}"));
        }
        if let Some(steps) = &self.repair.steps {
            let mut seen = HashSet::new();
            for name in steps {
                if !names.contains(name.as_str()) {
                    return Err(format!("repair.steps: no step is named `{name}`"));
                }
                if !seen.insert(name) {
                    return Err(format!("repair.steps: `{name}` is named twice"));
                }
            }
        }
        for (i, step) in self.steps.iter().enumerate().filter(|(_, s)| s.gate) {
            if !self.repeats(&step.name) {
                return Err(format!(
                    "{}: gate: a gated step must repeat in repair rounds (name it in repair.steps), so that a rejection's comment reaches it",
                    at(i, step)
                ));
            }
            if let Some(after) = self.descendants(step).into_iter().find(|d| !self.repeats(&d.name)) {
                return Err(format!(
                    "{}: gate: `{}` runs after this gate and must repeat in repair rounds too (name it in repair.steps)",
                    at(i, step),
                    after.name
                ));
            }
        }
        Ok(())
    }

    fn check_acyclic(&self) -> Result<(), String> {
        let nodes: Vec<(&str, &[String])> = self.steps.iter().map(|s| (s.name.as_str(), s.after.as_slice())).collect();
        let stuck = unordered(&nodes);
        if !stuck.is_empty() {
            let first = self.steps.iter().position(|s| stuck.contains(&s.name.as_str())).unwrap_or(0);
            return Err(format!(
                "{}: after: the steps' dependencies form a cycle through {}",
                at(first, &self.steps[first]),
                stuck.join(", ")
            ));
        }
        Ok(())
    }

    /// The step named `name`.
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// Repair rounds: the run's, else the pipeline's, else 2.
    pub fn rounds(&self, run: Option<u32>) -> u32 {
        run.or(self.repair.rounds).unwrap_or(DEFAULT_REPAIR_ROUNDS)
    }

    /// The steps a repair round repeats, in pipeline order.
    pub fn repair_steps(&self) -> Vec<&Step> {
        match &self.repair.steps {
            Some(names) => self.steps.iter().filter(|s| names.contains(&s.name)).collect(),
            None => self.steps.iter().filter(|s| !s.validators.is_empty()).collect(),
        }
    }

    /// Whether `step` repeats in repair rounds.
    pub fn repeats(&self, step: &str) -> bool {
        self.repair_steps().iter().any(|s| s.name == step)
    }

    /// Every step `step` waits for, directly or not, in pipeline order.
    pub fn ancestors(&self, step: &Step) -> Vec<&Step> {
        let mut found: HashSet<&str> = HashSet::new();
        let mut todo: Vec<&str> = step.after.iter().map(String::as_str).collect();
        while let Some(name) = todo.pop() {
            if found.insert(name)
                && let Some(s) = self.step(name)
            {
                todo.extend(s.after.iter().map(String::as_str));
            }
        }
        self.steps.iter().filter(|s| found.contains(s.name.as_str())).collect()
    }

    /// Every step that waits for `step`, directly or not, in pipeline order.
    pub fn descendants(&self, step: &Step) -> Vec<&Step> {
        self.steps.iter().filter(|s| self.ancestors(s).iter().any(|a| a.name == step.name)).collect()
    }

    /// The base name of the approval gate after `step`: `approve-<step>`.
    pub fn gate_task(step: &Step) -> String {
        format!("{GATE_PREFIX}{}", step.name)
    }

    /// The gated steps before `step` (its ancestors with `gate`).
    pub fn gates_before(&self, step: &Step) -> Vec<&Step> {
        self.ancestors(step).into_iter().filter(|s| s.gate).collect()
    }

    /// The base name of the task of validator `validator` after `step`: `validate-<name>`, or
    /// `validate-<name>-<step>` when more than one step names a validator of that name.
    pub fn validator_task(&self, step: &Step, validator: &str) -> String {
        let name = plugin_ref(validator).map(|r| r.name().to_string()).unwrap_or_else(|_| validator.to_string());
        let users = self
            .steps
            .iter()
            .filter(|s| s.validators.iter().any(|v| plugin_ref(v).is_ok_and(|r| r.name() == name)))
            .count();
        if users > 1 { format!("validate-{name}-{}", step.name) } else { format!("validate-{name}") }
    }

    /// What the task named `name` is, and its round.
    pub fn task(&self, name: &str) -> Option<(TaskRole<'_>, u32)> {
        let (base, round) = split_round(name);
        if base == "review" {
            return Some((TaskRole::Review, round));
        }
        if let Some(gated) = base.strip_prefix(GATE_PREFIX).and_then(|name| self.step(name)).filter(|s| s.gate) {
            return Some((TaskRole::Gate(gated), round));
        }
        if let Some(step) = self.step(base).filter(|s| s.shards() == 1) {
            return Some((TaskRole::Agent(step), round));
        }
        if let Some((name, index)) = base.rsplit_once(SHARD_INFIX)
            && let Some(step) = self.step(name)
            && let Ok(index) = index.parse::<u32>()
            && (1..=step.shards()).contains(&index)
            && step.shards() > 1
            && step.shard_task(index) == base
        {
            return Some((TaskRole::Shard(step, Shard { index, of: step.shards() }), round));
        }
        self.steps.iter().find_map(|step| {
            let validator = step.validators.iter().find(|v| self.validator_task(step, v) == base)?;
            Some((TaskRole::Validate { step, validator }, round))
        })
    }

    /// The tasks of round `round`: every step in round 0, the repeated ones after; each step's
    /// validators after it; the round's review after all of them.
    pub fn round(&self, round: u32) -> Vec<PlannedTask> {
        let steps: Vec<&Step> = if round == 0 { self.steps.iter().collect() } else { self.repair_steps() };
        let at = |names: Vec<String>, round: u32| names.into_iter().map(move |n| round_name(&n, round));
        let mut tasks = Vec::new();
        for step in steps {
            // A step after a gate waits for the gate's decision (gated steps always repeat); a
            // step after a fanned-out one waits for every shard.
            let waits: Vec<String> = step
                .after
                .iter()
                .flat_map(|dep| match self.step(dep) {
                    Some(d) if d.gate => vec![round_name(&Pipeline::gate_task(d), round)],
                    Some(d) if round > 0 && self.repeats(dep) => at(d.agent_tasks(), round).collect(),
                    Some(d) => d.agent_tasks(),
                    None => vec![dep.clone()],
                })
                .collect();
            let mut checked = Vec::new();
            for base in step.agent_tasks() {
                let this = round_name(&base, round);
                let mut after = waits.clone();
                if round > 0 {
                    after.push(round_name(&base, round - 1));
                    after.push(round_name("review", round - 1));
                }
                tasks.push(PlannedTask { name: this.clone(), kind: "agent", plugin: step.role.clone(), after });
                checked.push(this);
            }
            let agents = checked.clone();
            for validator in &step.validators {
                let name = round_name(&self.validator_task(step, validator), round);
                checked.push(name.clone());
                tasks.push(PlannedTask { name, kind: "validate", plugin: validator.clone(), after: agents.clone() });
            }
            if step.gate {
                tasks.push(PlannedTask {
                    name: round_name(&Pipeline::gate_task(step), round),
                    kind: "gate",
                    plugin: "factory".into(),
                    after: checked,
                });
            }
        }
        let all = tasks.iter().map(|t| t.name.clone()).collect();
        tasks.push(PlannedTask {
            name: round_name("review", round),
            kind: "review",
            plugin: "factory".into(),
            after: all,
        });
        tasks
    }

    /// The step whose agent task (a step's own, or one of its shards') has base name `base`.
    pub fn agent_step(&self, base: &str) -> Option<&Step> {
        match self.task(base)? {
            (TaskRole::Agent(step) | TaskRole::Shard(step, _), 0) => Some(step),
            _ => None,
        }
    }

    /// Each base task name of a validator, with the step it follows.
    pub fn validator_tasks(&self) -> Vec<(String, &Step)> {
        self.steps
            .iter()
            .flat_map(|step| step.validators.iter().map(move |v| (self.validator_task(step, v), step)))
            .collect()
    }

    /// Options for `step`'s agent: the run's (a JSON object's text), with the step's over them,
    /// and for a shard of a fanned-out step, `{"shard": {"index": i, "of": n}}`.
    pub fn options_for(&self, step: &Step, run_options: &str, shard: Option<Shard>) -> String {
        if step.options.is_none() && shard.is_none() {
            return run_options.to_string();
        }
        let mut merged: BTreeMap<String, serde_json::Value> = serde_json::from_str(run_options).unwrap_or_default();
        merged.extend(step.options.iter().flatten().map(|(k, v)| (k.clone(), v.clone())));
        if let Some(Shard { index, of }) = shard {
            merged.insert("shard".into(), serde_json::json!({"index": index, "of": of}));
        }
        serde_json::to_string(&merged).unwrap_or_else(|_| run_options.to_string())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn names(tasks: &[PlannedTask]) -> Vec<&str> {
        tasks.iter().map(|t| t.name.as_str()).collect()
    }

    #[test]
    fn the_default_pipeline_runs_every_role() {
        let p = Pipeline::default_pipeline();
        let round0 = p.round(0);
        assert_eq!(
            names(&round0),
            [
                "product-manager",
                "architect",
                "developer",
                "devops",
                "qa-engineer",
                "reviewer",
                "validate-syntax",
                "validate-tests",
                "validate-secrets",
                "validate-deps",
                "validate-hap",
                "review"
            ]
        );
        let after = |tasks: &[PlannedTask], name: &str| tasks.iter().find(|t| t.name == name).unwrap().after.clone();
        assert_eq!(after(&round0, "developer"), ["architect"]);
        assert_eq!(after(&round0, "devops"), ["architect"], "devops runs beside the developer");
        assert_eq!(after(&round0, "reviewer"), ["qa-engineer", "devops"]);
        assert_eq!(after(&round0, "validate-syntax"), ["reviewer"]);
        assert_eq!(after(&round0, "validate-tests"), ["reviewer"]);
        assert_eq!(after(&round0, "review").len(), 11);
        let syntax = p.step("reviewer").unwrap();
        let mut checked: Vec<&str> = p.ancestors(syntax).iter().map(|s| s.name.as_str()).collect();
        checked.push("reviewer");
        assert_eq!(checked.len(), p.steps.len(), "the syntax validator checks every step's files");
        let round1 = p.round(1);
        assert_eq!(
            names(&round1),
            [
                "developer-repair-1",
                "qa-engineer-repair-1",
                "reviewer-repair-1",
                "validate-syntax-repair-1",
                "validate-tests-repair-1",
                "validate-secrets-repair-1",
                "validate-deps-repair-1",
                "validate-hap-repair-1",
                "review-repair-1"
            ]
        );
        assert_eq!(round1[0].after, ["architect", "developer", "review"]);
        assert_eq!(round1[1].after, ["developer-repair-1", "qa-engineer", "review"]);
        assert_eq!(round1[2].after, ["qa-engineer-repair-1", "devops", "reviewer", "review"]);
        assert_eq!(p.rounds(None), 2);
        assert_eq!(p.rounds(Some(0)), 0);
        assert!(matches!(
            p.task("validate-syntax-repair-1"),
            Some((TaskRole::Validate { validator: "syntax", .. }, 1))
        ));
        assert!(matches!(p.task("developer-repair-2"), Some((TaskRole::Agent(s), 2)) if s.name == "developer"));
        assert!(matches!(p.task("review"), Some((TaskRole::Review, 0))));
        assert_eq!(p.task("nope"), None);
    }

    #[test]
    fn a_validator_two_steps_use_gets_a_task_per_step() {
        let p = Pipeline::from_toml(
            r#"
            [[steps]]
            name = "a"
            role = "product-manager"
            validators = ["syntax"]
            [[steps]]
            name = "b"
            role = "installed:my-dev@sha256:0000000000000000000000000000000000000000000000000000000000000000"
            after = ["a"]
            validators = ["syntax", "installed:lint"]
            tools = ["text-stats"]
            [repair]
            steps = ["a", "b"]
            "#,
        )
        .unwrap();
        assert_eq!(names(&p.round(0)), ["a", "validate-syntax-a", "b", "validate-syntax-b", "validate-lint", "review"]);
        let round1 = p.round(1);
        assert_eq!(round1[2].name, "b-repair-1");
        assert_eq!(round1[2].after, ["a-repair-1", "b", "review"]);
        assert_eq!(p.ancestors(p.step("b").unwrap())[0].name, "a");
        assert!(
            matches!(p.task("validate-syntax-b-repair-1"), Some((TaskRole::Validate { step, .. }, 1)) if step.name == "b")
        );
    }

    #[test]
    fn a_bad_pipeline_is_refused_naming_the_step() {
        let cases = [
            (
                "[[steps]]\nname = \"a\"\nrole = \"developer\"\nafter = [\"b\"]\n[[steps]]\nname = \"b\"\nrole = \"developer\"\nafter = [\"a\"]\n",
                "steps[0] (`a`): after: the steps' dependencies form a cycle through a, b",
            ),
            (
                "[[steps]]\nname = \"a\"\nrole = \"developer\"\nafter = [\"pm\"]\n",
                "steps[0] (`a`): after: no step is named `pm`",
            ),
            ("[[steps]]\nname = \"a\"\nrole = \"developer\"\ngated = true\n", "unknown field `gated`"),
            (
                "[[steps]]\nname = \"a\"\nrole = \"developer\"\ngate = true\n[repair]\nsteps = []\n",
                "steps[0] (`a`): gate: a gated step must repeat",
            ),
            (
                "[[steps]]\nname = \"a\"\nrole = \"developer\"\ngate = true\n[[steps]]\nname = \"b\"\nrole = \"developer\"\nafter = [\"a\"]\n[repair]\nsteps = [\"a\"]\n",
                "steps[0] (`a`): gate: `b` runs after this gate and must repeat",
            ),
            ("[[steps]]\nname = \"approve-a\"\nrole = \"developer\"\n", "steps[0] (`approve-a`): name"),
            ("[[steps]]\nname = \"review\"\nrole = \"developer\"\n", "steps[0] (`review`): name"),
            (
                "[[steps]]\nname = \"a\"\nrole = \"developer\"\n[[steps]]\nname = \"a\"\nrole = \"developer\"\n",
                "steps[1] (`a`): name: another step",
            ),
            ("[[steps]]\nname = \"a\"\nrole = \"installed:X\"\n", "steps[0] (`a`): role `X`"),
            ("[[steps]]\nname = \"a\"\nrole = \"installed:x@sha256:12\"\n", "a pin is"),
            (
                "[[steps]]\nname = \"a\"\nrole = \"developer\"\ntools = [\"t\", \"t\"]\n",
                "steps[0] (`a`): tools: `t` is named twice",
            ),
            ("[[steps]]\nname = \"a\"\nrole = \"developer\"\ntool-rounds = 0\n", "steps[0] (`a`): tool-rounds"),
            (
                "[[steps]]\nname = \"a\"\nrole = \"developer\"\n[repair]\nsteps = [\"b\"]\n",
                "repair.steps: no step is named `b`",
            ),
            ("[[steps]]\nname = \"a\"\nrole = \"developer\"\n[repair]\nrounds = 9\n", "repair.rounds"),
            ("steps = []\n", "steps: a pipeline has 1 to 32 steps, not 0"),
        ];
        for (text, expected) in cases {
            let e = Pipeline::from_toml(text).unwrap_err();
            assert!(e.contains(expected), "{text}\n→ {e}\n(expected {expected})");
        }
        let e = Pipeline::from_json(serde_json::json!({"steps": [{"name": "a", "role": "developer", "colour": 1}]}))
            .unwrap_err();
        assert!(e.starts_with("steps[0]") && e.contains("unknown field `colour`"), "{e}");
    }

    #[test]
    fn a_gate_waits_for_its_step_and_validators_and_the_steps_after_it_wait_for_the_gate() {
        let p = Pipeline::from_toml(
            "[[steps]]\nname = \"pm\"\nrole = \"product-manager\"\n\
             [[steps]]\nname = \"dev\"\nrole = \"developer\"\nafter = [\"pm\"]\nvalidators = [\"syntax\"]\ngate = true\n\
             [[steps]]\nname = \"qa\"\nrole = \"qa-engineer\"\nafter = [\"dev\"]\n\
             [repair]\nsteps = [\"dev\", \"qa\"]\n",
        )
        .unwrap();
        let round0 = p.round(0);
        assert_eq!(names(&round0), ["pm", "dev", "validate-syntax", "approve-dev", "qa", "review"]);
        assert_eq!(round0[3].kind, "gate");
        assert_eq!(round0[3].after, ["dev", "validate-syntax"]);
        assert_eq!(round0[4].after, ["approve-dev"]);
        let round1 = p.round(1);
        assert_eq!(round1[2].name, "approve-dev-repair-1");
        assert_eq!(round1[3].after, ["approve-dev-repair-1", "qa", "review"]);
        assert!(matches!(p.task("approve-dev-repair-1"), Some((TaskRole::Gate(s), 1)) if s.name == "dev"));
        assert_eq!(p.task("approve-pm"), None, "pm has no gate");
        assert_eq!(p.gates_before(p.step("qa").unwrap())[0].name, "dev");
        assert_eq!(Pipeline::from_json(serde_json::to_value(&p).unwrap()).unwrap(), p, "a gate survives storage");
    }

    #[test]
    fn a_fanned_out_step_runs_as_shards_and_what_follows_waits_for_all_of_them() {
        let p = Pipeline::from_toml(
            "[[steps]]\nname = \"architect\"\nrole = \"architect\"\n\
             [[steps]]\nname = \"developer\"\nrole = \"developer\"\nafter = [\"architect\"]\nfan-out = 3\nvalidators = [\"syntax\"]\n\
             [[steps]]\nname = \"qa\"\nrole = \"qa-engineer\"\nafter = [\"developer\"]\n\
             [repair]\nsteps = [\"developer\", \"qa\"]\n",
        )
        .unwrap();
        let round0 = p.round(0);
        assert_eq!(
            names(&round0),
            [
                "architect",
                "developer-shard-1",
                "developer-shard-2",
                "developer-shard-3",
                "validate-syntax",
                "qa",
                "review"
            ]
        );
        let shards = ["developer-shard-1", "developer-shard-2", "developer-shard-3"];
        for t in &round0[1..4] {
            assert_eq!(t.after, ["architect"], "the shards run at once");
            assert_eq!(t.kind, "agent");
        }
        assert_eq!(round0[4].after, shards, "the validator waits for every shard");
        assert_eq!(round0[5].after, shards, "so does the next step");
        let round1 = p.round(1);
        assert_eq!(round1[1].name, "developer-shard-2-repair-1");
        assert_eq!(round1[1].after, ["architect", "developer-shard-2", "review"], "a shard repairs its own files");
        assert_eq!(
            round1[4].after,
            ["developer-shard-1-repair-1", "developer-shard-2-repair-1", "developer-shard-3-repair-1", "qa", "review"]
        );
        let developer = p.step("developer").unwrap();
        assert!(matches!(
            p.task("developer-shard-3-repair-1"),
            Some((TaskRole::Shard(s, Shard { index: 3, of: 3 }), 1)) if s.name == "developer"
        ));
        assert_eq!(p.task("developer"), None, "a fanned-out step has no task of its own name");
        assert_eq!(p.task("developer-shard-4"), None);
        assert_eq!(p.task("developer-shard-0"), None);
        assert_eq!(p.task("developer-shard-01"), None);
        assert_eq!(p.agent_step("developer-shard-2").map(|s| &s.name), Some(&developer.name));
        assert_eq!(p.agent_step("qa").map(|s| s.name.as_str()), Some("qa"));
        assert_eq!(p.agent_step("validate-syntax"), None);
        assert_eq!(Pipeline::from_json(serde_json::to_value(&p).unwrap()).unwrap(), p, "fan-out survives storage");
        for (text, expected) in [
            ("[[steps]]\nname = \"a\"\nrole = \"developer\"\nfan-out = 0\n", "steps[0] (`a`): fan-out: 1 to 16"),
            ("[[steps]]\nname = \"a\"\nrole = \"developer\"\nfan-out = 17\n", "steps[0] (`a`): fan-out: 1 to 16"),
            ("[[steps]]\nname = \"a-shard-1\"\nrole = \"developer\"\n", "steps[0] (`a-shard-1`): name"),
        ] {
            let e = Pipeline::from_toml(text).unwrap_err();
            assert!(e.contains(expected), "{text}\n→ {e}");
        }
        let one = Pipeline::from_toml("[[steps]]\nname = \"a\"\nrole = \"developer\"\nfan-out = 1\n").unwrap();
        assert_eq!(names(&one.round(0)), ["a", "review"], "a fan-out of 1 is the step itself");
    }

    #[test]
    fn a_steps_options_go_over_the_runs() {
        let p =
            Pipeline::from_toml("[[steps]]\nname = \"a\"\nrole = \"developer\"\n[steps.options]\nlanguage = \"go\"\n")
                .unwrap();
        let step = p.step("a").unwrap();
        assert_eq!(p.options_for(step, r#"{"language":"python","x":1}"#, None), r#"{"language":"go","x":1}"#);
        assert_eq!(
            p.options_for(step, "{}", Some(Shard { index: 2, of: 3 })),
            r#"{"language":"go","shard":{"index":2,"of":3}}"#
        );
    }
}
