//! Generated bindings, one module per WIT version and, within it, one per world.
//!
//! [`v0_2`] is the current contract, `quantumlayer:plugin@0.2.0` (`wit/plugin.wit`): its types are
//! the runtime's public types. [`v0_1`] binds `quantumlayer:plugin@0.1.0` (`wit/0.1.0/`), which is
//! never edited, so components built against it keep loading; [`crate::compat`] converts between
//! the two (Zed's extension host does the same). In each version the provider world is generated
//! first and owns the shared `types` and `host` interfaces; the other worlds reuse them through
//! `with:`, so a `Completion` or `PluginError` is one Rust type whichever world it crosses.

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

/// `quantumlayer:plugin@0.2.0`, the current contract.
pub mod v0_2 {
    versioned!("../../wit");
}

/// `quantumlayer:plugin@0.1.0`, as released.
pub mod v0_1 {
    versioned!("../../wit/0.1.0");
}

pub use v0_2::{host, llm, types};
