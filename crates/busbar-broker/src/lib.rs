//! The busbar broker as a library: run it from `busbar serve`, or embed it in any tokio program.
//!
//! ```no_run
//! # async fn demo() -> Result<(), busbar_broker::BrokerError> {
//! use busbar_broker::{Broker, Config};
//! let broker = Broker::start(Config::with_listen("127.0.0.1:0".parse().unwrap())).await?;
//! let addr = broker.local_addr(); // connect clients here
//! broker.stop().await;            // graceful: clients are told, queues drain
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! | module    | what it holds |
//! |-----------|---------------|
//! | `cluster` | routes between brokers: handshake, gossip of route addresses, interest and traffic from peers, dialers with backoff |
//! | `auth`    | authentication in the handshake (token, users with argon2 hashes) and per-user permissions |
//! | `config`  | [`Config`]: listen address and every limit |
//! | `config_file` | the TOML file: [`Config::from_toml`] (unknown keys and bad values are errors naming the key), [`default_toml`] |
//! | `server`  | the accept loop, [`run`]/[`serve`], the embeddable [`Broker`] handle, [`Stats`], shutdown and drain |
//! | `tls`     | rustls on the native listener: certificates from PEM, mutual TLS, TLS required or optional on one port |
//! | `session` | one connection: handshake, read loop applying frames, write task batching frames to the socket |
//! | `queue`   | a connection's outbound queue: [`busbar_core::queue`] unbounded (the writer woken once per batch), and `Deferred`, the wake-ups a read loop holds while it routes a batch |
//! | `requests`| requests in flight: requester ↔ responders, replies, expiry, responder loss |
//! | `monitor` | the optional HTTP listener: `/healthz`, `/metrics` (Prometheus), `/varz`, `/connz`, `/subsz`, `/routez`, the dashboard at `/` |
//! | `nats`    | the NATS client protocol listener: NATS clients in any language on the same router; headers, queue groups and requests both ways |
//! | `router`  | subscriptions in a [`busbar_core::SubscriptionTrie`]; fan-out and group choice per message |
//!
//! Data path: a session decodes PUB (straight into an `Arc`) → validates the topic →
//! `Router::route` under a read lock → a non-waiting push into each subscriber's bounded outbox →
//! once the batch of frames read is routed, each writer concerned wakes, takes its whole queue and
//! writes it. A full outbox closes that subscriber with `SlowConsumer`; the publisher never waits.

mod auth;
#[doc(hidden)]
pub mod bench_support;
mod cluster;
mod config;
mod config_file;
mod monitor;
mod nats;
mod queue;

/// The maps the broker looks up per message or per request (connections, subscriptions,
/// requests in flight, by their ids): foldhash, seeded per map, rather than SipHash, which was a
/// tenth of the broker's instructions per request.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
mod requests;
mod router;
mod server;
mod session;
mod tls;

pub use auth::{AuthConfig, Permissions, Rules, User, hash_password};
pub use cluster::RouteView;
pub use config::{ClusterConfig, Config, SlowConsumerPolicy};
pub use config_file::{ConfigError, default_toml, parse_duration};
pub use server::{Broker, BrokerError, Stats, run, serve};
pub use tls::{RouteTls, TlsOptions};
