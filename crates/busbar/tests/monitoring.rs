//! The broker's monitoring listener: counts after scripted traffic, Prometheus text that a
//! parser accepts, JSON views, and the dashboard page in headless Chromium (when installed).

mod common;

use std::time::Duration;

use busbar::{ClientOptions, EventBus};
use busbar_broker::{Broker, SlowConsumerPolicy};
use busbar_core::{Frame, Sub};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A plain HTTP/1.1 GET: (status, body).
async fn get(broker: &Broker, path: &str) -> (u16, String) {
    let addr = broker.http_addr().expect("monitoring enabled");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response)).await.unwrap().unwrap();
    let text = String::from_utf8(response).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

async fn json(broker: &Broker, path: &str) -> serde_json::Value {
    let (status, body) = get(broker, path).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

async fn monitored_broker(policy: SlowConsumerPolicy) -> Broker {
    let mut config = config();
    config.http = Some("127.0.0.1:0".parse().unwrap());
    config.slow_consumer = policy;
    broker_with(config).await
}

fn metric(samples: &prometheus_parse::Scrape, name: &str) -> f64 {
    let s = samples.samples.iter().find(|s| s.metric == name).unwrap_or_else(|| panic!("no metric {name}"));
    match s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        _ => panic!("unexpected type for {name}"),
    }
}

