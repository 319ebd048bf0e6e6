//! The visualizer in a real browser: headless Chromium loads the embedded page, which renders the
//! nodes and tasks it receives over server-sent events, filters them, and follows a live change.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use shoal::ui::{ClusterView, MeshView, NodeView, ServiceView, TaskView};
use tokio::sync::watch;

fn task(service: &str, slot: u64, ip: &str) -> TaskView {
    TaskView {
        name: format!("{service}.{slot}.t{slot}"),
        service: service.into(),
        slot,
        state: "running".into(),
        health: None,
        ips: vec![ip.into()],
    }
}

fn node(i: u8, tasks: Vec<TaskView>) -> NodeView {
    NodeView {
        id: format!("id{i}"),
        hostname: format!("node{i}"),
        role: if i == 1 { "manager" } else { "worker" }.into(),
        manager_status: (i == 1).then(|| "Leader".into()),
        status: if i == 3 { "Down" } else { "Ready" }.into(),
        availability: if i == 2 { "Drain" } else { "Active" }.into(),
        addr: format!("198.18.0.{i}"),
        tasks,
    }
}

fn view() -> ClusterView {
    ClusterView {
        nodes: vec![
            node(1, vec![task("myhelloworld", 1, "10.0.0.3"), task("myredis", 1, "10.0.1.2")]),
            node(2, vec![task("myhelloworld", 2, "10.0.0.4")]),
            node(3, vec![]),
        ],
        services: vec![ServiceView {
            name: "myhelloworld".into(),
            mode: "replicated".into(),
            desired: 2,
            running: 2,
            published: vec!["8100:8100/tcp".into()],
            mesh: Some(MeshView {
                active_connections: 7,
                requests_per_second: Some(1234.0),
                bytes_per_second: 2.5e6,
                healthy_backends: 2,
                backends: 2,
            }),
        }],
    }
}

async fn start(views: watch::Receiver<ClusterView>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, shoal::ui::router(views)).await });
    format!("http://{addr}/")
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl").args(["-sS"]).args(args).output().expect("curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Headless Chromium driven over the DevTools protocol: the page keeps its event stream open, so
/// the test asks the live page for its DOM instead of waiting for it to finish loading.
struct Browser {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    ws: tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>,
    next_id: u64,
}

impl Browser {
    fn open(url: &str) -> Browser {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", dir.path().display()))
            .arg(url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            // Its own process group, so Drop can stop the renderers and helpers too.
            .process_group(0)
            .spawn()
            .expect("starting chromium");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let port_file = dir.path().join("DevToolsActivePort");
        let ws_url = loop {
            assert!(
                std::time::Instant::now() < deadline,
                "chromium did not open its DevTools port"
            );
            std::thread::sleep(Duration::from_millis(100));
            let Ok(text) = std::fs::read_to_string(&port_file) else { continue };
            let Some(port) = text.lines().next() else { continue };
            let list = curl(&[&format!("http://127.0.0.1:{port}/json/list")]);
            let Ok(targets) = serde_json::from_str::<Vec<serde_json::Value>>(&list) else {
                continue;
            };
            if let Some(ws) = targets
                .iter()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            {
                break ws.to_owned();
            }
        };
        let (ws, _) = tungstenite::connect(ws_url.as_str()).expect("DevTools websocket");
        Browser { child, _dir: dir, ws, next_id: 0 }
    }

    /// Sends one DevTools command and returns its `result`.
    fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = serde_json::json!({"id": id, "method": method, "params": params});
        self.ws.send(tungstenite::Message::text(msg.to_string())).unwrap();
        loop {
            let reply = self.ws.read().unwrap();
            let Ok(v) = serde_json::from_str::<serde_json::Value>(reply.to_text().unwrap_or(""))
            else {
                continue;
            };
            if v["id"] == id {
                return v["result"].clone();
            }
        }
    }

    /// Evaluates `expr` in the page and returns its value as a string.
    fn eval(&mut self, expr: &str) -> String {
        let r = self.call(
            "Runtime.evaluate",
            serde_json::json!({"expression": expr, "returnByValue": true}),
        );
        let value = &r["result"]["value"];
        value.as_str().map(str::to_owned).unwrap_or_else(|| value.to_string())
    }

    /// A PNG of the page as it is now.
    fn screenshot(&mut self) -> Vec<u8> {
        use base64::Engine as _;
        let r = self.call("Page.captureScreenshot", serde_json::json!({"format": "png"}));
        let data = r["data"].as_str().unwrap_or_default();
        base64::engine::general_purpose::STANDARD.decode(data).unwrap_or_default()
    }

