//! Authentication: turns a bearer credential into a [`Principal`].
//!
//! Two kinds of credential are accepted in `Authorization: Bearer …`:
//! - JWTs (jsonwebtoken), checked against the operator's keys. Each key has
//!   an explicit algorithm allow-list, so `alg: none` and RS/HS confusion
//!   fail; the token's `kid` selects the key. `exp` and `sub` are required, `nbf`,
//!   `iss` and `aud` are checked, with a small leeway.
//! - API keys, stored in the config as sha256 hashes and compared in
//!   constant time, each mapped to a tenant and roles.
//!
//! This module knows nothing of HTTP routes or tenants' policies: the HTTP
//! gate (`gate.rs`) calls it and decides what a failure looks like.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::valid_tenant_id;
use crate::dispatch::Principal;

/// `[auth]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `"tokens"` (default): every request needs a JWT or API key.
    /// `"none"`: no authentication, only on a loopback listener, for local
    /// development and the conformance suite.
    pub mode: AuthMode,
    /// Required `iss` of JWTs.
    pub issuer: Option<String>,
    /// Required `aud` of JWTs (any of these).
    pub audience: Vec<String>,
    /// Clock skew allowed for `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Claim naming the tenant.
    pub tenant_claim: String,
    /// Claim holding the roles as an array of strings; when absent, the
    /// space-separated `scope_claim` is used.
    pub roles_claim: String,
    /// Claim holding space-separated roles (OAuth scopes).
    pub scope_claim: String,
    /// Keys JWTs may be signed with.
    pub jwt_keys: Vec<JwtKeyConfig>,
    /// API keys.
    pub api_keys: Vec<ApiKeyConfig>,
    /// This server's resource identifier for RFC 9728 metadata (e.g.
    /// `"https://mcp.example.com/mcp"`); derived from the request when unset.
    pub resource: Option<String>,
    /// Authorization servers clients should get tokens from (RFC 9728).
    pub authorization_servers: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::Tokens,
            issuer: None,
            audience: Vec::new(),
            leeway_secs: 30,
            tenant_claim: "tenant".into(),
            roles_claim: "roles".into(),
            scope_claim: "scope".into(),
            jwt_keys: Vec::new(),
            api_keys: Vec::new(),
            resource: None,
            authorization_servers: Vec::new(),
        }
    }
}

/// Whether requests must authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Bearer JWTs or API keys.
    Tokens,
    /// Nobody authenticates (loopback only).
    None,
}

/// `[[auth.jwt_keys]]`: one verification key (or a JWKS file of them).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct JwtKeyConfig {
    /// The `kid` tokens name to select this key. A token without `kid` is
    /// checked against the keys without one.
    pub kid: Option<String>,
    /// Algorithms this key accepts, e.g. `["RS256"]`. Required: there is no
    /// default, so a key can never be used with an algorithm it was not meant for.
    #[serde(default)]
    pub algorithms: Vec<String>,
    /// HS*: environment variable holding the shared secret.
    pub secret_env: Option<String>,
    /// HS*: file holding the shared secret (trailing whitespace ignored).
    pub secret_file: Option<PathBuf>,
    /// With `secret_file`: create the file with a random secret when it is
    /// missing (development setups; `cordon token issue` uses it).
    #[serde(default)]
    pub create_if_missing: bool,
    /// RS*/PS*/ES*/EdDSA: PEM public key file.
    pub public_key_file: Option<PathBuf>,
    /// A JWKS file; each of its keys is selected by its own `kid`.
    pub jwks_file: Option<PathBuf>,
}

/// `[[auth.api_keys]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Names the key's holder (the subject in audit records).
    pub name: String,
    /// sha256 of the key, hex (`printf %s KEY | sha256sum`).
    pub sha256: String,
    /// The tenant the key acts for.
    pub tenant: String,
    /// The key's roles.
    #[serde(default)]
    pub roles: Vec<String>,
}

