//! An agent that uses the `tools` import: it lists the tools its step was granted and invokes the
//! one its task's requirement names with the task's options as input. Its artifact `tools.json`
//! holds what it saw: `{"granted": [names], "output": ..., "error": ...}`.

use qlayer_sdk::agent::Agent;
use qlayer_sdk::*;

struct ToolUser;

impl Agent for ToolUser {
    fn role() -> String {
        "tool-user".into()
    }

    fn run(task: Task) -> Result<AgentOutput, PluginError> {
        let granted: Vec<String> = qlayer_sdk::agent::tools().into_iter().map(|t| t.name).collect();
        let report = match qlayer_sdk::agent::invoke_tool(&task.requirement, &task.options_json) {
            Ok(output) => serde_json::json!({"granted": granted, "output": output}),
            Err(e) => serde_json::json!({"granted": granted, "error": format!("{e:?}")}),
        };
        Ok(AgentOutput {
            artifacts: vec![Artifact::text("tools.json", report.to_string())],
            summary: "used tools".into(),
        })
    }
}

qlayer_sdk::export_agent!(ToolUser);
