//! The operator's configuration: TOML types, defaults and the checks that run
//! before anything is served. Every problem names the key and the fix.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::audit::AuditConfig;
use crate::auth::{AuthConfig, AuthMode};
use crate::policy::{RoleConfig, TenantConfig, check_glob};
use crate::runtime::{DirGrant, DirMode, EngineSettings, Grants, Limits, ToolSource};

/// The configuration Cordon uses when no `--config` is given: the example
/// tools built by `scripts/demo`, with safe demo grants. Paths are relative
/// to the working directory.
pub const DEMO_CONFIG: &str = include_str!("demo.toml");

/// A whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The listener and its edge protection.
    #[serde(default)]
    pub server: ServerConfig,
    /// How requests authenticate.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Roles defined for every tenant (`[roles.NAME]`).
    #[serde(default)]
    pub roles: BTreeMap<String, RoleConfig>,
    /// The declared tenants (`[tenants.ID]`); tokens naming any other
    /// tenant are refused.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantConfig>,
    /// Who reaches the management surface (`/admin/…`).
    #[serde(default)]
    pub admin: AdminConfig,
    /// The audit log.
    #[serde(default)]
    pub audit: AuditConfig,
    /// OpenTelemetry export.
    #[serde(default)]
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// Where tools come from and where their data lives.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Default limits for every tool.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Per-component settings, by component name (the `.wasm` file name
    /// without its extension).
    #[serde(default)]
    pub tools: BTreeMap<String, ToolConfig>,
    /// Named read-only database handles (`[databases.NAME]`), granted to
    /// components by name in `tools.NAME.databases`.
    #[serde(default)]
    pub databases: BTreeMap<String, crate::db::DatabaseConfig>,
    /// The directory relative paths are resolved against (the config file's
    /// directory, or the working directory for the demo config).
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on. Loopback by default.
    pub listen: std::net::SocketAddr,
    /// Browser origins allowed to call (e.g. `"https://app.example.com:443"`,
    /// `"http://localhost:*"`). Requests with any other `Origin` get 403;
    /// requests without `Origin` (non-browser clients) pass.
    pub allowed_origins: Vec<String>,
    /// Host names (or `host:port`) the server answers to, against DNS
    /// rebinding. Loopback names by default; add your public name.
    pub allowed_hosts: Vec<String>,
    /// Largest request body in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Open sessions (Streamable HTTP and HTTP+SSE together); new ones get 503 beyond.
    pub max_sessions: usize,
    /// Seconds between keep-alive comments on open event streams.
    pub keep_alive_secs: u64,
    /// Seconds of inactivity after which a session is closed.
    pub session_idle_secs: u64,
    /// Seconds a client may take to send a request's head (request line and
    /// headers); the connection is closed beyond.
    pub header_timeout_secs: u64,
    /// Seconds a client may take to send a request's whole body, counted
    /// from the end of its headers (a trickle does not extend it); the
    /// request is answered 408 and the connection closed beyond.
    pub body_timeout_secs: u64,
    /// At SIGTERM / Ctrl-C: seconds running calls get to finish before
    /// they are cancelled.
    pub shutdown_grace_secs: u64,
    /// With `auth.mode = "none"`: the tenant every caller acts as.
    pub local_tenant: String,
    /// With `auth.mode = "none"`: the roles every caller has.
    pub local_roles: Vec<String>,
    /// Serve HTTPS with these PEM files (`[server.tls]`).
    pub tls: Option<TlsConfig>,
    /// Serve plain HTTP on a non-loopback address (e.g. behind a
    /// TLS-terminating proxy on a private network). Off: plain HTTP only on
    /// loopback.
    pub allow_plain_http: bool,
}

impl ServerConfig {
    /// The principal of every request when authentication is off.
    pub fn local_principal(&self) -> crate::dispatch::Principal {
        crate::dispatch::Principal {
            tenant: self.local_tenant.clone(),
            subject: "local".into(),
            roles: self.local_roles.clone(),
        }
    }
}

