//! Scheduler figures, each with its baseline from the same run:
//!
//! 1. **Throughput**: single-task jobs through the scheduler (submit → persist → lease → run →
//!    record), on SQLite (embedded) and PostgreSQL, with a real no-op plugin (the hostile test
//!    guest's echo: a fresh instance and one call per task) and with no plugin at all; the
//!    baseline is the same plugin calls made directly, with the same concurrency.
//! 2. **Fairness under overload**: 10 backlogged tenants, weights 1..10 and then all equal; each
//!    tenant's share of slot time against its weight, summed up as Jain's index.
//! 3. **Takeover**: a node dies holding a task; the time until another node runs it: embedded
//!    (lease expiry plus the next heartbeat's sweep) and on NATS JetStream (ack-wait = the lease,
//!    then redelivery), for two lease lengths.
//!
//! 4. **Factory runs** on the scripted provider (a test double: the figure is the host's cost, not a
//!    model's): a run of the default pipeline (six roles, the syntax validator, the review) through
//!    the scheduler as a DAG of its steps, each step's output stored (SQLite), against the same
//!    steps' plugin calls made directly (no scheduler, nothing stored; steps ready together run
//!    together) with the same plugins already loaded; one at a time (latency) and eight at a time
//!    (runs per second).
//!
//! The NATS figures use a `nats-server -js` started for each run (Debian's package).
//!
//! `cargo bench -p qlayer-jobs --bench scheduler` (docs/PERFORMANCE.md records the figures);
//! `-- throughput fairness factory takeover` runs only the sections named.
//! `QLAYER_BENCH_TIMELINE=1` prints each scheduled factory run's events with their offsets in ms
//! (one at a time only): where a run's time goes between its steps.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use futures::future::BoxFuture;
use qlayer_db::{Db, JobKind, NewJob, NewTask, Task};
use qlayer_runtime::{Grants, Installed};
use qlayer_scheduler::{Execute, Scheduler, SchedulerConfig, TaskContext, TaskError, TaskResult};
use sqlx::Connection as _;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Calls the hostile guest's echo: one fresh instance and one call per task.
struct Echo(Installed);

impl Execute for Echo {
    fn execute<'a>(&'a self, task: &'a Task, _: TaskContext) -> BoxFuture<'a, Result<TaskResult, TaskError>> {
        Box::pin(async move {
            let mut tool = self.0.any_tool(&task.tenant_id).await.map_err(|e| TaskError::fatal(e.to_string()))?;
            let out = tool.invoke("ping").await.map_err(|e| TaskError::fatal(e.to_string()))?;
            Ok(serde_json::Value::String(out).into())
        })
    }
}

/// Does nothing: the scheduler's own cost.
struct Nothing;

impl Execute for Nothing {
    fn execute<'a>(&'a self, _: &'a Task, _: TaskContext) -> BoxFuture<'a, Result<TaskResult, TaskError>> {
        Box::pin(async { Ok(serde_json::Value::Null.into()) })
    }
}

/// Holds a slot for a fixed time and records who ran when.
struct Timed {
    cost: Duration,
    log: Mutex<Vec<(String, Instant)>>,
}

impl Execute for Timed {
    fn execute<'a>(&'a self, task: &'a Task, _: TaskContext) -> BoxFuture<'a, Result<TaskResult, TaskError>> {
        Box::pin(async move {
            tokio::time::sleep(self.cost).await;
            self.log.lock().unwrap().push((task.tenant_id.clone(), Instant::now()));
            Ok(serde_json::Value::Null.into())
        })
    }
}

struct Database {
    url: String,
    _dir: Option<tempfile::TempDir>,
    pg: Option<(String, String)>,
}

impl Database {
    async fn sqlite() -> Database {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("bench.db").display());
        Database { url, _dir: Some(dir), pg: None }
    }

    async fn postgres() -> Option<Database> {
        sqlx::any::install_default_drivers();
        let admin = std::env::var("QLAYER_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let mut conn = sqlx::AnyConnection::connect(&admin).await.ok()?;
        let name = format!("qlayer_bench_{}_{}", std::process::id(), fastrand_suffix());
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.ok()?;
        let url = format!("{}/{name}", admin.rsplit_once('/')?.0);
        Some(Database { url, _dir: None, pg: Some((admin, name)) })
    }

    async fn drop_pg(&self) {
        if let Some((admin, name)) = &self.pg
            && let Ok(mut conn) = sqlx::AnyConnection::connect(admin).await
        {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut conn).await;
        }
    }
}

