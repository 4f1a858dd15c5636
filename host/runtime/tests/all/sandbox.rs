//! The sandbox holds: runaway guests are stopped, memory is capped, the network is closed except
//! for granted hosts, tenants are isolated, and bad components are refused at load.

use qlayer_runtime::{CallErrorKind, CompletionRequest, Grants, HostPattern, LoadError, Message, PluginError, Role};
use qlayer_tests::{TestServer, fetcher, guest, guest_with, hostile, runtime};
use std::time::Duration;

fn ask(url: &str) -> CompletionRequest {
    CompletionRequest::new("", vec![Message::new(Role::User, url)])
}

fn grant(hosts: &[String]) -> Grants {
    Grants { outbound_hosts: hosts.iter().map(|h| HostPattern::parse(h).unwrap()).collect(), ..Default::default() }
}

#[tokio::test]
async fn a_guest_that_loops_forever_is_stopped_at_its_deadline() {
    let rt = runtime();
    let installed = rt.load(&hostile(32, 300)).unwrap().install(Grants::default()).unwrap();
    let mut tool = installed.tool("t1").await.unwrap();
    let err = tool.invoke("loop").await.unwrap_err();
    assert!(matches!(err.kind, CallErrorKind::Timeout(d) if d == Duration::from_millis(300)), "{err}");
    assert!(err.to_string().contains("300 ms deadline"), "{err}");
    // The instance is poisoned; a new one works.
    assert!(matches!(tool.invoke("again").await.unwrap_err().kind, CallErrorKind::Poisoned));
    let mut fresh = installed.tool("t1").await.unwrap();
    assert_eq!(fresh.invoke("hello").await.unwrap(), "hello");
}

#[tokio::test]
async fn a_guest_that_grows_memory_past_its_cap_fails_cleanly() {
    let rt = runtime();
    let installed = rt.load(&hostile(16, 10_000)).unwrap().install(Grants::default()).unwrap();
    assert_eq!(installed.memory_limit(), 16 << 20);
    let mut tool = installed.tool("t1").await.unwrap();
    let err = tool.invoke("alloc").await.unwrap_err();
    match err.kind {
        CallErrorKind::OutOfMemory { limit, requested } => {
            assert_eq!(limit, 16 << 20);
            assert!(requested > limit);
        }
        ref other => panic!("expected out-of-memory, got {other:?}: {err}"),
    }
    assert!(err.to_string().contains("ran out of memory"), "{err}");
    let mut fresh = installed.tool("t1").await.unwrap();
    assert_eq!(fresh.invoke("still here").await.unwrap(), "still here");
}

