//! The busbar client: publish and subscribe through a busbar broker.
//!
//! ```no_run
//! # async fn demo() -> busbar::Result<()> {
//! use busbar::{Client, EventBus};
//! let client = Client::connect("127.0.0.1:4900").await?;
//! let mut sub = client.subscribe("event.>").await?;
//! client.publish_json("event.email.new", &serde_json::json!({"subject": "hi"})).await?;
//! let msg = sub.next().await.expect("subscription open");
//! println!("{} {}", msg.topic(), msg.payload_str().unwrap_or("<binary>"));
//! client.disconnect().await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! | module    | what it holds |
//! |-----------|---------------|
//! | `connection` | the task that owns the socket: batching writes, heartbeats, reconnect with backoff, restoring subscriptions, the offline buffer |
//! | `commands` | the bounded queue from the handles to that task; publishes are encoded straight into it |
//! | `read_buffer` | a connection's read buffer; earlier ones are taken back once the messages that point into them are dropped |
//! | `feed`    | the bounded queue from that task (or the in-process bus) to a subscription's stream, taken in batches |
//! | `client`  | [`Client`] (cheap clone handle): publish, subscribe, request/reply, commands, scatter-gather; [`ClientOptions`], [`Pattern`], [`Status`], [`Subscription`] and [`Requests`] (streams), [`HandlerTask`], and the private connection task that owns the socket |
//! | `request` | [`Request`]: a request or command to answer, with `reply`/`fail` (answered with an error if dropped) |
//! | `context` | the transaction a handler runs in, inherited by what it sends ([`current_transaction`]) |
//! | `message` | [`Message`] as received (with `json`/`msgpack` decoding), [`Outgoing`] for headers and balance keys |
//! | `bus`     | [`EventBus`], the one API of both transports; [`AnyBus`] and [`BusConfig`] to choose by configuration |
//! | [`local`] | the in-process bus: sync handlers run inline (wildcards or regex), streams, requests, strict topics |
//! | `subscription` | [`Subscription`], [`Requests`], [`HandlerTask`]: handles shared by both transports |
//! | `error`   | [`Error`], one enum for every failure, with [`Error::code`] for broker refusals |
//!
//! The same application code runs on the in-process bus ([`local::Bus`]): write it against the
//! [`EventBus`] trait, or hold an [`AnyBus`] built from a [`BusConfig`].
//!
//! Topics and patterns are checked on the client before anything is sent, so a bad topic is an
//! immediate [`Error::InvalidTopic`], not a round trip.
//!
//! # Where the two transports differ
//!
//! The shared test suite (`tests/suite.rs`) runs the same bodies on both; what is left differs
//! by nature, not by accident:
//! - **Size.** A broker refuses a frame over its `max_frame_size` (announced at connect;
//!   [`ErrorCode::FrameTooLarge`]); the in-process bus copies nothing and has no limit.
//! - **Timeouts.** A request's timeout is kept by the client either way; the broker is told it
//!   in milliseconds as a `u32`, so it forgets a request after at most about 49.7 days.
//! - **Timing.** [`local::Bus::publish`] runs synchronous handlers before it returns (its
//!   [`local::Delivery`] counts them); over a broker, publishing returns once the message is
//!   queued, and [`EventBus::flush`] waits for the broker to have handled it.
//! - **Synchronous handlers** exist only in process; they share one message without a copy per
//!   handler, so [`Message::subscription_id`] is 0 there.

mod bus;
mod client;
mod commands;
mod connection;
mod context;
mod error;
mod feed;
pub mod local;
mod message;
mod read_buffer;
mod request;
mod subscription;
mod tls;

pub use bus::{AnyBus, BusConfig, EventBus};
pub use busbar_core::{self as core, ErrorCode, GroupPolicy, Headers, IdGenerator};
pub use client::{Client, ClientOptions, Credentials, OfflinePolicy, Pattern, Reconnect, Status};
pub use context::current_transaction;
pub use error::{Error, Result};
pub use message::{Message, Outgoing};
pub use request::Request;
pub use subscription::{HandlerTask, Requests, Subscription};
pub use tls::ClientTls;

/// The README's Rust examples, compiled by `cargo test` so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
