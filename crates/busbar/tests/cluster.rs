//! Three brokers in one process, routed to each other on 127.0.0.1 port-0 listeners: messages,
//! groups, requests and direct addressing across brokers; interest coming and going; a broker
//! killed (its clients fail over, the others stop routing to it) and restarted (it rejoins).

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use busbar::{Client, ClientOptions, Error, EventBus, GroupPolicy, Outgoing, Status, Subscription};
use busbar_broker::{Broker, ClusterConfig};
use common::*;
use futures_util::StreamExt;

const LONG: Duration = Duration::from_secs(60);

fn node_config(node: u8, seeds: &[SocketAddr]) -> busbar_broker::Config {
    let mut config = common::config();
    let mut cluster = ClusterConfig::new("test", node, "127.0.0.1:0".parse().unwrap());
    cluster.routes = seeds.to_vec();
    config.cluster = Some(cluster);
    config.server_name = format!("node-{node}");
    config
}

async fn node(node: u8, seeds: &[SocketAddr]) -> Broker {
    broker_with(node_config(node, seeds)).await
}

/// A, then B and C seeded with A only: they learn of each other from A.
async fn three() -> (Broker, Broker, Broker) {
    let a = node(1, &[]).await;
    let seed = [a.cluster_addr().unwrap()];
    let b = node(2, &seed).await;
    let c = node(3, &seed).await;
    meshed(&[&a, &b, &c]).await;
    (a, b, c)
}

async fn meshed(brokers: &[&Broker]) {
    let want = brokers.len() - 1;
    eventually("a full mesh", || brokers.iter().all(|b| b.routes().len() == want)).await;
}

/// Remote subscriptions `broker` knows of, over all its routes.
fn remote_subs(broker: &Broker) -> usize {
    broker.routes().iter().map(|r| r.remote_subscriptions).sum()
}

async fn wait_interest(broker: &Broker, subs: usize) {
    eventually(&format!("{subs} remote subscriptions known"), || remote_subs(broker) == subs).await;
}

async fn next(sub: &mut Subscription) -> busbar::Message {
    tokio::time::timeout(PATIENCE, sub.next()).await.expect("a message in time").expect("open")
}

/// Everything a subscription receives until it is quiet for a moment.
async fn drain(sub: &mut Subscription) -> Vec<busbar::Message> {
    let mut out = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        out.push(m);
    }
    out
}

/// Exactly `n` messages: waits for them (bounded by PATIENCE, however slow the machine), then
/// checks that no more follow.
async fn exactly(sub: &mut Subscription, n: usize) -> Vec<busbar::Message> {
    let mut out = Vec::new();
    while out.len() < n {
        out.push(next(sub).await);
    }
    out.extend(drain(sub).await);
    assert_eq!(out.len(), n, "no more than {n}");
    out
}

/// What each member of a group receives, `total` in all: waits for them all (bounded by
/// PATIENCE), then checks that no more follow.
async fn spread(members: &mut [(Client, Subscription)], total: usize) -> Vec<Vec<busbar::Message>> {
    let mut got: Vec<Vec<busbar::Message>> = members.iter().map(|_| Vec::new()).collect();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while got.iter().map(Vec::len).sum::<usize>() < total {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {total} arrived",
            got.iter().map(Vec::len).sum::<usize>()
        );
        for (i, (_, sub)) in members.iter_mut().enumerate() {
            if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(20), sub.next()).await {
                got[i].push(m);
            }
        }
    }
    for (i, (_, sub)) in members.iter_mut().enumerate() {
        got[i].extend(drain(sub).await);
    }
    assert_eq!(got.iter().map(Vec::len).sum::<usize>(), total, "no more than {total}");
    got
}

