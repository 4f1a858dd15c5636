//! Issue 14 item 7: memory a finished plugin made the host use goes back to the OS. Resident
//! memory is a per-process figure, so this binary holds one test and nothing runs beside it; the
//! bounds are fractions of what the work itself took, not absolute sizes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use qlayer_runtime::{CallErrorKind, Grants};

fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: f64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4.0 / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_instance_and_its_outputs_do_not_stay_resident() {
    let rt = qlayer_tests::runtime();
    let big = rt.load(&qlayer_tests::hostile(256, 60_000)).unwrap().install(Grants::default()).unwrap();
    let small = rt.load(&qlayer_tests::hostile(16, 60_000)).unwrap().install(Grants::default()).unwrap();
    assert_eq!(small.tool("warm").await.unwrap().invoke("hi").await.unwrap(), "hi");

    // One guest grows to its 256 MiB limit and traps.
    let before = rss_mib();
    let err = big.tool("t").await.unwrap().invoke("alloc").await.unwrap_err();
    assert!(matches!(err.kind, CallErrorKind::OutOfMemory { .. }), "{err}");
    let after = rss_mib();
    assert!(after - before < 32.0, "a finished 256 MiB instance stayed resident: {before:.0} → {after:.0} MiB");

    // 300 instances at once, each returning 512 KiB that the host holds until all are back.
    let before = rss_mib();
    let calls: Vec<_> = (0..300)
        .map(|i| {
            let small = small.clone();
            tokio::spawn(async move { small.tool(&format!("t{i}")).await.unwrap().invoke("big 524288").await.unwrap() })
        })
        .collect();
    let mut outputs = Vec::new();
    for call in calls {
        outputs.push(call.await.unwrap());
    }
    let peak = rss_mib();
    assert!(peak - before > 100.0, "the outputs were held: {before:.0} → {peak:.0} MiB");
    drop(outputs);
    let after = rss_mib();
    assert!(
        after - before < (peak - before) / 4.0,
        "freed outputs and instances stayed resident: {before:.0} → peak {peak:.0} → {after:.0} MiB"
    );
}
