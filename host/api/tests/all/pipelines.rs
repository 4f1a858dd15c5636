//! Pipelines as data over the REST API: stored, listed, replaced and removed per tenant; checked
//! before anything runs (a cycle, an unknown step, a plugin that is not installed, of the wrong
//! kind or not at its pinned digest: each named by its step); runs that use a stored or an
//! inline pipeline with an installed agent as a role; tools granted to a step, invoked by the
//! agent itself and, for a model's tool calls, by the host, bounded in rounds. The model is the
//! `scripted` provider (a test double) answering from a script.

use crate::api::{Svc, service};
use qlayer_db::Backend;
use qlayer_tests::{guest_with, marketplace_plugin};
use serde_json::{Value, json};
use sha2::Digest as _;

const TOOL_USER: &str = "name = \"tool-user\"\nversion = \"0.1.0\"\nkind = \"agent\"\ndescription = \"Invokes the tool its requirement names.\"\n";

/// A PRD the script answers with once text-stats' output (`top_words`) is in the conversation.
fn counted_prd() -> String {
    json!({
        "title": "Counted by text-stats",
        "summary": "a PRD written after a tool call",
        "language": "python",
        "features": [{"name": "count", "description": "count the words"}],
    })
    .to_string()
}

/// The product manager calls text-stats (while tools are allowed) until its output is in the
/// conversation, then answers with [`counted_prd`]; with `always_call`, it never stops calling.
fn script(always_call: bool) -> Value {
    let call = json!({"role": "product-manager", "reply": "", "tool_calls": [{"name": "text-stats", "arguments": {"text": "alpha beta beta"}}]});
    let answer = json!({"role": "product-manager", "contains": "top_words", "reply": counted_prd()});
    if always_call { json!({"rules": [call]}) } else { json!({"rules": [answer, call]}) }
}

async fn run_and_wait(svc: &Svc, key: &str, body: Value) -> Value {
    let r = svc.post("/v1/runs", key, body).await;
    assert_eq!(r.status, 201, "{r:?}");
    svc.wait(key, r.body["id"].as_str().unwrap()).await
}

