//! Issue 19 items 1-3: `deploy/` against the product. The container image is built from the
//! binary with Debian's buildah (`FROM scratch`, the binary and the libraries it links), run (its
//! version, the main job, `qlayer serve` answering /readyz) and pushed to the test registry. The
//! compose file and every Kubernetes overlay (rendered with `kubectl kustomize`, validated with
//! `kubernetes-validate`) are checked against what the product reads: `qlayer serve` is started
//! with exactly their configuration (hosts pointed at this machine's test services), and their
//! health checks and probes are asked of it.

use qlayer_tests::{ADMIN, TestRegistry, ensure_program, free_port, fresh_postgres};
use serde_json::{Map, Value, json};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn client() -> reqwest::Client {
    qlayer_registry::install_tls_provider();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// YAML as JSON, with merge keys (`<<: *anchor`) applied, as compose applies them.
fn json_of(yaml: &yaml_rust2::Yaml) -> Value {
    use yaml_rust2::Yaml;
    match yaml {
        Yaml::Hash(h) => {
            let mut map = Map::new();
            if let Some(Value::Object(merged)) = h.get(&Yaml::String("<<".into())).map(json_of) {
                map.extend(merged);
            }
            for (k, v) in h.iter().filter(|(k, _)| k.as_str() != Some("<<")) {
                let key = match k {
                    Yaml::String(s) | Yaml::Real(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => panic!("a key that is not a scalar: {other:?}"),
                };
                map.insert(key, json_of(v));
            }
            Value::Object(map)
        }
        Yaml::Array(a) => Value::Array(a.iter().map(json_of).collect()),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Real(r) => json!(r.parse::<f64>().unwrap()),
        Yaml::Integer(i) => json!(i),
        Yaml::Boolean(b) => json!(b),
        Yaml::Null => Value::Null,
        other => panic!("YAML that does not read as data: {other:?}"),
    }
}

fn yaml_docs(text: &str) -> Vec<Value> {
    yaml_rust2::YamlLoader::load_from_str(text)
        .unwrap_or_else(|e| panic!("not YAML: {e}"))
        .iter()
        .map(json_of)
        .collect()
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v}"))
}

/// `qlayer serve` started the way a deployment starts it: `config` as its `QLAYER_CONFIG`,
/// `marketplace` as `<data dir>/marketplace.toml`, `env` as its environment (and nothing else of
/// ours), on free loopback ports. Returns the child, its REST base URL and the data dir.
async fn serve_as_deployed(
    config: &str,
    marketplace: &str,
    env: &[(String, String)],
) -> (Running, String, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    let config_path = data.path().join("qlayer.toml");
    std::fs::write(&config_path, config).unwrap();
    std::fs::write(data.path().join("marketplace.toml"), marketplace).unwrap();
    let rest = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_qlayer"));
    command.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    if let Some(cache) = std::env::var_os("QLAYER_CACHE_DIR") {
        command.env("QLAYER_CACHE_DIR", cache);
    }
    for (k, v) in env {
        command.env(k, v);
    }
    // The deployment's own addresses are in its config; the test moves them to free ports.
    let child = command
        .env("QLAYER_CONFIG", &config_path)
        .env("QLAYER_DATA_DIR", data.path())
        .args([
            "serve",
            "--rest-addr",
            &format!("127.0.0.1:{rest}"),
            "--grpc-addr",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (Running(child), format!("http://127.0.0.1:{rest}"), data)
}

/// Waits until `url` answers 200 (what `qlayer probe` asks), or panics with the server's stderr.
async fn until_ready(child: &mut Running, url: &str) {
    let child = &mut child.0;
    let http = client();
    for _ in 0..1200 {
        if let Ok(r) = http.get(url).send().await
            && r.status() == 200
        {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("qlayer serve exited ({status}) before {url} answered 200:\n{err}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} did not answer 200");
}

/// A child process killed when dropped, so that a failing assertion leaves nothing running; with
/// its whole process group when it leads one (buildah's `run` leaves the container's process
/// running when only buildah is killed).
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.0.id())]).stderr(Stdio::null()).status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stop(child: Running) {
    drop(child);
}

/// The product's environment variables that a deployment may set: each must be documented in the
/// README, which names what `qlayer serve` reads.
fn documented(var: &str) -> bool {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    readme.contains(&format!("`{var}`")) || readme.contains(&format!("{var}=")) || readme.contains(&format!("in {var}"))
}

/// Issue 19 item 2: the compose stack parses, every service has a health check, every named
/// volume and config it uses is declared (and every declared one used), each qlayer node's
/// environment names only variables the product reads, its ports are the ones its config
/// serves on, and `qlayer serve` started with exactly its config, marketplace settings and
/// environment (PostgreSQL, NATS JetStream, the registry and Qdrant being this machine's test
/// instances) is ready, answers its health check command and takes the admin key. NATS starts
/// with the stack's `nats.conf`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_stack_is_the_products_own_configuration() {
    let compose = &yaml_docs(&std::fs::read_to_string(root().join("deploy/compose.yaml")).unwrap())[0];
    let services = compose["services"].as_object().unwrap();
    let declared_volumes: Vec<&String> = compose["volumes"].as_object().unwrap().keys().collect();
    let configs = compose["configs"].as_object().unwrap();
    let mut used_volumes = Vec::new();
    for (name, service) in services {
        assert!(service["healthcheck"]["test"].is_array(), "service `{name}` has no health check");
        assert!(service["image"].is_string(), "service `{name}` names no image");
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let source = str_of(volume).split(':').next().unwrap();
            assert!(declared_volumes.iter().any(|v| *v == source), "`{name}` mounts undeclared volume `{source}`");
            used_volumes.push(source.to_string());
        }
        for config in service["configs"].as_array().into_iter().flatten() {
            let source = str_of(&config["source"]);
            assert!(configs.contains_key(source), "`{name}` uses undeclared config `{source}`");
        }
    }
    for v in &declared_volumes {
        assert!(used_volumes.contains(v), "volume `{v}` is declared and used by no service");
    }
    for needed in ["postgres", "nats", "registry", "qdrant"] {
        assert!(services.contains_key(needed), "the scale stack has no `{needed}`");
    }
    let nodes: Vec<(&String, &Value)> =
        services.iter().filter(|(_, s)| s["image"].as_str().is_some_and(|i| i.starts_with("qlayer"))).collect();
    assert!(nodes.len() >= 2, "the scale stack runs two or more qlayer nodes");
    let qlayer_toml = str_of(&configs["qlayer-toml"]["content"]);
    let config: toml::Table = toml::from_str(qlayer_toml).unwrap();
    let port_of = |key: &str| config["server"][key].as_str().unwrap().rsplit(':').next().unwrap().to_string();
    let (rest_port, grpc_port) = (port_of("rest-addr"), port_of("grpc-addr"));
    for (name, node) in &nodes {
        let env = node["environment"].as_object().unwrap();
        for var in env.keys() {
            assert!(
                var.starts_with("QLAYER_") && documented(var),
                "`{name}` sets {var}, which the README does not document"
            );
        }
        let published: Vec<&str> =
            node["ports"].as_array().unwrap().iter().map(|p| str_of(p).rsplit(':').next().unwrap()).collect();
        assert_eq!(
            published,
            [rest_port.as_str(), grpc_port.as_str()],
            "`{name}` publishes the ports its config serves"
        );
        let data_mount = node["volumes"].as_array().unwrap().iter().map(str_of).find(|v| v.ends_with(":/data"));
        assert!(data_mount.is_some(), "`{name}` keeps its data dir (/data) on a volume");
        assert_eq!(env["QLAYER_DATA_DIR"], "/data");
        let targets: Vec<&str> = node["configs"].as_array().unwrap().iter().map(|c| str_of(&c["target"])).collect();
        assert!(targets.contains(&str_of(&env["QLAYER_CONFIG"])), "`{name}`'s QLAYER_CONFIG is one of its configs");
        assert!(targets.contains(&"/data/marketplace.toml"), "`{name}` gets the marketplace settings");
        let depends: Vec<&String> = node["depends_on"].as_object().unwrap().keys().collect();
        for needed in ["postgres", "nats", "registry", "qdrant"] {
            assert!(depends.iter().any(|d| *d == needed), "`{name}` starts after `{needed}`");
            assert_eq!(node["depends_on"][needed]["condition"], "service_healthy");
        }
    }
    // NATS: the stack's configuration, fsync on every write.
    let nats_conf = str_of(&configs["nats-conf"]["content"]);
    let jetstream = nats_conf.split("jetstream").nth(1).expect("nats.conf configures JetStream");
    assert!(jetstream.lines().any(|l| l.trim() == "sync_interval: always"), "{nats_conf}");
    let nats_port = free_port();
    let nats_http = free_port();
    let store = tempfile::tempdir().unwrap();
    let nats_server = ensure_program("nats-server", "nats-server");
    let version = Command::new(&nats_server).arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&version.stdout).to_string();
    let mut local_conf = nats_conf
        .replace("port: 4222", &format!("port: {nats_port}\nhost: 127.0.0.1"))
        .replace("http_port: 8222", &format!("http_port: {nats_http}"))
        .replace("store_dir: /data", &format!("store_dir: {}", store.path().display()));
    // Debian's nats-server (2.9) predates `sync_interval` (2.10, the stack's image): it reads
    // everything else of the file.
    if version.contains("v2.9.") {
        local_conf = local_conf.lines().filter(|l| !l.contains("sync_interval")).collect::<Vec<_>>().join("\n");
    }
    let conf_path = store.path().join("nats.conf");
    std::fs::write(&conf_path, &local_conf).unwrap();
    let nats =
        Running(Command::new(&nats_server).arg("--config").arg(&conf_path).stderr(Stdio::null()).spawn().unwrap());
    // Its health check, as the stack asks it.
    let test = services["nats"]["healthcheck"]["test"].as_array().unwrap();
    let health = test.iter().map(str_of).find(|a| a.starts_with("http://")).expect("an HTTP health check");
    let health = health.replace("8222", &nats_http.to_string());
    let http = client();
    let mut nats_ready = false;
    for _ in 0..200 {
        if http.get(&health).send().await.is_ok_and(|r| r.status() == 200) {
            nats_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(nats_ready, "nats-server with the stack's nats.conf did not pass its health check ({version})");
    // A qlayer node with the stack's configuration.
    let registry = TestRegistry::start();
    let qdrant = qlayer_tests::TestQdrant::start();
    let (pg, _pg) = fresh_postgres().await;
    let mut qlayer_toml = qlayer_toml.replace("registry:5000", &registry.addr);
    match &qdrant {
        Some(q) => qlayer_toml = qlayer_toml.replace("http://qdrant:6334", &q.url),
        None => qlayer_toml = qlayer_toml.replace("qdrant = \"http://qdrant:6334\"", ""),
    }
    let marketplace = str_of(&configs["marketplace-toml"]["content"]).replace("registry:5000", &registry.addr);
    let node = nodes[0].1;
    let env: Vec<(String, String)> = node["environment"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "QLAYER_CONFIG" | "QLAYER_DATA_DIR"))
        .map(|(k, v)| {
            let value = match k.as_str() {
                "QLAYER_DATABASE_URL" => pg.clone(),
                "QLAYER_QUEUE" => format!("nats://127.0.0.1:{nats_port}"),
                "QLAYER_ADMIN_KEY" => ADMIN.to_string(),
                _ => str_of(v).to_string(),
            };
            (k.clone(), value)
        })
        .collect();
    let (mut child, base, _data) = serve_as_deployed(&qlayer_toml, &marketplace, &env).await;
    until_ready(&mut child, &format!("{base}/readyz")).await;
    // The node's health check command, against this node.
    let check: Vec<String> = node["healthcheck"]["test"].as_array().unwrap()[1..]
        .iter()
        .map(|a| str_of(a).replace("127.0.0.1:8080", base.trim_start_matches("http://")))
        .collect();
    assert!(check[0].ends_with("/qlayer"), "{check:?}");
    let probed = Command::new(env!("CARGO_BIN_EXE_qlayer")).args(&check[1..]).output().unwrap();
    assert!(probed.status.success(), "{check:?}: {}", String::from_utf8_lossy(&probed.stderr));
    let created =
        http.post(format!("{base}/v1/tenants")).bearer_auth(ADMIN).json(&json!({"name": "acme"})).send().await.unwrap();
    assert_eq!(created.status(), 201, "the stack's admin key is the operator's");
    stop(child);
    stop(nats);
}

