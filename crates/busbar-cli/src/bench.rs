//! `busbar bench`: throughput and latency scenarios against a busbar broker, or (with `--nats`)
//! against a NATS server with the async-nats client, so that both can be compared on one machine.
//!
//! Every role has its own connection; subscriptions are confirmed before publishing starts.
//! Each payload carries a sequence number and a send timestamp (its first 16 bytes), so receivers
//! check count, order and size and measure latency into an HDR histogram.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use busbar::{Client, ClientOptions, EventBus, GroupPolicy, Pattern};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use futures_util::StreamExt;
use futures_util::stream::{BoxStream, FuturesUnordered};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Scenario {
    /// 1 publisher → 1 subscriber.
    Pubsub,
    /// 1 publisher → N subscribers, each gets every message.
    Fanout,
    /// 1 publisher → N members of one group, each message to one member.
    Group,
    /// Requests to one responder, one at a time.
    Request,
    /// Requests to one responder, `--inflight` at a time.
    RequestInflight,
    /// All of the above, in turn.
    All,
}

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Scenario to run.
    #[arg(value_enum, default_value_t = Scenario::All)]
    scenario: Scenario,
    /// Messages (or requests) per scenario.
    #[arg(long, short = 'n', default_value_t = 100_000)]
    msgs: u64,
    /// Payload size in bytes (at least 16: sequence number and timestamp).
    #[arg(long, default_value_t = 16)]
    size: usize,
    /// Subscribers (fanout) or group members (group); at least 1.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    subs: u16,
    /// Requests in flight for request-inflight; at least 1.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    inflight: u16,
    /// Broker address; with --embedded, ignored.
    #[arg(long, short, default_value = "127.0.0.1:4900", env = "BUSBAR_SERVER")]
    server: String,
    /// Run against a NATS server at this address (e.g. 127.0.0.1:4222) with async-nats instead.
    #[arg(long)]
    nats: Option<String>,
    /// Start a broker inside this process on a free loopback port and bench against it.
    #[arg(long, conflicts_with = "nats")]
    embedded: bool,
    /// Print only the machine-readable lines.
    #[arg(long)]
    quiet: bool,
}

/// One scenario's figures; printed as a table row and as one JSON line.
#[derive(Debug, Serialize)]
struct Report {
    scenario: &'static str,
    target: &'static str,
    msgs: u64,
    size: usize,
    receivers: usize,
    msgs_per_sec: f64,
    mb_per_sec: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
    /// Messages that never arrived (in a group: sequence numbers no member got).
    lost: u64,
    /// Messages out of order, of the wrong size, or (in a group) delivered twice.
    out_of_order: u64,
    elapsed_ms: u128,
}

/// A connection to the system under test.
#[derive(Clone)]
enum Peer {
    Busbar(Client),
    Nats(async_nats::Client),
}

impl Peer {
    async fn connect(target: &Target) -> Result<Peer> {
        Ok(match target {
            Target::Busbar(addr) => {
                let mut options = ClientOptions::new(addr.clone()).name("busbar-bench");
                options.subscription_capacity = 1 << 20;
                options.command_capacity = 4096;
                Peer::Busbar(
                    Client::connect_with(options)
                        .await
                        .with_context(|| format!("connect to busbar {addr}"))?,
                )
            }
            Target::Nats(addr) => {
                let client = async_nats::ConnectOptions::new()
                    .subscription_capacity(1 << 20)
                    .client_capacity(4096)
                    .connect(addr.as_str())
                    .await
                    .with_context(|| format!("connect to nats {addr}"))?;
                Peer::Nats(client)
            }
        })
    }

    async fn publish(&self, subject: &'static str, payload: Bytes) -> Result<()> {
        match self {
            Peer::Busbar(c) => c.publish(subject, payload).await?,
            Peer::Nats(c) => c.publish(subject, payload).await?,
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        match self {
            Peer::Busbar(c) => c.flush().await?,
            Peer::Nats(c) => c.flush().await?,
        }
        Ok(())
    }

    /// A confirmed subscription: a stream of payloads.
    async fn subscribe(
        &self,
        subject: &'static str,
        group: Option<&'static str>,
    ) -> Result<BoxStream<'static, Bytes>> {
        Ok(match self {
            Peer::Busbar(c) => {
                let mut pattern = Pattern::new(subject);
                if let Some(g) = group {
                    pattern = pattern.group(g, GroupPolicy::RoundRobin);
                }
                c.subscribe(pattern).await?.map(|m| m.into_payload()).boxed()
            }
            Peer::Nats(c) => {
                let sub = match group {
                    Some(g) => c.queue_subscribe(subject, g.to_string()).await?,
                    None => c.subscribe(subject).await?,
                };
                // A round trip makes sure the server has the subscription.
                c.flush().await?;
                sub.map(|m| m.payload).boxed()
            }
        })
    }

