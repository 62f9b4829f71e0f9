//! The floor under any broker's sequential request: the same four TCP loopback hops as a
//! request through a broker (requester → relay → responder → relay → requester), made by bare
//! blocking sockets, one thread per role, no protocol. Prints one JSON line in the shape of
//! `busbar bench`'s (latency in µs, from an HDR histogram).
//!
//! ```text
//! cargo run --release -p busbar-cli --example tcp_floor -- [N]          # all roles in this process
//! cargo run --release -p busbar-cli --example tcp_floor -- relay        # only the relay; prints its address
//! cargo run --release -p busbar-cli --example tcp_floor -- N ADDR       # requester and responder, via that relay
//! ```
//!
//! With the relay in a process of its own, `taskset` can put it and the two ends on one CPU or
//! on different ones: `scripts/latency-floor.sh` does, for this and for busbar and nats-server.

// A command-line tool: its results go to stdout.
#![allow(clippy::print_stdout)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Instant;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;

/// Bytes per request and per reply: about a busbar REQUEST or REPLY frame with 16 bytes of data.
const SIZE: usize = 100;

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect(addr).with_context(|| format!("connect to {addr}"))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn accept(l: &TcpListener) -> Result<TcpStream> {
    let (s, _) = l.accept()?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Relays every request from the first connection to the second and every reply back, until
/// either closes.
fn relay(l: &TcpListener) -> Result<()> {
    let mut requester = accept(l)?;
    let mut responder = accept(l)?;
    let mut b = [0u8; SIZE];
    while requester.read_exact(&mut b).is_ok() {
        responder.write_all(&b)?;
        responder.read_exact(&mut b)?;
        requester.write_all(&b)?;
    }
    Ok(())
}

/// Connects the two ends to the relay at `addr`, runs `n` requests one at a time, and prints
/// their latency.
fn ends(n: u64, addr: SocketAddr) -> Result<()> {
    let mut requester = connect(addr)?;
    let mut responder = connect(addr)?;
    std::thread::spawn(move || {
        let mut b = [0u8; SIZE];
        while responder.read_exact(&mut b).is_ok() {
            if responder.write_all(&b).is_err() {
                return;
            }
        }
    });
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut b = [0u8; SIZE];
    let start = Instant::now();
    for seq in 0..n {
        b[..8].copy_from_slice(&seq.to_be_bytes());
        let t = Instant::now();
        requester.write_all(&b)?;
        requester.read_exact(&mut b)?;
        h.record((t.elapsed().as_nanos() as u64).max(1))?;
        anyhow::ensure!(b[..8] == seq.to_be_bytes(), "reply {seq} out of order");
    }
    let secs = start.elapsed().as_secs_f64();
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    println!(
        "{{\"scenario\":\"request\",\"target\":\"tcp-floor\",\"msgs\":{n},\"msgs_per_sec\":{},\"p50_us\":{},\"p90_us\":{},\"p99_us\":{},\"p999_us\":{},\"lost\":0}}",
        n as f64 / secs,
        us(0.5),
        us(0.9),
        us(0.99),
        us(0.999)
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("relay") {
        let l = TcpListener::bind("127.0.0.1:0")?;
        println!("{}", l.local_addr()?);
        return relay(&l);
    }
    let n = args.first().map(|s| s.parse()).transpose().context("N: a count")?.unwrap_or(10_000);
    match args.get(1) {
        Some(addr) => ends(n, addr.parse().context("ADDR: host:port")?),
        None => {
            let l = TcpListener::bind("127.0.0.1:0")?;
            let addr = l.local_addr()?;
            std::thread::spawn(move || relay(&l));
            ends(n, addr)
        }
    }
}
