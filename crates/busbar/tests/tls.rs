//! TLS with certificates generated at test time (rcgen): round trip, TLS required, optional TLS,
//! mutual TLS with a right and a wrong client certificate, and a certificate mapped to a user.

mod common;

use std::path::{Path, PathBuf};

use busbar::{Client, ClientOptions, ClientTls, ErrorCode, EventBus};
use busbar_broker::{AuthConfig, Broker, ClusterConfig, Permissions, RouteTls, Rules, TlsOptions, User};
use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// A CA, a server certificate for localhost signed by it, client certificates "shop"
    /// (signed by the CA) and "intruder" (signed by another CA).
    fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!(
            "busbar-tls-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.self_signed(&key).unwrap();
            (cert, key)
        };
        let (ca_cert, ca_key) = ca("busbar test CA");
        let (other_cert, other_key) = ca("someone else's CA");
        let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
        write("ca.pem", ca_cert.pem());
        let leaf =
            |cn: &str, sans: Vec<String>, issuer: &rcgen::Certificate, issuer_key: &KeyPair, file: &str| {
                let key = KeyPair::generate().unwrap();
                let mut params = CertificateParams::new(sans).unwrap();
                params.distinguished_name.push(DnType::CommonName, cn);
                let cert = params.signed_by(&key, issuer, issuer_key).unwrap();
                write(&format!("{file}.pem"), cert.pem());
                write(&format!("{file}.key"), key.serialize_pem());
            };
        leaf("localhost", vec!["localhost".into()], &ca_cert, &ca_key, "server");
        leaf("shop", vec![], &ca_cert, &ca_key, "shop");
        leaf("intruder", vec![], &other_cert, &other_key, "intruder");
        // A broker of a cluster: dialled by IP address.
        leaf("node", vec!["127.0.0.1".into()], &ca_cert, &ca_key, "node");
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn server(&self, required: bool, mutual: bool) -> TlsOptions {
        TlsOptions {
            cert: self.path("server.pem"),
            key: self.path("server.key"),
            client_ca: mutual.then(|| self.path("ca.pem")),
            required,
        }
    }

    fn client(&self, cert: Option<&str>) -> ClientTls {
        ClientTls {
            ca: Some(self.path("ca.pem")),
            client_cert: cert.map(|c| (self.path(&format!("{c}.pem")), self.path(&format!("{c}.key")))),
            server_name: Some("localhost".into()),
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn tls_broker(tls: TlsOptions, auth: AuthConfig) -> Broker {
    let mut config = config();
    config.tls = Some(tls);
    config.auth = auth;
    broker_with(config).await
}

fn options(broker: &Broker, tls: Option<ClientTls>) -> ClientOptions {
    let scheme = if tls.is_some() { "busbars" } else { "busbar" };
    let mut o = ClientOptions::new(format!("{scheme}://{}", broker.local_addr())).no_reconnect();
    o.tls = tls;
    o
}

async fn round_trip(client: &Client) {
    let mut sub = client.subscribe("secure.>").await.unwrap();
    client.publish("secure.hello", "over tls").await.unwrap();
    assert_eq!(sub.next().await.unwrap().payload_str(), Some("over tls"));
}

#[tokio::test]
async fn tls_round_trip_and_plain_clients_refused_when_required() {
    let pki = Pki::new();
    let broker = tls_broker(pki.server(true, false), AuthConfig::default()).await;
    let client = Client::connect_with(options(&broker, Some(pki.client(None)))).await.unwrap();
    round_trip(&client).await;
    let plain = Client::connect_with(options(&broker, None)).await.unwrap_err();
    assert_eq!(plain.code(), Some(ErrorCode::TlsRequired), "{plain}");
}

#[tokio::test]
async fn optional_tls_accepts_both_on_one_port() {
    let pki = Pki::new();
    let broker = tls_broker(pki.server(false, false), AuthConfig::default()).await;
    round_trip(&Client::connect_with(options(&broker, Some(pki.client(None)))).await.unwrap()).await;
    round_trip(&Client::connect_with(options(&broker, None)).await.unwrap()).await;
}

#[tokio::test]
async fn an_untrusted_server_certificate_is_refused() {
    let pki = Pki::new();
    let broker = tls_broker(pki.server(true, false), AuthConfig::default()).await;
    let mut wrong_ca = pki.client(None);
    wrong_ca.ca = Some(pki.path("intruder.pem")); // not the CA that signed the server
    let e = Client::connect_with(options(&broker, Some(wrong_ca))).await.unwrap_err();
    assert!(matches!(e, busbar::Error::Tls(_)), "{e}");
}

#[tokio::test]
async fn mutual_tls_refuses_a_wrong_client_certificate_and_maps_a_right_one_to_a_user() {
    let pki = Pki::new();
    let shop = Permissions { publish: Rules::only(["orders.>"]), ..Permissions::default() };
    let auth = AuthConfig {
        users: vec![User {
            name: "shop".into(),
            password_hash: busbar_broker::hash_password("x"),
            permissions: Some(shop),
        }],
        tls_identity: true,
        ..AuthConfig::default()
    };
    let broker = tls_broker(pki.server(true, true), auth).await;
    for missing_or_wrong in [None, Some("intruder")] {
        let refused = Client::connect_with(options(&broker, Some(pki.client(missing_or_wrong)))).await;
        assert!(refused.is_err(), "{missing_or_wrong:?} admitted");
    }
    // The certificate says "shop": no password needed, and shop's permissions apply.
    let client = Client::connect_with(options(&broker, Some(pki.client(Some("shop"))))).await.unwrap();
    let mut own = client.subscribe("orders.>").await.unwrap();
    client.publish("orders.new", "ok").await.unwrap();
    assert_eq!(own.next().await.unwrap().payload_str(), Some("ok"));
    let denied = client.request("billing.x", "", std::time::Duration::from_secs(30)).await.unwrap_err();
    assert_eq!(denied.code(), Some(ErrorCode::PermissionDenied));
    assert!(Path::new(&pki.path("ca.pem")).exists());
}

#[tokio::test]
async fn missing_certificate_files_are_a_clear_startup_error() {
    let mut config = config();
    config.tls = Some(TlsOptions {
        cert: "/nonexistent/cert.pem".into(),
        key: "/nonexistent/key.pem".into(),
        client_ca: None,
        required: true,
    });
    let e = Broker::start(config).await.unwrap_err();
    assert!(e.to_string().contains("/nonexistent/cert.pem"), "{e}");
}

#[tokio::test]
async fn nats_clients_connect_over_tls_and_plain_ones_are_told_it_is_required() {
    use futures_util::StreamExt;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

    let pki = Pki::new();
    let mut config = config();
    config.tls = Some(pki.server(true, false));
    config.nats_listen = Some("127.0.0.1:0".parse().unwrap());
    let broker = broker_with(config).await;
    let port = broker.nats_addr().unwrap().port();
    let nc = async_nats::ConnectOptions::new()
        .add_root_certificates(pki.path("ca.pem"))
        .require_tls(true)
        .connect(format!("tls://localhost:{port}"))
        .await
        .expect("TLS NATS client connects");
    let mut sub = nc.subscribe("secure").await.unwrap();
    nc.publish("secure", "sealed".into()).await.unwrap();
    nc.flush().await.unwrap();
    let m = tokio::time::timeout(PATIENCE, sub.next()).await.unwrap().unwrap();
    assert_eq!(m.payload, "sealed");

    // In the clear: INFO says TLS is required, and anything else is refused.
    let stream = tokio::net::TcpStream::connect(broker.nats_addr().unwrap()).await.unwrap();
    let mut stream = tokio::io::BufReader::new(stream);
    let mut info = String::new();
    stream.read_line(&mut info).await.unwrap();
    assert!(info.contains("\"tls_required\":true"), "{info}");
    stream.get_mut().write_all(b"CONNECT {}\r\n").await.unwrap();
    let mut line = String::new();
    tokio::time::timeout(PATIENCE, stream.read_line(&mut line)).await.unwrap().unwrap();
    assert_eq!(line, "-ERR 'Secure Connection - TLS Required'\r\n");
}

#[tokio::test]
async fn routes_between_brokers_use_mutual_tls() {
    let pki = Pki::new();
    let node = |id: u8, cert: &str, seeds: Vec<std::net::SocketAddr>, tls: bool| {
        let mut cluster = ClusterConfig::new("secure", id, "127.0.0.1:0".parse().unwrap());
        cluster.routes = seeds;
        cluster.tls = tls.then(|| RouteTls {
            cert: pki.path(&format!("{cert}.pem")),
            key: pki.path(&format!("{cert}.key")),
            ca: pki.path("ca.pem"),
        });
        let mut config = config();
        config.cluster = Some(cluster);
        config
    };
    let a = broker_with(node(1, "node", vec![], true)).await;
    let seed = vec![a.cluster_addr().unwrap()];
    let b = broker_with(node(2, "node", seed.clone(), true)).await;
    eventually("a TLS route", || a.routes().len() == 1 && b.routes().len() == 1).await;
    let on_b = client(&b).await;
    let mut sub = on_b.subscribe("sealed.*").await.unwrap();
    on_b.flush().await.unwrap();
    eventually("interest over TLS", || a.routes()[0].remote_subscriptions == 1).await;
    client(&a).await.publish("sealed.msg", "over tls").await.unwrap();
    let m = tokio::time::timeout(PATIENCE, sub.next()).await.unwrap().unwrap();
    assert_eq!(m.payload_str(), Some("over tls"));

    // A broker without TLS, and one with a certificate from another CA, are refused.
    let _plain = broker_with(node(3, "node", seed.clone(), false)).await;
    let _intruder = broker_with(node(4, "intruder", seed, true)).await;
    eventually("both refused", || a.stats().auth_failures >= 2).await;
    assert_eq!(a.routes().len(), 1);
}
