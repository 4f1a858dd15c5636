//! Role agents: implement [`Agent`] and export it with [`export_agent!`](crate::export_agent).
//! Agents reach models only through [`complete`] (the host's `llm` import), which the host routes
//! through the tenant's providers and quotas.
//!
//! ```
//! use qlayer_sdk::{agent::Agent, *};
//!
//! struct Summariser;
//! impl Agent for Summariser {
//!     fn role() -> String { "summariser".into() }
//!     fn run(task: Task) -> Result<AgentOutput, PluginError> {
//!         let reply = qlayer_sdk::agent::complete(&CompletionRequest::new(
//!             vec![Message::new(Role::User, task.requirement)],
//!         ))?;
//!         Ok(AgentOutput { artifacts: vec![Artifact::text("SUMMARY.md", reply.text)], summary: "summarised".into() })
//!     }
//! }
//! qlayer_sdk::export_agent!(Summariser);
//! ```

use crate::{AgentOutput, Completion, CompletionRequest, Message, PluginError, ResponseFormat, Role, Task, Usage};
use serde::de::DeserializeOwned;
use std::marker::PhantomData;

#[doc(hidden)]
#[allow(missing_docs, unsafe_code, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "quantumlayer:plugin/agent-plugin",
        with: {
            "quantumlayer:plugin/types@0.2.0": crate::__bindings::quantumlayer::plugin::types,
            "quantumlayer:plugin/host@0.2.0": crate::__bindings::quantumlayer::plugin::host,
        },
        pub_export_macro: true,
        export_macro_name: "__export_agent_world",
        default_bindings_module: "qlayer_sdk::agent::bindings",
    });
}

/// A role agent.
pub trait Agent: 'static {
    /// The role played, such as `product-manager`.
    fn role() -> String;
    /// Does the task.
    fn run(task: Task) -> Result<AgentOutput, PluginError>;
}

/// Asks the host for a completion.
///
/// ```no_run
/// # use qlayer_sdk::*;
/// let reply = qlayer_sdk::agent::complete(&CompletionRequest {
///     max_tokens: Some(100),
///     ..CompletionRequest::new(vec![Message::new(Role::User, "hi")])
/// })?;
/// # Ok::<(), PluginError>(())
/// ```
pub fn complete(request: &CompletionRequest) -> Result<Completion, PluginError> {
    bindings::quantumlayer::plugin::llm::complete(request)
}

pub use bindings::quantumlayer::plugin::tools::ToolInfo;

/// The tools this step was granted (the pipeline names them); empty when none are.
pub fn tools() -> Vec<ToolInfo> {
    bindings::quantumlayer::plugin::tools::list()
}

/// Invokes granted tool `name` with JSON input and returns its JSON output. The host runs it in
/// the tool's own sandbox for this tenant; a name not granted is [`PluginError::InvalidInput`].
///
/// ```no_run
/// let out = qlayer_sdk::agent::invoke_tool("text-stats", r#"{"text": "hello world"}"#)?;
/// # Ok::<(), qlayer_sdk::PluginError>(())
/// ```
pub fn invoke_tool(name: &str, input_json: &str) -> Result<String, PluginError> {
    bindings::quantumlayer::plugin::tools::invoke(name, input_json)
}

/// A value parsed from the model's JSON reply, with the usage of every attempt.
#[derive(Debug)]
pub struct JsonReply<T> {
    /// The parsed value.
    pub value: T,
    /// Tokens used over all attempts.
    pub usage: Usage,
    /// How many completions it took.
    pub attempts: u32,
}

/// Asks for JSON and parses it as `T`. When the reply is not valid, the error is sent back to the
/// model and it is asked again, at most `max_attempts` times in all (weaker models often need one
/// correction; an endless loop helps no one). `check` validates the parsed value beyond its shape.
///
/// Once the attempts are spent it fails with [`PluginError::InvalidInput`] naming the last
/// problem: a model that does not give usable JSON is not an outage, so the host neither retries
/// the step nor counts it against the plugin's circuit breaker. Errors of the completion itself
/// (the provider unavailable, rate limited, ...) are returned as they are.
///
/// ```no_run
/// # use qlayer_sdk::*;
/// #[derive(serde::Deserialize)]
/// struct Plan { steps: Vec<String> }
/// let reply = qlayer_sdk::agent::complete_json::<Plan>(
///     vec![Message::new(Role::User, "Plan a todo app as {\"steps\": [...]}")],
///     3,
///     |plan| if plan.steps.is_empty() { Err("`steps` is empty".into()) } else { Ok(()) },
/// )?;
/// # Ok::<(), PluginError>(())
/// ```
pub fn complete_json<T: DeserializeOwned>(
    mut messages: Vec<Message>,
    max_attempts: u32,
    check: impl Fn(&T) -> Result<(), String>,
) -> Result<JsonReply<T>, PluginError> {
    let mut usage = Usage { prompt_tokens: 0, completion_tokens: 0 };
    let mut last_problem = String::new();
    for attempt in 1..=max_attempts.max(1) {
        let reply = complete(&CompletionRequest {
            temperature: Some(0.2),
            response_format: ResponseFormat::JsonObject,
            ..CompletionRequest::new(messages.clone())
        })?;
        usage.prompt_tokens += reply.usage.prompt_tokens;
        usage.completion_tokens += reply.usage.completion_tokens;
        let problem = match crate::json::extract::<T>(&reply.text) {
            Ok(value) => match check(&value) {
                Ok(()) => return Ok(JsonReply { value, usage, attempts: attempt }),
                Err(problem) => format!(
                    "Your previous reply could not be used: {problem}. Reply with only the corrected JSON object."
                ),
            },
            Err(e) => e.feedback(),
        };
        crate::host::warn(&format!("attempt {attempt}/{max_attempts}: {problem}"));
        messages.push(Message::new(Role::Assistant, reply.text));
        messages.push(Message::new(Role::User, problem.clone()));
        last_problem = problem;
    }
    Err(PluginError::InvalidInput(format!(
        "the model gave no usable JSON after {max_attempts} attempts; last problem: {last_problem}"
    )))
}

#[doc(hidden)]
pub struct Adapter<T>(PhantomData<T>);

impl<T: Agent> bindings::exports::quantumlayer::plugin::agent::Guest for Adapter<T> {
    fn role() -> String {
        T::role()
    }
    fn run(task: Task) -> Result<AgentOutput, PluginError> {
        T::run(task)
    }
}

/// Exports an [`Agent`] as this component's `agent` interface.
///
/// ```ignore
/// qlayer_sdk::export_agent!(MyAgent);
/// ```
#[macro_export]
macro_rules! export_agent {
    ($agent:ty) => {
        $crate::__export_world!(agent, Agent, __export_agent_world, $agent);
    };
}
