//! Routes between the brokers of a cluster: handshake, gossip of route addresses, the route
//! session that applies a peer's interest and forwarded traffic, and the dialers that keep the
//! mesh whole.
//!
//! ```text
//!  dialer (seed or learned URL) ─connect─► HELLO{route, node, urls…} ─► WELCOME{…}   (acceptor)
//!                 both sides: register (one route per peer) ─► Router::add_route (snapshot)
//!  route read loop: SUB/UNSUB (ids in the header) → remote subscriptions
//!                   MSG → Router::route_from_peer   CALL → local responder   REPLY → Requests
//! ```
//!
//! A route speaks the native protocol. SUB and UNSUB carry the subscribing client's service id
//! as the header's source id; UNSUB with sid `u64::MAX` says the client is gone. MSG carries the
//! target client as the header's destination id and its subscription as sid, or sid `u64::MAX`
//! for "every matching plain subscription of your clients". Forwarded messages are never
//! forwarded again: one hop, so no loops and no duplicates in a full mesh.
//!
//! At most one route per pair of brokers: when both dialled each other, the connection started
//! by the broker with the lower node id stays, on both sides alike.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use busbar_core::{ErrorCode, ErrorFrame, Frame, FrameCodec, Headers, Hello, Reply, Welcome, frame};
use bytes::BytesMut;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Decoder, FramedRead};
use tracing::{debug, info, warn};

use crate::config::ClusterConfig;
use crate::router::{GONE, node_of};
use crate::server::Shared;
use crate::session::{self, Control, Link, Native, Outbox, error};

/// Longest pause between two attempts to reach a route.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// What a route frame may exceed `max_frame_size` by (a forwarded message gains route fields).
const ROUTE_FRAME_SLACK: usize = 1024;
/// A route that stays up at least this long counts as a success: the next redial starts quick.
const STABLE_ROUTE: Duration = Duration::from_secs(2);
/// Failed attempts after which a learned (not configured) route address is given up.
const LEARNED_ATTEMPTS: u32 = 30;
/// Most route addresses dialled at once (configured and learned).
const MAX_DIALERS: usize = 256;

/// HELLO/WELCOME properties of a route handshake.
mod prop {
    pub(super) const ROUTE: &str = "route";
    pub(super) const NODE: &str = "node";
    pub(super) const TOKEN: &str = "token";
    pub(super) const CLUSTER_URL: &str = "cluster_url";
    pub(super) const CLIENT_URL: &str = "client_url";
    pub(super) const NATS_URL: &str = "nats_url";
    pub(super) const ROUTES: &str = "routes";
    /// A random number each broker draws at start: tells a restarted broker from another one
    /// given the same node id.
    pub(super) const INSTANCE: &str = "instance";
    /// The largest frame this broker reads (its `max_frame_size`; a route reads 1 KiB more).
    pub(super) const MAX_FRAME: &str = "max_frame_size";
}

/// The cluster side of a broker.
#[derive(Debug)]
pub(crate) struct Cluster {
    pub(crate) config: ClusterConfig,
    /// Where this broker's route listener is (the real port).
    pub(crate) cluster_url: SocketAddr,
    /// Where its clients connect (native, and NATS when on).
    pub(crate) client_url: SocketAddr,
    pub(crate) nats_url: Option<SocketAddr>,
    routes: Mutex<HashMap<u8, RouteInfo>>,
    dialing: Mutex<HashSet<SocketAddr>>,
    next_link: AtomicU64,
    /// Mutual TLS on routes, when configured.
    tls: Option<crate::tls::RouteTlsEnds>,
    /// This broker's instance (see [`prop::INSTANCE`]).
    instance: u64,
    /// Per node id, the instances whose route a route from another instance of the same node
    /// replaced (the last few): one that comes back is a second broker with that node id, not
    /// a restart, and is refused rather than let the two replace each other for ever.
    replaced: Mutex<HashMap<u8, Vec<u64>>>,
}

/// Instances remembered per node id in [`Cluster::replaced`].
const REPLACED_KEPT: usize = 8;

/// A route that is up.
#[derive(Debug, Clone)]
pub(crate) struct RouteInfo {
    pub(crate) node: u8,
    pub(crate) name: String,
    pub(crate) cluster_url: SocketAddr,
    pub(crate) client_url: Option<SocketAddr>,
    pub(crate) nats_url: Option<SocketAddr>,
    /// This broker dialled it.
    pub(crate) outbound: bool,
    pub(crate) since: SystemTime,
    pub(crate) control: Arc<Control>,
    /// Tells this connection from another one to the same broker.
    link: u64,
    /// The peer's instance (0: not said).
    instance: u64,
}

