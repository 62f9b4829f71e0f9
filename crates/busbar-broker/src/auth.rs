//! Authentication in the handshake, and per-user permissions on topics and service names.
//!
//! A client proves who it is with HELLO properties: `token`, or `user` and `password`. Passwords
//! are stored as argon2 hashes ([`hash_password`]). Failures are counted and logged, and the
//! client is told only "authentication failed": never which part was wrong.
//!
//! Permissions are allow/deny lists of topic patterns; deny wins. Publishing checks the topic;
//! subscribing checks the pattern (it must lie inside an allowed pattern and overlap no denied
//! one); registering a service name checks the name against the `services` rules.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use busbar_core::Headers;
use busbar_core::topic::{covers, intersects, matches};

/// Who may connect, and what each may do.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// A shared token that admits a client with the default permissions.
    pub token: Option<String>,
    /// Users with argon2 password hashes.
    pub users: Vec<User>,
    /// Permissions of token clients, users without their own, and everyone when no
    /// authentication is configured.
    pub default_permissions: Permissions,
    /// Close the connection on a permission violation (default: answer PermissionDenied and go on).
    pub disconnect_on_violation: bool,
    /// With mutual TLS: a client whose certificate's common name is a user's name is that user,
    /// without a password.
    pub tls_identity: bool,
}

/// A user who may connect with a password.
#[derive(Debug, Clone)]
pub struct User {
    /// The name given in HELLO's `user` property.
    pub name: String,
    /// Argon2 hash of the password in PHC string form (`busbar config hash-password`).
    pub password_hash: String,
    /// This user's permissions; the defaults when `None`.
    pub permissions: Option<Permissions>,
}

/// What a connection may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Topics it may publish (and send requests) to.
    pub publish: Rules,
    /// Patterns it may subscribe (and answer requests) on.
    pub subscribe: Rules,
    /// Service names it may register.
    pub services: Rules,
    /// Group names it may join (a member takes a share of the group's messages).
    pub groups: Rules,
    /// May reply to requests it received even without publish rights on their topic.
    pub allow_responses: bool,
}

impl Default for Permissions {
    /// Everything allowed.
    fn default() -> Self {
        Self {
            publish: Rules::default(),
            subscribe: Rules::default(),
            services: Rules::default(),
            groups: Rules::default(),
            allow_responses: true,
        }
    }
}

impl Permissions {
    /// Nothing allowed (a default for deny-by-default setups).
    pub fn none() -> Self {
        Self {
            publish: Rules::none(),
            subscribe: Rules::none(),
            services: Rules::none(),
            groups: Rules::none(),
            allow_responses: false,
        }
    }
}

/// Allow and deny lists of patterns; deny wins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// Allowed patterns; `None` allows everything not denied.
    pub allow: Option<Vec<String>>,
    /// Denied patterns.
    pub deny: Vec<String>,
}

impl Rules {
    /// Allows nothing.
    pub fn none() -> Self {
        Self { allow: Some(Vec::new()), deny: Vec::new() }
    }

    /// Allows exactly these patterns.
    pub fn only<S: Into<String>>(patterns: impl IntoIterator<Item = S>) -> Self {
        Self { allow: Some(patterns.into_iter().map(Into::into).collect()), deny: Vec::new() }
    }

    /// May `topic` (a topic or name, no wildcards) be used?
    pub fn permits_topic(&self, topic: &str) -> bool {
        !self.deny.iter().any(|d| matches(d, topic))
            && self.allow.as_ref().is_none_or(|a| a.iter().any(|p| matches(p, topic)))
    }

    /// May `pattern` be subscribed to? Inside an allowed pattern, and overlapping no denied one.
    pub fn permits_pattern(&self, pattern: &str) -> bool {
        !self.deny.iter().any(|d| intersects(d, pattern))
            && self.allow.as_ref().is_none_or(|a| a.iter().any(|p| covers(p, pattern)))
    }
}

