//! The `scripted` provider: a deterministic, offline **test double**, not a language model.
//!
//! It answers from a script (config key `script`, JSON) or, without one, from built-in rules keyed
//! on the agent role named in the system message (`Role: product-manager`, `architect`,
//! `developer`, `qa-engineer`, `reviewer`, `devops`) and on the prompt. It lets `qlayer run` work on a machine with no model and gives tests exact,
//! repeatable replies. Its output is a template project, not generated code: configure a real
//! provider (`--provider openai`) for that.
//!
//! Script format: `{"rules": [{"role": "developer", "contains": "rust-syntax", "reply": "..."}]}`.
//! The first rule whose `role` (if any) appears in the system message and whose `contains` (if any)
//! appears in the conversation gives the reply; with no match the built-in rules answer. A rule
//! may call tools instead of (or besides) replying: `"tool_calls": [{"name": "text-stats",
//! "arguments": {"text": "..."}}]`; such a rule applies only to a request that offers tools and
//! allows them (`tool_choice` not `none`).

use qlayer_sdk::provider::{ChunkSource, Provider};
use qlayer_sdk::*;
use serde::Deserialize;

struct Scripted;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Script {
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    role: Option<String>,
    contains: Option<String>,
    #[serde(default)]
    reply: String,
    #[serde(default)]
    tool_calls: Vec<ScriptedCall>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScriptedCall {
    name: String,
    #[serde(default)]
    arguments: serde_json::Value,
}

/// What the script answers: text, and the tool calls it makes.
struct Answer {
    text: String,
    tool_calls: Vec<ToolCall>,
}

impl Answer {
    fn text(text: String) -> Self {
        Answer { text, tool_calls: vec![] }
    }

    fn finish_reason(&self) -> FinishReason {
        if self.tool_calls.is_empty() { FinishReason::Stop } else { FinishReason::ToolCalls }
    }
}

const MODEL: &str = "scripted";

fn system(request: &CompletionRequest) -> String {
    request.messages.iter().filter(|m| m.role == Role::System).map(Message::text).collect::<Vec<_>>().join("\n")
}

fn conversation(request: &CompletionRequest) -> String {
    request.messages.iter().map(Message::text).collect::<Vec<_>>().join("\n")
}

fn role_of(system: &str) -> Option<&str> {
    let line = system.lines().find_map(|l| l.trim().strip_prefix("Role:"))?;
    Some(line.trim().trim_end_matches('.'))
}

/// About four characters a token, as tokenizers average on English text.
fn tokens(text: &str) -> u32 {
    (text.chars().count() as u32).div_ceil(4)
}

fn reply_for(request: &CompletionRequest) -> Result<Answer, PluginError> {
    if request.messages.is_empty() {
        return Err(PluginError::InvalidInput("`messages` is empty".into()));
    }
    let system = system(request);
    let conversation = conversation(request);
    if let Some(text) = host::config("script") {
        let script: Script = serde_json::from_str(&text)
            .map_err(|e| PluginError::InvalidInput(format!("the `script` config is not a valid script: {e}")))?;
        let tools_allowed = !request.tools.is_empty() && !matches!(request.tool_choice, Some(ToolChoice::None));
        // Calls already made in the conversation: new ids follow them.
        let made: usize = request.messages.iter().map(|m| m.tool_calls.len()).sum();
        for rule in script.rules {
            let role_ok = rule.role.as_deref().is_none_or(|r| role_of(&system) == Some(r));
            let text_ok = rule.contains.as_deref().is_none_or(|c| conversation.contains(c));
            let calls_ok = rule.tool_calls.is_empty() || tools_allowed;
            if role_ok && text_ok && calls_ok {
                let tool_calls = rule
                    .tool_calls
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| ToolCall {
                        id: format!("call_{}", made + i),
                        name: c.name,
                        arguments: if c.arguments.is_null() { "{}".into() } else { c.arguments.to_string() },
                    })
                    .collect();
                return Ok(Answer { text: rule.reply, tool_calls });
            }
        }
    }
    let last_user = request.messages.iter().rev().find(|m| m.role == Role::User).map(Message::text).unwrap_or_default();
    Ok(Answer::text(match role_of(&system) {
        Some("product-manager") => builtin::prd(&last_user),
        Some("developer") => builtin::project(&conversation),
        Some("architect") => builtin::design(&conversation),
        Some("qa-engineer") => builtin::tests(&conversation),
        Some("reviewer") => builtin::review(&conversation),
        Some("devops") => builtin::devops(&conversation),
        _ => format!("scripted reply (test double, not a model): {}", last_user.chars().take(200).collect::<String>()),
    }))
}

