//! The `reviewer` agent: reads the project's files and reports findings (path, line, severity,
//! rule, message) in `docs/REVIEW.json`, a findings artifact
//! ([`FINDINGS_MEDIA_TYPE`](qlayer_sdk::agent::FINDINGS_MEDIA_TYPE)): the host treats its errors
//! as it treats validators', so they feed the repair loop and stay in the run's report.
//!
//! Each finding is checked (a file of the project, a line inside it, a known severity, a rule id)
//! and a reply that breaks the rules is sent back with the problem, at most three times in all.

use qlayer_sdk::agent::{Agent, FINDINGS_MEDIA_TYPE, complete_json, files_text, options_line};
use qlayer_sdk::*;
use serde::{Deserialize, Serialize};

struct Reviewer;

const MAX_ATTEMPTS: u32 = 3;
const MAX_FINDINGS: usize = 200;
const REVIEW_PATH: &str = "docs/REVIEW.json";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Review {
    summary: String,
    findings: Vec<Finding>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Finding {
    path: Option<String>,
    line: Option<u32>,
    severity: String,
    rule: String,
    message: String,
}

const SYSTEM: &str = "Role: reviewer.
You review a generated project's files as a senior engineer: bugs, security problems (injection, secrets, unsafe input handling),
requirements the code does not meet, missing tests, and code that will not build.
Reply with only a JSON object:
{\"summary\": string, \"findings\": [{\"path\": a file of the project or null, \"line\": 1-based line or null,
 \"severity\": \"error\" | \"warning\" | \"info\", \"rule\": short kebab-case id, \"message\": what is wrong and how to fix it}]}.
Use `error` only for what must be fixed before the project ships: errors go back to the file's author.";

fn check(review: &Review, files: &[(&str, usize)]) -> Result<(), String> {
    if review.findings.len() > MAX_FINDINGS {
        return Err(format!("{} findings; report at most {MAX_FINDINGS}, the most important", review.findings.len()));
    }
    for (i, f) in review.findings.iter().enumerate() {
        let at = format!("findings[{i}]");
        if !["error", "warning", "info"].contains(&f.severity.as_str()) {
            return Err(format!("{at}.severity is {:?}; use error, warning or info", f.severity));
        }
        let rule_ok = !f.rule.is_empty()
            && f.rule.len() <= 64
            && f.rule.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !rule_ok {
            return Err(format!("{at}.rule {:?}: use a short kebab-case id such as `sql-injection`", f.rule));
        }
        if f.message.trim().is_empty() {
            return Err(format!("{at}.message is empty"));
        }
        match (&f.path, f.line) {
            (None, Some(_)) => return Err(format!("{at}: a line needs a path")),
            (None, None) => {}
            (Some(path), line) => {
                let Some((_, lines)) = files.iter().find(|(p, _)| p == path) else {
                    return Err(format!("{at}.path `{path}` is not a file of the project"));
                };
                if let Some(line) = line
                    && (line == 0 || line as usize > *lines)
                {
                    return Err(format!("{at}.line {line} is outside `{path}` (lines 1-{lines})"));
                }
            }
        }
    }
    Ok(())
}

impl Agent for Reviewer {
    fn role() -> String {
        "reviewer".into()
    }

    fn run(task: Task) -> Result<AgentOutput, PluginError> {
        let files: Vec<(&str, usize)> = task
            .inputs
            .iter()
            .filter(|a| a.path != REVIEW_PATH)
            .filter_map(|a| Some((a.path.as_str(), a.as_text()?.lines().count().max(1))))
            .collect();
        if files.is_empty() {
            return Err(PluginError::InvalidInput("the task has no files to review".into()));
        }
        let prompt = format!(
            "Requirement: {}{}\n\nThe project's files:\n{}",
            task.requirement,
            options_line(&task),
            files_text(&task, &[REVIEW_PATH])
        );
        let reply = complete_json::<Review>(
            vec![Message::new(Role::System, SYSTEM), Message::new(Role::User, prompt)],
            MAX_ATTEMPTS,
            |r| check(r, &files),
        )?;
        let review = reply.value;
        let count = |severity: &str| review.findings.iter().filter(|f| f.severity == severity).count();
        let summary = format!(
            "{} files reviewed: {} errors, {} warnings, {} notes",
            files.len(),
            count("error"),
            count("warning"),
            count("info")
        );
        let text = serde_json::to_string_pretty(&review).map_err(|e| PluginError::Internal(e.to_string()))?;
        let artifact =
            Artifact { path: REVIEW_PATH.into(), media_type: FINDINGS_MEDIA_TYPE.into(), content: text.into_bytes() };
        Ok(AgentOutput { artifacts: vec![artifact], summary })
    }
}

qlayer_sdk::export_agent!(Reviewer);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_finding_points_inside_the_project() {
        let review = |path: Option<&str>, line: Option<u32>, severity: &str, rule: &str| Review {
            summary: "s".into(),
            findings: vec![Finding {
                path: path.map(str::to_string),
                line,
                severity: severity.into(),
                rule: rule.into(),
                message: "m".into(),
            }],
        };
        let files = [("main.py", 10)];
        assert!(check(&review(Some("main.py"), Some(3), "error", "sql-injection"), &files).is_ok());
        assert!(check(&review(None, None, "info", "style"), &files).is_ok());
        assert!(check(&review(Some("other.py"), Some(3), "error", "x"), &files).unwrap_err().contains("not a file"));
        assert!(check(&review(Some("main.py"), Some(11), "error", "x"), &files).unwrap_err().contains("outside"));
        assert!(check(&review(Some("main.py"), Some(1), "fatal", "x"), &files).unwrap_err().contains("severity"));
        assert!(check(&review(Some("main.py"), Some(1), "error", "No Spaces"), &files).unwrap_err().contains("rule"));
    }
}