#[tokio::test]
async fn messages_cross_brokers_once_per_subscription_in_order() {
    let (a, b, c) = three().await;
    let on_a = client(&a).await;
    let mut wide = on_a.subscribe("orders.>").await.unwrap();
    let mut narrow = on_a.subscribe("orders.*").await.unwrap();
    on_a.flush().await.unwrap();
    let on_b = client(&b).await;
    let mut exact = on_b.subscribe("orders.created").await.unwrap();
    on_b.flush().await.unwrap();
    wait_interest(&c, 3).await;

    let publisher = client(&c).await;
    for i in 0..20 {
        publisher.publish("orders.created", i.to_string()).await.unwrap();
    }
    publisher.publish("orders.eu.shipped", "deep").await.unwrap();
    publisher.flush().await.unwrap();
    for (name, sub, n) in
        [("orders.>", &mut wide, 21), ("orders.*", &mut narrow, 20), ("exact", &mut exact, 20)]
    {
        let got = exactly(sub, n).await;
        assert_eq!(got.len(), n, "{name}: one copy of each message");
        let order: Vec<&str> = got.iter().take(20).map(|m| m.payload_str().unwrap()).collect();
        let expected: Vec<String> = (0..20).map(|i| i.to_string()).collect();
        assert_eq!(order, expected, "{name}: in publish order");
    }
    // One copy per broker on the wire, not one per subscription: A got 21, B got 20.
    let to = |broker: &Broker, node: u8| broker.routes().iter().find(|r| r.node == node).unwrap().msgs_out;
    assert_eq!((to(&c, 1), to(&c, 2)), (21, 20));
}

#[tokio::test]
async fn unsubscribing_stops_the_forwarding() {
    let (a, _b, c) = three().await;
    let on_a = client(&a).await;
    let sub = on_a.subscribe("temp.*").await.unwrap();
    on_a.flush().await.unwrap();
    wait_interest(&c, 1).await;
    drop(sub);
    on_a.flush().await.unwrap();
    wait_interest(&c, 0).await;
    let publisher = client(&c).await;
    let before = c.routes().iter().map(|r| r.msgs_out).sum::<u64>();
    for _ in 0..10 {
        publisher.publish("temp.x", "nobody").await.unwrap();
    }
    publisher.flush().await.unwrap();
    assert_eq!(c.routes().iter().map(|r| r.msgs_out).sum::<u64>(), before, "nothing forwarded");
    // A client that disconnects takes its interest with it, too.
    let gone = client(&a).await;
    let _s = gone.subscribe("temp.*").await.unwrap();
    gone.flush().await.unwrap();
    wait_interest(&c, 1).await;
    gone.disconnect().await.unwrap();
    wait_interest(&c, 0).await;
}

#[tokio::test]
async fn a_group_spread_over_three_brokers_gets_each_message_once() {
    let (a, b, c) = three().await;
    let brokers = [&a, &b, &c];
    let mut members = Vec::new();
    for broker in brokers {
        let member = client(broker).await;
        let sub = member.subscribe_group("work.items", "workers", GroupPolicy::RoundRobin).await.unwrap();
        member.flush().await.unwrap();
        members.push((member, sub));
    }
    for broker in brokers {
        wait_interest(broker, 2).await;
    }
    // Publishers on every broker: each message reaches one member, and every member works.
    for (i, broker) in brokers.iter().enumerate() {
        let publisher = client(broker).await;
        for j in 0..30 {
            publisher.publish("work.items", format!("{i}-{j}")).await.unwrap();
        }
        publisher.flush().await.unwrap();
    }
    let got = spread(&mut members, 90).await;
    let mut seen = HashMap::new();
    let shares: Vec<usize> = got.iter().map(Vec::len).collect();
    for m in got.into_iter().flatten() {
        *seen.entry(m.payload_str().unwrap().to_string()).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 90, "every message delivered");
    assert!(seen.values().all(|&n| n == 1), "each once cluster-wide");
    assert!(shares.iter().all(|&n| n > 0), "spread across members: {shares:?}");

    // With no local member, the group is served by remote ones.
    let (lonely, _) = members.remove(0);
    lonely.disconnect().await.unwrap();
    wait_interest(&b, 1).await;
    let publisher = client(&a).await;
    for j in 0..10 {
        publisher.publish("work.items", format!("late-{j}")).await.unwrap();
    }
    publisher.flush().await.unwrap();
    let remote: usize = spread(&mut members, 10).await.iter().map(Vec::len).sum();
    assert_eq!(remote, 10);
}