/// `[server.tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain (PEM), leaf first.
    pub cert_file: PathBuf,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
}

/// `[admin]`: the management surface (`/admin/tenants`, `/admin/reload`,
/// `/admin/audit/tail`, `/admin/audit/verify`). Off unless `tenant` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// The operators' tenant.
    pub tenant: Option<String>,
    /// The role, within that tenant, that may use the management surface.
    pub role: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            tenant: None,
            role: "admin".into(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: ([127, 0, 0, 1], 8750).into(),
            allowed_origins: Vec::new(),
            allowed_hosts: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            max_body_bytes: 4 << 20,
            max_sessions: 10_000,
            keep_alive_secs: 15,
            session_idle_secs: 300,
            header_timeout_secs: 30,
            body_timeout_secs: 30,
            shutdown_grace_secs: 30,
            local_tenant: "local".into(),
            local_roles: Vec::new(),
            tls: None,
            allow_plain_http: false,
        }
    }
}

/// `[runtime]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Directory whose `*.wasm` files are served.
    pub tools_dir: PathBuf,
    /// Compile cache directory; `""` disables the cache.
    pub cache_dir: PathBuf,
    /// Directory grants are resolved beneath this directory.
    pub data_root: PathBuf,
    /// Reload when files in `tools_dir` change.
    pub watch: bool,
    /// Engine-wide settings.
    pub engine: EngineConfig,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            tools_dir: "tools".into(),
            cache_dir: ".cordon/cache".into(),
            data_root: "data".into(),
            watch: true,
            engine: EngineConfig::default(),
        }
    }
}

/// `[runtime.engine]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Instances that may run at once.
    pub max_instances: u32,
    /// Ceiling for any tool's `memory_mib`.
    pub max_memory_mib: u64,
    /// Meter fuel (needed for `fuel` limits).
    pub fuel: bool,
    /// Epoch tick in milliseconds.
    pub epoch_tick_ms: u64,
    /// Dirty memory per instance slot reset in place rather than returned
    /// to the kernel, in KiB.
    pub keep_resident_kib: u64,
    /// Start calls that arrive together back to back.
    pub batch_calls: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        let d = EngineSettings::default();
        EngineConfig {
            max_instances: d.max_instances,
            max_memory_mib: d.max_memory_bytes >> 20,
            fuel: d.fuel,
            epoch_tick_ms: d.epoch_tick_ms,
            keep_resident_kib: d.keep_resident_bytes >> 10,
            batch_calls: d.batch_calls,
        }
    }
}

/// `[limits]` and `[tools.NAME.limits]`: each key optional, falling back to
/// the level above (built-in defaults, then `[limits]`).
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Memory in MiB (default 64).
    pub memory_mib: Option<u64>,
    /// Deadline in milliseconds (default 10000).
    pub timeout_ms: Option<u64>,
    /// Fuel budget (default: unmetered; needs `runtime.engine.fuel`).
    pub fuel: Option<u64>,
    /// Largest result in bytes (default 1 MiB).
    pub max_output_bytes: Option<u64>,
    /// Captured stdout/stderr bytes (default 64 KiB each).
    pub max_stdio_bytes: Option<u64>,
    /// Open handles (files, streams) at once (default 256).
    pub max_handles: Option<u32>,
    /// Log/progress notifications per call (default 1000).
    pub max_notifications: Option<u32>,
}

impl LimitsConfig {
    /// `self` on top of `base`.
    pub fn apply(&self, base: &Limits) -> Limits {
        Limits {
            memory_bytes: self.memory_mib.map_or(base.memory_bytes, |m| m << 20),
            timeout: self.timeout_ms.map_or(base.timeout, Duration::from_millis),
            fuel: self.fuel.or(base.fuel),
            max_output_bytes: self.max_output_bytes.unwrap_or(base.max_output_bytes),
            max_stdio_bytes: self.max_stdio_bytes.unwrap_or(base.max_stdio_bytes),
            max_handles: self.max_handles.unwrap_or(base.max_handles),
            max_notifications: self.max_notifications.unwrap_or(base.max_notifications),
        }
    }
}

