//! The monitoring HTTP listener (off unless `Config::http` is set): health, Prometheus metrics,
//! JSON views of connections, subscriptions and the server, and a live dashboard page.
//!
//! | path | what |
//! |------|------|
//! | `/healthz` | `{"status":"ok"}` while the broker serves (503 once it is shutting down) |
//! | `/metrics` | Prometheus text format, encoded by the `prometheus` crate |
//! | `/varz` | server: name, version, uptime, limits, and the counters of [`crate::Stats`] |
//! | `/connz` | connections: id, name, service, address, subscriptions, pending bytes, traffic |
//! | `/subsz` | subscriptions: connection, id, pattern, group, kind |
//! | `/routez` | the cluster: this node, and each route with its peer, direction, age, remote clients and subscriptions, traffic |
//! | `/` | the dashboard: one self-contained HTML page polling `/varz` and `/connz` |

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use prometheus::{Encoder, IntCounter, IntGauge, Opts, Registry, TextEncoder};
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::server::Shared;

const DASHBOARD: &str = include_str!("dashboard.html");

/// Serves the monitoring endpoints on `listener` until the broker shuts down.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "monitoring listening");
    }
    let stop = shared.shutdown.clone();
    let app = axum::Router::new()
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/varz", get(varz))
        .route("/connz", get(connz))
        .route("/subsz", get(subsz))
        .route("/routez", get(routez))
        .with_state(shared);
    let listener = Limited::new(listener, MAX_HTTP_CONNECTIONS, HTTP_IDLE, HTTP_REQUEST);
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await {
        warn!(error = %e, "monitoring listener failed");
    }
}

/// Monitoring connections open at once; the next waits in the kernel's backlog until one closes.
/// Dashboards and scrapers need a handful: the bound keeps a flood of idle sockets from taking
/// the file descriptors the broker's own listeners need.
const MAX_HTTP_CONNECTIONS: usize = 64;

/// A monitoring connection that neither sends nor takes a byte for this long is closed (an
/// idle keep-alive, or a reader that stopped reading).
const HTTP_IDLE: Duration = Duration::from_secs(30);

/// A request must have arrived whole and been answered (the first byte of its answer written)
/// within this long of its first byte: a client trickling a byte at a time would otherwise keep
/// its slot for ever. axum serves without hyper's header timeout, which needs a timer it is not
/// given.
const HTTP_REQUEST: Duration = Duration::from_secs(10);

/// A listener for `axum::serve` with at most `max` connections open, each held to [`Guarded`]'s
/// deadlines.
struct Limited {
    inner: TcpListener,
    slots: Arc<tokio::sync::Semaphore>,
    idle: Duration,
    request: Duration,
}

impl Limited {
    fn new(inner: TcpListener, max: usize, idle: Duration, request: Duration) -> Self {
        Self { inner, slots: Arc::new(tokio::sync::Semaphore::new(max)), idle, request }
    }
}

impl axum::serve::Listener for Limited {
    type Io = Guarded;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Guarded, std::net::SocketAddr) {
        let slot = self.slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        // TcpListener's own accept: it retries, and waits a second after errors such as EMFILE.
        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        let deadline = Box::pin(tokio::time::sleep(self.idle));
        let guarded =
            Guarded { stream, _slot: slot, idle: self.idle, request: self.request, started: None, deadline };
        (guarded, addr)
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }
}

/// A monitoring connection: holds its slot, and fails its I/O once it has made no progress for
/// `idle`, or once a request begun `request` ago has not been answered.
struct Guarded {
    stream: tokio::net::TcpStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
    idle: Duration,
    request: Duration,
    /// When the first byte of the request being read arrived (none between requests).
    started: Option<tokio::time::Instant>,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Guarded {
    /// Bytes came in (`read`) or went out: the deadlines move.
    fn progress(&mut self, read: bool) {
        let now = tokio::time::Instant::now();
        if read {
            self.started.get_or_insert(now);
        } else {
            self.started = None;
        }
        let mut next = now + self.idle;
        if let Some(started) = self.started {
            next = next.min(started + self.request);
        }
        self.deadline.as_mut().reset(next);
    }

    /// A poll that found nothing to do: past the deadline, it is an error.
    fn waiting<T>(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "monitoring connection idle, or its request too slow",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl tokio::io::AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Pending => this.waiting(cx),
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.progress(true);
                }
                Poll::Ready(r)
            }
        }
    }
}

