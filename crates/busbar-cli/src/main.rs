//! `busbar`: run a broker, publish, subscribe.
#![allow(clippy::print_stdout)]

mod bench;

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use busbar::{Client, ClientOptions, GroupPolicy, Message, Outgoing, Pattern};
use busbar_broker::Config;
use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

/// busbar: a distributed event bus. Run a broker, publish and subscribe from the command line.
#[derive(Debug, Parser)]
#[command(name = "busbar", version, about, long_about = None)]
struct Cli {
    /// Log format on stderr (filter with RUST_LOG, e.g. RUST_LOG=busbar_broker=debug).
    #[arg(long, value_enum, default_value_t = LogFormat::Pretty, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a broker until Ctrl-C or SIGTERM.
    Serve(Box<ServeArgs>),
    /// Publish a message.
    #[command(name = "pub")]
    Publish(PubArgs),
    /// Subscribe to a pattern and print what arrives.
    #[command(name = "sub")]
    Subscribe(SubArgs),
    /// Send a request (a query or a command) and print the reply.
    Request(RequestArgs),
    /// Answer requests on a pattern with fixed data, or with the output of a command.
    Reply(ReplyArgs),
    /// Measure throughput and latency (against busbar, or a NATS server with --nats).
    Bench(bench::BenchArgs),
    /// Generate or check a broker configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Show a running broker's counters (from its monitoring listener).
    Stats(MonitorArgs),
    /// List a running broker's connections (from its monitoring listener).
    Connections(MonitorArgs),
    /// List a running broker's routes to the other brokers of its cluster.
    Routes(MonitorArgs),
}

#[derive(Debug, Args)]
struct MonitorArgs {
    /// The broker's monitoring address (its `serve --http`).
    #[arg(long, default_value = "127.0.0.1:8900", env = "BUSBAR_HTTP")]
    http: String,
    /// Print the JSON as the broker sent it.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct RequestArgs {
    /// Topic of the request, e.g. user.get
    topic: String,
    /// Payload of the request.
    #[arg(default_value = "")]
    data: String,
    /// How long to wait for the reply, e.g. 500ms, 5s, 1m.
    #[arg(long, default_value = "5s", value_parser = busbar_broker::parse_duration)]
    timeout: Duration,
    /// Ask every responder (scatter-gather) and print each answer.
    #[arg(long)]
    all: bool,
    /// Header to add, as key=value (repeatable).
    #[arg(long = "header", short = 'H', value_parser = parse_header)]
    headers: Vec<(String, String)>,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("answer").required(true).args(["data", "exec"])))]
