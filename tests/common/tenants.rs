//! A multi-tenant Cordon for tests: a config with authentication on (HS256
//! and RS256 keys, an API key), 2+ tenants × 3 roles, quotas and an admin
//! tenant; tokens for it; and helpers to call it over HTTP or with the
//! Python SDK.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::http::{Http, Reply, stateless, stateless_body};
use super::{ServeProcess, guest, shared_cache_dir, workspace_root};

pub const ISSUER: &str = "cordon-test";
pub const AUDIENCE: &str = "cordon-tests";
pub const HS_SECRET: &str = "an-hs256-test-secret-that-is-long-enough-0123456789";
pub const API_KEY: &str = "ck_test_0123456789abcdef";

/// 2 tenants × 3 roles, over text, notes and conformance tools. `globex`
/// redefines two roles; `deny` wins over `allow`.
pub const POLICY: &str = r#"
[roles.viewer]
allow = ["text_*", "json_*", "list_notes"]

[roles.editor]
allow = ["*"]
deny = ["delete_*"]

[roles.auditor]
allow = ["list_notes"]

[tenants.acme]

[tenants.globex.roles.viewer]
allow = ["text_stats"]

[tenants.globex.roles.editor]
allow = ["*_note", "list_notes"]
deny = ["write_*"]

[tenants.slow.roles.worker]
allow = ["sleep_ms", "echo"]

[tenants.slow.limits]
max_concurrent_calls = 1

[tenants.metered.roles.worker]
allow = ["echo"]

[tenants.metered.limits]
calls_per_minute = 3

[tenants.ops.roles.admin]
allow = []

[admin]
tenant = "ops"
role = "admin"

[tools.notes]
dirs = [{ path = "notes/{tenant}", guest = "/notes", mode = "rw", quota_mib = 4 }]

[tools.conformance.limits]
timeout_ms = 60000
"#;

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn keys_dir() -> PathBuf {
    workspace_root().join("tests/keys")
}

/// A Cordon config with authentication on, in a temp dir with the tools.
pub struct Setup {
    pub dir: tempfile::TempDir,
}

impl Setup {
    pub fn new(extra: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let tools = dir.path().join("tools");
        std::fs::create_dir_all(&tools).unwrap();
        for g in ["text", "notes", "conformance"] {
            std::fs::copy(guest(g), tools.join(format!("{g}.wasm"))).unwrap();
        }
        std::fs::write(dir.path().join("hs.secret"), HS_SECRET).unwrap();
        let api_key_hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(API_KEY));
        let config = format!(
            r#"[runtime]
tools_dir = "tools"
data_root = "data"
cache_dir = {cache:?}
watch = false

[auth]
issuer = "{ISSUER}"
audience = ["{AUDIENCE}"]

[[auth.jwt_keys]]
kid = "hs"
algorithms = ["HS256"]
secret_file = "hs.secret"

[[auth.jwt_keys]]
kid = "rs"
algorithms = ["RS256"]
public_key_file = {rsa:?}

[[auth.api_keys]]
name = "ci"
sha256 = "{api_key_hash}"
tenant = "acme"
roles = ["viewer"]

{extra}
{POLICY}
"#,
            cache = shared_cache_dir(),
            rsa = keys_dir().join("rsa-public.pem"),
        );
        let audit = if extra.contains("[audit]") {
            ""
        } else {
            "[audit]\npath = \"audit.jsonl\"\n"
        };
        std::fs::write(dir.path().join("cordon.toml"), config + audit).unwrap();
        Setup { dir }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("cordon.toml")
    }

    pub fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    pub fn serve(&self) -> Served {
        let process = ServeProcess::start(&self.config(), &[]);
        let base = process.url.strip_suffix("/mcp").unwrap().to_owned();
        Served {
            http: Http::new(base),
            process,
        }
    }
}

pub struct Served {
    pub http: Http,
    pub process: ServeProcess,
}

/// Claims of a well-formed token for `tenant` with `roles`.
pub fn claims(tenant: &str, roles: &[&str]) -> Value {
    json!({
        "sub": format!("{tenant}-user"),
        "tenant": tenant,
        "roles": roles,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now(),
        "exp": now() + 600,
    })
}

pub fn hs256(kid: Option<&str>, claims: &Value, secret: &[u8]) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).unwrap()
}

pub fn rs256(claims: &Value) -> String {
    let pem = std::fs::read(keys_dir().join("rsa-private.pem")).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rs".into());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
}

pub fn token(tenant: &str, roles: &[&str]) -> String {
    hs256(Some("hs"), &claims(tenant, roles), HS_SECRET.as_bytes())
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A stateless `tools/list` with `authorization` (if any) on `path`.
pub async fn list_with(server: &Http, authorization: Option<&str>, path: &str) -> Reply {
    let mut request = stateless(server, "tools/list", None).uri(format!("{}{path}", server.base));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    server
        .send(request, stateless_body(1, "tools/list", json!({})))
        .await
}

/// A stateless `tools/call` as `token`.
pub async fn call_as(server: &Http, token: &str, tool: &str, arguments: Value) -> Reply {
    server
        .send(
            stateless(server, "tools/call", Some(tool))
                .header("authorization", format!("Bearer {token}")),
            stateless_body(
                1,
                "tools/call",
                json!({"name": tool, "arguments": arguments}),
            ),
        )
        .await
}

/// The audit records, once the batched writer has caught up with `min`.
pub fn audit_records(path: &Path, min: usize) -> Vec<Value> {
    audit_records_until(path, |records| records.len() >= min)
}

/// The audit records, once `done` holds for them (or after 10 s): for a
/// record that follows others, whose count alone says nothing.
pub fn audit_records_until(path: &Path, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let records: Vec<Value> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if done(&records) || std::time::Instant::now() > deadline {
            return records;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn cordon() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cordon"))
}

pub fn python() -> PathBuf {
    let python = workspace_root().join(".ci/cache/python/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `scripts/install-python-deps`",
        python.display()
    );
    python
}

/// Runs the Python SDK client on `spec`; one JSON object per principal.
pub fn python_client(spec: &Value) -> Vec<Value> {
    let spec_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(spec_file.path(), spec.to_string()).unwrap();
    let out = Command::new(python())
        .arg(workspace_root().join("tests/clients/tenancy_client.py"))
        .arg(spec_file.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
