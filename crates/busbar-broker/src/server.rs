//! The accept loop, shared broker state, graceful shutdown, and the embedding API.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

use busbar_core::{ErrorCode, ErrorFrame};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, error, info, info_span, warn};

use crate::config::Config;
use crate::requests::Requests;
use crate::router::Router;
use crate::session::{self, Control};

/// What monitoring shows of a connection.
#[derive(Debug)]
pub(crate) struct ConnMeta {
    pub(crate) name: String,
    /// "native" or "nats".
    pub(crate) protocol: &'static str,
    pub(crate) service: Option<String>,
    pub(crate) addr: SocketAddr,
    pub(crate) since: SystemTime,
    pub(crate) control: Arc<Control>,
}

/// Errors that stop the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration is inconsistent.
    #[error("configuration: {0}")]
    Config(#[from] crate::config_file::ConfigError),
    /// The TLS files are missing or unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// Any other I/O failure of the listener.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Argon2 checks that may run at once (each takes ~19 MiB and a core for tens of ms).
const AUTH_CHECKS_AT_ONCE: usize = 4;

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    pub(crate) fn inc(&self) {
        self.add(1);
    }
    pub(crate) fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) messages_in: Counter,
    pub(crate) bytes_in: Counter,
    pub(crate) messages_out: Counter,
    pub(crate) bytes_out: Counter,
    pub(crate) expired_requests: Counter,
    pub(crate) deliveries: Counter,
    pub(crate) connections_total: Counter,
    pub(crate) connections_refused: Counter,
    pub(crate) requests: Counter,
    pub(crate) no_responders: Counter,
    pub(crate) late_replies: Counter,
    pub(crate) undeliverable: Counter,
    pub(crate) slow_consumers: Counter,
    pub(crate) dropped: Counter,
    pub(crate) auth_failures: Counter,
    pub(crate) permission_denied: Counter,
}

/// Message traffic since start.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Traffic {
    pub(crate) messages_in: u64,
    pub(crate) bytes_in: u64,
    pub(crate) messages_out: u64,
    pub(crate) bytes_out: u64,
    pub(crate) deliveries: u64,
}

/// A snapshot of what the broker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Stats {
    /// Connections open now.
    pub connections: u64,
    /// Subscriptions held now, over all connections.
    pub subscriptions: u64,
    /// PUB frames received since start.
    pub messages_in: u64,
    /// Messages queued for delivery to subscribers since start.
    pub deliveries: u64,
    /// Connections accepted since start.
    pub connections_total: u64,
    /// Connections refused at the connection limit since start.
    pub connections_refused: u64,
    /// REQUEST frames received since start.
    pub requests: u64,
    /// Requests answered with NoResponders since start.
    pub no_responders: u64,
    /// Requests waiting for replies now.
    pub requests_pending: u64,
    /// Replies that found no waiting request (late or unknown) since start.
    pub late_replies: u64,
    /// Direct messages to a service that is not connected, dropped since start.
    pub undeliverable: u64,
    /// Connections closed as slow consumers since start.
    pub slow_consumers: u64,
    /// Messages dropped for slow consumers (policy `Drop`) since start.
    pub dropped: u64,
    /// Failed authentications since start.
    pub auth_failures: u64,
    /// Refused publishes, subscriptions, requests and replies since start.
    pub permission_denied: u64,
    /// Routes to other brokers of the cluster that are up now.
    pub routes: u64,
}

/// State shared by the accept loop and every session.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    router: RwLock<Router>,
    requests: Mutex<Requests>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) stats: Arc<Counters>,
    /// Who is connected, for monitoring.
    pub(crate) conns: Mutex<HashMap<u32, ConnMeta>>,
    pub(crate) started: SystemTime,
    /// This broker's id, announced to NATS clients.
    pub(crate) server_id: String,
    /// Routes to the other brokers, when this one is in a cluster.
    pub(crate) cluster: Option<crate::cluster::Cluster>,
    /// Password checks allowed to run at once.
    pub(crate) auth_slots: Arc<tokio::sync::Semaphore>,
    open: AtomicU64,
    next_id: AtomicU32,
}