/// Why a request was not authenticated. The `reason` goes to the audit log
/// and metrics; the client gets only the `error` code and a short description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    /// No `Authorization` header.
    #[error("no bearer token")]
    Missing,
    /// `Authorization` is not `Bearer <token>`.
    #[error("the Authorization header must be `Bearer <token>`")]
    NotBearer,
    /// A credential was sent in the URL, where it leaks into logs.
    #[error("credentials in the query string are refused; send `Authorization: Bearer <token>`")]
    TokenInQuery,
    /// Not a well-formed JWT (this includes `alg: none`).
    #[error("malformed token")]
    Malformed,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// The token's algorithm is not allowed for the selected key.
    #[error("algorithm not allowed")]
    AlgorithmNotAllowed,
    /// The `kid` names no configured key.
    #[error("unknown key id")]
    UnknownKid,
    /// Past `exp`.
    #[error("token expired")]
    Expired,
    /// Before `nbf`.
    #[error("token not yet valid")]
    NotYetValid,
    /// Wrong `aud`.
    #[error("wrong audience")]
    WrongAudience,
    /// Wrong `iss`.
    #[error("wrong issuer")]
    WrongIssuer,
    /// A required claim (`exp`, `sub`, `iss`, `aud`) is missing.
    #[error("missing claim `{0}`")]
    MissingClaim(String),
    /// No tenant claim.
    #[error("the token names no tenant")]
    MissingTenant,
    /// The tenant id is not a safe, declared tenant.
    #[error("unknown tenant")]
    UnknownTenant,
    /// Neither a JWT nor a known API key.
    #[error("unknown API key")]
    UnknownApiKey,
}

impl AuthFailure {
    /// A short, stable name for audit records and metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::NotBearer => "not_bearer",
            AuthFailure::TokenInQuery => "token_in_query",
            AuthFailure::Malformed => "malformed",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::AlgorithmNotAllowed => "algorithm_not_allowed",
            AuthFailure::UnknownKid => "unknown_kid",
            AuthFailure::Expired => "expired",
            AuthFailure::NotYetValid => "not_yet_valid",
            AuthFailure::WrongAudience => "wrong_audience",
            AuthFailure::WrongIssuer => "wrong_issuer",
            AuthFailure::MissingClaim(_) => "missing_claim",
            AuthFailure::MissingTenant => "missing_tenant",
            AuthFailure::UnknownTenant => "unknown_tenant",
            AuthFailure::UnknownApiKey => "unknown_api_key",
        }
    }

    /// The RFC 6750 `error` code, if any (none when no credential was sent).
    pub fn error_code(&self) -> Option<&'static str> {
        match self {
            AuthFailure::Missing => None,
            AuthFailure::NotBearer | AuthFailure::TokenInQuery => Some("invalid_request"),
            _ => Some("invalid_token"),
        }
    }
}

/// A key, loaded.
struct LoadedKey {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    decoding: DecodingKey,
    /// HS* keys can also sign development tokens.
    secret: Option<Vec<u8>>,
}

/// Verifies credentials. Built from the config (keys are read then); the
/// keys can be replaced at run time (config reload), the mode cannot.
pub struct Authenticator {
    mode: AuthMode,
    keys: arc_swap::ArcSwap<KeySet>,
    /// JWTs verified recently, until their `exp` (+ leeway): clients send
    /// the same token with every request, and checking its signature and
    /// claims again each time is most of what authentication costs.
    verified: std::sync::Mutex<std::collections::HashMap<String, Verified>>,
}

/// A verified JWT's principal, and until when (Unix seconds) it holds.
struct Verified {
    principal: Arc<Principal>,
    until: u64,
}

/// Verified JWTs remembered at most (the map is emptied when full).
const VERIFIED_CACHE: usize = 4096;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// Everything one configuration's credentials need.
struct KeySet {
    config: AuthConfig,
    keys: Vec<LoadedKey>,
    /// (sha256 of the key, the principal it stands for).
    api_keys: Vec<([u8; 32], Arc<Principal>)>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        let keys = self.keys.load();
        f.debug_struct("Authenticator")
            .field("mode", &self.mode)
            .field("jwt_keys", &keys.keys.len())
            .field("api_keys", &keys.api_keys.len())
            .finish()
    }
}

