//! A `validator-plugin` of `quantumlayer:plugin@0.2.0`, bound with wit-bindgen directly against
//! `wit/deps/plugin-0.2.0` (the SDK has moved to 0.3.0, whose diagnostics have a column). It
//! reports each line with `TODO` as a warning `todo-v0-2` at that line, and logs through the 0.2.0
//! `host` import.
#![allow(unsafe_code)]

wit_bindgen::generate!({
    path: "../../../wit/deps/plugin-0.2.0",
    world: "validator-plugin",
});

use exports::quantumlayer::plugin::validator::Guest;
use quantumlayer::plugin::host;
use quantumlayer::plugin::types::{Artifact, Diagnostic, LogLevel, PluginError, Severity};

struct Todos;

impl Guest for Todos {
    fn validate(artifacts: Vec<Artifact>) -> Result<Vec<Diagnostic>, PluginError> {
        host::log(LogLevel::Info, &format!("validating {} artifacts", artifacts.len()));
        let mut found = Vec::new();
        for a in &artifacts {
            let Ok(text) = std::str::from_utf8(&a.content) else { continue };
            for (i, line) in text.lines().enumerate() {
                if line.contains("TODO") {
                    found.push(Diagnostic {
                        severity: Severity::Warning,
                        rule: "todo-v0-2".into(),
                        path: Some(a.path.clone()),
                        line: Some(i as u32 + 1),
                        message: "a TODO is left".into(),
                    });
                }
            }
        }
        Ok(found)
    }
}

export!(Todos);
