//! A small W3C WebDriver client: a real headless Chromium driven by `chromedriver` (Debian's
//! `chromium` and `chromium-driver`), for tests of what a page shows a person.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// The key W3C WebDriver names an element reference by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A program on `PATH`, if it is there.
pub fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file())
}

/// A browser session: chromedriver and the Chromium it started, gone when dropped. chromedriver
/// runs in a process group of its own, which Chromium's processes join, and dropping the
/// session kills the whole group: killing chromedriver alone would leave its Chromium running
/// after the test, one more with every run of the suite.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
}

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium window of `width`×`height`
    /// that records its console.
    pub async fn start(width: u32, height: u32) -> Browser {
        let chromium = on_path("chromium").expect("Debian's chromium is installed (.ci/run does)");
        let chromedriver = on_path("chromedriver").expect("chromium-driver is installed");
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let base = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        while request("GET", &format!("{base}/status"), None)
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver never answered"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--hide-scrollbars", format!("--window-size={width},{height}"),
                ],
            },
            "goog:loggingPrefs": { "browser": "ALL" },
        }}});
        let answer = request("POST", &format!("{base}/session"), Some(capabilities))
            .await
            .expect("a session starts");
        let session = answer["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {answer}"))
            .to_owned();
        Browser {
            driver,
            base,
            session,
        }
    }

    async fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        match request(method, &url, body).await {
            Ok(value) => value,
            Err(e) => panic!("WebDriver {method} {path}: {e}"),
        }
    }

    pub async fn open(&self, url: &str) {
        self.command("POST", "/url", Some(json!({ "url": url })))
            .await;
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page, with its result.
    pub async fn run(&self, script: &str, args: Value) -> Value {
        let body = json!({ "script": script, "args": args });
        self.command("POST", "/execute/sync", Some(body)).await
    }

    /// Runs `script` in the page and waits for it to call its last argument with the result.
    pub async fn run_async(&self, script: &str, args: Value) -> Value {
        let body = json!({ "script": script, "args": args });
        self.command("POST", "/execute/async", Some(body)).await
    }

    /// The first element matching `css`.
    pub async fn find(&self, css: &str) -> String {
        let body = json!({ "using": "css selector", "value": css });
        let found = self.command("POST", "/element", Some(body)).await;
        found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_owned()
    }

    pub async fn click(&self, css: &str) {
        let id = self.find(css).await;
        self.command("POST", &format!("/element/{id}/click"), Some(json!({})))
            .await;
    }

    /// Replaces what the input at `css` holds with `text`, typed.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).await;
        self.command("POST", &format!("/element/{id}/clear"), Some(json!({})))
            .await;
        self.command(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    /// The text a person sees in the element at `css` (hidden parts left out).
    pub async fn text(&self, css: &str) -> String {
        let id = self.find(css).await;
        let text = self
            .command("GET", &format!("/element/{id}/text"), None)
            .await;
        text.as_str().unwrap_or_default().to_owned()
    }

    /// Waits (up to 10 s of real time: the browser's own pace) until `script` returns true.
    pub async fn wait_for(&self, what: &str, script: &str) {
        let started = Instant::now();
        loop {
            if self.run(script, json!([])).await == Value::Bool(true) {
                return;
            }
            if started.elapsed() > Duration::from_secs(10) {
                let shown = self.text("body").await;
                panic!("the page never showed {what}; it shows:\n{shown}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn resize(&self, width: u32, height: u32) {
        let rect = json!({ "width": width, "height": height });
        self.command("POST", "/window/rect", Some(rect)).await;
    }

    /// Saves what the window shows as a PNG at `path`.
    pub async fn screenshot(&self, path: &Path) {
        let shot = self.command("GET", "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot.as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(path, png).unwrap();
    }

    /// The console entries since the last call: `(level, source, message)`.
    pub async fn console(&self) -> Vec<(String, String, String)> {
        let logs = self
            .command("POST", "/se/log", Some(json!({ "type": "browser" })))
            .await;
        logs.as_array()
            .into_iter()
            .flatten()
            .map(|entry| {
                let field = |name: &str| entry[name].as_str().unwrap_or_default().to_owned();
                (field("level"), field("source"), field("message"))
            })
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Ok(group) = libc::pid_t::try_from(self.driver.id()) {
            // SAFETY: kill takes no pointers; a negative pid names the process group that
            // chromedriver leads (`process_group(0)` above), its Chromium included.
            unsafe { libc::kill(-group, libc::SIGKILL) };
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// One WebDriver call; its `value`, or the error it answered with.
async fn request(method: &str, url: &str, body: Option<Value>) -> Result<Value, String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let ok = response.status().is_success();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let answer: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if ok {
        Ok(answer["value"].clone())
    } else {
        Err(answer["value"].to_string())
    }
}