impl Shared {
    pub(crate) fn router(&self) -> RwLockReadGuard<'_, Router> {
        // No code path panics while holding the lock; if one ever did, the router's data is still
        // consistent (every mutation completes before the guard drops), so poisoning is ignored.
        self.router.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn router_mut(&self) -> RwLockWriteGuard<'_, Router> {
        self.router.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn requests(&self) -> MutexGuard<'_, Requests> {
        self.requests.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new service id: never 0 ("nobody"), also after the counter wraps; in a cluster, the
    /// node id in the top byte, so that ids are unique cluster-wide.
    pub(crate) fn next_service_id(&self) -> u32 {
        let node = self.cluster.as_ref().map_or(0, |c| u32::from(c.node()));
        loop {
            let n = self.next_id.fetch_add(1, Ordering::Relaxed);
            let id = if node == 0 { n } else { (node << 24) | (n & 0x00FF_FFFF) };
            let valid = id & 0x00FF_FFFF != 0 || (node == 0 && id != 0);
            // After the counter wraps, an id may still be held by a long-lived connection.
            if valid && !self.conns().contains_key(&id) {
                return id;
            }
        }
    }

    /// Removes a closed connection from the registry, adding its traffic to the totals.
    pub(crate) fn unregister(&self, id: u32) {
        let mut conns = self.conns();
        if let Some(meta) = conns.remove(&id) {
            let c = &meta.control;
            let k = &self.stats;
            k.messages_in.add(c.msgs_in.load(Ordering::Relaxed));
            k.bytes_in.add(c.bytes_in.load(Ordering::Relaxed));
            k.messages_out.add(c.msgs_out.load(Ordering::Relaxed));
            k.bytes_out.add(c.bytes_out.load(Ordering::Relaxed));
            k.deliveries.add(c.deliveries.load(Ordering::Relaxed));
        }
    }

    /// Traffic since start: the totals of closed connections plus the open ones' counters (and
    /// what the routes that are up have forwarded).
    pub(crate) fn traffic(&self) -> Traffic {
        // Under the registry's lock: a connection leaving folds its counts in under it too.
        let conns = self.conns();
        let k = &self.stats;
        let mut t = Traffic {
            messages_in: k.messages_in.get(),
            bytes_in: k.bytes_in.get(),
            messages_out: k.messages_out.get(),
            bytes_out: k.bytes_out.get(),
            deliveries: k.deliveries.get(),
        };
        for meta in conns.values() {
            let c = &meta.control;
            t.messages_in += c.msgs_in.load(Ordering::Relaxed);
            t.bytes_in += c.bytes_in.load(Ordering::Relaxed);
            t.messages_out += c.msgs_out.load(Ordering::Relaxed);
            t.bytes_out += c.bytes_out.load(Ordering::Relaxed);
            t.deliveries += c.deliveries.load(Ordering::Relaxed);
        }
        // Routes after the totals: one that goes down in between is missed for this snapshot
        // (the next one has it), never counted twice.
        if let Some(cluster) = &self.cluster {
            for route in cluster.routes() {
                t.messages_out += route.control.msgs_out.load(Ordering::Relaxed);
                t.bytes_out += route.control.bytes_out.load(Ordering::Relaxed);
            }
        }
        t
    }

    pub(crate) fn conns(&self) -> MutexGuard<'_, HashMap<u32, ConnMeta>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn stats(&self) -> Stats {
        // One lock at a time: guards in a struct literal would all live to its end, and holding
        // the router while taking the routes lock inverts the order route registration takes.
        let routes = self.cluster.as_ref().map_or(0, |c| c.routes().len() as u64);
        let subscriptions = self.router().subscription_count() as u64;
        let requests_pending = self.requests().len() as u64;
        let traffic = self.traffic();
        Stats {
            connections: self.open.load(Ordering::Relaxed),
            subscriptions,
            messages_in: traffic.messages_in,
            deliveries: traffic.deliveries,
            connections_total: self.stats.connections_total.get(),
            connections_refused: self.stats.connections_refused.get(),
            requests: self.stats.requests.get(),
            no_responders: self.stats.no_responders.get(),
            requests_pending,
            late_replies: self.stats.late_replies.get(),
            undeliverable: self.stats.undeliverable.get(),
            slow_consumers: self.stats.slow_consumers.get(),
            dropped: self.stats.dropped.get(),
            auth_failures: self.stats.auth_failures.get(),
            permission_denied: self.stats.permission_denied.get(),
            routes,
        }
    }
}

