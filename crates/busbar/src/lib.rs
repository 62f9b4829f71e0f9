//! The busbar client: publish and subscribe through a busbar broker.
//!
//! ```no_run
//! # async fn demo() -> busbar::Result<()> {
//! use busbar::Client;
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
//! | `client`  | [`Client`] (cheap clone handle), [`ClientOptions`], [`Status`], [`Subscription`] (a `Stream`), [`HandlerTask`], and the private connection task that owns the socket |
//! | `message` | [`Message`] as received (with `json`/`msgpack` decoding), [`Outgoing`] for headers and balance keys |
//! | `error`   | [`Error`], one enum for every failure, with [`Error::code`] for broker refusals |
//!
//! Topics and patterns are checked on the client before anything is sent, so a bad topic is an
//! immediate [`Error::InvalidTopic`], not a round trip.

mod client;
mod error;
mod message;

pub use busbar_core::{self as core, ErrorCode, GroupPolicy, Headers};
pub use client::{Client, ClientOptions, HandlerTask, Status, Subscription};
pub use error::{Error, Result};
pub use message::{Message, Outgoing};

/// The README's Rust examples, compiled by `cargo test` so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
