//! Publishing a run's capsule over the REST API (`POST /v1/runs/{id}/publish`) to a real registry
//! (Debian's `docker-registry`): only under the repositories the operator lets the tenant publish
//! to, signed with the service's key, and read back with the registry client as the same bytes
//! `GET /v1/runs/{id}/capsule` serves. The model is the `scripted` provider (a test double).

use crate::api::service;
use qlayer_db::Backend;
use qlayer_registry::{PrivateKey, PublicKey, Registry, RegistryConfig, Verification, parse_reference};
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_published_as_a_signed_oci_artifact_only_where_the_operator_allows() {
    let keys = tempfile::tempdir().unwrap();
    let key = PrivateKey::generate();
    let key_path = keys.path().join("service.key");
    std::fs::write(&key_path, key.to_pem().unwrap()).unwrap();
    let svc = service(Backend::Sqlite, true, |c| {
        c.capsules.publish_to = vec!["{registry}/capsules/{tenant}".into()];
        c.capsules.signing_key = Some(key_path.clone());
    })
    .await;
    let registry = svc.registry.as_ref().unwrap().addr.clone();
    let (_, acme) = svc.tenant("acme").await;
    let (_, viewer) = svc.key(&acme, "viewer").await;
    let (_, other) = svc.tenant("other").await;
    let pipeline = json!({"steps": [
        {"name": "pm", "role": "product-manager"},
        {"name": "dev", "role": "developer", "after": ["pm"], "validators": ["syntax"]},
    ]});
    let r = svc.post("/v1/runs", &acme, json!({"requirement": "a todo list CLI", "pipeline": pipeline})).await;
    assert_eq!(r.status, 201, "{r:?}");
    let run = r.body["id"].as_str().unwrap().to_string();
    let publish = format!("/v1/runs/{run}/publish");
    let reference = format!("{registry}/capsules/acme/todo:1");

    for _ in 0..2400 {
        let r = svc.get(&format!("/v1/runs/{run}"), &acme).await;
        if r.body["status"] != "running" && r.body["status"] != "queued" {
            assert_eq!(r.body["status"], "succeeded", "{r:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Refused: a viewer, another tenant (404, as if the run did not exist), another tenant's
    // repository and another registry (403, naming where it may), a digest, an unknown field.
    let r = svc.post(&publish, &viewer, json!({"reference": reference})).await;
    assert_eq!((r.status, r.code()), (403, "forbidden"), "{r:?}");
    let r = svc.post(&publish, &other, json!({"reference": format!("{registry}/capsules/other/todo:1")})).await;
    assert_eq!(r.status, 404, "{r:?}");
    let r = svc.post(&publish, &acme, json!({"reference": format!("{registry}/capsules/other/todo:1")})).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.text.contains(&format!("{registry}/capsules/acme/")), "{r:?}");
    let r = svc.post(&publish, &acme, json!({"reference": format!("{registry}/capsules/acme-evil/todo:1")})).await;
    assert_eq!(r.status, 403, "a prefix ends at a path boundary: {r:?}");
    let r = svc.post(&publish, &acme, json!({"reference": "127.0.0.1:9/capsules/acme/todo:1"})).await;
    assert_eq!(r.status, 403, "{r:?}");
    let digest_ref = format!("{registry}/capsules/acme/todo@sha256:{}", "a".repeat(64));
    let r = svc.post(&publish, &acme, json!({"reference": digest_ref})).await;
    assert_eq!(r.status, 400, "{r:?}");
    let r = svc.post(&publish, &acme, json!({"reference": reference, "sign": true})).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.text.contains("unknown field `sign`"), "{r:?}");
    let r = svc.post("/v1/runs/job_missing/publish", &acme, json!({"reference": reference})).await;
    assert_eq!(r.status, 404, "{r:?}");

    // Published, signed.
    let r = svc.post(&publish, &acme, json!({"reference": reference})).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!((r.body["reference"].as_str(), r.body["signed"].as_bool()), (Some(reference.as_str()), Some(true)));
    let digest = r.body["digest"].as_str().unwrap().to_string();

    // Read back: the files are the bytes the API serves; the config is the report in them; the
    // signature verifies with the service's public key.
    let client = Registry::new(RegistryConfig { insecure: vec![registry.clone()], ..Default::default() });
    let pulled = client.pull_capsule(&parse_reference(&reference).unwrap()).await.unwrap();
    assert_eq!(pulled.digest, digest);
    let served = svc.http.get(format!("{}/v1/runs/{run}/capsule", svc.base)).bearer_auth(&acme).send().await.unwrap();
    assert_eq!(pulled.files, served.bytes().await.unwrap().to_vec());
    let report: serde_json::Value = serde_json::from_slice(&pulled.report).unwrap();
    assert_eq!(report["status"], "passed", "{report}");
    assert!(report["steps"].as_array().unwrap().iter().all(|s| s["digest"].as_str().unwrap().starts_with("sha256:")));
    assert_eq!(pulled.annotations["org.opencontainers.image.title"], run);
    let public = PublicKey::from_pem(&key.public().to_pem().unwrap(), "service").unwrap();
    assert_eq!(
        client.verify_capsule(&pulled, &[public]).await.unwrap(),
        Verification::Verified { key: "service".into() }
    );
    // Pinned by digest, the same artifact.
    let pinned = format!("{registry}/capsules/acme/todo@{digest}");
    assert_eq!(client.pull_capsule(&parse_reference(&pinned).unwrap()).await.unwrap().files, pulled.files);
}
