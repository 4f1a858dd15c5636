//! Write QuantumLayer plugins in Rust: LLM providers, role agents, validators and tools, built as
//! WebAssembly components for the `quantumlayer:plugin@0.3.0` contract.
//!
//! Enable the feature of the one world your plugin targets (`provider`, `agent`, `validator` or
//! `tool`), implement its trait, and export it with its macro:
//!
//! ```
//! # #[cfg(feature = "tool")] mod example {
//! use qlayer_sdk::{PluginError, tool::Tool};
//!
//! struct Echo;
//!
//! impl Tool for Echo {
//!     fn invoke(input_json: String) -> Result<String, PluginError> {
//!         Ok(input_json)
//!     }
//! }
//!
//! qlayer_sdk::export_tool!(Echo);
//! # }
//! ```
//!
//! `qlayer plugin new tool echo` scaffolds such a crate and `qlayer plugin build` turns it into a
//! component with its manifest (`qlayer-plugin.toml`) embedded.
#![deny(missing_docs)]

#[doc(hidden)]
#[allow(missing_docs, unsafe_code, clippy::all)]
pub mod __bindings {
    // The shared types and the `host` import, generated once; each world module below reuses
    // them so that one `Completion` type serves every world. 0.3.0 uses 0.2.0's types but for
    // `diagnostic` and `task`.
    wit_bindgen::generate!({
        inline: "package qlayer:sdk; world base { import quantumlayer:plugin/host@0.2.0; import quantumlayer:plugin/types@0.3.0; }",
        path: "../wit",
        world: "qlayer:sdk/base",
        generate_all,
        generate_unused_types: true,
        additional_derives: [PartialEq],
    });
}

pub use __bindings::quantumlayer::plugin0_2_0::types::{
    AgentOutput, Artifact, Completion, CompletionChunk, CompletionRequest, ContentPart, EmbeddingRequest, Embeddings,
    FinishReason, ImageUrl, JsonSchema, LogLevel, Message, ModelInfo, PluginError, ResponseFormat, Role, Severity,
    ToolCall, ToolCallDelta, ToolChoice, ToolDefinition, Usage,
};
pub use __bindings::quantumlayer::plugin0_3_0::types::{Diagnostic, Task};

pub mod host;
pub mod json;

#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "provider")]
pub mod provider;

#[cfg(feature = "agent")]
pub mod agent;

#[cfg(feature = "validator")]
pub mod validator;

#[cfg(feature = "tool")]
pub mod tool;

impl Message {
    /// A message of `role` with one text part.
    ///
    /// ```
    /// use qlayer_sdk::{Message, Role};
    /// let m = Message::new(Role::User, "hello");
    /// assert_eq!(m.text(), "hello");
    /// ```
    pub fn new(role: Role, text: impl Into<String>) -> Self {
        Message {
            role,
            content: vec![ContentPart::Text(text.into())],
            tool_calls: vec![],
            tool_call_id: None,
            name: None,
        }
    }

    /// The message's text parts, joined (image parts left out).
    pub fn text(&self) -> String {
        self.content
            .iter()
            .filter_map(|p| match p {
                ContentPart::Text(t) => Some(t.as_str()),
                ContentPart::ImageUrl(_) => None,
            })
            .collect()
    }
}

impl CompletionRequest {
    /// A request for the provider's default model with everything else unset; set fields with
    /// struct update syntax (`CompletionRequest { max_tokens: Some(100), ..CompletionRequest::new(m) }`).
    pub fn new(messages: Vec<Message>) -> Self {
        CompletionRequest {
            model: String::new(),
            messages,
            tools: vec![],
            tool_choice: None,
            parallel_tool_calls: None,
            response_format: ResponseFormat::Text,
            max_tokens: None,
            temperature: None,
            top_p: None,
            top_k: None,
            seed: None,
            stop: vec![],
            user: None,
        }
    }
}

impl Artifact {
    /// A text file artifact; the media type is guessed from the extension.
    ///
    /// ```
    /// let a = qlayer_sdk::Artifact::text("src/main.rs", "fn main() {}");
    /// assert_eq!(a.media_type, "text/x-rust");
    /// ```
    pub fn text(path: impl Into<String>, content: impl Into<String>) -> Self {
        let path = path.into();
        Artifact { media_type: media_type(&path).to_string(), path, content: content.into().into_bytes() }
    }

    /// The content as UTF-8 text, if it is.
    ///
    /// ```
    /// let a = qlayer_sdk::Artifact::text("a.txt", "hi");
    /// assert_eq!(a.as_text(), Some("hi"));
    /// ```
    pub fn as_text(&self) -> Option<&str> {
        std::str::from_utf8(&self.content).ok()
    }
}

/// A media type for a file path, from its extension.
///
/// ```
/// assert_eq!(qlayer_sdk::media_type("Cargo.toml"), "application/toml");
/// ```
pub fn media_type(path: &str) -> &'static str {
    match path.rsplit('.').next().unwrap_or("") {
        "rs" => "text/x-rust",
        "py" => "text/x-python",
        "js" | "mjs" => "text/javascript",
        "ts" => "text/x-typescript",
        "go" => "text/x-go",
        "json" => "application/json",
        "toml" => "application/toml",
        "yaml" | "yml" => "application/yaml",
        "md" => "text/markdown",
        "html" => "text/html",
        "css" => "text/css",
        "sh" => "text/x-shellscript",
        _ => "text/plain",
    }
}

/// Shared body of the `export_*!` macros: the component exports exist only in the wasm build;
/// natively (unit tests of a plugin crate) the type is only checked against the world's trait.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_world {
    ($module:ident, $trait:ident, $world_macro:ident, $ty:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            type __QlayerExport = $crate::$module::Adapter<$ty>;
    $crate::$module::bindings::$world_macro!(__QlayerExport with_types_in $crate::$module::bindings);
        };
        #[cfg(not(target_arch = "wasm32"))]
        const _: fn() = || {
            fn exported<T: $crate::$module::$trait>() {}
            exported::<$ty>();
        };
    };
}