/// Claims Cordon mints in development tokens.
#[derive(serde::Serialize)]
struct DevClaims<'a> {
    sub: &'a str,
    iat: u64,
    nbf: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    #[serde(flatten)]
    tenancy: serde_json::Map<String, serde_json::Value>,
}

impl Authenticator {
    /// Loads every key the config names; `base_dir` resolves relative paths.
    /// Every problem is returned (key path, message), for the config check.
    pub fn new(
        config: &AuthConfig,
        base_dir: &Path,
    ) -> Result<Authenticator, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let mut keys = Vec::new();
        for (i, key) in config.jwt_keys.iter().enumerate() {
            match load_key(key, base_dir) {
                Ok(loaded) => keys.extend(loaded),
                Err(message) => problems.push((format!("auth.jwt_keys[{i}]"), message)),
            }
        }
        let mut api_keys = Vec::new();
        for (i, key) in config.api_keys.iter().enumerate() {
            let mut hash = [0u8; 32];
            if hex::decode_to_slice(&key.sha256, &mut hash).is_err() {
                problems.push((
                    format!("auth.api_keys[{i}].sha256"),
                    "must be 64 hex digits: `printf %s \"$KEY\" | sha256sum`".into(),
                ));
                continue;
            }
            if !valid_tenant_id(&key.tenant) {
                problems.push((
                    format!("auth.api_keys[{i}].tenant"),
                    "use 1-64 of a-z 0-9 _ -".into(),
                ));
            }
            api_keys.push((
                hash,
                Arc::new(Principal {
                    tenant: key.tenant.clone(),
                    subject: format!("api-key:{}", key.name),
                    roles: key.roles.clone(),
                }),
            ));
        }
        if problems.is_empty() {
            Ok(Authenticator {
                mode: config.mode,
                keys: arc_swap::ArcSwap::from_pointee(KeySet {
                    config: config.clone(),
                    keys,
                    api_keys,
                }),
                verified: Default::default(),
            })
        } else {
            Err(problems)
        }
    }

    /// Whether requests must authenticate.
    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// The configuration in force.
    pub fn config(&self) -> AuthConfig {
        self.keys.load().config.clone()
    }

    /// Puts `other`'s keys and settings in force for the requests that
    /// follow (config reload). Switching authentication on or off needs a
    /// restart.
    pub fn replace(&self, other: Authenticator) -> Result<(), String> {
        if other.mode != self.mode {
            return Err("auth.mode cannot change on reload; restart Cordon".into());
        }
        self.keys.store(other.keys.into_inner());
        self.verified_cache().clear();
        Ok(())
    }

    fn verified_cache(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Verified>> {
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks a bearer token (the part after `Bearer `).
    ///
    /// Shared, not copied: the principal travels with every request of the
    /// token (request extensions, the MCP handler, session bindings).
    pub fn verify(&self, token: &str) -> Result<Arc<Principal>, AuthFailure> {
        let keys = self.keys.load();
        if !is_jwt(token) {
            return keys.verify_api_key(token);
        }
        let now = unix_now();
        if let Some(hit) = self.verified_cache().get(token)
            && now <= hit.until
        {
            return Ok(hit.principal.clone());
        }
        let (principal, exp) = keys.verify_jwt(token)?;
        let principal = Arc::new(principal);
        let mut cache = self.verified_cache();
        if cache.len() >= VERIFIED_CACHE {
            cache.clear();
        }
        cache.insert(
            token.to_owned(),
            Verified {
                principal: principal.clone(),
                until: exp.saturating_add(keys.config.leeway_secs),
            },
        );
        Ok(principal)
    }

    /// Mints a token for `principal` valid for `ttl`, signed with the first
    /// HS* key that has a secret (`kid` picks another). For development and
    /// tests: production tokens come from the operator's identity provider.
    pub fn issue(
        &self,
        principal: &Principal,
        ttl: Duration,
        kid: Option<&str>,
    ) -> anyhow::Result<String> {
        self.keys.load().issue(principal, ttl, kid)
    }
}

fn is_jwt(token: &str) -> bool {
    token.split('.').count() == 3
}

impl KeySet {
    fn verify_api_key(&self, token: &str) -> Result<Arc<Principal>, AuthFailure> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Compare against every key, without stopping early: the time taken
        // does not depend on which key (if any) matched.
        let mut found = None;
        for (candidate, principal) in &self.api_keys {
            if bool::from(candidate.ct_eq(&hash)) {
                found = Some(principal);
            }
        }
        found.cloned().ok_or(AuthFailure::UnknownApiKey)
    }

    /// The token's principal and its `exp`.
    fn verify_jwt(&self, token: &str) -> Result<(Principal, u64), AuthFailure> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthFailure::Malformed)?;
        let candidates: Vec<&LoadedKey> = match &header.kid {
            Some(kid) => {
                let keys: Vec<_> = self
                    .keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid))
                    .collect();
                if keys.is_empty() {
                    return Err(AuthFailure::UnknownKid);
                }
                keys
            }
            None => self.keys.iter().filter(|k| k.kid.is_none()).collect(),
        };
        let candidates: Vec<_> = candidates
            .into_iter()
            .filter(|k| k.algorithms.contains(&header.alg))
            .collect();
        if candidates.is_empty() {
            return Err(
                if header.kid.is_none() && self.keys.iter().all(|k| k.kid.is_some()) {
                    AuthFailure::UnknownKid
                } else {
                    AuthFailure::AlgorithmNotAllowed
                },
            );
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.config.leeway_secs;
        validation.validate_nbf = true;
        // `sub` is required: sessions are bound to tenant + subject, so two
        // callers must never share a made-up subject.
        let mut required = vec!["exp", "sub"];
        if let Some(issuer) = &self.config.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        if self.config.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.config.audience);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);

        let mut failure = AuthFailure::BadSignature;
        for key in candidates {
            match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
                token,
                &key.decoding,
                &validation,
            ) {
                Ok(data) => {
                    // `exp` is required and was checked: it is a number.
                    let exp = data.claims.get("exp").and_then(|e| e.as_u64()).unwrap_or(0);
                    return Ok((self.principal_from_claims(&data.claims)?, exp));
                }
                Err(e) => {
                    failure = match e.kind() {
                        ErrorKind::InvalidSignature => AuthFailure::BadSignature,
                        ErrorKind::ExpiredSignature => AuthFailure::Expired,
                        ErrorKind::ImmatureSignature => AuthFailure::NotYetValid,
                        ErrorKind::InvalidAudience => AuthFailure::WrongAudience,
                        ErrorKind::InvalidIssuer => AuthFailure::WrongIssuer,
                        ErrorKind::InvalidAlgorithm => AuthFailure::AlgorithmNotAllowed,
                        ErrorKind::MissingRequiredClaim(claim) => {
                            AuthFailure::MissingClaim(claim.clone())
                        }
                        _ => AuthFailure::Malformed,
                    };
                    // Only a bad signature may be another key's token.
                    if failure != AuthFailure::BadSignature {
                        return Err(failure);
                    }
                }
            }
        }
        Err(failure)
    }

    fn principal_from_claims(
        &self,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Principal, AuthFailure> {
        let tenant = match claims.get(&self.config.tenant_claim) {
            Some(serde_json::Value::String(t)) => t.clone(),
            _ => return Err(AuthFailure::MissingTenant),
        };
        if !valid_tenant_id(&tenant) {
            return Err(AuthFailure::UnknownTenant);
        }
        let roles = match claims.get(&self.config.roles_claim) {
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|r| r.as_str().map(str::to_owned))
                .collect(),
            _ => match claims.get(&self.config.scope_claim) {
                Some(serde_json::Value::String(scope)) => {
                    scope.split_whitespace().map(str::to_owned).collect()
                }
                _ => Vec::new(),
            },
        };
        let subject = match claims.get("sub").and_then(|s| s.as_str()) {
            Some(sub) if !sub.is_empty() => sub.to_owned(),
            _ => return Err(AuthFailure::MissingClaim("sub".into())),
        };
        Ok(Principal {
            tenant,
            subject,
            roles,
        })
    }

    fn issue(
        &self,
        principal: &Principal,
        ttl: Duration,
        kid: Option<&str>,
    ) -> anyhow::Result<String> {
        let key = self
            .keys
            .iter()
            .find(|k| k.secret.is_some() && (kid.is_none() || k.kid.as_deref() == kid))
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no HS256/HS384/HS512 key with a secret{} in [[auth.jwt_keys]]: tokens for other keys come from your identity provider",
                    kid.map(|k| format!(" and kid {k:?}")).unwrap_or_default()
                )
            })?;
        let algorithm = key.algorithms[0];
        let mut header = Header::new(algorithm);
        header.kid = key.kid.clone();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut tenancy = serde_json::Map::new();
        tenancy.insert(
            self.config.tenant_claim.clone(),
            principal.tenant.clone().into(),
        );
        tenancy.insert(
            self.config.roles_claim.clone(),
            principal.roles.clone().into(),
        );
        let claims = DevClaims {
            sub: &principal.subject,
            iat: now,
            nbf: now,
            exp: now + ttl.as_secs(),
            iss: self.config.issuer.as_deref(),
            aud: self.config.audience.first().map(String::as_str),
            tenancy,
        };
        let secret = key.secret.as_deref().unwrap_or_default();
        Ok(jsonwebtoken::encode(
            &header,
            &claims,
            &EncodingKey::from_secret(secret),
        )?)
    }
}

