//! The QuantumLayer plugin manifest: what a plugin is, what it asks for, and the limits it needs.
//!
//! A manifest is TOML (`qlayer-plugin.toml` beside a plugin's source) carried inside the built
//! component as the custom section [`SECTION_NAME`], so the host can read it before compiling or
//! instantiating anything. This crate is shared by the host, its build script and the registry.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Name of the custom section that carries the manifest inside a component or module.
pub const SECTION_NAME: &str = "qlayer-plugin";

/// Largest memory a manifest may ask for, in MiB (the host clamps further by its own policy).
pub const MAX_MEMORY_MB: u32 = 4096;
/// Longest per-call time a manifest may ask for, in milliseconds.
pub const MAX_TIMEOUT_MS: u64 = 600_000;
/// The largest `limits.output-kb` a manifest may ask for (256 MiB).
pub const MAX_OUTPUT_KB: u32 = 262_144;
/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;

/// What a plugin is, as its author declared it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Manifest {
    /// Lowercase name: letters, digits and `-`, starting with a letter, at most 64 characters.
    pub name: String,
    /// Semantic version `MAJOR.MINOR.PATCH`, with optional `-pre` and `+build` parts.
    pub version: String,
    /// Which world the component targets.
    pub kind: Kind,
    /// How the plugin is built: a WIT component (the default) or an Extism core module.
    #[serde(default, skip_serializing_if = "Format::is_component")]
    pub format: Format,
    /// One or two sentences for catalogs and `qlayer plugin inspect`.
    pub description: String,
    /// What the plugin asks to be granted.
    #[serde(default)]
    pub capabilities: Capabilities,
    /// What the plugin needs to run.
    #[serde(default)]
    pub limits: Limits,
    /// For a tool plugin: what callers (agents, MCP clients) are told about the tool it offers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<ToolSpec>,
}

/// The tool a tool plugin offers, as agents and MCP clients see it:
///
/// ```toml
/// [tool]
/// description = "Counts the words of a text."
/// [tool.input-schema]
/// type = "object"
/// required = ["text"]
/// properties.text = { type = "string", description = "The text to count." }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ToolSpec {
    /// When to use the tool and what it returns, for a model choosing among tools (at most
    /// 1024 characters); the plugin's `description` is used when this is absent.
    pub description: Option<String>,
    /// A JSON Schema (draft 2020-12 unless its `$schema` names another) of the input, an object;
    /// the host checks every call's input against it before the plugin runs. Remote and file
    /// `$ref`s are not resolved.
    pub input_schema: Option<serde_json::Value>,
}

/// A tool's input schema, compiled once per loaded plugin; the host checks every call's input
/// with it before the plugin runs.
#[cfg(feature = "schema")]
#[derive(Debug)]
pub struct InputChecker(jsonschema::Validator);

#[cfg(feature = "schema")]
impl InputChecker {
    /// The input `input_json` as JSON, if it matches the schema; else what is wrong, naming the
    /// field (at most three problems).
    pub fn check(&self, input_json: &str) -> Result<(), String> {
        let value: serde_json::Value =
            serde_json::from_str(input_json).map_err(|e| format!("the input is not JSON: {e}"))?;
        let problems: Vec<String> = self
            .0
            .iter_errors(&value)
            .take(3)
            .map(|e| {
                let at = e.instance_path().to_string();
                if at.is_empty() { format!("{e}") } else { format!("at `{at}`: {e}") }
            })
            .collect();
        if problems.is_empty() {
            return Ok(());
        }
        Err(format!("the input does not match the tool's input schema: {}", problems.join("; ")))
    }
}

impl ToolSpec {
    /// The compiled input schema, when there is one (a validated manifest's always compiles).
    #[cfg(feature = "schema")]
    pub fn input_checker(&self) -> Option<InputChecker> {
        jsonschema::validator_for(self.input_schema.as_ref()?).ok().map(InputChecker)
    }

