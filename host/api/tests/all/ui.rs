//! The dashboard (`/ui`) in a real browser: Debian's Chromium driven headless through
//! chromedriver (WebDriver, the `fantoccini` client), against `qlayer serve` in process with a
//! real OCI registry. Sign in, start a run and watch its steps arrive live, approve its gates,
//! download the capsule, search the registry and install a plugin, read the usage charts; another
//! tenant's run is the not-found page, a viewer has no buttons, sign-out ends the session, and a
//! page renders with JavaScript off. Each flow saves a screenshot under the test's temp dir.
//! Beside it, the session, cookie, CSRF and header rules over plain HTTP, and the figures. The
//! model is the `scripted` provider (a test double).

use crate::api::{Svc, service};
use fantoccini::{Client, ClientBuilder, Locator};
use qlayer_db::Backend;
use qlayer_tests::{ADMIN, ensure_program, free_port, marketplace_plugin};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// chromedriver on a free port, stopped on drop.
struct Driver {
    child: std::process::Child,
    url: String,
}

impl Driver {
    fn start() -> Driver {
        ensure_program("chromium", "chromium");
        let driver = ensure_program("chromedriver", "chromium-driver");
        let port = free_port();
        let child = std::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Driver { child, url: format!("http://127.0.0.1:{port}") }
    }