/// `[tools.NAME]`: what the operator grants one component.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ToolConfig {
    /// Refuse to load the file unless its sha256 is this (hex).
    pub sha256: Option<String>,
    /// Limits for this component's calls.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Directories to preopen.
    #[serde(default)]
    pub dirs: Vec<DirConfig>,
    /// Config values the component may read.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Database handles (names of `[databases.NAME]`) the component may open.
    #[serde(default)]
    pub databases: Vec<String>,
}

/// `[[tools.NAME.dirs]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirConfig {
    /// Path beneath `runtime.data_root`; `{tenant}` is replaced with the
    /// caller's tenant. Created if missing.
    pub path: String,
    /// Where the guest sees it (an absolute guest path such as `/notes`).
    pub guest: String,
    /// `ro` (default) or `rw`.
    #[serde(default = "default_mode")]
    pub mode: DirMode,
    /// For `rw`: the most MiB the directory may hold.
    pub quota_mib: Option<u64>,
}

fn default_mode() -> DirMode {
    DirMode::Ro
}

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The key, e.g. `tools.notes.dirs[0].path`.
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// A configuration that failed its checks.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML, or an unknown key or a wrong type.
    #[error("{origin} is not a valid Cordon config: {message}")]
    Parse {
        /// The file (or "the demo config").
        origin: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// Parsed, but some values are unusable.
    #[error("{origin} has {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The file.
        origin: String,
        /// Every problem found.
        problems: Vec<ConfigProblem>,
    },
}

/// Tenant ids: also directory names, so a strict character set.
pub fn valid_tenant_id(tenant: &str) -> bool {
    (1..=64).contains(&tenant.len())
        && tenant
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && !tenant.starts_with('-')
}