struct ReplyArgs {
    /// Pattern of the requests to answer, e.g. 'user.*'
    pattern: String,
    /// Fixed payload to answer every request with.
    data: Option<String>,
    /// Instead of fixed data: run this shell command per request, with the request payload on
    /// stdin; its stdout is the reply, a non-zero exit an error reply (with its stderr).
    #[arg(long)]
    exec: Option<String>,
    /// Join this group, so that each request reaches one member.
    #[arg(long)]
    group: Option<String>,
    /// Exit after answering this many requests.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// TOML configuration file (`busbar config generate` prints one with every option);
    /// the flags below override it.
    #[arg(long, short, env = "BUSBAR_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Address to listen on (default 127.0.0.1:4900); port 0 picks a free port (printed).
    #[arg(long, short, env = "BUSBAR_LISTEN")]
    listen: Option<SocketAddr>,
    /// Name announced to clients.
    #[arg(long)]
    name: Option<String>,
    /// Serve monitoring (health, Prometheus metrics, JSON, a dashboard) on this address, e.g.
    /// 127.0.0.1:8900.
    #[arg(long, env = "BUSBAR_HTTP_LISTEN")]
    http: Option<SocketAddr>,
    /// Also speak the NATS client protocol on this address (NATS's port is 4222), so that NATS
    /// clients in any language join the bus; off by default.
    #[arg(long, env = "BUSBAR_NATS_LISTEN")]
    nats_listen: Option<SocketAddr>,
    /// Join a cluster: listen for other brokers' routes on this address (needs --node-id).
    #[arg(long, env = "BUSBAR_CLUSTER_LISTEN")]
    cluster_listen: Option<SocketAddr>,
    /// This broker's node id in the cluster, 1-255, unique among its brokers.
    #[arg(long, env = "BUSBAR_NODE_ID")]
    node_id: Option<u8>,
    /// Name of the cluster (routes from another cluster are refused); "busbar" by default.
    #[arg(long, env = "BUSBAR_CLUSTER_NAME")]
    cluster_name: Option<String>,
    /// Seed routes: other brokers' route listeners, comma-separated.
    #[arg(long, env = "BUSBAR_ROUTES", value_delimiter = ',')]
    routes: Vec<SocketAddr>,
    /// Shared secret of the cluster's routes (16+ characters).
    #[arg(long, env = "BUSBAR_CLUSTER_TOKEN")]
    cluster_token: Option<String>,
    /// The route address other brokers are told to dial (when listening on 0.0.0.0 or behind NAT).
    #[arg(long, env = "BUSBAR_CLUSTER_ADVERTISE")]
    cluster_advertise: Option<SocketAddr>,
    /// The client address clients are told of, to fail over to this broker.
    #[arg(long, env = "BUSBAR_CLIENT_ADVERTISE")]
    client_advertise: Option<SocketAddr>,
    /// The NATS address NATS clients are told of, to fail over to this broker.
    #[arg(long, env = "BUSBAR_NATS_ADVERTISE")]
    nats_advertise: Option<SocketAddr>,
    /// Mutual TLS on routes: this broker's certificate (PEM; it must name the address others
    /// dial), with --cluster-tls-key and --cluster-tls-ca. With `[cluster.tls]` in the
    /// configuration file, any of the three replaces that one file.
    #[arg(long, env = "BUSBAR_CLUSTER_TLS_CERT")]
    cluster_tls_cert: Option<std::path::PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "BUSBAR_CLUSTER_TLS_KEY")]
    cluster_tls_key: Option<std::path::PathBuf>,
    /// The CA the cluster's certificates chain to (PEM).
    #[arg(long, env = "BUSBAR_CLUSTER_TLS_CA")]
    cluster_tls_ca: Option<std::path::PathBuf>,
    /// Largest frame accepted, in bytes.
    #[arg(long)]
    max_frame_size: Option<usize>,
    /// Most client connections at once.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Most subscriptions per connection.
    #[arg(long)]
    max_subscriptions: Option<usize>,
    /// Most frames queued for one connection before it counts as a slow consumer.
    #[arg(long)]
    max_pending: Option<usize>,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print a configuration file with every option at its default, explained.
    Generate,
    /// Print the argon2 hash of a password, for `password_hash` in the configuration file (the
    /// password is read from standard input when not given).
    HashPassword {
        /// The password.
        password: Option<String>,
    },
    /// Check a configuration file and print the configuration it gives.
    Check {
        /// The file.
        file: std::path::PathBuf,
    },
}