fn parse_algorithms(names: &[String]) -> Result<Vec<Algorithm>, String> {
    if names.is_empty() {
        return Err("`algorithms` is required, e.g. [\"RS256\"]".into());
    }
    names
        .iter()
        .map(|n| {
            n.parse::<Algorithm>()
                .map_err(|_| format!("unknown algorithm {n:?} (HS256, RS256, ES256, EdDSA, …)"))
        })
        .collect()
}

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

fn load_key(config: &JwtKeyConfig, base_dir: &Path) -> Result<Vec<LoadedKey>, String> {
    let resolve = |p: &Path| {
        if p.is_absolute() {
            p.to_owned()
        } else {
            base_dir.join(p)
        }
    };
    let sources = [
        config.secret_env.is_some(),
        config.secret_file.is_some(),
        config.public_key_file.is_some(),
        config.jwks_file.is_some(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    if sources != 1 {
        return Err(
            "give exactly one of secret_env, secret_file, public_key_file, jwks_file".into(),
        );
    }
    if let Some(path) = &config.jwks_file {
        let path = resolve(path);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read jwks_file {}: {e}", path.display()))?;
        let set: JwkSet = serde_json::from_str(&text)
            .map_err(|e| format!("jwks_file {} is not a JWKS: {e}", path.display()))?;
        let allowed = if config.algorithms.is_empty() {
            None
        } else {
            Some(parse_algorithms(&config.algorithms)?)
        };
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let decoding = DecodingKey::from_jwk(jwk)
                .map_err(|e| format!("jwks_file {}: unusable key: {e}", path.display()))?;
            let algorithms = match (&jwk.common.key_algorithm, &allowed) {
                (Some(alg), _) => {
                    let alg = alg.to_string().parse::<Algorithm>().map_err(|_| {
                        format!("jwks_file {}: unsupported alg {alg}", path.display())
                    })?;
                    if allowed.as_ref().is_some_and(|a| !a.contains(&alg)) {
                        continue;
                    }
                    vec![alg]
                }
                (None, Some(allowed)) => allowed.clone(),
                (None, None) => {
                    return Err(format!(
                        "jwks_file {}: a key has no `alg`; set `algorithms`",
                        path.display()
                    ));
                }
            };
            if algorithms.iter().any(|a| is_hmac(*a)) {
                return Err("JWKS keys must be public keys, not HS* secrets".into());
            }
            keys.push(LoadedKey {
                kid: jwk.common.key_id.clone(),
                algorithms,
                decoding,
                secret: None,
            });
        }
        return Ok(keys);
    }
    let algorithms = parse_algorithms(&config.algorithms)?;
    let hmac = algorithms.iter().all(|a| is_hmac(*a));
    if !hmac && algorithms.iter().any(|a| is_hmac(*a)) {
        return Err("a key is either HS* or public-key, not both: split it in two".into());
    }
    if let Some(path) = &config.public_key_file {
        if hmac {
            return Err("HS* algorithms take secret_env or secret_file, not a public key".into());
        }
        let path = resolve(path);
        let pem = std::fs::read(&path)
            .map_err(|e| format!("cannot read public_key_file {}: {e}", path.display()))?;
        let decoding = match algorithms[0] {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => DecodingKey::from_rsa_pem(&pem),
            Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
            _ => unreachable!("HS* handled above"),
        }
        .map_err(|e| {
            format!(
                "public_key_file {} is not a usable PEM key: {e}",
                path.display()
            )
        })?;
        return Ok(vec![LoadedKey {
            kid: config.kid.clone(),
            algorithms,
            decoding,
            secret: None,
        }]);
    }
    if !hmac {
        return Err("public-key algorithms need public_key_file or jwks_file".into());
    }
    let secret = if let Some(var) = &config.secret_env {
        std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))?
    } else {
        let path = resolve(config.secret_file.as_deref().unwrap_or(Path::new("")));
        read_or_create_secret(&path, config.create_if_missing)?
    };
    let secret = secret.trim_end().as_bytes().to_vec();
    if secret.len() < 32 {
        return Err("the HS* secret must be at least 32 bytes".into());
    }
    Ok(vec![LoadedKey {
        kid: config.kid.clone(),
        algorithms,
        decoding: DecodingKey::from_secret(&secret),
        secret: Some(secret),
    }])
}

