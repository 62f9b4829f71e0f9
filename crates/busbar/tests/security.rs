//! Authentication and per-topic permissions over a real broker.

mod common;

use std::time::Duration;

use busbar::{Client, ClientOptions, Error, ErrorCode, EventBus};
use busbar_broker::{AuthConfig, Broker, Permissions, Rules, User, hash_password};
use busbar_core::{Frame, Hello, Message};
use common::*;

const LONG: Duration = Duration::from_secs(60);

fn orders_only() -> Permissions {
    Permissions {
        publish: Rules::only(["orders.>"]),
        subscribe: Rules::only(["orders.>"]),
        services: Rules::none(),
        groups: Rules::none(),
        allow_responses: true,
    }
}

async fn secured(auth: AuthConfig) -> Broker {
    let mut config = config();
    config.auth = auth;
    broker_with(config).await
}

/// Hashing is slow on purpose: hash each password once for all the tests.
static HASHES: std::sync::LazyLock<[String; 4]> =
    std::sync::LazyLock::new(|| ["admin-pw", "shop-pw", "worker-pw", "mute-pw"].map(hash_password));

fn users() -> AuthConfig {
    AuthConfig {
        token: None,
        users: vec![
            User { name: "admin".into(), password_hash: HASHES[0].clone(), permissions: None },
            User { name: "shop".into(), password_hash: HASHES[1].clone(), permissions: Some(orders_only()) },
            User {
                name: "worker".into(),
                password_hash: HASHES[2].clone(),
                permissions: Some(Permissions {
                    publish: Rules::none(),
                    subscribe: Rules::only(["jobs.>"]),
                    services: Rules::only(["worker"]),
                    groups: Rules::default(),
                    allow_responses: true,
                }),
            },
            User {
                name: "mute".into(),
                password_hash: HASHES[3].clone(),
                permissions: Some(Permissions {
                    publish: Rules::none(),
                    subscribe: Rules::only(["jobs.>"]),
                    services: Rules::none(),
                    groups: Rules::default(),
                    allow_responses: false,
                }),
            },
        ],
        ..AuthConfig::default()
    }
}

async fn login(broker: &Broker, user: &str, password: &str) -> Result<Client, Error> {
    Client::connect_with(
        ClientOptions::new(broker.local_addr().to_string()).user(user, password).no_reconnect(),
    )
    .await
}

#[tokio::test]
async fn tokens_are_checked() {
    let broker =
        secured(AuthConfig { token: Some("s3cret-token-1234".into()), ..AuthConfig::default() }).await;
    let addr = broker.local_addr().to_string();
    let ok = Client::connect_with(ClientOptions::new(addr.clone()).token("s3cret-token-1234")).await.unwrap();
    ok.publish("any.thing", "").await.unwrap();
    for options in [ClientOptions::new(addr.clone()).token("wrong"), ClientOptions::new(addr.clone())] {
        match Client::connect_with(options).await {
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::AuthenticationFailed));
                assert!(e.to_string().ends_with("authentication failed"), "says nothing more: {e}");
            }
            Ok(_) => panic!("admitted without the right token"),
        }
    }
    assert_eq!(broker.stats().auth_failures, 2);
}

#[tokio::test]
async fn users_and_passwords_are_checked_without_saying_what_was_wrong() {
    let broker = secured(users()).await;
    login(&broker, "admin", "admin-pw").await.unwrap();
    let wrong_password = login(&broker, "admin", "nope").await.unwrap_err();
    let unknown_user = login(&broker, "mallory", "admin-pw").await.unwrap_err();
    assert_eq!(wrong_password.code(), Some(ErrorCode::AuthenticationFailed));
    assert_eq!(wrong_password.to_string(), unknown_user.to_string(), "no hint which part was wrong");
    assert_eq!(broker.stats().auth_failures, 2);
}

#[tokio::test]
async fn a_silent_client_of_a_secured_broker_times_out_in_the_handshake() {
    let mut config = config();
    config.auth = users();
    config.handshake_timeout = Duration::from_millis(100);
    let broker = broker_with(config).await;
    let mut raw = Raw::connect(&broker).await;
    assert_eq!(raw.expect_error().await.code, ErrorCode::HandshakeTimeout);
    raw.expect_closed().await;
}