#[tokio::test]
async fn manifest_limits_are_clamped_by_host_policy() {
    let rt = qlayer_runtime::Runtime::new(qlayer_runtime::RuntimeConfig {
        cache_dir: None,
        policy: qlayer_runtime::HostPolicy {
            max_memory_mb: 8,
            max_timeout: Duration::from_millis(200),
            max_instances: 4,
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    let installed = rt.load(&hostile(64, 60_000)).unwrap().install(Grants::default()).unwrap();
    assert_eq!(installed.memory_limit(), 8 << 20);
    assert_eq!(installed.timeout(), Duration::from_millis(200));
    let err = installed.tool("t").await.unwrap().invoke("loop").await.unwrap_err();
    assert!(matches!(err.kind, CallErrorKind::Timeout(d) if d == Duration::from_millis(200)), "{err}");
}

#[tokio::test]
async fn a_plugin_has_no_environment_and_no_filesystem() {
    // SAFETY of the assertion: the host process certainly has environment variables.
    assert!(std::env::vars().count() > 0);
    let rt = runtime();
    let installed = rt.load(&hostile(32, 5000)).unwrap().install(Grants::default()).unwrap();
    assert_eq!(installed.tool("t").await.unwrap().invoke("env").await.unwrap(), "0");
    let fs = installed.tool("t").await.unwrap().invoke("fs").await.unwrap();
    assert!(fs.starts_with("no filesystem"), "{fs}");
}

#[tokio::test]
async fn sockets_and_name_lookups_link_and_are_refused_when_called() {
    // The guest imports wasi:sockets (Rust's std does, as Python's and JavaScript's runtimes do);
    // it loads, and every use is refused with a WASI error, not a trap. A real listener on
    // loopback shows the refusal is the sandbox's, not an absent peer's.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let rt = runtime();
    let plugin = rt.load(&hostile(32, 5000)).unwrap();
    let (imports, _) = rt.interface(&hostile(32, 5000));
    assert!(imports.iter().any(|i| i.starts_with("wasi:sockets/tcp")), "{imports:?}");
    let installed = plugin.install(Grants::default()).unwrap();
    let mut tool = installed.tool("t").await.unwrap();
    let tcp = tool.invoke(&format!("tcp {addr}")).await.unwrap();
    assert!(tcp.starts_with("tcp refused") && tcp.to_lowercase().contains("permission denied"), "{tcp}");
    let udp = tool.invoke(&format!("udp {addr}")).await.unwrap();
    assert!(udp.starts_with("udp refused"), "{udp}");
    let lookup = tool.invoke("resolve localhost").await.unwrap();
    assert!(lookup.starts_with("lookup refused"), "{lookup}");
    // Nothing was accepted, and no socket is made for the guest to hold.
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err());
    let held = tool.invoke("sockets 10000").await.unwrap();
    assert!(held.starts_with("socket 0 refused"), "{held}");
    // The instance is still good.
    assert_eq!(tool.invoke("still here").await.unwrap(), "still here");
}

#[tokio::test]
async fn a_tools_input_schema_is_checked_before_the_guest_runs() {
    let manifest = r#"name = "hostile"
version = "0.1.0"
kind = "tool"
description = "misbehaves on request"
[limits]
timeout-ms = 60000
[tool]
description = "Echoes an object with an `op`."
[tool.input-schema]
type = "object"
required = ["op"]
properties.op = { type = "string" }
"#;
    let rt = runtime();
    let installed = rt.load(&guest_with("qlayer-test-hostile", manifest)).unwrap().install(Grants::default()).unwrap();
    let mut tool = installed.tool("t").await.unwrap();
    // `loop` would spin until the 60 s deadline: refused as not JSON, the guest never entered.
    let err = tool.invoke("loop").await.unwrap_err();
    match &err.kind {
        CallErrorKind::Plugin(PluginError::InvalidInput(m)) => assert!(m.contains("the input is not JSON"), "{m}"),
        other => panic!("{other:?}"),
    }
    let err = tool.invoke(r#"{"op": 5}"#).await.unwrap_err();
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("at `/op`") && err.to_string().contains("hostile"), "{err}");
    let err = tool.invoke(r#"{"opp": "x"}"#).await.unwrap_err();
    assert!(err.to_string().contains("\"op\" is a required property"), "{err}");
    // The instance was never poisoned; a matching input reaches the guest (which echoes its op).
    assert_eq!(tool.invoke(r#"{"op": "still here"}"#).await.unwrap(), "still here");
}

#[tokio::test]
async fn a_granted_host_works_and_an_ungranted_host_is_refused() {
    let server = TestServer::start().await;
    let rt = runtime();
    let plugin = rt.load(&fetcher()).unwrap();

    let granted = plugin.install(grant(&[server.addr.to_string()])).unwrap();
    let reply = granted.provider("t").await.unwrap().complete(&ask(&format!("{}/plain", server.url()))).await.unwrap();
    assert_eq!(reply.text, "200 granted host answered");

    let other = plugin.install(grant(&["api.example.com".into()])).unwrap();
    let before = server.requests().len();
    let err = other.provider("t").await.unwrap().complete(&ask(&format!("{}/plain", server.url()))).await.unwrap_err();
    match &err.kind {
        CallErrorKind::Plugin(PluginError::Unauthorized(m)) => assert!(m.contains("not granted"), "{m}"),
        other => panic!("expected unauthorized, got {other:?}"),
    }
    assert_eq!(server.requests().len(), before, "a refused request must never reach the server");

    // No grant at all: no wasi:http at all, and the error says why.
    let none = plugin.install(Grants::default()).unwrap();
    let err = none.provider("t").await.unwrap().complete(&ask(&format!("{}/plain", server.url()))).await.unwrap_err();
    match &err.kind {
        CallErrorKind::Trap(m) => assert!(m.contains("it has no HTTP") && m.contains("wasi:http/"), "{m}"),
        other => panic!("expected a trap naming wasi:http, got {other:?}"),
    }
    assert_eq!(server.requests().len(), before);
}

/// The hostile tool asking for any host, installed with `server` granted.
fn hostile_granted(rt: &qlayer_runtime::Runtime, server: &TestServer) -> qlayer_runtime::Installed {
    let manifest = "name = \"hostile\"\nversion = \"0.1.0\"\nkind = \"tool\"\ndescription = \"d\"\n[capabilities]\noutbound-hosts = [\"*\"]\n[limits]\ntimeout-ms = 20000\n";
    rt.load(&guest_with("qlayer-test-hostile", manifest)).unwrap().install(grant(&[server.addr.to_string()])).unwrap()
}

#[tokio::test]
async fn an_authority_with_userinfo_is_refused_whatever_follows_the_at() {
    let granted = TestServer::start().await;
    let other = TestServer::start().await;
    let rt = runtime();
    let installed = hostile_granted(&rt, &granted);
    // The plain authority reaches the granted server: the guest's raw request works.
    let reply = installed.tool("t").await.unwrap().invoke(&format!("raw-get {}", granted.addr)).await.unwrap();
    assert_eq!(reply, "status 200");
    let seen = granted.requests().len();
    for authority in [format!("{}@{}", other.addr, granted.addr), format!("user:pass@{}", granted.addr)] {
        let reply = installed.tool("t").await.unwrap().invoke(&format!("raw-get {authority}")).await.unwrap();
        assert!(reply.contains("HttpRequestDenied"), "{authority}: {reply}");
    }
    assert_eq!(granted.requests().len(), seen, "the granted server is not reached with userinfo");
    assert!(other.requests().is_empty(), "nor is the one before the `@`");
}

/// A runtime with the operator's default network policy: public addresses only.
fn default_policy_runtime() -> qlayer_runtime::Runtime {
    qlayer_runtime::Runtime::new(qlayer_runtime::RuntimeConfig::default()).unwrap()
}

#[tokio::test]
async fn grants_of_internal_addresses_are_refused_at_install_by_default() {
    let rt = default_policy_runtime();
    let plugin = rt.load(&fetcher()).unwrap();
    for host in ["127.0.0.1:8080", "169.254.169.254", "10.0.0.1", "[::1]:5432", "127.0.0.1:6379", "0.0.0.0:80"] {
        let err = plugin.install(grant(&[host.to_string()])).unwrap_err();
        assert!(matches!(err, qlayer_runtime::GrantError::NetworkPolicy { .. }), "{host}: {err}");
        assert!(err.to_string().contains("network policy does not allow"), "{err}");
    }
    // An operator's allow-list opens exactly what it names.
    let rt = qlayer_runtime::Runtime::new(qlayer_runtime::RuntimeConfig {
        network: qlayer_runtime::NetworkPolicy::new(&["127.0.0.1:8080"]).unwrap(),
        ..Default::default()
    })
    .unwrap();
    let plugin = rt.load(&fetcher()).unwrap();
    assert!(plugin.install(grant(&["127.0.0.1:8080".into()])).is_ok());
    assert!(plugin.install(grant(&["127.0.0.1:8081".into()])).is_err());
}

#[tokio::test]
async fn a_name_that_resolves_to_an_internal_address_is_refused_at_connect_time() {
    // `localhost` is a name: the grant passes at install, and the connection is checked on what
    // the name resolves to (as a rebinding name's would be) and never made.
    let server = TestServer::start().await;
    let rt = default_policy_runtime();
    let port = server.addr.port();
    let installed = rt.load(&fetcher()).unwrap().install(grant(&[format!("localhost:{port}")])).unwrap();
    let err = installed.provider("t").await.unwrap().complete(&ask(&format!("http://localhost:{port}/plain"))).await;
    let err = err.unwrap_err();
    assert!(
        err.to_string().contains("DestinationIpProhibited") || err.to_string().to_lowercase().contains("prohibited"),
        "{err}"
    );
    assert!(server.requests().is_empty(), "the internal server must never be reached");
    // The same plugin, where the operator allows that name: it connects.
    let rt = qlayer_runtime::Runtime::new(qlayer_runtime::RuntimeConfig {
        network: qlayer_runtime::NetworkPolicy::new(&[format!("localhost:{port}")]).unwrap(),
        ..Default::default()
    })
    .unwrap();
    let installed = rt.load(&fetcher()).unwrap().install(grant(&[format!("localhost:{port}")])).unwrap();
    let reply = installed.provider("t").await.unwrap().complete(&ask(&format!("http://localhost:{port}/plain"))).await;
    assert_eq!(reply.unwrap().text, "200 granted host answered");
}

#[tokio::test]
async fn outbound_requests_in_flight_are_capped_per_instance_and_connections_are_reused() {
    let server = TestServer::start().await;
    let rt = runtime();
    let installed = hostile_granted(&rt, &server);
    // 100 requests at once from one instance: 16 go out, the rest are refused at once.
    let reply = installed.tool("t").await.unwrap().invoke(&format!("fan-out 100 {}", server.addr)).await.unwrap();
    assert!(reply.starts_with("ok 16, refused 84 ") && reply.contains("ConnectionLimitReached"), "{reply}");
    assert_eq!(server.requests().len(), 16);
    // Sequential requests reuse one pooled connection.
    let before = server.connections();
    for _ in 0..20 {
        assert_eq!(
            installed.tool("t").await.unwrap().invoke(&format!("raw-get {}", server.addr)).await.unwrap(),
            "status 200"
        );
    }
    assert!(
        server.connections() - before <= 1,
        "20 sequential requests opened {} connections",
        server.connections() - before
    );
}

/// The hostile tool, asking for (and, installed with `grant`, granted) one outbound host.
fn hostile_with_network(memory_mb: u32) -> Vec<u8> {
    guest_with(
        "qlayer-test-hostile",
        &format!(
            "name = \"hostile\"\nversion = \"0.1.0\"\nkind = \"tool\"\ndescription = \"d\"\n[capabilities]\noutbound-hosts = [\"api.example.com\"]\n[limits]\nmemory-mb = {memory_mb}\ntimeout-ms = 20000\n"
        ),
    )
}

#[tokio::test]
async fn a_plugin_granted_no_host_cannot_make_the_host_hold_http_objects() {
    let rt = runtime();
    let installed = rt.load(&hostile(16, 10_000)).unwrap().install(Grants::default()).unwrap();
    let err = installed.tool("t").await.unwrap().invoke("headers 20000 102400").await.unwrap_err();
    match &err.kind {
        CallErrorKind::Trap(m) => assert!(m.contains("it has no HTTP"), "{m}"),
        other => panic!("expected a trap, got {other:?}: {err}"),
    }
}

#[tokio::test]
async fn host_resources_held_for_an_instance_are_capped() {
    let rt = runtime();
    let installed = rt.load(&hostile_with_network(16)).unwrap().install(grant(&["api.example.com".into()])).unwrap();
    // More header maps than an instance may hold: stopped at the resource limit.
    let err = installed.tool("t").await.unwrap().invoke("headers 20000 1024").await.unwrap_err();
    match &err.kind {
        CallErrorKind::Trap(m) => assert!(m.contains("more than 1000 host resources"), "{m}"),
        other => panic!("expected the resource limit, got {other:?}: {err}"),
    }
    // A header map larger than this instance's share (16 MiB / 1000 maps, about 16 KiB) stops
    // the call.
    let err = installed.tool("t").await.unwrap().invoke("headers 1 102400").await.unwrap_err();
    match &err.kind {
        CallErrorKind::Trap(m) => assert!(m.contains("header map larger than its limit of 16777 bytes"), "{m}"),
        other => panic!("expected the header limit, got {other:?}: {err}"),
    }
    // Within the limits it works, and the instance that failed left nothing behind.
    assert_eq!(installed.tool("t").await.unwrap().invoke("headers 100 1024").await.unwrap(), "holding 100");
}

#[tokio::test]
async fn a_redirect_to_an_ungranted_host_is_refused() {
    let granted_server = TestServer::start().await;
    let other_server = TestServer::start().await;
    let rt = runtime();
    let installed = rt.load(&fetcher()).unwrap().install(grant(&[granted_server.addr.to_string()])).unwrap();

    // A redirect that stays on the granted host is followed.
    let url = format!("{}/redirect?to={}/plain", granted_server.url(), granted_server.url());
    let reply = installed.provider("t").await.unwrap().complete(&ask(&url)).await.unwrap();
    assert_eq!(reply.text, "200 granted host answered");

    // Same IP, another port: a different host, refused.
    let url = format!("{}/redirect?to={}/plain", granted_server.url(), other_server.url());
    let err = installed.provider("t").await.unwrap().complete(&ask(&url)).await.unwrap_err();
    assert!(matches!(err.kind, CallErrorKind::Plugin(PluginError::Unauthorized(_))), "{err}");
    assert!(other_server.requests().is_empty(), "the ungranted host must never be reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_in_one_tenant_does_not_disturb_another_tenant() {
    let rt = runtime();
    let installed = rt.load(&hostile(32, 5000)).unwrap().install(Grants::default()).unwrap();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let installed = installed.clone();
        tasks.push(tokio::spawn(async move {
            let (tenant, input) =
                if i % 2 == 0 { ("tenant-a", "panic".to_string()) } else { ("tenant-b", format!("echo {i}")) };
            let result = installed.tool(tenant).await.unwrap().invoke(&input).await;
            (tenant, input, result)
        }));
    }
    let (mut a_traps, mut b_ok) = (0, 0);
    for t in tasks {
        let (tenant, input, result) = t.await.unwrap();
        match tenant {
            "tenant-a" => {
                let err = result.unwrap_err();
                assert!(matches!(err.kind, CallErrorKind::Trap(_)), "{err}");
                assert_eq!(&*err.tenant, "tenant-a");
                a_traps += 1;
            }
            _ => {
                assert_eq!(result.unwrap(), input);
                b_ok += 1;
            }
        }
    }
    assert_eq!((a_traps, b_ok), (20, 20));
}

#[tokio::test]
async fn a_plugin_error_is_typed_not_a_trap() {
    let rt = runtime();
    let installed = rt.load(&hostile(32, 5000)).unwrap().install(Grants::default()).unwrap();
    let mut tool = installed.tool("t").await.unwrap();
    let err = tool.invoke("fail-retryable").await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let err = tool.invoke("fail-fatal").await.unwrap_err();
    assert!(!err.is_retryable(), "{err}");
    // A plugin error does not poison the instance.
    assert_eq!(tool.invoke("ok").await.unwrap(), "ok");
}

#[test]
fn a_component_of_the_wrong_world_is_refused_with_what_is_missing() {
    let rt = runtime();
    let as_provider = guest_with(
        "qlayer-test-hostile",
        "name = \"liar\"\nversion = \"0.1.0\"\nkind = \"provider\"\ndescription = \"a tool pretending\"\n",
    );
    let err = rt.load(&as_provider).unwrap_err();
    assert!(matches!(err, LoadError::WrongWorld { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(
            "does not export `quantumlayer:plugin/provider@0.2.0` (or another version the host binds: 0.1.0, 0.2.0)"
        ),
        "{text}"
    );
    assert!(text.contains("quantumlayer:plugin/tool@0.2.0"), "it should say what it does export: {text}");

    // A provider (which imports wasi:http) declared as a validator: refused too.
    let as_validator = guest_with(
        "qlayer-test-fetcher",
        "name = \"liar\"\nversion = \"0.1.0\"\nkind = \"validator\"\ndescription = \"d\"\n",
    );
    let text = rt.load(&as_validator).unwrap_err().to_string();
    assert!(text.contains("validator"), "{text}");
}

#[test]
fn a_missing_or_malformed_manifest_is_refused() {
    let rt = runtime();
    let raw = guest("qlayer-test-hostile");
    let err = rt.load(&raw).unwrap_err();
    assert!(err.to_string().contains("has no plugin manifest"), "{err}");

    let broken = qlayer_manifest::append_custom_section(&raw, "qlayer-plugin", b"name = \"x\"\nversion = ");
    let err = rt.load(&broken).unwrap_err();
    assert!(err.to_string().starts_with("malformed plugin manifest"), "{err}");

    let unknown = qlayer_manifest::append_custom_section(
        &raw,
        "qlayer-plugin",
        b"name='x'\nversion='1.0.0'\nkind='tool'\ndescription='d'\nsandbox='off'\n",
    );
    let err = rt.load(&unknown).unwrap_err();
    assert!(err.to_string().contains("sandbox"), "the unknown key must be named: {err}");

    let not_wasm = rt.load(b"definitely not wasm").unwrap_err();
    assert!(not_wasm.to_string().contains("not a WebAssembly binary"), "{not_wasm}");
}

#[test]
fn an_ungranted_capability_is_refused_at_install() {
    let rt = runtime();
    let plugin = rt.load(&hostile(32, 1000)).unwrap();
    let mut grants = Grants::default();
    grants.config.insert("base_url".into(), "x".into());
    let err = plugin.install(grants).unwrap_err();
    assert!(err.to_string().contains("does not ask for config key `base_url`"), "{err}");
}

#[test]
fn compiled_components_are_cached_on_disk_and_a_bad_entry_is_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let config = || qlayer_runtime::RuntimeConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        policy: qlayer_runtime::HostPolicy { max_instances: 4, ..Default::default() },
        ..Default::default()
    };
    let wasm = hostile(32, 1000);
    let first = qlayer_runtime::Runtime::new(config()).unwrap();
    let digest = first.load(&wasm).unwrap().digest().to_string();
    // The entry, beside the lock file its compilation held (one compilation per entry at a time).
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(entries[0].file_name().unwrap().to_string_lossy().starts_with(digest.trim_start_matches("sha256:")));

    // A second runtime (a restart) loads the cached compilation.
    let second = qlayer_runtime::Runtime::new(config()).unwrap();
    assert_eq!(second.load(&wasm).unwrap().digest(), digest);
    // That process ends: it maps the entry (and keeps what it loaded), and writing over a mapped
    // file in place (which the cache itself never does: it renames a new file in) would pull the
    // pages from under it.
    drop((first, second));

    // A corrupted entry is not trusted: it is recompiled and replaced.
    std::fs::write(&entries[0], b"garbage").unwrap();
    let third = qlayer_runtime::Runtime::new(config()).unwrap();
    third.load(&wasm).unwrap();
    assert!(std::fs::metadata(&entries[0]).unwrap().len() > 1000);
}

#[test]
fn guest_output_and_host_log_reach_tracing_with_tenant_and_plugin() {
    let text = qlayer_tests::capture_logs(|| {
        qlayer_tests::current_thread().block_on(async {
            let host = runtime();
            let installed = host.load(&hostile(32, 5000)).unwrap().install(Grants::default()).unwrap();
            let mut tool = installed.tool("tenant-7").await.unwrap();
            assert_eq!(tool.invoke("print").await.unwrap(), "printed");
        });
    });
    assert!(text.contains("hello from the guest's stdout"), "{text}");
    assert!(text.contains("hello from host.log"), "{text}");
    assert!(text.contains("tenant=\"tenant-7\"") || text.contains("tenant=tenant-7"), "{text}");
    assert!(text.contains("plugin=\"hostile\"") || text.contains("plugin=hostile"), "{text}");
}

#[test]
fn a_call_that_floods_the_log_is_cut_at_its_budget_and_says_how_many_lines_it_dropped() {
    for (op, source) in [("log 3000", "host.log"), ("print 3000", "stdout")] {
        let text = qlayer_tests::capture_logs(|| {
            qlayer_tests::current_thread().block_on(async {
                let host = runtime();
                let installed = host.load(&hostile(32, 20_000)).unwrap().install(Grants::default()).unwrap();
                let mut tool = installed.tool("tenant-7").await.unwrap();
                assert_eq!(tool.invoke(op).await.unwrap(), "wrote 3000");
                // The next call has a budget of its own.
                assert_eq!(tool.invoke("print").await.unwrap(), "printed");
            });
        });
        // (The capture holds wasmtime's own debug lines too; count the host's log lines.)
        let written = text.lines().filter(|l| l.contains("qlayer_runtime") && l.contains("flood line")).count();
        assert_eq!(written, 1000, "{source}: a call writes at most 1000 lines");
        assert!(text.contains("log budget exceeded, 2000 lines dropped"), "{source}");
        assert!(text.contains("hello from host.log"), "{source}: the next call logs again");
    }
}

#[tokio::test]
async fn an_output_past_the_limit_is_refused_with_a_typed_error() {
    let rt = runtime();
    let wasm = guest_with(
        "qlayer-test-hostile",
        "name = \"hostile\"\nversion = \"0.1.0\"\nkind = \"tool\"\ndescription = \"d\"\n[limits]\noutput-kb = 64\n",
    );
    let installed = rt.load(&wasm).unwrap().install(Grants::default()).unwrap();
    assert_eq!(installed.output_limit(), 64 * 1024);
    let mut tool = installed.tool("t").await.unwrap();
    let err = tool.invoke("big 100000").await.unwrap_err();
    assert!(matches!(err.kind, CallErrorKind::OutputTooLarge { limit: 65536, size: 100_000 }), "{err}");
    assert!(err.to_string().contains("past its output limit of 65536 bytes"), "{err}");
    assert!(!err.is_retryable());
    // The instance is fine, and an output within the limit passes.
    assert_eq!(tool.invoke("big 1000").await.unwrap().len(), 1000);
    // Without a manifest limit, the policy's default (4 MiB), and the policy clamps any ask.
    assert_eq!(rt.load(&hostile(16, 1000)).unwrap().install(Grants::default()).unwrap().output_limit(), 4 << 20);
    let clamped = qlayer_runtime::Runtime::new(qlayer_runtime::RuntimeConfig {
        policy: qlayer_runtime::HostPolicy { max_output_kb: 16, ..Default::default() },
        ..Default::default()
    })
    .unwrap();
    assert_eq!(clamped.load(&wasm).unwrap().install(Grants::default()).unwrap().output_limit(), 16 * 1024);
}

#[test]
fn a_logged_newline_cannot_forge_a_log_line() {
    let text = qlayer_tests::capture_logs(|| {
        qlayer_tests::current_thread().block_on(async {
            let host = runtime();
            let installed = host.load(&hostile(32, 5000)).unwrap().install(Grants::default()).unwrap();
            assert_eq!(installed.tool("t").await.unwrap().invoke("forge").await.unwrap(), "forged");
        });
    });
    assert!(text.contains("innocent\\nlevel=ERROR tenant=other forged line"), "{text}");
    assert!(!text.lines().any(|l| l.starts_with("level=ERROR")), "{text}");
}

#[tokio::test]
async fn a_full_pool_queues_instead_of_failing() {
    let rt = qlayer_runtime::Runtime::new(qlayer_runtime::RuntimeConfig {
        cache_dir: None,
        policy: qlayer_runtime::HostPolicy { max_instances: 2, ..Default::default() },
        ..Default::default()
    })
    .unwrap();
    let installed = rt.load(&hostile(16, 5000)).unwrap().install(Grants::default()).unwrap();
    let first = installed.tool("a").await.unwrap();
    let _second = installed.tool("b").await.unwrap();
    // The pool is full: a third instance waits for a slot rather than failing.
    let mut third = Box::pin(installed.tool("c"));
    assert!(futures::poll!(third.as_mut()).is_pending(), "a full pool must queue");
    drop(first);
    let mut third = third.await.unwrap();
    assert_eq!(third.invoke("served").await.unwrap(), "served");
}

/// The registry client's egress proxy tunnels `CONNECT` (HTTPS registries) to a destination the
/// policy allows, and refuses one it does not with `403` before connecting.
#[tokio::test]
async fn the_egress_proxy_tunnels_allowed_destinations_and_refuses_others() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let server = TestServer::start().await;
    let exchange = |proxy: String, target: String| async move {
        let mut stream = tokio::net::TcpStream::connect(proxy.trim_start_matches("http://")).await.unwrap();
        let connect = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        stream.write_all(connect.as_bytes()).await.unwrap();
        let mut head = vec![0u8; 4096];
        let n = stream.read(&mut head).await.unwrap();
        let head = String::from_utf8_lossy(&head[..n]).to_string();
        if !head.starts_with("HTTP/1.1 200") {
            return (head, String::new());
        }
        // Through the tunnel: a plain request to the destination.
        let get = format!("GET /plain HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
        stream.write_all(get.as_bytes()).await.unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).await.unwrap();
        (head, body)
    };
    let allowed = qlayer_runtime::egress::EgressProxy::start(qlayer_tests::loopback_allowed(), vec![]).await.unwrap();
    let (head, through) = exchange(allowed.url(), server.addr.to_string()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(through.starts_with("HTTP/1.1 200"), "the tunnel reaches the destination: {through}");
    assert_eq!(server.requests().len(), 1);
    // The default policy refuses loopback: 403 naming it, and nothing reaches the server.
    let default = qlayer_runtime::egress::EgressProxy::start(Default::default(), vec![]).await.unwrap();
    let (head, _) = exchange(default.url(), server.addr.to_string()).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(head.contains(qlayer_registry::EGRESS_REFUSED) && head.contains("loopback"), "{head}");
    assert_eq!(server.requests().len(), 1, "the refused tunnel sent nothing");
    // Unless the operator listed the destination by name (an insecure registry).
    let listed =
        qlayer_runtime::egress::EgressProxy::start(Default::default(), vec![server.addr.to_string()]).await.unwrap();
    let (head, _) = exchange(listed.url(), server.addr.to_string()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

/// What the registry client does for an HTTPS registry, end to end: reqwest (as oci-client
/// builds it) sends `CONNECT` to the egress proxy and speaks TLS through the tunnel to a server
/// whose certificate it trusts; the same request to a refused destination fails before connecting.
#[tokio::test]
async fn an_https_request_goes_through_the_egress_proxy_as_the_registry_client_sends_it() {
    use rustls::pki_types::pem::PemObject as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    qlayer_registry::install_tls_provider();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new(qlayer_tests::ensure_program("openssl", "openssl"))
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "openssl: {}", String::from_utf8_lossy(&made.stderr));
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(&cert).unwrap().map(Result::unwrap).collect();
    let private = rustls::pki_types::PrivateKeyDer::from_pem_file(&key).unwrap();
    let tls = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, private).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else { return };
                let mut buf = vec![0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let _ = tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello").await;
                let _ = tls.shutdown().await;
            });
        }
    });
    let client = |proxy: String| {
        let root = reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap();
        reqwest::Client::builder().tls_certs_merge([root]).proxy(reqwest::Proxy::https(proxy).unwrap()).build().unwrap()
    };
    let url = format!("https://localhost:{port}/v2/");
    let allowed = qlayer_runtime::egress::EgressProxy::start(qlayer_tests::loopback_allowed(), vec![]).await.unwrap();
    let body = client(allowed.url()).get(&url).send().await.unwrap().text().await.unwrap();
    assert_eq!(body, "hello");
    let refused = qlayer_runtime::egress::EgressProxy::start(Default::default(), vec![]).await.unwrap();
    let err = client(refused.url()).get(&url).send().await.unwrap_err();
    assert!(err.is_connect(), "refused at the tunnel, before any TLS: {err:?}");
}

/// A validator built against contract 0.2.0 (with wit-bindgen alone, as before 0.3.0) loads and
/// runs: its findings come back as 0.3.0 diagnostics without a column. A tool built with the
/// SDK (0.3.0) exports 0.2.0's unchanged `tool` interface, and is bound as such.
#[tokio::test]
async fn a_validator_built_against_contract_0_2_0_still_runs() {
    use qlayer_runtime::{Artifact, Contract, Severity};
    let rt = runtime();
    let wasm = guest_with(
        "qlayer-test-validator-v0-2",
        "name = \"todos-v0-2\"\nversion = \"0.1.0\"\nkind = \"validator\"\ndescription = \"d\"\n",
    );
    let plugin = rt.load(&wasm).unwrap();
    assert_eq!(plugin.contract(), Some(Contract::V0_2));
    let installed = plugin.install(Grants::default()).unwrap();
    let mut v = installed.validator("t").await.unwrap();
    assert_eq!(v.contract(), Contract::V0_2);
    let artifacts =
        [Artifact { path: "a.py".into(), media_type: "text/x-python".into(), content: b"x\n  y # TODO\n".to_vec() }];
    let found = v.validate(&artifacts).await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    let d = &found[0];
    assert_eq!(
        (d.severity, d.rule.as_str(), d.path.as_deref(), d.line, d.column),
        (Severity::Warning, "todo-v0-2", Some("a.py"), Some(2), None)
    );

    let tool = rt.load(&hostile(64, 1000)).unwrap();
    assert_eq!(tool.contract(), Some(Contract::V0_2));
}

/// A provider built against contract 0.1.0 (with wit-bindgen alone, as before 0.2.0) loads and
/// serves through the 0.2.0 types: completions, streams, models and embeddings, its 0.1.0 `host`
/// import working; a request 0.1.0 cannot express is refused naming the feature and the plugin,
/// without calling it.
#[tokio::test]
async fn a_provider_built_against_contract_0_1_0_still_serves() {
    use qlayer_runtime::{Contract, FinishReason, ResponseFormat, ToolDefinition};
    let rt = runtime();
    let wasm = guest_with(
        "qlayer-test-provider-v0-1",
        "name = \"echo-v0-1\"\nversion = \"0.1.0\"\nkind = \"provider\"\ndescription = \"d\"\n",
    );
    let plugin = rt.load(&wasm).unwrap();
    assert_eq!(plugin.contract(), Some(Contract::V0_1));
    let installed = plugin.install(qlayer_runtime::Grants::default()).unwrap();
    let mut p = installed.provider("t").await.unwrap();
    assert_eq!(p.contract(), Contract::V0_1);
    let ask = CompletionRequest {
        response_format: ResponseFormat::JsonObject,
        max_tokens: Some(7),
        ..CompletionRequest::new("", vec![Message::new(Role::System, "s"), Message::new(Role::User, "hello there")])
    };
    let c = p.complete(&ask).await.unwrap();
    assert_eq!(c.text, "v0.1.0 echo: hello there [json-output] [max-tokens 7]");
    assert_eq!((c.finish_reason, c.tool_calls.len()), (FinishReason::Stop, 0));
    let mut stream = p.stream(&CompletionRequest::new("", vec![Message::new(Role::User, "a b c")])).await.unwrap();
    let mut text = String::new();
    let mut last = None;
    while let Some(chunk) = stream.next().await.unwrap() {
        text.push_str(&chunk.delta);
        last = chunk.finish_reason.or(last);
    }
    assert_eq!((text.as_str(), last), ("v0.1.0 echo: a b c", Some(FinishReason::Stop)));
    assert_eq!(p.models().await.unwrap()[0].id, "echo-v0-1");
    let e =
        p.embed(&qlayer_runtime::EmbeddingRequest { model: String::new(), inputs: vec!["abc".into()] }).await.unwrap();
    assert_eq!(e.vectors, [vec![3.0, 1.0]]);

    let mut tools = ask.clone();
    tools.tools.push(ToolDefinition {
        name: "f".into(),
        description: None,
        parameters_json: "{}".into(),
        strict: false,
    });
    let err = p.complete(&tools).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(&err.kind, qlayer_runtime::CallErrorKind::Plugin(qlayer_runtime::PluginError::InvalidInput(_))),
        "{text}"
    );
    assert!(
        text.contains("tool definitions") && text.contains("echo-v0-1") && text.contains("quantumlayer:plugin@0.1.0"),
        "{text}"
    );
    assert!(!p.is_poisoned(), "a refused request does not poison the instance");
    let mut seeded = ask.clone();
    seeded.seed = Some(1);
    assert!(p.stream(&seeded).await.err().unwrap().to_string().contains("a sampling seed"));
    assert_eq!(p.complete(&ask).await.unwrap().text, c.text, "it keeps serving");
}

