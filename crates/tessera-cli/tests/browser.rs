//! The dashboard in a real browser: headless Chromium driven over WebDriver
//! (chromedriver) against `tessera up`, the way a person uses it — sign in,
//! submit a job from the form, follow its log live, watch it finish on the
//! Jobs page without reloading, look at the Overview's charts, cordon a
//! node, sign out. Screenshots of each page are saved as artifacts (the
//! test prints where).
//!
//! Needs `chromium` and `chromedriver` (Debian's `chromium` and
//! `chromium-driver`; `TESSERA_CHROMIUM` / `TESSERA_CHROMEDRIVER` name
//! others). Without them the test says SKIPPED and passes, except where
//! `TESSERA_REQUIRE_BROWSER` is set (`.ci/run` sets it).

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Up;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

fn find(var: &str, default: &str) -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var(var).unwrap_or_else(|_| default.into()));
    p.exists().then_some(p)
}

/// Chromium and chromedriver, or None (after saying SKIPPED) where they
/// are missing and not required.
fn browser() -> Option<(PathBuf, PathBuf)> {
    let chromium = find("TESSERA_CHROMIUM", "/usr/bin/chromium");
    let driver = find("TESSERA_CHROMEDRIVER", "/usr/bin/chromedriver");
    match (chromium, driver) {
        (Some(c), Some(d)) => Some((c, d)),
        _ => {
            assert!(
                std::env::var_os("TESSERA_REQUIRE_BROWSER").is_none(),
                "no chromium/chromedriver (install Debian's chromium and chromium-driver; .ci/run does)"
            );
            eprintln!("SKIPPED: no chromium/chromedriver; install chromium and chromium-driver");
            None
        }
    }
}

/// A chromedriver on a free loopback port, stopped on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start(path: &Path, log: &Path) -> Driver {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new(path)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Driver { child, url }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Shots {
    dir: PathBuf,
}

impl Shots {
    async fn save(&self, c: &Client, name: &str) {
        let png = c.screenshot().await.unwrap();
        let path = self.dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }
}

/// Runs `script` (which returns a value) until `ok` accepts its result.
async fn wait_js(c: &Client, what: &str, secs: u64, script: &str, ok: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v = c.execute(script, vec![]).await.unwrap_or(Value::Null);
        if ok(&v) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .text()
        .await
        .unwrap()
}

/// Clicks what `loc` finds and waits until the browser has loaded the page
/// the click leads to.
async fn click_nav(c: &Client, loc: Locator<'_>) {
    c.execute("window.beforeClick = true", vec![])
        .await
        .unwrap();
    c.find(loc).await.unwrap().click().await.unwrap();
    wait_js(
        c,
        "the next page",
        20,
        "return window.beforeClick !== true && document.readyState === 'complete'",
        |v| v == &Value::Bool(true),
    )
    .await;
}