fn fastrand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 % 1_000_000_007
}

fn one_task() -> Vec<NewTask> {
    vec![NewTask {
        name: "call".into(),
        kind: "call".into(),
        plugin: "echo".into(),
        input: serde_json::Value::Null,
        depends_on: vec![],
        max_attempts: 3,
    }]
}

async fn submit_many(scheduler: &Arc<Scheduler>, tenants: &[String], per_tenant: usize) {
    // Eight submitters at once, as eight application connections would.
    let jobs: Vec<String> = (0..per_tenant).flat_map(|_| tenants.iter().cloned()).collect();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let jobs = Arc::new(jobs);
    let mut submitters = Vec::new();
    for _ in 0..8 {
        let (scheduler, jobs, next) = (scheduler.clone(), jobs.clone(), next.clone());
        submitters.push(tokio::spawn(async move {
            let input = serde_json::json!({});
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(tenant) = jobs.get(i) else { return };
                let new = NewJob {
                    tenant_id: tenant,
                    kind: JobKind::Call,
                    input: &input,
                    priority: 0,
                    idempotency_key: None,
                    deadline_ms: None,
                    tasks: one_task(),
                };
                scheduler.submit(new).await.unwrap();
            }
        }));
    }
    for s in submitters {
        s.await.unwrap();
    }
}