#[derive(Debug, Args)]
struct ConnectArgs {
    /// Broker address.
    #[arg(long, short, default_value = "127.0.0.1:4900", env = "BUSBAR_SERVER", global = true)]
    server: String,
    /// Authenticate with this token.
    #[arg(long, env = "BUSBAR_TOKEN", conflicts_with = "user")]
    token: Option<String>,
    /// Authenticate as this user (with --password).
    #[arg(long, env = "BUSBAR_USER", requires = "password")]
    user: Option<String>,
    /// The user's password.
    #[arg(long, env = "BUSBAR_PASSWORD")]
    password: Option<String>,
    /// CA certificate (PEM) to trust for TLS; TLS is used with it, or with a busbars:// server.
    #[arg(long, env = "BUSBAR_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for brokers that require one (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// Client private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
struct PubArgs {
    /// Topic to publish to, e.g. event.email.new
    topic: String,
    /// Payload (text; JSON is sent as is).
    data: String,
    /// Header to add, as key=value (repeatable).
    #[arg(long = "header", short = 'H', value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Balance key for groups using the hash policy.
    #[arg(long)]
    key: Option<u64>,
    /// Publish the message this many times.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Policy {
    Random,
    RoundRobin,
    Hash,
}

#[derive(Debug, Args)]
struct SubArgs {
    /// Pattern: dot-separated tokens, `*` for one token, `>` for the rest, e.g. 'event.>'
    pattern: String,
    /// Join this load-balanced group.
    #[arg(long)]
    group: Option<String>,
    /// How the group picks a member.
    #[arg(long, value_enum, default_value_t = Policy::RoundRobin, requires = "group")]
    policy: Policy,
    /// Exit after this many messages.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Print payloads raw, without JSON pretty-printing.
    #[arg(long)]
    raw: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The broker logs connections at info; the client commands and the bench only want problems.
    let default_level = if matches!(cli.command, Command::Serve(_)) { "info" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Pretty => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(*args).await,
            Command::Publish(args) => publish(args).await,
            Command::Subscribe(args) => subscribe(args).await,
            Command::Request(args) => request(args).await,
            Command::Reply(args) => reply(args).await,
            // On a worker, like an application's tasks: the runtime's own threads, not the
            // thread that blocks on it, for both busbar and NATS.
            Command::Bench(args) => tokio::spawn(bench::run(args)).await?,
            Command::Config(command) => config_command(command),
            Command::Stats(args) => stats(args).await,
            Command::Connections(args) => connections(args).await,
            Command::Routes(args) => routes(args).await,
        }
    })
}

/// The file's configuration (or the defaults), with the flags that were given on top.
fn serve_config(args: ServeArgs) -> Result<Config> {
    let mut config = match &args.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            Config::from_toml(&text).with_context(|| format!("invalid configuration {}", path.display()))?
        }
        None => Config::default(),
    };
    fn set<T>(slot: &mut T, value: Option<T>) {
        if let Some(v) = value {
            *slot = v;
        }
    }
    set(&mut config.listen, args.listen);
    set(&mut config.server_name, args.name);
    config.http = args.http.or(config.http);
    config.nats_listen = args.nats_listen.or(config.nats_listen);
    // The flags go on top of the file's [cluster] (its TLS, token and name stay), or make one.
    match (args.cluster_listen, config.cluster.as_mut()) {
        (Some(listen), Some(cluster)) => cluster.listen = listen,
        (Some(listen), None) => {
            let node = args.node_id.context("--cluster-listen needs --node-id")?;
            let name = args.cluster_name.clone().unwrap_or_else(|| "busbar".into());
            config.cluster = Some(busbar_broker::ClusterConfig::new(name, node, listen));
        }
        (None, _) => {}
    }
    let cluster_flags = [
        ("--node-id", args.node_id.is_some()),
        ("--routes", !args.routes.is_empty()),
        ("--cluster-token", args.cluster_token.is_some()),
        ("--cluster-name", args.cluster_name.is_some()),
        ("--cluster-advertise", args.cluster_advertise.is_some()),
        ("--client-advertise", args.client_advertise.is_some()),
        ("--nats-advertise", args.nats_advertise.is_some()),
        ("--cluster-tls-cert", args.cluster_tls_cert.is_some()),
        ("--cluster-tls-key", args.cluster_tls_key.is_some()),
        ("--cluster-tls-ca", args.cluster_tls_ca.is_some()),
    ];
    let given: Vec<&str> = cluster_flags.iter().filter(|(_, set)| *set).map(|(flag, _)| *flag).collect();
    if config.cluster.is_none() && !given.is_empty() {
        bail!(
            "{} need a cluster: give --cluster-listen (or [cluster] in the configuration file)",
            given.join(", ")
        );
    }
    let tls_given = given.iter().filter(|f| f.starts_with("--cluster-tls")).count();
    let file_tls = config.cluster.as_ref().is_some_and(|c| c.tls.is_some());
    if tls_given != 0 && tls_given != 3 && !file_tls {
        bail!("route TLS needs all three of --cluster-tls-cert, --cluster-tls-key and --cluster-tls-ca");
    }
    if let Some(cluster) = config.cluster.as_mut() {
        if let Some(node) = args.node_id {
            cluster.node_id = node;
        }
        if !args.routes.is_empty() {
            cluster.routes = args.routes.clone();
        }
        if let Some(token) = &args.cluster_token {
            cluster.token = Some(token.clone());
        }
        if let Some(name) = &args.cluster_name {
            cluster.name = name.clone();
        }
        cluster.advertise = args.cluster_advertise.or(cluster.advertise);
        cluster.client_advertise = args.client_advertise.or(cluster.client_advertise);
        cluster.nats_advertise = args.nats_advertise.or(cluster.nats_advertise);
    }
    if let (Some(cluster), Some(cert), Some(key), Some(ca)) =
        (config.cluster.as_mut(), &args.cluster_tls_cert, &args.cluster_tls_key, &args.cluster_tls_ca)
    {
        cluster.tls = Some(busbar_broker::RouteTls { cert: cert.clone(), key: key.clone(), ca: ca.clone() });
    } else if let Some(tls) = config.cluster.as_mut().and_then(|c| c.tls.as_mut()) {
        // The file's route TLS, with the files given on the command line instead.
        tls.cert = args.cluster_tls_cert.clone().unwrap_or_else(|| tls.cert.clone());
        tls.key = args.cluster_tls_key.clone().unwrap_or_else(|| tls.key.clone());
        tls.ca = args.cluster_tls_ca.clone().unwrap_or_else(|| tls.ca.clone());
    }
    set(&mut config.max_frame_size, args.max_frame_size);
    set(&mut config.max_connections, args.max_connections);
    set(&mut config.max_subscriptions, args.max_subscriptions);
    set(&mut config.max_pending, args.max_pending);
    config.validate()?;
    Ok(config)
}