/// An argon2 hash of `password`, with a fresh random salt, in PHC string form.
pub fn hash_password(password: &str) -> String {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).expect("16 bytes is a valid salt length");
    Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).unwrap_or_default()
}

impl AuthConfig {
    /// True when clients must authenticate.
    pub fn required(&self) -> bool {
        self.token.is_some() || !self.users.is_empty()
    }

    /// Checks HELLO's properties. Slow on purpose for passwords (argon2): run it off the
    /// reactor. `None`: refused.
    pub(crate) fn authenticate(
        &self,
        properties: &Headers,
        tls_identity: Option<&str>,
    ) -> Option<Permissions> {
        if self.tls_identity
            && let Some(user) = tls_identity.and_then(|cn| self.users.iter().find(|u| u.name == cn))
        {
            return Some(user.permissions.clone().unwrap_or_else(|| self.default_permissions.clone()));
        }
        if !self.required() {
            return Some(self.default_permissions.clone());
        }
        if let (Some(expected), Some(given)) = (&self.token, properties.get("token")) {
            if constant_time_eq(expected.as_bytes(), given.as_bytes()) {
                return Some(self.default_permissions.clone());
            }
            return None;
        }
        let (name, password) = (properties.get("user")?, properties.get("password")?);
        let user = self.users.iter().find(|u| u.name == name);
        // Verify against some hash even for an unknown user, so that timing does not tell.
        let hash = user.map_or(DUMMY_HASH, |u| u.password_hash.as_str());
        let ok = PasswordHash::new(hash)
            .is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok());
        match (ok, user) {
            (true, Some(u)) => {
                Some(u.permissions.clone().unwrap_or_else(|| self.default_permissions.clone()))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
impl AuthConfig {
    fn authenticate_plain(&self, properties: &Headers) -> Option<Permissions> {
        self.authenticate(properties, None)
    }
}

/// The hash of a password nobody has, checked for unknown users.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$KZu6Jd0X3u5sW2UAB8ydKKzVxjOAZ1yWvOuq0eH3HXo";

/// Compares digests of the two values in constant time, so that neither the contents nor the
/// length of the token leak through timing.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use blake2::Digest;
    let (x, y) = (blake2::Blake2b512::digest(a), blake2::Blake2b512::digest(b));
    x.iter().zip(y.iter()).fold(0u8, |acc, (p, q)| acc | (p ^ q)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        let r = Rules { allow: Some(vec!["orders.>".into()]), deny: vec!["orders.secret.>".into()] };
        assert!(r.permits_topic("orders.created"));
        assert!(!r.permits_topic("billing.x"));
        assert!(!r.permits_topic("orders.secret.plan"));
        assert!(r.permits_pattern("orders.*"));
        assert!(!r.permits_pattern("orders.>"), "overlaps the denied orders.secret.>");
        assert!(!r.permits_pattern(">"));
        assert!(Rules::default().permits_pattern(">"));
        assert!(!Rules::none().permits_topic("a"));
    }

    #[test]
    fn tokens_and_passwords() {
        let hash = hash_password("s3cret");
        let auth = AuthConfig {
            token: Some("tok".into()),
            users: vec![User {
                name: "ann".into(),
                password_hash: hash,
                permissions: Some(Permissions::none()),
            }],
            ..AuthConfig::default()
        };
        let props = |pairs: &[(&str, &str)]| pairs.iter().copied().collect::<Headers>();
        assert_eq!(auth.authenticate_plain(&props(&[("token", "tok")])), Some(Permissions::default()));
        assert_eq!(auth.authenticate_plain(&props(&[("token", "nope")])), None);
        assert_eq!(
            auth.authenticate_plain(&props(&[("user", "ann"), ("password", "s3cret")])),
            Some(Permissions::none())
        );
        assert_eq!(auth.authenticate_plain(&props(&[("user", "ann"), ("password", "wrong")])), None);
        assert_eq!(auth.authenticate_plain(&props(&[("user", "bob"), ("password", "s3cret")])), None);
        assert_eq!(auth.authenticate_plain(&props(&[])), None);
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
    }
}