/// Renders an overlay with `kubectl kustomize` (the overlays keep to what kustomize v2, in
/// Debian's kubectl 1.20, reads as well as v5).
fn render(overlay: &str) -> String {
    let kubectl = ensure_program("kubectl", "kubernetes-client");
    let dir = root().join("deploy/kubernetes/overlays").join(overlay);
    let out = Command::new(kubectl).arg("kustomize").arg(&dir).output().unwrap();
    assert!(out.status.success(), "kubectl kustomize {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `kubernetes-validate --strict` on `manifests`: Ok, or its report.
fn validate(manifests: &str) -> Result<String, String> {
    let validator = qlayer_tests::python_tool("kubernetes-validate", &["kubernetes-validate==1.37.0"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, manifests).unwrap();
    let out = Command::new(validator).args(["--strict", "--kubernetes-version", "1.33"]).arg(&file).output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() { Ok(report) } else { Err(report) }
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(docs, kind);
    assert_eq!(found.len(), 1, "one {kind} expected");
    found[0]
}

/// Issue 19 item 3: each overlay renders, passes the Kubernetes schemas (strict: no unknown
/// field), runs non-root on a read-only root filesystem without privilege escalation, with
/// resources, probes on /readyz and /healthz of the port its config serves, the admin key from a
/// Secret, a Service and a ServiceMonitor that find the pods; the embedded overlay is one
/// replica on a PersistentVolumeClaim (its autoscaler held at one, its disruption budget
/// blocking nothing), the scale overlay N replicas on PostgreSQL and NATS with a disruption
/// budget and an autoscaler. `qlayer serve` started with each overlay's ConfigMap and
/// environment answers both probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_overlays_render_validate_and_configure_the_product() {
    let nats = qlayer_tests::TestNats::start();
    let (pg, _pg) = fresh_postgres().await;
    for overlay in ["embedded", "scale"] {
        let rendered = render(overlay);
        let report = validate(&rendered).unwrap_or_else(|e| panic!("{overlay}: the schemas refuse it:\n{e}"));
        assert!(!report.contains("ERROR"), "{report}");
        let docs = yaml_docs(&rendered);
        let deployment = one(&docs, "Deployment");
        let pod = &deployment["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{overlay}");
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true, "{overlay}");
        assert_eq!(container["securityContext"]["allowPrivilegeEscalation"], false, "{overlay}");
        assert_eq!(container["securityContext"]["capabilities"]["drop"], json!(["ALL"]), "{overlay}");
        for r in ["requests", "limits"] {
            assert!(container["resources"][r]["memory"].is_string(), "{overlay}: resources.{r}");
        }
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz", "{overlay}");
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz", "{overlay}");
        // The probes' port is the one the ConfigMap's qlayer.toml serves REST on.
        let config_map = one(&docs, "ConfigMap");
        let qlayer_toml = str_of(&config_map["data"]["qlayer.toml"]);
        let config: toml::Table = toml::from_str(qlayer_toml).unwrap();
        let rest_port: i64 =
            config["server"]["rest-addr"].as_str().unwrap().rsplit(':').next().unwrap().parse().unwrap();
        let port_named = |name: &str| {
            container["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .map(|p| p["containerPort"].clone())
        };
        let probe_port = str_of(&container["readinessProbe"]["httpGet"]["port"]);
        assert_eq!(port_named(probe_port), Some(json!(rest_port)), "{overlay}: the probes ask the REST port");
        // The config is mounted where QLAYER_CONFIG says, the marketplace settings in the data dir.
        let env: Vec<&Value> = container["env"].as_array().unwrap().iter().collect();
        let value_of = |name: &str| env.iter().find(|e| e["name"] == name).map(|e| e["value"].clone());
        let mounts = container["volumeMounts"].as_array().unwrap();
        let mounted = |path: &str| mounts.iter().any(|m| m["mountPath"] == path);
        assert!(mounted(str_of(&value_of("QLAYER_CONFIG").unwrap())), "{overlay}");
        let data_dir = value_of("QLAYER_DATA_DIR").unwrap();
        assert!(mounted(str_of(&data_dir)) && mounted(&format!("{}/marketplace.toml", str_of(&data_dir))), "{overlay}");
        for e in &env {
            let name = str_of(&e["name"]);
            assert!(documented(name), "{overlay}: {name} is not documented in the README");
        }
        let admin = env.iter().find(|e| e["name"] == "QLAYER_ADMIN_KEY").unwrap();
        let secret_name = str_of(&admin["valueFrom"]["secretKeyRef"]["name"]);
        let secret = of_kind(&docs, "Secret").into_iter().find(|s| s["metadata"]["name"] == secret_name);
        assert!(
            secret.is_some_and(|s| s["stringData"].get(str_of(&admin["valueFrom"]["secretKeyRef"]["key"])).is_some())
        );
        // The Service selects the pods and targets their named ports; the ServiceMonitor finds
        // the Service and scrapes /metrics with the admin key.
        let service = one(&docs, "Service");
        let labels = deployment["spec"]["template"]["metadata"]["labels"].as_object().unwrap();
        for (k, v) in service["spec"]["selector"].as_object().unwrap() {
            assert_eq!(labels.get(k), Some(v), "{overlay}: the Service selects the pods");
        }
        for port in service["spec"]["ports"].as_array().unwrap() {
            assert!(port_named(str_of(&port["targetPort"])).is_some(), "{overlay}: {port}");
        }
        let monitor = one(&docs, "ServiceMonitor");
        for (k, v) in monitor["spec"]["selector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(
                service["metadata"]["labels"].get(k),
                Some(v),
                "{overlay}: the ServiceMonitor finds the Service"
            );
        }
        let endpoint = &monitor["spec"]["endpoints"][0];
        assert!(service["spec"]["ports"].as_array().unwrap().iter().any(|p| p["name"] == endpoint["port"]));
        assert_eq!(
            (endpoint["path"].as_str(), endpoint["authorization"]["credentials"]["name"].as_str()),
            (Some("/metrics"), Some(secret_name))
        );
        let replicas = deployment["spec"]["replicas"].as_i64().unwrap();
        let mut serve_env: Vec<(String, String)> = vec![("QLAYER_ADMIN_KEY".into(), ADMIN.into())];
        match overlay {
            "embedded" => {
                assert_eq!(replicas, 1);
                assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
                let claim = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "data").unwrap();
                let claim = str_of(&claim["persistentVolumeClaim"]["claimName"]);
                assert!(of_kind(&docs, "PersistentVolumeClaim").iter().any(|c| c["metadata"]["name"] == claim));
                // One writer of one SQLite file: never scaled out, and no drain is blocked.
                assert_eq!(one(&docs, "HorizontalPodAutoscaler")["spec"]["maxReplicas"], 1);
                assert_eq!(one(&docs, "PodDisruptionBudget")["spec"]["minAvailable"], 0);
                assert!(value_of("QLAYER_DATABASE_URL").is_none(), "SQLite in the data dir");
            }
            _ => {
                assert!(replicas >= 2, "{overlay}: {replicas}");
                assert!(one(&docs, "HorizontalPodAutoscaler")["spec"]["minReplicas"].as_i64().unwrap() >= 2);
                assert_eq!(one(&docs, "PodDisruptionBudget")["spec"]["minAvailable"], 1);
                let database = env.iter().find(|e| e["name"] == "QLAYER_DATABASE_URL").unwrap();
                assert!(database["valueFrom"]["secretKeyRef"]["name"].is_string(), "the database URL is a secret");
                assert!(str_of(&value_of("QLAYER_QUEUE").unwrap()).starts_with("nats://"));
                serve_env.push(("QLAYER_DATABASE_URL".into(), pg.clone()));
                serve_env.push(("QLAYER_QUEUE".into(), nats.url.clone()));
            }
        }
        for e in env.iter().filter(|e| e["value"].is_string()) {
            let name = str_of(&e["name"]);
            if !matches!(name, "QLAYER_CONFIG" | "QLAYER_DATA_DIR" | "QLAYER_QUEUE") {
                serve_env.push((name.to_string(), str_of(&e["value"]).to_string()));
            }
        }
        let marketplace = str_of(&config_map["data"]["marketplace.toml"]);
        let (mut child, base, _data) = serve_as_deployed(qlayer_toml, marketplace, &serve_env).await;
        until_ready(&mut child, &format!("{base}/readyz")).await;
        let http = client();
        let live = http.get(format!("{base}{}", str_of(&container["livenessProbe"]["httpGet"]["path"]))).send().await;
        assert_eq!(live.unwrap().status(), 200, "{overlay}: the liveness probe's path");
        stop(child);
    }
    // The schema check can fail: a misspelt field is refused.
    let broken = render("embedded").replacen("readinessProbe:", "readinessProbes:", 1);
    let refused = validate(&broken).expect_err("a misspelt field passed the schemas");
    assert!(refused.contains("readinessProbes"), "{refused}");
}