fn config_command(command: ConfigCommand) -> Result<()> {
    match command {
        ConfigCommand::Generate => print!("{}", busbar_broker::default_toml()),
        ConfigCommand::HashPassword { password } => {
            let password = match password {
                Some(p) => p,
                None => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line.trim_end_matches(['\r', '\n']).to_string()
                }
            };
            if password.is_empty() {
                bail!("empty password");
            }
            println!("{}", busbar_broker::hash_password(&password));
        }
        ConfigCommand::Check { file } => {
            let text =
                std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let config = Config::from_toml(&text)
                .with_context(|| format!("invalid configuration {}", file.display()))?;
            // As starting would: every certificate and key named is read and must be usable.
            config.check_tls().with_context(|| format!("{}: unusable TLS files", file.display()))?;
            print_summary(&file, &config);
        }
    }
    Ok(())
}

/// What `config check` found, without a secret (tokens and password hashes are only said to be
/// there).
fn print_summary(file: &std::path::Path, c: &Config) {
    let on = |a: Option<SocketAddr>| a.map_or_else(|| "off".to_string(), |a| a.to_string());
    println!("{}: valid", file.display());
    println!(
        "  listen {} (TLS {}), NATS {}, monitoring {}",
        c.listen,
        if c.tls.is_some() { "on" } else { "off" },
        on(c.nats_listen),
        on(c.http)
    );
    let users: Vec<&str> = c.auth.users.iter().map(|u| u.name.as_str()).collect();
    println!(
        "  auth: token {}, users [{}]",
        if c.auth.token.is_some() { "set" } else { "none" },
        users.join(", ")
    );
    match &c.cluster {
        Some(k) => println!(
            "  cluster {:?}: node {}, routes on {}, seeds {:?}, token {}, TLS {}",
            k.name,
            k.node_id,
            k.listen,
            k.routes,
            if k.token.is_some() { "set" } else { "none" },
            if k.tls.is_some() { "on" } else { "off" }
        ),
        None => println!("  cluster: off"),
    }
    println!(
        "  limits: frame {} B, connections {}, subscriptions {}, pending {} frames / {} B ({:?} when over), requests {}",
        c.max_frame_size,
        c.max_connections,
        c.max_subscriptions,
        c.max_pending,
        c.max_pending_bytes,
        c.slow_consumer,
        c.max_requests
    );
}