/// Binds `config.listen` and serves until `shutdown` completes, then drains. The `busbar serve`
/// command is this function plus a signal handler.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), BrokerError> {
    let listener = bind(config.listen).await?;
    serve(listener, config, shutdown).await
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, BrokerError> {
    TcpListener::bind(addr).await.map_err(|source| BrokerError::Bind { addr, source })
}

/// Serves on an already bound listener (`config.listen` is ignored) until `shutdown` completes:
/// stops accepting, tells every client the server is shutting down, and waits up to
/// `config.drain_timeout` for their queues to flush.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BrokerError> {
    config.validate()?;
    let http = bind_opt(config.http).await?;
    let nats = bind_opt(config.nats_listen).await?;
    let cluster = bind_opt(config.cluster.as_ref().map(|c| c.listen)).await?;
    let acceptor = config.tls.as_ref().map(crate::tls::acceptor).transpose()?;
    let listeners = Listeners { native: listener, nats, http, cluster };
    let shared = new_shared(config, &listeners)?;
    serve_shared(listeners, acceptor, shared, shutdown).await
}

async fn bind_opt(addr: Option<SocketAddr>) -> Result<Option<TcpListener>, BrokerError> {
    match addr {
        Some(addr) => Ok(Some(bind(addr).await?)),
        None => Ok(None),
    }
}

/// The broker's listeners: native clients, NATS clients, monitoring.
struct Listeners {
    native: TcpListener,
    nats: Option<TcpListener>,
    http: Option<TcpListener>,
    cluster: Option<TcpListener>,
}

/// Which protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Native,
    Nats,
}

/// One open connection, counted in `Shared::open` while it lives.
struct Opened(Arc<Shared>);

