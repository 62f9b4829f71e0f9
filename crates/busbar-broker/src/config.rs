//! Broker configuration.

use std::net::SocketAddr;
use std::time::Duration;

use busbar_core::frame::DEFAULT_MAX_FRAME_SIZE;

/// What the broker does with a connection whose outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlowConsumerPolicy {
    /// Close it with ERROR `SlowConsumer` (the NATS default): it reconnects and catches up.
    #[default]
    Disconnect,
    /// Keep it, and drop the messages that do not fit (counted per connection and in `Stats`).
    Drop,
}

/// Everything the broker can be told. [`Config::default`] is a sensible single-machine broker on
/// `127.0.0.1:4900`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address of the native protocol listener. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Address of the NATS client protocol listener (NATS clients in any language join the bus
    /// here); off when None. NATS's own port is 4222.
    pub nats_listen: Option<SocketAddr>,
    /// Joining other brokers into one bus; a lone broker when None.
    pub cluster: Option<ClusterConfig>,
    /// Address of the monitoring HTTP listener (health, metrics, JSON, dashboard); off when None.
    pub http: Option<SocketAddr>,
    /// TLS for the native listener; plain TCP when None.
    pub tls: Option<crate::tls::TlsOptions>,
    /// Who may connect and what they may do; no authentication by default.
    pub auth: crate::auth::AuthConfig,
    /// Name announced in WELCOME.
    pub server_name: String,
    /// Largest frame accepted (and sent), announced in WELCOME.
    pub max_frame_size: usize,
    /// Most client connections at once; one more is refused with `TooManyConnections`.
    pub max_connections: usize,
    /// Most subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// Most frames waiting to be written to one connection; a connection whose queue is full is a
    /// slow consumer (see `slow_consumer`). The byte bound below is usually the one that binds.
    pub max_pending: usize,
    /// Most bytes of frames waiting to be written to one connection; beyond it, a slow consumer.
    pub max_pending_bytes: usize,
    /// What happens to a slow consumer.
    pub slow_consumer: SlowConsumerPolicy,
    /// Interval of heartbeats: an idle connection is pinged after it, and after each further
    /// quiet interval, up to `heartbeat_max_missed` pings; it is closed when it has sent nothing
    /// for `heartbeat_interval × (heartbeat_max_missed + 1)`. Zero disables heartbeats.
    pub heartbeat_interval: Duration,
    /// Unanswered pings before a connection counts as dead (at least 1).
    pub heartbeat_max_missed: u32,
    /// Most requests one connection may have waiting for replies. One past its timeout counts
    /// until the sweep forgets it (once a second).
    pub max_requests: usize,
    /// Time a new connection has to send HELLO.
    pub handshake_timeout: Duration,
    /// On shutdown, how long connections get to flush before they are cut.
    pub drain_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4900)),
            http: None,
            nats_listen: None,
            cluster: None,
            auth: crate::auth::AuthConfig::default(),
            tls: None,
            server_name: "busbar".into(),
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            max_connections: 65_536,
            max_subscriptions: 65_536,
            max_pending: 1 << 20,
            max_pending_bytes: 64 * 1024 * 1024,
            slow_consumer: SlowConsumerPolicy::Disconnect,
            heartbeat_interval: Duration::from_secs(10),
            heartbeat_max_missed: 2,
            max_requests: 65_536,
            handshake_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// How a broker joins a cluster (docs/CLUSTER.md).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Name of the cluster: routes from brokers of another cluster are refused.
    pub name: String,
    /// This broker's number in the cluster, 1–255, unique among its brokers. It is the top byte
    /// of every service id this broker assigns, so that ids are unique cluster-wide and a
    /// message addressed to an id finds its broker.
    pub node_id: u8,
    /// Address of the route listener, where other brokers connect. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Seed routes: route listeners of other brokers to connect to. The rest of the cluster is
    /// learned from them.
    pub routes: Vec<SocketAddr>,
    /// A shared secret every broker of the cluster must present (at least 16 characters);
    /// routes are not authenticated when None.
    pub token: Option<String>,
    /// Mutual TLS on routes; plain TCP when None.
    pub tls: Option<crate::tls::RouteTls>,
    /// The route address other brokers are told to dial (gossip); when None, the listen address,
    /// or, when that is a wildcard (0.0.0.0 or ::), this machine's address on its default route.
    /// Set it behind NAT, or to choose another interface.
    pub advertise: Option<SocketAddr>,
    /// The native client address other brokers' clients are told of (WELCOME's
    /// `connect_urls`), to fail over to; when None, the native listen address, chosen as for
    /// `advertise` when it is a wildcard.
    pub client_advertise: Option<SocketAddr>,
    /// The NATS address NATS clients are told of (INFO's `connect_urls`); when None, the NATS
    /// listen address, chosen as for `advertise` when it is a wildcard.
    pub nats_advertise: Option<SocketAddr>,
}

impl ClusterConfig {
    /// A cluster named `name` with this broker as node `node_id`, routes on `listen`.
    pub fn new(name: impl Into<String>, node_id: u8, listen: SocketAddr) -> Self {
        Self {
            name: name.into(),
            node_id,
            listen,
            routes: Vec::new(),
            token: None,
            tls: None,
            advertise: None,
            client_advertise: None,
            nats_advertise: None,
        }
    }
}

impl Config {
    /// Loads every certificate and key this configuration names (the client listener's and the
    /// routes'), as starting the broker does: a file that is missing or unusable is an error
    /// that names it. Binds nothing.
    pub fn check_tls(&self) -> Result<(), crate::BrokerError> {
        if let Some(tls) = &self.tls {
            crate::tls::acceptor(tls)?;
        }
        if let Some(tls) = self.cluster.as_ref().and_then(|c| c.tls.as_ref()) {
            crate::tls::route_ends(tls)?;
        }
        Ok(())
    }

    /// The default configuration listening on `listen`.
    pub fn with_listen(listen: SocketAddr) -> Self {
        Self { listen, ..Self::default() }
    }
}