fn step<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("no step {name}: {report}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_pipeline_runs_an_installed_role_with_granted_tools_and_the_models_tool_calls() {
    let svc = service(Backend::Sqlite, true, |_| {}).await;
    let (_, acme) = svc.tenant("acme").await;
    let (_, other) = svc.tenant("other").await;
    assert_eq!(svc.install(&acme, "tools/text-stats", &marketplace_plugin("text-stats")).await.status, 201);
    let agent = guest_with("qlayer-test-tool-user", TOOL_USER);
    let installed = svc.install(&acme, "agents/tool-user", &agent).await;
    assert_eq!(installed.status, 201, "{installed:?}");
    let oci_digest = installed.body["plugin"]["digest"].as_str().unwrap().to_string();
    let binary_digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&agent)));

    // The bundled default is listed until the tenant stores its own.
    let list = svc.get("/v1/pipelines", &acme).await;
    assert_eq!(list.status, 200, "{list:?}");
    assert_eq!(list.body["items"][0]["name"], "default");
    assert_eq!(list.body["items"][0]["bundled"], true);
    assert_eq!(
        list.body["items"][0]["definition"]["steps"][5]["validators"],
        json!(["syntax", "tests", "secrets", "deps", "hap"])
    );

    let pipeline = json!({
        "description": "an installed agent uses a tool itself; the product manager's model calls it",
        "steps": [
            {"name": "use-tools", "role": format!("installed:tool-user@{oci_digest}"), "tools": ["text-stats"],
             "options": {"text": "one two two"}},
            {"name": "product-manager", "role": "product-manager", "after": ["use-tools"],
             "tools": ["text-stats"], "tool-rounds": 2},
        ],
        "repair": {"rounds": 0},
    });
    let put = svc.put("/v1/pipelines/with-tools", &acme, pipeline.clone()).await;
    assert_eq!(put.status, 201, "{put:?}");
    assert_eq!(put.body["name"], "with-tools");
    assert_eq!(svc.put("/v1/pipelines/with-tools", &acme, pipeline.clone()).await.status, 200);
    assert_eq!(svc.get("/v1/pipelines/with-tools", &acme).await.body["definition"]["steps"][0]["name"], "use-tools");
    // Another tenant's pipeline looks exactly like a missing one, and it cannot run it.
    let theirs = svc.get("/v1/pipelines/with-tools", &other).await;
    assert_eq!((theirs.status, theirs.code()), (404, "not_found"), "{theirs:?}");
    let r = svc.post("/v1/runs", &other, json!({"requirement": "x", "pipeline": "with-tools"})).await;
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.text.contains("no pipeline `with-tools` is stored for this tenant"), "{r:?}");

    let job = run_and_wait(
        &svc,
        &acme,
        json!({"requirement": "text-stats", "pipeline": "with-tools", "script": script(false)}),
    )
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let report = &job["output"];
    assert_eq!(report["pipeline"], "with-tools");
    assert_eq!(report["status"], "passed", "{report}");
    // The installed role ran, and the report names its binary's digest.
    let used = step(report, "use-tools");
    assert_eq!(used["plugin"], "tool-user");
    assert_eq!(used["digest"], binary_digest);
    assert_eq!(used["tool_calls"], 1);
    // The model's tool call was run and fed back: the script answers this PRD only once the
    // tool's output is in the conversation.
    assert_eq!(step(report, "product-manager")["tool_calls"], 1);
    let files = svc.capsule(&acme, job["id"].as_str().unwrap()).await;
    let seen: Value = serde_json::from_str(files.iter().find(|(p, _)| p.ends_with("/tools.json")).unwrap().1).unwrap();
    assert_eq!(seen["granted"], json!(["text-stats"]));
    let output: Value = serde_json::from_str(seen["output"].as_str().unwrap()).unwrap();
    assert_eq!(output["words"], 3, "{seen}");
    let prd = files.iter().find(|(p, _)| p.ends_with("/docs/PRD.json")).unwrap().1;
    assert!(prd.contains("Counted by text-stats"), "{prd}");

    // A model that never stops calling tools gets `tool-rounds` rounds, then must answer.
    let job = run_and_wait(
        &svc,
        &acme,
        json!({"requirement": "text-stats", "pipeline": "with-tools", "script": script(true)}),
    )
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(step(&job["output"], "product-manager")["tool_calls"], 2);

    // Removing it: runs that name it are refused; the tenant's list is back to the default.
    assert_eq!(svc.delete("/v1/pipelines/with-tools", &acme).await.status, 204);
    assert_eq!(svc.delete("/v1/pipelines/with-tools", &acme).await.status, 404);
    assert_eq!(svc.get("/v1/pipelines", &acme).await.body["items"].as_array().unwrap().len(), 1);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_pipeline_is_refused_before_anything_runs_naming_its_step() {
    let svc = service(Backend::Sqlite, true, |_| {}).await;
    let (_, acme) = svc.tenant("acme").await;
    let (_, viewer) = svc.key(&acme, "viewer").await;
    assert_eq!(svc.install(&acme, "tools/text-stats", &marketplace_plugin("text-stats")).await.status, 201);
    let one = |step: Value| json!({"steps": [step]});
    let zeros = "0".repeat(64);
    let cases = [
        (
            json!({"steps": [
                {"name": "a", "role": "developer", "after": ["b"]},
                {"name": "b", "role": "developer", "after": ["a"]}]}),
            "steps[0] (`a`): after: the steps' dependencies form a cycle through a, b",
        ),
        (
            one(json!({"name": "a", "role": "developer", "after": ["pm"]})),
            "steps[0] (`a`): after: no step is named `pm`",
        ),
        (one(json!({"name": "a", "role": "intern"})), "steps[0] (`a`): role: `intern` is not a bundled role"),
        (one(json!({"name": "a", "role": "syntax"})), "steps[0] (`a`): role: `syntax` is not a bundled role"),
        (
            one(json!({"name": "a", "role": "installed:reviewer"})),
            "steps[0] (`a`): role: no plugin `reviewer` is installed for this tenant",
        ),
        (
            one(json!({"name": "a", "role": "installed:text-stats"})),
            "steps[0] (`a`): role: installed plugin `text-stats` is of kind `tool`, not `agent`",
        ),
        (
            one(json!({"name": "a", "role": "developer", "tools": [format!("text-stats@sha256:{zeros}")]})),
            "steps[0] (`a`): tools: installed plugin `text-stats` is pinned to sha256:000",
        ),
        (
            one(json!({"name": "a", "role": "developer", "validators": ["installed:text-stats"]})),
            "steps[0] (`a`): validators: installed plugin `text-stats` is of kind `tool`, not `validator`",
        ),
        (one(json!({"name": "a", "role": "developer", "gated": true})), "unknown field `gated`"),
        (
            json!({"steps": [{"name": "a", "role": "developer", "gate": true}], "repair": {"steps": []}}),
            "steps[0] (`a`): gate: a gated step must repeat in repair rounds",
        ),
        (json!({"steps": []}), "steps: a pipeline has 1 to 32 steps, not 0"),
        (one(json!({"name": "a", "role": "developer", "fan-out": 17})), "steps[0] (`a`): fan-out: 1 to 16"),
        (
            one(json!({"name": "a", "role": "qa-engineer", "fan-out": 2})),
            "steps[0] (`a`): fan-out: the bundled `qa-engineer` role does not split its work",
        ),
    ];
    for (pipeline, expected) in cases {
        // Inline in a run: nothing is stored, nothing runs.
        let r = svc.post("/v1/runs", &acme, json!({"requirement": "a todo CLI", "pipeline": pipeline})).await;
        assert_eq!((r.status, r.code()), (400, "invalid_request"), "{pipeline}: {r:?}");
        assert!(r.text.contains(expected), "{pipeline}\n→ {r:?}\n(expected {expected})");
        // Stored: refused the same way.
        let r = svc.put("/v1/pipelines/p", &acme, pipeline.clone()).await;
        assert_eq!(r.status, 400, "{pipeline}: {r:?}");
        assert!(r.text.contains(expected), "{pipeline}\n→ {r:?}\n(expected {expected})");
    }
    let jobs = svc.get("/v1/jobs", &acme).await;
    assert_eq!(jobs.body["items"], json!([]), "{jobs:?}");
    assert_eq!(svc.get("/v1/pipelines/p", &acme).await.status, 404);
    let good = one(json!({"name": "a", "role": "product-manager"}));
    // A viewer reads pipelines but does not change them; names are checked.
    assert_eq!(svc.put("/v1/pipelines/p", &viewer, good.clone()).await.status, 403);
    assert_eq!(svc.put("/v1/pipelines/Bad%20Name", &acme, good.clone()).await.status, 400);
    let r = svc.put("/v1/pipelines/p", &acme, json!({"name": "q", "steps": good["steps"]})).await;
    assert!(r.status == 400 && r.text.contains("named by its path"), "{r:?}");
    assert_eq!(svc.put("/v1/pipelines/p", &acme, good.clone()).await.status, 201);
    assert_eq!(svc.get("/v1/pipelines/p", &viewer).await.status, 200);
    assert_eq!(svc.delete("/v1/pipelines/p", &viewer).await.status, 403);
    // An inline pipeline of one step, without validators, runs just that step.
    let job = run_and_wait(&svc, &acme, json!({"requirement": "a todo CLI", "pipeline": good})).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let steps: Vec<&str> =
        job["output"]["steps"].as_array().unwrap().iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(steps, ["a"]);
    svc.stop().await;
}