/// A route as monitoring shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RouteView {
    /// The peer's node id.
    pub node: u8,
    /// The peer's server name.
    pub name: String,
    /// The peer's route listener.
    pub cluster_url: String,
    /// The peer's client listener.
    pub client_url: Option<String>,
    /// "outbound" (this broker dialled) or "inbound".
    pub direction: &'static str,
    /// Seconds since the route came up.
    pub connected_secs: u64,
    /// The peer's clients with subscriptions this broker knows of.
    pub remote_clients: usize,
    /// Their subscriptions.
    pub remote_subscriptions: usize,
    /// Frames received from the peer.
    pub msgs_in: u64,
    /// Messages sent to the peer.
    pub msgs_out: u64,
    /// Bytes queued for the peer.
    pub pending_bytes: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Cluster {
    pub(crate) fn new(
        config: ClusterConfig,
        cluster_url: SocketAddr,
        client_url: SocketAddr,
        nats_url: Option<SocketAddr>,
    ) -> Result<Self, crate::BrokerError> {
        let tls = config.tls.as_ref().map(crate::tls::route_ends).transpose()?;
        Ok(Self {
            tls,
            config,
            cluster_url,
            client_url,
            nats_url,
            routes: Mutex::default(),
            dialing: Mutex::default(),
            next_link: AtomicU64::new(1),
            instance: rand::random::<u64>() | 1,
            replaced: Mutex::default(),
        })
    }

    /// True when instance `instance` of node `node` had its route replaced by another instance.
    fn was_replaced(&self, node: u8, instance: u64) -> bool {
        lock(&self.replaced).get(&node).is_some_and(|seen| seen.contains(&instance))
    }

    pub(crate) fn node(&self) -> u8 {
        self.config.node_id
    }

    /// The routes that are up.
    pub(crate) fn routes(&self) -> Vec<RouteInfo> {
        let mut out: Vec<RouteInfo> = lock(&self.routes).values().cloned().collect();
        out.sort_by_key(|r| r.node);
        out
    }

    /// Client addresses of every broker of the cluster, this one first (for WELCOME's
    /// `connect_urls`, or NATS INFO's with `nats`).
    pub(crate) fn connect_urls(&self, nats: bool) -> Vec<String> {
        let own = if nats { self.nats_url } else { Some(self.client_url) };
        let routes = lock(&self.routes);
        let peers = routes.values().filter_map(|r| if nats { r.nats_url } else { r.client_url });
        own.into_iter().chain(peers).map(|a| a.to_string()).collect()
    }

    fn handshake_properties(&self, max_frame_size: usize) -> Headers {
        let mut p = Headers::new();
        p.insert(prop::MAX_FRAME, max_frame_size.to_string());
        p.insert(prop::ROUTE, self.config.name.as_str());
        p.insert(prop::NODE, self.node().to_string());
        p.insert(prop::INSTANCE, self.instance.to_string());
        if let Some(token) = &self.config.token {
            p.insert(prop::TOKEN, token.as_str());
        }
        p.insert(prop::CLUSTER_URL, self.cluster_url.to_string());
        p.insert(prop::CLIENT_URL, self.client_url.to_string());
        if let Some(nats) = self.nats_url {
            p.insert(prop::NATS_URL, nats.to_string());
        }
        let known: Vec<String> = lock(&self.routes).values().map(|r| r.cluster_url.to_string()).collect();
        p.insert(prop::ROUTES, known.join(","));
        p
    }
}

/// What a peer said of itself in its handshake.
struct Peer {
    node: u8,
    name: String,
    cluster_url: SocketAddr,
    client_url: Option<SocketAddr>,
    nats_url: Option<SocketAddr>,
    routes: Vec<SocketAddr>,
    /// The peer's `max_frame_size`, when it says (brokers of an older version do not).
    max_frame: Option<usize>,
    /// Its instance; 0 when it does not say.
    instance: u64,
}

