//! The `developer` agent: turns a PRD (and, when an architect ran, its design's file plan) into
//! the project's files, and on a repair round fixes them from the diagnostics.
//!
//! File paths from the model are checked: relative, no `..`, no hidden control characters, at
//! most [`MAX_FILES`] files of at most [`MAX_FILE_BYTES`] each; with a file plan, every file it
//! gives the developer is written and none it gives another step. A reply that breaks these
//! rules is sent back to the model with the problem, at most three times in all.

use qlayer_sdk::agent::{
    Agent, DESIGN_PATH, FileReply, PRD_PATH, check_files, check_plan, complete_json, feedback_text, file_plan,
    files_text, input, options_line,
};
use qlayer_sdk::*;
use serde::Deserialize;

struct Developer;

const MAX_ATTEMPTS: u32 = 3;
const MAX_FILES: usize = 200;
const MAX_FILE_BYTES: usize = 1 << 20;

#[derive(Deserialize)]
struct Files {
    files: Vec<FileReply>,
}

const SYSTEM: &str = "Role: developer.
You write complete, working projects from a product requirements document (PRD), in the PRD's language.
Reply with only a JSON object: {\"files\": [{\"path\": relative path, \"content\": full file text}]}.
Include the build manifest, the source files, unit tests and a README.
When a design with a file plan is given, write exactly the files it gives the developer, and none it gives another owner.";

impl Agent for Developer {
    fn role() -> String {
        "developer".into()
    }

    fn run(task: Task) -> Result<AgentOutput, PluginError> {
        let (prd, _) = qlayer_sdk::agent::prd(&task)?;
        let (mine, theirs) = file_plan(&task, "developer");
        let mut prompt = format!("Requirement: {}{}\n\nPRD:\n{prd}", task.requirement, options_line(&task));
        if let Some(design) = input(&task, DESIGN_PATH) {
            prompt.push_str(&format!("\n\nDesign:\n{design}"));
        }
        if !task.feedback.is_empty() {
            let current = files_text(&task, &[PRD_PATH, DESIGN_PATH]);
            prompt.push_str(&format!(
                "\n\nThe validators found these problems in your previous files:\n{}\n\nYour previous files:\n{current}\nReply with the complete corrected project.",
                feedback_text(&task.feedback)
            ));
        }
        let reply = complete_json::<Files>(
            vec![Message::new(Role::System, SYSTEM), Message::new(Role::User, prompt)],
            MAX_ATTEMPTS,
            |files| {
                check_files(&files.files, MAX_FILES, MAX_FILE_BYTES)?;
                check_plan(&files.files, &mine, &theirs)
            },
        )?;
        let count = reply.value.files.len();
        let artifacts = reply.value.files.into_iter().map(FileReply::artifact).collect();
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
