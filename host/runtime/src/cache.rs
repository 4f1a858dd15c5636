//! Compiled components cached on disk, keyed by the component's digest and by the engine's
//! compatibility hash (wasmtime version, compiler settings, CPU features), so a cache written by
//! another build or another engine configuration is never used.

use anyhow::Context as _;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

pub(crate) struct CompiledCache {
    dir: PathBuf,
    engine_key: String,
    /// The wasmtime cache configuration Extism modules compile with, written at the first
    /// Extism compile (see [`CompiledCache::extism`]).
    extism: std::sync::OnceLock<Option<PathBuf>>,
}

impl CompiledCache {
    pub(crate) fn open(dir: PathBuf, engine: &Engine) -> anyhow::Result<Self> {
        create_private_dir(&dir).with_context(|| format!("creating the compile cache {}", dir.display()))?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(CompiledCache { dir, engine_key: format!("{:016x}", hasher.finish()), extism: Default::default() })
    }

    /// The wasmtime cache configuration file for Extism modules: Extism builds its own engine and
    /// compiles from the module's bytes, so its compilations are kept by wasmtime's own cache
    /// (keyed by the module's bytes, wasmtime's version and the compiler's settings), under
    /// `<cache dir>/extism`. The grants are bound per instance, not compiled in: one entry serves
    /// every install of a module.
    pub(crate) fn extism(&self) -> Option<&Path> {
        self.extism
            .get_or_init(|| match extism_config(&self.dir) {
                Ok(config) => Some(config),
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), "Extism modules will compile without a cache: {e:#}");
                    None
                }
            })
            .as_deref()
    }

    fn path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir.join(format!("{hex}-{}.cwasm", self.engine_key))
    }

    /// Loads the cached compilation of `digest`, or compiles `wasm` and caches it. A cache entry
    /// that fails to load (truncated, from another engine) is recompiled and replaced.
    pub(crate) fn load_or_compile(&self, engine: &Engine, digest: &str, wasm: &[u8]) -> anyhow::Result<Component> {
        let path = self.path(digest);
        if path.exists() {
            match deserialize(engine, &path) {
                Ok(component) => return Ok(component),
                Err(e) => tracing::warn!(path = %path.display(), "ignoring unusable compile cache entry: {e:#}"),
            }
        }
        // One compilation per entry at a time, across threads and processes sharing the cache:
        // the others wait and load what it wrote (a big component takes tens of seconds).
        let lock = std::fs::File::create(path.with_extension("lock")).and_then(|f| f.lock().map(|()| f));
        if lock.is_ok()
            && path.exists()
            && let Ok(component) = deserialize(engine, &path)
        {
            return Ok(component);
        }
        let component = Component::new(engine, wasm).map_err(anyhow::Error::from)?;
        match component.serialize() {
            Ok(bytes) => {
                if let Err(e) = write_atomically(&path, &bytes) {
                    tracing::warn!(path = %path.display(), "could not write the compile cache: {e:#}");
                }
            }
            Err(e) => tracing::warn!("could not serialize a compiled component: {e:#}"),
        }
        Ok(component)
    }
}

#[allow(unsafe_code)]
fn deserialize(engine: &Engine, path: &Path) -> anyhow::Result<Component> {
    // SAFETY: `deserialize_file` trusts the file to be wasmtime's own output. The cache directory
    // is created by this process with owner-only permissions, entries are written atomically
    // (temp file + rename) from `Component::serialize`, and wasmtime itself checks the header
    // against this engine's version and configuration before using an entry.
    Ok(unsafe { Component::deserialize_file(engine, path) }?)
}

/// Writes `<dir>/extism.toml`, pointing wasmtime's cache at `<dir>/extism` (owner-only, like the
/// components' entries: wasmtime trusts what it reads there).
fn extism_config(dir: &Path) -> anyhow::Result<PathBuf> {
    let entries = std::fs::canonicalize(dir)?.join("extism");
    create_private_dir(&entries)?;
    let directory = entries.to_str().context("the cache directory's path is not UTF-8")?;
    let mut table = toml::Table::new();
    table.insert("directory".into(), toml::Value::String(directory.into()));
    let mut config = toml::Table::new();
    config.insert("cache".into(), toml::Value::Table(table));
    let path = dir.join("extism.toml");
    write_atomically(&path, toml::to_string(&config)?.as_bytes())?;
    Ok(path)
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
