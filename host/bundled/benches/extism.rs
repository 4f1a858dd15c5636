//! What an Extism tool costs to get ready and to call, beside a component in the same run:
//!
//! - the first instance of an install with an empty compile cache (Extism compiles the module and
//!   its kernel; wasmtime's cache writes them under the runtime's cache directory);
//! - the first instance in a new runtime on the same cache directory (a restarted `qlayer serve`:
//!   read from disk, not compiled);
//! - an instance once the install's compilation is in memory (another tenant, one after another);
//! - a warm call (`hello`, echoed) on a live instance;
//! - baseline: the hostile test component's first instance from an empty cache, from a warm one,
//!   and its warm call.
//!
//! Run: `cargo bench -p qlayer-bundled --bench extism`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use qlayer_runtime::{Grants, HostPolicy, Runtime, RuntimeConfig};
use std::time::{Duration, Instant};

fn runtime(dir: &std::path::Path) -> Runtime {
    Runtime::new(RuntimeConfig {
        cache_dir: Some(dir.to_path_buf()),
        policy: HostPolicy { max_instances: 64, ..Default::default() },
        network: qlayer_tests::loopback_allowed(),
    })
    .unwrap()
}

fn ms(d: Duration) -> String {
    match d.as_secs_f64() * 1000.0 {
        small if small < 1.0 => format!("{:.1} µs", small * 1000.0),
        ms => format!("{ms:.2} ms"),
    }
}

fn median(mut all: Vec<Duration>) -> Duration {
    all.sort();
    all[all.len() / 2]
}

/// In a new runtime on `dir`: the time to the first instance (load, install, instance), and the
/// median of `calls` warm calls on it.
async fn first_and_warm(wasm: &[u8], dir: &std::path::Path, calls: usize) -> (Duration, Duration) {
    let rt = runtime(dir);
    let started = Instant::now();
    let installed = rt.load(wasm).unwrap().install(Grants::default()).unwrap();
    let mut tool = installed.any_tool("t").await.unwrap();
    let first = started.elapsed();
    let mut warm = Vec::new();
    for _ in 0..calls {
        let started = Instant::now();
        // The Extism guest answers `echo:hello`, the component `hello`.
        assert!(tool.invoke("hello").await.unwrap().ends_with("hello"));
        warm.push(started.elapsed());
    }
    (first, median(warm))
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        const ROUNDS: usize = 5;
        let extism = qlayer_tests::extism_hostile(32, 10_000);
        let component = qlayer_tests::hostile(32, 10_000);
        println!("medians of {ROUNDS} rounds; each round a new runtime (a restarted host)");
        println!(
            "{:<12} {:>26} {:>26} {:>22} {:>12}",
            "", "first instance, empty cache", "first instance, warm disk", "next tenant's instance", "warm call"
        );
        for (label, wasm) in [("extism", &extism), ("component", &component)] {
            let (mut cold, mut disk, mut next, mut call) = (vec![], vec![], vec![], vec![]);
            for _ in 0..ROUNDS {
                let dir = tempfile::tempdir().unwrap();
                cold.push(first_and_warm(wasm, dir.path(), 1).await.0);
                let (first, warm) = first_and_warm(wasm, dir.path(), 200).await;
                disk.push(first);
                call.push(warm);
                // Another tenant's instance once the install's compilation is in memory.
                let rt = runtime(dir.path());
                let installed = rt.load(wasm).unwrap().install(Grants::default()).unwrap();
                drop(installed.any_tool("a").await.unwrap());
                let started = Instant::now();
                let tool = installed.any_tool("b").await.unwrap();
                next.push(started.elapsed());
                drop(tool);
            }
            println!(
                "{label:<12} {:>26} {:>26} {:>22} {:>12}",
                ms(median(cold)),
                ms(median(disk)),
                ms(median(next)),
                ms(median(call))
            );
        }
    });
}