#[tokio::test]
async fn endpoints_count_scripted_traffic() {
    let broker = monitored_broker(SlowConsumerPolicy::Disconnect).await;
    let options = |name: &str| ClientOptions::new(broker.local_addr().to_string()).name(name);
    let mut subs = Vec::new();
    let mut clients = Vec::new();
    for i in 0..3 {
        let c = busbar::Client::connect_with(options(&format!("sub-{i}"))).await.unwrap();
        subs.push(c.subscribe("orders.>").await.unwrap());
        clients.push(c);
    }
    let publisher = busbar::Client::connect_with(options("publisher")).await.unwrap();
    for i in 0..100u32 {
        publisher.publish("orders.created", i.to_be_bytes().to_vec()).await.unwrap();
    }
    publisher.flush().await.unwrap();
    for s in &mut subs {
        for _ in 0..100 {
            tokio::time::timeout(PATIENCE, s.next()).await.unwrap().unwrap();
        }
    }

    assert_eq!(json(&broker, "/healthz").await["status"], "ok");
    let varz = json(&broker, "/varz").await;
    assert_eq!(varz["stats"]["messages_in"], 100);
    assert_eq!(varz["stats"]["deliveries"], 300);
    assert_eq!(varz["stats"]["connections"], 4);
    assert_eq!(varz["stats"]["subscriptions"], 3);
    assert_eq!(varz["limits"]["max_frame_size"], 1024 * 1024);

    let connz = json(&broker, "/connz").await;
    assert_eq!(connz["count"], 4);
    let conns = connz["connections"].as_array().unwrap();
    let publisher_row = conns.iter().find(|c| c["name"] == "publisher").unwrap();
    assert_eq!(publisher_row["msgs_in"], 100);
    assert_eq!(publisher_row["subscriptions"], 0);
    for i in 0..3 {
        let row = conns.iter().find(|c| c["name"] == format!("sub-{i}")).unwrap();
        assert_eq!((row["subscriptions"].as_u64(), row["msgs_out"].as_u64()), (Some(1), Some(100)), "{row}");
        assert!(row["address"].as_str().unwrap().starts_with("127.0.0.1:"));
    }
    let subsz = json(&broker, "/subsz").await;
    assert_eq!(subsz["count"], 3);
    assert!(subsz["subscriptions"].as_array().unwrap().iter().all(|s| s["pattern"] == "orders.>"));

    let (status, text) = get(&broker, "/metrics").await;
    assert_eq!(status, 200);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    assert_eq!(metric(&scrape, "busbar_messages_in_total"), 100.0);
    assert_eq!(metric(&scrape, "busbar_deliveries_total"), 300.0);
    assert_eq!(metric(&scrape, "busbar_messages_out_total"), 300.0);
    assert_eq!(metric(&scrape, "busbar_connections"), 4.0);
    assert_eq!(metric(&scrape, "busbar_subscriptions"), 3.0);
    let listener = scrape.samples.iter().find(|s| s.metric == "busbar_messages_in_total").unwrap();
    assert_eq!(listener.labels.get("listener"), Some("native"));

    // Requests and no-responders show too.
    publisher.request("nobody", "", Duration::from_secs(5)).await.unwrap_err();
    let varz = json(&broker, "/varz").await;
    assert_eq!(
        (varz["stats"]["requests"].as_u64(), varz["stats"]["no_responders"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(get(&broker, "/nope").await.0, 404);
}

#[tokio::test]
async fn a_dropped_message_shows_in_the_drop_counter() {
    let broker = monitored_broker(SlowConsumerPolicy::Drop).await;
    let mut slow = Raw::hello(&broker).await;
    slow.send(Frame::Sub(Sub { sid: 1, pattern: "flood".into(), group: None, kind: Default::default() }))
        .await;
    slow.send(Frame::Ping).await;
    assert_eq!(slow.read().await, Some(Frame::Pong));
    let publisher = client(&broker).await;
    // Far more than the socket buffers and the 64 MiB outbox hold: some must be dropped.
    let payload = vec![0u8; 512 * 1024];
    for _ in 0..400 {
        publisher.publish("flood", payload.clone()).await.unwrap();
    }
    publisher.flush().await.unwrap();
    let (_, text) = get(&broker, "/metrics").await;
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let dropped = scrape.samples.iter().find(|s| s.metric == "busbar_dropped_total").unwrap();
    assert_eq!(dropped.labels.get("reason"), Some("slow_consumer"));
    assert!(metric(&scrape, "busbar_dropped_total") > 0.0, "{text}");
    let connz = json(&broker, "/connz").await;
    let row = &connz["connections"].as_array().unwrap().iter().find(|c| c["name"] == "raw").unwrap().clone();
    assert!(row["dropped"].as_u64().unwrap() > 0);
}

/// Chromium from Debian's package, if installed.
fn chromium() -> Option<std::path::PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"].iter().find_map(|name| {
        std::env::var_os("PATH")?
            .to_str()?
            .split(':')
            .map(|dir| std::path::Path::new(dir).join(name))
            .find(|p| p.is_file())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_connections_in_a_real_browser() {
    let Some(chromium) = chromium() else {
        eprintln!("skipped: chromium is not installed (apt-get install chromium); .ci/run installs it");
        return;
    };
    let broker = monitored_broker(SlowConsumerPolicy::Disconnect).await;
    let a = client(&broker).await;
    let _sub = a.subscribe("dash.>").await.unwrap();
    let _b = client(&broker).await;
    let url = format!("http://{}/", broker.http_addr().unwrap());
    let profile = std::env::temp_dir().join(format!("busbar-chromium-{}", std::process::id()));
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let common_args = |extra: &[String]| {
        let mut args: Vec<String> = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=4000",
            "--window-size=1100,700",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        args.extend(extra.iter().cloned());
        args.push(url.clone());
        args
    };
    // Bounded, and a Chromium that hangs is killed with every process it started: a blocking
    // wait would keep the test binary (and CI) from ever exiting.
    let run = |args: Vec<String>| {
        let mut command = tokio::process::Command::new(&chromium);
        command.args(args).kill_on_drop(true).stdout(std::process::Stdio::piped());
        command.stderr(std::process::Stdio::piped()).process_group(0);
        async move {
            let child = command.spawn().expect("chromium starts");
            let group = child.id().expect("running");
            let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await;
            if out.is_err() {
                let _ = std::process::Command::new("kill").args(["-KILL", &format!("-{group}")]).status();
            }
            out.expect("chromium finishes").expect("chromium's output")
        }
    };
    let dom = run(common_args(&["--dump-dom".into()])).await;
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(html.contains(r#"id="connections">2<"#), "the page shows the live connection count:\n{html}");
    assert!(html.contains(r#"id="subscriptions">1<"#), "{html}");
    let shot_arg = format!("--screenshot={}", shot.display());
    let out = run(common_args(&[shot_arg])).await;
    assert!(shot.exists(), "screenshot saved: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("dashboard screenshot: {}", shot.display());
    let _ = std::fs::remove_dir_all(profile);
}

#[tokio::test]
async fn the_routes_gauge_counts_the_routes_up() {
    let cluster = |node, seeds: Vec<std::net::SocketAddr>| {
        let mut c = busbar_broker::ClusterConfig::new("m", node, "127.0.0.1:0".parse().unwrap());
        c.routes = seeds;
        c
    };
    let mut first = config();
    first.http = Some("127.0.0.1:0".parse().unwrap());
    first.cluster = Some(cluster(1, vec![]));
    let a = broker_with(first).await;
    let b = broker_with(busbar_broker::Config {
        cluster: Some(cluster(2, vec![a.cluster_addr().unwrap()])),
        ..config()
    })
    .await;
    eventually("the route is up", || a.routes().len() == 1 && b.routes().len() == 1).await;
    let (status, text) = get(&a, "/metrics").await;
    assert_eq!(status, 200);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    assert_eq!(metric(&scrape, "busbar_routes"), 1.0);
}