    /// Checks the description's length and that the schema is a valid JSON Schema of an object
    /// (without the `schema` feature, only that it describes an object).
    pub fn validate(&self) -> Result<(), ManifestError> {
        let invalid = |field, problem: String| Err(ManifestError::Invalid { field, problem });
        if let Some(d) = &self.description
            && (d.trim().is_empty() || d.len() > 1024)
        {
            return invalid("tool.description", "must be 1-1024 characters".into());
        }
        let Some(schema) = &self.input_schema else { return Ok(()) };
        if schema.get("type").and_then(|t| t.as_str()) != Some("object") {
            return invalid(
                "tool.input-schema",
                "must describe an object (`type = \"object\"`): a tool's input is a JSON object".into(),
            );
        }
        #[cfg(feature = "schema")]
        {
            if let Err(e) = jsonschema::meta::validate(schema) {
                let at = e.instance_path().to_string();
                let at = if at.is_empty() { String::new() } else { format!(" at `{at}`") };
                return invalid("tool.input-schema", format!("is not a valid JSON Schema{at}: {e}"));
            }
            if let Err(e) = jsonschema::validator_for(schema) {
                return invalid("tool.input-schema", format!("cannot be used: {e}"));
            }
        }
        Ok(())
    }
}

/// The world a plugin targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// `provider-plugin`: an LLM provider.
    Provider,
    /// `agent-plugin`: a role agent.
    Agent,
    /// `validator-plugin`: checks artifacts.
    Validator,
    /// `tool-plugin`: a marketplace tool.
    Tool,
}

impl Kind {
    /// All kinds, in a stable order.
    pub const ALL: [Kind; 4] = [Kind::Provider, Kind::Agent, Kind::Validator, Kind::Tool];

    /// The kind's name as written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Provider => "provider",
            Kind::Agent => "agent",
            Kind::Validator => "validator",
            Kind::Tool => "tool",
        }
    }

    /// The WIT world a component of this kind targets.
    pub fn world(self) -> &'static str {
        match self {
            Kind::Provider => "provider-plugin",
            Kind::Agent => "agent-plugin",
            Kind::Validator => "validator-plugin",
            Kind::Tool => "tool-plugin",
        }
    }

    /// The interface such a component must export.
    pub fn export(self) -> &'static str {
        match self {
            Kind::Provider => "provider",
            Kind::Agent => "agent",
            Kind::Validator => "validator",
            Kind::Tool => "tool",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown plugin kind `{s}`: expected one of provider, agent, validator, tool"))
    }
}

/// How a plugin is built, and so how the host runs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// A WebAssembly component targeting one of the contract's worlds (`wasm32-wasip2`).
    #[default]
    Component,
    /// A core module built with an Extism PDK, run through the `extism` runtime. Only tools.
    Extism,
}

impl Format {
    /// Whether this is the default, component format.
    pub fn is_component(&self) -> bool {
        *self == Format::Component
    }

    /// The format's name as written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Component => "component",
            Format::Extism => "extism",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Capabilities a plugin asks for. Nothing is granted by asking: the install decides.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Capabilities {
    /// Hosts it wants to reach over HTTP: `api.example.com`, `api.example.com:8443`,
    /// `*.example.com`, or `*` for "whatever host the operator configures" (a provider whose base
    /// URL is configuration). Only providers and tools may ask.
    #[serde(default)]
    pub outbound_hosts: Vec<String>,
    /// Configuration keys it reads through `host.config`.
    #[serde(default)]
    pub config: Vec<String>,
    /// Secrets it reads through `host.secret`.
    #[serde(default)]
    pub secrets: Vec<String>,
}

/// Resource limits a plugin asks for; the host clamps them to its policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Limits {
    /// Largest linear memory, in MiB.
    pub memory_mb: Option<u32>,
    /// Longest time one call may take, in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Largest output one call may return, in KiB (a tool's output, an agent's artifacts, a
    /// completion's text).
    pub output_kb: Option<u32>,
}