    /// A headless Chromium session with its own profile under `dir`.
    async fn browser(&self, dir: &std::path::Path, javascript: bool) -> Client {
        let profile = dir.join(format!("profile-{}", free_port()));
        let mut args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--no-proxy-server".into(),
            "--window-size=1280,1000".into(),
            format!("--user-data-dir={}", profile.display()),
        ];
        let mut prefs = json!({});
        if !javascript {
            args.push("--blink-settings=scriptEnabled=false".into());
            prefs = json!({"profile.managed_default_content_settings.javascript": 2});
        }
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("goog:chromeOptions".into(), json!({"binary": "/usr/bin/chromium", "args": args, "prefs": prefs}));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector).capabilities(caps).connect(&self.url).await.unwrap()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn shot(browser: &Client, dir: &std::path::Path, name: &str) {
    let png = browser.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a screenshot is a PNG");
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

async fn sign_in(browser: &Client, base: &str, key: &str) {
    browser.goto(&format!("{base}/ui/runs")).await.unwrap();
    assert!(browser.current_url().await.unwrap().path().starts_with("/ui/sign-in"), "signed out: the sign-in page");
    browser.find(Locator::Id("key")).await.unwrap().send_keys(key).await.unwrap();
    browser.find(Locator::Css("form button[type=submit]")).await.unwrap().click().await.unwrap();
    browser.wait().for_element(Locator::Id("who")).await.unwrap();
}

/// Basic accessibility of the page on screen: a language, a label for every form control, a
/// name for every chart, and the keyboard's first stop the skip link.
async fn accessible(browser: &Client) {
    let unlabelled: Value = browser
        .execute(
            "return Array.from(document.querySelectorAll('input:not([type=hidden]), select, textarea'))
                .filter(e => e.labels.length === 0 && !e.getAttribute('aria-label')).map(e => e.outerHTML)
                .concat(Array.from(document.querySelectorAll('svg[role=img]')).filter(s => !s.getAttribute('aria-labelledby')).map(s => s.id))
                .concat(document.documentElement.lang ? [] : ['<html> without lang']);",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(unlabelled, json!([]), "controls without a label");
    use fantoccini::actions::{InputSource as _, KeyAction, KeyActions};
    let tab = KeyActions::new("keyboard".into())
        .then(KeyAction::Down { value: '\u{e004}' })
        .then(KeyAction::Up { value: '\u{e004}' });
    browser.perform_actions(tab).await.unwrap();
    let first = browser.active_element().await.unwrap().attr("class").await.unwrap();
    assert_eq!(first.as_deref(), Some("skip"), "Tab first reaches the skip link");
}

/// The text of `css` once it is on the page (a click's navigation may still be under way).
async fn text(browser: &Client, css: &str) -> String {
    match browser.wait().at_most(Duration::from_secs(30)).for_element(Locator::Css(css)).await {
        Ok(element) => element.text().await.unwrap(),
        Err(e) => {
            let url = browser.current_url().await.map(|u| u.to_string()).unwrap_or_default();
            let main = match browser.find(Locator::Css("main")).await {
                Ok(m) => m.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            panic!("{css} never showed on {url}: {e}\n{main}")
        }
    }
}

/// Waits until `css` is no longer on the page (a click's navigation has replaced it).
async fn gone(browser: &Client, css: &str) {
    for _ in 0..300 {
        if browser.find(Locator::Css(css)).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{css} is still on the page")
}

/// Reloads `path` until `css` is on it.
async fn until_shown(browser: &Client, base: &str, path: &str, css: &str) {
    for _ in 0..600 {
        browser.goto(&format!("{base}{path}")).await.unwrap();
        if browser.find(Locator::Css(css)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{path} never showed {css}")
}

async fn run_status(svc: &Svc, key: &str, run: &str) -> String {
    svc.get(&format!("/v1/runs/{run}"), key).await.body["status"].as_str().unwrap_or_default().to_string()
}

async fn until_status(svc: &Svc, key: &str, run: &str, status: &str) {
    for _ in 0..1200 {
        if run_status(svc, key, run).await == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("run {run} never became {status}")
}

fn gated_pipeline() -> Value {
    json!({"steps": [
        {"name": "pm", "role": "product-manager", "gate": true},
        {"name": "dev", "role": "developer", "after": ["pm"], "validators": ["syntax"], "gate": true},
    ], "repair": {"rounds": 1, "steps": ["pm", "dev"]}})
}

/// Events of a run as a plain SSE client receives them: (seq, event's `at`, unix ms received).
fn follow_events(svc: &Svc, key: &str, run: &str) -> tokio::task::JoinHandle<Vec<(i64, i64, i64)>> {
    let (http, url, key) = (svc.http.clone(), format!("{}/v1/jobs/{run}/events", svc.base), key.to_string());
    tokio::spawn(async move {
        let mut res = http.get(url).header("authorization", format!("Bearer {key}")).send().await.unwrap();
        let (mut seen, mut buf) = (Vec::new(), String::new());
        while let Ok(Some(chunk)) = res.chunk().await {
            let now = unix_ms();
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let frame: String = buf.drain(..end + 2).collect();
                if let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data:")) {
                    let v: Value = serde_json::from_str(data.trim()).unwrap_or(Value::Null);
                    if let (Some(seq), Some(at)) = (v["seq"].as_i64(), v["at"].as_i64()) {
                        seen.push((seq, at, now));
                    }
                    if v["kind"] == "waiting" && seen.len() > 1 && v["data"]["gate"] != "approve-pm" {
                        return seen;
                    }
                }
            }
        }
        seen
    })
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn median(mut v: Vec<i64>) -> i64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_real_browser() {
    let svc = service(Backend::Sqlite, true, |_| {}).await;
    let shots = tempfile::tempdir().unwrap();
    let (acme_id, acme) = svc.tenant("acme").await;
    let (_, viewer) = svc.key(&acme, "viewer").await;
    let (_, other) = svc.tenant("other").await;
    let r = svc.put("/v1/pipelines/gated", &acme, gated_pipeline()).await;
    assert_eq!(r.status, 201, "{r:?}");
    let r = svc.post("/v1/runs", &other, json!({"requirement": "their secret CLI"})).await;
    let theirs = r.body["id"].as_str().unwrap().to_string();
    let driver = Driver::start();
    let browser = driver.browser(shots.path(), true).await;
    let base = svc.base.clone();

    // Sign in: a wrong key is refused on the page, the right one opens the runs page.
    browser.goto(&format!("{base}/ui/runs")).await.unwrap();
    browser.find(Locator::Id("key")).await.unwrap().send_keys("ql_wrong").await.unwrap();
    browser.find(Locator::Css("form button[type=submit]")).await.unwrap().click().await.unwrap();
    assert!(text(&browser, "#sign-in-error").await.contains("not valid"));
    sign_in(&browser, &base, &acme).await;
    assert!(text(&browser, "#who").await.contains("acme"));
    let cookies = browser.get_all_cookies().await.unwrap();
    let session = cookies.iter().find(|c| c.name() == "qlayer_session").expect("a session cookie");
    assert_eq!(session.http_only(), Some(true));
    assert_eq!(format!("{:?}", session.same_site()), "Some(Strict)");
    let in_storage: Value = browser
        .execute("return [document.cookie, JSON.stringify(localStorage), JSON.stringify(sessionStorage)];", vec![])
        .await
        .unwrap();
    assert!(!in_storage.to_string().contains("ql_"), "the key is nowhere a script can read: {in_storage}");
    accessible(&browser).await;
    let marked: Value = browser.execute("return document.documentElement.className;", vec![]).await.unwrap();
    assert_eq!(marked, json!("js"), "the page's script runs (from /ui/assets, as the CSP allows)");
    shot(&browser, shots.path(), "signed-in").await;

    // Start a run through the gated pipeline.
    browser.find(Locator::Id("requirement")).await.unwrap().send_keys("a CLI that greets").await.unwrap();
    browser.find(Locator::Css("#pipeline option[value=gated]")).await.unwrap().click().await.unwrap();
    browser.find(Locator::Css("#start-run button[type=submit]")).await.unwrap().click().await.unwrap();
    browser.wait().for_element(Locator::Id("steps")).await.unwrap();
    let run = browser.current_url().await.unwrap().path().trim_start_matches("/ui/runs/").to_string();
    assert!(run.starts_with("job_"), "{run}");
    until_status(&svc, &acme, &run, "waiting").await;
    until_shown(&browser, &base, &format!("/ui/runs/{run}"), "#gate #approve").await;
    assert!(text(&browser, "#gate-title").await.contains("approve-pm"));
    assert!(text(&browser, "#documents").await.contains("docs/PRD"), "the PRD is on the page before the decision");
    shot(&browser, shots.path(), "gate-1").await;

    // The page is open at the first gate; approving it elsewhere (the API) makes the steps after
    // it arrive on the page live, as the run goes.
    let raw = follow_events(&svc, &acme, &run);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(svc.post(&format!("/v1/runs/{run}/approve"), &acme, json!({})).await.status, 200);
    browser.wait().at_most(Duration::from_secs(120)).for_element(Locator::Id("refresh")).await.unwrap();
    let live: Value = browser
        .execute(
            "return Array.from(document.querySelectorAll('#steps tr[data-seen-at]')).map(r => ({
                task: r.getAttribute('data-task'),
                status: r.querySelector('[data-field=status]').textContent,
                tokens: r.querySelector('[data-field=tokens]').textContent,
                at: Number(r.getAttribute('data-event-at')), seen: Number(r.getAttribute('data-seen-at'))}));",
            vec![],
        )
        .await
        .unwrap();
    let rows = live.as_array().unwrap();
    let dev = rows.iter().find(|r| r["task"] == "dev").unwrap_or_else(|| panic!("dev arrived live: {live}"));
    assert_eq!(dev["status"], "succeeded", "{live}");
    assert!(dev["tokens"].as_str().unwrap().parse::<u64>().unwrap() > 0, "{live}");
    assert_eq!(text(&browser, "#run-status").await, "waiting");
    assert!(text(&browser, "#gate").await.contains("The gate was approved"), "the first gate's forms are gone");
    shot(&browser, shots.path(), "live").await;
    // The same events (those after the page rendered), to the screen and to a plain client.
    let on_page: Value = browser.execute("return window.qlayerEvents;", vec![]).await.unwrap();
    let on_page: Vec<(i64, i64)> = on_page
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["seq"].as_i64().unwrap(), e["seen"].as_i64().unwrap() - e["at"].as_i64().unwrap()))
        .collect();
    let first = on_page.first().map(|(seq, _)| *seq).expect("events reached the page");
    let to_screen: Vec<i64> = on_page.iter().map(|(_, delay)| *delay).collect();
    let to_client: Vec<i64> =
        raw.await.unwrap().iter().filter(|(seq, _, _)| *seq >= first).map(|(_, at, seen)| seen - at).collect();
    eprintln!(
        "figure: events to screen: median {} ms, max {} ms over {} events (baseline, a plain SSE client of /v1/jobs/{{id}}/events in the same run: median {} ms over {} events)",
        median(to_screen.clone()),
        to_screen.iter().max().unwrap(),
        to_screen.len(),
        median(to_client.clone()),
        to_client.len()
    );

    // The second gate is decided in the browser; then the capsule downloads.
    browser.find(Locator::Id("refresh")).await.unwrap().click().await.unwrap();
    browser.wait().for_element(Locator::Css("#gate #approve")).await.unwrap();
    assert!(text(&browser, "#files").await.contains("src/main.rs"), "the files are on the page");
    browser.find(Locator::Id("approve-comment")).await.unwrap().send_keys("looks right").await.unwrap();
    browser.find(Locator::Id("approve")).await.unwrap().click().await.unwrap();
    // The decision's post leads back to the run's page, without the gate's forms.
    gone(&browser, "#gate #approve").await;
    until_shown(&browser, &base, &format!("/ui/runs/{run}"), "#capsule").await;
    assert_eq!(text(&browser, "#run-status").await, "succeeded");
    assert!(text(&browser, "#run-verdict").await.starts_with("passed"));
    let download: Value = browser
        .execute_async(
            "const done = arguments[arguments.length - 1];
             fetch(document.getElementById('capsule').href).then(async r => done({
                status: r.status, type: r.headers.get('content-type'),
                disposition: r.headers.get('content-disposition'),
                magic: Array.from(new Uint8Array(await r.arrayBuffer()).slice(0, 2))}));",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(download["status"], 200, "{download}");
    assert_eq!(download["type"], "application/gzip", "{download}");
    assert_eq!(download["magic"], json!([31, 139]), "a gzip stream: {download}");
    assert!(download["disposition"].as_str().unwrap().contains(&format!("{run}.tar.gz")));
    shot(&browser, shots.path(), "succeeded").await;
    let audit = svc.db().audit_records(Some(&acme_id), 0, 1000).await.unwrap();
    assert!(
        audit.iter().any(|r| r.action == "run.approve" && r.target == run && r.outcome == "ok"),
        "the browser's decision is in the audit log"
    );

    // Jobs: the run's tasks with their status and attempts.
    browser.goto(&format!("{base}/ui/jobs?kind=run")).await.unwrap();
    browser.find(Locator::Css(&format!("#jobs a[href='/ui/jobs/{run}']"))).await.unwrap().click().await.unwrap();
    assert!(text(&browser, "#tasks").await.contains("approve-dev"));
    browser.find(Locator::Css("svg.dag")).await.unwrap();

    // Plugins: search the registry (what each asks for), install one, see it listed.
    let reference = svc.push("tools/text-stats", &marketplace_plugin("text-stats")).await;
    browser.goto(&format!("{base}/ui/plugins")).await.unwrap();
    let registry = svc.registry.as_ref().unwrap().addr.clone();
    browser.find(Locator::Id("registry")).await.unwrap().send_keys(&registry).await.unwrap();
    browser.find(Locator::Css("#search-title + form button")).await.unwrap().click().await.unwrap();
    assert!(text(&browser, "#catalog").await.contains("tools/text-stats"));
    browser.find(Locator::Id("reference")).await.unwrap().send_keys(&reference).await.unwrap();
    browser.find(Locator::Css("#install button[type=submit]")).await.unwrap().click().await.unwrap();
    browser.wait().for_element(Locator::Id("installed-note")).await.unwrap();
    assert!(text(&browser, "#plugins").await.contains("text-stats"));
    assert_eq!(svc.get("/v1/plugins/text-stats", &acme).await.status, 200, "installed for the tenant");
    accessible(&browser).await;
    shot(&browser, shots.path(), "plugins").await;
    // Upgrade (1.0.0 is the newest there), then remove.
    browser
        .find(Locator::Css("tr[data-plugin=text-stats] button[aria-label='Upgrade text-stats']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser.wait().for_element(Locator::Id("newest-note")).await.unwrap();
    browser
        .find(Locator::Css("tr[data-plugin=text-stats] button[aria-label='Remove text-stats']"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    gone(&browser, "tr[data-plugin=text-stats]").await;
    browser.wait().for_element(Locator::Id("install")).await.unwrap();
    assert_eq!(svc.get("/v1/plugins/text-stats", &acme).await.status, 404, "removed for the tenant");

    // Usage: a chart per day from what the gateway recorded.
    let now = unix_ms();
    let record = |days_ago: i64, tokens: i64| qlayer_db::UsageRecord {
        tenant_id: acme_id.clone(),
        key_id: "key_ui".into(),
        endpoint: "chat".into(),
        model: "gpt-test".into(),
        deployment: "openai/gpt-4o-mini".into(),
        prompt_tokens: tokens,
        completion_tokens: tokens / 2,
        cost_nanos: tokens * 1000,
        latency_us: 1000,
        ttft_us: None,
        cache: "miss".into(),
        status: "ok".into(),
        at: now - days_ago * 86_400_000,
    };
    svc.db().record_usage(&[record(0, 300), record(1, 120), record(1, 60), record(3, 900)]).await.unwrap();
    browser.goto(&format!("{base}/ui/usage")).await.unwrap();
    let bars: Value = browser
        .execute("return Array.from(document.querySelectorAll('#chart-tokens rect.bar')).map(b => Number(b.getAttribute('data-value')));", vec![])
        .await
        .unwrap();
    let bars: Vec<f64> = bars.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(bars.len(), 30, "30 days");
    assert_eq!(&bars[26..], &[1350.0, 0.0, 270.0, 450.0], "tokens per day, today last");
    assert!(text(&browser, "#usage-models").await.contains("gpt-test"));
    let per_model: Value = browser
        .execute("return Array.from(document.querySelectorAll('#chart-models rect.bar')).map(b => Number(b.getAttribute('data-value')));", vec![])
        .await
        .unwrap();
    assert_eq!(per_model, json!([2070]), "one model, all its tokens");
    accessible(&browser).await;
    shot(&browser, shots.path(), "usage").await;

    // Another tenant's run is the not-found page, exactly like a missing one.
    browser.goto(&format!("{base}/ui/runs/{theirs}")).await.unwrap();
    let theirs_text = text(&browser, "#not-found").await;
    browser.goto(&format!("{base}/ui/runs/job_missing")).await.unwrap();
    assert_eq!(theirs_text.replace(&theirs, "ID"), text(&browser, "#not-found").await.replace("job_missing", "ID"));
    assert!(!browser.source().await.unwrap().contains("their secret CLI"));
    shot(&browser, shots.path(), "not-found").await;

    // Sign-out ends the session: the pages send the browser to sign in again.
    browser.find(Locator::Id("sign-out")).await.unwrap().click().await.unwrap();
    text(&browser, "main.narrow #key + button").await;
    browser.goto(&format!("{base}/ui/runs")).await.unwrap();
    assert!(browser.current_url().await.unwrap().path().starts_with("/ui/sign-in"));
    shot(&browser, shots.path(), "signed-out").await;

    // A viewer sees the runs and no button that changes anything.
    sign_in(&browser, &base, &viewer).await;
    assert!(browser.find(Locator::Id("start-run")).await.is_err(), "no start form for a viewer");
    browser.goto(&format!("{base}/ui/plugins")).await.unwrap();
    assert!(browser.find(Locator::Id("install")).await.is_err(), "no install form for a viewer");
    let buttons: Value = browser
        .execute(
            "return document.querySelectorAll('main form[method=post], main form[method=post] button').length;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        buttons,
        json!(0),
        "a viewer's pages have no form that changes anything (only search, and sign-out in the header)"
    );
    browser.goto(&format!("{base}/ui/runs/{run}")).await.unwrap();
    assert!(browser.find(Locator::Id("approve")).await.is_err());
    shot(&browser, shots.path(), "viewer").await;
    browser.close().await.unwrap();

    // With JavaScript off, a run's page shows everything as of its rendering.
    let no_js = driver.browser(shots.path(), false).await;
    sign_in(&no_js, &base, &acme).await;
    no_js.goto(&format!("{base}/ui/runs/{run}")).await.unwrap();
    // The page's script marks <html> when it runs: here it did not.
    let marked: Value = no_js.execute("return document.documentElement.className;", vec![]).await.unwrap();
    assert_eq!(marked, json!(""), "scripts are off in this browser");
    assert_eq!(text(&no_js, "#run-status").await, "succeeded");
    assert!(text(&no_js, "#steps").await.contains("dev"));
    shot(&no_js, shots.path(), "no-javascript").await;
    no_js.close().await.unwrap();
    eprintln!("screenshots: {}", shots.path().display());
    for name in [
        "signed-in",
        "gate-1",
        "live",
        "succeeded",
        "plugins",
        "usage",
        "not-found",
        "signed-out",
        "viewer",
        "no-javascript",
    ] {
        assert!(shots.path().join(format!("{name}.png")).exists(), "{name}");
    }
    if std::env::var_os("QLAYER_KEEP_SCREENSHOTS").is_some() {
        let _ = shots.keep();
    }
    svc.stop().await;
}

/// A form body, as a browser sends one.
trait Fields {
    fn fields<K: AsRef<str>, V: AsRef<str>>(self, fields: &[(K, V)]) -> Self;
}

impl Fields for reqwest::RequestBuilder {
    fn fields<K: AsRef<str>, V: AsRef<str>>(self, fields: &[(K, V)]) -> Self {
        let mut body = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in fields {
            body.append_pair(k.as_ref(), v.as_ref());
        }
        self.header("content-type", "application/x-www-form-urlencoded").body(body.finish())
    }
}

/// An HTTP client that does not follow redirects (the tests look at them).
fn plain() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// Signs in over HTTP; returns the cookie header and the page's anti-forgery token.
async fn session(http: &reqwest::Client, base: &str, key: &str) -> (String, String) {
    let r = http.post(format!("{base}/ui/sign-in")).fields(&[("key", key), ("next", "/ui/runs")]).send().await.unwrap();
    assert_eq!(r.status(), 303);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age=28800"] {
        assert!(set.contains(attribute), "{set}");
    }
    let cookie = set.split(';').next().unwrap().to_string();
    let page =
        http.get(format!("{base}/ui/runs")).header("cookie", &cookie).send().await.unwrap().text().await.unwrap();
    let csrf = page.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
    (cookie, csrf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_cookies_forms_and_headers_on_sqlite() {
    sessions_cookies_forms_and_headers(Backend::Sqlite).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_cookies_forms_and_headers_on_postgres() {
    sessions_cookies_forms_and_headers(Backend::Postgres).await
}

async fn sessions_cookies_forms_and_headers(backend: Backend) {
    let svc = service(backend, false, |_| {}).await;
    let http = plain();
    let base = svc.base.clone();
    let (_, acme) = svc.tenant("acme").await;
    let (viewer_id, viewer) = svc.key(&acme, "viewer").await;

    // Every page sends the security headers; the assets come from the binary.
    let r = http.get(format!("{base}/ui/sign-in")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    for directive in ["default-src 'none'", "script-src 'self'", "frame-ancestors 'none'", "form-action 'self'"] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    let page = r.text().await.unwrap();
    assert!(!page.contains("<script>") && !page.contains(" style="), "no inline script or style");
    assert!(page.contains("<label for=\"key\">"), "the field has a label");
    let js = http.get(format!("{base}/ui/assets/app.js")).send().await.unwrap();
    assert_eq!(js.headers()["content-type"], "text/javascript; charset=utf-8");

    // Signed out: pages send you to sign in and come back; no page is served.
    let r = http.get(format!("{base}/ui/runs/job_x?a=1")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui/sign-in?next=%2Fui%2Fruns%2Fjob_x%3Fa%3D1");
    // A sign-in from another site is refused before the key is looked at.
    let r = http
        .post(format!("{base}/ui/sign-in"))
        .header("origin", "http://evil.example")
        .fields(&[("key", acme.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("set-cookie").is_none());
    let r = http.post(format!("{base}/ui/sign-in")).fields(&[("key", "ql_nope")]).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("not valid"));

    let (cookie, csrf) = session(&http, &base, &acme).await;
    let post = |path: &str, fields: Vec<(&str, String)>, origin: Option<&str>| {
        let mut req = http.post(format!("{base}{path}")).header("cookie", &cookie).fields(&fields);
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        req.send()
    };
    // A form without the session's token, or from another site, changes nothing.
    let r = post("/ui/runs", vec![("requirement", "x".into())], None).await.unwrap();
    assert_eq!(r.status(), 403);
    let r = post("/ui/runs", vec![("requirement", "x".into()), ("csrf", "0".repeat(32))], None).await.unwrap();
    assert_eq!(r.status(), 403);
    let r = post("/ui/runs", vec![("requirement", "x".into()), ("csrf", csrf.clone())], Some("http://evil.example"))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(svc.get("/v1/jobs", &acme).await.body["items"], json!([]), "nothing was started");
    // A refused run keeps what was typed and names the problem.
    let r = post("/ui/runs", vec![("requirement", "  ".into()), ("csrf", csrf.clone())], None).await.unwrap();
    assert_eq!(r.status(), 400);
    let page = r.text().await.unwrap();
    assert!(page.contains("id=\"form-error\""), "{page}");
    // Markup in what a person typed is text on the page.
    let r = post(
        "/ui/runs",
        vec![("requirement", "<script>alert(1)</script>".into()), ("csrf", csrf.clone()), ("pipeline", "nope".into())],
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 404, "an unknown pipeline");
    let page = r.text().await.unwrap();
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;") && !page.contains("<script>alert"), "{page}");

    // A viewer's session can change nothing, even by posting the form itself.
    let (viewer_cookie, viewer_csrf) = session(&http, &base, &viewer).await;
    let r = http
        .post(format!("{base}/ui/runs"))
        .header("cookie", &viewer_cookie)
        .fields(&[("requirement", "x"), ("csrf", viewer_csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // The jobs page filters by status in the store; an unknown status is named.
    let r = http.get(format!("{base}/ui/jobs?status=cancelled")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("No jobs match."));
    let r = http.get(format!("{base}/ui/jobs?status=paused")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("status `paused` is not queued"));
    // Operators' pages are missing for everyone else, and there for the system tenant.
    let r = http.get(format!("{base}/ui/operators")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let (op_cookie, _) = session(&http, &base, ADMIN).await;
    let r = http.get(format!("{base}/ui/operators")).header("cookie", &op_cookie).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let page = r.text().await.unwrap();
    assert!(
        page.contains("The hash chain verifies") && page.contains("ui.sign-in") && page.contains(">acme<"),
        "{page}"
    );

    // Revoking the key ends its sessions; so does expiry; sign-out ends the session server-side.
    assert_eq!(svc.delete(&format!("/v1/keys/{viewer_id}"), &acme).await.status, 204);
    let r = http.get(format!("{base}/ui/runs")).header("cookie", &viewer_cookie).send().await.unwrap();
    assert_eq!(r.status(), 303, "the revoked key's session is over");
    let (expiring, _) = session(&http, &base, &acme).await;
    sqlx::query("UPDATE ui_sessions SET expires_at = 1").execute(svc.db().pool()).await.unwrap();
    let r = http.get(format!("{base}/ui/runs")).header("cookie", &expiring).send().await.unwrap();
    assert_eq!(r.status(), 303, "an expired session is over");
    assert!(r.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    let (cookie, csrf) = session(&http, &base, &acme).await;
    let r = http
        .post(format!("{base}/ui/sign-out"))
        .header("cookie", &cookie)
        .fields(&[("csrf", csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let r = http.get(format!("{base}/ui/runs")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(r.status(), 303, "the old cookie is worth nothing after sign-out");
    svc.stop().await;
}

/// The figure: the runs page of a tenant with 10,000 runs, rendered by the server (paged: the
/// newest 50), against the same page of `GET /v1/jobs` as JSON, in the same run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runs_page_with_ten_thousand_runs() {
    let svc = service(Backend::Sqlite, false, |_| {}).await;
    let (acme_id, acme) = svc.tenant("acme").await;
    let now = unix_ms();
    let mut tx = svc.db().pool().begin().await.unwrap();
    for i in 0..10_000i64 {
        // Finished runs only: the scheduler picks up unfinished ones.
        let status = ["succeeded", "failed", "cancelled"][(i % 3) as usize];
        sqlx::query(
            "INSERT INTO jobs (id, tenant_id, kind, status, priority, input, request_hash, created_at, updated_at, finished_at, task_count) \
             VALUES ($1, $2, 'run', $3, 0, $4, '', $5, $5, $5, 3)",
        )
        .bind(format!("job_{:016x}", i))
        .bind(&acme_id)
        .bind(status)
        .bind(json!({"requirement": format!("project number {i}: a todo list CLI in Rust with tests"), "pipeline": "default"}).to_string())
        .bind(now - 10_000 + i)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    let http = plain();
    let (cookie, _) = session(&http, &svc.base, &acme).await;
    let page =
        http.get(format!("{}/ui/runs", svc.base)).header("cookie", &cookie).send().await.unwrap().text().await.unwrap();
    assert_eq!(page.matches("<tr>").count(), 51, "a header row and 50 runs");
    assert!(page.contains("job_000000000000270f") && page.contains("Older runs"));
    let time = |path: String, auth: (&'static str, String)| {
        let http = http.clone();
        async move {
            let mut samples = Vec::new();
            for _ in 0..30 {
                let started = Instant::now();
                let r = http.get(&path).header(auth.0, &auth.1).send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
                samples.push(started.elapsed().as_micros() as i64);
            }
            median(samples)
        }
    };
    let ui = time(format!("{}/ui/runs", svc.base), ("cookie", cookie.clone())).await;
    let api =
        time(format!("{}/v1/jobs?kind=run&limit=50", svc.base), ("authorization", format!("Bearer {acme}"))).await;
    let older = time(format!("{}/ui/runs?after=job_0000000000000100", svc.base), ("cookie", cookie.clone())).await;

    // The first render in the browser: navigation timing of a fresh load.
    let driver = Driver::start();
    let dir = tempfile::tempdir().unwrap();
    let browser = driver.browser(dir.path(), true).await;
    sign_in(&browser, &svc.base, &acme).await;
    let mut paints = Vec::new();
    for _ in 0..5 {
        browser.goto(&format!("{}/ui/runs", svc.base)).await.unwrap();
        let t: Value = browser
            .execute(
                "const n = performance.getEntriesByType('navigation')[0];
                 return {response: n.responseEnd - n.startTime, dom: n.domContentLoadedEventEnd - n.startTime, load: n.loadEventEnd - n.startTime};",
                vec![],
            )
            .await
            .unwrap();
        paints.push(t);
    }
    browser.close().await.unwrap();
    let field = |f: &str| median(paints.iter().map(|t| t[f].as_f64().unwrap().round() as i64).collect());
    eprintln!(
        "figure: runs page of 10,000 runs (newest 50): server median {ui} µs, an older page {older} µs; baseline GET /v1/jobs?kind=run&limit=50 median {api} µs (ratio {:.2}); \
         in Chromium: response end {} ms, DOM ready {} ms, load {} ms (medians of 5 loads)",
        ui as f64 / api as f64,
        field("response"),
        field("dom"),
        field("load"),
    );
    svc.stop().await;
}