impl Provider for Scripted {
    type Stream = Words;

    fn models() -> Result<Vec<ModelInfo>, PluginError> {
        Ok(vec![ModelInfo { id: MODEL.into(), owned_by: "qlayer (test double)".into() }])
    }

    fn complete(request: CompletionRequest) -> Result<Completion, PluginError> {
        let answer = reply_for(&request)?;
        let written: usize = answer.tool_calls.iter().map(|c| c.arguments.len()).sum();
        let usage = Usage {
            prompt_tokens: tokens(&conversation(&request)),
            completion_tokens: tokens(&answer.text) + (written as u32).div_ceil(4),
        };
        let finish_reason = answer.finish_reason();
        Ok(Completion { model: MODEL.into(), text: answer.text, tool_calls: answer.tool_calls, finish_reason, usage })
    }

    fn stream(request: CompletionRequest) -> Result<Words, PluginError> {
        let answer = reply_for(&request)?;
        let usage = Usage { prompt_tokens: tokens(&conversation(&request)), completion_tokens: tokens(&answer.text) };
        let pieces = answer.text.split_inclusive(' ').map(str::to_string).collect::<Vec<_>>();
        let finish = answer.finish_reason();
        // Each tool call comes whole, in one chunk of its own, after the text.
        let calls = answer
            .tool_calls
            .into_iter()
            .enumerate()
            .map(|(i, c)| ToolCallDelta { index: i as u32, id: Some(c.id), name: Some(c.name), arguments: c.arguments })
            .collect::<Vec<_>>();
        Ok(Words {
            pieces: pieces.into_iter().rev().collect(),
            calls: calls.into_iter().rev().collect(),
            finish,
            usage: Some(usage),
        })
    }

    fn embed(request: EmbeddingRequest) -> Result<Embeddings, PluginError> {
        let vectors = request.inputs.iter().map(|t| builtin::hashed_embedding(t)).collect();
        let prompt_tokens = request.inputs.iter().map(|t| tokens(t)).sum();
        Ok(Embeddings { model: MODEL.into(), vectors, usage: Usage { prompt_tokens, completion_tokens: 0 } })
    }
}

/// A reply streamed a word at a time, then its tool calls; the last chunk carries the finish
/// reason and the usage.
struct Words {
    pieces: Vec<String>,
    calls: Vec<ToolCallDelta>,
    finish: FinishReason,
    usage: Option<Usage>,
}

impl ChunkSource for Words {
    fn next_chunk(&mut self) -> Result<Option<CompletionChunk>, PluginError> {
        let (delta, tool_calls) = match (self.pieces.pop(), self.calls.pop()) {
            (Some(word), call) => {
                self.calls.extend(call);
                (word, vec![])
            }
            (None, Some(call)) => (String::new(), vec![call]),
            (None, None) => return Ok(None),
        };
        let last = self.pieces.is_empty() && self.calls.is_empty();
        Ok(Some(CompletionChunk {
            delta,
            tool_calls,
            finish_reason: last.then(|| self.finish.clone()),
            usage: if last { self.usage.take() } else { None },
        }))
    }
}

qlayer_sdk::export_provider!(Scripted);

mod builtin {
    //! Built-in replies: a PRD derived from the requirement's words, and a template project for it.
    use serde_json::json;