/// Why a manifest could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    /// The bytes are not a WebAssembly component or module.
    #[error("not a WebAssembly binary: {0}")]
    NotWasm(String),
    /// No `qlayer-plugin` custom section at the top level.
    #[error(
        "the component has no plugin manifest (custom section `{SECTION_NAME}`); build it with `qlayer plugin build`, which embeds qlayer-plugin.toml"
    )]
    Missing,
    /// More than one manifest section.
    #[error("the component carries {0} plugin manifests (custom section `{SECTION_NAME}`); exactly one is allowed")]
    Duplicate(usize),
    /// The section is not valid UTF-8 TOML of the manifest's shape.
    #[error("malformed plugin manifest: {0}")]
    Malformed(String),
    /// The manifest parses but a field is out of range.
    #[error("invalid plugin manifest: `{field}` {problem}")]
    Invalid {
        /// The key at fault.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

impl Manifest {
    /// What a model choosing among tools reads of this one: its tool description, else the
    /// plugin's description.
    pub fn tool_description(&self) -> &str {
        self.tool.as_ref().and_then(|t| t.description.as_deref()).unwrap_or(&self.description)
    }

    /// The JSON Schema of this tool's input: the declared one, or any object when it declares
    /// none (a tool is given a JSON object).
    pub fn tool_input_schema(&self) -> serde_json::Map<String, serde_json::Value> {
        match self.tool.as_ref().and_then(|t| t.input_schema.clone()) {
            Some(serde_json::Value::Object(schema)) => schema,
            _ => serde_json::Map::from_iter([("type".to_string(), serde_json::Value::from("object"))]),
        }
    }

    /// Parses and validates a manifest from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ManifestError> {
        if text.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::Malformed(format!(
                "{} bytes is larger than the {MAX_MANIFEST_BYTES}-byte limit",
                text.len()
            )));
        }
        let manifest: Manifest = toml::from_str(text)
            .map_err(|e| ManifestError::Malformed(e.message().to_string() + &location(text, e.span())))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// The manifest as TOML text.
    pub fn to_toml(&self) -> String {
        // Serialising plain strings, enums and numbers cannot fail.
        toml::to_string(self).unwrap_or_default()
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let invalid = |field, problem: &str| Err(ManifestError::Invalid { field, problem: problem.to_string() });
        if !valid_name(&self.name) {
            return invalid(
                "name",
                &format!("`{}` must be 1-64 lowercase letters, digits or `-`, starting with a letter", self.name),
            );
        }
        if !valid_semver(&self.version) {
            return invalid("version", &format!("`{}` is not a semantic version like 1.2.3", self.version));
        }
        if self.description.trim().is_empty() || self.description.len() > 1024 {
            return invalid("description", "must be 1-1024 characters");
        }
        if !matches!(self.kind, Kind::Provider | Kind::Tool) && !self.capabilities.outbound_hosts.is_empty() {
            return invalid(
                "capabilities.outbound-hosts",
                &format!("is only for providers and tools; a {} plugin has no network", self.kind),
            );
        }
        if self.format == Format::Extism && self.kind != Kind::Tool {
            return invalid("format", &format!("`extism` is only for tool plugins, not a {} plugin", self.kind));
        }
        if self.format == Format::Extism && !self.capabilities.secrets.is_empty() {
            return invalid(
                "capabilities.secrets",
                "an Extism plugin has no secret store; ask for config keys, or build a component",
            );
        }
        for host in &self.capabilities.outbound_hosts {
            if let Err(problem) = HostPattern::parse(host) {
                return invalid("capabilities.outbound-hosts", &problem);
            }
        }
        for key in self.capabilities.config.iter().chain(&self.capabilities.secrets) {
            if !valid_key(key) {
                return invalid(
                    "capabilities",
                    &format!("key `{key}` must be 1-64 characters of letters, digits, `_`, `-` or `.`"),
                );
            }
        }
        if let Some(mb) = self.limits.memory_mb
            && !(1..=MAX_MEMORY_MB).contains(&mb)
        {
            return invalid("limits.memory-mb", &format!("{mb} is outside 1..={MAX_MEMORY_MB}"));
        }
        if let Some(ms) = self.limits.timeout_ms
            && !(1..=MAX_TIMEOUT_MS).contains(&ms)
        {
            return invalid("limits.timeout-ms", &format!("{ms} is outside 1..={MAX_TIMEOUT_MS}"));
        }
        if let Some(kb) = self.limits.output_kb
            && !(1..=MAX_OUTPUT_KB).contains(&kb)
        {
            return invalid("limits.output-kb", &format!("{kb} is outside 1..={MAX_OUTPUT_KB}"));
        }
        if let Some(tool) = &self.tool {
            if self.kind != Kind::Tool {
                return invalid("tool", &format!("is only for tool plugins, not a {} plugin", self.kind));
            }
            tool.validate()?;
        }
        Ok(())
    }
}

fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn valid_key(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
}

fn valid_semver(s: &str) -> bool {
    let core = s.split(['-', '+']).next().unwrap_or("");
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()) && (p.len() == 1 || !p.starts_with('0')))
        && s.chars().all(|c| c.is_ascii_alphanumeric() || ".-+".contains(c))
}

/// A host an outbound request may go to, as written in a manifest or a grant.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// `*`: any host. Allowed in a manifest's request, never in a grant.
    Any,
    /// `host` (ports 80 and 443 only, as for a URL without a port) or `host:port`.
    Exact {
        /// Lowercase host name or IP literal.
        host: String,
        /// The port, when the pattern names one.
        port: Option<u16>,
    },
    /// `*.example.com`: any subdomain of the suffix (not the suffix itself), ports 80 and 443.
    Subdomains(String),
}

impl HostPattern {
    /// Parses `*`, `host`, `host:port`, `[v6]:port` or `*.suffix`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "*" {
            return Ok(HostPattern::Any);
        }
        if s.contains("://") || s.contains('/') || s.contains('@') {
            return Err(format!("`{s}` must be a host name such as api.example.com, not a URL"));
        }
        if let Some(suffix) = s.strip_prefix("*.") {
            return if valid_hostname(suffix) {
                Ok(HostPattern::Subdomains(suffix.to_ascii_lowercase()))
            } else {
                Err(format!("`{s}` is not a valid wildcard host"))
            };
        }
        let (host, port) = split_host_port(s)?;
        if !valid_hostname(host) && host.parse::<std::net::IpAddr>().is_err() {
            return Err(format!("`{s}` is not a valid host name"));
        }
        Ok(HostPattern::Exact { host: host.to_ascii_lowercase(), port })
    }

    /// Whether a request to `host` on `port` matches this pattern. A pattern without a port
    /// matches the web's default ports only (80 and 443): granting `127.0.0.1` does not open
    /// every port of that host.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let default_port = port == 80 || port == 443;
        match self {
            HostPattern::Any => true,
            HostPattern::Exact { host: h, port: p } => {
                h.trim_start_matches('[').trim_end_matches(']') == host && p.map_or(default_port, |p| p == port)
            }
            HostPattern::Subdomains(suffix) => {
                default_port
                    && host.len() > suffix.len() + 1
                    && host.ends_with(suffix.as_str())
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            }
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Exact { host, port: None } => f.write_str(host),
            HostPattern::Exact { host, port: Some(p) } if host.contains(':') => write!(f, "[{host}]:{p}"),
            HostPattern::Exact { host, port: Some(p) } => write!(f, "{host}:{p}"),
            HostPattern::Subdomains(s) => write!(f, "*.{s}"),
        }
    }
}

fn split_host_port(s: &str) -> Result<(&str, Option<u16>), String> {
    let bad_port = || format!("`{s}` has an invalid port");
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(|| format!("`{s}` has an unclosed `[`"))?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((host, Some(p.parse().map_err(|_| bad_port())?))),
            None if after.is_empty() => Ok((host, None)),
            None => Err(bad_port()),
        };
    }
    match s.rsplit_once(':') {
        Some((host, p)) if !host.contains(':') => Ok((host, Some(p.parse().map_err(|_| bad_port())?))),
        Some(_) => Ok((s, None)), // a bare IPv6 literal
        None => Ok((s, None)),
    }
}

fn valid_hostname(s: &str) -> bool {
    (1..=253).contains(&s.len())
        && s.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Reads the manifest from a component's (or module's) top-level custom section, without