/// An `llm` that no test agent here calls.
struct NoLlm;

impl qlayer_runtime::LlmHandler for NoLlm {
    fn complete<'a>(
        &'a self,
        _tenant: &'a str,
        _request: CompletionRequest,
    ) -> futures::future::BoxFuture<'a, Result<qlayer_runtime::Completion, PluginError>> {
        Box::pin(async { Err(PluginError::Unavailable("no model in this test".into())) })
    }
}

/// Grants tenant `acme` one tool, `echo`, which answers with its input and the tenant it ran for.
struct EchoTools;

impl qlayer_runtime::ToolHandler for EchoTools {
    fn list<'a>(&'a self, tenant: &'a str) -> futures::future::BoxFuture<'a, Vec<qlayer_runtime::ToolInfo>> {
        Box::pin(async move {
            if tenant != "acme" {
                return vec![];
            }
            vec![qlayer_runtime::ToolInfo {
                name: "echo".into(),
                description: "echoes".into(),
                input_schema_json: "{}".into(),
            }]
        })
    }

    fn invoke<'a>(
        &'a self,
        tenant: &'a str,
        name: &'a str,
        input_json: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<String, PluginError>> {
        Box::pin(async move {
            match (tenant, name) {
                ("acme", "echo") => Ok(format!("{{\"for\": \"{tenant}\", \"input\": {input_json}}}")),
                _ => Err(PluginError::InvalidInput(format!("no tool `{name}` is granted to this step"))),
            }
        })
    }
}