impl Drop for Opened {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn accept_on(listener: Option<&TcpListener>) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// The address to tell others for a listener bound to `bound`: `advertise` when set; else
/// `bound`, unless it is a wildcard (0.0.0.0 or ::), which no one can dial: then this machine's
/// address on its default route (`local_ip`), with the bound port. When there is none (no
/// default route), the wildcard as before, with a warning naming the setting (`key`): a broker
/// that does not start would be worse than failover that needs configuring.
fn advertised(
    bound: SocketAddr,
    advertise: Option<SocketAddr>,
    key: &'static str,
    local_ip: impl Fn(bool) -> std::io::Result<std::net::IpAddr>,
) -> SocketAddr {
    if let Some(a) = advertise {
        return a;
    }
    if !bound.ip().is_unspecified() {
        return bound;
    }
    // A dual-stack wildcard (::) on a host with only IPv4 routes: its IPv4 address serves.
    let found = local_ip(bound.is_ipv4()).or_else(|e| if bound.is_ipv6() { local_ip(true) } else { Err(e) });
    match found {
        Ok(ip) if !ip.is_unspecified() => {
            let chosen = SocketAddr::new(ip, bound.port());
            info!(%bound, advertised = %chosen, "listening on a wildcard address: telling others {chosen}; set `{key}` to choose");
            chosen
        }
        outcome => {
            let why = outcome.map_or_else(|e| e.to_string(), |ip| format!("got {ip}"));
            warn!(%bound, %why, "listening on a wildcard address and this machine's own address is unknown: others are told {bound}, which they cannot dial; set `{key}`");
            bound
        }
    }
}

/// This machine's source address toward the internet (a connected UDP socket: nothing is sent).
fn default_route_ip(v4: bool) -> std::io::Result<std::net::IpAddr> {
    let (any, documentation): (SocketAddr, SocketAddr) = if v4 {
        (([0, 0, 0, 0], 0).into(), ([192, 0, 2, 1], 9).into())
    } else {
        (
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            ("2001:db8::1".parse::<std::net::Ipv6Addr>().expect("an address"), 9).into(),
        )
    };
    let probe = std::net::UdpSocket::bind(any)?;
    probe.connect(documentation)?;
    Ok(probe.local_addr()?.ip())
}

fn new_shared(config: Config, listeners: &Listeners) -> Result<Arc<Shared>, BrokerError> {
    let cluster = match (&config.cluster, &listeners.cluster) {
        (Some(c), Some(l)) => {
            let nats = listeners.nats.as_ref().map(TcpListener::local_addr).transpose()?;
            Some(crate::cluster::Cluster::new(
                c.clone(),
                advertised(l.local_addr()?, c.advertise, "cluster.advertise", default_route_ip),
                advertised(
                    listeners.native.local_addr()?,
                    c.client_advertise,
                    "cluster.client_advertise",
                    default_route_ip,
                ),
                nats.map(|n| advertised(n, c.nats_advertise, "cluster.nats_advertise", default_route_ip)),
            )?)
        }
        _ => None,
    };
    let requests = Mutex::new(Requests::new(config.max_frame_size));
    Ok(Arc::new(Shared {
        config,
        router: RwLock::default(),
        requests,
        shutdown: CancellationToken::new(),
        stats: Arc::default(),
        conns: Mutex::default(),
        started: SystemTime::now(),
        server_id: format!("BUSBAR{:016X}", rand::random::<u64>()),
        cluster,
        auth_slots: Arc::new(tokio::sync::Semaphore::new(AUTH_CHECKS_AT_ONCE)),
        open: AtomicU64::new(0),
        next_id: AtomicU32::new(1),
    }))
}

async fn serve_shared(
    listeners: Listeners,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BrokerError> {
    let Listeners { native: listener, nats, http, cluster } = listeners;
    let addr = listener.local_addr()?;
    info!(%addr, "busbar broker listening");
    if let Some(nats) = &nats {
        info!(addr = %nats.local_addr()?, "NATS protocol listening");
    }
    let tracker = TaskTracker::new();
    if let Some(http) = http {
        tracker.spawn(crate::monitor::serve(http, shared.clone()));
    }
    tracker.spawn(sweep_requests(shared.clone()));
    if let (Some(routes), Some(c)) = (cluster, shared.cluster.as_ref()) {
        info!(addr = %c.cluster_url, node = c.node(), cluster = %c.config.name, "route listener up");
        tracker.spawn(crate::cluster::listen(routes, shared.clone()));
        for &seed in &c.config.routes {
            crate::cluster::ensure_dialer(&shared, seed, true);
        }
    }
    tokio::pin!(shutdown);
    loop {
        let (accepted, protocol) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => (accepted, Protocol::Native),
            accepted = accept_on(nats.as_ref()) => (accepted, Protocol::Nats),
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Most likely out of file descriptors: back off instead of spinning.
                error!(error = %e, "accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if shared.open.load(Ordering::Relaxed) >= shared.config.max_connections as u64 {
            shared.stats.connections_refused.inc();
            warn!(%peer, limit = shared.config.max_connections, "connection limit reached, refusing");
            let reason = ErrorFrame {
                code: ErrorCode::TooManyConnections,
                correlation: 0,
                message: "connection limit reached".into(),
            };
            tracker.spawn(session::refuse(
                stream,
                reason,
                Duration::from_secs(1),
                protocol == Protocol::Nats,
            ));
            continue;
        }
        shared.open.fetch_add(1, Ordering::Relaxed);
        shared.stats.connections_total.inc();
        let id = shared.next_service_id();
        let span = info_span!("conn", id, %peer, name = tracing::field::Empty);
        let tls = acceptor.clone().map(|a| (a, shared.config.tls.as_ref().is_none_or(|t| t.required)));
        let s = shared.clone();
        tracker.spawn(
            async move {
                // Given back however the session ends, a panic included: a slot lost for good
                // would count against max_connections until the broker restarts.
                let _open = Opened(s.clone());
                match protocol {
                    Protocol::Native => session::accept(stream, peer, id, s.clone(), tls).await,
                    Protocol::Nats => crate::nats::accept(stream, peer, id, s.clone(), tls).await,
                }
            }
            .instrument(span),
        );
    }
    info!(connections = shared.open.load(Ordering::Relaxed), "shutting down: draining connections");
    drop(listener);
    drop(nats);
    shared.shutdown.cancel();
    tracker.close();
    let grace = shared.config.drain_timeout + Duration::from_secs(1);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!("drain timeout: some connections did not close in time");
    }
    info!("broker stopped");
    Ok(())
}

/// Forgets requests whose requesters have stopped waiting, once a second, until shutdown.
async fn sweep_requests(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {
                let expired = shared.requests().expire(tokio::time::Instant::now());
                shared.stats.expired_requests.add(expired as u64);
                if expired > 0 {
                    tracing::debug!(expired, "expired requests forgotten");
                }
            }
        }
    }
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}