/// A pipeline configures a bundled plugin with the keys its manifest names (`hap`'s word list),
/// and nothing else: a key the plugin does not read, or a plugin that is not bundled, is refused
/// before anything runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_configures_a_bundled_validator() {
    let svc = service(Backend::Sqlite, true, |_| {}).await;
    let (_, acme) = svc.tenant("acme").await;
    let steps = json!([
        {"name": "pm", "role": "product-manager"},
        {"name": "arch", "role": "architect", "after": ["pm"]},
        {"name": "dev", "role": "developer", "after": ["arch"], "validators": ["hap"]},
    ]);
    // Without configuration, the bundled list finds nothing in the scripted todo CLI.
    let plain = json!({"steps": steps, "repair": {"rounds": 0}});
    let job = run_and_wait(&svc, &acme, json!({"requirement": "a todo list CLI", "pipeline": plain})).await;
    let found = |job: &Value| -> Vec<String> {
        // (The report leaves out an empty list.)
        let all = job["output"]["diagnostics"].as_array().cloned().unwrap_or_default();
        all.iter().filter(|d| d["severity"] == "error").map(|d| d["rule"].as_str().unwrap().into()).collect()
    };
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(found(&job).is_empty(), "{job}");
    // With `todo` as the only entry, each file that says it is a finding.
    let configured = json!({"steps": steps, "repair": {"rounds": 0},
        "config": {"hap": {"words": "abuse:todo", "words-mode": "replace"}}});
    assert_eq!(svc.put("/v1/pipelines/strict", &acme, configured.clone()).await.status, 201);
    let stored = svc.get("/v1/pipelines/strict", &acme).await;
    assert_eq!(stored.body["definition"]["config"]["hap"]["words"], "abuse:todo", "{stored:?}");
    let job = run_and_wait(&svc, &acme, json!({"requirement": "a todo list CLI", "pipeline": "strict"})).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let rules = found(&job);
    assert!(!rules.is_empty() && rules.iter().all(|r| r == "hap-abuse"), "{job}");
    // Refused, naming the plugin and key.
    let cases = [
        (
            json!({"hap": {"word": "x"}}),
            "config.hap: `hap` reads no config key `word` (it reads: words, words-mode, allow)",
        ),
        (json!({"syntax": {"words": "x"}}), "config.syntax: `syntax` reads no config key `words` (it reads: none)"),
        (json!({"text-stats": {"a": "b"}}), "config.text-stats: `text-stats` is not a bundled plugin"),
        (json!({"hap": {"words": "x".repeat(64 * 1024 + 1)}}), "config.hap.words: at most 64 KiB"),
    ];
    for (config, expected) in cases {
        let pipeline = json!({"steps": steps, "config": config});
        let r = svc.post("/v1/runs", &acme, json!({"requirement": "a todo CLI", "pipeline": pipeline})).await;
        assert_eq!(r.status, 400, "{r:?}");
        assert!(r.text.contains(expected), "{r:?}\n(expected {expected})");
    }
    svc.stop().await;
}

