//! What an install granted a plugin, checked against what its manifest asked for.

use qlayer_manifest::{HostPattern, Manifest};
use std::collections::BTreeMap;
use std::fmt;

/// A secret value. Its `Debug` and `Display` never show it, so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The value, for handing to the plugin that was granted it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// What one install of a plugin may use. Empty by default: no network, no config, no secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// Hosts the plugin's outbound HTTP requests may reach.
    pub outbound_hosts: Vec<HostPattern>,
    /// Configuration values, by key.
    pub config: BTreeMap<String, String>,
    /// Secret values, by key.
    pub secrets: BTreeMap<String, Secret>,
}

/// A grant the manifest did not ask for, or one too broad to give.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GrantError {
    /// The grant names a host the plugin did not ask for.
    #[error("plugin `{plugin}` does not ask for outbound host `{host}` (it asks for: {asked})")]
    HostNotRequested {
        /// The plugin.
        plugin: String,
        /// The granted host.
        host: String,
        /// What the manifest asks for.
        asked: String,
    },
    /// `*` cannot be granted: grant the specific hosts.
    #[error("plugin `{plugin}`: `*` cannot be granted; grant the specific hosts it may reach")]
    WildcardGrant {
        /// The plugin.
        plugin: String,
    },
    /// The grant names an address the operator's network policy does not allow.
    #[error("plugin `{plugin}`: outbound host `{host}` cannot be granted: {reason}")]
    NetworkPolicy {
        /// The plugin.
        plugin: String,
        /// The granted host.
        host: String,
        /// Why.
        reason: String,
    },
    /// The plugin could not be prepared with these grants (an Extism module failed to compile).
    #[error("plugin `{plugin}` could not be prepared: {message}")]
    Prepare {
        /// The plugin.
        plugin: String,
        /// Why.
        message: String,
    },
    /// A config or secret key the plugin did not ask for.
    #[error("plugin `{plugin}` does not ask for {what} `{key}` (it asks for: {asked})")]
    KeyNotRequested {
        /// The plugin.
        plugin: String,
        /// `config key` or `secret`.
        what: &'static str,
        /// The key.
        key: String,
        /// What the manifest asks for.
        asked: String,
    },
}

fn list(items: &[String]) -> String {
    if items.is_empty() { "nothing".into() } else { items.join(", ") }
}

impl Grants {
    /// Checks that every grant was asked for by the manifest. Run once, at install.
    pub fn check(&self, manifest: &Manifest) -> Result<(), GrantError> {
        let plugin = manifest.name.clone();
        let asked: Vec<HostPattern> =
            manifest.capabilities.outbound_hosts.iter().filter_map(|h| HostPattern::parse(h).ok()).collect();
        for grant in &self.outbound_hosts {
            let covered = match grant {
                HostPattern::Any => return Err(GrantError::WildcardGrant { plugin }),
                HostPattern::Exact { host, port } => asked.iter().any(|a| match a {
                    HostPattern::Any => true,
                    // An ask without a port covers the default ports (a grant without one, or
                    // with 80 or 443); another port must be asked for.
                    HostPattern::Exact { .. } => {
                        a == grant
                            || matches!(a, HostPattern::Exact { host: h, port: None }
                                if h == host && port.is_none_or(|p| p == 80 || p == 443))
                    }
                    HostPattern::Subdomains(_) => a.matches(host, port.unwrap_or(443)),
                }),
                HostPattern::Subdomains(_) => asked.iter().any(|a| matches!(a, HostPattern::Any) || a == grant),
            };
            if !covered {
                return Err(GrantError::HostNotRequested {
                    plugin,
                    host: grant.to_string(),
                    asked: list(&manifest.capabilities.outbound_hosts),
                });
            }
        }
        for (what, keys, asked) in [
            ("config key", self.config.keys().collect::<Vec<_>>(), &manifest.capabilities.config),
            ("secret", self.secrets.keys().collect(), &manifest.capabilities.secrets),
        ] {
            if let Some(key) = keys.into_iter().find(|k| !asked.contains(k)) {
                return Err(GrantError::KeyNotRequested { plugin, what, key: key.clone(), asked: list(asked) });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn manifest(hosts: &[&str]) -> Manifest {
        Manifest::from_toml(&format!(
            "name='p'\nversion='1.0.0'\nkind='provider'\ndescription='d'\n[capabilities]\noutbound-hosts={hosts:?}\nconfig=['base_url']\nsecrets=['api_key']"
        ))
        .unwrap()
    }

    fn hosts(h: &[&str]) -> Grants {
        Grants { outbound_hosts: h.iter().map(|h| HostPattern::parse(h).unwrap()).collect(), ..Default::default() }
    }

    #[test]
    fn grants_must_be_asked_for() {
        assert!(hosts(&["api.openai.com"]).check(&manifest(&["*"])).is_ok());
        assert!(hosts(&["api.openai.com:443"]).check(&manifest(&["api.openai.com"])).is_ok());
        assert!(hosts(&["a.example.com"]).check(&manifest(&["*.example.com"])).is_ok());
        assert!(hosts(&["api.openai.com:6379"]).check(&manifest(&["api.openai.com"])).is_err());
        assert!(matches!(
            hosts(&["evil.com"]).check(&manifest(&["api.openai.com"])),
            Err(GrantError::HostNotRequested { .. })
        ));
        assert!(matches!(hosts(&["*"]).check(&manifest(&["*"])), Err(GrantError::WildcardGrant { .. })));
        let mut g = Grants::default();
        g.config.insert("base_ur".into(), "x".into());
        let err = g.check(&manifest(&[])).unwrap_err();
        assert!(err.to_string().contains("base_ur"), "{err}");
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("sk-123");
        assert_eq!(format!("{s} {s:?}"), "[redacted] Secret([redacted])");
    }
}
