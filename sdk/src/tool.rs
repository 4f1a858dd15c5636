//! Marketplace tools: implement [`Tool`] and export it with [`export_tool!`](crate::export_tool).
//! See the crate docs for an example.

use crate::PluginError;
use std::marker::PhantomData;

#[doc(hidden)]
#[allow(missing_docs, unsafe_code, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "quantumlayer:plugin/tool-plugin@0.3.0",
        with: {
            "quantumlayer:plugin/types@0.2.0": crate::__bindings::quantumlayer::plugin0_2_0::types,
            "quantumlayer:plugin/host@0.2.0": crate::__bindings::quantumlayer::plugin0_2_0::host,
            "quantumlayer:plugin/tool@0.2.0": generate,
        },
        pub_export_macro: true,
        export_macro_name: "__export_tool_world",
        default_bindings_module: "qlayer_sdk::tool::bindings",
    });
}

/// A tool: JSON in, JSON out.
pub trait Tool: 'static {
    /// Runs the tool on its JSON input.
    fn invoke(input_json: String) -> Result<String, PluginError>;
}

#[doc(hidden)]
pub struct Adapter<T>(PhantomData<T>);

impl<T: Tool> bindings::exports::quantumlayer::plugin0_2_0::tool::Guest for Adapter<T> {
    fn invoke(input_json: String) -> Result<String, PluginError> {
        T::invoke(input_json)
    }
}

/// Exports a [`Tool`] as this component's `tool` interface.
///
/// ```ignore
/// qlayer_sdk::export_tool!(MyTool);
/// ```
#[macro_export]
macro_rules! export_tool {
    ($tool:ty) => {
        $crate::__export_world!(tool, Tool, __export_tool_world, $tool);
    };
}