#[tokio::test]
async fn the_hash_policy_picks_the_same_member_from_every_broker() {
    let (a, b, c) = three().await;
    let mut members = Vec::new();
    for broker in [&a, &b, &c] {
        let member = client(broker).await;
        let sub = member.subscribe_group("acct.*", "ledger", GroupPolicy::Hash).await.unwrap();
        member.flush().await.unwrap();
        members.push((member, sub));
    }
    for broker in [&a, &b, &c] {
        wait_interest(broker, 2).await;
    }
    for broker in [&a, &c] {
        let publisher = client(broker).await;
        for key in 0..60u64 {
            let m = Outgoing::new("acct.move", key.to_string()).key(key);
            publisher.publish_message(m).await.unwrap();
        }
        publisher.flush().await.unwrap();
    }
    let mut owner: HashMap<String, HashSet<usize>> = HashMap::new();
    let got = spread(&mut members, 120).await;
    let shares: Vec<usize> = got.iter().map(Vec::len).collect();
    for (i, messages) in got.into_iter().enumerate() {
        for m in messages {
            owner.entry(m.payload_str().unwrap().to_string()).or_default().insert(i);
        }
    }
    assert_eq!(owner.len(), 60);
    assert!(
        owner.values().all(|members| members.len() == 1),
        "a key has one owner, whichever broker published"
    );
    assert_eq!(shares.iter().sum::<usize>(), 120, "each message once");
    assert!(shares.iter().all(|&n| n > 0), "keys spread over members: {shares:?}");
}

#[tokio::test]
async fn requests_and_direct_messages_cross_brokers() {
    let (a, b, c) = three().await;
    let responder = client(&c).await;
    let _h = responder
        .respond("svc.echo", |m| async move { Ok::<_, String>(format!("echo {}", m.payload_str().unwrap())) })
        .await
        .unwrap();
    responder.flush().await.unwrap();
    wait_interest(&a, 1).await;
    let requester = client(&a).await;
    let reply = requester.request("svc.echo", "hi", LONG).await.unwrap();
    assert_eq!(reply.payload_str(), Some("echo hi"));
    assert_eq!(reply.source(), responder.service_id(), "the responder's cluster-wide id");
    assert_eq!(a.stats().requests_pending, 0);

    // Nobody anywhere: NoResponders at once.
    let none = tokio::time::timeout(PATIENCE, requester.request("svc.nobody", "?", LONG)).await.unwrap();
    assert!(matches!(none, Err(Error::NoResponders { .. })), "{none:?}");

    // Service ids are unique cluster-wide: the top byte is the broker's node id.
    let ids: HashSet<u8> = [requester.service_id(), responder.service_id(), client(&b).await.service_id()]
        .iter()
        .map(|id| (id >> 24) as u8)
        .collect();
    assert_eq!(ids, HashSet::from([1, 3, 2]));

    // Direct to a client on another broker: only it receives.
    let target = client(&c).await;
    let mut mine = target.subscribe("direct.>").await.unwrap();
    target.flush().await.unwrap();
    let bystander = client(&b).await;
    let mut theirs = bystander.subscribe("direct.>").await.unwrap();
    bystander.flush().await.unwrap();
    wait_interest(&a, 3).await;
    requester.publish_message(Outgoing::new("direct.note", "for you").to(target.service_id())).await.unwrap();
    requester.flush().await.unwrap();
    assert_eq!(next(&mut mine).await.payload_str(), Some("for you"));
    assert!(drain(&mut theirs).await.is_empty(), "not for the bystander");
}

/// A REPLY goes over a route only when it answers a CALL its client was handed: any other is
/// dropped where it was sent, not carried to the requester's broker (a client with no publish
/// rights could otherwise fill a route until it closed).
#[tokio::test]
async fn an_unsolicited_reply_does_not_cross_the_route() {
    let a = node(1, &[]).await;
    let c = node(3, &[a.cluster_addr().unwrap()]).await;
    meshed(&[&a, &c]).await;
    let on_a = client(&a).await;
    let mut sub = on_a.subscribe("after").await.unwrap();
    on_a.flush().await.unwrap();
    wait_interest(&c, 1).await;
    let mut raw = Raw::hello(&c).await;
    let mut message = busbar::core::Message::new("any.topic", "unasked");
    message.destination = on_a.service_id();
    raw.send(busbar::core::Frame::Reply(busbar::core::Reply { id: 77, error: None, remaining: 0, message }))
        .await;
    // Behind it on the same route, a message: once it arrived, the reply would have too.
    raw.send(busbar::core::Frame::Pub(busbar::core::Message::new("after", "x"))).await;
    assert_eq!(next(&mut sub).await.payload_str(), Some("x"));
    assert_eq!(c.stats().late_replies, 1, "dropped where it was sent");
    assert_eq!(a.stats().late_replies, 0, "never carried over the route");
}

