//! The host's resident memory (RSS) before, at the peak of and after memory-heavy work, in one
//! process, as an operator's `qlayer serve` would do it:
//!
//! - one guest that grows its linear memory to the 512 MiB policy maximum and traps;
//! - 1,000 instances live at once, each touching its memory and returning 256 KiB;
//! - a burst of large outputs: 64 calls returning 4 MB each (the default cap is 4 MiB), 16 at once;
//! - the first Extism call that runs into its deadline (issue 14 item 23).
//!
//! The peak is sampled every 2 ms from /proc/self/statm on a thread of its own; "after" is read
//! once the work is dropped and the host has been idle for a second. The baseline is the RSS of
//! the same process before each step. Run: `cargo bench -p qlayer-bundled --bench memory`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use qlayer_runtime::{Grants, HostPolicy, Runtime, RuntimeConfig};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

fn rss_kib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4
}

/// Runs `work`, returning RSS before, its peak while `work` ran, and after an idle second.
async fn measure<F: std::future::Future<Output = ()>>(label: &str, work: F) {
    let before = rss_kib();
    let peak = Arc::new(AtomicU64::new(before));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    work.await;
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let right_after = rss_kib();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib();
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "{label}: RSS before {:.1} MiB, peak {:.1} MiB, right after {:.1} MiB, after 1 s idle {:.1} MiB (kept {:+.1} MiB)",
        mib(before),
        mib(peak.load(Ordering::Relaxed)),
        mib(right_after),
        mib(after),
        mib(after) - mib(before),
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let runtime = Runtime::new(RuntimeConfig {
            cache_dir: None,
            policy: HostPolicy { max_instances: 1000, ..Default::default() },
            network: qlayer_tests::loopback_allowed(),
        })
        .unwrap();
        // Compiled before the first figure, so no step counts the compiler's memory.
        let big = runtime.load(&qlayer_tests::hostile(512, 60_000)).unwrap().install(Grants::default()).unwrap();
        let small = runtime.load(&qlayer_tests::hostile(16, 60_000)).unwrap().install(Grants::default()).unwrap();
        let extism = runtime.load(&qlayer_tests::extism_hostile(64, 300)).unwrap().install(Grants::default()).unwrap();
        assert_eq!(small.tool("warm").await.unwrap().invoke("hello").await.unwrap(), "hello");
        println!("baseline: RSS {:.1} MiB with three plugins compiled", rss_kib() as f64 / 1024.0);

        measure("a 512 MiB guest (grows to its limit and traps)", async {
            let err = big.tool("t-big").await.unwrap().invoke("alloc").await.unwrap_err();
            assert!(err.to_string().contains("ran out of memory"), "{err}");
        })
        .await;

        measure("1,000 live instances, 256 KiB output each", async {
            let calls: Vec<_> = (0..1000)
                .map(|i| {
                    let small = small.clone();
                    tokio::spawn(async move {
                        let mut tool = small.tool(&format!("tenant-{i}")).await.unwrap();
                        let out = tool.invoke("big 262144").await.unwrap();
                        assert_eq!(out.len(), 262_144);
                        // Hold the instance until every other one is live too.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        drop(tool);
                        out.len()
                    })
                })
                .collect();
            for call in calls {
                call.await.unwrap();
            }
        })
        .await;

        measure("a burst of 64 outputs of 4 MB, 16 at once", async {
            for _ in 0..4 {
                let calls: Vec<_> = (0..16)
                    .map(|i| {
                        let small = small.clone();
                        tokio::spawn(async move {
                            small.tool(&format!("burst-{i}")).await.unwrap().invoke("big 4000000").await.unwrap().len()
                        })
                    })
                    .collect();
                for call in calls {
                    assert_eq!(call.await.unwrap(), 4_000_000);
                }
            }
        })
        .await;

        measure("the first Extism call past its deadline", async {
            let err = extism.any_tool("t-extism").await.unwrap().invoke("loop").await.unwrap_err();
            assert!(err.to_string().contains("deadline"), "{err}");
        })
        .await;
        measure("a second Extism call past its deadline", async {
            let err = extism.any_tool("t-extism").await.unwrap().invoke("loop").await.unwrap_err();
            assert!(err.to_string().contains("deadline"), "{err}");
        })
        .await;
    });
}