#[tokio::test]
async fn publish_permissions_hold_and_others_do_not_receive_refused_messages() {
    let broker = secured(users()).await;
    let admin = login(&broker, "admin", "admin-pw").await.unwrap();
    let mut everything = admin.subscribe(">").await.unwrap();
    let shop = login(&broker, "shop", "shop-pw").await.unwrap();
    shop.publish("orders.created", "ok").await.unwrap();
    shop.publish("billing.x", "refused").await.unwrap();
    // The refusal comes back asynchronously: the next flush reports it.
    let refused = shop.flush().await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::PermissionDenied));
    shop.flush().await.unwrap();
    // Also when it came back before the flush was asked for.
    shop.publish("billing.y", "refused").await.unwrap();
    eventually("the refusal arrived", || broker.stats().permission_denied == 2).await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(shop.flush().await.unwrap_err().code(), Some(ErrorCode::PermissionDenied));
    shop.flush().await.unwrap();
    admin.flush().await.unwrap();
    assert_eq!(everything.try_next().unwrap().topic(), "orders.created");
    assert!(everything.try_next().is_none(), "billing.x was not delivered");
    // A request to a forbidden topic fails at once with PermissionDenied.
    let e = shop.request("billing.invoice", "", LONG).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied));
    // The connection stays open after a violation.
    shop.publish("orders.paid", "ok").await.unwrap();
    assert_eq!(everything.next().await.unwrap().topic(), "orders.paid");
    assert_eq!(broker.stats().permission_denied, 3);

    // On the wire: a specific ERROR, and the connection goes on.
    let mut raw = Raw::connect(&broker).await;
    let mut hello = Hello { name: "raw".into(), properties: Default::default() };
    hello.properties.insert("user", "shop");
    hello.properties.insert("password", "shop-pw");
    raw.send(Frame::Hello(hello)).await;
    assert!(matches!(raw.read().await, Some(Frame::Welcome(_))));
    raw.send(Frame::Pub(Message::new("billing.x", ""))).await;
    assert_eq!(raw.expect_error().await.code, ErrorCode::PermissionDenied);
    raw.send(Frame::Ping).await;
    assert_eq!(raw.read().await, Some(Frame::Pong));
}

#[tokio::test]
async fn subscribe_permissions_hold() {
    let broker = secured(users()).await;
    let shop = login(&broker, "shop", "shop-pw").await.unwrap();
    let _ok = shop.subscribe("orders.*").await.unwrap();
    for pattern in ["billing.>", ">", "*.created"] {
        let e = shop.subscribe(pattern).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::PermissionDenied), "{pattern}");
    }
    assert_eq!(broker.stats().subscriptions, 1);
}

#[tokio::test]
async fn responses_are_allowed_only_when_configured() {
    let broker = secured(users()).await;
    let admin = login(&broker, "admin", "admin-pw").await.unwrap();
    let worker = login(&broker, "worker", "worker-pw").await.unwrap();
    let mute = login(&broker, "mute", "mute-pw").await.unwrap();
    // The worker may not publish anything, but may answer what it is asked.
    let _w = worker.respond("jobs.resize", |_| async { Ok::<_, String>("done") }).await.unwrap();
    assert_eq!(admin.request("jobs.resize", "", LONG).await.unwrap().payload_str(), Some("done"));
    assert!(worker.publish("jobs.resize", "").await.is_ok(), "sent, and refused by the broker");
    // Without allow_responses the reply is refused, and the requester learns at once.
    let _m = mute.respond("jobs.crop", |_| async { Ok::<_, String>("done") }).await.unwrap();
    let e = admin.request("jobs.crop", "", LONG).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::PermissionDenied));
}