/// Checks a peer's handshake properties against this broker's cluster.
fn peer(cluster: &Cluster, name: &str, p: &Headers) -> Result<Peer, String> {
    if p.get(prop::ROUTE) != Some(cluster.config.name.as_str()) {
        return Err(format!("not a route of cluster {:?}", cluster.config.name));
    }
    if let Some(token) = &cluster.config.token {
        let given = p.get(prop::TOKEN).unwrap_or("");
        if !crate::auth::constant_time_eq(token.as_bytes(), given.as_bytes()) {
            return Err("route authentication failed".into());
        }
    }
    let node: u8 = p.get(prop::NODE).and_then(|n| n.parse().ok()).filter(|&n| n != 0).ok_or("bad node id")?;
    if node == cluster.node() {
        return Err(format!("node id {node} is this broker's own"));
    }
    let addr = |key| p.get(key).and_then(|a| a.parse::<SocketAddr>().ok());
    let cluster_url = addr(prop::CLUSTER_URL).ok_or("no cluster_url")?;
    let instance = p.get(prop::INSTANCE).and_then(|i| i.parse().ok()).unwrap_or(0);
    if instance != 0 && cluster.was_replaced(node, instance) {
        return Err(format!(
            "node id {node} is used by two brokers: the one at {cluster_url} was replaced by another \
             with the same id; give each broker its own node_id"
        ));
    }
    let routes = gossip(p);
    Ok(Peer {
        node,
        name: name.to_string(),
        cluster_url,
        client_url: addr(prop::CLIENT_URL),
        nats_url: addr(prop::NATS_URL),
        routes,
        max_frame: p.get(prop::MAX_FRAME).and_then(|m| m.parse().ok()),
        instance,
    })
}

/// The route addresses a peer says it is connected to.
fn gossip(p: &Headers) -> Vec<SocketAddr> {
    p.get(prop::ROUTES).unwrap_or("").split(',').filter_map(|a| a.parse().ok()).take(255).collect()
}

/// Accepts routes until shutdown.
pub(crate) async fn listen(listener: TcpListener, shared: Arc<Shared>) {
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, addr) = tokio::select! {
            () = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    debug!(error = %e, "route accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        tracker.spawn(accept(stream, addr, shared.clone()));
    }
    tracker.close();
    tracker.wait().await;
}

type Reader = FramedRead<session::ReadHalf, RouteCodec>;

/// Frames with the source and destination ids of their header.
#[derive(Debug)]
struct RouteCodec(FrameCodec);

impl Decoder for RouteCodec {
    type Item = ((u32, u32), Frame);
    type Error = busbar_core::CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        let ids = frame::ids(src).unwrap_or_default();
        Ok(self.0.decode(src)?.map(|f| (ids, f)))
    }
}

fn reader(rd: session::ReadHalf, shared: &Shared) -> Reader {
    // Routes carry other brokers' traffic: frames up to the limit, plus route headers.
    FramedRead::with_capacity(
        rd,
        RouteCodec(FrameCodec::new(shared.config.max_frame_size + ROUTE_FRAME_SLACK)),
        64 * 1024,
    )
}

async fn accept(stream: TcpStream, addr: SocketAddr, shared: Arc<Shared>) {
    let Some(cluster) = shared.cluster.as_ref() else { return };
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout;
    let (rd, mut wr): (session::ReadHalf, session::WriteHalf) = match &cluster.tls {
        None => {
            let (rd, wr) = stream.into_split();
            (Box::new(rd), Box::new(wr))
        }
        Some(tls) => match tokio::time::timeout_at(deadline, tls.acceptor.accept(stream)).await {
            Ok(Ok(stream)) => {
                let (rd, wr) = tokio::io::split(stream);
                (Box::new(rd), Box::new(wr))
            }
            Ok(Err(e)) => {
                shared.stats.auth_failures.inc();
                warn!(%addr, error = %e, "route TLS handshake failed");
                return;
            }
            Err(_) => return,
        },
    };
    let mut reader = reader(rd, &shared);
    let hello = match tokio::time::timeout_at(deadline, reader.next()).await {
        Ok(Some(Ok((_, Frame::Hello(h))))) => h,
        _ => {
            debug!(%addr, "no route HELLO");
            return;
        }
    };
    let peer = match peer(cluster, &hello.name, &hello.properties) {
        Ok(p) => p,
        Err(why) => {
            warn!(%addr, why, "route refused");
            shared.stats.auth_failures.inc();
            let e = error(ErrorCode::AuthenticationFailed, 0, format!("route refused: {why}"));
            let _ = write_frame(&mut wr, Frame::Error(e)).await;
            return;
        }
    };
    let welcome = Welcome {
        service_id: 0,
        max_frame_size: u32::try_from(shared.config.max_frame_size).unwrap_or(u32::MAX),
        heartbeat_ms: u32::try_from(shared.config.heartbeat_interval.as_millis()).unwrap_or(u32::MAX),
        server_name: shared.config.server_name.clone().into(),
        server_version: env!("CARGO_PKG_VERSION").into(),
        properties: cluster.handshake_properties(shared.config.max_frame_size),
    };
    if write_frame(&mut wr, Frame::Welcome(welcome)).await.is_err() {
        return;
    }
    run(reader, wr, peer, false, shared).await;
}