    /// Answers every request on `subject` with its own payload, until the connection closes.
    async fn echo(&self, subject: &'static str) -> Result<()> {
        match self {
            Peer::Busbar(c) => {
                let mut requests = c.requests(subject).await?;
                tokio::spawn(async move {
                    while let Some(r) = requests.next().await {
                        let payload = r.payload().clone();
                        if r.reply(payload).await.is_err() {
                            break;
                        }
                    }
                });
            }
            Peer::Nats(c) => {
                let mut sub = c.subscribe(subject).await?;
                c.flush().await?;
                let client = c.clone();
                tokio::spawn(async move {
                    while let Some(m) = sub.next().await {
                        if let Some(reply) = m.reply
                            && client.publish(reply, m.payload).await.is_err()
                        {
                            break;
                        }
                    }
                });
            }
        }
        Ok(())
    }

    async fn request(&self, subject: &'static str, payload: Bytes) -> Result<Bytes> {
        Ok(match self {
            Peer::Busbar(c) => c.request(subject, payload, Duration::from_secs(10)).await?.into_payload(),
            Peer::Nats(c) => c.request(subject, payload).await?.payload,
        })
    }
}

enum Target {
    Busbar(String),
    Nats(String),
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Busbar(_) => "busbar",
            Target::Nats(_) => "nats",
        }
    }
}

fn now_ns() -> u64 {
    busbar::core::id::now_ns()
}