async fn serve(args: ServeArgs) -> Result<()> {
    let config = serve_config(args)?;
    let listen = config.listen;
    // The error names what failed (which listener, which file); the client address is only
    // the broker's name here.
    let broker = busbar_broker::Broker::start(config)
        .await
        .with_context(|| format!("cannot start the broker (client listener {listen})"))?;
    // Printed with the real ports, so that port 0 is usable from scripts.
    if let Some(http) = broker.http_addr() {
        println!("busbar monitoring on http://{http}/");
    }
    if let Some(nats) = broker.nats_addr() {
        println!("busbar NATS protocol on nats://{nats}");
    }
    if let Some(routes) = broker.cluster_addr() {
        println!("busbar routes on {routes}");
    }
    println!("busbar listening on {}", broker.local_addr());
    std::io::stdout().flush()?;
    shutdown_signal().await;
    broker.stop().await;
    Ok(())
}

/// Completes on Ctrl-C or (on Unix) SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received");
}

/// GETs a JSON document from the broker's monitoring listener.
async fn get_json(http: &str, path: &str) -> Result<serde_json::Value> {
    let url = format!("http://{http}{path}");
    let text = tokio::task::spawn_blocking({
        let url = url.clone();
        move || -> Result<String, ureq::Error> { ureq::get(&url).call()?.body_mut().read_to_string() }
    })
    .await?
    .with_context(|| format!("cannot read {url} (is the broker running with --http {http}?)"))?;
    Ok(serde_json::from_str(&text)?)
}

async fn stats(args: MonitorArgs) -> Result<()> {
    let varz = get_json(&args.http, "/varz").await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&varz)?);
        return Ok(());
    }
    println!("{} {}, up {} s", varz["server_name"], varz["version"], varz["uptime_secs"]);
    if let Some(stats) = varz["stats"].as_object() {
        for (k, v) in stats {
            println!("  {k:<20} {v:>12}");
        }
    }
    Ok(())
}

async fn connections(args: MonitorArgs) -> Result<()> {
    let connz = get_json(&args.http, "/connz").await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&connz)?);
        return Ok(());
    }
    println!(
        "{:>6} {:<24} {:<22} {:>5} {:>10} {:>10} {:>10} {:>8}",
        "id", "name", "address", "subs", "pending B", "msgs in", "msgs out", "dropped"
    );
    for c in connz["connections"].as_array().into_iter().flatten() {
        println!(
            "{:>6} {:<24} {:<22} {:>5} {:>10} {:>10} {:>10} {:>8}",
            c["id"].to_string(),
            c["name"].as_str().unwrap_or(""),
            c["address"].as_str().unwrap_or(""),
            c["subscriptions"].to_string(),
            c["pending_bytes"].to_string(),
            c["msgs_in"].to_string(),
            c["msgs_out"].to_string(),
            c["dropped"].to_string()
        );
    }
    println!("{} connection(s)", connz["count"]);
    Ok(())
}

async fn routes(args: MonitorArgs) -> Result<()> {
    let routez = get_json(&args.http, "/routez").await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&routez)?);
        return Ok(());
    }
    match routez["cluster"].as_object() {
        None => println!("not in a cluster"),
        Some(c) => {
            println!(
                "cluster {} · this node {} · routes on {}",
                c["name"].as_str().unwrap_or(""),
                c["node"],
                c["cluster_url"].as_str().unwrap_or("")
            )
        }
    }
    println!(
        "{:>4} {:<16} {:<22} {:<9} {:>8} {:>8} {:>6} {:>10} {:>10}",
        "node", "name", "route url", "direction", "up (s)", "clients", "subs", "msgs in", "msgs out"
    );
    for r in routez["routes"].as_array().into_iter().flatten() {
        println!(
            "{:>4} {:<16} {:<22} {:<9} {:>8} {:>8} {:>6} {:>10} {:>10}",
            r["node"].to_string(),
            r["name"].as_str().unwrap_or(""),
            r["cluster_url"].as_str().unwrap_or(""),
            r["direction"].as_str().unwrap_or(""),
            r["connected_secs"].to_string(),
            r["remote_clients"].to_string(),
            r["remote_subscriptions"].to_string(),
            r["msgs_in"].to_string(),
            r["msgs_out"].to_string()
        );
    }
    println!("{} route(s)", routez["count"]);
    Ok(())
}

