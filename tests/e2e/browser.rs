//! A real headless Chromium (Debian's `chromium`, which `make test` installs), driven over
//! the Chrome DevTools Protocol: a WebSocket to the browser's debugging port, JSON
//! commands, answers matched by id. Just what the console tests need: open a page,
//! evaluate JavaScript in it, take a screenshot.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::common::PATIENCE;

/// How long Chromium may take to start and to answer a command.
const BROWSER_PATIENCE: Duration = Duration::from_secs(30);

pub struct Browser {
    child: tokio::process::Child,
    page: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    profile: PathBuf,
}

impl Browser {
    /// Starts Chromium on a fresh profile, `width` by `height` CSS pixels, with one blank
    /// page to drive.
    pub async fn start(width: u32, height: u32) -> Browser {
        let profile = std::env::temp_dir().join(format!(
            "cg-chromium-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let mut child = tokio::process::Command::new("chromium")
            .args([
                "--headless",
                // The tests may run as root, where Chromium's sandbox cannot start.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-extensions",
                "--disable-background-networking",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--mute-audio",
                "--remote-debugging-port=0",
                &format!("--window-size={width},{height}"),
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium runs (`make test` installs it: apt-get install chromium)");
        let stderr = child.stderr.take().expect("chromium's stderr");
        let mut lines = BufReader::new(stderr).lines();
        let endpoint = tokio::time::timeout(BROWSER_PATIENCE, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    return Some(url.trim().to_string());
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .expect("chromium prints its DevTools address");
        // Chromium stops if nobody reads what it logs.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        let (mut browser, _) = tokio_tungstenite::connect_async(&endpoint)
            .await
            .expect("the DevTools endpoint answers");
        let target = command(
            &mut browser,
            1,
            "Target.createTarget",
            json!({ "url": "about:blank" }),
        )
        .await
        .expect("a page");
        let target_id = target["targetId"].as_str().expect("a target id");
        let host = endpoint
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .expect("host:port");
        let (page, _) =
            tokio_tungstenite::connect_async(format!("ws://{host}/devtools/page/{target_id}"))
                .await
                .expect("the page's DevTools endpoint answers");
        Browser {
            child,
            page,
            next_id: 1,
            profile,
        }
    }

    /// Sends a DevTools command to the page and returns its result.
    pub async fn command(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        command(&mut self.page, self.next_id, method, params).await
    }

    /// Opens `url` and waits until the page has loaded.
    pub async fn open(&mut self, url: &str) {
        self.command("Page.navigate", json!({ "url": url }))
            .await
            .expect("navigates");
        self.wait_for("the page loads", "document.readyState === 'complete'")
            .await
            .expect("the page loads");
    }

    /// The value of a JavaScript expression in the page (promises awaited).
    pub async fn eval(&mut self, expression: &str) -> Result<Value, String> {
        let answer = self
            .command(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(exception) = answer.get("exceptionDetails") {
            return Err(format!("{expression}: {exception}"));
        }
        Ok(answer["result"]["value"].clone())
    }

    /// Evaluates `expression` until it is truthy (within [`PATIENCE`]) and returns it.
    pub async fn wait_for(&mut self, what: &str, expression: &str) -> Result<Value, String> {
        let started = Instant::now();
        loop {
            let value = self.eval(expression).await?;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return Ok(value);
            }
            if started.elapsed() > PATIENCE {
                return Err(format!("never happened: {what} ({expression})"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a PNG of the viewport, or of `clip` (x, y, width, height in CSS pixels)
    /// scaled by `scale`.
    pub async fn screenshot(&mut self, path: &Path, clip: Option<(f64, f64, f64, f64, f64)>) {
        let mut params = json!({ "format": "png" });
        if let Some((x, y, width, height, scale)) = clip {
            params["clip"] =
                json!({ "x": x, "y": y, "width": width, "height": height, "scale": scale });
            params["captureBeyondViewport"] = json!(true);
        }
        match self.command("Page.captureScreenshot", params).await {
            Ok(shot) => {
                let png = base64::engine::general_purpose::STANDARD
                    .decode(shot["data"].as_str().unwrap_or_default())
                    .expect("base64 PNG");
                if let Some(dir) = path.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                std::fs::write(path, png).expect("the screenshot is written");
            }
            Err(error) => eprintln!("no screenshot: {error}"),
        }
    }

    /// Closes the browser and removes its profile.
    pub async fn close(mut self) {
        let _ = self.command("Browser.close", json!({})).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let _ = self.child.kill().await;
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Where a failing test leaves its screenshot: under the target directory.
pub fn failure_screenshot(test: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("console-screenshots")
        .join(format!("{test}.png"))
}

/// Sends one command and reads until its answer, skipping the events in between.
async fn command(
    socket: &mut WebSocketStream<MaybeTlsStream<TcpStream>>,
    id: u64,
    method: &str,
    params: Value,
) -> Result<Value, String> {
    let request = json!({ "id": id, "method": method, "params": params });
    socket
        .send(Message::text(request.to_string()))
        .await
        .map_err(|e| format!("{method}: cannot send: {e}"))?;
    let deadline = Instant::now() + BROWSER_PATIENCE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, socket.next())
            .await
            .map_err(|_| format!("{method}: no answer"))?
            .ok_or_else(|| format!("{method}: the browser went away"))?
            .map_err(|e| format!("{method}: {e}"))?;
        let Message::Text(text) = message else {
            continue;
        };
        let answer: Value =
            serde_json::from_str(&text).map_err(|e| format!("{method}: not JSON: {e}"))?;
        if answer["id"] != id {
            continue;
        }
        if let Some(error) = answer.get("error") {
            return Err(format!("{method}: {error}"));
        }
        return Ok(answer["result"].clone());
    }
}