fn read_or_create_secret(path: &Path, create: bool) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(secret) => Ok(secret),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            use rand::RngCore as _;
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut bytes = [0u8; 32];
            rand::rng().fill_bytes(&mut bytes);
            let secret = hex::encode(bytes);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
            }
            // Readable by the owner only; `create_new` so that two starts
            // racing do not overwrite each other's secret.
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .and_then(|mut f| f.write_all(secret.as_bytes()));
            match written {
                Ok(()) => {
                    tracing::warn!(path = %path.display(), "created a development JWT secret");
                    Ok(secret)
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    std::fs::read_to_string(path)
                        .map_err(|e| format!("cannot read secret_file {}: {e}", path.display()))
                }
                Err(e) => Err(format!("cannot write secret_file {}: {e}", path.display())),
            }
        }
        Err(e) => Err(format!("cannot read secret_file {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authenticator(extra: &str) -> Authenticator {
        let config: AuthConfig = toml::from_str(&format!(
            "issuer = \"cordon-test\"\naudience = [\"cordon\"]\n{extra}"
        ))
        .unwrap();
        Authenticator::new(&config, Path::new(".")).unwrap()
    }

    #[test]
    fn api_keys_map_to_their_principal() {
        let hash = hex::encode(Sha256::digest(b"sk-test-123"));
        let auth = authenticator(&format!(
            "[[api_keys]]\nname = \"ci\"\nsha256 = \"{hash}\"\ntenant = \"acme\"\nroles = [\"reader\"]\n"
        ));
        let p = auth.verify("sk-test-123").unwrap();
        assert_eq!(p.tenant, "acme");
        assert_eq!(p.roles, ["reader"]);
        assert_eq!(auth.verify("sk-test-124"), Err(AuthFailure::UnknownApiKey));
    }

    #[test]
    fn issued_tokens_verify_and_tampered_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        let auth = authenticator(&format!(
            "[[jwt_keys]]\nkid = \"dev\"\nalgorithms = [\"HS256\"]\nsecret_file = {:?}\ncreate_if_missing = true\n",
            secret
        ));
        let principal = Principal {
            tenant: "acme".into(),
            subject: "alice".into(),
            roles: vec!["reader".into()],
        };
        let token = auth
            .issue(&principal, Duration::from_secs(60), None)
            .unwrap();
        assert_eq!(*auth.verify(&token).unwrap(), principal);
        let mut bad = token.clone();
        bad.pop();
        bad.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert!(auth.verify(&bad).is_err());
    }
}
