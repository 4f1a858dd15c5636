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
