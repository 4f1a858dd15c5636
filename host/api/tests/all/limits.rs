//! Gateway limits and budgets (issue 16, item 1) through `qlayer serve`: set through the API by
//! operators (tenants) and tenant admins (keys, never above the tenant's), refused with OpenAI's
//! 429 and `x-ratelimit-*` headers or a budget's own error, shown in `/v1/usage`, held by a
//! deployment's own `rpm`, and never exceeded by two nodes sharing PostgreSQL. The upstream is
//! the local OpenAI-compatible test server (a test double).

use crate::api::{Svc, service};
use qlayer_db::Backend;
use qlayer_tests::{ADMIN, TestServer};
use serde_json::{Value, json};
use std::time::Duration;

fn hi(model: &str) -> Value {
    json!({"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
}

async fn set_tenant_limits(svc: &Svc, tenant: &str, body: Value) -> crate::api::Reply {
    svc.put(&format!("/v1/tenants/{tenant}/limits"), ADMIN, body).await
}

/// A service fronting the test server for every tenant (`[gateway] upstream`), on `database`
/// (SQLite when `None`), with short quota leases.
pub(crate) async fn fronting(upstream: &TestServer, database: Option<String>) -> Svc {
    let url = format!("{}/v1", upstream.url());
    service(Backend::Sqlite, false, move |c| {
        c.network.allow = vec!["127.0.0.1".into()];
        c.gateway.upstream = Some(url);
        c.gateway.quota_lease_ms = 200;
        if let Some(database) = database {
            c.database.url = Some(database);
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_with_openai_headers_budgets_say_when_they_reset_and_usage_shows_them() {
    let upstream = TestServer::start().await;
    let svc = fronting(&upstream, None).await;
    let (tenant, acme) = svc.tenant("acme").await;
    let (dev_id, dev) = svc.key(&acme, "developer").await;

    // Bad input, each named; only operators set a tenant's limits; another tenant is 404.
    for (body, says) in [
        (json!({"rpm": 0}), "rpm must be 1 to"),
        (json!({"tpm": -1}), "tpm must be 1 to"),
        (json!({"rpm": 1e12}), "rpm"),
        (json!({"budget": {"currency": "EUR", "daily": 1}}), "budget.currency `EUR`"),
        (json!({"budget": {"currency": "USD", "daily": 0}}), "budget.daily must be from 0.000000001"),
        (json!({"rpm": 5, "burst": 10}), "burst"),
    ] {
        let r = set_tenant_limits(&svc, &tenant, body.clone()).await;
        assert_eq!((r.status, r.code()), (400, "invalid_request"), "{body}: {r:?}");
        assert!(r.body["error"]["message"].as_str().unwrap().contains(says), "{body}: {r:?}");
    }
    let r = svc.put(&format!("/v1/tenants/{tenant}/limits"), &acme, json!({"rpm": 1000})).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(set_tenant_limits(&svc, "tn_nobody", json!({"rpm": 5})).await.status, 404);

    // Five requests a minute for the tenant.
    let r = set_tenant_limits(&svc, &tenant, json!({"rpm": 5})).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, json!({"tenant_id": tenant, "rpm": 5}));
    // A key's limits are within its tenant's.
    let r = svc.put(&format!("/v1/keys/{dev_id}/limits"), &acme, json!({"rpm": 6})).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.text.contains("rpm is above the tenant's own limit of 5"), "{r:?}");
    assert_eq!(svc.put(&format!("/v1/keys/{dev_id}/limits"), &dev, json!({"rpm": 1})).await.status, 403);
    let (_, beta) = svc.tenant("beta").await;
    let r = svc.put(&format!("/v1/keys/{dev_id}/limits"), &beta, json!({"rpm": 1})).await;
    assert_eq!(r.status, 404, "another tenant's key is a missing one: {r:?}");
    // An operator limits and revokes what it issued for a tenant (schemathesis's stateful phase
    // found the key it had just created answering 404); other tenants still see nothing.
    let issued = svc.post("/v1/keys", ADMIN, json!({"name": "ci", "role": "developer", "tenant_id": tenant})).await;
    assert_eq!(issued.status, 201, "{issued:?}");
    let issued = issued.body["key"]["id"].as_str().unwrap().to_string();
    let r = svc.put(&format!("/v1/keys/{issued}/limits"), ADMIN, json!({"rpm": 2})).await;
    assert_eq!((r.status, &r.body["key_id"]), (200, &json!(issued)), "{r:?}");
    assert_eq!(svc.delete(&format!("/v1/keys/{issued}"), &beta).await.status, 404);
    assert_eq!(svc.delete(&format!("/v1/keys/{issued}"), ADMIN).await.status, 204);
    let listed = svc.get("/v1/keys", &acme).await;
    let row = listed.body["items"].as_array().unwrap().iter().find(|k| k["id"] == issued).cloned();
    assert!(row.is_some_and(|k| k["revoked_at"].is_number()), "{listed:?}");

    let mut answered = 0;
    let refused = loop {
        let r = svc.post("/v1/chat/completions", &acme, hi("m")).await;
        if r.status != 200 {
            break r;
        }
        answered += 1;
        assert_eq!(r.headers["x-ratelimit-limit-requests"], "5", "{:?}", r.headers);
        assert!(r.headers.contains_key("x-ratelimit-remaining-requests"));
        assert!(answered <= 5, "a sixth request in the minute was answered");
    };
    assert_eq!(answered, 5);
    assert_eq!((refused.status, refused.code()), (429, "rate_limit_exceeded"), "{refused:?}");
    assert_eq!(refused.body["error"]["type"], "rate_limit_error", "{refused:?}");
    assert!(refused.text.contains("the tenant's limit of 5 requests per minute is reached"), "{refused:?}");
    let retry: u64 = refused.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=61).contains(&retry), "{retry}");
    assert_eq!(refused.headers["x-ratelimit-remaining-requests"], "0");
    assert_eq!(refused.headers["x-ratelimit-limit-requests"], "5");
    // Anthropic's shape for the same refusal.
    let r = svc
        .post(
            "/v1/messages",
            &acme,
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!((r.status, r.body["error"]["type"].as_str()), (429, Some("rate_limit_error")), "{r:?}");
    // Another tenant is not held to acme's limit.
    assert_eq!(svc.post("/v1/chat/completions", &beta, hi("m")).await.status, 200);

    // A budget: with input free and output at 1 per million tokens, an answer of 7 + 3 tokens
    // costs 3,000 billionths and a request for at most 5 reserves 5,000; a day of 0.00003 USD
    // (30,000) admits a few, then says when it resets.
    let r = svc
        .put(
            "/v1/models/priced",
            &acme,
            json!({"deployments": [{"plugin": "upstream", "model": "m", "input_price": 0, "output_price": 1}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = set_tenant_limits(&svc, &tenant, json!({"budget": {"currency": "USD", "daily": 0.00003}})).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["budget"], json!({"currency": "USD", "daily": 0.00003}));
    let r = svc
        .put(&format!("/v1/keys/{dev_id}/limits"), &acme, json!({"budget": {"currency": "USD", "daily": 0.001}}))
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.text.contains("budget.daily is above the tenant's own limit of 0.00003 USD"), "{r:?}");
    let mut answered = 0;
    let spent = loop {
        let r = svc.post("/v1/chat/completions", &dev, hi("priced")).await;
        if r.status != 200 {
            break r;
        }
        answered += 1;
        assert!(answered < 20, "the budget never ran out");
    };
    assert!(answered >= 5, "only {answered} answered within the budget");
    assert_eq!((spent.status, spent.code()), (429, "budget_exceeded"), "{spent:?}");
    assert!(
        spent.text.contains("the tenant's budget of 0.00003 USD per day (UTC) is spent; it resets at "),
        "{spent:?}"
    );
    assert!(spent.text.contains("T00:00:00Z"), "{spent:?}");
    let retry: u64 = spent.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry), "{retry}");
    // A request that could never fit is bad input, not a wait.
    let r = svc
        .post(
            "/v1/chat/completions",
            &dev,
            json!({"model": "priced", "max_tokens": 100000, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!((r.status, r.code()), (400, "request_too_large"), "{r:?}");
    assert_eq!(r.body["error"]["param"], "max_tokens", "{r:?}");

    // What was spent stayed within the budget, and /v1/usage says so.
    let mut report = Value::Null;
    for _ in 0..200 {
        report = svc.get("/v1/usage?model=priced", &acme).await.body;
        if report["data"][0]["requests"].as_i64().unwrap_or(0) >= answered + 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let cost = report["data"][0]["cost_nanos"].as_i64().unwrap();
    assert_eq!(cost, answered * 3_000, "{report}");
    assert!(cost <= 30_000, "spent {cost} nanos of a 30,000 budget");
    let budget = report["limits"].as_array().unwrap().iter().find(|l| l["limit"] == "daily_budget").unwrap().clone();
    assert_eq!((budget["scope"].as_str(), budget["currency"].as_str()), (Some("tenant"), Some("USD")), "{budget}");
    assert_eq!(budget["max"], 0.00003);
    assert!((budget["used"].as_f64().unwrap() - cost as f64 / 1e9).abs() < 1e-12, "{budget}");
    assert!(budget["resets_at"].as_i64().unwrap() > budget["window_start"].as_i64().unwrap());

    // {} removes the tenant's limits.
    assert_eq!(set_tenant_limits(&svc, &tenant, json!({})).await.body, json!({"tenant_id": tenant}));
    assert_eq!(svc.post("/v1/chat/completions", &acme, hi("priced")).await.status, 200);
    svc.stop().await;
}

/// A deployment's own `rpm` (the upstream's quota): once it is reached, the next deployment
/// serves; with none left, 429 naming the deployment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_at_its_own_limit_is_passed_over() {
    let upstream = TestServer::start().await;
    let svc = fronting(&upstream, None).await;
    let (_, acme) = svc.tenant("acme").await;
    let r = svc
        .put(
            "/v1/models/capped",
            &acme,
            json!({"deployments": [{"plugin": "upstream", "model": "a", "rpm": 2}, {"plugin": "upstream", "model": "b"}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let mut served = Vec::new();
    for _ in 0..4 {
        let r = svc.post("/v1/chat/completions", &acme, hi("capped")).await;
        assert_eq!(r.status, 200, "{r:?}");
        served.push(r.headers["x-qlayer-deployment"].to_str().unwrap().to_string());
    }
    assert_eq!(served, ["upstream/a", "upstream/a", "upstream/b", "upstream/b"]);
    let r = svc
        .put("/v1/models/only", &acme, json!({"deployments": [{"plugin": "upstream", "model": "c", "rpm": 1}]}))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(svc.post("/v1/chat/completions", &acme, hi("only")).await.status, 200);
    let r = svc.post("/v1/chat/completions", &acme, hi("only")).await;
    assert_eq!((r.status, r.code()), (429, "deployment_rate_limited"), "{r:?}");
    assert!(r.text.contains("deployment `upstream/c`'s limit of 1 requests per minute"), "{r:?}");
    assert!(r.headers.contains_key("retry-after"));
    svc.stop().await;
}

/// Two `qlayer serve` nodes sharing PostgreSQL, 80 requests at once spread over both against a
/// limit of 20 a minute: never more than 20 answered, and once the leases a node held and did
/// not use have gone back, exactly 20.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_sharing_postgres_never_admit_more_than_the_limit() {
    let upstream = TestServer::start().await;
    let (url, _pg) = qlayer_tests::fresh_postgres().await;
    let a = fronting(&upstream, Some(url.clone())).await;
    let b = fronting(&upstream, Some(url)).await;
    let (tenant, acme) = a.tenant("acme").await;
    assert_eq!(set_tenant_limits(&a, &tenant, json!({"rpm": 20})).await.status, 200);
    let send = |svc: &Svc| {
        let request = svc
            .http
            .post(format!("{}/v1/chat/completions", svc.base))
            .header("authorization", format!("Bearer {acme}"))
            .json(&hi("m"));
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let mut calls = Vec::new();
    for i in 0..80 {
        calls.push(send(if i % 2 == 0 { &a } else { &b }));
    }
    let statuses = futures::future::join_all(calls).await;
    let mut ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    assert!((1..=20).contains(&ok), "{ok} answered over a limit of 20");
    // The leases end (200 ms) and what they did not use goes back: the rest of the 20, and
    // not one more.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for i in 0..60 {
        if send(if i % 2 == 0 { &a } else { &b }).await == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 20);
    a.stop().await;
    b.stop().await;
}
