//! A TCP proxy for fault tests: forwards to a target, and can pause (hold every byte, both ways,
//! sockets open), resume, and cut (close every connection it carries).
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub struct Proxy {
    addr: SocketAddr,
    paused: watch::Sender<bool>,
    cut: watch::Sender<CancellationToken>,
    stop: CancellationToken,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (paused, _) = watch::channel(false);
        let (cut, _) = watch::channel(CancellationToken::new());
        let stop = CancellationToken::new();
        let (p, c, s) = (paused.clone(), cut.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(pair) => pair, Err(_) => continue },
                    () = s.cancelled() => return,
                };
                let Ok(server) = TcpStream::connect(target).await else { continue };
                let token = c.borrow().clone();
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, p.subscribe(), token.clone()));
                tokio::spawn(pipe(sr, cw, p.subscribe(), token));
            }
        });
        Proxy { addr, paused, cut, stop }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Holds every byte in flight until `resume` (sockets stay open: a silent peer).
    pub fn pause(&self) {
        self.paused.send_replace(true);
    }

    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// Closes every connection carried so far; new ones are accepted.
    pub fn cut(&self) {
        let old = self.cut.send_replace(CancellationToken::new());
        old.cancel();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut.borrow().cancel();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut paused: watch::Receiver<bool>,
    cut: CancellationToken,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            () = cut.cancelled() => return,
        };
        // While paused, hold these bytes (and read no more).
        tokio::select! {
            r = paused.wait_for(|p| !*p) => if r.is_err() { return },
            () = cut.cancelled() => return,
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