    /// The page's DOM once `ready` (a JS boolean expression) holds, or whatever it is after 30 s.
    fn dom_when(&mut self, ready: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while self.eval(ready) != "true" && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.eval("document.documentElement.outerHTML")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_assets_json_and_event_stream() {
    let (_tx, rx) = watch::channel(view());
    let base = start(rx).await;
    let url = base.clone();
    let (html, js, json, sse) = tokio::task::spawn_blocking(move || {
        (
            curl(&[&url]),
            curl(&["-D", "-", &format!("{url}app.js")]),
            curl(&[&format!("{url}view")]),
            curl(&["-N", "--max-time", "2", &format!("{url}events")]),
        )
    })
    .await
    .unwrap();
    assert!(html.contains("<title>shoal visualizer</title>"), "{html}");
    assert!(
        js.to_lowercase().contains("content-type: text/javascript") && js.contains("EventSource")
    );
    assert_eq!(serde_json::from_str::<ClusterView>(&json).unwrap(), view());
    assert!(sse.starts_with("event: view\ndata: {"), "{sse}");
    assert!(sse.contains("\"hostname\":\"node2\""), "{sse}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_renders_filters_and_follows_live_changes() {
    if Command::new("chromium").arg("--version").output().is_err() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "chromium is required under CI");
        eprintln!(
            "*** SKIPPED chromium test: chromium not installed (scripts/install-test-deps.sh) ***"
        );
        return;
    }
    let (tx, rx) = watch::channel(view());
    let base = start(rx).await;

    let url = base.clone();
    let dom = tokio::task::spawn_blocking(move || {
        Browser::open(&url).dom_when("document.querySelectorAll('[data-node]').length === 3")
    })
    .await
    .unwrap();
    for i in 1..=3 {
        assert!(dom.contains(&format!("data-node=\"node{i}\"")), "node{i} column missing:\n{dom}");
    }
    assert_eq!(
        dom.matches("data-service=\"myhelloworld\"").count(),
        3,
        "2 task cards + 1 row:\n{dom}"
    );
    assert!(dom.contains("Leader") && dom.contains("Drain") && dom.contains("Down"));
    assert!(dom.contains("1.2k") && dom.contains("2/2"), "mesh figures:\n{dom}");
    assert!(dom.contains(">live<"), "the event stream must be connected:\n{dom}");

    // The filter box (prefilled from ?q=) hides the other services' cards.
    let url = format!("{base}?q=myredis");
    let dom = tokio::task::spawn_blocking(move || {
        Browser::open(&url).dom_when("document.querySelectorAll('[data-node]').length === 3")
    })
    .await
    .unwrap();
    assert_eq!(dom.matches("data-service=\"myhelloworld\"").count(), 0, "{dom}");
    assert_eq!(dom.matches("data-service=\"myredis\"").count(), 1, "{dom}");

    // A task moves while the page is open: the page follows without a reload.
    let url = base.clone();
    let (mut browser, before) = tokio::task::spawn_blocking(move || {
        let mut b = Browser::open(&url);
        let dom = b.dom_when("document.querySelectorAll('[data-task]').length === 3");
        (b, dom)
    })
    .await
    .unwrap();
    assert!(!before.contains("data-task=\"moved\""));
    let mut v = view();
    let moved = v.nodes[0].tasks.remove(0);
    v.nodes[2].tasks.push(TaskView { name: "moved".into(), ..moved });
    tx.send(v).unwrap();
    let after = tokio::task::spawn_blocking(move || {
        browser.dom_when("!!document.querySelector('[data-node=\"node3\"] [data-task=\"moved\"]')")
    })
    .await
    .unwrap();
    assert!(after.contains("data-task=\"moved\""), "live update not rendered:\n{after}");
}

/// The visualizer of a real 3-node lab running the demo: a column per node, a card per task, and
/// after `node update --availability drain node1` the cards leave node1's column while the page
/// stays open. A screenshot of the drained cluster is kept in target/test-artifacts/.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_follows_a_drain_in_a_real_cluster() {
    if !common::require_root("chromium_follows_a_drain_in_a_real_cluster") {
        return;
    }
    if Command::new("chromium").arg("--version").output().is_err() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "chromium is required under CI");
        eprintln!("*** SKIPPED chromium lab test: chromium not installed ***");
        return;
    }
    let lab = tokio::task::spawn_blocking(|| common::Lab::up_with(3, &["--demo"])).await.unwrap();
    let url = format!("http://{}:8089/", lab.addr(1));
    let cards = |node: u8| {
        format!("document.querySelectorAll('[data-node=\"node{node}\"] [data-task]').length")
    };
    let (mut browser, dom) = tokio::task::spawn_blocking({
        let ready = format!(
            "document.querySelectorAll('[data-node]').length === 3 && {} === 1 && {} === 1 && {} === 2",
            cards(1),
            cards(2),
            cards(3)
        );
        move || {
            let mut b = Browser::open(&url);
            let dom = b.dom_when(&ready);
            (b, dom)
        }
    })
    .await
    .unwrap();
    for i in 1..=3 {
        assert!(dom.contains(&format!("data-node=\"node{i}\"")), "node{i} column missing:\n{dom}");
    }
    assert_eq!(dom.matches("data-task=").count(), 4, "3 replicas and myredis:\n{dom}");

    let out = lab.shoal(&["--node", "node1", "node", "update", "--availability", "drain", "node1"]);
    assert!(out.status.success(), "{out:?}");
    let ready = format!(
        "{} === 0 && document.querySelectorAll('[data-service=\"myhelloworld\"][data-task]').length === 3",
        cards(1)
    );
    let (after, png) = tokio::task::spawn_blocking(move || {
        let dom = browser.dom_when(&ready);
        (dom, browser.screenshot())
    })
    .await
    .unwrap();
    let node1 = after.split("data-node=\"node1\"").nth(1).unwrap_or("");
    let node1 = node1.split("data-node=").next().unwrap_or("");
    assert!(!node1.contains("data-task="), "node1 still shows tasks after the drain:\n{after}");
    assert!(after.contains("Drain"), "{after}");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("../test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("visualizer-drain.png"), &png).unwrap();
    drop(lab);
}