async fn write_frame(wr: &mut (impl AsyncWriteExt + Unpin), frame: Frame) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    frame.encode(&mut buf, usize::MAX).map_err(std::io::Error::other)?;
    wr.write_all(&buf).await
}

/// Why a route could not be dialled.
enum DialError {
    /// This broker refused the peer's WELCOME (cluster name, token, node id).
    Refused(String),
    /// The peer refused this broker's HELLO.
    RefusedBy(String),
    /// Anything else: unreachable, timed out, closed.
    Failed(String),
}

impl From<String> for DialError {
    fn from(why: String) -> Self {
        DialError::Failed(why)
    }
}

impl From<&str> for DialError {
    fn from(why: &str) -> Self {
        DialError::Failed(why.into())
    }
}

/// Dials `url` and completes the handshake as the initiator.
async fn dial(
    url: SocketAddr,
    shared: &Arc<Shared>,
) -> Result<(Reader, session::WriteHalf, Peer), DialError> {
    let cluster = shared.cluster.as_ref().ok_or("no cluster")?;
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout;
    let stream = tokio::time::timeout_at(deadline, TcpStream::connect(url))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (rd, mut wr): (session::ReadHalf, session::WriteHalf) = match &cluster.tls {
        None => {
            let (rd, wr) = stream.into_split();
            (Box::new(rd), Box::new(wr))
        }
        Some(tls) => {
            let name = rustls::pki_types::ServerName::IpAddress(url.ip().into());
            let stream = tokio::time::timeout_at(deadline, tls.connector.connect(name, stream))
                .await
                .map_err(|_| "TLS handshake timed out".to_string())?
                .map_err(|e| format!("TLS: {e}"))?;
            let (rd, wr) = tokio::io::split(stream);
            (Box::new(rd), Box::new(wr))
        }
    };
    let hello = Hello {
        name: shared.config.server_name.clone().into(),
        properties: cluster.handshake_properties(shared.config.max_frame_size),
    };
    write_frame(&mut wr, Frame::Hello(hello)).await.map_err(|e| e.to_string())?;
    let mut reader = reader(rd, shared);
    match tokio::time::timeout_at(deadline, reader.next()).await {
        Ok(Some(Ok((_, Frame::Welcome(w))))) => {
            let peer = peer(cluster, &w.server_name, &w.properties).map_err(DialError::Refused)?;
            Ok((reader, wr, peer))
        }
        Ok(Some(Ok((_, Frame::Error(e))))) if e.code == ErrorCode::AuthenticationFailed => {
            Err(DialError::RefusedBy(e.message.to_string()))
        }
        Ok(Some(Ok((_, Frame::Error(e))))) => Err(format!("{}: {}", e.code, e.message).into()),
        Ok(Some(Err(e))) => Err(e.to_string().into()),
        Ok(Some(Ok((_, other)))) => Err(format!("unexpected {}", other.name()).into()),
        Ok(None) => Err("closed during the handshake".into()),
        Err(_) => Err("handshake timed out".into()),
    }
}

/// Starts a dialer for `url` unless one runs, or it is this broker's own address.
pub(crate) fn ensure_dialer(shared: &Arc<Shared>, url: SocketAddr, seed: bool) {
    let Some(cluster) = shared.cluster.as_ref() else { return };
    if url == cluster.cluster_url {
        return;
    }
    {
        let mut dialing = lock(&cluster.dialing);
        if dialing.len() >= MAX_DIALERS || !dialing.insert(url) {
            return;
        }
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        dial_loop(&shared, url, seed).await;
        if let Some(cluster) = shared.cluster.as_ref() {
            lock(&cluster.dialing).remove(&url);
        }
    });
}

/// How many route addresses are being dialled (see `Broker::route_addresses`).
pub(crate) fn dialing(shared: &Shared) -> usize {
    shared.cluster.as_ref().map_or(0, |c| lock(&c.dialing).len())
}

