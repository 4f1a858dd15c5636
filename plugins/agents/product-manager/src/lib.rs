//! The `product-manager` agent: turns a requirement into a product requirements document.
//!
//! It asks the model for JSON, validates it (a title, at least one feature, a supported
//! language) and asks again with the problem when it is wrong, at most three times in all.

use qlayer_sdk::agent::{Agent, complete_json};
use qlayer_sdk::*;
use serde::{Deserialize, Serialize};

struct ProductManager;

#[derive(Debug, Serialize, Deserialize)]
struct Prd {
    title: String,
    summary: String,
    language: String,
    features: Vec<Feature>,
    #[serde(default)]
    acceptance_criteria: Vec<String>,
    #[serde(default)]
    user_stories: Vec<String>,
    /// `cli`, `service` or `library`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    /// What the devops engineer delivers: any of `docker`, `compose`, `kubernetes`, `ci`.
    #[serde(default)]
    deployment: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Feature {
    name: String,
    description: String,
}

const MAX_ATTEMPTS: u32 = 3;
const KINDS: &[&str] = &["cli", "service", "library"];
const DEPLOYMENTS: &[&str] = &["docker", "compose", "kubernetes", "ci"];

const SYSTEM: &str = "Role: product-manager.
You turn a software requirement into a product requirements document (PRD).
Reply with only a JSON object of this shape:
{\"title\": string, \"summary\": string, \"language\": string,
 \"features\": [{\"name\": snake_case string, \"description\": string}],
 \"acceptance_criteria\": [string], \"user_stories\": [\"As a <user>, I want <goal> so that <reason>\"],
 \"kind\": \"cli\" | \"service\" | \"library\", \"deployment\": [any of \"docker\", \"compose\", \"kubernetes\", \"ci\"]}
`language` is the programming language the requirement asks for (lowercase); when it names none, choose rust.";

fn check(prd: &Prd) -> Result<(), String> {
    if prd.title.trim().is_empty() {
        return Err("`title` is empty".into());
    }
    if prd.features.is_empty() {
        return Err("`features` is empty: list at least one feature".into());
    }
    if prd.language.trim().is_empty() {
        return Err("`language` is empty".into());
    }
    if let Some(kind) = prd.kind.as_deref()
        && !KINDS.contains(&kind)
    {
        return Err(format!("`kind` is {kind:?}; use one of {KINDS:?}"));
    }
    if let Some(d) = prd.deployment.iter().find(|d| !DEPLOYMENTS.contains(&d.as_str())) {
        return Err(format!("`deployment` has {d:?}; use any of {DEPLOYMENTS:?}"));
    }
    if let Some(f) = prd.features.iter().find(|f| f.name.trim().is_empty()) {
        return Err(format!("a feature has an empty `name` (description: {:?})", f.description));
    }
    Ok(())
}

impl Agent for ProductManager {
    fn role() -> String {
        "product-manager".into()
    }

    fn run(task: Task) -> Result<AgentOutput, PluginError> {
        let requirement = task.requirement.trim();
        if requirement.is_empty() {
            return Err(PluginError::InvalidInput("the requirement is empty".into()));
        }
        let prompt = format!("Requirement: {requirement}{}", qlayer_sdk::agent::options_line(&task));
        let reply = complete_json::<Prd>(
            vec![Message::new(Role::System, SYSTEM), Message::new(Role::User, prompt)],
            MAX_ATTEMPTS,
            check,
        )?;
        let prd = reply.value;
        let text = serde_json::to_string_pretty(&prd).map_err(|e| PluginError::Internal(e.to_string()))?;
        Ok(AgentOutput {
            summary: format!(
                "PRD \"{}\": {} features, {} ({} attempt{})",
                prd.title,
                prd.features.len(),
                prd.language,
                reply.attempts,
                if reply.attempts == 1 { "" } else { "s" }
            ),
            artifacts: vec![Artifact::text(qlayer_sdk::agent::PRD_PATH, text)],
        })
    }
}

qlayer_sdk::export_agent!(ProductManager);