    pub fn language(text: &str) -> &'static str {
        let t = text.to_lowercase();
        if t.contains("python") || t.contains("fastapi") || t.contains("flask") { "python" } else { "rust" }
    }

    pub fn prd(requirement: &str) -> String {
        let requirement = requirement
            .lines()
            .find(|l| l.starts_with("Requirement:"))
            .map(|l| l["Requirement:".len()..].trim())
            .unwrap_or(requirement)
            .trim();
        let first_clause = requirement.split([',', '.', ';', ':']).next().unwrap_or(requirement);
        let title: String = first_clause.split_whitespace().take(8).collect::<Vec<_>>().join(" ");
        let features: Vec<serde_json::Value> = requirement
            .split([',', ';', '.'])
            .flat_map(|p| p.split(" and "))
            .map(str::trim)
            .filter(|p| p.len() > 2)
            .take(8)
            .map(|p| json!({"name": slug(p), "description": p}))
            .collect();
        let features =
            if features.is_empty() { vec![json!({"name": "core", "description": requirement})] } else { features };
        json!({
            "title": if title.is_empty() { "Untitled".to_string() } else { title },
            "summary": requirement,
            "language": language(requirement),
            "features": features,
            "acceptance_criteria": CRITERIA,
            "user_stories": ["As a user, I want a command for each feature so that I can use it from my terminal"],
            // The templates below are command-line programs, whatever the requirement asks.
            "kind": "cli",
            "deployment": ["docker", "ci"],
        })
        .to_string()
    }

    /// The acceptance criteria of every built-in PRD, and the tests that cover each.
    const CRITERIA: [&str; 3] = ["the project builds", "every feature has a command", "unit tests pass"];
    const COVERS: [&str; 3] =
        ["usage_is_printed_without_a_command", "every_feature_has_a_command", "unknown_commands_are_refused"];

    pub fn slug(s: &str) -> String {
        let mut out = String::new();
        for c in s.to_lowercase().chars() {
            if c.is_ascii_alphanumeric() {
                out.push(c);
            } else if !out.ends_with('_') && !out.is_empty() {
                out.push('_');
            }
            if out.len() >= 32 {
                break;
            }
        }
        let out = out.trim_end_matches('_').to_string();
        if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) { format!("f_{out}") } else { out }
    }

    /// The first JSON object after the last `label` line of a prompt, if there is one.
    fn json_after(conversation: &str, label: &str) -> Option<serde_json::Value> {
        let after = &conversation[conversation.rfind(&format!("\n{label}\n"))?..];
        let start = after.find('{')?;
        serde_json::Deserializer::from_str(&after[start..]).into_iter::<serde_json::Value>().next()?.ok()
    }

    /// The PRD JSON embedded in a role's prompt (after its `PRD:` line), if there is one.
    fn prd_in(conversation: &str) -> serde_json::Value {
        json_after(conversation, "PRD:")
            .unwrap_or_else(|| json!({"title": "project", "summary": "", "language": "rust", "features": []}))
    }

    fn files_json(files: Vec<(String, String)>) -> serde_json::Value {
        json!(files.into_iter().map(|(p, c)| json!({"path": p, "content": c})).collect::<Vec<_>>())
    }

    /// The template project; only the files a `Files to write: a, b` line names, when the
    /// developer's prompt has one (a shard of a fanned-out developer step writes its share).
    pub fn project(conversation: &str) -> String {
        let wanted: Option<Vec<&str>> = conversation
            .lines()
            .find_map(|l| l.strip_prefix("Files to write: "))
            .map(|list| list.split(", ").map(str::trim).collect());
        let mut files = project_files(&prd_in(conversation));
        if let Some(wanted) = wanted {
            files.retain(|(path, _)| wanted.contains(&path.as_str()));
        }
        json!({ "files": files_json(files) }).to_string()
    }

    /// The project's name (its package's), the language and the features of a PRD.
    fn outline(prd: &serde_json::Value) -> (String, bool, Vec<(String, String)>) {
        let title = prd["title"].as_str().unwrap_or("project");
        let features: Vec<(String, String)> = prd["features"]
            .as_array()
            .map(|fs| {
                fs.iter()
                    .map(|f| {
                        (
                            slug(f["name"].as_str().unwrap_or("feature")),
                            f["description"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        (slug(title).replace('_', "-"), prd["language"].as_str() == Some("python"), features)
    }

    /// The architect's design: a component per feature, the file plan of the developer's,
    /// the QA engineer's and the devops engineer's files.
    pub fn design(conversation: &str) -> String {
        let prd = prd_in(conversation);
        let (_, python, features) = outline(&prd);
        let mut components =
            vec![json!({"name": "cli", "responsibility": "reads the command line and runs a command"})];
        components.extend(features.iter().map(|(n, d)| json!({"name": n, "responsibility": d})));
        components.push(json!({"name": "docs", "responsibility": "tells a user how to build and run it"}));
        // The developer's sources are the `cli` component's, its README the `docs`; the
        // manifest is the project's own (no module).
        fn plan(owner: &str, paths: Vec<String>) -> Vec<serde_json::Value> {
            paths
                .into_iter()
                .map(|p| {
                    let mut file = json!({"path": p, "owner": owner, "purpose": format!("written by the {owner}")});
                    let module = match p.as_str() {
                        "README.md" => Some("docs"),
                        "Cargo.toml" | "pyproject.toml" => None,
                        _ if owner == "developer" => Some("cli"),
                        _ => None,
                    };
                    if let Some(module) = module {
                        file["module"] = json!(module);
                    }
                    file
                })
                .collect()
        }
        let developer: Vec<String> = project_files(&prd).into_iter().map(|(p, _)| p).collect();
        let files: Vec<serde_json::Value> = [
            plan("developer", developer),
            plan("qa-engineer", vec![test_path(python).to_string()]),
            plan("devops", vec!["Dockerfile".into(), ".github/workflows/ci.yml".into()]),
        ]
        .concat();
        json!({
            "overview": format!("{} (scripted test double's design)", prd["title"].as_str().unwrap_or("project")),
            "components": components,
            "data_model": [],
            "files": files,
            "api": null,
        })
        .to_string()
    }

    fn test_path(python: bool) -> &'static str {
        if python { "tests/test_acceptance.py" } else { "tests/acceptance.rs" }
    }

    /// The QA engineer's acceptance tests for the template project.
    pub fn tests(conversation: &str) -> String {
        let prd = prd_in(conversation);
        let (name, python, features) = outline(&prd);
        let names: String = features.iter().map(|(n, _)| format!("{n:?}, ")).collect();
        let content = if python {
            format!(
                r#""""Acceptance tests: every feature has a command; unknown commands are refused."""
import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import main  # noqa: E402

FEATURES = [{names}]


class AcceptanceTest(unittest.TestCase):
    def test_{}(self):
        self.assertEqual(main.main(["{name}"]), 2)

    def test_{}(self):
        for feature in FEATURES:
            self.assertIn(feature, main.COMMANDS)
            self.assertEqual(main.main(["{name}", feature]), 0)

    def test_{}(self):
        self.assertEqual(main.main(["{name}", "no-such-command"]), 2)


if __name__ == "__main__":
    unittest.main()
"#,
                COVERS[0], COVERS[1], COVERS[2]
            )
        } else {
            let exe = format!("CARGO_BIN_EXE_{name}");
            format!(
                r#"//! Acceptance tests: every feature has a command; unknown commands are refused.

use std::process::{{Command, Output}};

const FEATURES: &[&str] = &[{names}];

fn run(args: &[&str]) -> Output {{
    Command::new(env!("{exe}")).args(args).output().expect("the program runs")
}}

#[test]
fn {}() {{
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage"));
}}

#[test]
fn {}() {{
    for feature in FEATURES {{
        let out = run(&[feature]);
        assert!(out.status.success(), "{{feature}}");
        assert!(String::from_utf8_lossy(&out.stdout).starts_with(feature));
    }}
}}

#[test]
fn {}() {{
    assert_eq!(run(&["no-such-command"]).status.code(), Some(2));
}}
"#,
                COVERS[0], COVERS[1], COVERS[2]
            )
        };
        let covers: Vec<serde_json::Value> =
            CRITERIA.iter().zip(COVERS).map(|(c, t)| json!({"criterion": c, "tests": [t]})).collect();
        json!({
            "framework": if python { "unittest" } else { "cargo test" },
            "files": files_json(vec![(test_path(python).to_string(), content)]),
            "covers": covers,
        })
        .to_string()
    }

    /// The reviewer's findings: none but a note that no model reviewed the files.
    pub fn review(conversation: &str) -> String {
        let readme = conversation.contains("--- README.md\n").then_some("README.md");
        json!({
            "summary": "reviewed by the scripted test double: no model read the code",
            "findings": [{
                "path": readme, "line": null, "severity": "info", "rule": "test-double",
                "message": "the scripted test double wrote this review; run with a real model for one",
            }],
        })
        .to_string()
    }

    /// The devops engineer's Dockerfile and CI workflow for the template project.
    pub fn devops(conversation: &str) -> String {
        let prd = prd_in(conversation);
        let (name, python, _) = outline(&prd);
        let (dockerfile, ci) = if python {
            (
                "FROM python:3.12-slim\nRUN useradd --system --uid 10001 app\nWORKDIR /app\nCOPY . .\nUSER app\nENTRYPOINT [\"python\", \"main.py\"]\n".to_string(),
                "name: ci\non: [push, pull_request]\njobs:\n  test:\n    runs-on: ubuntu-latest\n    steps:\n      - uses: actions/checkout@v4\n      - uses: actions/setup-python@v5\n        with:\n          python-version: \"3.12\"\n      - run: python -m unittest discover -s tests\n".to_string(),
            )
        } else {
            (
                format!("FROM rust:1 AS build\nWORKDIR /src\nCOPY . .\nRUN cargo build --release\n\nFROM debian:stable-slim\nRUN useradd --system --uid 10001 app\nCOPY --from=build /src/target/release/{name} /usr/local/bin/{name}\nUSER app\nENTRYPOINT [\"/usr/local/bin/{name}\"]\n"),
                "name: ci\non: [push, pull_request]\njobs:\n  test:\n    runs-on: ubuntu-latest\n    steps:\n      - uses: actions/checkout@v4\n      - run: cargo test\n".to_string(),
            )
        };
        json!({ "files": files_json(vec![("Dockerfile".into(), dockerfile), (".github/workflows/ci.yml".into(), ci)]) })
            .to_string()
    }

    fn project_files(prd: &serde_json::Value) -> Vec<(String, String)> {
        let title = prd["title"].as_str().unwrap_or("project");
        let summary = prd["summary"].as_str().unwrap_or("");
        let (name, python, features) = outline(prd);
        if python { self::python(&name, title, summary, &features) } else { rust(&name, title, summary, &features) }
    }

    fn readme(title: &str, summary: &str, features: &[(String, String)], run: &str) -> String {
        let list: String = features.iter().map(|(n, d)| format!("- `{n}`: {d}\n")).collect();
        format!(
            "# {title}\n\n{summary}\n\n## Commands\n\n{list}\n## Run\n\n```\n{run}\n```\n\nGenerated by QuantumLayer with the scripted provider (a template, not model output).\n"
        )
    }

    fn rust(name: &str, title: &str, summary: &str, features: &[(String, String)]) -> Vec<(String, String)> {
        let variants: String = features.iter().map(|(n, d)| format!("    /// {d}\n    {},\n", camel(n))).collect();
        let parse: String =
            features.iter().map(|(n, _)| format!("        \"{n}\" => Some(Command::{}),\n", camel(n))).collect();
        let describe: String = features
            .iter()
            .map(|(n, d)| format!("        Command::{} => {:?},\n", camel(n), format!("{n}: {d}")))
            .collect();
        let first = features.first().map(|(n, _)| n.clone()).unwrap_or_default();
        let main = format!(
            r#"//! {title}: {summary}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {{
{variants}}}

fn parse(name: &str) -> Option<Command> {{
    match name {{
{parse}        _ => None,
    }}
}}

fn describe(command: Command) -> &'static str {{
    match command {{
{describe}    }}
}}

fn main() {{
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str).and_then(parse) {{
        Some(command) => println!("{{}}", describe(command)),
        None => {{
            eprintln!("usage: {name} <command>");
            std::process::exit(2);
        }}
    }}
}}

#[cfg(test)]
mod tests {{
    use super::*;

    #[test]
    fn every_command_parses() {{
        assert!(parse("{first}").is_some() || "{first}".is_empty());
        assert_eq!(parse("no-such-command"), None);
    }}
}}
"#
        );
        let cargo =
            format!("[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[dependencies]\n");
        vec![
            ("Cargo.toml".into(), cargo),
            ("src/main.rs".into(), main),
            ("README.md".into(), readme(title, summary, features, &format!("cargo run -- {first}"))),
        ]
    }

    fn python(name: &str, title: &str, summary: &str, features: &[(String, String)]) -> Vec<(String, String)> {
        let commands: String = features.iter().map(|(n, d)| format!("    {n:?}: {d:?},\n")).collect();
        let main = format!(
            "\"\"\"{title}: {summary}\"\"\"\nimport sys\n\nCOMMANDS = {{\n{commands}}}\n\n\ndef main(argv):\n    if len(argv) < 2 or argv[1] not in COMMANDS:\n        print(\"usage: {name} <command>\", file=sys.stderr)\n        return 2\n    print(argv[1] + \": \" + COMMANDS[argv[1]])\n    return 0\n\n\nif __name__ == \"__main__\":\n    sys.exit(main(sys.argv))\n"
        );
        let pyproject = format!("[project]\nname = \"{name}\"\nversion = \"0.1.0\"\nrequires-python = \">=3.9\"\n");
        let first = features.first().map(|(n, _)| n.clone()).unwrap_or_default();
        vec![
            ("pyproject.toml".into(), pyproject),
            ("main.py".into(), main),
            ("README.md".into(), readme(title, summary, features, &format!("python main.py {first}"))),
        ]
    }

    fn camel(s: &str) -> String {
        s.split('_').filter(|p| !p.is_empty()).map(|p| p[..1].to_uppercase() + &p[1..]).collect()
    }

    /// Feature hashing: each word adds to one of 64 buckets; the vector is L2-normalised. Texts that
    /// share words are close, which is what a deterministic stand-in for embeddings needs.
    pub fn hashed_embedding(text: &str) -> Vec<f32> {
        let mut v = vec![0f32; 64];
        for word in text.to_lowercase().split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
            let h = word.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
            v[(h % 64) as usize] += 1.0;
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }

    #[cfg(test)]
    mod tests {
        #![allow(clippy::unwrap_used)]
        use super::*;

        #[test]
        fn prd_is_valid_json_with_features() {
            let v: serde_json::Value = serde_json::from_str(&prd("A todo CLI, with due dates and tags")).unwrap();
            assert_eq!(v["language"], "rust");
            assert!(v["features"].as_array().unwrap().len() >= 2);
        }

        #[test]
        fn every_role_gets_an_answer_that_follows_the_prd() {
            let p = prd("A python tool to rename photos");
            let prompt = format!("Requirement: x\n\nPRD:\n{p}");
            let design: serde_json::Value = serde_json::from_str(&design(&prompt)).unwrap();
            let planned: Vec<(&str, &str)> = design["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| (f["path"].as_str().unwrap(), f["owner"].as_str().unwrap()))
                .collect();
            assert!(planned.contains(&("main.py", "developer")), "{planned:?}");
            assert!(planned.contains(&("tests/test_acceptance.py", "qa-engineer")), "{planned:?}");
            let with_design = format!("{prompt}\n\nDesign:\n{design}");
            let module = |path: &str| {
                design["files"].as_array().unwrap().iter().find(|f| f["path"] == path).unwrap()["module"].clone()
            };
            assert_eq!(
                (module("main.py"), module("README.md"), module("pyproject.toml")),
                (json!("cli"), json!("docs"), json!(null))
            );
            let share: serde_json::Value =
                serde_json::from_str(&project(&format!("{with_design}\n\nFiles to write: pyproject.toml, README.md")))
                    .unwrap();
            let written: Vec<&str> =
                share["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
            assert_eq!(written, ["pyproject.toml", "README.md"], "a shard's share only");
            let tests: serde_json::Value = serde_json::from_str(&tests(&with_design)).unwrap();
            assert_eq!(tests["covers"].as_array().unwrap().len(), CRITERIA.len());
            assert!(tests["files"][0]["content"].as_str().unwrap().contains("rename_photos"));
            let ops: serde_json::Value = serde_json::from_str(&devops(&with_design)).unwrap();
            assert_eq!(ops["files"][0]["path"], "Dockerfile");
            assert!(ops["files"][0]["content"].as_str().unwrap().contains("python"));
            let review: serde_json::Value = serde_json::from_str(&review("--- README.md\n# x")).unwrap();
            assert_eq!(review["findings"][0]["path"], "README.md");
        }

        #[test]
        fn project_follows_the_prd() {
            let p = prd("A python tool to rename photos");
            let files: serde_json::Value =
                serde_json::from_str(&project(&format!("Role: developer. Reply {{\"files\": [...]}}\nPRD:\n{p}")))
                    .unwrap();
            let paths: Vec<&str> =
                files["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
            assert!(paths.contains(&"main.py"), "{paths:?}");
            let main = files["files"].as_array().unwrap().iter().find(|f| f["path"] == "main.py").unwrap();
            assert!(main["content"].as_str().unwrap().contains("rename_photos"), "the PRD's features are used");
        }
    }
}
