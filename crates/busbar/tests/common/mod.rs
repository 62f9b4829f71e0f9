//! Test harness: a broker on 127.0.0.1:0 that stops on drop, and a raw frame-level connection.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use busbar::Client;
use busbar_broker::{Broker, Config};
use busbar_core::frame::{self, DEFAULT_MAX_FRAME_SIZE};
use busbar_core::{Frame, Hello};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound for anything a test waits for; reached only when something is broken.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub fn config() -> Config {
    Config::with_listen("127.0.0.1:0".parse().unwrap())
}

pub async fn broker() -> Broker {
    broker_with(config()).await
}

pub async fn broker_with(config: Config) -> Broker {
    Broker::start(config).await.expect("broker starts")
}

pub async fn client(broker: &Broker) -> Client {
    Client::connect(broker.local_addr().to_string()).await.expect("client connects")
}

/// Polls `f` until it is true, failing the test after [`PATIENCE`].
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A connection that speaks frames (or raw bytes) directly, for protocol-level tests.
pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    pub async fn connect(broker: &Broker) -> Raw {
        let stream = TcpStream::connect(broker.local_addr()).await.unwrap();
        Raw { stream, buf: BytesMut::new() }
    }

    /// Connects and completes the handshake.
    pub async fn hello(broker: &Broker) -> Raw {
        let mut raw = Raw::connect(broker).await;
        raw.send(Frame::Hello(Hello { name: "raw".into(), properties: Default::default() })).await;
        match raw.read().await {
            Some(Frame::Welcome(_)) => raw,
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }

    pub async fn send(&mut self, frame: Frame) {
        let mut out = BytesMut::new();
        frame.encode(&mut out, usize::MAX).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        // The broker may already have closed the connection: that is not the test's failure.
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next frame, or None at end of stream (or reset). Panics after [`PATIENCE`].
    pub async fn read(&mut self) -> Option<Frame> {
        tokio::time::timeout(PATIENCE, async {
            loop {
                if let Some(f) =
                    frame::decode(&mut self.buf, DEFAULT_MAX_FRAME_SIZE).expect("broker sends valid frames")
                {
                    return Some(f);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("a frame or end of stream in time")
    }

    /// Reads frames until an ERROR; returns it. Panics at end of stream.
    pub async fn expect_error(&mut self) -> busbar_core::ErrorFrame {
        loop {
            match self.read().await {
                Some(Frame::Error(e)) => return e,
                Some(_) => continue,
                None => panic!("connection closed without an ERROR frame"),
            }
        }
    }

    /// Asserts the broker closes the connection (after any remaining frames).
    pub async fn expect_closed(&mut self) {
        while self.read().await.is_some() {}
    }
}
pub mod proxy;
