//! Marketplace figures against a real registry on loopback (Debian's `docker-registry`):
//! pull + verify + compile of a first-party plugin into an empty data dir, and loading an
//! installed plugin from the local store with its compiled code cached (a new process), and again in
//! the same runtime (a later call). Baseline in the same run:
//! reading the same bytes from disk and hashing them.
//!
//! `cargo bench -p qlayer-marketplace --bench marketplace` (docs/PERFORMANCE.md records the figures).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use qlayer_marketplace::{GrantSpec, Marketplace, MarketplaceConfig};
use qlayer_registry::{SignaturePolicy, parse_reference};
use qlayer_runtime::{Runtime, RuntimeConfig};
use qlayer_tests::TestRegistry;
use std::time::{Duration, Instant};

fn stats(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let pick = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name:<58} n={:<4} median {:>9.3} ms   p99 {:>9.3} ms   min {:>8.3} ms",
        samples.len(),
        pick(0.5).as_secs_f64() * 1e3,
        pick(0.99).as_secs_f64() * 1e3,
        samples[0].as_secs_f64() * 1e3
    );
}

fn main() {
    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let registry = TestRegistry::start();
    let config = MarketplaceConfig {
        insecure_registries: vec![registry.addr.clone()],
        signature_policy: SignaturePolicy::Off,
        ..Default::default()
    };
    tokio.block_on(async {
        for name in ["scripted", "openai"] {
            let wasm = qlayer_bundled::bundled_plugin(name).unwrap();
            let reference = format!("{}/first-party/{name}:0.1.0", registry.addr);
            let scratch = tempfile::tempdir().unwrap();
            Marketplace::open_local(scratch.path(), config.clone())
                .await
                .unwrap()
                .push(wasm, &reference, None)
                .await
                .unwrap();
            let grants = if name == "openai" {
                GrantSpec::parse(&[
                    "host:127.0.0.1:9".into(),
                    "config:base_url=http://127.0.0.1:9/v1".into(),
                    "config:model=m".into(),
                    "secret:api_key=HOME".into(),
                ])
                .unwrap()
            } else {
                GrantSpec::parse(&["config:script={}".into()]).unwrap()
            };
            println!("{name}: {} bytes", wasm.len());

            // Baseline: read the component from disk and hash it.
            let file = scratch.path().join("plugin.wasm");
            std::fs::write(&file, wasm).unwrap();
            let mut base = Vec::new();
            for _ in 0..50 {
                let t = Instant::now();
                let bytes = std::fs::read(&file).unwrap();
                std::hint::black_box(qlayer_registry::digest_of(&bytes));
                base.push(t.elapsed());
            }
            stats(&format!("baseline: read + sha256 ({name})"), base);

            // Cold: empty data dir and compile cache: resolve, pull + verify into the store, compile.
            let mut pull = Vec::new();
            let mut cold = Vec::new();
            for _ in 0..10 {
                let data = tempfile::tempdir().unwrap();
                let market = Marketplace::open_local(data.path(), config.clone()).await.unwrap();
                let t = Instant::now();
                let resolved = market.registry().resolve(&parse_reference(&reference).unwrap()).await.unwrap();
                market.registry().fetch(&resolved, market.store()).await.unwrap();
                pull.push(t.elapsed());
                let data = tempfile::tempdir().unwrap();
                let market = Marketplace::open_local(data.path(), config.clone()).await.unwrap();
                let runtime = Runtime::new(RuntimeConfig {
                    cache_dir: Some(data.path().join("cache")),
                    // The openai provider is granted its test upstream on loopback.
                    network: qlayer_tests::loopback_allowed(),
                    ..Default::default()
                })
                .unwrap();
                let t = Instant::now();
                market.install(&runtime, &reference, "bench", &grants).await.unwrap();
                cold.push(t.elapsed());
            }
            stats(&format!("pull + verify into the store ({name})"), pull);
            stats(&format!("install: pull + verify + compile ({name})"), cold);

            // Warm: installed, compile cache filled; a new process's first load (a new runtime
            // each time, made outside the timing).
            let data = tempfile::tempdir().unwrap();
            let market = Marketplace::open_local(data.path(), config.clone()).await.unwrap();
            let cache = data.path().join("cache");
            let fresh = || {
                Runtime::new(RuntimeConfig {
                    cache_dir: Some(cache.clone()),
                    network: qlayer_tests::loopback_allowed(),
                    ..Default::default()
                })
                .unwrap()
            };
            let runtime = fresh();
            market.install(&runtime, &reference, "bench", &grants).await.unwrap();
            let mut warm = Vec::new();
            for _ in 0..50 {
                let runtime = fresh();
                let t = Instant::now();
                std::hint::black_box(market.load(&runtime, "bench", name).await.unwrap());
                warm.push(t.elapsed());
            }
            // A later call's load in the same process: the runtime has it loaded already, so
            // only the install record is read.
            let mut again = Vec::new();
            for _ in 0..50 {
                let t = Instant::now();
                std::hint::black_box(market.load(&runtime, "bench", name).await.unwrap());
                again.push(t.elapsed());
            }
            stats(&format!("load from the local store, compiled code cached ({name})"), warm);
            stats(&format!("load again in the same runtime, loaded already ({name})"), again);
        }
    });
}