impl Config {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path
            .parent()
            .map(Path::to_owned)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| ".".into());
        Config::parse(&text, &path.display().to_string(), base)
    }

    /// The embedded demo configuration, relative to the working directory.
    pub fn demo() -> Result<Config, ConfigError> {
        Config::parse(DEMO_CONFIG, "the built-in demo config", ".".into())
    }

    /// Reads the file at `path` (or the demo config) without checking its
    /// values, for `cordon config check`, which reports every problem at
    /// once, including those of keys and certificates.
    pub fn read_unchecked(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (text, origin, base) = match path {
            Some(path) => (
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?,
                path.display().to_string(),
                path.parent()
                    .map(Path::to_owned)
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or_else(|| ".".into()),
            ),
            None => (
                DEMO_CONFIG.to_owned(),
                "the built-in demo config".to_owned(),
                PathBuf::from("."),
            ),
        };
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            origin,
            message: e.to_string(),
        })?;
        config.base_dir = base;
        Ok(config)
    }

    /// Parses and checks `text`; relative paths resolve against `base_dir`.
    pub fn parse(text: &str, origin: &str, base_dir: PathBuf) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        config.base_dir = base_dir;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                origin: origin.to_owned(),
                problems,
            })
        }
    }

    /// Everything wrong with this configuration (empty when it is usable).
    pub fn problems(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        let mut problem =
            |key: String, message: String| problems.push(ConfigProblem { key, message });
        let server = &self.server;
        if !valid_tenant_id(&server.local_tenant) {
            problem(
                "server.local_tenant".into(),
                "use 1-64 of a-z 0-9 _ - (it names a data directory)".into(),
            );
        }
        if server.max_body_bytes < 1024 {
            problem(
                "server.max_body_bytes".into(),
                "must be at least 1024".into(),
            );
        }
        if server.shutdown_grace_secs > 3600 {
            problem(
                "server.shutdown_grace_secs".into(),
                "must be at most 3600 (an hour)".into(),
            );
        }
        if server.max_sessions == 0 {
            problem("server.max_sessions".into(), "must be at least 1".into());
        }
        if server.keep_alive_secs == 0 || server.session_idle_secs == 0 {
            problem(
                "server.keep_alive_secs / server.session_idle_secs".into(),
                "must be at least 1 second".into(),
            );
        }
        if !(1..=600).contains(&server.header_timeout_secs) {
            problem(
                "server.header_timeout_secs".into(),
                "must be 1 to 600 seconds".into(),
            );
        }
        if !(1..=3600).contains(&server.body_timeout_secs) {
            problem(
                "server.body_timeout_secs".into(),
                "must be 1 to 3600 seconds".into(),
            );
        }
        for origin in &server.allowed_origins {
            if origin != "null" && !origin.contains("://") {
                problem(
                    "server.allowed_origins".into(),
                    format!("{origin:?} needs a scheme, e.g. \"https://{origin}\""),
                );
            }
        }
        for (key, message) in self.tenancy_problems() {
            problem(key, message);
        }
        let engine = &self.runtime.engine;
        if engine.max_instances == 0 {
            problem(
                "runtime.engine.max_instances".into(),
                "must be at least 1".into(),
            );
        }
        if engine.max_memory_mib == 0 || engine.max_memory_mib > 4096 {
            problem(
                "runtime.engine.max_memory_mib".into(),
                "must be between 1 and 4096".into(),
            );
        }
        if !(1..=1000).contains(&engine.epoch_tick_ms) {
            problem(
                "runtime.engine.epoch_tick_ms".into(),
                "must be between 1 and 1000".into(),
            );
        }
        if engine.keep_resident_kib > engine.max_memory_mib.saturating_mul(1024) {
            problem(
                "runtime.engine.keep_resident_kib".into(),
                format!(
                    "must be at most max_memory_mib ({} MiB = {} KiB)",
                    engine.max_memory_mib,
                    engine.max_memory_mib.saturating_mul(1024)
                ),
            );
        }
        let tools_dir = self.tools_dir();
        if !tools_dir.is_dir() {
            problem(
                "runtime.tools_dir".into(),
                format!(
                    "{} is not a directory; create it or point tools_dir at the directory holding your .wasm tools",
                    tools_dir.display()
                ),
            );
        }
        let check_limits = |key: &str, limits: &LimitsConfig| {
            let mut p = Vec::new();
            if let Some(m) = limits.memory_mib
                && (m == 0 || m > engine.max_memory_mib)
            {
                p.push((
                    format!("{key}.memory_mib"),
                    format!(
                        "{m} is outside 1..={} (runtime.engine.max_memory_mib)",
                        engine.max_memory_mib
                    ),
                ));
            }
            if limits.timeout_ms == Some(0) {
                p.push((format!("{key}.timeout_ms"), "must be at least 1".into()));
            }
            if limits.fuel.is_some() && !engine.fuel {
                p.push((
                    format!("{key}.fuel"),
                    "fuel limits need `fuel = true` in [runtime.engine]".into(),
                ));
            }
            if limits.max_handles == Some(0) {
                p.push((
                    format!("{key}.max_handles"),
                    "must be at least 1 (a tool needs a few handles for stdio)".into(),
                ));
            }
            p
        };
        let mut found = check_limits("limits", &self.limits);
        for (name, tool) in &self.tools {
            let key = format!("tools.{name}");
            found.extend(check_limits(&format!("{key}.limits"), &tool.limits));
            if let Some(pin) = &tool.sha256
                && (pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                found.push((
                    format!("{key}.sha256"),
                    "must be 64 hex digits (run `sha256sum FILE.wasm`)".into(),
                ));
            }
            let mut guests = Vec::new();
            for (i, dir) in tool.dirs.iter().enumerate() {
                let key = format!("{key}.dirs[{i}]");
                if let Err(e) = check_template(&dir.path) {
                    found.push((format!("{key}.path"), e));
                }
                if !dir.guest.starts_with('/') || dir.guest.split('/').any(|c| c == "..") {
                    found.push((
                        format!("{key}.guest"),
                        "must be an absolute guest path without `..`, e.g. \"/data\"".into(),
                    ));
                }
                if guests.contains(&&dir.guest) {
                    found.push((format!("{key}.guest"), "is granted twice".into()));
                }
                guests.push(&dir.guest);
                if dir.quota_mib.is_some() && dir.mode == DirMode::Ro {
                    found.push((
                        format!("{key}.quota_mib"),
                        "only applies to `mode = \"rw\"` grants; remove it".into(),
                    ));
                }
            }
        }
        found.extend(crate::db::config::problems(self));
        for (key, message) in found {
            problem(key, message);
        }
        problems
    }

    /// Problems of `[server]` security, `[auth]`, `[roles]`, `[tenants]`,
    /// `[admin]` and `[audit]`.
    fn tenancy_problems(&self) -> Vec<(String, String)> {
        let mut found: Vec<(String, String)> = Vec::new();
        let auth = &self.auth;
        let loopback = self.server.listen.ip().is_loopback();
        match auth.mode {
            AuthMode::None if !loopback => found.push((
                "auth.mode".into(),
                format!(
                    "\"none\" is only allowed on a loopback listener, not {}; configure [[auth.jwt_keys]] or [[auth.api_keys]]",
                    self.server.listen
                ),
            )),
            AuthMode::Tokens => {
                if auth.jwt_keys.is_empty() && auth.api_keys.is_empty() {
                    found.push((
                        "auth".into(),
                        "no credentials are configured: add [[auth.jwt_keys]] or [[auth.api_keys]], or set mode = \"none\" for local development".into(),
                    ));
                }
                if self.tenants.is_empty() {
                    found.push((
                        "tenants".into(),
                        "declare at least one tenant ([tenants.NAME] with its roles)".into(),
                    ));
                }
            }
            AuthMode::None => {}
        }
        if !loopback && self.server.tls.is_none() && !self.server.allow_plain_http {
            found.push((
                "server.tls".into(),
                format!(
                    "plain HTTP on {} would expose tokens: configure [server.tls] or, behind a TLS proxy on a private network, set server.allow_plain_http = true",
                    self.server.listen
                ),
            ));
        }
        for (name, role) in &self.roles {
            for (kind, patterns) in [("allow", &role.allow), ("deny", &role.deny)] {
                for pattern in patterns {
                    if let Err(e) = check_glob(pattern) {
                        found.push((format!("roles.{name}.{kind}"), format!("{pattern:?}: {e}")));
                    }
                }
            }
        }
        let ceiling = self.runtime.engine.max_memory_mib;
        for (id, tenant) in &self.tenants {
            let key = format!("tenants.{id}");
            if !valid_tenant_id(id) {
                found.push((
                    key.clone(),
                    "tenant ids use 1-64 of a-z 0-9 _ - (they name data directories)".into(),
                ));
            }
            for (name, role) in &tenant.roles {
                for (kind, patterns) in [("allow", &role.allow), ("deny", &role.deny)] {
                    for pattern in patterns {
                        if let Err(e) = check_glob(pattern) {
                            found.push((
                                format!("{key}.roles.{name}.{kind}"),
                                format!("{pattern:?}: {e}"),
                            ));
                        }
                    }
                }
            }
            let limits = &tenant.limits;
            if limits.max_concurrent_calls == Some(0) || limits.calls_per_minute == Some(0) {
                found.push((
                    format!("{key}.limits"),
                    "max_concurrent_calls and calls_per_minute must be at least 1 (remove the key for no limit)".into(),
                ));
            }
            if let Some(m) = limits.memory_mib
                && (m == 0 || m > ceiling)
            {
                found.push((
                    format!("{key}.limits.memory_mib"),
                    format!("{m} is outside 1..={ceiling} (runtime.engine.max_memory_mib)"),
                ));
            }
            if limits.timeout_ms == Some(0) {
                found.push((
                    format!("{key}.limits.timeout_ms"),
                    "must be at least 1".into(),
                ));
            }
        }
        let known_role = |tenant: &str, role: &str| {
            self.roles.contains_key(role)
                || self
                    .tenants
                    .get(tenant)
                    .is_some_and(|t| t.roles.contains_key(role))
        };
        for (i, key) in auth.api_keys.iter().enumerate() {
            if !self.tenants.contains_key(&key.tenant) {
                found.push((
                    format!("auth.api_keys[{i}].tenant"),
                    format!("tenant {:?} is not declared in [tenants]", key.tenant),
                ));
            }
            for role in &key.roles {
                if !known_role(&key.tenant, role) {
                    found.push((
                        format!("auth.api_keys[{i}].roles"),
                        format!(
                            "role {role:?} is not defined in [roles] or [tenants.{}.roles]",
                            key.tenant
                        ),
                    ));
                }
            }
        }
        if let Some(tenant) = &self.admin.tenant {
            if !self.tenants.contains_key(tenant) {
                found.push((
                    "admin.tenant".into(),
                    format!("tenant {tenant:?} is not declared in [tenants]"),
                ));
            } else if !known_role(tenant, &self.admin.role) {
                found.push((
                    "admin.role".into(),
                    format!("role {:?} is not defined for tenant {tenant:?} (define [tenants.{tenant}.roles.{}])", self.admin.role, self.admin.role),
                ));
            }
        }
        if auth.mode == AuthMode::None
            && !self.tenants.is_empty()
            && !self.tenants.contains_key(&self.server.local_tenant)
        {
            found.push((
                "server.local_tenant".into(),
                format!(
                    "with auth.mode = \"none\" and declared tenants, the local tenant {:?} must be declared too",
                    self.server.local_tenant
                ),
            ));
        }
        found.extend(self.audit.problems());
        found.extend(self.telemetry.problems());
        found
    }

    fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.base_dir.join(path)
        }
    }

    /// The tools directory, resolved.
    pub fn tools_dir(&self) -> PathBuf {
        self.resolve(&self.runtime.tools_dir)
    }

    /// The compile cache directory, resolved (`None` when disabled).
    pub fn cache_dir(&self) -> Option<PathBuf> {
        (!self.runtime.cache_dir.as_os_str().is_empty())
            .then(|| self.resolve(&self.runtime.cache_dir))
    }

    /// The data root, resolved.
    pub fn data_root(&self) -> PathBuf {
        self.resolve(&self.runtime.data_root)
    }

    /// Engine settings for the runtime.
    pub fn engine_settings(&self) -> EngineSettings {
        let e = &self.runtime.engine;
        EngineSettings {
            max_instances: e.max_instances,
            max_memory_bytes: e.max_memory_mib << 20,
            fuel: e.fuel,
            epoch_tick_ms: e.epoch_tick_ms,
            keep_resident_bytes: e.keep_resident_kib << 10,
            batch_calls: e.batch_calls,
        }
    }

    /// Where tools come from, with their pins.
    pub fn tool_source(&self) -> ToolSource {
        ToolSource {
            dir: self.tools_dir(),
            pins: self
                .tools
                .iter()
                .filter_map(|(name, t)| Some((name.clone(), t.sha256.clone()?)))
                .collect::<HashMap<_, _>>(),
            limits: self
                .tools
                .keys()
                .map(|name| (name.clone(), self.limits_for(name)))
                .collect(),
            default_limits: self.limits.apply(&Limits::default()),
        }
    }

    /// The limits of a call to a tool of `component`.
    pub fn limits_for(&self, component: &str) -> Limits {
        let defaults = self.limits.apply(&Limits::default());
        match self.tools.get(component) {
            Some(tool) => tool.limits.apply(&defaults),
            None => defaults,
        }
    }

    /// The grants of a call to a tool of `component` by `tenant`: directory
    /// templates resolved beneath the data root (and created), config values.
    pub fn grants_for(&self, component: &str, tenant: &str) -> Result<Grants, GrantError> {
        let Some(tool) = self.tools.get(component) else {
            return Ok(Grants::default());
        };
        if !valid_tenant_id(tenant) {
            return Err(GrantError::BadTenant(tenant.to_owned()));
        }
        let mut dirs = Vec::with_capacity(tool.dirs.len());
        for dir in &tool.dirs {
            let relative = dir.path.replace("{tenant}", tenant);
            let host_path = ensure_beneath(&self.data_root(), Path::new(&relative))?;
            dirs.push(DirGrant {
                host_path,
                guest_path: dir.guest.clone(),
                mode: dir.mode,
                quota_bytes: dir.quota_mib.map(|m| m << 20),
            });
        }
        let data_root = self.data_root();
        let databases = tool
            .databases
            .iter()
            .filter_map(|name| {
                let grant = self
                    .databases
                    .get(name)?
                    .resolve(name, tenant, &data_root)?;
                Some((name.clone(), grant))
            })
            .collect();
        Ok(Grants {
            dirs,
            config: tool.config.clone(),
            databases,
        })
    }
}

