//! The `developer` agent: turns a PRD into the project's files, and on a repair round fixes them
//! from the validators' diagnostics.
//!
//! File paths from the model are checked: relative, no `..`, no hidden control characters, at
//! most [`MAX_FILES`] files of at most [`MAX_FILE_BYTES`] each. A reply that breaks these rules
//! is sent back to the model with the problem, at most three times in all.

use qlayer_sdk::agent::{Agent, complete_json};
use qlayer_sdk::*;
use serde::Deserialize;

struct Developer;

const MAX_ATTEMPTS: u32 = 3;
const MAX_FILES: usize = 200;
const MAX_FILE_BYTES: usize = 1 << 20;

#[derive(Deserialize)]
struct Files {
    files: Vec<File>,
}

#[derive(Deserialize)]
struct File {
    path: String,
    content: String,
}

const SYSTEM: &str = "Role: developer.
You write complete, working projects from a product requirements document (PRD), in the PRD's language.
Reply with only a JSON object: {\"files\": [{\"path\": relative path, \"content\": full file text}]}.
Include the build manifest, the source files, unit tests and a README.";

fn check_path(path: &str) -> Result<(), String> {
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

fn check(files: &Files) -> Result<(), String> {
    if files.files.is_empty() {
        return Err("`files` is empty".into());
    }
    if files.files.len() > MAX_FILES {
        return Err(format!("{} files is more than the {MAX_FILES} allowed", files.files.len()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for f in &files.files {
        check_path(&f.path)?;
        if f.content.len() > MAX_FILE_BYTES {
            return Err(format!("`{}` is larger than {MAX_FILE_BYTES} bytes", f.path));
        }
        if !seen.insert(f.path.as_str()) {
            return Err(format!("`{}` appears twice", f.path));
        }
    }
    Ok(())
}

fn feedback_text(feedback: &[Diagnostic]) -> String {
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

impl Agent for Developer {
    fn role() -> String {
        "developer".into()
    }

    fn run(task: Task) -> Result<AgentOutput, PluginError> {
        let prd = task
            .inputs
            .iter()
            .find(|a| a.path == "docs/PRD.json")
            .and_then(Artifact::as_text)
            .ok_or_else(|| PluginError::InvalidInput("the task has no docs/PRD.json input".into()))?;
        let mut prompt = format!("Requirement: {}\n\nPRD:\n{prd}", task.requirement);
        if !task.feedback.is_empty() {
            let current: String = task
                .inputs
                .iter()
                .filter(|a| a.path != "docs/PRD.json")
                .filter_map(|a| a.as_text().map(|t| format!("--- {}\n{t}\n", a.path)))
                .collect();
            prompt.push_str(&format!(
                "\n\nThe validators found these problems in your previous files:\n{}\n\nYour previous files:\n{current}\nReply with the complete corrected project.",
                feedback_text(&task.feedback)
            ));
        }
        let reply = complete_json::<Files>(
            vec![Message::new(Role::System, SYSTEM), Message::new(Role::User, prompt)],
            MAX_ATTEMPTS,
            check,
        )?;
        let count = reply.value.files.len();
        let artifacts = reply.value.files.into_iter().map(|f| Artifact::text(f.path, f.content)).collect();
        Ok(AgentOutput {
            artifacts,
            summary: format!(
                "{count} files{}",
                if task.feedback.is_empty() {
                    String::new()
                } else {
                    format!(" (fixing {} findings)", task.feedback.len())
                }
            ),
        })
    }
}

qlayer_sdk::export_agent!(Developer);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_escape_are_refused() {
        for bad in ["/etc/passwd", "../x", "a/../../b", "C:\\x", "a//b", ""] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
        assert!(check_path("src/main.rs").is_ok());
    }
}
