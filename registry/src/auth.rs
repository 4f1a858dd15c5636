//! Registry credentials: from the environment (scoped to one registry) or docker's
//! `config.json`. Credentials are only ever handed to the registry they were given for.

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use std::path::PathBuf;

/// Where credentials come from.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// docker's `config.json` (default: `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`).
    pub docker_config: Option<PathBuf>,
}

impl Credentials {
    /// Credentials for `registry` (`host[:port]`):
    /// 1. `QLAYER_REGISTRY_TOKEN` (bearer), or `QLAYER_REGISTRY_USERNAME` and
    ///    `QLAYER_REGISTRY_PASSWORD` (basic) — only when `QLAYER_REGISTRY_HOST` names this
    ///    registry, so they never reach another one;
    /// 2. the `auths` entry for the registry in docker's `config.json` (`auth`, `username` and
    ///    `password`, or `identitytoken`);
    /// 3. otherwise anonymous.
    pub fn for_registry(&self, registry: &str) -> RegistryAuth {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if env("QLAYER_REGISTRY_HOST").as_deref() == Some(registry) {
            if let Some(token) = env("QLAYER_REGISTRY_TOKEN") {
                return RegistryAuth::Bearer(token);
            }
            if let (Some(user), Some(password)) = (env("QLAYER_REGISTRY_USERNAME"), env("QLAYER_REGISTRY_PASSWORD")) {
                return RegistryAuth::Basic(user, password);
            }
        }
        self.lookup_docker_config(registry).unwrap_or(RegistryAuth::Anonymous)
    }

    fn docker_config_path(&self) -> Option<PathBuf> {
        if let Some(path) = &self.docker_config {
            return Some(path.clone());
        }
        if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
            return Some(PathBuf::from(dir).join("config.json"));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker").join("config.json"))
    }

    fn lookup_docker_config(&self, registry: &str) -> Option<RegistryAuth> {
        let text = std::fs::read_to_string(self.docker_config_path()?).ok()?;
        let config: serde_json::Value = serde_json::from_str(&text).ok()?;
        let auths = config.get("auths")?.as_object()?;
        // Entries may be written as `host`, `https://host` or `https://host/v1/`.
        let entry = auths.iter().find_map(|(key, value)| {
            let host = key.trim_start_matches("https://").trim_start_matches("http://");
            let host = host.split('/').next().unwrap_or(host);
            (host == registry || (registry == "docker.io" && host == "index.docker.io")).then_some(value)
        })?;
        let field = |k: &str| entry.get(k).and_then(|v| v.as_str()).filter(|v| !v.is_empty());
        if let Some(token) = field("identitytoken").or(field("registrytoken")) {
            return Some(RegistryAuth::Bearer(token.to_string()));
        }
        if let (Some(user), Some(password)) = (field("username"), field("password")) {
            return Some(RegistryAuth::Basic(user.to_string(), password.to_string()));
        }
        let decoded = base64::engine::general_purpose::STANDARD.decode(field("auth")?).ok()?;
        let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
        Some(RegistryAuth::Basic(user.to_string(), password.to_string()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn docker_config_entries_are_matched_by_host() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(
            &path,
            format!(r#"{{"auths":{{"https://registry.example.com/v1/":{{"auth":"{auth}"}},"other:5000":{{"identitytoken":"tok"}}}}}}"#),
        )
        .unwrap();
        let creds = Credentials { docker_config: Some(path) };
        assert!(
            matches!(creds.for_registry("registry.example.com"), RegistryAuth::Basic(u, p) if u == "alice" && p == "s3cret")
        );
        assert!(matches!(creds.for_registry("other:5000"), RegistryAuth::Bearer(t) if t == "tok"));
        assert!(matches!(creds.for_registry("elsewhere.example.com"), RegistryAuth::Anonymous));
    }
}
