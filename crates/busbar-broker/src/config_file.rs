//! The broker's TOML configuration file: [`Config::from_toml`], and [`default_toml`], a
//! documented file with every option at its default (what `busbar config generate` prints).
//!
//! Unknown keys are errors (a misspelt option must not be silently ignored), and every error
//! names the key, with its line and column.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::auth::{Permissions, Rules, User};
use crate::config::{Config, SlowConsumerPolicy};

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not valid TOML, an unknown key, or a value of the wrong type.
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    /// Well-formed, but a value is out of range.
    #[error("`{key}`: {reason}")]
    Invalid {
        /// The dotted key, e.g. `heartbeat.max_missed`.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct File {
    server: ServerSection,
    limits: LimitsSection,
    heartbeat: HeartbeatSection,
    slow_consumer: SlowConsumerSection,
    auth: AuthSection,
    tls: Option<TlsSection>,
    cluster: Option<ClusterSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    client_ca: Option<std::path::PathBuf>,
    #[serde(default = "yes")]
    required: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct AuthSection {
    token: Option<String>,
    disconnect_on_violation: bool,
    tls_identity: bool,
    default_permissions: Option<PermissionsSection>,
    users: Vec<UserSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterSection {
    name: String,
    node_id: u8,
    listen: SocketAddr,
    #[serde(default)]
    routes: Vec<SocketAddr>,
    token: Option<String>,
    tls: Option<RouteTlsSection>,
    advertise: Option<SocketAddr>,
    client_advertise: Option<SocketAddr>,
    nats_advertise: Option<SocketAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteTlsSection {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    ca: std::path::PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserSection {
    name: String,
    password_hash: String,
    permissions: Option<PermissionsSection>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct PermissionsSection {
    publish: RulesSection,
    subscribe: RulesSection,
    services: RulesSection,
    groups: RulesSection,
    allow_responses: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RulesSection {
    allow: Option<Vec<String>>,
    deny: Vec<String>,
}

impl RulesSection {
    fn into_rules(self, key: &'static str) -> Result<Rules, ConfigError> {
        for p in self.allow.iter().flatten().chain(&self.deny) {
            busbar_core::validate_pattern(p)
                .map_err(|e| ConfigError::Invalid { key, reason: format!("pattern {p:?}: {e}") })?;
        }
        Ok(Rules { allow: self.allow, deny: self.deny })
    }
}

impl PermissionsSection {
    fn into_permissions(self) -> Result<Permissions, ConfigError> {
        Ok(Permissions {
            publish: self.publish.into_rules("auth.*.publish")?,
            subscribe: self.subscribe.into_rules("auth.*.subscribe")?,
            services: self.services.into_rules("auth.*.services")?,
            groups: self.groups.into_rules("auth.*.groups")?,
            allow_responses: self.allow_responses.unwrap_or(true),
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct ServerSection {
    name: Option<String>,
    listen: Option<SocketAddr>,
    http: Option<SocketAddr>,
    nats_listen: Option<SocketAddr>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct LimitsSection {
    max_frame_size: Option<usize>,
    max_connections: Option<usize>,
    max_subscriptions: Option<usize>,
    max_pending: Option<usize>,
    max_pending_bytes: Option<usize>,
    max_requests: Option<usize>,
    #[serde(with = "duration_text", default)]
    handshake_timeout: Option<Duration>,
    #[serde(with = "duration_text", default)]
    drain_timeout: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct HeartbeatSection {
    #[serde(with = "duration_text", default)]
    interval: Option<Duration>,
    max_missed: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct SlowConsumerSection {
    policy: Option<Policy>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum Policy {
    Disconnect,
    Drop,
}

/// Parses durations written as `500ms`, `10s`, `2m` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 =
        number.parse().map_err(|_| format!("expected a duration like 500ms, 10s or 2m, got {text:?}"))?;
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs).ok_or_else(|| format!("{text:?} is too long")),
        other => Err(format!("unknown unit {other:?} in {text:?}: use ms, s or m")),
    }
}

mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map(Some).map_err(serde::de::Error::custom)
    }
}

impl Config {
    /// Reads a TOML configuration: every key is optional and defaults to [`Config::default`].
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let file: File = toml::from_str(text)?;
        let mut c = Config::default();
        let s = file.server;
        if let Some(v) = s.name {
            c.server_name = v;
        }
        if let Some(v) = s.listen {
            c.listen = v;
        }
        c.http = s.http.or(c.http);
        c.nats_listen = s.nats_listen.or(c.nats_listen);
        let l = file.limits;
        set(&mut c.max_frame_size, l.max_frame_size);
        set(&mut c.max_connections, l.max_connections);
        set(&mut c.max_subscriptions, l.max_subscriptions);
        set(&mut c.max_pending, l.max_pending);
        set(&mut c.max_pending_bytes, l.max_pending_bytes);
        set(&mut c.max_requests, l.max_requests);
        set(&mut c.handshake_timeout, l.handshake_timeout);
        set(&mut c.drain_timeout, l.drain_timeout);
        set(&mut c.heartbeat_interval, file.heartbeat.interval);
        set(&mut c.heartbeat_max_missed, file.heartbeat.max_missed);
        let a = file.auth;
        c.auth.token = a.token;
        c.auth.disconnect_on_violation = a.disconnect_on_violation;
        c.auth.tls_identity = a.tls_identity;
        c.tls = file.tls.map(|t| crate::tls::TlsOptions {
            cert: t.cert,
            key: t.key,
            client_ca: t.client_ca,
            required: t.required,
        });
        if c.auth.tls_identity && c.tls.as_ref().is_none_or(|t| t.client_ca.is_none()) {
            let reason =
                "needs [tls] with client_ca: only verified client certificates name users".to_string();
            return Err(ConfigError::Invalid { key: "auth.tls_identity", reason });
        }
        if let Some(p) = a.default_permissions {
            c.auth.default_permissions = p.into_permissions()?;
        }
        for u in a.users {
            if argon2::PasswordHash::new(&u.password_hash).is_err() {
                let reason =
                    format!("user {:?}: not an argon2 hash (use `busbar config hash-password`)", u.name);
                return Err(ConfigError::Invalid { key: "auth.users.password_hash", reason });
            }
            let permissions = u.permissions.map(PermissionsSection::into_permissions).transpose()?;
            c.auth.users.push(User { name: u.name, password_hash: u.password_hash, permissions });
        }
        c.cluster = file.cluster.map(|k| crate::config::ClusterConfig {
            name: k.name,
            node_id: k.node_id,
            listen: k.listen,
            routes: k.routes,
            token: k.token,
            tls: k.tls.map(|t| crate::tls::RouteTls { cert: t.cert, key: t.key, ca: t.ca }),
            advertise: k.advertise,
            client_advertise: k.client_advertise,
            nats_advertise: k.nats_advertise,
        });
        if let Some(p) = file.slow_consumer.policy {
            c.slow_consumer = match p {
                Policy::Disconnect => SlowConsumerPolicy::Disconnect,
                Policy::Drop => SlowConsumerPolicy::Drop,
            };
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks the values that types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| Err(ConfigError::Invalid { key, reason: reason.into() });
        if self.max_frame_size < 1024 || self.max_frame_size > u32::MAX as usize {
            return invalid("limits.max_frame_size", "must be between 1024 and 4294967295 bytes");
        }
        if self.max_connections == 0 {
            return invalid("limits.max_connections", "must be at least 1");
        }
        if self.max_pending == 0 {
            return invalid("limits.max_pending", "must be at least 1");
        }
        if self.max_pending_bytes < self.max_frame_size {
            return invalid("limits.max_pending_bytes", "must be at least limits.max_frame_size");
        }
        if self.handshake_timeout.is_zero() {
            return invalid("limits.handshake_timeout", "must be more than zero");
        }
        if self.heartbeat_max_missed == 0 {
            return invalid("heartbeat.max_missed", "must be at least 1");
        }
        if self.heartbeat_interval.checked_mul(self.heartbeat_max_missed.saturating_add(1)).is_none() {
            return invalid("heartbeat.interval", "interval x (max_missed + 1) is too long");
        }
        if self.auth.token.as_ref().is_some_and(|t| t.len() < 16) {
            return invalid("auth.token", "must be at least 16 characters");
        }
        if let Some(cluster) = &self.cluster {
            if cluster.node_id == 0 {
                return invalid("cluster.node_id", "must be 1 to 255, unique among the cluster's brokers");
            }
            if cluster.name.is_empty() {
                return invalid("cluster.name", "must not be empty");
            }
            if cluster.token.as_ref().is_some_and(|t| t.len() < 16) {
                return invalid("cluster.token", "must be at least 16 characters");
            }
            if cluster.token.is_none() && self.auth.required() {
                // Otherwise anyone reaching the route port would bypass client authentication.
                return invalid("cluster.token", "must be set when clients must authenticate");
            }
            if cluster.token.is_none() && self.auth.default_permissions != crate::Permissions::default() {
                // A peer broker speaks for its clients with no permissions checked here: without
                // a token, anyone reaching the route port would escape the anonymous limits.
                return invalid("cluster.token", "must be set when default permissions restrict clients");
            }
        }
        if let Some(tls) = &self.tls
            && tls.client_ca.is_some()
            && !tls.required
        {
            return invalid(
                "tls.required",
                "must be true with client_ca: plain clients would skip the certificate check",
            );
        }
        Ok(())
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

fn duration_text(d: Duration) -> String {
    if d.subsec_millis() != 0 { format!("{}ms", d.as_millis()) } else { format!("{}s", d.as_secs()) }
}

/// A configuration file with every option at its default, each explained.
pub fn default_toml() -> String {
    let c = Config::default();
    format!(
        r#"# busbar broker configuration. Every key shown is optional, at its default. A commented-out
# section ([tls], [cluster], [cluster.tls], [[auth.users]]) is off; one you turn on needs the
# keys marked "required".
# busbar serve --config busbar.toml   (command-line flags and BUSBAR_* variables override it)

[server]
# Name announced to clients in WELCOME.
name = "{name}"
# Address of the native protocol listener; port 0 picks a free port.
listen = "{listen}"
# Monitoring HTTP listener (dashboard, /metrics, /varz, /connz, /subsz, /healthz); off when absent.
# http = "127.0.0.1:8900"
# NATS client protocol listener (NATS clients in any language join the bus); off when absent.
# nats_listen = "127.0.0.1:4222"

[limits]
# Largest frame accepted and sent, in bytes (announced in WELCOME).
max_frame_size = {max_frame_size}
# Most client connections at once; one more is refused with TooManyConnections.
max_connections = {max_connections}
# Most subscriptions one connection may hold.
max_subscriptions = {max_subscriptions}
# Most frames, and bytes, queued for one connection before it is a slow consumer.
max_pending = {max_pending}
max_pending_bytes = {max_pending_bytes}
# Most requests one connection may have waiting for replies.
max_requests = {max_requests}
# Time a new connection has to send HELLO; time connections get to flush on shutdown.
handshake_timeout = "{handshake_timeout}"
drain_timeout = "{drain_timeout}"

[heartbeat]
# Ping a connection quiet for this long ("0s" disables heartbeats) ...
interval = "{interval}"
# ... again after each quiet interval, up to max_missed pings, and close it when it has been
# quiet for interval x (max_missed + 1).
max_missed = {max_missed}

[slow_consumer]
# "disconnect" (close it with SlowConsumer) or "drop" (keep it, drop and count its messages).
policy = "disconnect"

# TLS on the native listener (clients use busbars://host:port). Off when this section is absent.
# [tls]
# cert = "/etc/busbar/server.pem"          # required: certificate chain, PEM
# key = "/etc/busbar/server.key"           # required: private key, PEM
# client_ca = "/etc/busbar/clients-ca.pem" # mutual TLS: clients need a certificate from this CA
# required = true                          # false: plain and TLS clients on the same port

# Several brokers as one bus (docs/CLUSTER.md). Off when this section is absent.
# [cluster]
# name = "main"                            # required: routes from another cluster are refused
# node_id = 1                              # required: 1-255, unique per broker (top byte of ids)
# listen = "127.0.0.1:4901"                # required: where the other brokers connect
# routes = ["10.0.0.2:4901"]               # seeds; the rest of the cluster is learned from them
# token = "a shared secret of 16+ chars"   # brokers must present it
# advertise = "10.0.0.1:4901"              # the route address others dial (default: the listen
#                                          # address; for 0.0.0.0, this machine's default-route IP)
# client_advertise = "10.0.0.1:4900"       # the client address clients are told of (same default)
# nats_advertise = "10.0.0.1:4222"         # the NATS address NATS clients are told of (same default)
# [cluster.tls]                            # mutual TLS between brokers
# cert = "/etc/busbar/node1.pem"           # required: must name the address others dial (IP SAN)
# key = "/etc/busbar/node1.key"            # required
# ca = "/etc/busbar/cluster-ca.pem"        # required: peers' certificates must chain to it

# Authentication: with neither a token nor users, anyone may connect (with default_permissions).
[auth]
# token = "a long random string"
# Close a connection that breaks its permissions (default: refuse that one thing, go on).
disconnect_on_violation = false
# With mutual TLS: a client certificate whose common name is a user's name logs in as that user.
tls_identity = false

# Permissions of token clients and of users without their own. Lists of topic patterns; deny
# wins; a missing allow list allows everything not denied. Uncomment for deny-by-default:
# [auth.default_permissions]
# publish = {{ allow = [] }}
# subscribe = {{ allow = [] }}
# services = {{ allow = [] }}
# groups = {{ allow = [] }}
# allow_responses = false

# [[auth.users]]
# name = "shop"                            # required
# password_hash = "$argon2id$..."          # required: busbar config hash-password
# [auth.users.permissions]
# publish = {{ allow = ["orders.>"], deny = ["orders.internal.>"] }}
# subscribe = {{ allow = ["orders.>"] }}
# services = {{ allow = ["shop"] }}
# groups = {{ allow = ["shop-workers"] }}    # group names it may join
# allow_responses = true                   # may answer requests without publish rights
"#,
        name = c.server_name,
        listen = c.listen,
        max_frame_size = c.max_frame_size,
        max_connections = c.max_connections,
        max_subscriptions = c.max_subscriptions,
        max_pending = c.max_pending,
        max_pending_bytes = c.max_pending_bytes,
        max_requests = c.max_requests,
        handshake_timeout = duration_text(c.handshake_timeout),
        drain_timeout = duration_text(c.drain_timeout),
        interval = duration_text(c.heartbeat_interval),
        max_missed = c.heartbeat_max_missed,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(a: &Config, b: &Config) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    /// The generated file's commented-out sections: each, turned on with exactly the keys it
    /// marks required, parses; without any one of them, it does not, and the error names it.
    #[test]
    fn generated_sections_mark_their_required_keys() {
        let text = default_toml();
        let mut sections: Vec<(String, Vec<String>)> = Vec::new();
        for line in text.lines() {
            let Some(line) = line.strip_prefix("# ") else {
                if line.trim().is_empty() {
                    continue;
                }
                sections.push((String::new(), Vec::new()));
                continue;
            };
            if line.starts_with('[') {
                let header = line.split("  ").next().unwrap().trim().to_string();
                sections.push((header, Vec::new()));
            } else if line.contains("# required")
                && let Some((_, keys)) = sections.last_mut()
            {
                keys.push(line.split("  #").next().unwrap().trim().to_string());
            }
        }
        let wanted = ["[tls]", "[cluster]", "[cluster.tls]", "[[auth.users]]"];
        let found: Vec<&str> =
            sections.iter().filter(|(_, k)| !k.is_empty()).map(|(h, _)| h.as_str()).collect();
        assert_eq!(found, wanted);
        let block = |header: &str, skip: Option<usize>| {
            let (_, keys) = sections.iter().find(|(h, _)| h == header).unwrap();
            let kept = keys.iter().enumerate().filter(|(i, _)| Some(*i) != skip).map(|(_, k)| k.as_str());
            format!("{header}\n{}\n", kept.collect::<Vec<_>>().join("\n"))
        };
        for header in wanted {
            // [cluster.tls] needs its [cluster].
            let base = if header == "[cluster.tls]" { block("[cluster]", None) } else { String::new() };
            let whole = format!("{base}{}", block(header, None));
            if let Err(e) = Config::from_toml(&whole) {
                assert!(!e.to_string().contains("missing field"), "{header}: {e}\n{whole}");
            }
            let n = sections.iter().find(|(h, _)| h == header).unwrap().1.len();
            for skip in 0..n {
                let short = format!("{base}{}", block(header, Some(skip)));
                let e = Config::from_toml(&short).expect_err(&short).to_string();
                assert!(e.contains("missing field"), "{header} without key {skip}: {e}");
            }
        }
    }

    #[test]
    fn the_generated_file_reads_back_as_the_defaults() {
        let parsed = Config::from_toml(&default_toml()).unwrap();
        assert!(same(&parsed, &Config::default()), "{parsed:?}");
        assert!(same(&Config::from_toml("").unwrap(), &Config::default()));
    }

    #[test]
    fn values_are_read() {
        let c = Config::from_toml(
            r#"
            [server]
            listen = "127.0.0.1:0"
            http = "127.0.0.1:8900"
            nats_listen = "127.0.0.1:4222"
            [limits]
            max_connections = 10
            handshake_timeout = "250ms"
            [heartbeat]
            interval = "1m"
            [slow_consumer]
            policy = "drop"
            "#,
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(c.http, Some("127.0.0.1:8900".parse().unwrap()));
        assert_eq!(c.nats_listen, Some("127.0.0.1:4222".parse().unwrap()));
        assert_eq!(c.max_connections, 10);
        assert_eq!(c.handshake_timeout, Duration::from_millis(250));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(60));
        assert_eq!(c.slow_consumer, SlowConsumerPolicy::Drop);
    }

    #[test]
    fn errors_name_the_bad_key() {
        let e = Config::from_toml("[limits]\nmax_conections = 5\n").unwrap_err().to_string();
        assert!(e.contains("max_conections"), "{e}");
        let e = Config::from_toml("[heartbeat]\ninterval = \"10 parsecs\"\n").unwrap_err().to_string();
        assert!(e.contains("interval") && e.contains("parsecs"), "{e}");
        let e = Config::from_toml("[server]\nlisten = \"nowhere\"\n").unwrap_err().to_string();
        assert!(e.contains("listen"), "{e}");
        let e = Config::from_toml("[heartbeat]\nmax_missed = 0\n").unwrap_err().to_string();
        assert_eq!(e, "`heartbeat.max_missed`: must be at least 1");
        let e = Config::from_toml("[slow_consumer]\npolicy = \"ignore\"\n").unwrap_err().to_string();
        assert!(e.contains("policy") && e.contains("ignore"), "{e}");
    }

    #[test]
    fn auth_section() {
        let hash = crate::hash_password("pw");
        let text = format!(
            r#"
            [auth]
            token = "0123456789abcdef"
            disconnect_on_violation = true
            [auth.default_permissions]
            publish = {{ allow = [] }}
            [[auth.users]]
            name = "shop"
            password_hash = "{hash}"
            [auth.users.permissions]
            publish = {{ allow = ["orders.>"], deny = ["orders.x"] }}
            allow_responses = false
            "#
        );
        let c = Config::from_toml(&text).unwrap();
        assert_eq!(c.auth.token.as_deref(), Some("0123456789abcdef"));
        assert!(c.auth.disconnect_on_violation);
        assert_eq!(c.auth.default_permissions.publish, Rules::none());
        let p = c.auth.users[0].permissions.as_ref().unwrap();
        assert!(p.publish.permits_topic("orders.a") && !p.publish.permits_topic("orders.x"));
        assert!(!p.allow_responses);
        let e = Config::from_toml("[[auth.users]]\nname = \"a\"\npassword_hash = \"plain\"\n").unwrap_err();
        assert!(e.to_string().contains("argon2"), "{e}");
        let e =
            Config::from_toml("[auth.default_permissions]\npublish = { allow = [\"a..b\"] }\n").unwrap_err();
        assert!(e.to_string().contains("publish"), "{e}");
    }

    #[test]
    fn a_cluster_needs_a_token_when_anonymous_clients_are_restricted() {
        let cluster = "[cluster]\nname = \"c\"\nnode_id = 1\nlisten = \"127.0.0.1:0\"\n";
        let restricted = "[auth.default_permissions]\npublish = { allow = [\"public.>\"] }\n";
        let e = Config::from_toml(&format!("{restricted}{cluster}")).unwrap_err().to_string();
        assert_eq!(e, "`cluster.token`: must be set when default permissions restrict clients");
        let with_token = format!("{restricted}{cluster}token = \"0123456789abcdef\"\n");
        Config::from_toml(&with_token).unwrap();
        // Open to all anyway: nothing to escape.
        Config::from_toml(cluster).unwrap();
    }

    #[test]
    fn tls_section() {
        let c = Config::from_toml("[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n").unwrap();
        let tls = c.tls.unwrap();
        assert_eq!((tls.cert.to_str(), tls.required, tls.client_ca), (Some("c.pem"), true, None));
        let e = Config::from_toml("[auth]\ntls_identity = true\n").unwrap_err();
        assert!(e.to_string().contains("client_ca"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("1h").is_err());
    }
}
