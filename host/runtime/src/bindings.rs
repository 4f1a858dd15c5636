//! Generated bindings for `quantumlayer:plugin@0.1.0`, one module per world.
//!
//! The provider world is generated first and owns the shared `types` and `host` interfaces; the
//! other worlds reuse them through `with:`, so a `Completion` or `PluginError` is one Rust type
//! whichever world it crosses. When a new WIT version ships, it gets a sibling module and `From`
//! conversions to the latest (Zed's extension host does the same).

pub mod provider {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "provider-plugin",
        additional_derives: [PartialEq],
        imports: { default: async },
        exports: { default: async },
    });
}

pub mod agent {
    wasmtime::component::bindgen!({
        path: "../../wit",
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
        path: "../../wit",
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
        path: "../../wit",
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
