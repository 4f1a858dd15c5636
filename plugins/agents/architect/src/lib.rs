//! The `architect` agent: turns the PRD into a design (`docs/DESIGN.json`): components, data
//! model, a file plan that gives each file one owner step (`developer`, `qa-engineer` or
//! `devops`), and for a service the OpenAPI document of the API it exposes (also written as
//! `docs/openapi.json`).
//!
//! The reply is checked (paths, one owner per file, an OpenAPI 3 document with paths and
//! responses for a service) and sent back with the problem, at most three times in all.

use qlayer_sdk::agent::{Agent, DESIGN_PATH, PRD_PATH, check_path, complete_json, options_line};
use qlayer_sdk::*;
use serde::{Deserialize, Serialize};

struct Architect;

const MAX_ATTEMPTS: u32 = 3;
const MAX_FILES: usize = 200;
/// The steps a file plan may give files to.
const OWNERS: &[&str] = &["developer", "qa-engineer", "devops"];
/// The documents the roles write themselves: no file plan gives them out.
const DOCUMENTS: &[&str] = &[PRD_PATH, DESIGN_PATH, OPENAPI_PATH, "docs/REVIEW.json", "docs/TEST_PLAN.json"];
const OPENAPI_PATH: &str = "docs/openapi.json";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Design {
    overview: String,
    components: Vec<Component>,
    #[serde(default)]
    data_model: Vec<Entity>,
    files: Vec<PlannedFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    api: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Component {
    name: String,
    responsibility: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entity {
    name: String,
    fields: Vec<Field>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Field {
    name: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlannedFile {
    path: String,
    owner: String,
    purpose: String,
    /// The component it belongs to: a fanned-out step gives whole modules to each of its shards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    module: Option<String>,
}

const SYSTEM: &str = "Role: architect.
You design the software a product requirements document (PRD) asks for, in the PRD's language.
Reply with only a JSON object of this shape:
{\"overview\": string,
 \"components\": [{\"name\": string, \"responsibility\": string}],
 \"data_model\": [{\"name\": string, \"fields\": [{\"name\": string, \"type\": string}]}],
 \"files\": [{\"path\": relative path, \"owner\": \"developer\" | \"qa-engineer\" | \"devops\", \"purpose\": string, \"module\": the component's name}],
 \"api\": an OpenAPI 3 document (object) of the HTTP API when the PRD's kind is service, else null}
The file plan lists every file of the project once: the developer owns the build manifest, the sources and the README;
each source file names the component (module) it belongs to, since modules may be written by different developers at the same time, and the manifest and README name none;
the qa-engineer the tests of the acceptance criteria; the devops engineer the Dockerfile, compose or Kubernetes manifests and CI workflow the PRD's deployment asks for.";

fn check_api(api: &serde_json::Value) -> Result<(), String> {
    let version = api.get("openapi").and_then(serde_json::Value::as_str).unwrap_or_default();
    if !version.starts_with("3.") {
        return Err(format!("`api.openapi` is {version:?}; give an OpenAPI 3 document (\"3.1.0\")"));
    }
    if api.pointer("/info/title").and_then(serde_json::Value::as_str).is_none_or(str::is_empty) {
        return Err("`api.info.title` is missing".into());
    }
    let paths = api.get("paths").and_then(serde_json::Value::as_object).filter(|p| !p.is_empty());
    let paths = paths.ok_or("`api.paths` is missing or empty: list the service's routes")?;
    for (path, item) in paths {
        if !path.starts_with('/') {
            return Err(format!("`api.paths` key {path:?} must start with `/`"));
        }
        let operations = item.as_object().ok_or(format!("`api.paths.{path}` is not an object"))?;
        for method in ["get", "put", "post", "delete", "patch", "head", "options"] {
            if let Some(op) = operations.get(method)
                && op.get("responses").and_then(serde_json::Value::as_object).is_none_or(|r| r.is_empty())
            {
                return Err(format!("`api.paths.{path}.{method}` has no `responses`"));
            }
        }
    }
    Ok(())
}

fn check(design: &Design, service: bool) -> Result<(), String> {
    if design.components.is_empty() {
        return Err("`components` is empty".into());
    }
    if design.files.is_empty() || design.files.len() > MAX_FILES {
        return Err(format!("`files` lists {} files; a plan has 1 to {MAX_FILES}", design.files.len()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for f in &design.files {
        check_path(&f.path)?;
        if !seen.insert(f.path.as_str()) {
            return Err(format!("`{}` is in the file plan twice: a file has one owner", f.path));
        }
        if !OWNERS.contains(&f.owner.as_str()) {
            return Err(format!("`{}` has owner {:?}; the owners are {OWNERS:?}", f.path, f.owner));
        }
        if let Some(module) = &f.module
            && (module.trim().is_empty() || module.chars().count() > 64 || module.chars().any(char::is_control))
        {
            return Err(format!("`{}` has module {module:?}; a module is a component's name, 1-64 characters", f.path));
        }
        if DOCUMENTS.contains(&f.path.as_str()) {
            return Err(format!("`{}` is written by the role that owns it; leave it out of the file plan", f.path));
        }
    }
    if !design.files.iter().any(|f| f.owner == "developer") {
        return Err("the file plan gives the developer no file".into());
    }
    match (&design.api, service) {
        (Some(serde_json::Value::Null) | None, true) => {
            Err("the PRD's kind is service: give `api`, the OpenAPI 3 document of its HTTP API".into())
        }
        (Some(serde_json::Value::Null) | None, false) => Ok(()),
        (Some(api), _) => check_api(api),
    }
}

impl Agent for Architect {
    fn role() -> String {
        "architect".into()
    }

    fn run(task: Task) -> Result<AgentOutput, PluginError> {
        let (prd, parsed) = qlayer_sdk::agent::prd(&task)?;
        let service = parsed.get("kind").and_then(serde_json::Value::as_str) == Some("service");
        let mut prompt = format!("Requirement: {}{}\n\nPRD:\n{prd}", task.requirement, options_line(&task));
        if !task.feedback.is_empty() {
            prompt.push_str(&format!(
                "\n\nFix these problems found in the previous design:\n{}",
                qlayer_sdk::agent::feedback_text(&task.feedback)
            ));
        }
        let reply = complete_json::<Design>(
            vec![Message::new(Role::System, SYSTEM), Message::new(Role::User, prompt)],
            MAX_ATTEMPTS,
            |d| check(d, service),
        )?;
        let mut design = reply.value;
        if design.api.as_ref().is_some_and(serde_json::Value::is_null) {
            design.api = None;
        }
        let internal = |e: serde_json::Error| PluginError::Internal(e.to_string());
        let mut artifacts = vec![Artifact::text(DESIGN_PATH, serde_json::to_string_pretty(&design).map_err(internal)?)];
        if let Some(api) = &design.api {
            artifacts.push(Artifact::text(OPENAPI_PATH, serde_json::to_string_pretty(api).map_err(internal)?));
        }
        let owned = |owner: &str| design.files.iter().filter(|f| f.owner == owner).count();
        Ok(AgentOutput {
            summary: format!(
                "design: {} components, {} files planned (developer {}, qa-engineer {}, devops {}){} ({} attempt{})",
                design.components.len(),
                design.files.len(),
                owned("developer"),
                owned("qa-engineer"),
                owned("devops"),
                design.api.as_ref().map_or(String::new(), |api| format!(
                    ", an API of {} paths",
                    api.get("paths").and_then(serde_json::Value::as_object).map_or(0, |p| p.len())
                )),
                reply.attempts,
                if reply.attempts == 1 { "" } else { "s" }
            ),
            artifacts,
        })
    }
}

qlayer_sdk::export_agent!(Architect);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn design(files: serde_json::Value, api: serde_json::Value) -> Design {
        serde_json::from_value(serde_json::json!({
            "overview": "o", "components": [{"name": "cli", "responsibility": "r"}], "files": files, "api": api,
        }))
        .unwrap()
    }

    #[test]
    fn a_file_has_one_owner_and_a_service_an_api() {
        let one = serde_json::json!([{"path": "src/main.rs", "owner": "developer", "purpose": "p"}]);
        assert!(check(&design(one.clone(), serde_json::Value::Null), false).is_ok());
        let err = check(&design(one.clone(), serde_json::Value::Null), true).unwrap_err();
        assert!(err.contains("OpenAPI"), "{err}");
        let twice = serde_json::json!([
            {"path": "a.py", "owner": "developer", "purpose": "p"},
            {"path": "a.py", "owner": "qa-engineer", "purpose": "p"}
        ]);
        assert!(check(&design(twice, serde_json::Value::Null), false).unwrap_err().contains("twice"));
        let stranger = serde_json::json!([{"path": "a.py", "owner": "intern", "purpose": "p"}]);
        assert!(check(&design(stranger, serde_json::Value::Null), false).unwrap_err().contains("owner"));
        let api = serde_json::json!({"openapi": "3.1.0", "info": {"title": "t", "version": "1"},
            "paths": {"/links": {"post": {"responses": {"201": {"description": "made"}}}}}});
        assert!(check(&design(one.clone(), api), true).is_ok());
        let no_responses =
            serde_json::json!({"openapi": "3.1.0", "info": {"title": "t"}, "paths": {"/x": {"get": {}}}});
        assert!(check(&design(one, no_responses), true).unwrap_err().contains("responses"));
        let modules = serde_json::json!([
            {"path": "Cargo.toml", "owner": "developer", "purpose": "p"},
            {"path": "src/cli.rs", "owner": "developer", "purpose": "p", "module": "cli"}
        ]);
        assert!(check(&design(modules, serde_json::Value::Null), false).is_ok());
        let blank = serde_json::json!([{"path": "a.py", "owner": "developer", "purpose": "p", "module": " "}]);
        assert!(check(&design(blank, serde_json::Value::Null), false).unwrap_err().contains("module"));
    }
}
