//! The `devops` agent: writes what the PRD's `deployment` asks to ship the project (`docker`: a
//! Dockerfile; `compose`: a compose file; `kubernetes`: manifests; `ci`: a CI workflow; a Docker
//! image and CI when it asks for nothing), following the design's file plan when there is one.
//!
//! The reply is checked (paths; the file plan's devops files written and no other step's; a file
//! for every deployment asked) and sent back with the problem, at most three times in all.

use qlayer_sdk::agent::{
    Agent, DESIGN_PATH, FileReply, PRD_PATH, check_files, check_plan, complete_json, feedback_text, file_plan,
    files_text, input, options_line,
};
use qlayer_sdk::*;
use serde::Deserialize;

struct Devops;

const MAX_ATTEMPTS: u32 = 3;
const MAX_FILES: usize = 30;
const MAX_FILE_BYTES: usize = 256 * 1024;
/// What a PRD that names no deployment gets.
const DEFAULT_DEPLOYMENT: &[&str] = &["docker", "ci"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Files {
    files: Vec<FileReply>,
}

const SYSTEM: &str = "Role: devops.
You write what ships a project: for `docker` a Dockerfile (multi-stage, non-root user), for `compose` a compose.yaml,
for `kubernetes` manifests (Deployment and Service, with probes and resources) under deploy/kubernetes/,
for `ci` a CI workflow (.github/workflows/ci.yml) that builds and runs the tests.
Reply with only a JSON object: {\"files\": [{\"path\": relative path, \"content\": full file text}]}.
Write only these files: never a source, test or document another step wrote.";

fn name_of(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Whether `files` hold what `deployment` asks for.
fn delivers(deployment: &str, files: &[FileReply]) -> bool {
    let yaml = |f: &&FileReply| f.path.ends_with(".yaml") || f.path.ends_with(".yml");
    match deployment {
        "docker" => files.iter().any(|f| matches!(name_of(&f.path), "Dockerfile" | "Containerfile")),
        "compose" => files.iter().any(|f| {
            matches!(name_of(&f.path), "compose.yaml" | "compose.yml" | "docker-compose.yml" | "docker-compose.yaml")
        }),
        "kubernetes" => {
            files.iter().filter(yaml).any(|f| f.content.contains("apiVersion:") && f.content.contains("kind:"))
        }
        "ci" => {
            files.iter().filter(yaml).any(|f| f.path.starts_with(".github/workflows/") || f.path == ".gitlab-ci.yml")
        }
        _ => true,
    }
}

/// Whether a path is where deployment files live by convention.
fn deployment_file(path: &str) -> bool {
    matches!(
        name_of(path),
        "Dockerfile"
            | "Containerfile"
            | ".dockerignore"
            | "compose.yaml"
            | "compose.yml"
            | "docker-compose.yml"
            | "docker-compose.yaml"
            | ".gitlab-ci.yml"
    ) || path.starts_with(".github/workflows/")
        || path.starts_with("deploy/")
}

fn check(files: &Files, asked: &[String], taken: &[String], mine: &[String], theirs: &[String]) -> Result<(), String> {
    check_files(&files.files, MAX_FILES, MAX_FILE_BYTES)?;
    check_plan(&files.files, mine, theirs)?;
    if let Some(f) = files.files.iter().find(|f| taken.contains(&f.path)) {
        return Err(format!("`{}` is another step's file; write only deployment files", f.path));
    }
    if let Some(missing) = asked.iter().find(|d| !delivers(d, &files.files)) {
        return Err(format!("the PRD asks for `{missing}` deployment and no file delivers it"));
    }
    Ok(())
}

impl Agent for Devops {
    fn role() -> String {
        "devops".into()
    }

    fn run(task: Task) -> Result<AgentOutput, PluginError> {
        let (prd, parsed) = qlayer_sdk::agent::prd(&task)?;
        let mut asked = qlayer_sdk::agent::strings(&parsed, "deployment");
        if asked.is_empty() {
            asked = DEFAULT_DEPLOYMENT.iter().map(|d| d.to_string()).collect();
        }
        let (mine, theirs) = file_plan(&task, "devops");
        // Sources, tests and documents are other steps'; deployment files (its own previous ones
        // on a repair round) are its to write.
        let taken: Vec<String> =
            task.inputs.iter().map(|a| a.path.clone()).filter(|p| !mine.contains(p) && !deployment_file(p)).collect();
        let mut prompt = format!(
            "Requirement: {}{}\n\nDeployment: {}\n\nPRD:\n{prd}",
            task.requirement,
            options_line(&task),
            asked.join(", ")
        );
        if let Some(design) = input(&task, DESIGN_PATH) {
            prompt.push_str(&format!("\n\nDesign:\n{design}"));
        }
        if !task.feedback.is_empty() {
            prompt.push_str(&format!(
                "\n\nThese problems were found in your previous files:\n{}\n\nYour previous files:\n{}\nReply with the complete corrected files.",
                feedback_text(&task.feedback),
                files_text(&task, &[PRD_PATH, DESIGN_PATH])
            ));
        }
        let reply = complete_json::<Files>(
            vec![Message::new(Role::System, SYSTEM), Message::new(Role::User, prompt)],
            MAX_ATTEMPTS,
            |f| check(f, &asked, &taken, &mine, &theirs),
        )?;
        let files = reply.value.files;
        let summary = format!("{} files for {}", files.len(), asked.join(", "));
        Ok(AgentOutput { artifacts: files.into_iter().map(FileReply::artifact).collect(), summary })
    }
}

qlayer_sdk::export_agent!(Devops);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_deployment_asked_is_delivered() {
        let files = |list: &[(&str, &str)]| Files {
            files: list.iter().map(|(p, c)| FileReply { path: p.to_string(), content: c.to_string() }).collect(),
        };
        let asked = vec!["docker".to_string(), "ci".to_string()];
        let both = files(&[("Dockerfile", "FROM x"), (".github/workflows/ci.yml", "on: push")]);
        assert!(check(&both, &asked, &[], &[], &[]).is_ok());
        let err = check(&files(&[("Dockerfile", "FROM x")]), &asked, &[], &[], &[]).unwrap_err();
        assert!(err.contains("`ci`"), "{err}");
        let k8s = vec!["kubernetes".to_string()];
        let manifest = files(&[("deploy/kubernetes/app.yaml", "apiVersion: apps/v1\nkind: Deployment\n")]);
        assert!(check(&manifest, &k8s, &[], &[], &[]).is_ok());
        assert!(deployment_file("deploy/kubernetes/app.yaml") && !deployment_file("src/main.rs"));
        let err = check(&both, &asked, &["Dockerfile".to_string()], &[], &[]).unwrap_err();
        assert!(err.contains("another step"), "{err}");
    }
}