/// compiling anything.
pub fn extract(wasm: &[u8]) -> Result<Manifest, ManifestError> {
    let sections = top_level_sections(wasm)?;
    match sections.as_slice() {
        [] => Err(ManifestError::Missing),
        [one] => {
            let text =
                std::str::from_utf8(one).map_err(|_| ManifestError::Malformed("the section is not UTF-8".into()))?;
            Manifest::from_toml(text)
        }
        many => Err(ManifestError::Duplicate(many.len())),
    }
}

/// Whether the binary is a component (rather than a core module).
pub fn is_component(wasm: &[u8]) -> bool {
    wasmparser::Parser::is_component(wasm)
}

fn top_level_sections(wasm: &[u8]) -> Result<Vec<Vec<u8>>, ManifestError> {
    use wasmparser::{Parser, Payload};
    if !wasm.starts_with(b"\0asm") {
        return Err(ManifestError::NotWasm("missing the `\\0asm` magic number".into()));
    }
    let mut found = Vec::new();
    // parse_all descends into nested modules and components; track the depth so only the
    // outermost binary's sections count.
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.map_err(|e| ManifestError::NotWasm(e.to_string()))? {
            Payload::Version { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::CustomSection(reader) if depth == 1 && reader.name() == SECTION_NAME => {
                found.push(reader.data().to_vec());
            }
            _ => {}
        }
    }
    Ok(found)
}

/// Returns `wasm` with `manifest` appended as the [`SECTION_NAME`] custom section. Refuses a
/// binary that already carries one, so a manifest is never silently replaced.
pub fn embed(wasm: &[u8], manifest: &Manifest) -> Result<Vec<u8>, ManifestError> {
    manifest.validate()?;
    match top_level_sections(wasm)?.len() {
        0 => {}
        n => return Err(ManifestError::Duplicate(n + 1)),
    }
    Ok(append_custom_section(wasm, SECTION_NAME, manifest.to_toml().as_bytes()))
}

/// Returns `wasm` with `manifest` as its one [`SECTION_NAME`] custom section: any the binary
/// carries are removed first. This is `qlayer plugin pack`, which makes any toolchain's
/// component or module a plugin, and how a manifest is changed without rebuilding.
pub fn replace(wasm: &[u8], manifest: &Manifest) -> Result<Vec<u8>, ManifestError> {
    manifest.validate()?;
    // Parse it all first, so a binary that is not well-formed is refused, not half-edited.
    top_level_sections(wasm)?;
    let stripped = strip(wasm)?;
    Ok(append_custom_section(&stripped, SECTION_NAME, manifest.to_toml().as_bytes()))
}

/// `wasm` without its top-level [`SECTION_NAME`] sections. Walks the outermost binary's sections
/// by their sizes, so nested modules and components (and their custom sections) are kept whole.
fn strip(wasm: &[u8]) -> Result<Vec<u8>, ManifestError> {
    let bad = |what: &str| ManifestError::NotWasm(what.to_string());
    let header = wasm.get(..8).ok_or_else(|| bad("shorter than the 8-byte header"))?;
    let mut out = header.to_vec();
    let mut at = 8;
    while at < wasm.len() {
        let start = at;
        at += 1; // the section id
        let (size, len) = read_leb128(&wasm[at..]).ok_or_else(|| bad("a section size is cut off"))?;
        at += len;
        let end = at
            .checked_add(size as usize)
            .filter(|&e| e <= wasm.len())
            .ok_or_else(|| bad("a section runs past the end"))?;
        let ours = wasm[start] == 0
            && read_leb128(&wasm[at..end])
                .is_some_and(|(n, l)| wasm[at + l..end].get(..n as usize) == Some(SECTION_NAME.as_bytes()));
        if !ours {
            out.extend_from_slice(&wasm[start..end]);
        }
        at = end;
    }
    Ok(out)
}

