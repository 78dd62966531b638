//! `[databases.NAME]`: the database handles the operator declares, their
//! checks, and their resolution for one tenant.
//!
//! ```toml
//! [databases.shop]                 # a SQLite file per tenant
//! kind = "sqlite"
//! path = "shop/{tenant}.db"        # beneath runtime.data_root; never created
//! timeout_ms = 2000
//! max_rows = 500
//!
//! [databases.crm]                  # PostgreSQL, one schema per tenant
//! kind = "postgres"
//! dsn_env = "CRM_DSN"              # or dsn_file = "/run/secrets/crm_dsn"
//! password_file = "/run/secrets/crm_password"
//! schema = "t_{tenant}"
//! tenants = ["acme", "globex"]     # absent: every tenant
//!
//! [tools.sql]
//! databases = ["shop", "crm"]
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{DbGrant, DbLimits, DbTarget};

/// The engine behind a handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DbKind {
    /// An SQLite file beneath `runtime.data_root`.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// `[databases.NAME]`: one named, read-only database handle.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite` or `postgres`.
    pub kind: DbKind,
    /// The tenants that may use this handle; absent means every tenant
    /// (each with its own `{tenant}` file or schema).
    pub tenants: Option<Vec<String>>,
    /// SQLite: the file, relative to `runtime.data_root`; `{tenant}` is
    /// replaced with the caller's tenant. Cordon never creates it.
    pub path: Option<String>,
    /// PostgreSQL: the environment variable holding the connection string
    /// (`host=... user=... dbname=...` or a `postgresql://` URL).
    pub dsn_env: Option<String>,
    /// PostgreSQL: a file holding the connection string (instead of `dsn_env`).
    pub dsn_file: Option<PathBuf>,
    /// PostgreSQL: the environment variable holding the password, if the
    /// connection string has none.
    pub password_env: Option<String>,
    /// PostgreSQL: a file holding the password (instead of `password_env`).
    pub password_file: Option<PathBuf>,
    /// PostgreSQL: the schema set as `search_path`; `{tenant}` is replaced
    /// with the caller's tenant (e.g. `"t_{tenant}"`).
    pub schema: Option<String>,
    /// PostgreSQL: connections in the pool (default 8).
    pub pool_size: Option<usize>,
    /// Query deadline in milliseconds (default 5000).
    pub timeout_ms: Option<u64>,
    /// The most rows a query returns (default 1000); more are cut off and
    /// the result is marked truncated.
    pub max_rows: Option<u64>,
    /// The most bytes of values a query returns (default 1 MiB).
    pub max_result_bytes: Option<u64>,
}

impl DatabaseConfig {
    /// The handle's limits, defaults filled in.
    pub fn limits(&self) -> DbLimits {
        let d = DbLimits::default();
        DbLimits {
            timeout: self.timeout_ms.map_or(d.timeout, Duration::from_millis),
            max_rows: self.max_rows.unwrap_or(d.max_rows),
            max_result_bytes: self.max_result_bytes.unwrap_or(d.max_result_bytes),
        }
    }

    /// Whether `tenant` may use this handle.
    pub fn allows(&self, tenant: &str) -> bool {
        self.tenants
            .as_ref()
            .is_none_or(|tenants| tenants.iter().any(|t| t == tenant))
    }

    /// The grant of this handle (named `name`) for `tenant`, or `None` when
    /// the tenant may not use it. `tenant` must already be a valid tenant id.
    pub fn resolve(&self, name: &str, tenant: &str, data_root: &Path) -> Option<DbGrant> {
        if !self.allows(tenant) {
            return None;
        }
        let target = match self.kind {
            DbKind::Sqlite => DbTarget::Sqlite {
                root: data_root.to_owned(),
                relative: self
                    .path
                    .as_deref()
                    .unwrap_or_default()
                    .replace("{tenant}", tenant)
                    .into(),
            },
            DbKind::Postgres => DbTarget::Postgres {
                handle: name.to_owned(),
                schema: self.schema.as_ref().map(|s| s.replace("{tenant}", tenant)),
            },
        };
        Some(DbGrant {
            target,
            limits: self.limits(),
        })
    }
}