async fn connect(args: &ConnectArgs, name: &str) -> Result<Client> {
    let mut options = ClientOptions::new(&args.server).name(name);
    if let Some(token) = &args.token {
        options = options.token(token.clone());
    }
    if let (Some(user), Some(password)) = (&args.user, &args.password) {
        options = options.user(user.clone(), password.clone());
    }
    if args.tls_ca.is_some() || args.tls_cert.is_some() {
        options.tls = Some(busbar::ClientTls {
            ca: args.tls_ca.clone(),
            client_cert: args.tls_cert.clone().zip(args.tls_key.clone()),
            server_name: None,
        });
    }
    Client::connect_with(options)
        .await
        .with_context(|| format!("cannot connect to busbar at {}", args.server))
}

async fn publish(args: PubArgs) -> Result<()> {
    let client = connect(&args.connect, "busbar-cli pub").await?;
    for _ in 0..args.count {
        let mut message = Outgoing::new(args.topic.clone(), args.data.clone().into_bytes());
        for (k, v) in &args.headers {
            message = message.header(k.clone(), v.clone());
        }
        if let Some(key) = args.key {
            message = message.key(key);
        }
        client.publish_message(message).await?;
    }
    // Wait until the broker has routed them, so that exiting right away loses nothing. A flush
    // waits for a reconnect when the connection is lost meanwhile: not forever here.
    tokio::time::timeout(Duration::from_secs(10), client.flush())
        .await
        .context("the broker did not confirm the messages within 10 s (connection lost?)")??;
    client.disconnect().await?;
    eprintln!("published {} message(s) to {}", args.count, args.topic);
    Ok(())
}

async fn subscribe(args: SubArgs) -> Result<()> {
    let client = connect(&args.connect, "busbar-cli sub").await?;
    let mut sub = match &args.group {
        None => client.subscribe(args.pattern.clone()).await?,
        Some(group) => {
            let policy = match args.policy {
                Policy::Random => GroupPolicy::Random,
                Policy::RoundRobin => GroupPolicy::RoundRobin,
                Policy::Hash => GroupPolicy::Hash,
            };
            client.subscribe_group(args.pattern.clone(), group.clone(), policy).await?
        }
    };
    eprintln!("subscribed to {} on {}", args.pattern, args.connect.server);
    let mut seen = 0u64;
    // One Ctrl-C listener for the whole run: one made per message would miss a Ctrl-C that
    // comes while a message is printed.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let message = tokio::select! {
            m = sub.next() => m,
            _ = &mut ctrl_c => break,
        };
        let Some(message) = message else { bail!("connection to the broker closed") };
        seen += 1;
        print_message(seen, &message, args.raw)?;
        if args.count.is_some_and(|n| seen >= n) {
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), client.disconnect()).await;
    Ok(())
}

async fn request(args: RequestArgs) -> Result<()> {
    let client = connect(&args.connect, "busbar-cli request").await?;
    let mut message = Outgoing::new(args.topic.clone(), args.data.clone().into_bytes());
    for (k, v) in &args.headers {
        message = message.header(k.clone(), v.clone());
    }
    let answers = if args.all {
        client.request_all_message(message, args.timeout, None).await
    } else {
        client.request_message(message, args.timeout).await.map(|m| vec![Ok(m)])
    };
    let answers = answers.with_context(|| format!("request to {} failed", args.topic))?;
    if answers.is_empty() {
        let _ = client.disconnect().await;
        bail!("no answer to {} within {:?}", args.topic, args.timeout);
    }
    let mut failed = 0;
    for (i, answer) in answers.iter().enumerate() {
        match answer {
            Ok(m) => print_message(i as u64 + 1, m, false)?,
            Err(e) => {
                failed += 1;
                eprintln!("[#{}] error: {e}", i + 1);
            }
        }
    }
    let _ = client.disconnect().await;
    if failed == answers.len() && failed > 0 {
        bail!("every responder failed");
    }
    Ok(())
}

