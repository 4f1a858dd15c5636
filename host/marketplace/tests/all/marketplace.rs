//! The marketplace against a real registry (Debian's `docker-registry`, the CNCF distribution
//! registry, started per test on a free loopback port): push, search, info, install, run;
//! tampering, pinning and upgrades, signature policies, offline loads, transport rules, Extism
//! tools, and interop with skopeo.

use qlayer_marketplace::{GrantSpec, InstallError, Marketplace, MarketplaceConfig, TenantConfig};
use qlayer_registry::{SignaturePolicy, Verification, parse_reference};
use qlayer_runtime::{CallErrorKind, Format, Runtime, RuntimeConfig};
use qlayer_tests::{TestRegistry, TestServer, ensure_program, extism_hostile, marketplace_plugin, runtime};
use std::path::Path;
use std::time::Duration;

fn config(registry: &TestRegistry, policy: SignaturePolicy, keys: &[&Path]) -> MarketplaceConfig {
    MarketplaceConfig {
        insecure_registries: vec![registry.addr.clone()],
        signature_policy: policy,
        trusted_keys: keys.iter().map(|k| k.to_path_buf()).collect(),
        ..Default::default()
    }
}

async fn open(dir: &Path, config: MarketplaceConfig) -> Marketplace {
    Marketplace::open_local(dir, config).await.unwrap()
}

fn with_version(name: &str, version: &str) -> Vec<u8> {
    // Rebuild the example with another version in its manifest: strip nothing, re-embed into the
    // raw build output.
    let embedded = marketplace_plugin(name);
    let mut manifest = qlayer_manifest::extract(&embedded).unwrap();
    manifest.version = version.to_string();
    let package = format!("qlayer_tool_{}", name.replace('-', "_"));
    let target = if manifest.format == Format::Extism { "wasm32-unknown-unknown" } else { "wasm32-wasip2" };
    let raw =
        Path::new(qlayer_tests::built::PLUGIN_TARGET_DIR).join(target).join("release").join(format!("{package}.wasm"));
    qlayer_manifest::embed(&std::fs::read(raw).unwrap(), &manifest).unwrap()
}

fn no_grants() -> GrantSpec {
    GrantSpec::default()
}