fn payload(seq: u64, size: usize) -> Bytes {
    let mut p = vec![0u8; size];
    p[..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(&now_ns().to_be_bytes());
    Bytes::from(p)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

fn progress(quiet: bool, len: u64, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>16} [{bar:30}] {pos}/{len} {per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// What one receiver saw.
#[derive(Default)]
struct Seen {
    count: u64,
    out_of_order: u64,
    wrong_size: u64,
    /// Group members: the sequence numbers received, one bit each, to tell a message that two
    /// members got (and one that none got) from a plain count, where they would cancel out.
    got: Vec<u64>,
    duplicates: u64,
}

impl Seen {
    /// Marks sequence number `seq` received; a second time is a duplicate.
    fn mark(&mut self, seq: u64) {
        let Some(word) = self.got.get_mut((seq / 64) as usize) else { return };
        let bit = 1u64 << (seq % 64);
        if *word & bit != 0 {
            self.duplicates += 1;
        }
        *word |= bit;
    }
}

/// Sequence numbers got by several members and by any of them, over every member's bits.
fn merge_groups(members: &[Vec<u64>]) -> (u64, u64) {
    let words = members.iter().map(Vec::len).max().unwrap_or(0);
    let (mut twice, mut any) = (0u64, 0u64);
    for i in 0..words {
        let mut acc = 0u64;
        for m in members {
            let w = m.get(i).copied().unwrap_or(0);
            twice += u64::from((acc & w).count_ones());
            acc |= w;
        }
        any += u64::from(acc.count_ones());
    }
    (twice, any)
}

pub(crate) async fn run(args: BenchArgs) -> Result<()> {
    if args.size < 16 {
        bail!("--size must be at least 16 bytes (sequence number and timestamp)");
    }
    let mut _embedded = None;
    let target = match (&args.nats, args.embedded) {
        (Some(addr), _) => Target::Nats(addr.clone()),
        (None, true) => {
            let config = busbar_broker::Config::with_listen("127.0.0.1:0".parse()?);
            let broker = busbar_broker::Broker::start(config).await?;
            let addr = broker.local_addr().to_string();
            _embedded = Some(broker);
            Target::Busbar(addr)
        }
        (None, false) => Target::Busbar(args.server.clone()),
    };
    let scenarios = match args.scenario {
        Scenario::All => {
            vec![
                Scenario::Pubsub,
                Scenario::Fanout,
                Scenario::Group,
                Scenario::Request,
                Scenario::RequestInflight,
            ]
        }
        one => vec![one],
    };
    let mut reports = Vec::new();
    for scenario in scenarios {
        let report = match scenario {
            Scenario::Pubsub => fan(&args, &target, "pubsub", 1, false).await?,
            Scenario::Fanout => fan(&args, &target, "fanout", usize::from(args.subs), false).await?,
            Scenario::Group => fan(&args, &target, "group", usize::from(args.subs), true).await?,
            Scenario::Request => requests(&args, &target, "request", 1).await?,
            Scenario::RequestInflight => {
                requests(&args, &target, "request-inflight", usize::from(args.inflight)).await?
            }
            Scenario::All => unreachable!("expanded above"),
        };
        println!("{}", serde_json::to_string(&report)?);
        reports.push(report);
    }
    if !args.quiet {
        print_table(&reports);
    }
    if reports.iter().any(|r| r.lost > 0) {
        bail!("messages were lost");
    }
    if let Some(r) = reports.iter().find(|r| r.out_of_order > 0) {
        bail!("{}: {} messages out of order, duplicated or of the wrong size", r.scenario, r.out_of_order);
    }
    Ok(())
}

/// Publish/subscribe scenarios: 1 publisher, `receivers` subscribers (or group members).
async fn fan(
    args: &BenchArgs,
    target: &Target,
    name: &'static str,
    receivers: usize,
    group: bool,
) -> Result<Report> {
    let subject: &'static str = "bench.fan";
    let publisher = Peer::connect(target).await?;
    let histogram = Arc::new(Mutex::new(histogram()));
    let received = Arc::new(AtomicU64::new(0));
    let expected = if group { args.msgs } else { args.msgs * receivers as u64 };
    let mut tasks = Vec::new();
    let mut peers = Vec::new();
    let stop = CancellationToken::new();
    for _ in 0..receivers {
        let peer = Peer::connect(target).await?;
        let mut stream = peer.subscribe(subject, group.then_some("bench")).await?;
        peers.push(peer);
        let (histogram, received, size, stop) =
            (histogram.clone(), received.clone(), args.size, stop.clone());
        let total = args.msgs;
        tasks.push(tokio::spawn(async move {
            let mut seen = Seen::default();
            if group {
                seen.got = vec![0; total.div_ceil(64) as usize];
            }
            let mut local = crate::bench::histogram();
            let mut last: Option<u64> = None;
            // Created once, and polled only when no message is ready: a fresh `cancelled()` per
            // message costs a registration each time (the same for both targets).
            let stopped = stop.cancelled();
            tokio::pin!(stopped);
            loop {
                let next = tokio::select! {
                    biased;
                    p = stream.next() => p,
                    () = &mut stopped => None,
                };
                let Some(p) = next else { break };
                let sent = u64::from_be_bytes(p[8..16].try_into().unwrap_or_default());
                let seq = u64::from_be_bytes(p[..8].try_into().unwrap_or_default());
                let _ = local.record(now_ns().saturating_sub(sent).max(1));
                if last.is_some_and(|l| seq <= l) {
                    seen.out_of_order += 1;
                }
                last = Some(seq);
                if p.len() != size {
                    seen.wrong_size += 1;
                }
                seen.count += 1;
                if group {
                    seen.mark(seq);
                }
                received.fetch_add(1, Ordering::Relaxed);
                if seq + 1 == total && !group {
                    break;
                }
            }
            histogram.lock().await.add(&local).ok();
            seen
        }));
    }
    let bar = progress(args.quiet, expected, name);
    let start = Instant::now();
    for seq in 0..args.msgs {
        publisher.publish(subject, payload(seq, args.size)).await?;
        if seq.is_multiple_of(1024) {
            bar.set_position(received.load(Ordering::Relaxed));
        }
    }
    publisher.flush().await?;
    // Wait for the receivers: done when everything arrived, or nothing moved for 2 s.
    let mut last = (received.load(Ordering::Relaxed), Instant::now());
    while received.load(Ordering::Relaxed) < expected {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = received.load(Ordering::Relaxed);
        bar.set_position(now);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    stop.cancel();
    let mut seen = Seen::default();
    let mut members = Vec::new();
    for t in tasks {
        let s = t.await?;
        seen.count += s.count;
        seen.out_of_order += s.out_of_order;
        seen.wrong_size += s.wrong_size;
        seen.duplicates += s.duplicates;
        members.push(s.got);
    }
    drop((peers, publisher));
    let mut got = received.load(Ordering::Relaxed);
    if group {
        // Counted by sequence number: a duplicate must not hide a loss.
        let (twice, any) = merge_groups(&members);
        seen.duplicates += twice;
        got = any;
    }
    let h = histogram.lock().await;
    Ok(report(
        name,
        target,
        args,
        receivers,
        got,
        expected.saturating_sub(got),
        seen.out_of_order + seen.wrong_size + seen.duplicates,
        elapsed,
        &h,
    ))
}

/// Request/reply: one echo responder, requests `inflight` at a time.
async fn requests(args: &BenchArgs, target: &Target, name: &'static str, inflight: usize) -> Result<Report> {
    let subject: &'static str = "bench.echo";
    let responder = Peer::connect(target).await?;
    responder.echo(subject).await?;
    let requester = Peer::connect(target).await?;
    // Warm up, and make sure the responder is reachable.
    requester.request(subject, payload(0, args.size)).await.context("warm-up request")?;
    let bar = progress(args.quiet, args.msgs, name);
    let mut h = histogram();
    let mut lost = 0;
    let mut wrong = 0;
    let start = Instant::now();
    if inflight <= 1 {
        // Awaited in this task, as an application would. (Not through `FuturesUnordered`: it
        // wakes its own task each time it has polled all of its futures, which with one future
        // is every poll, and that wake-up pulls in another worker thread per request.)
        for seq in 0..args.msgs {
            let t = Instant::now();
            let reply = requester.request(subject, payload(seq, args.size)).await;
            record(&mut h, &mut lost, &mut wrong, seq, t.elapsed(), reply, args.size);
            if (seq + 1).is_multiple_of(256) {
                bar.set_position(seq + 1);
            }
        }
    } else {
        let mut pending = FuturesUnordered::new();
        let mut next = 0u64;
        let mut done = 0u64;
        while done < args.msgs {
            while pending.len() < inflight && next < args.msgs {
                let (peer, p, seq) = (requester.clone(), payload(next, args.size), next);
                pending.push(async move {
                    let t = Instant::now();
                    let reply = peer.request(subject, p).await;
                    (seq, t.elapsed(), reply)
                });
                next += 1;
            }
            let Some((seq, took, reply)) = pending.next().await else { break };
            done += 1;
            record(&mut h, &mut lost, &mut wrong, seq, took, reply, args.size);
            if done.is_multiple_of(256) {
                bar.set_position(done);
            }
        }
    }
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    Ok(report(name, target, args, 1, args.msgs - lost, lost, wrong, elapsed, &h))
}

/// Counts one reply: its latency when it echoes request `seq`, else as wrong or lost.
fn record(
    h: &mut Histogram<u64>,
    lost: &mut u64,
    wrong: &mut u64,
    seq: u64,
    took: Duration,
    reply: Result<Bytes>,
    size: usize,
) {
    match reply {
        Ok(r) if r.len() == size && r[..8] == seq.to_be_bytes() => {
            let _ = h.record((took.as_nanos() as u64).max(1));
        }
        Ok(_) => *wrong += 1,
        Err(_) => *lost += 1,
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    scenario: &'static str,
    target: &Target,
    args: &BenchArgs,
    receivers: usize,
    delivered: u64,
    lost: u64,
    out_of_order: u64,
    elapsed: Duration,
    h: &Histogram<u64>,
) -> Report {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Report {
        scenario,
        target: target.name(),
        msgs: args.msgs,
        size: args.size,
        receivers,
        msgs_per_sec: delivered as f64 / secs,
        mb_per_sec: delivered as f64 * args.size as f64 / secs / 1e6,
        p50_us: us(0.5),
        p90_us: us(0.9),
        p99_us: us(0.99),
        p999_us: us(0.999),
        lost,
        out_of_order,
        elapsed_ms: elapsed.as_millis(),
    }
}

fn print_table(reports: &[Report]) {
    eprintln!();
    eprintln!(
        "{:<18} {:<7} {:>9} {:>6} {:>5} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6}",
        "scenario",
        "target",
        "msgs",
        "size",
        "rcv",
        "msgs/s",
        "MB/s",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9 µs",
        "lost"
    );
    for r in reports {
        eprintln!(
            "{:<18} {:<7} {:>9} {:>6} {:>5} {:>12.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>6}",
            r.scenario,
            r.target,
            r.msgs,
            r.size,
            r.receivers,
            r.msgs_per_sec,
            r.mb_per_sec,
            r.p50_us,
            r.p90_us,
            r.p99_us,
            r.p999_us,
            r.lost
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duplicate_in_a_group_cannot_hide_a_loss() {
        // Four messages to two members: 0 and 1 to the first, 1 and 3 to the second; 2 lost.
        let mut a = Seen { got: vec![0; 1], ..Seen::default() };
        let mut b = Seen { got: vec![0; 1], ..Seen::default() };
        for seq in [0, 1] {
            a.mark(seq);
        }
        for seq in [1, 3] {
            b.mark(seq);
        }
        assert_eq!(a.count + b.count, 0, "mark counts nothing by itself");
        let (twice, any) = merge_groups(&[a.got, b.got]);
        assert_eq!((twice, any), (1, 3), "four received, but three distinct and one twice");
        // Within one member, and past the end of its bits (ignored, not a panic).
        let mut c = Seen { got: vec![0; 2], ..Seen::default() };
        for seq in [70, 70, 5000] {
            c.mark(seq);
        }
        assert_eq!(c.duplicates, 1);
        assert_eq!(merge_groups(&[c.got]), (0, 1));
    }
}