async fn reply(args: ReplyArgs) -> Result<()> {
    let client = connect(&args.connect, "busbar-cli reply").await?;
    let mut pattern = Pattern::new(args.pattern.clone());
    if let Some(group) = &args.group {
        pattern = pattern.group(group.clone(), GroupPolicy::RoundRobin);
    }
    let mut requests = client.requests(pattern).await?;
    eprintln!("answering requests on {} at {}", args.pattern, args.connect.server);
    let mut answered = 0u64;
    // One Ctrl-C listener for the whole run, also while a command runs: one made per request
    // would miss a Ctrl-C that comes in between.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let request = tokio::select! {
            r = requests.next() => r,
            _ = &mut ctrl_c => break,
        };
        let Some(request) = request else { bail!("connection to the broker closed") };
        let topic = request.topic().to_string();
        let result = match (&args.exec, &args.data) {
            (Some(command), _) => tokio::select! {
                out = run_command(command, request.payload()) => out,
                // The request is answered with an error as it is dropped.
                _ = &mut ctrl_c => break,
            },
            (None, data) => Ok(data.clone().unwrap_or_default().into_bytes()),
        };
        let sent = match result {
            Ok(reply) => request.reply(reply).await,
            Err(e) => request.fail(&e).await,
        };
        match sent {
            Ok(()) => {}
            Err(busbar::Error::Closed) => bail!("connection to the broker closed"),
            // One reply that could not go (too large, say; its requester was told): the next
            // request is served as usual.
            Err(e) => {
                eprintln!("request on {topic}: the reply could not be sent: {e}");
                continue;
            }
        }
        answered += 1;
        eprintln!("answered request #{answered} on {topic}");
        if args.count.is_some_and(|n| answered >= n) {
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), client.disconnect()).await;
    Ok(())
}

/// Runs `command` in a shell with `input` on stdin: its stdout, or an error with its stderr.
async fn run_command(command: &str, input: &[u8]) -> std::result::Result<Vec<u8>, String> {
    use tokio::io::AsyncWriteExt;
    use tokio::process::Command as Process;
    let mut child = Process::new("sh")
        .args(["-c", command])
        // Stopped with the reply process (Ctrl-C while it runs), not left behind.
        .kill_on_drop(true)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    // Written while the output is read: a command that answers as it reads (`tr`, say) would
    // otherwise fill its stdout pipe and stop reading, and both would wait for ever.
    let stdin = child.stdin.take();
    let write = async move {
        if let Some(mut stdin) = stdin {
            let _ = stdin.write_all(input).await;
        }
    };
    let (_, out) = tokio::join!(write, child.wait_with_output());
    let out = out.map_err(|e| format!("{command:?} failed: {e}"))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "{command:?} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn print_message(n: u64, m: &Message, raw: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "[#{n}] {}", m.topic())?;
    for (k, v) in m.headers().iter() {
        writeln!(out, "  {k}: {v}")?;
    }
    let payload = m.payload();
    match (raw, serde_json::from_slice::<serde_json::Value>(payload)) {
        (false, Ok(json)) => writeln!(out, "{}", serde_json::to_string_pretty(&json)?)?,
        _ => match std::str::from_utf8(payload) {
            Ok(text) => writeln!(out, "{text}")?,
            Err(_) => writeln!(
                out,
                "<{} bytes of binary: {:02x?}>",
                payload.len(),
                &payload[..payload.len().min(32)]
            )?,
        },
    }
    out.flush()?;
    Ok(())
}