fn read_leb128(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Returns `wasm` with a custom section `name` holding `data` appended. Custom sections may
/// appear anywhere, in modules and components alike, and do not change what the binary does.
pub fn append_custom_section(wasm: &[u8], name: &str, data: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(name.len() + data.len() + 8);
    leb128(&mut payload, name.len() as u64);
    payload.extend_from_slice(name.as_bytes());
    payload.extend_from_slice(data);
    let mut out = Vec::with_capacity(wasm.len() + payload.len() + 8);
    out.extend_from_slice(wasm);
    out.push(0);
    leb128(&mut out, payload.len() as u64);
    out.extend_from_slice(&payload);
    out
}

fn leb128(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const GOOD: &str = r#"
name = "openai"
version = "0.1.0"
kind = "provider"
description = "OpenAI-compatible chat completions."
[capabilities]
outbound-hosts = ["*"]
config = ["base_url"]
secrets = ["api_key"]
[limits]
memory-mb = 64
timeout-ms = 30000
"#;

    // The smallest valid core module: magic + version.
    const EMPTY_MODULE: &[u8] = b"\0asm\x01\0\0\0";

    #[test]
    fn round_trips_through_a_custom_section() {
        let manifest = Manifest::from_toml(GOOD).unwrap();
        let wasm = embed(EMPTY_MODULE, &manifest).unwrap();
        assert_eq!(extract(&wasm).unwrap(), manifest);
        assert_eq!(embed(&wasm, &manifest), Err(ManifestError::Duplicate(2)));
    }

    #[test]
    fn replace_swaps_the_manifest_and_keeps_everything_else() {
        let manifest = Manifest::from_toml(GOOD).unwrap();
        // A binary with another custom section before and after ours, and a nested module
        // that carries a `qlayer-plugin` section of its own, which is not the binary's.
        let inner = append_custom_section(EMPTY_MODULE, SECTION_NAME, b"not ours");
        let mut nested = b"\0asm\x0d\0\x01\0".to_vec(); // a component header
        nested.push(1); // a core module section
        leb128(&mut nested, inner.len() as u64);
        nested.extend_from_slice(&inner);
        let nested = append_custom_section(&nested, "name", b"\0keep");
        let once = embed(&nested, &manifest).unwrap();
        let once = append_custom_section(&once, "producers", b"keep too");
        let mut changed = manifest.clone();
        changed.version = "0.2.0".into();
        let twice = replace(&once, &changed).unwrap();
        assert_eq!(extract(&twice).unwrap(), changed);
        // Everything else is kept, byte for byte: the nested module, both other sections.
        let without = |w: &[u8]| strip(w).unwrap();
        assert_eq!(without(&twice), without(&once));
        assert!(without(&twice).windows(8).any(|w| w == b"not ours"));
        assert!(without(&twice).windows(8).any(|w| w == b"keep too"));
        // Replacing in a binary without a manifest embeds one.
        assert_eq!(extract(&replace(EMPTY_MODULE, &manifest).unwrap()).unwrap(), manifest);
        // A cut-off binary is refused, not edited.
        assert!(matches!(replace(&twice[..twice.len() - 3], &manifest), Err(ManifestError::NotWasm(_))));
    }

    #[test]
    fn a_tool_declares_its_input_schema_and_a_bad_one_is_named() {
        let tool = r#"
name = "word-count"
version = "1.0.0"
kind = "tool"
description = "Counts words."
[tool]
description = "Counts the words of a text; returns {\"words\": N}."
[tool.input-schema]
type = "object"
required = ["text"]
additionalProperties = false
properties.text = { type = "string", minLength = 1 }
"#;
        let manifest = Manifest::from_toml(tool).unwrap();
        let spec = manifest.tool.as_ref().unwrap();
        assert_eq!(spec.input_schema.as_ref().unwrap()["properties"]["text"]["type"], "string");
        // It survives the trip through the custom section.
        assert_eq!(extract(&embed(EMPTY_MODULE, &manifest).unwrap()).unwrap(), manifest);

        let bad = |from: &str, to: &str| Manifest::from_toml(&tool.replace(from, to)).unwrap_err().to_string();
        let e = bad("type = \"string\", minLength = 1", "type = \"strin\"");
        assert!(
            e.contains("tool.input-schema")
                && e.contains("not a valid JSON Schema")
                && e.contains("properties/text/type"),
            "{e}"
        );
        let e = bad("type = \"object\"", "type = \"array\"");
        assert!(e.contains("must describe an object"), "{e}");
        let e = bad("minLength = 1", "minLength = -1");
        assert!(e.contains("tool.input-schema"), "{e}");
        let e = bad("kind = \"tool\"", "kind = \"validator\"");
        assert!(e.contains("`tool` is only for tool plugins"), "{e}");
        let e = bad("[tool]\n", "[tool]\nexample = 1\n");
        assert!(e.contains("example"), "{e}");
        // Calls are checked against it, naming the field.
        let checker = spec.input_checker().unwrap();
        assert_eq!(checker.check(r#"{"text": "a b"}"#), Ok(()));
        let e = checker.check(r#"{"text": 5}"#).unwrap_err();
        assert!(e.contains("at `/text`") && e.contains("not of type \"string\""), "{e}");
        let e = checker.check(r#"{"txt": "a"}"#).unwrap_err();
        assert!(e.contains("\"text\" is a required property") && e.contains("txt"), "{e}");
        let e = checker.check("{oops").unwrap_err();
        assert!(e.starts_with("the input is not JSON"), "{e}");
        // No schema: allowed (anything JSON goes, as before).
        let none = Manifest::from_toml(&tool[..tool.find("[tool.input-schema]").unwrap()]).unwrap();
        assert_eq!(none.tool.unwrap().input_schema, None);
    }

    #[test]
    fn missing_and_not_wasm_are_named() {
        assert_eq!(extract(EMPTY_MODULE), Err(ManifestError::Missing));
        assert!(matches!(extract(b"hello"), Err(ManifestError::NotWasm(_))));
    }

    #[test]
    fn unknown_keys_are_refused_with_the_key() {
        let err = Manifest::from_toml(&GOOD.replace("description", "descripton")).unwrap_err();
        assert!(err.to_string().contains("descripton"), "{err}");
    }

    #[test]
    fn ranges_name_the_field() {
        let err = Manifest::from_toml(&GOOD.replace("memory-mb = 64", "memory-mb = 0")).unwrap_err();
        assert!(err.to_string().contains("limits.memory-mb"), "{err}");
        let err = Manifest::from_toml(&GOOD.replace("0.1.0", "one")).unwrap_err();
        assert!(err.to_string().contains("version"), "{err}");
        let err = Manifest::from_toml(&GOOD.replace("\"provider\"", "\"agent\"")).unwrap_err();
        assert!(err.to_string().contains("outbound-hosts"), "{err}");
        let err = Manifest::from_toml(&GOOD.replace("\"*\"", "\"https://x.com/\"")).unwrap_err();
        assert!(err.to_string().contains("not a URL"), "{err}");
    }

    #[test]
    fn host_patterns_match_as_documented() {
        let exact = HostPattern::parse("api.example.com").unwrap();
        assert!(exact.matches("API.example.com", 443));
        assert!(!exact.matches("evil.com", 443));
        assert!(!exact.matches("api.example.com.evil.com", 443));
        // Without a port: the default ports only, not every port of the host.
        assert!(exact.matches("api.example.com", 80));
        assert!(!exact.matches("api.example.com", 6379));
        assert!(!HostPattern::parse("127.0.0.1").unwrap().matches("127.0.0.1", 5432));
        let port = HostPattern::parse("127.0.0.1:8080").unwrap();
        assert!(port.matches("127.0.0.1", 8080));
        assert!(!port.matches("127.0.0.1", 8081));
        let sub = HostPattern::parse("*.example.com").unwrap();
        assert!(sub.matches("a.example.com", 443));
        assert!(!sub.matches("a.example.com", 1));
        assert!(!sub.matches("example.com", 443));
        assert!(!sub.matches("aexample.com", 443));
        let v6 = HostPattern::parse("[::1]:9000").unwrap();
        assert!(v6.matches("[::1]", 9000));
        assert_eq!(v6.to_string(), "[::1]:9000");
    }
}