/// Keeps a route to `url` up: dials when no route to the broker there is up, with backoff.
/// A learned address is given up after many failures in a row; a seed never is.
async fn dial_loop(shared: &Arc<Shared>, url: SocketAddr, seed: bool) {
    let Some(cluster) = shared.cluster.as_ref() else { return };
    let mut failures: u32 = 0;
    let mut backoff = Duration::from_millis(20);
    // The broker found at `url` last time: connected to it by any address counts.
    let mut known_node: Option<u8> = None;
    loop {
        if shared.shutdown.is_cancelled() {
            return;
        }
        let (connected, moved) = {
            let routes = lock(&cluster.routes);
            // The broker here, however its route came up (dialled by it, say).
            let here = routes.values().find(|r| r.cluster_url == url);
            if let Some(r) = here {
                known_node = Some(r.node);
            }
            let elsewhere = known_node.and_then(|n| routes.get(&n)).is_some_and(|r| r.cluster_url != url);
            (here.is_some() || elsewhere, elsewhere)
        };
        if moved && !seed {
            // The broker once here is up at another address (restarted elsewhere): this learned
            // one is stale. Left running, such dialers would pile up with every restart, up to
            // the cap that then shuts out addresses of brokers that are new.
            debug!(%url, "a learned route address gone stale: its broker is reached elsewhere");
            return;
        }
        if connected {
            failures = 0;
            backoff = Duration::from_millis(20);
            tokio::select! {
                () = shared.shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(100)) => continue,
            }
        }
        match dial(url, shared).await {
            Ok((reader, writer, peer)) => {
                known_node = Some(peer.node);
                // A route refused as a duplicate keeps backing off like a failure, and so does
                // one that closes soon after it opens (a peer that refuses what it is sent, say):
                // redialling it at once, again and again, would resync both sides each time.
                // It counts toward giving a learned address up, too: a broker reachable at all
                // is found connected (by whatever route) at the top of the loop, which resets
                // the count.
                let opened = tokio::time::Instant::now();
                if run(reader, writer, peer, true, shared.clone()).await && opened.elapsed() >= STABLE_ROUTE {
                    failures = 0;
                    backoff = Duration::from_millis(20);
                } else {
                    failures += 1;
                    debug!(%url, failures, "route refused or closed soon after it opened");
                }
            }
            Err(DialError::Refused(why)) => {
                // The peer does not belong here (another cluster, a node id in use): said as
                // loudly as on the accepting side.
                failures += 1;
                shared.stats.auth_failures.inc();
                warn!(%url, why, failures, "route refused");
            }
            Err(DialError::RefusedBy(why)) => {
                failures += 1;
                warn!(%url, why, failures, "route refused by the peer");
            }
            Err(DialError::Failed(why)) => {
                failures += 1;
                debug!(%url, why, failures, "route attempt failed");
            }
        }
        if !seed && failures >= LEARNED_ATTEMPTS {
            info!(%url, "giving up a learned route address");
            return;
        }
        let pause = backoff.mul_f64(0.5 + rand::random::<f64>());
        backoff = (backoff * 2).min(MAX_BACKOFF);
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// Registers a route that completed its handshake; false when another route to that broker
/// stays instead (the one started by the lower node id).
fn register(shared: &Shared, info: RouteInfo, outbox: &Outbox) -> bool {
    let Some(cluster) = shared.cluster.as_ref() else { return false };
    let own = cluster.node();
    let initiator = |r: &RouteInfo| if r.outbound { own } else { r.node };
    let mut routes = lock(&cluster.routes);
    if let Some(existing) = routes.get(&info.node) {
        // The lower initiator's connection stays; between two from the same initiator, the newer
        // (the older one is a route that broker has already given up).
        if initiator(existing) < initiator(&info) {
            return false;
        }
        if existing.instance != info.instance && existing.instance != 0 && info.instance != 0 {
            // A restart, or a second broker with this node id: should the replaced one come
            // back, it is the latter (see `peer`).
            info!(
                node = info.node,
                replaced = %existing.cluster_url,
                by = %info.cluster_url,
                "route replaced by another broker instance with that node id (a restart?)"
            );
            let mut replaced = lock(&cluster.replaced);
            let seen = replaced.entry(info.node).or_default();
            if seen.len() == REPLACED_KEPT {
                seen.remove(0);
            }
            seen.push(existing.instance);
        }
        existing.control.fail(error(ErrorCode::ShuttingDown, 0, "replaced by another route"));
        forget(shared, existing);
    }
    shared.router_mut().add_route(info.node, outbox.clone());
    routes.insert(info.node, info);
    true
}

/// Removes the route `link` to `node`, if it is still the registered one.
fn unregister(shared: &Shared, node: u8, link: u64) {
    let Some(cluster) = shared.cluster.as_ref() else { return };
    let mut routes = lock(&cluster.routes);
    if routes.get(&node).is_none_or(|r| r.link != link) {
        return;
    }
    if let Some(route) = routes.remove(&node) {
        forget(shared, &route);
    }
}

/// Forgets a route that was up (the caller holds the routes lock): its clients' subscriptions
/// go, and the requests they owed fail.
fn forget(shared: &Shared, route: &RouteInfo) {
    let gone = shared.router_mut().remove_route(route.node);
    shared.requests().remove_connections(gone);
}

/// Serves a route until it closes; false when it was refused as a duplicate.
async fn run(
    mut reader: Reader,
    wr: session::WriteHalf,
    peer: Peer,
    outbound: bool,
    shared: Arc<Shared>,
) -> bool {
    let Some(cluster) = shared.cluster.as_ref() else { return false };
    let (tx, rx) = crate::queue::queue();
    let mut control = Control::new(&shared.config, shared.stats.clone(), Link::Route);
    control.peer_max_frame = peer.max_frame.unwrap_or(0);
    let control = Arc::new(control);
    let outbox = Outbox::with_control(tx, control.clone());
    // Nothing larger than the peer reads: such a message is skipped (and logged), not sent to
    // make the peer close the route, losing everything behind it.
    let max = peer.max_frame.map_or(usize::MAX, |m| m.saturating_add(ROUTE_FRAME_SLACK));
    let writer = tokio::spawn(session::write_loop(wr, rx, control.clone(), max, Native));
    let link = cluster.next_link.fetch_add(1, Ordering::Relaxed);
    let info = RouteInfo {
        node: peer.node,
        name: peer.name.clone(),
        cluster_url: peer.cluster_url,
        client_url: peer.client_url,
        nats_url: peer.nats_url,
        outbound,
        since: SystemTime::now(),
        control: control.clone(),
        link,
        instance: peer.instance,
    };
    let registered = register(&shared, info, &outbox);
    if registered {
        info!(node = peer.node, name = %peer.name, url = %peer.cluster_url, outbound, "route up");
        // Gossip: the peer's routes are brokers of this cluster too; and the other peers hear of
        // this one (they may have been told of the cluster before it joined).
        for url in &peer.routes {
            ensure_dialer(&shared, *url, false);
        }
        let hello = Hello {
            name: shared.config.server_name.clone().into(),
            properties: cluster.handshake_properties(shared.config.max_frame_size),
        };
        for (node, route) in shared.router().route_outboxes() {
            if node != peer.node {
                route.deliver_frame(Frame::Hello(hello.clone()));
            }
        }
        read_loop(&mut reader, &outbox, &peer, &shared).await;
        unregister(&shared, peer.node, link);
        info!(node = peer.node, name = %peer.name, "route down");
    } else {
        debug!(node = peer.node, "duplicate route closed");
        control.fail(error(ErrorCode::ShuttingDown, 0, "a route to this broker exists"));
    }
    drop(outbox);
    let abort = writer.abort_handle();
    if tokio::time::timeout(shared.config.drain_timeout, writer).await.is_err() {
        abort.abort();
    }
    if registered {
        // Once the writer is done: what the route carried joins the broker's totals. (It is out
        // of the registry already, so `traffic` never counts it twice.)
        shared.stats.messages_out.add(control.msgs_out.load(Ordering::Relaxed));
        shared.stats.bytes_out.add(control.bytes_out.load(Ordering::Relaxed));
    }
    registered
}

async fn read_loop(reader: &mut Reader, outbox: &Outbox, peer: &Peer, shared: &Arc<Shared>) {
    let mut heartbeat = session::Heartbeat::new(&shared.config);
    let control = outbox.control().clone();
    loop {
        let next = tokio::select! {
            next = reader.next() => next,
            () = heartbeat.tick(), if !heartbeat.off() => {
                if let Err(idle) = heartbeat.check(outbox) {
                    warn!(node = peer.node, ?idle, "route silent past the heartbeat limit, closing");
                    control.fail(error(ErrorCode::StaleConnection, 0, "route stale"));
                    return;
                }
                continue;
            }
            () = control.killed() => return,
            () = shared.shutdown.cancelled() => {
                outbox.close_now(error(ErrorCode::ShuttingDown, 0, "server shutting down"));
                return;
            }
        };
        let ((source, _), frame) = match next {
            None | Some(Err(busbar_core::CodecError::Io(_))) => return,
            Some(Err(busbar_core::CodecError::Frame(e))) => {
                warn!(node = peer.node, error = %e, "malformed frame on a route, closing it");
                control.fail(error(ErrorCode::MalformedFrame, 0, e.to_string()));
                return;
            }
            Some(Ok(item)) => item,
        };
        if control.is_killed() {
            // Replaced or closing: frames still buffered must not be applied.
            return;
        }
        heartbeat.heard();
        control.msgs_in.fetch_add(1, Ordering::Relaxed);
        if let Err(fatal) = apply(frame, source, outbox, peer, shared).await {
            warn!(node = peer.node, error = %fatal.message, "route protocol violation, closing it");
            control.fail(fatal);
            return;
        }
    }
}

/// Applies one frame from a peer broker.
async fn apply(
    frame: Frame,
    source: u32,
    outbox: &Outbox,
    peer: &Peer,
    shared: &Arc<Shared>,
) -> Result<(), ErrorFrame> {
    // A peer speaks only for its own clients.
    let own_client = |conn: u32| {
        if node_of(conn) == peer.node {
            Ok(())
        } else {
            Err(error(ErrorCode::PermissionDenied, 0, format!("client {conn} is not node {}'s", peer.node)))
        }
    };
    match frame {
        Frame::Sub(sub) => {
            own_client(source)?;
            let limit = shared.config.max_subscriptions;
            if let Err(e) = shared.router_mut().subscribe_remote(peer.node, source, sub, outbox, limit) {
                debug!(conn = source, ?e, "remote subscription not taken");
            }
        }
        Frame::Unsub { sid } => {
            own_client(source)?;
            let mut router = shared.router_mut();
            if !router.is_current_route(peer.node, outbox) {
                return Ok(());
            }
            if sid == GONE {
                router.remove_connection(source);
                drop(router);
                shared.requests().remove_connection(source);
            } else {
                router.unsubscribe(source, sid);
            }
        }
        Frame::Hello(update) => {
            if let Some(name) = update.properties.get(crate::session::SERVICE_PROPERTY) {
                // A service registered by one of the peer's clients.
                own_client(source)?;
                shared.router_mut().register_remote_service(peer.node, source, name.into(), outbox);
            } else if update.properties.get(crate::session::NATS_CLIENT_PROPERTY).is_some() {
                // One of the peer's clients speaks NATS: its plain subscriptions answer requests.
                own_client(source)?;
                shared.router_mut().register_remote_nats(peer.node, source, outbox);
            } else {
                // Gossip after the handshake: a broker that joined the peer since.
                for url in gossip(&update.properties) {
                    ensure_dialer(shared, url, false);
                }
            }
        }
        Frame::Msg { sid, message } => {
            own_client(message.source)?;
            let target = message.destination;
            let delivered = shared.router().route_from_peer(&Arc::new(message), target, sid);
            shared.stats.deliveries.add(delivered as u64);
        }
        Frame::Call(call) => {
            own_client(call.message.source)?;
            let target = call.message.destination;
            if shared.cluster.as_ref().is_none_or(|c| node_of(target) != c.node()) {
                debug!(target, "CALL for a client that is not this broker's; dropped");
                return Ok(());
            }
            let responder = shared.router().local_responder(target, call.sid).cloned();
            let (id, topic, requester) = (call.id, call.message.topic.clone(), call.message.source);
            // Told to the requester at once rather than left to its timeout.
            let refuse = |(code, text): (ErrorCode, &str)| {
                let mut reply = crate::requests::error_reply(id, code, 0, topic, text);
                if let Frame::Reply(r) = &mut reply {
                    r.message.source = target;
                    r.message.destination = requester;
                }
                outbox.deliver_frame(reply);
            };
            match responder {
                Some(responder) => {
                    // Remembered first: the reply may come back before this task goes on.
                    let timeout = Duration::from_millis(u64::from(call.timeout_ms));
                    if !shared.requests().owe(target, requester, id, timeout) {
                        refuse((
                            ErrorCode::TooManyRequests,
                            "too many requests in flight at the responder's broker",
                        ));
                    } else if !responder.deliver_frame(Frame::Call(call)) {
                        shared.requests().settle_owed(target, requester, id);
                        refuse(crate::requests::undelivered_status(&responder));
                    }
                }
                // Gone since the peer chose it.
                None => refuse((ErrorCode::ResponderLost, "the responder disconnected before it replied")),
            }
        }
        Frame::Reply(reply) => {
            own_client(reply.message.source)?;
            reply_from_peer(reply, shared);
        }
        Frame::Ping => {
            // Never waits: a full route queue closes the route anyway.
            outbox.deliver_frame(Frame::Pong);
        }
        Frame::Pong => {}
        Frame::Error(e) => {
            debug!(node = peer.node, code = %e.code, message = %e.message, "peer reported an error")
        }
        other => {
            return Err(error(
                ErrorCode::UnexpectedFrame,
                0,
                format!("a route may not send {}", other.name()),
            ));
        }
    }
    Ok(())
}

/// A REPLY from a responder on another broker for a request made here. The responder's broker
/// judged its permission on the topic the reply names; here that topic must be the request's.
fn reply_from_peer(reply: Reply, shared: &Shared) {
    let requester = reply.message.destination;
    let responder = reply.message.source;
    let claimed = reply.message.topic.clone();
    let may_reply = |topic: &str| topic == &*claimed;
    let replied = if reply.error.is_some() {
        // A refusal that broker answered for its responder: for a request that several NATS
        // subscribers got, it only takes that one out (as on one broker).
        shared.requests().refused(requester, responder, reply, may_reply)
    } else {
        Some(shared.requests().reply(requester, responder, reply, None, may_reply))
    };
    if let Some(replied) = replied {
        crate::requests::settle(replied, shared);
    }
}

/// A local responder's REPLY to a requester on another broker: forwarded only when it answers
/// a CALL the responder was handed (else dropped and counted late). A client's reply is judged
/// here, with its `perms`, on the topic it names (the requester's broker checks that this is the
/// request's): one the responder may not send goes as a PermissionDenied refusal, so that the
/// requester does not wait out its timeout. `None`: the broker's own refusal for the responder.
pub(crate) fn reply_to_peer(
    shared: &Shared,
    responder: u32,
    mut reply: Reply,
    perms: Option<&crate::auth::Permissions>,
) {
    let requester = reply.message.destination;
    if !shared.requests().settle_owed(responder, requester, reply.id) {
        shared.stats.late_replies.inc();
        return;
    }
    if let Some(perms) = perms
        && !(perms.allow_responses || perms.publish.permits_topic(&reply.message.topic))
    {
        shared.stats.permission_denied.inc();
        reply.error = Some(ErrorCode::PermissionDenied);
        reply.message.payload = bytes::Bytes::from_static(b"the responder may not reply on this topic");
        reply.message.headers = Headers::default();
    }
    reply.message.source = responder;
    if !forward_reply(shared, reply) {
        shared.stats.late_replies.inc();
    }
}

/// Sends a REPLY from a local responder to a requester on another broker; false when no route
/// leads there.
pub(crate) fn forward_reply(shared: &Shared, reply: Reply) -> bool {
    let node = node_of(reply.message.destination);
    let router = shared.router();
    match router.route_to(node) {
        Some(route) if route.can_carry(&reply.message) => route.deliver_frame(Frame::Reply(reply)),
        // Too large for the requester's broker: it gets an error in its place, not a timeout.
        Some(route) => {
            let Reply { id, remaining, mut message, .. } = reply;
            message.payload =
                bytes::Bytes::from_static(b"the reply is larger than the requester's broker accepts");
            message.headers = Default::default();
            route.deliver_frame(Frame::Reply(Reply {
                id,
                error: Some(ErrorCode::HandlerError),
                remaining,
                message,
            }))
        }
        None => false,
    }
}

/// True when `conn` is a client of another broker of this cluster.
pub(crate) fn is_remote(shared: &Shared, conn: u32) -> bool {
    shared.cluster.as_ref().is_some_and(|c| node_of(conn) != c.node())
}

/// The monitoring view of the routes.
pub(crate) fn views(shared: &Shared) -> Vec<RouteView> {
    let Some(cluster) = shared.cluster.as_ref() else { return Vec::new() };
    let routes = cluster.routes();
    let counts = shared.router().remote_counts();
    routes
        .into_iter()
        .map(|r| {
            let (clients, subs) = counts.get(&r.node).copied().unwrap_or_default();
            RouteView {
                node: r.node,
                name: r.name,
                cluster_url: r.cluster_url.to_string(),
                client_url: r.client_url.map(|a| a.to_string()),
                direction: if r.outbound { "outbound" } else { "inbound" },
                connected_secs: SystemTime::now().duration_since(r.since).unwrap_or_default().as_secs(),
                remote_clients: clients,
                remote_subscriptions: subs,
                msgs_in: r.control.msgs_in.load(Ordering::Relaxed),
                msgs_out: r.control.msgs_out.load(Ordering::Relaxed),
                pending_bytes: r.control.pending_bytes.load(Ordering::Relaxed),
            }
        })
        .collect()
}