#[tokio::test]
async fn push_search_info_install_and_run_through_the_host() {
    let registry = TestRegistry::start();
    let data = tempfile::tempdir().unwrap();
    let market = open(data.path(), config(&registry, SignaturePolicy::Warn, &[])).await;
    let rt = runtime();

    let stats = format!("{}/tools/text-stats:1.0.0", registry.addr);
    let digest = market.push(&marketplace_plugin("text-stats"), &stats, None).await.unwrap();
    market
        .push(&marketplace_plugin("url-check"), &format!("{}/tools/url-check:1.0.0", registry.addr), None)
        .await
        .unwrap();
    // First-party plugins travel the same way.
    let scripted = qlayer_bundled::bundled_plugin("scripted").unwrap();
    market.push(scripted, &format!("{}/first-party/scripted:0.1.0", registry.addr), None).await.unwrap();

    let all = market.search(&registry.addr, None).await.unwrap();
    let names: Vec<&str> = all.iter().filter_map(|e| e.latest.as_ref()).map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["scripted", "text-stats", "url-check"], "{all:?}");
    let url_check = all.iter().find(|e| e.repository.ends_with("tools/url-check")).unwrap();
    assert_eq!(url_check.latest.as_ref().unwrap().format, Format::Extism);
    let found = market.search(&registry.addr, Some("FREQUENT words")).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].latest.as_ref().unwrap().name, "text-stats");

    let info = market.info(&stats).await.unwrap();
    assert_eq!(info.resolved.digest, digest);
    assert_eq!(info.resolved.manifest.name, "text-stats");
    assert_eq!(info.verification, Verification::Unsigned);

    let outcome = market.install(&rt, &stats, "acme", &no_grants()).await.unwrap();
    assert_eq!(outcome.install.digest, digest);
    assert!(outcome.warning.as_deref().unwrap().contains("not signed"), "{:?}", outcome.warning);
    assert_eq!(market.list("acme").await.unwrap().len(), 1);

    let installed = market.load(&rt, "acme", "text-stats").await.unwrap();
    let mut tool = installed.any_tool("acme").await.unwrap();
    let out: serde_json::Value =
        serde_json::from_str(&tool.invoke(r#"{"text":"the cat and the hat. The end!","top":1}"#).await.unwrap())
            .unwrap();
    assert_eq!(out["words"], 7);
    assert_eq!(out["sentences"], 2);
    assert_eq!(out["top_words"][0]["word"], "the");
    assert_eq!(out["top_words"][0]["count"], 3);
    // Its manifest's input schema is checked before the plugin runs, naming the field.
    let err = tool.invoke(r#"{"txt":"typo"}"#).await.unwrap_err();
    assert!(err.to_string().contains("'txt' was unexpected"), "{err}");

    // The first-party provider installs from the registry and runs like the bundled one.
    market.install(&rt, &format!("{}/first-party/scripted:0.1.0", registry.addr), "acme", &no_grants()).await.unwrap();
    let provider = market.load(&rt, "acme", "scripted").await.unwrap();
    let models = provider.provider("acme").await.unwrap().models().await.unwrap();
    assert!(models.iter().any(|m| m.id.contains("scripted")), "{models:?}");

    // Pull by digest: the same artifact, pinned; an unknown digest is not found.
    let by_digest = format!("{}/tools/text-stats@{digest}", registry.addr);
    let pinned = market.install(&rt, &by_digest, "initech", &no_grants()).await.unwrap();
    assert_eq!((pinned.install.digest.as_str(), pinned.install.tag.as_deref()), (digest.as_str(), None));
    let unknown = format!("{}/tools/text-stats@sha256:{}", registry.addr, "0".repeat(64));
    let err = market.info(&unknown).await.unwrap_err();
    assert!(qlayer_marketplace::is_not_found(&err), "{err:#}");
    assert!(market.info(&format!("{}/tools/nothing-here:1.0.0", registry.addr)).await.is_err());

    // Another tenant's install looks exactly like a missing one.
    let theirs = market.get("globex", "text-stats").await.unwrap_err().to_string();
    let missing = market.get("globex", "no-such-plugin").await.unwrap_err().to_string();
    assert_eq!(theirs.replace("text-stats", "X"), missing.replace("no-such-plugin", "X"));
    assert!(market.remove("globex", "text-stats").await.is_err());
    assert!(market.list("globex").await.unwrap().is_empty());

    // Installing twice is refused; removing frees the blob.
    let again = market.install(&rt, &stats, "acme", &no_grants()).await.unwrap_err();
    assert!(matches!(again.downcast_ref::<InstallError>(), Some(InstallError::AlreadyInstalled { .. })), "{again}");
    market.remove("acme", "text-stats").await.unwrap();
    assert!(market.store().contains(&outcome.install.blob), "tenant initech still uses the blob");
    market.remove("initech", "text-stats").await.unwrap();
    assert!(!market.store().contains(&outcome.install.blob), "the last install's removal frees the blob");
}

#[tokio::test]
async fn a_blob_altered_in_the_registry_is_refused_and_nothing_is_kept() {
    let registry = TestRegistry::start();
    let data = tempfile::tempdir().unwrap();
    let market = open(data.path(), config(&registry, SignaturePolicy::Off, &[])).await;
    let cache = tempfile::tempdir().unwrap();
    let rt = Runtime::new(RuntimeConfig { cache_dir: Some(cache.path().to_path_buf()), ..Default::default() }).unwrap();
    let wasm = marketplace_plugin("text-stats");
    let reference = format!("{}/tools/text-stats:1.0.0", registry.addr);
    market.push(&wasm, &reference, None).await.unwrap();

    // Flip one byte in the middle of the stored blob: same size, different content.
    let path = registry.blob_path(&qlayer_registry::digest_of(&wasm));
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();

    let err = market.install(&rt, &reference, "acme", &no_grants()).await.unwrap_err().to_string();
    assert!(err.contains("does not match its digest"), "{err}");
    assert!(err.contains("nothing of it was stored"), "{err}");
    assert!(market.store().digests().is_empty(), "the store holds nothing");
    assert!(market.list("acme").await.unwrap().is_empty(), "nothing is installed");
    let cached = std::fs::read_dir(cache.path()).map(|d| d.count()).unwrap_or(0);
    assert_eq!(cached, 0, "nothing was compiled");
}

#[tokio::test]
async fn a_retagged_upstream_does_not_move_an_install_until_upgrade() {
    let registry = TestRegistry::start();
    let data = tempfile::tempdir().unwrap();
    let market = open(data.path(), config(&registry, SignaturePolicy::Off, &[])).await;
    let rt = runtime();
    let repo = format!("{}/tools/text-stats", registry.addr);
    let v1 = market.push(&with_version("text-stats", "1.0.0"), &format!("{repo}:1.0.0"), None).await.unwrap();
    market.push(&with_version("text-stats", "1.0.0"), &format!("{repo}:latest"), None).await.unwrap();
    let installed = market.install(&rt, &format!("{repo}:latest"), "acme", &no_grants()).await.unwrap();
    assert_eq!(installed.install.digest, v1);

    // Upstream publishes 1.1.0 and moves `latest` to it.
    let v2 = market.push(&with_version("text-stats", "1.1.0"), &format!("{repo}:1.1.0"), None).await.unwrap();
    market.push(&with_version("text-stats", "1.1.0"), &format!("{repo}:latest"), None).await.unwrap();
    assert_ne!(v1, v2);
    let still = market.get("acme", "text-stats").await.unwrap();
    assert_eq!((still.version.as_str(), still.digest.as_str()), ("1.0.0", v1.as_str()));
    let loaded = market.load(&rt, "acme", "text-stats").await.unwrap();
    assert_eq!(loaded.plugin().manifest().version, "1.0.0");

    let upgraded = market.upgrade(&rt, "acme", "text-stats", &no_grants()).await.unwrap().unwrap();
    assert_eq!(upgraded.replaced.as_deref(), Some("1.0.0"));
    assert_eq!((upgraded.install.version.as_str(), upgraded.install.digest.as_str()), ("1.1.0", v2.as_str()));
    assert_eq!(market.load(&rt, "acme", "text-stats").await.unwrap().plugin().manifest().version, "1.1.0");
    assert!(market.upgrade(&rt, "acme", "text-stats", &no_grants()).await.unwrap().is_none(), "already newest");

    // Semver-aware: 1.10.0 beats 1.9.0 (not lexical order); pre-releases are not offered.
    market.push(&with_version("text-stats", "1.9.0"), &format!("{repo}:1.9.0"), None).await.unwrap();
    market.push(&with_version("text-stats", "1.10.0"), &format!("{repo}:1.10.0"), None).await.unwrap();
    market.push(&with_version("text-stats", "2.0.0-rc.1"), &format!("{repo}:2.0.0-rc.1"), None).await.unwrap();
    let upgraded = market.upgrade(&rt, "acme", "text-stats", &no_grants()).await.unwrap().unwrap();
    assert_eq!(upgraded.install.version, "1.10.0");
}

#[tokio::test]
async fn signature_policies_refuse_unsigned_wrong_key_and_other_digest() {
    let registry = TestRegistry::start();
    let keys = tempfile::tempdir().unwrap();
    let (alice_key, alice_pub) = qlayer_marketplace::keygen(&keys.path().join("alice")).unwrap();
    let (mallory_key, _) = qlayer_marketplace::keygen(&keys.path().join("mallory")).unwrap();
    let alice = qlayer_marketplace::read_key(&alice_key).unwrap();
    let mallory = qlayer_marketplace::read_key(&mallory_key).unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(&registry, SignaturePolicy::Require, &[&alice_pub]);
    cfg.tenants
        .insert("lax".into(), TenantConfig { signature_policy: Some(SignaturePolicy::Warn), ..Default::default() });
    let market = open(data.path(), cfg).await;
    let rt = runtime();
    let r = |repo: &str| format!("{}/{repo}:1.0.0", registry.addr);
    let wasm = marketplace_plugin("text-stats");

    // Valid.
    market.push(&wasm, &r("signed/text-stats"), Some(&alice)).await.unwrap();
    let ok = market.install(&rt, &r("signed/text-stats"), "strict", &no_grants()).await.unwrap();
    assert_eq!(ok.verification, Some(Verification::Verified { key: "alice".into() }));
    assert!(ok.install.signature.contains("alice"));

    let refused = |e: anyhow::Error| match e.downcast::<InstallError>() {
        Ok(InstallError::Signature { verification, .. }) => verification,
        Ok(other) => panic!("expected a signature refusal, got {other}"),
        Err(e) => panic!("expected a signature refusal, got {e:#}"),
    };

    // Unsigned.
    market.remove("strict", "text-stats").await.unwrap();
    market.push(&wasm, &r("unsigned/text-stats"), None).await.unwrap();
    let err = market.install(&rt, &r("unsigned/text-stats"), "strict", &no_grants()).await.unwrap_err();
    assert!(err.to_string().contains("not signed"), "{err}");
    assert_eq!(refused(err), Verification::Unsigned);
    assert!(market.store().digests().is_empty(), "nothing downloaded for a refused install");

    // Wrong key.
    market.push(&wasm, &r("mallory/text-stats"), Some(&mallory)).await.unwrap();
    let err = market.install(&rt, &r("mallory/text-stats"), "strict", &no_grants()).await.unwrap_err();
    assert!(err.to_string().contains("none of its 1 signature(s) is by a trusted key"), "{err}");
    assert_eq!(refused(err), Verification::WrongKey { signatures: 1 });

    // A trusted signature over another digest, copied next to this artifact.
    let signed_digest = market.push(&wasm, &r("swap/text-stats"), Some(&alice)).await.unwrap();
    let other = format!("{}/swap/text-stats:1.0.1", registry.addr);
    let other_digest = market.push(&with_version("text-stats", "1.0.1"), &other, None).await.unwrap();
    let identity = format!("{}/swap/text-stats", registry.addr);
    let payload = qlayer_registry::sign::payload(&identity, &signed_digest);
    let signature = alice.sign(&payload);
    market
        .registry()
        .attach_signature(&parse_reference(&other).unwrap(), &other_digest, payload, signature)
        .await
        .unwrap();
    let err = market.install(&rt, &other, "strict", &no_grants()).await.unwrap_err();
    assert!(err.to_string().contains("for another digest"), "{err}");
    assert_eq!(refused(err), Verification::OtherDigest { signed: signed_digest });

    // Per-tenant policy: `warn` installs an unsigned plugin, with a warning that says why.
    let url_check = format!("{}/unsigned/url-check:1.0.0", registry.addr);
    market.push(&marketplace_plugin("url-check"), &url_check, None).await.unwrap();
    let grants = GrantSpec::parse(&["host:example.com".into()]).unwrap();
    assert!(market.install(&rt, &url_check, "strict", &grants).await.is_err());
    let lax = market.install(&rt, &url_check, "lax", &grants).await.unwrap();
    assert!(lax.warning.unwrap().contains("not signed"));

    // A validly signed artifact whose blob was then altered in the registry.
    let digest = qlayer_registry::digest_of(&wasm);
    let path = registry.blob_path(&digest);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let err = market.install(&rt, &r("signed/text-stats"), "strict", &no_grants()).await.unwrap_err();
    assert!(err.to_string().contains("does not match its digest"), "{err}");
}

#[tokio::test]
async fn installed_plugins_load_from_the_local_store_when_the_registry_is_down() {
    let mut registry = TestRegistry::start();
    let data = tempfile::tempdir().unwrap();
    let cfg = config(&registry, SignaturePolicy::Off, &[]);
    let reference = format!("{}/tools/text-stats:1.0.0", registry.addr);
    {
        let market = open(data.path(), cfg.clone()).await;
        market.push(&marketplace_plugin("text-stats"), &reference, None).await.unwrap();
        market.install(&runtime(), &reference, "acme", &no_grants()).await.unwrap();
    }
    registry.stop();

    let market = open(data.path(), cfg).await;
    let err = market.info(&reference).await.unwrap_err();
    assert!(err.to_string().contains(&registry.addr), "a registry error names the registry: {err}");
    let installed = market.load(&runtime(), "acme", "text-stats").await.unwrap();
    let out = installed.any_tool("acme").await.unwrap().invoke(r#"{"text":"offline works"}"#).await.unwrap();
    assert!(out.contains("\"words\":2"), "{out}");

    // A file changed in the local store is caught on load.
    let install = market.get("acme", "text-stats").await.unwrap();
    let path = market.store().path(&install.blob).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let err = market.load(&runtime(), "acme", "text-stats").await.unwrap_err();
    assert!(format!("{err:#}").contains("does not match its digest"), "{err:#}");
}

/// A call of an installed plugin does not read, check and load its binary again: the runtime
/// keeps what it loaded by digest, for every tenant that installed the same binary.
#[tokio::test]
async fn an_installed_plugin_is_loaded_once_not_per_call() {
    let registry = TestRegistry::start();
    let data = tempfile::tempdir().unwrap();
    let market = open(data.path(), config(&registry, SignaturePolicy::Off, &[])).await;
    let reference = format!("{}/tools/text-stats:1.0.0", registry.addr);
    market.push(&marketplace_plugin("text-stats"), &reference, None).await.unwrap();
    let rt = runtime();
    for tenant in ["acme", "beta"] {
        market.install(&rt, &reference, tenant, &no_grants()).await.unwrap();
    }
    let loads = rt.plugin_loads();
    for tenant in ["acme", "beta", "acme"] {
        let installed = market.load(&rt, tenant, "text-stats").await.unwrap();
        let out = installed.any_tool(tenant).await.unwrap().invoke(r#"{"text":"two words"}"#).await.unwrap();
        assert!(out.contains("\"words\":2"), "{out}");
    }
    assert_eq!(rt.plugin_loads(), loads, "loaded at install, not again per call");
    // Another runtime (another node's pool) loads it for itself, once.
    let other = runtime();
    market.load(&other, "acme", "text-stats").await.unwrap();
    market.load(&other, "beta", "text-stats").await.unwrap();
    assert_eq!(other.plugin_loads(), 1);
}

/// Nodes sharing a database (scale mode) share install records; each keeps its own blob store. A
/// node that lacks a binary pulls it by the install's pinned digest (not its tag, which may have
/// moved), verified; a tampered pull is refused and leaves nothing. Records an earlier version
/// kept in `<data dir>/installs.json` are moved into the database.
#[tokio::test]
async fn nodes_sharing_a_database_share_installs_and_pull_binaries_by_their_pinned_digest() {
    let registry = TestRegistry::start();
    let shared = tempfile::tempdir().unwrap();
    let db = qlayer_db::Db::open_sqlite(&shared.path().join("shared.db")).await.unwrap();
    let cfg = config(&registry, SignaturePolicy::Off, &[]);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let node = |i: usize| Marketplace::open(dirs[i].path(), cfg.clone(), db.clone());
    let (a, b, c) = (node(0).await.unwrap(), node(1).await.unwrap(), node(2).await.unwrap());
    // Each node has its own runtime (its own pool, and its own loaded plugins).
    let (rt, rt_b, rt_c) = (runtime(), runtime(), runtime());
    let repo = format!("{}/tools/text-stats", registry.addr);
    let v1 = a.push(&with_version("text-stats", "1.0.0"), &format!("{repo}:latest"), None).await.unwrap();
    let installed = a.install(&rt, &format!("{repo}:latest"), "acme", &no_grants()).await.unwrap().install;
    assert_eq!(installed.digest, v1);

    // Node B sees the install and has no binary until it first loads it.
    assert_eq!(b.list("acme").await.unwrap(), vec![installed.clone()]);
    assert!(!b.store().contains(&installed.blob));
    // Upstream moves the tag: B still gets the pinned version.
    a.push(&with_version("text-stats", "1.1.0"), &format!("{repo}:latest"), None).await.unwrap();
    let loaded = b.load(&rt_b, "acme", "text-stats").await.unwrap();
    assert_eq!(loaded.plugin().manifest().version, "1.0.0");
    assert!(b.store().contains(&installed.blob), "pulled once, kept in B's store");
    let out = loaded.any_tool("acme").await.unwrap().invoke(r#"{"text":"pulled by digest"}"#).await.unwrap();
    assert!(out.contains("\"words\":3"), "{out}");
    // One install per tenant and name across the nodes.
    let again = b.install(&rt, &format!("{repo}:latest"), "acme", &no_grants()).await.unwrap_err();
    assert!(matches!(again.downcast_ref::<InstallError>(), Some(InstallError::AlreadyInstalled { .. })), "{again}");
    // Another tenant still sees nothing.
    assert!(b.list("globex").await.unwrap().is_empty());
    assert!(b.get("globex", "text-stats").await.is_err());

    // The registry's copy is altered: node C, which has none, refuses it and keeps nothing.
    let path = registry.blob_path(&installed.blob);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let err = c.load(&rt_c, "acme", "text-stats").await.unwrap_err();
    assert!(format!("{err:#}").contains("does not match its digest"), "{err:#}");
    assert!(c.store().digests().is_empty(), "C keeps nothing of a tampered pull");
    // B, which has a verified copy, carries on.
    assert!(b.load(&rt_b, "acme", "text-stats").await.is_ok());

    // Removed through A: gone for B too, though B's store still has the bytes.
    a.remove("acme", "text-stats").await.unwrap();
    let err = b.load(&rt_b, "acme", "text-stats").await.unwrap_err();
    assert!(matches!(err.downcast_ref::<InstallError>(), Some(InstallError::NotInstalled { .. })), "{err:#}");

    // Records from an earlier version's installs.json move into the database at open.
    let legacy = tempfile::tempdir().unwrap();
    let old = qlayer_marketplace::Install { tenant: "initech".into(), ..installed.clone() };
    std::fs::write(legacy.path().join("installs.json"), serde_json::json!({"installs": [old]}).to_string()).unwrap();
    let d = Marketplace::open(legacy.path(), cfg.clone(), db.clone()).await.unwrap();
    assert_eq!(d.list("initech").await.unwrap(), vec![old.clone()]);
    assert_eq!(a.get("initech", "text-stats").await.unwrap(), old, "every node sees the imported record");
    assert!(!legacy.path().join("installs.json").exists());
    assert!(legacy.path().join("installs.json.imported").exists());
    db.close().await;
}

#[tokio::test]
async fn an_unlisted_insecure_registry_and_ungranted_capabilities_are_refused() {
    let registry = TestRegistry::start();
    let data = tempfile::tempdir().unwrap();
    let strict = open(data.path(), MarketplaceConfig::default()).await;
    let reference = format!("{}/tools/url-check:1.0.0", registry.addr);
    let err = strict.push(&marketplace_plugin("url-check"), &reference, None).await.unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains(&format!("--insecure-registry {}", registry.addr)), "{message}");
    assert!(strict.info(&reference).await.is_err());

    let market = open(data.path(), config(&registry, SignaturePolicy::Off, &[])).await;
    market.push(&marketplace_plugin("url-check"), &reference, None).await.unwrap();
    let err = market.install(&runtime(), &reference, "acme", &no_grants()).await.unwrap_err();
    assert!(err.to_string().contains("--grant host:<host[:port]>"), "{err}");
    assert!(market.store().digests().is_empty(), "nothing downloaded");
    assert!(market.list("acme").await.unwrap().is_empty());
    // A grant the plugin did not ask for is refused too.
    let stats = format!("{}/tools/text-stats:1.0.0", registry.addr);
    market.push(&marketplace_plugin("text-stats"), &stats, None).await.unwrap();
    let err = market
        .install(&runtime(), &stats, "acme", &GrantSpec::parse(&["host:example.com".into()]).unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not ask for outbound host `example.com`"), "{err}");
    let err = GrantSpec::parse(&["hots:example.com".into()]).unwrap_err();
    assert!(err.to_string().contains("expected host:<host[:port]>"), "{err}");
}

#[tokio::test]
async fn the_extism_tool_installs_from_the_registry_and_keeps_to_its_grants() {
    let registry = TestRegistry::start();
    let granted = TestServer::start().await;
    let other = TestServer::start().await;
    let data = tempfile::tempdir().unwrap();
    let market = open(data.path(), config(&registry, SignaturePolicy::Off, &[])).await;
    let rt = runtime();
    let reference = format!("{}/tools/url-check:1.0.0", registry.addr);
    market.push(&marketplace_plugin("url-check"), &reference, None).await.unwrap();
    let grants = GrantSpec::parse(&[format!("host:{}", granted.addr)]).unwrap();
    let outcome = market.install(&rt, &reference, "acme", &grants).await.unwrap();
    assert_eq!(outcome.install.format, Format::Extism);

    let installed = market.load(&rt, "acme", "url-check").await.unwrap();
    let mut tool = installed.any_tool("acme").await.unwrap();
    let out: serde_json::Value =
        serde_json::from_str(&tool.invoke(&format!(r#"{{"url":"http://{}/plain"}}"#, granted.addr)).await.unwrap())
            .unwrap();
    assert_eq!(out["status"], 200);
    assert_eq!(out["ok"], true);
    assert_eq!(out["bytes"], "granted host answered".len());

    // Another port on the same host is not granted; the request never leaves.
    let err = tool.invoke(&format!(r#"{{"url":"http://{}/plain"}}"#, other.addr)).await.unwrap_err();
    assert!(err.to_string().contains("not granted"), "{err}");
    assert!(other.requests().is_empty(), "the ungranted server saw nothing");
    // A redirect from the granted host to the ungranted one is refused at the hop.
    let mut tool = installed.any_tool("acme").await.unwrap();
    let err = tool
        .invoke(&format!(r#"{{"url":"http://{}/redirect?to=http://{}/plain"}}"#, granted.addr, other.addr))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not granted"), "{err}");
    assert!(other.requests().is_empty());
    // Bad input is the plugin's invalid-input error.
    let mut tool = installed.any_tool("acme").await.unwrap();
    let err = tool.invoke(r#"{"link":"x"}"#).await.unwrap_err();
    assert!(matches!(err.kind, CallErrorKind::Plugin(qlayer_runtime::PluginError::InvalidInput(_))), "{err}");
}

#[tokio::test]
async fn an_extism_plugin_that_loops_is_stopped_and_others_carry_on() {
    let rt = runtime();
    let installed = rt.load(&extism_hostile(32, 300)).unwrap().install(Default::default()).unwrap();
    let looping = {
        let installed = installed.clone();
        tokio::spawn(async move { installed.any_tool("tenant-a").await.unwrap().invoke("loop").await })
    };
    // Tenant B is served while A spins.
    let mut b = installed.any_tool("tenant-b").await.unwrap();
    assert_eq!(b.invoke("hello").await.unwrap(), "echo:hello");
    let err = looping.await.unwrap().unwrap_err();
    assert!(matches!(err.kind, CallErrorKind::Timeout(d) if d == Duration::from_millis(300)), "{err}");
    assert_eq!(&*err.tenant, "tenant-a");

    let mut c = installed.any_tool("tenant-c").await.unwrap();
    let err = c.invoke("grow").await.unwrap_err();
    assert!(
        matches!(err.kind, CallErrorKind::OutOfMemory { limit, .. } if limit == 32 << 20)
            || matches!(err.kind, CallErrorKind::Trap(_)),
        "{err}"
    );
    let err = installed.any_tool("tenant-c").await.unwrap().invoke("fail").await.unwrap_err();
    assert!(
        matches!(&err.kind, CallErrorKind::Plugin(qlayer_runtime::PluginError::InvalidInput(m)) if m == "told to fail"),
        "{err}"
    );
    // No grant: no network at all.
    let server = TestServer::start().await;
    let err = installed
        .any_tool("tenant-c")
        .await
        .unwrap()
        .invoke(&format!("fetch:http://{}/plain", server.addr))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not granted"), "{err}");
    assert!(server.requests().is_empty());
}

/// Issue 14 item 10: an Extism plugin's log lines carry its tenant and name, keep to the same
/// budget as components' and cannot forge a line.
#[test]
fn extism_logs_are_budgeted_escaped_and_name_the_tenant_and_plugin() {
    let text = qlayer_tests::capture_all_logs(|| {
        qlayer_tests::current_thread().block_on(async {
            let rt = runtime();
            let installed = rt.load(&extism_hostile(32, 20_000)).unwrap().install(Default::default()).unwrap();
            let mut tool = installed.any_tool("tenant-extism-logs").await.unwrap();
            assert_eq!(tool.invoke("log:3000").await.unwrap(), "wrote 3000");
            assert_eq!(tool.invoke("forge").await.unwrap(), "forged");
        });
    });
    let ours: Vec<&str> = text.lines().filter(|l| l.contains("tenant-extism-logs")).collect();
    let flood = ours.iter().filter(|l| l.contains("extism flood line")).count();
    assert_eq!(flood, 1000, "a call writes at most 1000 lines");
    assert!(ours.iter().all(|l| l.contains("extism-hostile")), "the plugin's name, not an instance id");
    assert!(ours.iter().any(|l| l.contains("log budget exceeded, 2000 lines dropped")), "{ours:?}");
    assert!(ours.iter().any(|l| l.contains("innocent\\nlevel=ERROR tenant=other forged line")), "{ours:?}");
    assert!(!text.lines().any(|l| l.starts_with("level=ERROR")));
}

/// Issue 14 item 9: an Extism module is compiled once per plugin, grants and limits, not on each
/// load (every call of a job loads its plugin again); instances live at the same time get a
/// compilation each (a cancel stops every call on one engine), later ones reuse them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extism_module_is_compiled_once_for_the_same_grants() {
    let rt = runtime();
    let wasm = extism_hostile(32, 1000);
    assert_eq!(rt.compiled_extism_modules(), 0);
    for tenant in ["t", "u", "t"] {
        let installed = rt.load(&wasm).unwrap().install(Default::default()).unwrap();
        assert_eq!(installed.any_tool(tenant).await.unwrap().invoke("hello").await.unwrap(), "echo:hello");
    }
    assert_eq!(rt.compiled_extism_modules(), 1, "three loads and calls one after another, one compile");
    let installed = rt.load(&wasm).unwrap().install(Default::default()).unwrap();
    let (mut first, mut second) = (installed.any_tool("t").await.unwrap(), installed.any_tool("u").await.unwrap());
    assert_eq!(rt.compiled_extism_modules(), 2, "two live at once, two compilations");
    assert_eq!(first.invoke("a").await.unwrap(), "echo:a");
    assert_eq!(second.invoke("b").await.unwrap(), "echo:b");
    let mut grants = qlayer_runtime::Grants::default();
    grants.outbound_hosts.push(qlayer_runtime::HostPattern::parse("api.example.com").unwrap());
    rt.load(&wasm).unwrap().install(grants).unwrap();
    assert_eq!(rt.compiled_extism_modules(), 3, "other grants, another compile");
}

/// Issue 14 item 8: an Extism call stops at the call's own deadline (a job's deadline_ms), not
/// only at the timeout compiled into the module (here 300 s).
#[tokio::test]
async fn an_extism_call_stops_at_its_deadline_not_at_its_manifest_timeout() {
    let rt = runtime();
    let installed = rt.load(&extism_hostile(32, 300_000)).unwrap().install(Default::default()).unwrap();
    let short = installed.clone().with_timeout(Duration::from_millis(200));
    let mut tool = short.any_tool("tenant-a").await.unwrap();
    // The bound only keeps a broken build from hanging CI; the call stops at about 200 ms.
    let err = tokio::time::timeout(Duration::from_secs(60), tool.invoke("loop"))
        .await
        .expect("the call ran on past its deadline")
        .unwrap_err();
    assert!(matches!(err.kind, CallErrorKind::Timeout(d) if d == Duration::from_millis(200)), "{err}");
    // A dropped call (a cancelled job) is cancelled too, and its instance's slot comes back.
    let mut tool = installed.any_tool("tenant-b").await.unwrap();
    let running = tokio::spawn(async move { tool.invoke("loop").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    running.abort();
    let _ = running.await;
    let mut again = installed.any_tool("tenant-b").await.unwrap();
    assert_eq!(again.invoke("hello").await.unwrap(), "echo:hello");
}

#[tokio::test]
async fn skopeo_reads_what_we_push_with_the_wasm_media_types() {
    let skopeo = ensure_program("skopeo", "skopeo");
    let registry = TestRegistry::start();
    let data = tempfile::tempdir().unwrap();
    let market = open(data.path(), config(&registry, SignaturePolicy::Off, &[])).await;
    let wasm = marketplace_plugin("text-stats");
    let reference = format!("{}/tools/text-stats:1.0.0", registry.addr);
    let digest = market.push(&wasm, &reference, None).await.unwrap();

    let out = std::process::Command::new(&skopeo)
        .args(["inspect", "--tls-verify=false", "--raw", &format!("docker://{reference}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo inspect failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(qlayer_registry::digest_of(&out.stdout), digest, "skopeo sees the manifest we pushed");
    let manifest: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(manifest["config"]["mediaType"], "application/vnd.wasm.config.v0+json");
    assert_eq!(manifest["layers"][0]["mediaType"], "application/wasm");
    assert!(manifest["annotations"]["dev.quantumlayer.plugin.manifest"].as_str().unwrap().contains("text-stats"));

    // skopeo copies it out, checking digests itself, and the layer is our component byte for byte.
    let layout = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(&skopeo)
        .args(["copy", "--src-tls-verify=false", &format!("docker://{reference}")])
        .arg(format!("oci:{}:plugin", layout.path().display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo copy failed: {}", String::from_utf8_lossy(&out.stderr));
    let blob = layout.path().join("blobs/sha256").join(qlayer_registry::digest_of(&wasm).trim_start_matches("sha256:"));
    assert_eq!(std::fs::read(blob).unwrap(), wasm);
}

/// The Bytecode Alliance's `wkg`: `../shared/bin/wkg` beside the project, else built with
/// `cargo install wkg` into the target directory (about 8 minutes, once).
fn wkg() -> std::path::PathBuf {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/bin/wkg");
    if shared.is_file() {
        return shared;
    }
    let root = Path::new(qlayer_tests::built::PLUGIN_TARGET_DIR).join("../test-tools/wkg");
    let bin = root.join("bin/wkg");
    if !bin.is_file() {
        let status = std::process::Command::new("cargo")
            .args(["install", "wkg", "--version", "0.16.1", "--locked", "--root"])
            .arg(&root)
            .status()
            .unwrap();
        assert!(status.success(), "wkg is needed by this test: `cargo install wkg` failed ({status})");
    }
    bin
}

#[tokio::test]
async fn wkg_and_qlayer_read_what_the_other_pushed() {
    let wkg = wkg();
    let registry = TestRegistry::start();
    let data = tempfile::tempdir().unwrap();
    let market = open(data.path(), config(&registry, SignaturePolicy::Warn, &[])).await;
    let rt = runtime();
    let wasm = marketplace_plugin("text-stats");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("text-stats.wasm");
    std::fs::write(&file, &wasm).unwrap();

    // Pushed by wkg, installed and run by qlayer.
    let by_wkg = format!("{}/wkg/text-stats:1.0.0", registry.addr);
    let out = std::process::Command::new(&wkg)
        .args(["oci", "push", "--insecure", &registry.addr, &by_wkg])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "wkg push failed: {}", String::from_utf8_lossy(&out.stderr));
    let outcome = market.install(&rt, &by_wkg, "acme", &no_grants()).await.unwrap();
    assert_eq!(outcome.install.blob, qlayer_registry::digest_of(&wasm), "the very binary wkg pushed");
    let installed = market.load(&rt, "acme", "text-stats").await.unwrap();
    let output = installed.any_tool("acme").await.unwrap().invoke(r#"{"text":"one two two"}"#).await.unwrap();
    assert!(output.contains("\"words\":3"), "{output}");

    // Pushed by qlayer, pulled by wkg: the same bytes.
    let by_qlayer = format!("{}/qlayer/text-stats:1.0.0", registry.addr);
    market.push(&wasm, &by_qlayer, None).await.unwrap();
    let pulled = dir.path().join("pulled.wasm");
    let out = std::process::Command::new(&wkg)
        .args(["oci", "pull", "--insecure", &registry.addr, &by_qlayer, "-o"])
        .arg(&pulled)
        .output()
        .unwrap();
    assert!(out.status.success(), "wkg pull failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&pulled).unwrap(), wasm);
}

#[tokio::test]
async fn a_registry_with_basic_auth_takes_credentials_from_docker_config() {
    let registry = TestRegistry::start_with_basic_auth("alice", "s3cret-pass");
    let data = tempfile::tempdir().unwrap();
    let reference = format!("{}/tools/text-stats:1.0.0", registry.addr);

    let anonymous = open(data.path(), config(&registry, SignaturePolicy::Off, &[])).await;
    let err = anonymous.push(&marketplace_plugin("text-stats"), &reference, None).await.unwrap_err();
    assert!(format!("{err:#}").contains("refused access"), "{err:#}");

    let docker = tempfile::tempdir().unwrap();
    let docker_config = docker.path().join("config.json");
    std::fs::write(
        &docker_config,
        format!(r#"{{"auths":{{"{}":{{"username":"alice","password":"s3cret-pass"}}}}}}"#, registry.addr),
    )
    .unwrap();
    let mut cfg = config(&registry, SignaturePolicy::Off, &[]);
    cfg.docker_config = Some(docker_config.clone());
    let market = open(data.path(), cfg.clone()).await;
    market.push(&marketplace_plugin("text-stats"), &reference, None).await.unwrap();
    market.install(&runtime(), &reference, "acme", &no_grants()).await.unwrap();
    assert_eq!(market.search(&registry.addr, None).await.unwrap().len(), 1);

    std::fs::write(
        &docker_config,
        format!(r#"{{"auths":{{"{}":{{"username":"alice","password":"wrong"}}}}}}"#, registry.addr),
    )
    .unwrap();
    let err = open(data.path(), cfg).await.info(&reference).await.unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("refused access"), "{message}");
    assert!(!message.contains("wrong"), "the password is not in the error: {message}");
}

/// `redirecting_registry` serving the text-stats plugin, and a docker config holding its
/// credentials: (registry address, what it was sent, the docker config's dir and file).
async fn redirecting_text_stats(
    blob_host: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<(String, Option<String>)>>>,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    let wasm = marketplace_plugin("text-stats");
    let manifest = qlayer_manifest::extract(&wasm).unwrap();
    let config = br#"{"architecture":"wasm","os":"wasip2","layerDigests":[]}"#;
    let oci = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.wasm.config.v0+json", "digest": qlayer_registry::digest_of(config), "size": config.len()},
        "layers": [{"mediaType": "application/wasm", "digest": qlayer_registry::digest_of(&wasm), "size": wasm.len()}],
        "annotations": {"dev.quantumlayer.plugin.manifest": manifest.to_toml()},
    });
    let (addr, seen) = redirecting_registry(serde_json::to_vec(&oci).unwrap(), blob_host).await;
    let docker = tempfile::tempdir().unwrap();
    let docker_config = docker.path().join("config.json");
    std::fs::write(
        &docker_config,
        format!(r#"{{"auths":{{"{addr}":{{"auth":"{}"}}}}}}"#, base64_encode("alice:s3cret-pass")),
    )
    .unwrap();
    (addr, seen, docker, docker_config)
}

/// A fake registry front for one artifact, requiring basic auth, that redirects blob downloads
/// to `blob_host` (another origin). Records (path, Authorization) of every request.
async fn redirecting_registry(
    manifest: Vec<u8>,
    blob_host: std::net::SocketAddr,
) -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<(String, Option<String>)>>>) {
    use http_body_util::{BodyExt, Full};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let manifest = bytes::Bytes::from(manifest);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (log, manifest) = (log.clone(), manifest.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (log, manifest) = (log.clone(), manifest.clone());
                    async move {
                        let path = req.uri().path().to_string();
                        let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
                        log.lock().unwrap().push((path.clone(), auth.clone()));
                        let mut response = hyper::Response::new(Full::new(bytes::Bytes::new()).boxed());
                        let expected = format!("Basic {}", base64_encode("alice:s3cret-pass"));
                        if auth.as_deref() != Some(expected.as_str()) {
                            *response.status_mut() = hyper::StatusCode::UNAUTHORIZED;
                            response.headers_mut().insert("www-authenticate", "Basic realm=\"fake\"".parse().unwrap());
                        } else if path.contains("/manifests/") {
                            *response.body_mut() = Full::new(manifest).boxed();
                            response
                                .headers_mut()
                                .insert("content-type", "application/vnd.oci.image.manifest.v1+json".parse().unwrap());
                        } else if path.contains("/blobs/") {
                            *response.status_mut() = hyper::StatusCode::TEMPORARY_REDIRECT;
                            response
                                .headers_mut()
                                .insert("location", format!("http://{blob_host}/blob").parse().unwrap());
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn base64_encode(text: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = text.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn credentials_are_not_sent_to_another_host_on_a_redirect_nor_logged() {
    let tokio = qlayer_tests::current_thread();
    let mut registry_addr = String::new();
    let logs = qlayer_tests::capture_logs(|| {
        registry_addr = tokio.block_on(async {
            let other = TestServer::start().await;
            let (addr, seen, _docker, docker_config) = redirecting_text_stats(other.addr).await;
            let data = tempfile::tempdir().unwrap();
            let market = open(
                data.path(),
                MarketplaceConfig {
                    insecure_registries: vec![addr.to_string()],
                    docker_config: Some(docker_config),
                    ..Default::default()
                },
            )
            .await;
            let resolved = market
                .registry()
                .resolve(&parse_reference(&format!("{addr}/tools/text-stats:1.0.0")).unwrap())
                .await
                .unwrap();
            assert_eq!(resolved.manifest.name, "text-stats");
            // The blob redirect goes to another origin, which answers 404 here: the download fails,
            // and what matters is what that origin was sent.
            assert!(market.registry().fetch(&resolved, market.store()).await.is_err());
            assert!(market.store().digests().is_empty());

            let seen = seen.lock().unwrap().clone();
            assert!(
                seen.iter().any(|(p, a)| p.contains("/manifests/") && a.is_some()),
                "the registry got the credentials: {seen:?}"
            );
            let redirected = other.requests();
            assert_eq!(redirected.len(), 1, "{redirected:?}");
            assert_eq!(redirected[0].path, "/blob");
            assert_eq!(redirected[0].authorization, None, "no credentials to another host");
            addr.to_string()
        });
    });
    assert!(logs.contains(&registry_addr), "the client's requests are in the trace logs: {logs}");
    assert!(!logs.contains("s3cret-pass"), "the password never reaches the logs");
    assert!(!logs.contains(&base64_encode("alice:s3cret-pass")), "nor its basic-auth encoding");
}

/// Issue 14 item 25: a registry error names the URL and its root cause once, and suggests
/// `--insecure-registry` only where a connection was made (a plain-HTTP registry spoken to with
/// TLS), not where nothing listens or the name does not resolve.
#[tokio::test]
async fn registry_errors_say_their_cause_once_and_hint_at_tls_only_when_it_can_be_tls() {
    let registry = TestRegistry::start();
    let data = tempfile::tempdir().unwrap();
    let market = open(data.path(), MarketplaceConfig::default()).await;
    let err = market.info(&format!("{}/tools/x:1", registry.addr)).await.unwrap_err().to_string();
    assert!(err.contains("TLS is required for") && err.contains("--insecure-registry"), "{err}");

    let closed = format!("127.0.0.1:{}", qlayer_tests::free_port());
    let err = market.info(&format!("{closed}/tools/x:1")).await.unwrap_err().to_string();
    assert!(err.contains(&format!("cannot connect to https://{closed}/v2/tools/x/manifests/1")), "{err}");
    assert_eq!(err.matches("onnection refused").count(), 1, "{err}");
    assert!(!err.contains("client error") && !err.contains("TLS is required"), "{err}");
}

/// Extism stops a call by bumping its engine's epoch, which stops every call on that engine:
/// one tenant's deadline (here 200 ms) must not stop another tenant's call of the same plugin
/// (here with 3 s to go), so tenants never share a compilation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_extism_deadline_does_not_stop_another_tenants_call() {
    let rt = runtime();
    let installed = rt.load(&extism_hostile(64, 60_000)).unwrap().install(Default::default()).unwrap();
    let slow = {
        let installed = installed.clone();
        tokio::spawn(async move {
            let mut b = installed.with_timeout(Duration::from_millis(3000)).any_tool("tenant-b").await.unwrap();
            let started = std::time::Instant::now();
            (b.invoke("loop").await, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let short = installed.clone().with_timeout(Duration::from_millis(200));
    let err = short.any_tool("tenant-a").await.unwrap().invoke("loop").await.unwrap_err();
    assert!(matches!(err.kind, CallErrorKind::Timeout(d) if d == Duration::from_millis(200)), "{err}");
    // B loops too, so it ends at its own deadline and not before (a lower bound, not a timing
    // one): stopped by A's, it ended after about 0.5 s, reported as its own timeout all the same.
    let (outcome, ran) = slow.await.unwrap();
    let err = outcome.unwrap_err();
    assert!(matches!(err.kind, CallErrorKind::Timeout(d) if d == Duration::from_secs(3)), "{err}");
    assert!(ran >= Duration::from_secs(3), "tenant b's call was stopped after {ran:?} by tenant a's deadline");
}

/// A deadline or cancel that comes while the call still waits for a blocking thread (the pool was
/// busy) stops it all the same: Extism drops a cancel sent before the call has started, and the
/// call then ran to its manifest timeout (here 300 s), holding its thread and slot.
#[test]
fn an_extism_call_stopped_before_it_started_does_not_run() {
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .unwrap();
    tokio.block_on(async {
        let rt = runtime();
        let installed = rt.load(&extism_hostile(32, 300_000)).unwrap().install(Default::default()).unwrap();
        let short = installed.clone().with_timeout(Duration::from_millis(100));
        let mut late = short.any_tool("tenant-a").await.unwrap();
        let mut dropped = installed.any_tool("tenant-b").await.unwrap();
        let mut after = installed.any_tool("tenant-c").await.unwrap();
        // The one blocking thread is busy for 500 ms: both calls below wait for it.
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let busy = tokio::task::spawn_blocking(move || wait.recv());
        // Dropped (a cancelled job) before it started.
        let running = tokio::spawn(async move { dropped.invoke("loop").await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        running.abort();
        let _ = running.await;
        // Past its deadline before it started: it must not run the guest (`log:1` returns at once).
        let timed_out = tokio::spawn(async move { late.invoke("log:1").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        release.send(()).unwrap();
        busy.await.unwrap().unwrap();
        let err = timed_out.await.unwrap().unwrap_err();
        assert!(matches!(err.kind, CallErrorKind::Timeout(d) if d == Duration::from_millis(100)), "{err}");
        // The dropped call did not take the one thread for 300 s: the next call runs. (The bound
        // only keeps a broken build from hanging CI.)
        let out = tokio::time::timeout(Duration::from_secs(60), after.invoke("hello"))
            .await
            .expect("the dropped call is still running");
        assert_eq!(out.unwrap(), "echo:hello");
    });
}

/// Extism modules compile once per compile cache, not once per process: the next runtime on the
/// same cache directory reads the compilation from disk. What proves it is read: with a module's
/// entry overwritten by another module's, the next runtime runs the other module's code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extism_compilations_are_kept_on_disk_for_the_next_process() {
    let (cache, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let make = |dir: &Path| {
        Runtime::new(RuntimeConfig {
            cache_dir: Some(dir.to_path_buf()),
            policy: qlayer_runtime::HostPolicy { max_instances: 64, ..Default::default() },
            network: qlayer_tests::loopback_allowed(),
        })
        .unwrap()
    };
    // wasmtime's compiled modules, by file name (Extism's own kernel module is one of them).
    let entries = |dir: &Path| {
        let modules = dir.join("extism/modules");
        let mut out = std::collections::BTreeMap::new();
        for version in std::fs::read_dir(&modules).unwrap().flatten() {
            for entry in std::fs::read_dir(version.path()).unwrap().flatten() {
                let name = entry.file_name().into_string().unwrap();
                if !name.starts_with('.') && !name.ends_with(".stats") {
                    out.insert(name, entry.path());
                }
            }
        }
        out
    };
    let hostile = extism_hostile(32, 10_000);
    let echo = |rt: Runtime| {
        let hostile = hostile.clone();
        async move {
            let mut tool = rt.load(&hostile).unwrap().install(Default::default()).unwrap().any_tool("t").await.unwrap();
            tool.invoke("hello").await
        }
    };
    assert_eq!(echo(make(cache.path())).await.unwrap(), "echo:hello");
    let url_check =
        make(other.path()).load(&marketplace_plugin("url-check")).unwrap().install(Default::default()).unwrap();
    url_check.any_tool("t").await.unwrap();
    let (ours, theirs) = (entries(cache.path()), entries(other.path()));
    let only = |a: &std::collections::BTreeMap<String, std::path::PathBuf>,
                b: &std::collections::BTreeMap<String, std::path::PathBuf>| {
        a.iter().filter(|(name, _)| !b.contains_key(*name)).map(|(_, path)| path.clone()).collect::<Vec<_>>()
    };
    let (hostile_entry, url_check_entry) = (only(&ours, &theirs), only(&theirs, &ours));
    assert_eq!((hostile_entry.len(), url_check_entry.len(), ours.len()), (1, 1, 2), "{ours:?} {theirs:?}");
    // Read back as written, by a runtime that never compiled it.
    assert_eq!(echo(make(cache.path())).await.unwrap(), "echo:hello");
    std::fs::copy(&url_check_entry[0], &hostile_entry[0]).unwrap();
    let swapped = echo(make(cache.path())).await;
    // url-check's own answer to input that is not `{"url": ...}`.
    let ran_url_check = matches!(&swapped, Err(e) if e.to_string().contains("expected {\"url\": string}"));
    assert!(ran_url_check, "the module was compiled again instead of read from disk: {swapped:?}");
}

/// An Extism plugin's outbound requests count against its tenant's bound, as components' do:
/// each Extism instance makes one request at a time, but a tenant with many instances could
/// hold as many requests as the pool has slots. Past the bound a request fails at once; another
/// tenant's goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extism_requests_count_against_their_tenants_bound() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    // An upstream that holds every request until told to answer.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (arrived, mut arrivals) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (release, answer) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let (arrived, mut answer) = (arrived.clone(), answer.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                arrived.send(()).unwrap();
                let _ = answer.wait_for(|go| *go).await;
                let _ = socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await;
            });
        }
    });
    let rt = Runtime::new(RuntimeConfig {
        cache_dir: None,
        policy: qlayer_runtime::HostPolicy { max_instances: 16, outbound_per_tenant: 2, ..Default::default() },
        network: qlayer_tests::loopback_allowed(),
    })
    .unwrap();
    let grants = qlayer_runtime::Grants {
        outbound_hosts: vec![qlayer_runtime::HostPattern::parse(&addr.to_string()).unwrap()],
        ..Default::default()
    };
    let installed = rt.load(&extism_hostile(32, 30_000)).unwrap().install(grants).unwrap();
    let url = format!("fetch:http://{addr}/plain");
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut tool = installed.any_tool("tenant-a").await.unwrap();
        let url = url.clone();
        held.push(tokio::spawn(async move { tool.invoke(&url).await }));
        arrivals.recv().await.unwrap();
    }
    // Tenant a has two requests in flight: a third of its own is refused at once.
    let err = installed.any_tool("tenant-a").await.unwrap().invoke(&url).await.unwrap_err();
    assert!(err.to_string().contains("this tenant's requests in flight are at their limit"), "{err}");
    // Tenant b is not held up by a's bound.
    let mut b = installed.any_tool("tenant-b").await.unwrap();
    let other = tokio::spawn(async move { b.invoke(&url).await });
    arrivals.recv().await.unwrap();
    release.send(true).unwrap();
    for call in held {
        call.await.unwrap().unwrap();
    }
    other.await.unwrap().unwrap();
}

/// With the operator's network policy set, the registry client's connections go through the
/// host's egress proxy, which checks each destination when it connects: a registry the operator
/// listed is reached, but its redirect of the blob download to an internal address (loopback,
/// which the default policy refuses) is refused, and nothing reaches that address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_redirect_to_an_internal_address_is_refused_when_it_connects() {
    let internal = TestServer::start().await;
    let (addr, seen, _docker, docker_config) = redirecting_text_stats(internal.addr).await;
    let data = tempfile::tempdir().unwrap();
    let market = open(
        data.path(),
        MarketplaceConfig {
            insecure_registries: vec![addr.to_string()],
            docker_config: Some(docker_config),
            egress: Some(qlayer_runtime::NetworkPolicy::default()),
            ..Default::default()
        },
    )
    .await;
    let resolved =
        market.registry().resolve(&parse_reference(&format!("{addr}/tools/text-stats:1.0.0")).unwrap()).await.unwrap();
    assert_eq!(resolved.manifest.name, "text-stats", "the listed registry is reached through the proxy");
    let err = market.registry().fetch(&resolved, market.store()).await.unwrap_err();
    assert!(market.store().digests().is_empty());
    assert!(seen.lock().unwrap().iter().any(|(p, _)| p.contains("/blobs/")), "the registry redirected the download");
    assert!(internal.requests().is_empty(), "the internal address got: {:?} ({err})", internal.requests());
    assert!(
        matches!(err, qlayer_registry::RegistryError::NetworkPolicy { ref message, .. }
            if message.contains(&internal.addr.to_string()) && message.contains("loopback")),
        "{err}"
    );
}
