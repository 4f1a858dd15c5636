//! The `scripted` provider: a deterministic, offline **test double**, not a language model.
//!
//! It answers from a script (config key `script`, JSON) or, without one, from built-in rules keyed
//! on the agent role named in the system message (`Role: product-manager`, `Role: developer`) and
//! on the prompt. It lets `qlayer run` work on a machine with no model and gives tests exact,
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
            "acceptance_criteria": ["the project builds", "every feature has a command", "unit tests pass"],
        })
        .to_string()
    }

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

    /// The PRD JSON embedded in the developer's prompt (after its `PRD:` line), if there is one.
    fn prd_in(conversation: &str) -> serde_json::Value {
        let after = conversation.rfind("PRD:").map(|i| &conversation[i..]).unwrap_or(conversation);
        after
            .find('{')
            .and_then(|s| serde_json::Deserializer::from_str(&after[s..]).into_iter::<serde_json::Value>().next())
            .and_then(Result::ok)
            .unwrap_or_else(|| json!({"title": "project", "summary": "", "language": "rust", "features": []}))
    }

    pub fn project(conversation: &str) -> String {
        let prd = prd_in(conversation);
        let title = prd["title"].as_str().unwrap_or("project");
        let summary = prd["summary"].as_str().unwrap_or("");
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
        let name = slug(title).replace('_', "-");
        let files = if prd["language"].as_str() == Some("python") {
            python(&name, title, summary, &features)
        } else {
            rust(&name, title, summary, &features)
        };
        json!({ "files": files.into_iter().map(|(p, c)| json!({"path": p, "content": c})).collect::<Vec<_>>() })
            .to_string()
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