/// A grant that could not be prepared for a call.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    /// The tenant id is not safe to use in a path.
    #[error("tenant id `{0}` is not allowed (use 1-64 of a-z 0-9 _ -)")]
    BadTenant(String),
    /// The directory could not be created or would leave the data root.
    #[error("cannot prepare granted directory {path}: {source}")]
    Dir {
        /// The path beneath the data root.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Relative, no `..`, no absolute parts, only the `{tenant}` placeholder.
pub(crate) fn check_template(template: &str) -> Result<(), String> {
    let without = template.replace("{tenant}", "t");
    if without.contains(['{', '}']) {
        return Err("the only placeholder is {tenant}".into());
    }
    let path = Path::new(&without);
    if without.is_empty()
        || !path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(
            "must be a relative path beneath runtime.data_root without `..`, e.g. \"notes/{tenant}\""
                .into(),
        );
    }
    Ok(())
}

/// Creates `relative` beneath `root` with cap-std, which refuses to follow
/// `..`, absolute paths or symlinks out of `root`, and returns the host path.
fn ensure_beneath(root: &Path, relative: &Path) -> Result<PathBuf, GrantError> {
    let err = |source| GrantError::Dir {
        path: relative.to_owned(),
        source,
    };
    std::fs::create_dir_all(root).map_err(err)?;
    let root_dir =
        cap_std::fs::Dir::open_ambient_dir(root, cap_std::ambient_authority()).map_err(err)?;
    root_dir.create_dir_all(relative).map_err(err)?;
    // Opening it through the capability proves it resolves inside the root.
    root_dir.open_dir(relative).map_err(err)?;
    Ok(root.join(relative))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_must_stay_beneath_the_root() {
        assert!(check_template("notes/{tenant}").is_ok());
        assert!(check_template("../etc").is_err());
        assert!(check_template("/etc").is_err());
        assert!(check_template("a/{user}").is_err());
        assert!(check_template("").is_err());
    }

    #[test]
    fn tenant_ids_are_path_safe() {
        assert!(valid_tenant_id("acme-1"));
        for bad in ["", "..", "a/../b", "/abs", "A", "-x", "a b", "é"] {
            assert!(!valid_tenant_id(bad), "{bad:?} must be refused");
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = Config::parse("[runtime]\ntools_dri = \"x\"\n", "test", ".".into()).unwrap_err();
        assert!(err.to_string().contains("tools_dri"), "{err}");
    }

    #[test]
    fn the_body_timeout_must_be_positive() {
        assert_eq!(ServerConfig::default().body_timeout_secs, 30);
        let err =
            Config::parse("[server]\nbody_timeout_secs = 0\n", "test", ".".into()).unwrap_err();
        assert!(err.to_string().contains("body_timeout_secs"), "{err}");
    }

    #[test]
    fn symlinks_out_of_the_data_root_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("link")).unwrap();
        assert!(ensure_beneath(root.path(), Path::new("link/x")).is_err());
        assert!(ensure_beneath(root.path(), Path::new("ok/x")).is_ok());
    }
}