/// A step that names a model of the tenant's table asks it through the gateway: its routing,
/// limits and prices, its usage metered under the run (key id `run:<run id>`). The table's one
/// deployment is the scripted test double, installed from the registry as a provider plugin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_asks_the_model_its_pipeline_names_through_the_tenants_table() {
    let svc = service(Backend::Sqlite, true, |_| {}).await;
    let (_, acme) = svc.tenant("acme").await;
    let scripted = qlayer_bundled::bundled_plugin("scripted").unwrap();
    assert_eq!(svc.install(&acme, "providers/scripted", scripted).await.status, 201);
    let spec = json!({"deployments": [{"plugin": "scripted", "input_price": 1_000.0, "output_price": 2_000.0}]});
    let r = svc.put("/v1/models/planner", &acme, spec).await;
    assert_eq!(r.status, 200, "{r:?}");
    let pipeline = |model: &str| json!({"steps": [{"name": "plan", "role": "product-manager", "model": model}]});

    let r = svc.post("/v1/runs", &acme, json!({"requirement": "a todo CLI", "pipeline": pipeline("nope")})).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.text.contains("steps[0] (`plan`): model: `nope` is not a model of this tenant's table"), "{r:?}");

    let job = run_and_wait(&svc, &acme, json!({"requirement": "a todo CLI", "pipeline": pipeline("planner")})).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let tokens = &step(&job["output"], "plan")["tokens"];
    let run_key = format!("run:{}", job["id"].as_str().unwrap());
    let usage = crate::gateway::usage(&svc, &acme, &format!("group_by=key&key={run_key}&model=planner"), 1).await;
    let row = &usage["data"][0];
    assert_eq!(row["group"], run_key.as_str(), "{usage}");
    assert_eq!(row["prompt_tokens"], tokens["prompt"], "{usage}");
    // At the table's prices: 1,000 and 2,000 per million tokens.
    let expected =
        (tokens["prompt"].as_f64().unwrap() * 1_000.0 + tokens["completion"].as_f64().unwrap() * 2_000.0) / 1e6;
    assert!((row["cost"].as_f64().unwrap() - expected).abs() < 1e-9, "{usage} vs {tokens}");
    // The report says the same, per step and for the run.
    assert!((step(&job["output"], "plan")["cost"].as_f64().unwrap() - expected).abs() < 1e-9, "{job}");
    assert!((job["output"]["cost"].as_f64().unwrap() - expected).abs() < 1e-9, "{job}");
    assert_eq!(job["output"]["currency"], "USD");
    svc.stop().await;
}