impl tokio::io::AsyncWrite for Guarded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_write(cx, buf) {
            Poll::Pending => this.waiting(cx),
            Poll::Ready(r) => {
                if r.as_ref().is_ok_and(|n| *n > 0) {
                    this.progress(false);
                }
                Poll::Ready(r)
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.stream).poll_flush(cx) {
            Poll::Pending => this.waiting(cx),
            ready => ready,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.shutdown.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"status": "shutting down"})))
            .into_response()
    } else {
        Json(serde_json::json!({"status": "ok"})).into_response()
    }
}

#[derive(Serialize)]
struct Varz {
    server_name: String,
    version: &'static str,
    uptime_secs: u64,
    now_ms: u128,
    listen: String,
    limits: Limits,
    stats: crate::Stats,
}

#[derive(Serialize)]
struct Limits {
    max_frame_size: usize,
    max_connections: usize,
    max_subscriptions: usize,
    max_pending: usize,
    max_pending_bytes: usize,
    max_requests: usize,
    slow_consumer: String,
    heartbeat_interval_ms: u128,
    heartbeat_max_missed: u32,
    handshake_timeout_ms: u128,
}

async fn varz(State(shared): State<Arc<Shared>>) -> Json<Varz> {
    let c = &shared.config;
    let since = |t: SystemTime| SystemTime::now().duration_since(t).unwrap_or_default();
    Json(Varz {
        server_name: c.server_name.clone(),
        version: env!("CARGO_PKG_VERSION"),
        uptime_secs: since(shared.started).as_secs(),
        now_ms: since(SystemTime::UNIX_EPOCH).as_millis(),
        listen: c.listen.to_string(),
        limits: Limits {
            max_frame_size: c.max_frame_size,
            max_connections: c.max_connections,
            max_subscriptions: c.max_subscriptions,
            max_pending: c.max_pending,
            max_pending_bytes: c.max_pending_bytes,
            max_requests: c.max_requests,
            slow_consumer: format!("{:?}", c.slow_consumer),
            heartbeat_interval_ms: c.heartbeat_interval.as_millis(),
            heartbeat_max_missed: c.heartbeat_max_missed,
            handshake_timeout_ms: c.handshake_timeout.as_millis(),
        },
        stats: shared.stats(),
    })
}

#[derive(Serialize)]
struct ConnView {
    id: u32,
    name: String,
    protocol: &'static str,
    service: Option<String>,
    address: String,
    connected_secs: u64,
    subscriptions: usize,
    pending_bytes: usize,
    msgs_in: u64,
    bytes_in: u64,
    msgs_out: u64,
    bytes_out: u64,
    dropped: u64,
}

async fn connz(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let counts = shared.router().subscription_counts();
    let mut conns: Vec<ConnView> = shared
        .conns()
        .iter()
        .map(|(&id, m)| {
            let c = &m.control;
            ConnView {
                id,
                name: m.name.clone(),
                protocol: m.protocol,
                service: m.service.clone(),
                address: m.addr.to_string(),
                connected_secs: SystemTime::now().duration_since(m.since).unwrap_or_default().as_secs(),
                subscriptions: counts.get(&id).copied().unwrap_or(0),
                pending_bytes: c.pending_bytes.load(Ordering::Relaxed),
                msgs_in: c.msgs_in.load(Ordering::Relaxed),
                bytes_in: c.bytes_in.load(Ordering::Relaxed),
                msgs_out: c.msgs_out.load(Ordering::Relaxed),
                bytes_out: c.bytes_out.load(Ordering::Relaxed),
                dropped: c.dropped.load(Ordering::Relaxed),
            }
        })
        .collect();
    conns.sort_by_key(|c| c.id);
    Json(serde_json::json!({ "count": conns.len(), "connections": conns }))
}

/// Most subscriptions listed by `/subsz` (the count is always exact).
const SUBSZ_LIMIT: usize = 10_000;

async fn subsz(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let (count, subs) = {
        let router = shared.router();
        (router.subscription_count(), router.subscriptions_limited(SUBSZ_LIMIT))
    };
    let truncated = subs.len() < count;
    Json(serde_json::json!({ "count": count, "truncated": truncated, "subscriptions": subs }))
}

