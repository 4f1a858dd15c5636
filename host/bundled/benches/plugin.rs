//! Plugin host figures: instantiate-and-call from an `InstancePre`, warm call overhead, resident
//! memory of 1,000 live tenant instances, and loading a cached compilation vs compiling.
//!
//! `cargo bench -p qlayer-bundled --bench plugin` (prints the figures; docs/PERFORMANCE.md records them).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use qlayer_bundled::bundled_plugin;
use qlayer_runtime::{Grants, HostPolicy, Runtime, RuntimeConfig};
use std::time::{Duration, Instant};

fn stats(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let pick = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name:<44} n={:<6} median {:>9.2} µs   p99 {:>9.2} µs   min {:>8.2} µs",
        samples.len(),
        pick(0.5).as_secs_f64() * 1e6,
        pick(0.99).as_secs_f64() * 1e6,
        samples[0].as_secs_f64() * 1e6
    );
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let tokio = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let scripted = bundled_plugin("scripted").unwrap();
    let tenants = 1000;
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: None,
        policy: HostPolicy { max_instances: tenants + 16, ..Default::default() },
        ..Default::default()
    })
    .unwrap();
    let installed = runtime.load(scripted).unwrap().install(Grants::default()).unwrap();

    tokio.block_on(async {
        // Baseline for this machine and this run: a native async call that returns a String.
        #[inline(never)]
        async fn native(n: u64) -> String {
            std::hint::black_box(format!("role-{n}"))
        }
        let mut base = Vec::new();
        for i in 0..20000 {
            let t = Instant::now();
            std::hint::black_box(native(i).await);
            base.push(t.elapsed());
        }
        stats("baseline: native async fn returning a String", base);

        // Warm up the pool slots and caches.
        for _ in 0..200 {
            installed.provider("warm").await.unwrap().ping().await.unwrap();
        }

        let mut inst = Vec::new();
        let mut inst_call = Vec::new();
        for i in 0..5000 {
            let t = Instant::now();
            let mut p = installed.provider(if i % 2 == 0 { "a" } else { "b" }).await.unwrap();
            let instantiated = t.elapsed();
            p.ping().await.unwrap();
            inst_call.push(t.elapsed());
            inst.push(instantiated);
        }
        stats("instantiate (InstancePre → live instance)", inst);
        stats("instantiate + call `models`", inst_call);

        let mut p = installed.provider("warm").await.unwrap();
        let mut warm = Vec::new();
        for _ in 0..20000 {
            let t = Instant::now();
            p.ping().await.unwrap();
            warm.push(t.elapsed());
        }
        stats("warm call `models` (host → guest → host)", warm);
        drop(p);

        // The most trivial export in the contract: `agent.role()`, no arguments, a short string back.
        let agent =
            runtime.load(bundled_plugin("product-manager").unwrap()).unwrap().install(Grants::default()).unwrap();
        let router = std::sync::Arc::new(qlayer_gateway::Router::new(vec![], None));
        let mut a = agent.agent("warm", router).await.unwrap();
        for _ in 0..1000 {
            a.role().await.unwrap();
        }
        let mut trivial = Vec::new();
        for _ in 0..20000 {
            let t = Instant::now();
            a.role().await.unwrap();
            trivial.push(t.elapsed());
        }
        stats("warm call `role` (no args, short string)", trivial);
        drop(a);

        let before = rss_kib();
        let mut live = Vec::with_capacity(tenants as usize);
        for i in 0..tenants {
            let mut p = installed.provider(&format!("tenant-{i}")).await.unwrap();
            p.ping().await.unwrap(); // touch the instance so its memory is really in use
            live.push(p);
        }
        let after = rss_kib();
        println!(
            "resident memory for {tenants} live tenant instances: +{:.1} MiB (RSS {:.1} → {:.1} MiB), {:.1} KiB each",
            (after - before) as f64 / 1024.0,
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            (after - before) as f64 / tenants as f64
        );
        drop(live);
    });

    // Compile vs load from the on-disk cache, for each bundled plugin size class.
    for name in ["scripted", "openai", "syntax"] {
        let wasm = bundled_plugin(name).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = || RuntimeConfig {
            cache_dir: Some(dir.path().to_path_buf()),
            policy: HostPolicy { max_instances: 4, ..Default::default() },
            ..Default::default()
        };
        let mut compile = Vec::new();
        for _ in 0..3 {
            let rt = Runtime::new(RuntimeConfig {
                cache_dir: None,
                policy: HostPolicy { max_instances: 4, ..Default::default() },
                ..Default::default()
            })
            .unwrap();
            let t = Instant::now();
            rt.load(wasm).unwrap();
            compile.push(t.elapsed());
        }
        Runtime::new(config()).unwrap().load(wasm).unwrap(); // fill the cache
        let mut cached = Vec::new();
        for _ in 0..20 {
            let rt = Runtime::new(config()).unwrap();
            let t = Instant::now();
            rt.load(wasm).unwrap();
            cached.push(t.elapsed());
        }
        compile.sort();
        cached.sort();
        println!(
            "load `{name}` ({} KiB): compile {:.1} ms, from cache {:.2} ms (medians)",
            wasm.len() / 1024,
            compile[compile.len() / 2].as_secs_f64() * 1e3,
            cached[cached.len() / 2].as_secs_f64() * 1e3
        );
    }
}