async fn wait_idle(db: &Db) {
    loop {
        let (queued, running) = db.job_counts().await.unwrap();
        if queued + running == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn tenants(db: &Db, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(db.create_tenant(&format!("t{i}")).await.unwrap().id);
    }
    ids
}

fn config(node: &str, concurrency: usize, queue: Option<&str>) -> SchedulerConfig {
    SchedulerConfig {
        node_id: node.into(),
        concurrency,
        max_open_per_tenant: 0,
        queue_url: queue.map(str::to_string),
        ..Default::default()
    }
}

/// Jobs per second through a scheduler on `url` with `executor`: `jobs` single-task jobs over 4
/// tenants, submitted up front, timed from the first submission to the last completion.
async fn throughput(url: &str, queue: Option<&str>, executor: Arc<dyn Execute>, jobs: usize) -> f64 {
    let db = Db::open(url).await.unwrap();
    let ids = tenants(&db, 4).await;
    let scheduler = Scheduler::new(db.clone(), config("bench", 8, queue), executor);
    scheduler.start().await.unwrap();
    let began = Instant::now();
    submit_many(&scheduler, &ids, jobs / 4).await;
    wait_idle(&db).await;
    let rate = jobs as f64 / began.elapsed().as_secs_f64();
    scheduler.shutdown(Duration::from_secs(1)).await;
    db.close().await;
    rate
}

/// The same plugin calls without a scheduler: 8 at a time.
async fn direct_calls(installed: &Installed, calls: usize) -> f64 {
    let began = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (installed, next) = (installed.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < calls {
                let mut tool = installed.any_tool("t").await.unwrap();
                tool.invoke("ping").await.unwrap();
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    calls as f64 / began.elapsed().as_secs_f64()
}

/// Jain's fairness index of per-tenant (share / entitled share): 1 is perfectly fair, 1/n is one
/// tenant taking everything.
fn jain(x: &[f64]) -> f64 {
    let sum: f64 = x.iter().sum();
    let squares: f64 = x.iter().map(|v| v * v).sum();
    sum * sum / (x.len() as f64 * squares)
}

/// 10 backlogged tenants with `weights`; counts completions in the window in which every tenant
/// still has work, and prints each tenant's share of slot time against its entitlement.
async fn fairness(weights: &[i64]) -> f64 {
    let database = Database::sqlite().await;
    let db = Db::open(&database.url).await.unwrap();
    let ids = tenants(&db, weights.len()).await;
    for (id, w) in ids.iter().zip(weights) {
        db.set_tenant_share(id, *w, 0).await.unwrap();
    }
    let timed = Arc::new(Timed { cost: Duration::from_millis(4), log: Mutex::new(Vec::new()) });
    let scheduler = Scheduler::new(db.clone(), config("fair", 4, None), timed.clone());
    // Everyone's backlog is stored before the scheduler starts: all are backlogged from t=0.
    let per_tenant = 200;
    submit_many(&scheduler, &ids, per_tenant).await;
    scheduler.start().await.unwrap();
    // The window closes when the first tenant runs out of work.
    let log = loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let log = timed.log.lock().unwrap().clone();
        let mut per: HashMap<&str, usize> = HashMap::new();
        for (t, _) in &log {
            *per.entry(t.as_str()).or_default() += 1;
        }
        if per.values().any(|n| *n >= per_tenant) {
            let first_done = log
                .iter()
                .scan(HashMap::<&str, usize>::new(), |seen, (t, at)| {
                    *seen.entry(t.as_str()).or_default() += 1;
                    Some((seen[t.as_str()], *at))
                })
                .find(|(n, _)| *n >= per_tenant)
                .map(|(_, at)| at)
                .unwrap();
            break log.into_iter().filter(|(_, at)| *at <= first_done).collect::<Vec<_>>();
        }
    };
    scheduler.shutdown(Duration::from_millis(200)).await;
    let total = log.len() as f64;
    let weight_sum: i64 = weights.iter().sum();
    let mut normalised = Vec::new();
    let mut row = String::new();
    for (id, w) in ids.iter().zip(weights) {
        let done = log.iter().filter(|(t, _)| t == id).count() as f64;
        let share = done / total;
        let entitled = *w as f64 / weight_sum as f64;
        normalised.push(share / entitled);
        row.push_str(&format!(" w{w}:{:.1}%/{:.1}%", share * 100.0, entitled * 100.0));
    }
    let index = jain(&normalised);
    println!("  shares (got/entitled):{row}");
    println!("  window: {} tasks; Jain's index over share/entitlement: {index:.4}", log.len());
    db.close().await;
    index
}

/// A node dies holding a long task; another node on the same database takes it over when the
/// lease expires. Returns the time from the death to the task starting on the second node.
async fn takeover(lease_ms: i64, queue: Option<&str>) -> Duration {
    let database = match Database::postgres().await {
        Some(d) => d,
        None => Database::sqlite().await,
    };
    let db = Db::open(&database.url).await.unwrap();
    let ids = tenants(&db, 1).await;
    struct Hang;
    impl Execute for Hang {
        fn execute<'a>(&'a self, _: &'a Task, _: TaskContext) -> BoxFuture<'a, Result<TaskResult, TaskError>> {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(serde_json::Value::Null.into())
            })
        }
    }
    struct Note(Mutex<Option<Instant>>);
    impl Execute for Note {
        fn execute<'a>(&'a self, _: &'a Task, _: TaskContext) -> BoxFuture<'a, Result<TaskResult, TaskError>> {
            *self.0.lock().unwrap() = Some(Instant::now());
            Box::pin(async { Ok(serde_json::Value::Null.into()) })
        }
    }
    let mut cfg = config("node-a", 1, queue);
    cfg.lease_ms = lease_ms;
    let a = Scheduler::new(db.clone(), cfg.clone(), Arc::new(Hang));
    a.start().await.unwrap();
    submit_many(&a, &ids, 1).await;
    while a.load().1 == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let note = Arc::new(Note(Mutex::new(None)));
    cfg.node_id = "node-b".into();
    let b = Scheduler::new(db.clone(), cfg, note.clone());
    b.start().await.unwrap();
    let died = Instant::now();
    a.crash().await;
    loop {
        let noted = *note.0.lock().unwrap();
        if let Some(at) = noted {
            b.shutdown(Duration::from_secs(1)).await;
            db.close().await;
            database.drop_pg().await;
            return at - died;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The factory's plugins, loaded once, for runs called directly (no scheduler, nothing stored):
/// every role and validator of the default pipeline.
struct Direct {
    provider: Installed,
    plugins: HashMap<String, Installed>,
    pipeline: qlayer_jobs::Pipeline,
}

impl Direct {
    async fn load(runtime: &qlayer_runtime::Runtime) -> Direct {
        let pipeline = qlayer_jobs::Pipeline::default_pipeline();
        let bundled = |name: &str| {
            runtime.load(qlayer_bundled::bundled_plugin(name).unwrap()).unwrap().install(Grants::default()).unwrap()
        };
        let mut plugins = HashMap::new();
        for step in &pipeline.steps {
            let role = qlayer_factory::pipeline::plugin_ref(&step.role).unwrap().name().to_string();
            plugins.entry(role.clone()).or_insert_with(|| bundled(&role));
            for validator in &step.validators {
                plugins.entry(validator.clone()).or_insert_with(|| bundled(validator));
            }
        }
        let scripted = qlayer_bundled::ProviderChoice::Scripted { script: None };
        Direct {
            provider: qlayer_bundled::install_provider(runtime, &scripted, None).await.unwrap(),
            plugins,
            pipeline,
        }
    }

    /// One run of the default pipeline's steps called directly, with the run's own router: each
    /// step once its `after` steps are done (steps ready together run together, as the
    /// scheduler runs them), given its ancestors' files; each step's validators on its and its
    /// ancestors' files; the capsule packed. The same plugin calls a scheduled run makes.
    async fn run(&self) {
        use qlayer_factory::{Access, RunReport, agent_step, capsule, validate_step};
        let router = Arc::new(qlayer_gateway::Router::new(vec![self.provider.clone()], None));
        let requirement = "a todo list CLI".to_string();
        let mut files: HashMap<String, Vec<qlayer_runtime::Artifact>> = HashMap::new();
        let mut reports = Vec::new();
        let mut diagnostics = Vec::new();
        let given = |files: &HashMap<String, Vec<qlayer_runtime::Artifact>>,
                     steps: &[&qlayer_factory::pipeline::Step]| {
            let mut by_path = std::collections::BTreeMap::new();
            for step in steps {
                for a in files.get(&step.name).into_iter().flatten() {
                    by_path.insert(a.path.clone(), a.clone());
                }
            }
            by_path.into_values().collect::<Vec<_>>()
        };
        while files.len() < self.pipeline.steps.len() {
            let ready: Vec<&qlayer_factory::pipeline::Step> = self
                .pipeline
                .steps
                .iter()
                .filter(|s| !files.contains_key(&s.name) && s.after.iter().all(|a| files.contains_key(a)))
                .collect();
            let calls = ready.iter().map(|step| {
                let inputs = given(&files, &self.pipeline.ancestors(step));
                let role = qlayer_factory::pipeline::plugin_ref(&step.role).unwrap().name().to_string();
                let task = qlayer_runtime::Task {
                    requirement: requirement.clone(),
                    inputs,
                    feedback: vec![],
                    options_json: self.pipeline.options_for(step, "{}", None),
                };
                let access = Access::router(router.clone());
                async move { agent_step(&step.name, &self.plugins[&role], access, "t", task).await }
            });
            for (step, (report, out)) in ready.iter().zip(futures::future::join_all(calls).await) {
                files.insert(step.name.clone(), out.unwrap().artifacts);
                reports.push(report);
            }
            for step in &ready {
                let mut steps = self.pipeline.ancestors(step);
                steps.push(step);
                let checked = given(&files, &steps);
                for validator in &step.validators {
                    let (report, found) = validate_step(validator, &self.plugins[validator], "t", &checked).await;
                    diagnostics.extend(found.unwrap());
                    reports.push(report);
                }
            }
        }
        assert!(!diagnostics.iter().any(|d| d.is_error()), "the scripted run passes: {diagnostics:?}");
        let every: Vec<&qlayer_factory::pipeline::Step> = self.pipeline.steps.iter().collect();
        let all = given(&files, &every);
        let report = RunReport {
            requirement,
            status: "passed".into(),
            stop_reason: String::new(),
            provider: "scripted".into(),
            pipeline: None,
            repair_rounds: 0,
            steps: reports,
            diagnostics,
            files: qlayer_factory::file_reports(&all).unwrap(),
            unchecked: vec![],
            cost: None,
            currency: None,
            tokens: router.spent(),
            duration_ms: 0,
            started_at: 0,
        };
        capsule("run", &all, &report).unwrap();
    }
}

/// `runs` factory runs called directly, `parallel` at a time: (median ms per run, runs/s).
async fn direct_runs(direct: &Arc<Direct>, runs: usize, parallel: usize) -> (f64, f64) {
    let started = Instant::now();
    let limit = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut handles = Vec::new();
    for _ in 0..runs {
        let (direct, limit) = (direct.clone(), limit.clone());
        handles.push(tokio::spawn(async move {
            let _slot = limit.acquire().await.unwrap();
            let began = Instant::now();
            direct.run().await;
            began.elapsed()
        }));
    }
    let mut took = Vec::new();
    for h in handles {
        took.push(h.await.unwrap());
    }
    took.sort();
    (took[took.len() / 2].as_secs_f64() * 1e3, runs as f64 / started.elapsed().as_secs_f64())
}

/// `runs` factory runs through a scheduler on SQLite, `parallel` at a time: (median ms from
/// submission to the finished job, runs/s, the median of the sum of the steps' own times in ms
/// as the report gives them, and how many steps the report lists).
async fn scheduled_runs(
    runtime: &Arc<qlayer_runtime::Runtime>,
    runs: usize,
    parallel: usize,
) -> (f64, f64, f64, usize) {
    let database = Database::sqlite().await;
    let db = Db::open(&database.url).await.unwrap();
    let tenant = db.create_tenant("acme").await.unwrap().id;
    let dir = tempfile::tempdir().unwrap();
    let market = qlayer_marketplace::Marketplace::open(dir.path(), Default::default(), db.clone()).await.unwrap();
    let executor = Arc::new(qlayer_jobs::PluginExecutor::new(db.clone(), runtime.clone(), Arc::new(market)));
    let scheduler = Scheduler::new(db.clone(), config("bench", parallel * 2, None), executor);
    scheduler.start().await.unwrap();
    // Warm-up: the first run loads the bundled plugins once.
    let mut events = scheduler.subscribe();
    let input = serde_json::json!({"requirement": "a todo list CLI"});
    let submit = |scheduler: Arc<Scheduler>, tenant: String| {
        let input = input.clone();
        async move {
            let tasks = qlayer_jobs::plan(JobKind::Run, &input, 3).unwrap();
            let new = NewJob {
                tenant_id: &tenant,
                kind: JobKind::Run,
                input: &input,
                priority: 0,
                idempotency_key: None,
                deadline_ms: None,
                tasks,
            };
            (scheduler.submit(new).await.unwrap().0.id, Instant::now())
        }
    };
    let (warm, _) = submit(scheduler.clone(), tenant.clone()).await;
    loop {
        let id = events.recv().await.unwrap();
        if id == warm && db.job(&tenant, &warm).await.unwrap().unwrap().status.is_terminal() {
            break;
        }
    }
    let started = Instant::now();
    let mut pending: HashMap<String, Instant> = HashMap::new();
    let mut took = Vec::new();
    let (mut step_ms, mut step_count) = (Vec::new(), 0);
    let mut submitted = 0;
    while took.len() < runs {
        while submitted < runs && pending.len() < parallel {
            let (id, at) = submit(scheduler.clone(), tenant.clone()).await;
            pending.insert(id, at);
            submitted += 1;
        }
        let id = events.recv().await.unwrap();
        if let Some(at) = pending.get(&id).copied() {
            let job = db.job(&tenant, &id).await.unwrap().unwrap();
            if job.status.is_terminal() {
                let report = job.output.unwrap().to_value();
                assert_eq!(report["status"], "passed");
                took.push(at.elapsed());
                let steps = report["steps"].as_array().unwrap();
                step_ms.push(steps.iter().map(|s| s["duration_ms"].as_u64().unwrap()).sum::<u64>());
                step_count = steps.len();
                if std::env::var("QLAYER_BENCH_TIMELINE").is_ok() && parallel == 1 {
                    let events = db.job_events(&tenant, &id, 0).await.unwrap();
                    let t0 = events[0].at;
                    let line: Vec<String> = events
                        .iter()
                        .map(|e| format!("{}+{} {}", e.kind, e.at - t0, e.data["task"].as_str().unwrap_or("")))
                        .collect();
                    println!("    timeline: {}", line.join(" | "));
                }
                pending.remove(&id);
            }
        }
    }
    let rate = runs as f64 / started.elapsed().as_secs_f64();
    scheduler.shutdown(Duration::from_secs(1)).await;
    took.sort();
    step_ms.sort();
    let median_steps = step_ms[step_ms.len() / 2] as f64;
    (took[took.len() / 2].as_secs_f64() * 1e3, rate, median_steps, step_count)
}

fn main() {
    // Cargo passes `--bench`; any other argument names a section to run.
    let chosen: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let run = |section: &str| chosen.is_empty() || chosen.iter().any(|c| c == section);
    let tokio = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    tokio.block_on(async {
        let runtime = qlayer_tests::runtime();
        let plugin = runtime.load(&qlayer_tests::hostile(64, 10_000)).unwrap();
        let installed = plugin.install(Grants::default()).unwrap();
        let echo: Arc<dyn Execute> = Arc::new(Echo(installed.clone()));

        if run("throughput") {
            println!(
                "throughput: single-task jobs, 8 slots, 4 tenants, 8 concurrent submitters (jobs/s; median of 3 runs)"
            );
            let jobs = 2000;
            let median = |mut v: Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let mut base = Vec::new();
            for _ in 0..3 {
                base.push(direct_calls(&installed, jobs).await);
            }
            println!("  baseline: the plugin called directly        {:>8.0} calls/s", median(base));
            for (label, executor) in
                [("no-op plugin", echo.clone()), ("no plugin", Arc::new(Nothing) as Arc<dyn Execute>)]
            {
                let mut rates = Vec::new();
                for _ in 0..3 {
                    let db = Database::sqlite().await;
                    rates.push(throughput(&db.url, None, executor.clone(), jobs).await);
                }
                println!("  SQLite, {label:<14}                     {:>8.0} jobs/s", median(rates));
                let (mut rates, mut nats_rates) = (Vec::new(), Vec::new());
                for _ in 0..3 {
                    let Some(db) = Database::postgres().await else { break };
                    rates.push(throughput(&db.url, None, executor.clone(), jobs).await);
                    db.drop_pg().await;
                    let Some(db) = Database::postgres().await else { break };
                    let nats = qlayer_tests::TestNats::start();
                    nats_rates.push(throughput(&db.url, Some(&nats.url), executor.clone(), jobs).await);
                    db.drop_pg().await;
                }
                if !rates.is_empty() {
                    println!("  PostgreSQL, {label:<14}                 {:>8.0} jobs/s", median(rates));
                }
                if !nats_rates.is_empty() {
                    println!("  PostgreSQL + NATS JetStream, {label:<14}{:>8.0} jobs/s", median(nats_rates));
                }
            }
        }
        if run("fairness") {
            println!("fairness under overload: 10 tenants, 4 slots, 4 ms tasks, all backlogged");
            println!(" weights 1..10:");
            fairness(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]).await;
            println!(" equal weights:");
            fairness(&[1; 10]).await;
        }
        if run("factory") {
            println!("factory runs (scripted provider, a test double): median latency and runs/s");
            let runtime = Arc::new(qlayer_tests::runtime());
            let direct = Arc::new(Direct::load(&runtime).await);
            for parallel in [1, 8] {
                let (direct_ms, direct_rate) = direct_runs(&direct, 40, parallel).await;
                let (sched_ms, sched_rate, steps_ms, steps) = scheduled_runs(&runtime, 40, parallel).await;
                println!(
                    "  {parallel} at a time: direct {direct_ms:>6.1} ms/run {direct_rate:>6.1} runs/s; \
                 scheduled DAG on SQLite {sched_ms:>6.1} ms/run {sched_rate:>6.1} runs/s \
                 ({steps} steps, their own time {steps_ms:.0} ms summed)"
                );
            }
        }
        if run("takeover") {
            println!("takeover: a node dies holding a task; another node runs it after");
            for (label, on_nats) in [("embedded (SQL leases)", false), ("NATS JetStream", true)] {
                for lease_ms in [3_000, 6_000] {
                    let mut samples = Vec::new();
                    for _ in 0..3 {
                        let nats = on_nats.then(qlayer_tests::TestNats::start);
                        samples.push(takeover(lease_ms, nats.as_ref().map(|n| n.url.as_str())).await);
                    }
                    samples.sort();
                    println!(
                        "  {label}, lease {lease_ms} ms (heartbeat {} ms): median {:.0} ms, max {:.0} ms",
                        lease_ms / 3,
                        samples[1].as_secs_f64() * 1e3,
                        samples[2].as_secs_f64() * 1e3
                    );
                }
            }
        }
    });
}