/// A client on another broker that serves a topic through two subscriptions answers a
/// scatter-gather twice, both answers crossing the route.
#[tokio::test]
async fn two_subscriptions_of_one_remote_client_both_answer_a_gather() {
    let a = node(1, &[]).await;
    let c = node(3, &[a.cluster_addr().unwrap()]).await;
    meshed(&[&a, &c]).await;
    let responder = client(&c).await;
    let _one = responder.respond("two.x", |_m| async move { Ok::<_, String>("exact") }).await.unwrap();
    let _two = responder.respond("two.*", |_m| async move { Ok::<_, String>("wildcard") }).await.unwrap();
    responder.flush().await.unwrap();
    wait_interest(&a, 2).await;
    let requester = client(&a).await;
    let answers = tokio::time::timeout(PATIENCE, requester.request_all("two.x", "?", LONG, None))
        .await
        .expect("both answers long before the timeout")
        .unwrap();
    let mut got: Vec<String> =
        answers.iter().map(|a| a.as_ref().unwrap().payload_str().unwrap().to_string()).collect();
    got.sort();
    assert_eq!(got, ["exact", "wildcard"]);
}

#[tokio::test]
async fn a_responder_lost_on_another_broker_fails_the_request_fast() {
    let (a, _b, c) = three().await;
    let responder = client(&c).await;
    let mut calls = responder.requests("slow.op").await.unwrap();
    responder.flush().await.unwrap();
    wait_interest(&a, 1).await;
    let requester = client(&a).await;
    let pending = tokio::spawn(async move { requester.request("slow.op", "x", LONG).await });
    let _call = tokio::time::timeout(PATIENCE, calls.next()).await.unwrap().unwrap();
    responder.disconnect().await.unwrap();
    let answer =
        tokio::time::timeout(PATIENCE, pending).await.expect("fails long before its timeout").unwrap();
    assert_eq!(answer.unwrap_err().code(), Some(busbar::ErrorCode::ResponderLost));
}

#[tokio::test]
async fn a_killed_broker_fails_its_clients_over_and_rejoins_when_restarted() {
    let (a, b, c) = three().await;
    // A client that knows only B; it learns A and C from B's WELCOME.
    let options = ClientOptions::new(b.local_addr().to_string()).name("wanderer");
    let wanderer = Client::connect_with(options).await.unwrap();
    let mut sub = wanderer.subscribe("after.>").await.unwrap();
    wanderer.flush().await.unwrap();
    wait_interest(&a, 1).await;

    b.stop().await;
    eventually("A and C drop the route to B", || a.routes().len() == 1 && c.routes().len() == 1).await;
    assert!(a.routes().iter().all(|r| r.node == 3));
    // The wanderer reconnects to A or C by itself and its subscription works again.
    eventually("the wanderer is on another broker", || {
        wanderer.status() == Status::Connected && (wanderer.service_id() >> 24) as u8 != 2
    })
    .await;
    let publisher = client(&a).await;
    let got = tokio::time::timeout(PATIENCE, async {
        loop {
            publisher.publish("after.failover", "hello again").await.unwrap();
            if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(100), sub.next()).await {
                return m;
            }
        }
    })
    .await
    .expect("the subscription works after failover");
    assert_eq!(got.payload_str(), Some("hello again"));

    // B comes back (on new ports), seeded with A only, and the mesh is whole again.
    let b = node(2, &[a.cluster_addr().unwrap()]).await;
    meshed(&[&a, &b, &c]).await;
    // B's old address, learned by gossip, is given up once B is reached at its new one: the
    // dialers do not pile up with restarts (one per live peer at most on A and C).
    eventually("stale addresses given up", || a.route_addresses() <= 2 && c.route_addresses() <= 2).await;
    let on_b = client(&b).await;
    let mut back = on_b.subscribe("after.>").await.unwrap();
    on_b.flush().await.unwrap();
    // The wanderer (now on A or C) and on_b: each known on the brokers it is not connected to.
    eventually("interest known again", || remote_subs(&a) + remote_subs(&c) == 3).await;
    client(&c).await.publish("after.rejoin", "welcome back").await.unwrap();
    assert_eq!(next(&mut back).await.payload_str(), Some("welcome back"));
}