#[tokio::test]
async fn deny_by_default_and_service_names() {
    let auth = AuthConfig {
        token: Some("guest-token-12345".into()),
        default_permissions: Permissions::none(),
        users: users().users,
        ..AuthConfig::default()
    };
    let broker = secured(auth).await;
    let addr = broker.local_addr().to_string();
    let guest =
        Client::connect_with(ClientOptions::new(addr.clone()).token("guest-token-12345")).await.unwrap();
    assert_eq!(guest.subscribe("a").await.unwrap_err().code(), Some(ErrorCode::PermissionDenied));
    assert_eq!(guest.request("a", "", LONG).await.unwrap_err().code(), Some(ErrorCode::PermissionDenied));
    // The worker may register the service name "worker", not another.
    let as_worker = ClientOptions::new(addr.clone()).user("worker", "worker-pw").service("worker");
    Client::connect_with(as_worker).await.unwrap();
    let as_billing = ClientOptions::new(addr).user("worker", "worker-pw").service("billing").no_reconnect();
    assert_eq!(Client::connect_with(as_billing).await.unwrap_err().code(), Some(ErrorCode::PermissionDenied));
}

#[tokio::test]
async fn violations_can_close_the_connection_when_configured() {
    let mut auth = users();
    auth.disconnect_on_violation = true;
    let broker = secured(auth).await;
    let shop = login(&broker, "shop", "shop-pw").await.unwrap();
    shop.publish("billing.x", "").await.unwrap();
    let mut status = shop.status_watch();
    tokio::time::timeout(PATIENCE, status.wait_for(|s| *s == busbar::Status::Disconnected))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_responder_cannot_choose_the_topic_its_reply_is_judged_on() {
    let mut auth = users();
    // "mute" may publish on allowed.> only, and may not answer on other topics.
    auth.users[3].permissions.as_mut().unwrap().publish = Rules::only(["allowed.>"]);
    let broker = secured(auth).await;
    let admin = login(&broker, "admin", "admin-pw").await.unwrap();
    let mut raw = Raw::connect(&broker).await;
    let mut hello = Hello { name: "forger".into(), properties: Default::default() };
    hello.properties.insert("user", "mute");
    hello.properties.insert("password", "mute-pw");
    raw.send(Frame::Hello(hello)).await;
    assert!(matches!(raw.read().await, Some(Frame::Welcome(_))));
    let sub = busbar_core::Sub {
        sid: 1,
        pattern: "jobs.crop".into(),
        group: None,
        kind: busbar_core::SubKind::Requests,
    };
    raw.send(Frame::Sub(sub)).await;
    raw.send(Frame::Ping).await;
    assert_eq!(raw.read().await, Some(Frame::Pong));
    let pending = tokio::spawn(async move { admin.request("jobs.crop", "", LONG).await });
    let Some(Frame::Call(call)) = raw.read().await else { panic!("expected a CALL") };
    // The forged reply names a topic the responder may publish on.
    let mut forged = Message::new("allowed.x", "sneaky");
    forged.destination = call.message.source;
    raw.send(Frame::Reply(busbar_core::Reply { id: call.id, error: None, remaining: 0, message: forged }))
        .await;
    let answer = tokio::time::timeout(PATIENCE, pending).await.unwrap().unwrap();
    assert_eq!(answer.unwrap_err().code(), Some(ErrorCode::PermissionDenied));
}

#[tokio::test]
async fn group_names_are_permission_checked() {
    let broker = secured(users()).await;
    let shop = login(&broker, "shop", "shop-pw").await.unwrap();
    let grouped = busbar::Pattern::new("orders.new").group("fulfilment", busbar::GroupPolicy::RoundRobin);
    assert_eq!(shop.subscribe(grouped).await.unwrap_err().code(), Some(ErrorCode::PermissionDenied));
}

#[tokio::test]
async fn inconsistent_security_settings_are_refused_at_start() {
    let mut config = config();
    config.auth.token = Some("short".into());
    assert!(Broker::start(config).await.unwrap_err().to_string().contains("auth.token"));
    let mut config = common::config();
    config.tls = Some(busbar_broker::TlsOptions {
        cert: "c.pem".into(),
        key: "k.pem".into(),
        client_ca: Some("ca.pem".into()),
        required: false,
    });
    assert!(Broker::start(config).await.unwrap_err().to_string().contains("tls.required"));
}