/// The libraries `binary` links (`ldd`), with the dynamic loader.
fn linked_libraries(binary: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(binary).output().unwrap();
    assert!(out.status.success(), "ldd {}", binary.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let path = match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

struct Buildah {
    program: PathBuf,
    storage: tempfile::TempDir,
}

impl Buildah {
    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.arg("--storage-driver")
            .arg("vfs")
            .arg("--root")
            .arg(self.storage.path().join("root"))
            .arg("--runroot")
            .arg(self.storage.path().join("runroot"));
        c
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.command().args(args).output().unwrap();
        assert!(out.status.success(), "buildah {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

/// Issue 19 item 1: the runtime image, built with buildah from the binary (`FROM scratch`, the
/// binary, the libraries it links and the CA certificates, a non-root user, /data a volume, the HEALTHCHECK the
/// Dockerfile gives), runs `qlayer --version`, the main job on the embedded default, and `qlayer
/// serve` answering /readyz on a loopback port; then it is pushed to the test registry. It
/// prints the image's size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_image_is_built_run_and_pushed() {
    let buildah = Buildah { program: ensure_program("buildah", "buildah"), storage: tempfile::tempdir().unwrap() };
    // QLAYER_IMAGE_BINARY measures the image of another build (the release binary, for
    // docs/PERFORMANCE.md); by default the test's own binary.
    let binary = std::env::var_os("QLAYER_IMAGE_BINARY")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_qlayer")), PathBuf::from);
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let healthcheck = dockerfile
        .lines()
        .skip_while(|l| !l.starts_with("HEALTHCHECK"))
        .nth(1)
        .and_then(|l| l.trim().strip_prefix("CMD "))
        .expect("the Dockerfile has a HEALTHCHECK with a CMD");
    let user = dockerfile.lines().find_map(|l| l.strip_prefix("USER ")).expect("the Dockerfile names a USER").trim();
    assert!(!user.starts_with('0') && user != "root", "the image runs as a non-root user");
    // As the Dockerfile's build stage: the line tables stay out of the image.
    let stripped_dir = tempfile::tempdir().unwrap();
    let stripped = stripped_dir.path().join("qlayer");
    let strip = std::process::Command::new("strip").arg("--strip-debug").arg("-o").arg(&stripped).arg(&binary).status();
    assert!(matches!(strip, Ok(s) if s.success()), "strip (binutils) --strip-debug: {strip:?}");
    let ctr = buildah.run(&["from", "scratch"]);
    buildah.run(&["copy", &ctr, stripped.to_str().unwrap(), "/usr/local/bin/qlayer"]);
    for lib in linked_libraries(&binary) {
        buildah.run(&["copy", &ctr, lib.to_str().unwrap(), lib.to_str().unwrap()]);
    }
    // CA certificates, as distroless ships them: the registry client loads the system's.
    let cas = "/etc/ssl/certs/ca-certificates.crt";
    buildah.run(&["copy", &ctr, cas, cas]);
    // The data dir, owned by the user, and /tmp for everyone (nothing in a scratch image makes
    // them): each copied as a folder's contents into /, so the folder itself keeps its mode.
    let skeleton = tempfile::tempdir().unwrap();
    let (data_parent, tmp_parent) = (skeleton.path().join("d"), skeleton.path().join("t"));
    std::fs::create_dir_all(data_parent.join("data")).unwrap();
    std::fs::create_dir_all(tmp_parent.join("tmp")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp_parent.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    buildah.run(&["copy", "--chown", user, &ctr, &format!("{}/", data_parent.display()), "/"]);
    buildah.run(&["copy", &ctr, &format!("{}/", tmp_parent.display()), "/"]);
    let env_lines: Vec<&str> = dockerfile
        .lines()
        .skip_while(|l| !l.starts_with("ENV "))
        .take_while(|l| l.starts_with("ENV ") || l.starts_with("    "))
        .map(|l| l.trim_start_matches("ENV ").trim().trim_end_matches('\\').trim())
        .collect();
    let mut config = vec!["config".to_string(), "--user".into(), user.into(), "--volume".into(), "/data".into()];
    for env in &env_lines {
        config.extend(["--env".to_string(), env.to_string()]);
    }
    config.extend(["--port".into(), "8080".into(), "--port".into(), "50051".into()]);
    config.extend([
        "--healthcheck".into(),
        // buildah takes the check as `CMD program args…`; the Dockerfile gives it in exec form.
        format!("CMD {}", serde_json::from_str::<Vec<String>>(healthcheck).expect("exec form").join(" ")),
        "--healthcheck-interval".into(),
        "10s".into(),
    ]);
    config.extend(["--entrypoint".into(), r#"["/usr/local/bin/qlayer"]"#.into(), "--cmd".into(), "serve".into()]);
    config.push(ctr.clone());
    buildah.run(&config.iter().map(String::as_str).collect::<Vec<_>>());
    buildah.run(&["commit", "--format", "docker", &ctr, "qlayer:test"]);
    let inspect: Value = serde_json::from_str(&buildah.run(&["inspect", "--type", "image", "qlayer:test"])).unwrap();
    let docker = &inspect["Docker"]["config"];
    assert_eq!(docker["User"], user);
    assert!(docker["Healthcheck"]["Test"].to_string().contains("/readyz"), "{docker}");
    assert!(docker["Volumes"].get("/data").is_some(), "{docker}");
    // Run it: a container of the image, as its user, in a chroot on the host's network.
    let run_ctr = buildah.run(&["from", "qlayer:test"]);
    let in_container = |args: &[&str]| {
        let mut c = buildah.command();
        // The container compiles the plugins into its own data dir: the checkout's compile
        // cache is owner-only (root's), which the image's user may not read.
        c.args(["run", "--isolation", "chroot", "--user", user]).arg(&run_ctr).arg("--").args(args);
        c
    };
    let version = in_container(&["/usr/local/bin/qlayer", "--version"]).output().unwrap();
    assert!(version.status.success(), "{}", String::from_utf8_lossy(&version.stderr));
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("qlayer "), "{version:?}");
    let job = in_container(&["/usr/local/bin/qlayer", "run", "a todo list CLI with due dates", "--out", "/tmp/app"])
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&job.stdout), String::from_utf8_lossy(&job.stderr));
    assert!(job.status.success(), "the main job in the container: {said}");
    assert!(said.contains("passed"), "{said}");
    let port = free_port();
    let started = std::time::Instant::now();
    let mut serving = Running(
        in_container(&[
            "/usr/local/bin/qlayer",
            "serve",
            "--rest-addr",
            &format!("127.0.0.1:{port}"),
            "--grpc-addr",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap(),
    );
    until_ready(&mut serving, &format!("http://127.0.0.1:{port}/readyz")).await;
    let cold_start = started.elapsed();
    // The image's own health check command, run inside it.
    let check: Vec<String> = serde_json::from_value::<Vec<String>>(docker["Healthcheck"]["Test"].clone())
        .unwrap()
        .into_iter()
        .skip(1)
        .map(|a| a.replace("127.0.0.1:8080", &format!("127.0.0.1:{port}")))
        .collect();
    let probed = in_container(&check.iter().map(String::as_str).collect::<Vec<_>>()).output().unwrap();
    assert!(probed.status.success(), "{check:?}: {}", String::from_utf8_lossy(&probed.stderr));
    stop(serving);
    // Push it, and read it back from the registry.
    let registry = TestRegistry::start();
    let reference = format!("{}/qlayer/qlayer:test", registry.addr);
    buildah.run(&["push", "--tls-verify=false", "qlayer:test", &format!("docker://{reference}")]);
    let http = client();
    let manifest = http
        .get(format!("http://{}/v2/qlayer/qlayer/manifests/test", registry.addr))
        .header(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(manifest.status(), 200);
    let manifest: Value = manifest.json().await.unwrap();
    let layers: i64 = manifest["layers"].as_array().unwrap().iter().map(|l| l["size"].as_i64().unwrap()).sum();
    let binary_size = std::fs::metadata(&stripped).unwrap().len();
    let files = linked_libraries(&binary).into_iter().chain([PathBuf::from(cas)]);
    let unpacked = binary_size + files.map(|p| std::fs::metadata(p).unwrap().len()).sum::<u64>();
    eprintln!(
        "image qlayer:test: {:.1} MiB compressed in the registry ({} layer), {:.1} MiB unpacked (binary {:.1} MiB, {} without its line tables); \
         cold start of the container to /readyz (its data dir holding the plugins the main job compiled): {} ms",
        layers as f64 / 1048576.0,
        manifest["layers"].as_array().unwrap().len(),
        unpacked as f64 / 1048576.0,
        binary_size as f64 / 1048576.0,
        binary.display(),
        cold_start.as_millis()
    );
}