/// A broker running in the background of this process, for embedding and tests.
///
/// ```no_run
/// # async fn demo() -> Result<(), busbar_broker::BrokerError> {
/// let broker = busbar_broker::Broker::start(busbar_broker::Config::with_listen("127.0.0.1:0".parse().unwrap())).await?;
/// println!("listening on {}", broker.local_addr());
/// broker.stop().await;
/// # Ok(()) }
/// ```
///
/// Dropping the handle stops the broker too (without waiting for it).
#[derive(Debug)]
pub struct Broker {
    addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    nats_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), BrokerError>>>,
}

impl Broker {
    /// Binds `config.listen` and starts serving on the current tokio runtime.
    pub async fn start(config: Config) -> Result<Self, BrokerError> {
        config.validate()?;
        let listener = bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let http = bind_opt(config.http).await?;
        let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
        let nats = bind_opt(config.nats_listen).await?;
        let nats_addr = nats.as_ref().and_then(|l| l.local_addr().ok());
        let cluster = bind_opt(config.cluster.as_ref().map(|c| c.listen)).await?;
        // Certificates are checked here, so that a bad file is an error of `start` itself.
        let acceptor = config.tls.as_ref().map(crate::tls::acceptor).transpose()?;
        let listeners = Listeners { native: listener, nats, http, cluster };
        let shared = new_shared(config, &listeners)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_shared(listeners, acceptor, shared.clone(), async move {
            let _ = stopped.await;
        }));
        Ok(Self { addr, http_addr, nats_addr, shared, stop: Some(stop), task: Some(task) })
    }

    /// The route address this broker gives its peers, when it is in a cluster: its route
    /// listener's, unless `ClusterConfig::advertise` says otherwise.
    pub fn cluster_addr(&self) -> Option<SocketAddr> {
        self.shared.cluster.as_ref().map(|c| c.cluster_url)
    }

    /// The routes to other brokers that are up.
    pub fn routes(&self) -> Vec<crate::cluster::RouteView> {
        crate::cluster::views(&self.shared)
    }

    /// Route addresses this broker keeps dialling (configured seeds and addresses learned by
    /// gossip): those of brokers not connected, and the seeds. Stale learned ones (a broker now
    /// reached at another address) are dropped, so this does not grow with restarts.
    pub fn route_addresses(&self) -> usize {
        crate::cluster::dialing(&self.shared)
    }

    /// The address of the NATS protocol listener, when `Config::nats_listen` is set.
    pub fn nats_addr(&self) -> Option<SocketAddr> {
        self.nats_addr
    }

    /// The address of the monitoring listener, when `Config::http` is set.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The address the broker listens on (with the real port when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Current counts.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Stops accepting, tells clients, waits for the drain (bounded by `drain_timeout`).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_wildcard_listener_is_advertised_by_an_address_others_can_dial() {
        let never = |_| -> std::io::Result<std::net::IpAddr> { unreachable!("not needed") };
        let set = advertised(addr("0.0.0.0:4901"), Some(addr("10.1.2.3:7000")), "k", never);
        assert_eq!(set, addr("10.1.2.3:7000"), "an advertise setting wins");
        assert_eq!(advertised(addr("127.0.0.1:4901"), None, "k", never), addr("127.0.0.1:4901"));
        // A wildcard: this machine's address (found by the function given), with the bound port.
        let found = advertised(addr("0.0.0.0:4901"), None, "k", |v4| {
            assert!(v4);
            Ok("10.9.8.7".parse().unwrap())
        });
        assert_eq!(found, addr("10.9.8.7:4901"));
        let v6 = advertised(addr("[::]:4222"), None, "k", |v4| {
            assert!(!v4);
            Ok("fd00::5".parse().unwrap())
        });
        assert_eq!(v6, addr("[fd00::5]:4222"));
        // :: on a host with IPv4 routes only: its IPv4 address.
        let v4_only = advertised(addr("[::]:4222"), None, "k", |v4| {
            if v4 { Ok("10.9.8.7".parse().unwrap()) } else { Err(std::io::Error::other("no route")) }
        });
        assert_eq!(v4_only, addr("10.9.8.7:4222"));
        // None found (no default route): the broker still starts, advertising what it bound.
        let lost = advertised(addr("0.0.0.0:4900"), None, "k", |_| Err(std::io::Error::other("unreachable")));
        assert_eq!(lost, addr("0.0.0.0:4900"));
    }
}