/// Everything wrong with the `[databases]` table and the handles the tools
/// are granted (`tools.NAME.databases`), as `(key, message)` pairs.
pub fn problems(config: &crate::config::Config) -> Vec<(String, String)> {
    let handles = &config.databases;
    let mut found = Vec::new();
    let mut problem = |key: String, message: &str| found.push((key, message.to_owned()));
    for (name, db) in handles {
        let key = format!("databases.{name}");
        if !valid_handle_name(name) {
            problem(
                key.clone(),
                "handle names are 1-64 of a-z A-Z 0-9 _ - . (tools open handles by this name)",
            );
        }
        for tenant in db.tenants.iter().flatten() {
            if !crate::config::valid_tenant_id(tenant) {
                problem(
                    format!("{key}.tenants"),
                    "tenant ids are 1-64 of a-z 0-9 _ -",
                );
            } else if !config.tenants.is_empty() && !config.tenants.contains_key(tenant) {
                problem(
                    format!("{key}.tenants"),
                    "names a tenant that is not declared in [tenants]",
                );
            }
        }
        let postgres_only = [
            ("dsn_env", db.dsn_env.is_some()),
            ("dsn_file", db.dsn_file.is_some()),
            ("password_env", db.password_env.is_some()),
            ("password_file", db.password_file.is_some()),
            ("schema", db.schema.is_some()),
            ("pool_size", db.pool_size.is_some()),
        ];
        match db.kind {
            DbKind::Sqlite => {
                match &db.path {
                    None => problem(
                        format!("{key}.path"),
                        "a sqlite handle needs `path`, e.g. \"shop/{tenant}.db\" beneath runtime.data_root",
                    ),
                    Some(path) => {
                        if let Err(e) = crate::config::check_template(path) {
                            problem(format!("{key}.path"), &e);
                        }
                    }
                }
                for (field, set) in postgres_only {
                    if set {
                        problem(
                            format!("{key}.{field}"),
                            "only applies to `kind = \"postgres\"`; remove it",
                        );
                    }
                }
            }
            DbKind::Postgres => {
                if db.path.is_some() {
                    problem(
                        format!("{key}.path"),
                        "only applies to `kind = \"sqlite\"`; use dsn_env or dsn_file",
                    );
                }
                match (&db.dsn_env, &db.dsn_file) {
                    (None, None) => problem(
                        format!("{key}.dsn_env"),
                        "a postgres handle needs dsn_env or dsn_file (connection strings are never written in the config)",
                    ),
                    (Some(_), Some(_)) => problem(
                        format!("{key}.dsn_file"),
                        "give dsn_env or dsn_file, not both",
                    ),
                    _ => {}
                }
                if db.password_env.is_some() && db.password_file.is_some() {
                    problem(
                        format!("{key}.password_file"),
                        "give password_env or password_file, not both",
                    );
                }
                if let Some(schema) = &db.schema {
                    let filled = schema.replace("{tenant}", "t");
                    if filled.is_empty() || filled.len() > 63 || filled.contains(['{', '}', '"']) {
                        problem(
                            format!("{key}.schema"),
                            "a schema name of at most 63 characters; the only placeholder is {tenant}, e.g. \"t_{tenant}\"",
                        );
                    }
                }
                if db.pool_size.is_some_and(|n| !(1..=256).contains(&n)) {
                    problem(format!("{key}.pool_size"), "must be between 1 and 256");
                }
            }
        }
        if db.timeout_ms.is_some_and(|t| !(1..=3_600_000).contains(&t)) {
            problem(format!("{key}.timeout_ms"), "must be between 1 and 3600000");
        }
        if db.max_rows.is_some_and(|n| !(1..=10_000_000).contains(&n)) {
            problem(format!("{key}.max_rows"), "must be between 1 and 10000000");
        }
        if db
            .max_result_bytes
            .is_some_and(|n| !(1024..=1 << 30).contains(&n))
        {
            problem(
                format!("{key}.max_result_bytes"),
                "must be between 1024 and 1073741824",
            );
        }
    }
    for (tool, settings) in &config.tools {
        for (i, name) in settings.databases.iter().enumerate() {
            if !handles.contains_key(name) {
                problem(
                    format!("tools.{tool}.databases[{i}]"),
                    &format!("no handle `{name}` is declared; add a [databases.{name}] table"),
                );
            }
        }
    }
    found
}

fn valid_handle_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}
