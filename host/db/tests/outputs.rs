//! Large outputs are stored, handed to dependants and served as their text, never built into a
//! JSON tree (a tree costs 16-32 bytes per element: a 16 MiB array of small numbers is 256 MiB
//! as a `serde_json::Value`). Its own test binary: it counts every allocation of the process.

// A counting global allocator is an `unsafe impl` over the system's; nothing else here is unsafe.
#![allow(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use qlayer_db::{Db, JobKind, Lease, NewJob, NewTask, TaskResult};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let now = NOW.fetch_add(layout.size(), Relaxed) + layout.size();
            PEAK.fetch_max(now, Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        NOW.fetch_sub(layout.size(), Relaxed);
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// The most bytes held at once while `f` ran, above what was held when it started.
async fn peak_during<T>(f: impl std::future::Future<Output = T>) -> (T, usize) {
    let start = NOW.load(Relaxed);
    PEAK.store(start, Relaxed);
    let out = f.await;
    (out, PEAK.load(Relaxed).saturating_sub(start))
}

fn lease_of(task: &qlayer_db::Task) -> Lease {
    Lease { task_id: task.id.clone(), job_id: task.job_id.clone(), owner: "n".into(), attempt: task.attempts }
}

#[tokio::test]
async fn a_large_output_is_stored_passed_on_and_served_without_a_json_tree() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_sqlite(&dir.path().join("qlayer.db")).await.unwrap();
    let tenant = db.create_tenant("acme").await.unwrap();
    let tasks = vec![
        NewTask {
            name: "a".into(),
            kind: "call".into(),
            plugin: "p".into(),
            input: serde_json::json!("x"),
            depends_on: vec![],
            max_attempts: 1,
        },
        // No input of its own: it gets a's output by name.
        NewTask {
            name: "b".into(),
            kind: "call".into(),
            plugin: "p".into(),
            input: serde_json::Value::Null,
            depends_on: vec!["a".into()],
            max_attempts: 1,
        },
    ];
    let input = serde_json::json!({});
    let (job, _) = db
        .submit_job(NewJob {
            tenant_id: &tenant.id,
            kind: JobKind::Call,
            input: &input,
            priority: 0,
            idempotency_key: None,
            deadline_ms: None,
            tasks,
        })
        .await
        .unwrap();
    // 16 MiB of JSON: an array of 8 M one-digit numbers (256 MiB as a tree).
    let mut text = String::with_capacity(16 << 20);
    text.push('[');
    while text.len() < (16 << 20) - 2 {
        text.push_str("7,");
    }
    text.push_str("7]");
    let size = text.len();
    let output = qlayer_db::JsonText::parse(text).unwrap();

    let a = db.lease_task(&format!("{}.000", job.id), "n", 60_000).await.unwrap().unwrap();
    let ((b, served), peak) = peak_during(async {
        let recorded = db.complete_task(&lease_of(&a), &TaskResult::from(output)).await.unwrap();
        let b = db.lease_task(&recorded.ready[0].id, "n", 60_000).await.unwrap().unwrap();
        db.complete_task(&lease_of(&b), &serde_json::json!("done").into()).await.unwrap();
        // What GET /v1/jobs/{id} does: read the job and write it out as JSON.
        let done = db.job(&tenant.id, &job.id).await.unwrap().unwrap();
        let served = serde_json::to_vec(&done).unwrap();
        (b, served)
    })
    .await;
    assert!(b.input.get().starts_with("{\"a\":[7,7,"), "b's input is a's output by name");
    let served: serde_json::Value = serde_json::from_slice(&served).unwrap();
    assert_eq!(served["output"]["a"].as_array().unwrap().len(), size / 2);
    assert_eq!(served["output"]["b"], "done");
    // The text is copied several times (the bound result, the rows read back through sqlx's Any
    // driver, b's input, the job's output by name, the served body): 8 times its size at once
    // when measured. One tree alone would be 16 times its size (32 bytes per 2-byte element).
    println!("peak {:.1} MiB for {:.1} MiB of output", peak as f64 / 1048576.0, size as f64 / 1048576.0);
    assert!(peak < 12 * size, "held {peak} bytes at once for a {size}-byte output: it was built into a tree");
}
