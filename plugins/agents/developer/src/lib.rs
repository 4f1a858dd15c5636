//! The `developer` agent: turns a PRD (and, when an architect ran, its design's file plan) into
//! the project's files, and on a repair round fixes them from the diagnostics.
//!
//! As a shard of a fanned-out step (the pipeline's `fan-out`), it writes only its share of the
//! file plan (whole modules; the SDK's `file_plan`), told which files the other shards write at
//! the same time; a shard with no module to write returns no file without asking a model.
//! Without a file plan, shard 1 writes the whole project and the others nothing.
//!
//! File paths from the model are checked: relative, no `..`, no hidden control characters, at
//! most [`MAX_FILES`] files of at most [`MAX_FILE_BYTES`] each; with a file plan, every file it
//! gives the developer is written and none it gives another step. A reply that breaks these
//! rules is sent back to the model with the problem, at most three times in all.

use qlayer_sdk::agent::{
    Agent, DESIGN_PATH, FileReply, PRD_PATH, check_files, check_plan, complete_json, feedback_text, files_text, input,
    options_line, shard, split_plan,
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
        let plan = split_plan(&task, "developer");
        let (mine, theirs) = (plan.mine.clone(), [plan.others.as_slice(), plan.siblings.as_slice()].concat());
        let shard = shard(&task);
        if let Some(s) = shard
            && mine.is_empty()
            && s.index > 1
        {
            return Ok(AgentOutput {
                artifacts: vec![],
                summary: format!("shard {} of {}: no module of the file plan is left to it", s.index, s.of),
            });
        }
        let mut prompt = format!("Requirement: {}{}\n\nPRD:\n{prd}", task.requirement, options_line(&task));
        if let Some(design) = input(&task, DESIGN_PATH) {
            prompt.push_str(&format!("\n\nDesign:\n{design}"));
        }
        if !mine.is_empty() {
            prompt.push_str(&format!("\n\nFiles to write: {}", mine.join(", ")));
        }
        if let Some(s) = shard {
            prompt.push_str(&format!(
                "\nYou are developer {} of {} writing this project at the same time: write only your files. \
                 The others write {}; code against the design's components and interfaces, not against their text.",
                s.index,
                s.of,
                if plan.siblings.is_empty() { "no other file".to_string() } else { plan.siblings.join(", ") }
            ));
        }
        if !task.feedback.is_empty() {
            let current = files_text(&task, &[PRD_PATH, DESIGN_PATH]);
            let whole = if shard.is_some() { "your corrected files" } else { "the complete corrected project" };
            prompt.push_str(&format!(
                "\n\nThe validators found these problems in your previous files:\n{}\n\nThe files so far:\n{current}\nReply with {whole}.",
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
        let mut summary = format!("{count} files");
        if !task.feedback.is_empty() {
            summary.push_str(&format!(" (fixing {} findings)", task.feedback.len()));
        }
        if let Some(s) = shard {
            summary.push_str(&format!(", shard {} of {}", s.index, s.of));
        }
        Ok(AgentOutput { artifacts, summary })
    }
}

qlayer_sdk::export_agent!(Developer);
