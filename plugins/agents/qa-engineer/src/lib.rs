//! The `qa-engineer` agent: writes tests for the PRD's acceptance criteria in the project's own
//! test framework, and `docs/TEST_PLAN.json`, which maps every criterion to the tests that cover
//! it. On a repair round it fixes its tests from the diagnostics.
//!
//! The reply is checked (paths; the file plan's tests written and no other step's file; every
//! acceptance criterion covered by a test whose name appears in a written file) and sent back
//! with the problem, at most three times in all.

use qlayer_sdk::agent::{
    Agent, DESIGN_PATH, FileReply, PRD_PATH, check_files, check_plan, complete_json, feedback_text, file_plan,
    files_text, input, options_line,
};
use qlayer_sdk::*;
use serde::{Deserialize, Serialize};

struct QaEngineer;

const MAX_ATTEMPTS: u32 = 3;
const MAX_FILES: usize = 50;
const MAX_FILE_BYTES: usize = 1 << 20;
const TEST_PLAN_PATH: &str = "docs/TEST_PLAN.json";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Reply {
    framework: String,
    files: Vec<FileReply>,
    covers: Vec<Cover>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Cover {
    criterion: String,
    tests: Vec<String>,
}

#[derive(Serialize)]
struct TestPlan<'a> {
    framework: &'a str,
    files: Vec<&'a str>,
    covers: &'a [Cover],
}

const SYSTEM: &str = "Role: qa-engineer.
You write automated tests for a project's acceptance criteria, in the project's own language and test framework
(pytest or unittest for Python, `cargo test` for Rust, the standard one elsewhere). The tests exercise the developer's code as it is.
Reply with only a JSON object:
{\"framework\": string, \"files\": [{\"path\": relative path, \"content\": full file text}],
 \"covers\": [{\"criterion\": an acceptance criterion, verbatim, \"tests\": [test function names]}]}.
Cover every acceptance criterion. Write only test files: never a file the developer wrote.";

fn check(
    reply: &Reply,
    criteria: &[String],
    taken: &[String],
    mine: &[String],
    theirs: &[String],
) -> Result<(), String> {
    if reply.framework.trim().is_empty() {
        return Err("`framework` is empty: name the test framework".into());
    }
    check_files(&reply.files, MAX_FILES, MAX_FILE_BYTES)?;
    check_plan(&reply.files, mine, theirs)?;
    if let Some(f) = reply.files.iter().find(|f| taken.contains(&f.path) || f.path == TEST_PLAN_PATH) {
        return Err(format!("`{}` is another step's file; write only test files", f.path));
    }
    for criterion in criteria {
        let cover = reply.covers.iter().find(|c| c.criterion.trim() == criterion.trim());
        let Some(cover) = cover.filter(|c| !c.tests.is_empty()) else {
            return Err(format!("no test covers the acceptance criterion {criterion:?}"));
        };
        if let Some(test) = cover.tests.iter().find(|t| !reply.files.iter().any(|f| f.content.contains(t.as_str()))) {
            return Err(format!("the test `{test}` (for {criterion:?}) is in none of the files"));
        }
    }
    Ok(())
}

impl Agent for QaEngineer {
    fn role() -> String {
        "qa-engineer".into()
    }

    fn run(task: Task) -> Result<AgentOutput, PluginError> {
        let (prd, parsed) = qlayer_sdk::agent::prd(&task)?;
        let criteria = qlayer_sdk::agent::strings(&parsed, "acceptance_criteria");
        let (mine, theirs) = file_plan(&task, "qa-engineer");
        // Files of earlier steps are theirs; on a repair round, this step's own previous files
        // (its test plan lists them) are among the inputs too, and are its to rewrite.
        let previous: Vec<String> = input(&task, TEST_PLAN_PATH)
            .and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok())
            .and_then(|p| p.get("files")?.as_array().cloned())
            .map(|f| f.iter().filter_map(|p| p.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        let taken: Vec<String> = task
            .inputs
            .iter()
            .map(|a| a.path.clone())
            .filter(|p| !mine.contains(p) && !previous.contains(p) && p != TEST_PLAN_PATH)
            .collect();
        let mut prompt = format!("Requirement: {}{}\n\nPRD:\n{prd}", task.requirement, options_line(&task));
        if let Some(design) = input(&task, DESIGN_PATH) {
            prompt.push_str(&format!("\n\nDesign:\n{design}"));
        }
        prompt.push_str(&format!(
            "\n\nThe project's files:\n{}",
            files_text(&task, &[PRD_PATH, DESIGN_PATH, TEST_PLAN_PATH])
        ));
        if !task.feedback.is_empty() {
            prompt.push_str(&format!(
                "\n\nThese problems were found in your previous tests:\n{}\nReply with the complete corrected tests.",
                feedback_text(&task.feedback)
            ));
        }
        let reply = complete_json::<Reply>(
            vec![Message::new(Role::System, SYSTEM), Message::new(Role::User, prompt)],
            MAX_ATTEMPTS,
            |r| check(r, &criteria, &taken, &mine, &theirs),
        )?;
        let reply = reply.value;
        let plan = TestPlan {
            framework: &reply.framework,
            files: reply.files.iter().map(|f| f.path.as_str()).collect(),
            covers: &reply.covers,
        };
        let plan = serde_json::to_string_pretty(&plan).map_err(|e| PluginError::Internal(e.to_string()))?;
        let tests: usize = reply.covers.iter().map(|c| c.tests.len()).sum();
        let summary = format!(
            "{} test files ({}), {tests} tests covering {} acceptance criteria",
            reply.files.len(),
            reply.framework,
            criteria.len()
        );
        let mut artifacts: Vec<Artifact> = reply.files.into_iter().map(FileReply::artifact).collect();
        artifacts.push(Artifact::text(TEST_PLAN_PATH, plan));
        Ok(AgentOutput { artifacts, summary })
    }
}

qlayer_sdk::export_agent!(QaEngineer);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_criterion_needs_a_test_that_exists() {
        let reply = |content: &str, path: &str| Reply {
            framework: "unittest".into(),
            files: vec![FileReply { path: path.into(), content: content.into() }],
            covers: vec![Cover { criterion: "it adds".into(), tests: vec!["test_adds".into()] }],
        };
        let criteria = vec!["it adds".to_string()];
        assert!(check(&reply("def test_adds(): pass", "tests/test_a.py"), &criteria, &[], &[], &[]).is_ok());
        let err = check(&reply("def test_other(): pass", "tests/test_a.py"), &criteria, &[], &[], &[]).unwrap_err();
        assert!(err.contains("test_adds"), "{err}");
        let more = vec!["it adds".to_string(), "it subtracts".to_string()];
        let err = check(&reply("def test_adds(): pass", "tests/test_a.py"), &more, &[], &[], &[]).unwrap_err();
        assert!(err.contains("it subtracts"), "{err}");
        let err =
            check(&reply("def test_adds(): pass", "main.py"), &criteria, &["main.py".into()], &[], &[]).unwrap_err();
        assert!(err.contains("another step"), "{err}");
    }
}
