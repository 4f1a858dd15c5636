//! Validators: implement [`Validator`] and export it with [`export_validator!`](crate::export_validator).
//!
//! ```
//! use qlayer_sdk::{validator::Validator, *};
//!
//! struct NoTabs;
//! impl Validator for NoTabs {
//!     fn validate(artifacts: Vec<Artifact>) -> Result<Vec<Diagnostic>, PluginError> {
//!         Ok(artifacts.iter().filter(|a| a.content.contains(&b'\t')).map(|a| Diagnostic {
//!             severity: Severity::Warning, rule: "no-tabs".into(), path: Some(a.path.clone()),
//!             line: None, column: None, message: "contains a tab".into(),
//!         }).collect())
//!     }
//! }
//! qlayer_sdk::export_validator!(NoTabs);
//! ```

use crate::{Artifact, Diagnostic, PluginError};
use std::marker::PhantomData;

#[doc(hidden)]
#[allow(missing_docs, unsafe_code, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "quantumlayer:plugin/validator-plugin@0.3.0",
        with: {
            "quantumlayer:plugin/types@0.2.0": crate::__bindings::quantumlayer::plugin0_2_0::types,
            "quantumlayer:plugin/host@0.2.0": crate::__bindings::quantumlayer::plugin0_2_0::host,
            "quantumlayer:plugin/types@0.3.0": crate::__bindings::quantumlayer::plugin0_3_0::types,
        },
        pub_export_macro: true,
        export_macro_name: "__export_validator_world",
        default_bindings_module: "qlayer_sdk::validator::bindings",
    });
}

/// A validator of artifacts.
pub trait Validator: 'static {
    /// Findings for the artifacts; an empty list when all is well.
    fn validate(artifacts: Vec<Artifact>) -> Result<Vec<Diagnostic>, PluginError>;
}

#[doc(hidden)]
pub struct Adapter<T>(PhantomData<T>);

impl<T: Validator> bindings::exports::quantumlayer::plugin0_3_0::validator::Guest for Adapter<T> {
    fn validate(artifacts: Vec<Artifact>) -> Result<Vec<Diagnostic>, PluginError> {
        T::validate(artifacts)
    }
}

/// Exports a [`Validator`] as this component's `validator` interface.
///
/// ```ignore
/// qlayer_sdk::export_validator!(MyValidator);
/// ```
#[macro_export]
macro_rules! export_validator {
    ($validator:ty) => {
        $crate::__export_world!(validator, Validator, __export_validator_world, $validator);
    };
}