/// An agent's `tools` import reaches exactly the tools its host grants: listed and invoked for
/// its tenant, an ungranted name refused as invalid input, and nothing at all when none are.
#[tokio::test]
async fn an_agent_reaches_only_the_tools_it_was_granted() {
    use std::sync::Arc;
    let rt = runtime();
    let wasm = guest_with(
        "qlayer-test-tool-user",
        "name = \"tool-user\"\nversion = \"0.1.0\"\nkind = \"agent\"\ndescription = \"d\"\n",
    );
    let installed = rt.load(&wasm).unwrap().install(Grants::default()).unwrap();
    let task = |tool: &str| qlayer_runtime::Task {
        requirement: tool.into(),
        inputs: vec![],
        feedback: vec![],
        options_json: r#"{"text": "hi"}"#.into(),
    };
    let report = |out: qlayer_runtime::AgentOutput| -> serde_json::Value {
        serde_json::from_slice(&out.artifacts[0].content).unwrap()
    };
    let tools: Arc<dyn qlayer_runtime::ToolHandler> = Arc::new(EchoTools);
    let mut agent = installed.agent_with_tools("acme", Arc::new(NoLlm), Some(tools.clone())).await.unwrap();
    let r = report(agent.run(&task("echo")).await.unwrap());
    assert_eq!(r["granted"], serde_json::json!(["echo"]));
    assert_eq!(r["output"], r#"{"for": "acme", "input": {"text": "hi"}}"#);
    let r = report(agent.run(&task("shell")).await.unwrap());
    assert!(
        r["error"].as_str().unwrap().contains("InvalidInput") && r["error"].as_str().unwrap().contains("`shell`"),
        "{r}"
    );

    // Another tenant's instance, same handler: nothing granted to it.
    let mut other = installed.agent_with_tools("globex", Arc::new(NoLlm), Some(tools)).await.unwrap();
    let r = report(other.run(&task("echo")).await.unwrap());
    assert_eq!(r["granted"], serde_json::json!([]));
    assert!(r["error"].as_str().unwrap().contains("InvalidInput"), "{r}");

    // No handler: no tools.
    let mut bare = installed.agent("acme", Arc::new(NoLlm)).await.unwrap();
    let r = report(bare.run(&task("echo")).await.unwrap());
    assert_eq!(r["granted"], serde_json::json!([]));
    assert!(r["error"].as_str().unwrap().contains("granted none"), "{r}");
}

const ECHO_V0_1: &str = "name = \"echo-v0-1\"\nversion = \"0.1.0\"\nkind = \"provider\"\ndescription = \"d\"\n[capabilities]\nconfig = [\"k\"]\n";

/// What the provider's instance answers to `count` (how many calls it has answered), through a
/// warm instance for `tenant`.
async fn calls_of_instance(installed: &qlayer_runtime::Installed, tenant: &str) -> String {
    let mut p = installed.warm_provider(tenant).await.unwrap();
    let text = p.complete(&ask("count")).await.unwrap().text;
    text.trim_start_matches("v0.1.0 echo: ").to_string()
}

/// The gateway's warm provider instances: an instance that answered cleanly serves its tenant's
/// next call through an install with equal grants, and nothing else: not another tenant, not
/// other grants, and never after a trap, an abandoned call or an abandoned stream.
#[tokio::test]
async fn a_warm_provider_instance_serves_only_its_tenant_and_grants_and_only_when_clean() {
    let rt = runtime();
    let plugin = rt.load(&guest_with("qlayer-test-provider-v0-1", ECHO_V0_1)).unwrap();
    let installed = plugin.install(Grants::default()).unwrap();
    assert_eq!(calls_of_instance(&installed, "a").await, "call 1 of this instance");
    assert_eq!(calls_of_instance(&installed, "a").await, "call 2 of this instance", "reused");
    assert_eq!(calls_of_instance(&installed, "b").await, "call 1 of this instance", "another tenant's is fresh");
    let other = Grants { config: [("k".to_string(), "v".to_string())].into(), ..Default::default() };
    let regranted = plugin.install(other).unwrap();
    assert_eq!(calls_of_instance(&regranted, "a").await, "call 1 of this instance", "other grants: fresh");
    let same = plugin.install(Grants::default()).unwrap();
    assert_eq!(calls_of_instance(&same, "a").await, "call 3 of this instance", "equal grants, a new install");
    let stats = rt.warm_stats();
    assert_eq!((stats.hits, stats.misses, stats.idle), (2, 3, 3), "{stats:?}");

    // A refused request leaves the instance fit; a trap does not.
    let mut p = installed.warm_provider("a").await.unwrap();
    let empty = CompletionRequest::new("", vec![]);
    assert!(matches!(p.complete(&empty).await.unwrap_err().kind, CallErrorKind::Plugin(PluginError::InvalidInput(_))));
    drop(p);
    assert_eq!(calls_of_instance(&installed, "a").await, "call 4 of this instance");
    let mut p = installed.warm_provider("a").await.unwrap();
    assert!(matches!(p.complete(&ask("trap")).await.unwrap_err().kind, CallErrorKind::Trap(_)));
    drop(p);
    assert_eq!(calls_of_instance(&installed, "a").await, "call 1 of this instance", "the trapped one is gone");

    // A call abandoned midway (its client left) drops the instance with it.
    let mut p = installed.warm_provider("a").await.unwrap();
    let abandoned = tokio::time::timeout(Duration::from_millis(20), p.complete(&ask("spin-ms 2000"))).await;
    assert!(abandoned.is_err(), "the call was still running when abandoned");
    drop(p);
    assert_eq!(calls_of_instance(&installed, "a").await, "call 1 of this instance", "the abandoned one is gone");

    // A stream read to its end gives its instance back; one left midway does not.
    let mut s = installed.warm_provider("a").await.unwrap().into_stream(&ask("a b c")).await.unwrap();
    while s.next().await.unwrap().is_some() {}
    drop(s);
    assert_eq!(calls_of_instance(&installed, "a").await, "call 3 of this instance");
    let mut s = installed.warm_provider("a").await.unwrap().into_stream(&ask("a b c")).await.unwrap();
    assert!(s.next().await.unwrap().is_some());
    drop(s);
    assert_eq!(calls_of_instance(&installed, "a").await, "call 1 of this instance", "the abandoned stream's is gone");
}

/// Idle warm instances never starve a caller of an instance slot: one that finds every slot
/// taken makes an idle instance give its slot up instead of waiting.
#[tokio::test]
async fn idle_warm_instances_give_their_slots_up() {
    let rt = qlayer_runtime::Runtime::new(qlayer_runtime::RuntimeConfig {
        policy: qlayer_runtime::HostPolicy { max_instances: 4, ..Default::default() },
        ..Default::default()
    })
    .unwrap();
    let plugin = rt.load(&guest_with("qlayer-test-provider-v0-1", ECHO_V0_1)).unwrap();
    let installed = plugin.install(Grants::default()).unwrap();
    assert_eq!(calls_of_instance(&installed, "a").await, "call 1 of this instance");
    assert_eq!(rt.warm_stats().idle, 1, "kept idle, holding one of the four slots");
    let mut live = Vec::new();
    for tenant in ["b", "c", "d", "e"] {
        // A hang guard, not a time bound: without the eviction the fourth waits forever.
        let instance = tokio::time::timeout(Duration::from_secs(60), installed.provider(tenant)).await;
        live.push(instance.expect("a slot was freed").unwrap());
    }
    assert_eq!(rt.warm_stats().idle, 0);
    assert_eq!(live.len(), 4);
}