#[tokio::test]
async fn routes_from_another_cluster_or_without_the_token_are_refused() {
    let mut config = node_config(1, &[]);
    config.cluster.as_mut().unwrap().token = Some("cluster-secret-0123".into());
    let a = broker_with(config).await;
    let seed = [a.cluster_addr().unwrap()];
    let mut stranger = node_config(2, &seed);
    stranger.cluster.as_mut().unwrap().name = "other".into();
    let _stranger = broker_with(stranger).await;
    let _tokenless = node(3, &seed).await;
    let mut friend = node_config(4, &seed);
    friend.cluster.as_mut().unwrap().token = Some("cluster-secret-0123".into());
    let friend = broker_with(friend).await;
    meshed(&[&a, &friend]).await;
    eventually("both refusals counted", || a.stats().auth_failures >= 2).await;
    assert_eq!(a.routes().len(), 1);
    assert_eq!(a.routes()[0].node, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_joining_at_once_still_close_the_mesh() {
    let a = node(1, &[]).await;
    let seed = [a.cluster_addr().unwrap()];
    // B and C both join through A at the same moment: each may be told of the cluster before the
    // other is in it; A's gossip after each join closes the mesh.
    let (b, c, d) = tokio::join!(node(2, &seed), node(3, &seed), node(4, &seed));
    meshed(&[&a, &b, &c, &d]).await;
    let on_d = client(&d).await;
    let mut sub = on_d.subscribe("mesh.*").await.unwrap();
    on_d.flush().await.unwrap();
    wait_interest(&b, 1).await;
    client(&b).await.publish("mesh.ok", "closed").await.unwrap();
    assert_eq!(next(&mut sub).await.payload_str(), Some("closed"));
}

#[tokio::test]
async fn a_nats_request_reaches_a_native_responder_on_another_broker() {
    let mut config = node_config(1, &[]);
    config.nats_listen = Some("127.0.0.1:0".parse().unwrap());
    let a = broker_with(config).await;
    let c = node(3, &[a.cluster_addr().unwrap()]).await;
    meshed(&[&a, &c]).await;
    let responder = client(&c).await;
    let _h = responder.respond("far.svc", |_m| async move { Ok::<_, String>("from C") }).await.unwrap();
    responder.flush().await.unwrap();
    wait_interest(&a, 1).await;
    let nc = async_nats::connect(format!("nats://{}", a.nats_addr().unwrap())).await.unwrap();
    let reply = tokio::time::timeout(PATIENCE, nc.request("far.svc", "?".into())).await.unwrap().unwrap();
    assert_eq!(reply.payload, "from C");
    assert_eq!(a.routes().len(), 1, "the route stayed up");
}

/// A broker of the cluster with a NATS listener too.
async fn nats_node(node: u8, seeds: &[SocketAddr]) -> Broker {
    let mut config = node_config(node, seeds);
    config.nats_listen = Some("127.0.0.1:0".parse().unwrap());
    broker_with(config).await
}

/// A NATS client of `broker` answering `subject` (in `queue` when given) with `answer`.
async fn nats_responder(broker: &Broker, subject: &str, queue: Option<&str>, answer: &'static str) {
    let nc = async_nats::connect(format!("nats://{}", broker.nats_addr().unwrap())).await.unwrap();
    let mut service = match queue {
        Some(q) => nc.queue_subscribe(subject.to_string(), q.to_string()).await.unwrap(),
        None => nc.subscribe(subject.to_string()).await.unwrap(),
    };
    nc.flush().await.unwrap();
    tokio::spawn(async move {
        while let Some(m) = service.next().await {
            nc.publish(m.reply.expect("a request"), answer.into()).await.unwrap();
        }
    });
}

#[tokio::test]
async fn a_native_request_reaches_nats_responders_on_other_brokers() {
    // One NATS responder on C, there before A joins (A learns of it from C's snapshot). The
    // reply subject names the topic, for C to judge permissions on; the requester's broker
    // takes a reply only for the request's own topic.
    let c = nats_node(3, &[]).await;
    let nc = async_nats::connect(format!("nats://{}", c.nats_addr().unwrap())).await.unwrap();
    let mut service = nc.subscribe("far.nats").await.unwrap();
    nc.flush().await.unwrap();
    tokio::spawn(async move {
        while let Some(m) = service.next().await {
            let reply = m.reply.expect("a request").to_string();
            let head = reply.strip_suffix(".far.nats").expect("the long form names the topic");
            if m.payload == "forge" {
                nc.publish(format!("{head}.far.other"), "forged topic".into()).await.unwrap();
            } else {
                // Without the topic: not a reply C can judge, dropped.
                nc.publish(head.to_string(), "no topic".into()).await.unwrap();
                nc.publish(reply, "from C".into()).await.unwrap();
            }
        }
    });
    let a = nats_node(1, &[c.cluster_addr().unwrap()]).await;
    meshed(&[&a, &c]).await;
    let requester = client(&a).await;
    wait_interest(&a, 1).await;
    let forged = requester.request("far.nats", "forge", LONG).await;
    assert_eq!(forged.unwrap_err().code(), Some(busbar::ErrorCode::PermissionDenied));
    let reply = requester.request("far.nats", "?", LONG).await.unwrap();
    assert_eq!(reply.payload_str(), Some("from C"));
    assert_eq!(reply.topic(), "far.nats");
    assert_eq!(a.stats().requests_pending, 0);

    // Scatter-gather: a NATS subscriber here and one on C both answer.
    nats_responder(&a, "all.nats", None, "from A").await;
    nats_responder(&c, "all.nats", None, "from C").await;
    wait_interest(&a, 2).await;
    let answers = requester.request_all("all.nats", "?", LONG, None).await.unwrap();
    let mut got: Vec<String> =
        answers.iter().map(|a| a.as_ref().unwrap().payload_str().unwrap().to_string()).collect();
    got.sort();
    assert_eq!(got, ["from A", "from C"]);

    // A queue group on C: one member answers each request.
    nats_responder(&c, "q.nats", Some("workers"), "member 1").await;
    nats_responder(&c, "q.nats", Some("workers"), "member 2").await;
    wait_interest(&a, 4).await;
    for _ in 0..6 {
        let reply = requester.request("q.nats", "?", LONG).await.unwrap();
        assert!(reply.payload_str().unwrap().starts_with("member "));
    }
    let gathered = requester.request_all("q.nats", "?", LONG, None).await.unwrap();
    assert_eq!(gathered.len(), 1, "one member of the group");
    assert_eq!(a.stats().requests_pending, 0);
    assert_eq!(a.routes().len(), 1, "the route stayed up");
}

/// Refusals another broker answers for its NATS subscriber (here: not allowed to reply; a
/// request too large for that broker) fail a request it alone was sent at once, and only take
/// that subscriber out of one that others got too (first reply wins).
#[tokio::test]
async fn refusals_from_another_broker_fail_fast_or_leave_the_request_to_the_others() {
    use busbar_broker::{AuthConfig, Permissions, Rules, User, hash_password};
    let mut config = node_config(3, &[]);
    config.nats_listen = Some("127.0.0.1:0".parse().unwrap());
    config.max_frame_size = 16 * 1024;
    // C's one user may subscribe anywhere but may neither publish on perm.> nor answer requests.
    let mute = Permissions {
        publish: Rules::only(["elsewhere.>"]),
        allow_responses: false,
        ..Permissions::default()
    };
    let user = User { name: "mute".into(), password_hash: hash_password("pw"), permissions: Some(mute) };
    config.auth = AuthConfig { users: vec![user], ..AuthConfig::default() };
    let token = Some("a-cluster-token-0123".to_string());
    config.cluster.as_mut().unwrap().token = token.clone();
    let c = broker_with(config).await;
    let mut config = node_config(1, &[c.cluster_addr().unwrap()]);
    config.nats_listen = Some("127.0.0.1:0".parse().unwrap());
    config.cluster.as_mut().unwrap().token = token;
    let a = broker_with(config).await;
    meshed(&[&a, &c]).await;
    let on_c = async_nats::ConnectOptions::new()
        .user_and_password("mute".into(), "pw".into())
        .connect(format!("nats://{}", c.nats_addr().unwrap()))
        .await
        .unwrap();
    let mut perm = on_c.subscribe("perm.x").await.unwrap();
    let _big = on_c.subscribe("big.x").await.unwrap();
    on_c.flush().await.unwrap();
    tokio::spawn(async move {
        while let Some(m) = perm.next().await {
            on_c.publish(m.reply.unwrap(), "not allowed".into()).await.unwrap();
        }
    });
    wait_interest(&a, 2).await;
    let requester = client(&a).await;

    // Alone: PermissionDenied at once, not the timeout.
    let alone = tokio::time::timeout(PATIENCE, requester.request("perm.x", "?", LONG))
        .await
        .expect("refused long before its timeout");
    assert_eq!(alone.unwrap_err().code(), Some(busbar::ErrorCode::PermissionDenied));

    // With a subscriber on A too, which answers only once C has refused.
    let on_a = async_nats::connect(format!("nats://{}", a.nats_addr().unwrap())).await.unwrap();
    let mut here = on_a.subscribe("perm.x").await.unwrap();
    let mut here_big = on_a.subscribe("big.x").await.unwrap();
    on_a.flush().await.unwrap();
    let refused = c.stats().permission_denied;
    let r = requester.clone();
    let pending = tokio::spawn(async move { r.request("perm.x", "?", LONG).await });
    let m = tokio::time::timeout(PATIENCE, here.next()).await.unwrap().unwrap();
    eventually("C refused", || c.stats().permission_denied > refused).await;
    on_a.publish(m.reply.unwrap(), "from A".into()).await.unwrap();
    let answer = tokio::time::timeout(PATIENCE, pending).await.unwrap().unwrap();
    assert_eq!(answer.unwrap().payload_str(), Some("from A"), "C's refusal did not end it");

    // Too large for C: refused for C's subscriber before any CALL goes out; A's answers.
    let r = requester.clone();
    let pending = tokio::spawn(async move { r.request("big.x", vec![7u8; 32 * 1024], LONG).await });
    let m = tokio::time::timeout(PATIENCE, here_big.next()).await.unwrap().unwrap();
    on_a.publish(m.reply.unwrap(), "big from A".into()).await.unwrap();
    let answer = tokio::time::timeout(PATIENCE, pending).await.unwrap().unwrap();
    assert_eq!(answer.unwrap().payload_str(), Some("big from A"));
    assert_eq!(a.stats().requests_pending, 0);
}

/// Two brokers given the same node id: the second replaces the first's route once (it could
/// be a restart), and when the first comes back it is refused, not let the two replace each
/// other for ever.
#[tokio::test]
async fn a_second_broker_with_a_node_id_in_use_is_refused() {
    let a = node(1, &[]).await;
    let seed = [a.cluster_addr().unwrap()];
    let first = node(2, &seed).await;
    meshed(&[&a, &first]).await;
    let second = node(2, &seed).await;
    eventually("the returning first instance refused", || a.stats().auth_failures >= 1).await;
    let second_url = second.cluster_addr().unwrap().to_string();
    eventually("node 2 is the second broker, for good", || {
        a.routes().iter().any(|r| r.node == 2 && r.cluster_url == second_url)
    })
    .await;
    // It stays so: messages from A reach the second broker's clients.
    let sub_client = client(&second).await;
    let mut sub = sub_client.subscribe("dup.>").await.unwrap();
    sub_client.flush().await.unwrap();
    wait_interest(&a, 1).await;
    let publisher = client(&a).await;
    publisher.publish("dup.x", "to node 2").await.unwrap();
    assert_eq!(next(&mut sub).await.payload_str(), Some("to node 2"));
    drop(first);
}

#[tokio::test]
async fn peers_are_told_the_advertised_client_address() {
    let a = node(1, &[]).await;
    let mut config = node_config(2, &[a.cluster_addr().unwrap()]);
    // Never bound: only what B tells (as when it listens on 0.0.0.0 behind a known address).
    config.cluster.as_mut().unwrap().client_advertise = Some("192.0.2.7:4900".parse().unwrap());
    let b = broker_with(config).await;
    meshed(&[&a, &b]).await;
    assert_eq!(a.routes()[0].client_url.as_deref(), Some("192.0.2.7:4900"));
}

#[tokio::test]
async fn service_names_resolve_across_brokers() {
    let (a, _b, c) = three().await;
    let options = ClientOptions::new(c.local_addr().to_string()).service("mailer");
    let mailer = Client::connect_with(options).await.unwrap();
    let mut inbox = mailer.subscribe("mail.>").await.unwrap();
    let _h = mailer.respond("mail.count", |_m| async move { Ok::<_, String>("3") }).await.unwrap();
    mailer.flush().await.unwrap();
    // Look-alike subscribers, beside the mailer and elsewhere, must not get what is addressed
    // to it.
    let other = client(&a).await;
    let mut theirs = other.subscribe("mail.>").await.unwrap();
    other.flush().await.unwrap();
    let neighbour = client(&c).await;
    let mut next_door = neighbour.subscribe("mail.>").await.unwrap();
    neighbour.flush().await.unwrap();
    wait_interest(&a, 3).await;
    let sender = client(&a).await;
    sender.publish_message(Outgoing::new("mail.send", "hi").to_service("mailer")).await.unwrap();
    sender.flush().await.unwrap();
    assert_eq!(next(&mut inbox).await.payload_str(), Some("hi"));
    assert!(drain(&mut theirs).await.is_empty(), "addressed to the mailer only");
    assert!(drain(&mut next_door).await.is_empty(), "not to its neighbour on its broker either");
    let reply =
        sender.request_message(Outgoing::new("mail.count", "").to_service("mailer"), LONG).await.unwrap();
    assert_eq!(reply.payload_str(), Some("3"));
    // Gone with its client.
    mailer.disconnect().await.unwrap();
    wait_interest(&a, 1).await;
    let gone = sender.request_message(Outgoing::new("mail.count", "").to_service("mailer"), LONG).await;
    assert!(matches!(gone, Err(Error::NoResponders { .. })), "{gone:?}");
}

#[tokio::test]
async fn a_new_route_learns_more_subscriptions_than_max_pending_counts() {
    // The snapshot a new route starts with is one queue item, its bytes not counted: 1 000
    // subscriptions (about 70 kB of them) against a max_pending of 50 frames and 64 KiB must not
    // close the route as a slow consumer.
    let small = |node, seeds: &[SocketAddr]| busbar_broker::Config {
        max_pending: 50,
        max_pending_bytes: 64 * 1024,
        max_frame_size: 64 * 1024,
        ..node_config(node, seeds)
    };
    let a = broker_with(small(1, &[])).await;
    let client = Client::connect(a.local_addr().to_string()).await.unwrap();
    let mut subs = Vec::new();
    for i in 0..1000 {
        subs.push(client.subscribe(format!("many.{i}")).await.unwrap());
    }
    let b = broker_with(small(2, &[a.cluster_addr().unwrap()])).await;
    meshed(&[&a, &b]).await;
    wait_interest(&b, 1000).await;
    // And the route stays up: a message published on B reaches A's client.
    let publisher = Client::connect(b.local_addr().to_string()).await.unwrap();
    publisher.publish("many.999", "x").await.unwrap();
    assert_eq!(next(&mut subs[999]).await.payload_str(), Some("x"));
    assert_eq!(a.stats().slow_consumers, 0);
}

#[tokio::test]
async fn a_message_too_large_for_a_peer_is_not_forwarded_and_the_route_stays() {
    let sized = |node, seeds: &[SocketAddr], max| busbar_broker::Config {
        max_frame_size: max,
        ..node_config(node, seeds)
    };
    let a = broker_with(sized(1, &[], 256 * 1024)).await;
    let b = broker_with(sized(2, &[a.cluster_addr().unwrap()], 64 * 1024)).await;
    meshed(&[&a, &b]).await;
    let subscriber = Client::connect(b.local_addr().to_string()).await.unwrap();
    let mut sub = subscriber.subscribe("sized").await.unwrap();
    wait_interest(&a, 1).await;
    let publisher = Client::connect(a.local_addr().to_string()).await.unwrap();
    publisher.publish("sized", vec![0u8; 100 * 1024]).await.unwrap();
    publisher.publish("sized", "small").await.unwrap();
    // The large one is not sent to B (which would close the route on it); what follows is.
    assert_eq!(next(&mut sub).await.payload_str(), Some("small"));
    assert!(drain(&mut sub).await.is_empty());
    assert_eq!((a.routes().len(), b.routes().len()), (1, 1));
    assert_eq!(a.stats().slow_consumers + b.stats().slow_consumers, 0);

    // Requests and replies too large for the other broker fail at once, not at their timeout.
    let _on_b =
        subscriber.respond("echo.b", |m| async move { Ok::<_, String>(m.payload().clone()) }).await.unwrap();
    let _on_a =
        publisher.respond("big.a", |_| async { Ok::<_, String>(vec![0u8; 100 * 1024]) }).await.unwrap();
    wait_interest(&a, 2).await;
    wait_interest(&b, 1).await;
    let quick = Duration::from_secs(30);
    let big_request = publisher.request("echo.b", vec![0u8; 100 * 1024], quick).await;
    assert_eq!(big_request.unwrap_err().code(), Some(busbar::ErrorCode::FrameTooLarge));
    let big_reply = subscriber.request("big.a", "", quick).await;
    assert!(matches!(&big_reply, Err(Error::Handler(t)) if t.contains("larger")), "{big_reply:?}");
    assert_eq!(publisher.request("echo.b", "small", quick).await.unwrap().payload_str(), Some("small"));
}