const SPEC: &str = "name: browser-hello\n\
script: \"for i in 1 2 3 4 5 6 7 8 9 10; do echo tick-$i; sleep 1; done; echo all-done\"\n\
resources: {cpu: 0.5, memory: 64Mi}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_a_real_browser() {
    let Some((chromium, chromedriver)) = browser() else {
        return;
    };
    // GPUs from a recorded `nvidia-smi -q -x`, where the fixtures are here.
    let xml = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/gpu/h100/nvidia-smi-q.xml");
    let xml_arg = xml.to_string_lossy().to_string();
    let up = if xml.exists() {
        Up::start_with(&["--gpu-xml", &xml_arg])
    } else {
        Up::start()
    };
    let base = format!("http://{}", up.addr);
    let shots = Shots {
        dir: std::env::var_os("TESSERA_SCREENSHOTS")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots")),
    };
    std::fs::create_dir_all(&shots.dir).unwrap();
    let driver = Driver::start(&chromedriver, &up.dir.path().join("chromedriver.log"));
    let profile = up.dir.path().join("chromium-profile");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1440,1100", "--hide-scrollbars",
                     format!("--user-data-dir={}", profile.display())]
        }),
    );
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a WebDriver session with headless Chromium");
    let result = tokio::spawn(drive(c.clone(), base, up.token.clone(), shots)).await;
    let _ = c.close().await;
    drop(driver);
    if let Err(e) = result {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn drive(c: Client, base: String, token: String, shots: Shots) {
    // Not signed in: the dashboard sends us to the sign-in page.
    c.goto(&format!("{base}/ui/jobs")).await.unwrap();
    assert_eq!(c.current_url().await.unwrap().path(), "/ui/login");
    shots.save(&c, "01-sign-in").await;
    // A wrong token is refused with the reason.
    c.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys("tsr_wrong")
        .await
        .unwrap();
    click_nav(&c, Locator::Id("signin")).await;
    assert!(text(&c, "#signin-error")
        .await
        .contains("unknown or revoked token"));
    c.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(&token)
        .await
        .unwrap();
    click_nav(&c, Locator::Id("signin")).await;
    // Back where we were going, signed in as the admin.
    assert_eq!(c.current_url().await.unwrap().path(), "/ui/jobs");
    assert_eq!(text(&c, ".who .team").await, "admin");
    // The token is in an HttpOnly cookie: page scripts cannot read it.
    let cookies = c.execute("return document.cookie", vec![]).await.unwrap();
    assert!(
        !cookies.as_str().unwrap_or("").contains("tsr_"),
        "{cookies}"
    );

    // Submit a job from the form.
    click_nav(&c, Locator::Id("new-job")).await;
    c.find(Locator::Id("spec"))
        .await
        .unwrap()
        .clear()
        .await
        .unwrap();
    c.find(Locator::Id("spec"))
        .await
        .unwrap()
        .send_keys(SPEC)
        .await
        .unwrap();
    shots.save(&c, "01b-submit-form").await;
    click_nav(&c, Locator::Id("submit")).await;
    let url = c.current_url().await.unwrap();
    let id: u64 = url
        .path()
        .strip_prefix("/ui/jobs/")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not on a job page: {url}"));
    // Its log follows live: early lines arrive while it still runs.
    wait_js(
        &c,
        "the first log lines while the job runs",
        30,
        "return document.getElementById('log').textContent",
        |v| v.as_str().is_some_and(|t| t.contains("tick-2")),
    )
    .await;
    let log_now = text(&c, "#log").await;
    assert!(
        !log_now.contains("all-done"),
        "the job ended too soon: {log_now}"
    );
    shots.save(&c, "02-job-running").await;

    // The Overview counts it while it runs: its half core is allocated.
    click_nav(&c, Locator::LinkText("Overview")).await;
    let cpu = text(&c, ".stats .stat:nth-child(3) .value").await;
    assert!(cpu.starts_with("0.5 / "), "CPU allocated: {cpu}");

    // The Jobs page: the job is there, and finishes without a reload.
    click_nav(&c, Locator::LinkText("Jobs")).await;
    let row = format!("tr[data-job=\"{id}\"]");
    let state = text(&c, &format!("{row} .badge")).await;
    assert!(
        ["queued", "scheduled", "running"].contains(&state.as_str()),
        "{state}"
    );
    c.execute("window.stillHere = true", vec![]).await.unwrap();
    shots.save(&c, "03-jobs-running").await;
    wait_js(
        &c,
        "the job to show succeeded on the Jobs page",
        40,
        &format!("var b = document.querySelector('{row} .badge'); return b && b.textContent"),
        |v| v.as_str() == Some("succeeded"),
    )
    .await;
    let same_page = c
        .execute("return window.stillHere === true", vec![])
        .await
        .unwrap();
    assert_eq!(
        same_page,
        json!(true),
        "the page reloaded instead of refreshing in place"
    );
    shots.save(&c, "04-jobs-finished").await;

    // Its page: the whole log, exit code 0, events.
    click_nav(&c, Locator::Css(&format!("{row} a.jobname"))).await;
    wait_js(
        &c,
        "the complete log",
        20,
        "return document.getElementById('log').textContent",
        |v| v.as_str().is_some_and(|t| t.contains("all-done")),
    )
    .await;
    let log = text(&c, "#log").await;
    for i in 1..=10 {
        assert!(log.contains(&format!("tick-{i}")), "{log}");
    }
    assert_eq!(text(&c, "#job-exit").await, "0");
    assert_eq!(text(&c, "#job-state .badge").await, "succeeded");
    assert!(text(&c, "#events").await.contains("succeeded"));
    shots.save(&c, "05-job-finished").await;

    // The Overview: allocation chart and the job counted as started.
    c.goto(&format!("{base}/ui?window=1h")).await.unwrap();
    let lines = c
        .find_all(Locator::Css("#util-chart polyline, #util-chart circle"))
        .await
        .unwrap();
    assert!(
        !lines.is_empty(),
        "no series drawn on the utilisation chart"
    );
    let started = c
        .find_all(Locator::Css("#rate-chart rect.started"))
        .await
        .unwrap();
    assert!(
        !started.is_empty(),
        "the started job is not on the rate chart"
    );
    assert!(text(&c, "#rates")
        .await
        .contains("last hour: 1 started, 1 finished"));
    shots.save(&c, "06-overview").await;

    // Nodes: an admin cordons and uncordons the local node.
    click_nav(&c, Locator::LinkText("Nodes")).await;
    shots.save(&c, "07-nodes").await;
    click_nav(&c, Locator::XPath("//button[text()='Cordon']")).await;
    assert_eq!(text(&c, "#nodes .badge").await, "cordoned");
    click_nav(&c, Locator::XPath("//button[text()='Uncordon']")).await;
    assert_eq!(text(&c, "#nodes .badge").await, "ready");

    click_nav(&c, Locator::LinkText("Teams")).await;
    assert!(text(&c, "#teams").await.contains("admin"));
    shots.save(&c, "08-teams").await;
    click_nav(&c, Locator::LinkText("Services")).await;
    shots.save(&c, "09-services").await;

    // Sign out: the session is gone.
    click_nav(&c, Locator::Id("signout")).await;
    assert_eq!(c.current_url().await.unwrap().path(), "/ui/login");
    c.goto(&format!("{base}/ui")).await.unwrap();
    assert_eq!(c.current_url().await.unwrap().path(), "/ui/login");
    eprintln!("screenshots in {}", shots.dir.display());
}