async fn routez(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let routes = crate::cluster::views(&shared);
    let cluster = shared.cluster.as_ref().map(|c| {
        serde_json::json!({ "name": c.config.name, "node": c.node(), "cluster_url": c.cluster_url.to_string() })
    });
    Json(serde_json::json!({ "cluster": cluster, "count": routes.len(), "routes": routes }))
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    match encode_metrics(&shared) {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The broker's counters as Prometheus metrics. The counters live in the broker as plain
/// atomics on the hot path; a fresh registry is filled from a snapshot at each scrape.
fn encode_metrics(shared: &Shared) -> prometheus::Result<String> {
    let registry = Registry::new();
    let s = shared.stats();
    let k = shared.traffic();
    let counter = |name: &str, help: &str, labels: &[(&str, &str)], value: u64| -> prometheus::Result<()> {
        let mut opts = Opts::new(name, help);
        for (key, v) in labels {
            opts = opts.const_label(*key, *v);
        }
        let c = IntCounter::with_opts(opts)?;
        c.inc_by(value);
        registry.register(Box::new(c))
    };
    let gauge = |name: &str, help: &str, value: u64| -> prometheus::Result<()> {
        let g = IntGauge::new(name, help)?;
        g.set(i64::try_from(value).unwrap_or(i64::MAX));
        registry.register(Box::new(g))
    };
    let native = [("listener", "native")];
    counter(
        "busbar_messages_in_total",
        "Messages received from clients (PUB and REQUEST).",
        &native,
        s.messages_in,
    )?;
    counter("busbar_bytes_in_total", "Bytes of messages received from clients.", &native, k.bytes_in)?;
    counter("busbar_messages_out_total", "Messages written to subscribers (MSG).", &native, k.messages_out)?;
    counter("busbar_bytes_out_total", "Bytes of messages written to subscribers.", &native, k.bytes_out)?;
    counter("busbar_deliveries_total", "Messages queued for delivery to subscriptions.", &[], s.deliveries)?;
    counter(
        "busbar_dropped_total",
        "Messages dropped, by reason.",
        &[("reason", "slow_consumer")],
        s.dropped,
    )?;
    counter(
        "busbar_undeliverable_total",
        "Direct messages to a service that is not connected.",
        &[],
        s.undeliverable,
    )?;
    counter("busbar_slow_consumers_total", "Connections closed as slow consumers.", &[], s.slow_consumers)?;
    counter("busbar_connections_total", "Connections accepted.", &[], s.connections_total)?;
    counter(
        "busbar_connections_refused_total",
        "Connections refused at the limit.",
        &[],
        s.connections_refused,
    )?;
    counter("busbar_requests_total", "Requests received.", &[], s.requests)?;
    counter("busbar_no_responders_total", "Requests answered NoResponders.", &[], s.no_responders)?;
    counter(
        "busbar_request_timeouts_total",
        "Requests forgotten after their timeout.",
        &[],
        shared.stats.expired_requests.get(),
    )?;
    counter("busbar_late_replies_total", "Replies that found no waiting request.", &[], s.late_replies)?;
    counter("busbar_auth_failures_total", "Failed authentications.", &[], s.auth_failures)?;
    counter(
        "busbar_permission_denied_total",
        "Refused publishes, subscriptions, requests, replies.",
        &[],
        s.permission_denied,
    )?;
    gauge("busbar_connections", "Connections open now.", s.connections)?;
    gauge("busbar_subscriptions", "Subscriptions held now.", s.subscriptions)?;
    gauge("busbar_requests_pending", "Requests waiting for replies now.", s.requests_pending)?;
    gauge("busbar_routes", "Routes to other brokers of the cluster that are up now.", s.routes)?;
    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;
    use futures_util::FutureExt;
    use tokio::io::AsyncReadExt;

    #[tokio::test(start_paused = true)]
    async fn monitoring_connections_are_bounded_and_closed_when_idle() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut listener = Limited::new(tcp, 1, Duration::from_millis(100), Duration::from_secs(60));
        let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut first, _) = listener.accept().await;
        // The one slot is taken: the next connection waits (in the backlog) until it is free.
        let _next = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut waiting = Box::pin(listener.accept());
        assert!((&mut waiting).now_or_never().is_none(), "no second connection while the first is open");
        // The silent peer is closed once `idle` passes without a byte (the paused clock jumps
        // there as soon as everything waits).
        let mut buf = [0u8; 16];
        let e = first.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        drop(first);
        let (_second, _) = waiting.await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_trickling_in_is_cut_off() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let (idle, request) = (Duration::from_millis(100), Duration::from_millis(250));
        let mut listener = Limited::new(tcp, 1, idle, request);
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await;
        // A byte every 50 ms: never idle for 100 ms, but the request never ends.
        let trickle = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for _ in 0..100 {
                if client.write_all(b"G").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let began = tokio::time::Instant::now();
        let mut buf = [0u8; 16];
        let e = loop {
            match server.read(&mut buf).await {
                Ok(n) => assert!(n > 0, "the client does not close"),
                Err(e) => break e,
            }
        };
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        let took = began.elapsed();
        assert!(took >= request && took < request + idle, "cut off at the request deadline: {took:?}");
        trickle.abort();
    }
}
