//! The gateway's exact cache (issue 16, item 2) through `qlayer serve`: a model that keeps
//! answers answers the same request again without the upstream, whole and streamed (the same
//! chunks in the same order with the same usage), honours `Cache-Control: no-cache` and
//! `no-store`, never answers one tenant from another's, says what it did in `x-qlayer-cache`,
//! and meters hits as hits that cost nothing. The upstream is the local OpenAI-compatible test
//! server (a test double).

use crate::api::Svc;
use qlayer_tests::TestServer;
use serde_json::{Value, json};
use std::time::Duration;

struct Answer {
    status: u16,
    cache: String,
    text: String,
}

async fn ask(svc: &Svc, key: &str, body: &Value, cache_control: Option<&str>) -> Answer {
    let mut request = svc
        .http
        .post(format!("{}/v1/chat/completions", svc.base))
        .header("authorization", format!("Bearer {key}"))
        .json(body);
    if let Some(value) = cache_control {
        request = request.header("cache-control", value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let cache = response.headers().get("x-qlayer-cache").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default();
    Answer { status, cache, text: response.text().await.unwrap() }
}

/// A stream's events without what differs between two answers of the same content (ids and
/// times): the deltas, finish reasons and usage, in order.
fn events(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|data| match serde_json::from_str::<Value>(data) {
            Ok(v) => json!({"choices": v["choices"], "usage": v["usage"]}),
            Err(_) => json!(data),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exact_cache_answers_again_replays_streams_and_never_crosses_tenants() {
    let upstream = TestServer::start().await;
    let svc = crate::limits::fronting(&upstream, None).await;
    let (_, acme) = svc.tenant("acme").await;
    let (_, beta) = svc.tenant("beta").await;
    let entry = json!({
        "deployments": [{"plugin": "upstream", "model": "m", "input_price": 1, "output_price": 2}],
        "cache": {"ttl_secs": 60}
    });
    for key in [&acme, &beta] {
        assert_eq!(svc.put("/v1/models/cached", key, entry.clone()).await.status, 200);
    }
    let r = svc
        .put("/v1/models/bad", &acme, json!({"deployments": [{"plugin": "upstream"}], "cache": {"ttl_secs": 0}}))
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    let calls = || upstream.requests().iter().filter(|s| s.path.ends_with("/chat/completions")).count();
    let hi = json!({"model": "cached", "messages": [{"role": "user", "content": "hi"}]});

    let first = ask(&svc, &acme, &hi, None).await;
    assert_eq!((first.status, first.cache.as_str()), (200, "miss"), "{}", first.text);
    assert_eq!(calls(), 1);
    let again = ask(&svc, &acme, &hi, None).await;
    assert_eq!((again.status, again.cache.as_str()), (200, "hit"), "{}", again.text);
    assert_eq!(calls(), 1, "a hit asks nothing upstream");
    let (a, b): (Value, Value) =
        (serde_json::from_str(&first.text).unwrap(), serde_json::from_str(&again.text).unwrap());
    assert_eq!((&a["choices"], &a["usage"]), (&b["choices"], &b["usage"]), "the same answer and usage");
    // Who asks does not change the answer; another parameter does.
    let as_user = json!({"model": "cached", "user": "u-1", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(ask(&svc, &acme, &as_user, None).await.cache, "hit");
    let hot = json!({"model": "cached", "temperature": 1.5, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(ask(&svc, &acme, &hot, None).await.cache, "miss");
    assert_eq!(calls(), 2);
    // no-cache skips reading (and keeps the new answer); no-store keeps nothing.
    assert_eq!(ask(&svc, &acme, &hi, Some("no-cache")).await.cache, "skip");
    assert_eq!(calls(), 3);
    let other = json!({"model": "cached", "messages": [{"role": "user", "content": "something else"}]});
    assert_eq!(ask(&svc, &acme, &other, Some("no-store")).await.cache, "miss");
    assert_eq!(ask(&svc, &acme, &other, None).await.cache, "miss", "no-store kept nothing");
    assert_eq!(calls(), 5);
    // Another tenant asking the very same is not answered from acme's.
    assert_eq!(ask(&svc, &beta, &hi, None).await.cache, "miss");
    assert_eq!(calls(), 6);
    // A model without a cache says so.
    let plain = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(ask(&svc, &acme, &plain, None).await.cache, "off");
    assert_eq!(calls(), 7);

    // A stream: kept whole at its clean end, then replayed chunk for chunk with its usage.
    let stream = json!({"model": "cached", "stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hi"}]});
    let live = ask(&svc, &acme, &stream, None).await;
    assert_eq!((live.status, live.cache.as_str()), (200, "miss"), "{}", live.text);
    let replay = ask(&svc, &acme, &stream, None).await;
    assert_eq!((replay.status, replay.cache.as_str()), (200, "hit"), "{}", replay.text);
    assert_eq!(calls(), 8);
    let (live, replay) = (events(&live.text), events(&replay.text));
    assert!(live.len() >= 3, "{live:?}");
    assert_eq!(live, replay, "the same chunks, in the same order, with the same usage");
    assert_eq!(replay.last(), Some(&json!("[DONE]")));

    // Hits are metered as hits and cost nothing: the cost is that of the six answers asked
    // upstream (four misses and one skip whole, one stream).
    let mut report = Value::Null;
    for _ in 0..200 {
        report = svc.get("/v1/usage?model=cached", &acme).await.body;
        if report["data"][0]["requests"].as_i64() == Some(9) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let row = &report["data"][0];
    assert_eq!((row["requests"].as_i64(), row["cache_hits"].as_i64()), (Some(9), Some(3)), "{report}");
    // Five whole answers of 7 + 3 tokens and a streamed one of 5 + 2, at 1 and 2 per million.
    assert_eq!(row["cost_nanos"].as_i64(), Some((5 * (7 + 3 * 2) + (5 + 2 * 2)) * 1000), "{report}");
    assert_eq!((row["prompt_tokens"].as_i64(), row["completion_tokens"].as_i64()), (Some(5 * 7 + 5), Some(5 * 3 + 2)));
    svc.stop().await;
}

/// The semantic cache: a conversation in other words (the test upstream's `bag-of-words`
/// embeddings, a test double of a real embedding model) is answered from the cache when the
/// model, tools and parameters are the same and the tenant is; an embedding of the wrong size
/// serves the request without the cache and says so in `/metrics`; the index is saved in the data
/// dir at shutdown and answers again after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_semantic_cache_answers_what_means_the_same_within_a_tenant_and_survives_a_restart() {
    let upstream = TestServer::start().await;
    let mut svc = crate::limits::fronting(&upstream, None).await;
    let (_, acme) = svc.tenant("acme").await;
    let (_, beta) = svc.tenant("beta").await;
    let entry = |embedding: &str| {
        json!({
            "deployments": [{"plugin": "upstream", "model": "m", "input_price": 1, "output_price": 2}],
            "cache": {"ttl_secs": 600, "semantic": {"embedding_model": embedding, "threshold": 0.95}}
        })
    };
    for key in [&acme, &beta] {
        assert_eq!(svc.put("/v1/models/sem", key, entry("bag-of-words")).await.status, 200);
    }
    let r = svc
        .put(
            "/v1/models/bad",
            &acme,
            json!({"deployments": [{"plugin": "upstream"}], "cache": {"ttl_secs": 5, "semantic": {"embedding_model": "e", "threshold": 2}}}),
        )
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.text.contains("cache.semantic.threshold"), "{r:?}");
    let calls = |path: &str| upstream.requests().iter().filter(|s| s.path.ends_with(path)).count();
    let ask_sem = |text: &str| json!({"model": "sem", "messages": [{"role": "user", "content": text}]});

    let first = ask(&svc, &acme, &ask_sem("What is the capital of France?"), None).await;
    assert_eq!((first.status, first.cache.as_str()), (200, "miss"), "{}", first.text);
    assert_eq!((calls("/chat/completions"), calls("/embeddings")), (1, 1));
    let reworded = ask(&svc, &acme, &ask_sem("what is the capital of france"), None).await;
    assert_eq!((reworded.status, reworded.cache.as_str()), (200, "semantic-hit"), "{}", reworded.text);
    assert_eq!((calls("/chat/completions"), calls("/embeddings")), (1, 2), "answered without the model");
    let (a, b): (Value, Value) =
        (serde_json::from_str(&first.text).unwrap(), serde_json::from_str(&reworded.text).unwrap());
    assert_eq!(a["choices"][0]["message"], b["choices"][0]["message"]);
    // The embedding is the gateway's own call: a tenant allowed two requests a minute asks a
    // question and its rewording, and both are answered (the second from the cache).
    let (gamma_id, gamma) = svc.tenant("gamma").await;
    assert_eq!(svc.put("/v1/models/sem", &gamma, entry("bag-of-words")).await.status, 200);
    let limited = svc.put(&format!("/v1/tenants/{gamma_id}/limits"), qlayer_tests::ADMIN, json!({"rpm": 2})).await;
    assert_eq!(limited.status, 200, "{limited:?}");
    assert_eq!(ask(&svc, &gamma, &ask_sem("Who wrote Hamlet?"), None).await.cache, "miss");
    let second = ask(&svc, &gamma, &ask_sem("who wrote hamlet"), None).await;
    assert_eq!((second.status, second.cache.as_str()), (200, "semantic-hit"), "{}", second.text);
    // Another question, other parameters, another tenant: not answered from the cache.
    assert_eq!(ask(&svc, &acme, &ask_sem("How tall is the Eiffel tower?"), None).await.cache, "miss");
    let warm = json!({"model": "sem", "temperature": 0.5, "messages": [{"role": "user", "content": "what is the capital of france"}]});
    assert_eq!(ask(&svc, &acme, &warm, None).await.cache, "miss");
    assert_eq!(ask(&svc, &beta, &ask_sem("what is the capital of france"), None).await.cache, "miss");
    assert_eq!(calls("/chat/completions"), 5);
    // A stream, replayed for a reworded one.
    let stream = |text: &str| json!({"model": "sem", "stream": true, "messages": [{"role": "user", "content": text}]});
    let live = ask(&svc, &acme, &stream("Name three rivers in Spain"), None).await;
    assert_eq!(live.cache, "miss");
    let replay = ask(&svc, &acme, &stream("name three rivers in spain!"), None).await;
    assert_eq!(replay.cache, "semantic-hit");
    assert_eq!(events(&live.text), events(&replay.text));
    assert_eq!(calls("/chat/completions"), 6);

    // The embedding model starts answering another size: served without the cache, and said.
    assert_eq!(
        svc.put("/v1/models/shifting", &acme, json!({"deployments": [{"plugin": "upstream", "model": "dims-3"}]}))
            .await
            .status,
        200
    );
    assert_eq!(svc.put("/v1/models/sem2", &acme, entry("shifting")).await.status, 200);
    let q = json!({"model": "sem2", "messages": [{"role": "user", "content": "hello"}]});
    assert_eq!(ask(&svc, &acme, &q, None).await.cache, "miss");
    assert_eq!(
        svc.put("/v1/models/shifting", &acme, json!({"deployments": [{"plugin": "upstream", "model": "dims-5"}]}))
            .await
            .status,
        200
    );
    // Reworded, so that the exact cache (asked first) does not answer it.
    let q = json!({"model": "sem2", "messages": [{"role": "user", "content": "Hello!"}]});
    let degraded = ask(&svc, &acme, &q, None).await;
    assert_eq!((degraded.status, degraded.cache.as_str()), (200, "miss"), "{}", degraded.text);
    let metrics = svc.get("/metrics", qlayer_tests::ADMIN).await.text;
    assert!(metrics.contains("qlayer_gateway_semantic_cache_errors_total{reason=\"vector\"}"), "{metrics}");

    // Hits are metered as hits; the embeddings are metered as requests of their own.
    let mut report = Value::Null;
    for _ in 0..200 {
        report = svc.get("/v1/usage?group_by=model", &acme).await.body;
        let rows = report["data"].as_array().unwrap();
        if rows.iter().map(|r| r["requests"].as_i64().unwrap()).sum::<i64>() >= 15 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let row = |name: &str| report["data"].as_array().unwrap().iter().find(|r| r["group"] == name).cloned().unwrap();
    assert_eq!((row("sem")["requests"].as_i64(), row("sem")["cache_hits"].as_i64()), (Some(6), Some(2)), "{report}");
    assert_eq!(row("bag-of-words")["requests"], 6, "{report}");

    // Saved at shutdown, and read back by the next run on the same data dir.
    let dir = svc._dir.path().to_path_buf();
    let before = calls("/chat/completions");
    svc.running.take().unwrap().stop().await.unwrap();
    assert!(dir.join("semantic-cache.json").exists());
    let mut config = qlayer_api::serve::ServeConfig::default();
    config.server.rest_addr = "127.0.0.1:0".parse().unwrap();
    config.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
    config.network.allow = vec!["127.0.0.1".into()];
    config.gateway.upstream = Some(format!("{}/v1", upstream.url()));
    let again = qlayer_api::serve::start(config, dir).await.unwrap();
    svc.base = format!("http://{}", again.rest_addr);
    svc.running = Some(again);
    let after = ask(&svc, &acme, &ask_sem("What is the capital of France"), None).await;
    assert_eq!((after.status, after.cache.as_str()), (200, "semantic-hit"), "{}", after.text);
    assert_eq!(calls("/chat/completions"), before, "answered after the restart without the model");
    svc.stop().await;
}

/// The semantic cache on a real Qdrant (`../shared/bin/qdrant`, started on free ports): two
/// nodes sharing it answer each other's reworded questions, never across tenants; when Qdrant
/// goes down, requests are still answered (without the cache) and `/metrics` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_semantic_cache_on_qdrant_is_shared_by_nodes_and_qdrant_down_only_loses_the_cache() {
    let Some(mut qdrant) = qlayer_tests::TestQdrant::start() else { return };
    let upstream = TestServer::start().await;
    let (db, _pg) = qlayer_tests::fresh_postgres().await;
    let node = |db: String| {
        let (upstream, qdrant) = (format!("{}/v1", upstream.url()), qdrant.url.clone());
        crate::api::service(qlayer_db::Backend::Sqlite, false, move |c| {
            c.network.allow = vec!["127.0.0.1".into()];
            c.gateway.upstream = Some(upstream);
            c.database.url = Some(db);
            c.cache.qdrant = Some(qdrant);
        })
    };
    let a = node(db.clone()).await;
    let b = node(db).await;
    let (_, acme) = a.tenant("acme").await;
    let (_, beta) = a.tenant("beta").await;
    let entry = json!({
        "deployments": [{"plugin": "upstream", "model": "m"}],
        "cache": {"ttl_secs": 600, "semantic": {"embedding_model": "bag-of-words", "threshold": 0.95}}
    });
    for key in [&acme, &beta] {
        assert_eq!(a.put("/v1/models/sem", key, entry.clone()).await.status, 200);
    }
    let calls = || upstream.requests().iter().filter(|s| s.path.ends_with("/chat/completions")).count();
    let q = |text: &str| json!({"model": "sem", "messages": [{"role": "user", "content": text}]});

    assert_eq!(ask(&a, &acme, &q("Which planet is the largest?"), None).await.cache, "miss");
    // Kept off the request's path: wait until node b finds it (asking with no-store, so that
    // an early miss is not kept in node b's own exact cache).
    let mut found = String::new();
    // Up to 30 s: under load (a CI build beside it) 5 s was seen to be too short.
    for _ in 0..600 {
        found = ask(&b, &acme, &q("which planet is the largest"), Some("no-store")).await.cache;
        if found == "semantic-hit" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(found, "semantic-hit", "node b answers from what node a kept");
    let before = calls();
    assert_eq!(ask(&b, &beta, &q("which planet is the largest"), None).await.cache, "miss", "another tenant");
    assert_eq!(calls(), before + 1);

    // Qdrant goes down: answered all the same, without the cache, and said.
    qdrant.stop();
    let down = ask(&a, &acme, &q("which planet is the largest!"), None).await;
    assert_eq!((down.status, down.cache.as_str()), (200, "miss"), "{}", down.text);
    let metrics = a.get("/metrics", qlayer_tests::ADMIN).await.text;
    assert!(metrics.contains("qlayer_gateway_semantic_cache_errors_total{reason=\"store\"}"), "{metrics}");
    a.stop().await;
    b.stop().await;
}
