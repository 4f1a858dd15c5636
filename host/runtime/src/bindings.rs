//! Generated bindings, one module per WIT version and, within it, one per world.
//!
//! [`v0_3`] is the current contract, `quantumlayer:plugin@0.3.0` (`wit/plugin.wit`). It changes only
//! the diagnostic (a column) and so the validator and agent interfaces; the rest it uses from
//! `quantumlayer:plugin@0.2.0` (`wit/deps/plugin-0.2.0/`), bound in [`v0_2`], whose Rust types it
//! reuses through `with:`. The runtime's public types are 0.2.0's, with 0.3.0's `Diagnostic` and
//! `Task` ([`types`]). [`v0_1`] binds `quantumlayer:plugin@0.1.0` (`wit/0.1.0/`). Released
//! versions are never edited, so components built against them keep loading; [`crate::compat`]
//! converts between them (Zed's extension host does the same). In 0.1.0 and 0.2.0 the provider
//! world is generated first and owns the shared `types` and `host` interfaces; the other worlds
//! reuse them through `with:`, so a `Completion` or `PluginError` is one Rust type whichever world
//! it crosses.

macro_rules! versioned {
    ($path:literal) => {
        pub mod provider {
            wasmtime::component::bindgen!({
                path: $path,
                world: "provider-plugin",
                additional_derives: [PartialEq],
                imports: { default: async },
                exports: { default: async },
            });
        }

        pub mod agent {
            wasmtime::component::bindgen!({
                path: $path,
                world: "agent-plugin",
                imports: { default: async },
                exports: { default: async },
                with: {
                    "quantumlayer:plugin/types": super::provider::quantumlayer::plugin::types,
                    "quantumlayer:plugin/host": super::provider::quantumlayer::plugin::host,
                },
            });
        }

        pub mod validator {
            wasmtime::component::bindgen!({
                path: $path,
                world: "validator-plugin",
                imports: { default: async },
                exports: { default: async },
                with: {
                    "quantumlayer:plugin/types": super::provider::quantumlayer::plugin::types,
                    "quantumlayer:plugin/host": super::provider::quantumlayer::plugin::host,
                },
            });
        }

        pub mod tool {
            wasmtime::component::bindgen!({
                path: $path,
                world: "tool-plugin",
                imports: { default: async },
                exports: { default: async },
                with: {
                    "quantumlayer:plugin/types": super::provider::quantumlayer::plugin::types,
                    "quantumlayer:plugin/host": super::provider::quantumlayer::plugin::host,
                },
            });
        }

        pub use agent::quantumlayer::plugin::llm;
        pub use provider::quantumlayer::plugin::host;
        pub use provider::quantumlayer::plugin::types;
    };
}

/// `quantumlayer:plugin@0.3.0`, the current contract: its validator and agent worlds (a 0.3.0
/// provider or tool exports 0.2.0's interface, and is bound as a 0.2.0 one).
pub mod v0_3 {
    pub mod agent {
        wasmtime::component::bindgen!({
            path: "../../wit",
            world: "agent-plugin",
            imports: { default: async },
            exports: { default: async },
            with: {
                "quantumlayer:plugin/types@0.2.0": crate::bindings::v0_2::types,
                "quantumlayer:plugin/host@0.2.0": crate::bindings::v0_2::host,
                "quantumlayer:plugin/llm@0.2.0": crate::bindings::v0_2::llm,
                "quantumlayer:plugin/tools@0.2.0": crate::bindings::v0_2::agent::quantumlayer::plugin::tools,
            },
        });
    }

    pub mod validator {
        wasmtime::component::bindgen!({
            path: "../../wit",
            world: "validator-plugin",
            imports: { default: async },
            exports: { default: async },
            with: {
                "quantumlayer:plugin/types@0.2.0": crate::bindings::v0_2::types,
                "quantumlayer:plugin/host@0.2.0": crate::bindings::v0_2::host,
                "quantumlayer:plugin/types@0.3.0": super::agent::quantumlayer::plugin0_3_0::types,
            },
        });
    }

    pub use agent::quantumlayer::plugin0_3_0::types;
}

/// `quantumlayer:plugin@0.2.0`, as released.
pub mod v0_2 {
    versioned!("../../wit/deps/plugin-0.2.0");
}

/// `quantumlayer:plugin@0.1.0`, as released.
pub mod v0_1 {
    versioned!("../../wit/0.1.0");
}

pub use v0_2::{host, llm};

/// The runtime's public types: 0.2.0's, with 0.3.0's `Diagnostic` and `Task`.
pub mod types {
    pub use super::v0_2::types::*;
    pub use super::v0_3::types::{Diagnostic, Task};
}
