//! Operating Cordon: metrics, readiness, graceful shutdown, config checks
//! and reload, and logs free of secrets. Each test runs the real binary.

mod common;

use std::time::Duration;

use common::ServeProcess;
use common::http::{Http, Reply};
use common::tenants::*;
use http::{Method, StatusCode};
use serde_json::json;

async fn get(server: &Http, path: &str, token: Option<&str>) -> Reply {
    let mut request = server.request(Method::GET, path);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    server.send(request, "").await
}

/// The value of the series `name` whose labels include every `labels` pair.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn metrics_count_calls_by_tenant_tool_and_outcome() {
    let setup = Setup::new("");
    let served = setup.serve();
    let server = &served.http;
    let acme = token("acme", &["viewer"]);
    let globex = token("globex", &["viewer"]);
    let admin = token("ops", &["admin"]);
    for i in 0..3 {
        let reply = call_as(
            server,
            &acme,
            "text_stats",
            json!({"text": format!("call {i}")}),
        )
        .await;
        assert_eq!(reply.json()["result"]["isError"], json!(false));
    }
    // A tool error, a denied call, an unknown tool, an auth failure.
    let reply = call_as(server, &acme, "json_pretty", json!({"json": "{not json"})).await;
    assert_eq!(
        reply.json()["result"]["isError"],
        json!(true),
        "{}",
        reply.body
    );
    call_as(server, &globex, "json_pretty", json!({"json": "{}"})).await;
    call_as(server, &globex, "text_stats", json!({"text": "ok"})).await;
    assert_eq!(
        list_with(server, Some("Bearer nope"), "/mcp").await.status,
        StatusCode::UNAUTHORIZED
    );

    // Only the admin role may scrape.
    assert_eq!(
        get(server, "/metrics", Some(&acme)).await.status,
        StatusCode::FORBIDDEN
    );
    let scraped = get(server, "/metrics", Some(&admin)).await;
    assert_eq!(scraped.status, StatusCode::OK);
    let text = &scraped.body;
    let calls = "cordon_tool_calls_total";
    assert_eq!(
        metric(
            text,
            calls,
            &[
                ("tenant", "acme"),
                ("tool", "text_stats"),
                ("outcome", "ok")
            ]
        ),
        3.0,
        "{text}"
    );
    assert_eq!(
        metric(
            text,
            calls,
            &[
                ("tenant", "acme"),
                ("tool", "json_pretty"),
                ("outcome", "tool_error")
            ]
        ),
        1.0
    );
    assert_eq!(
        metric(text, calls, &[("tenant", "globex"), ("outcome", "denied")]),
        1.0
    );
    assert_eq!(
        metric(
            text,
            calls,
            &[
                ("tenant", "globex"),
                ("tool", "text_stats"),
                ("outcome", "ok")
            ]
        ),
        1.0
    );
    assert_eq!(metric(text, calls, &[]), 6.0, "every call is counted once");
    assert_eq!(
        metric(
            text,
            "cordon_auth_failures_total",
            &[("reason", "unknown_api_key")]
        ),
        1.0
    );
    assert!(
        metric(
            text,
            "cordon_tool_call_duration_seconds_count",
            &[("phase", "total")]
        ) >= 6.0
    );
    assert!(
        metric(
            text,
            "cordon_tool_call_duration_seconds_count",
            &[("phase", "instantiate")]
        ) >= 4.0
    );
    assert!(metric(text, "cordon_compile_cache_total", &[]) >= 3.0);
    assert!(text.contains("cordon_sessions{transport=\"sse\"}"));
    assert!(text.contains("cordon_audit_write_seconds"));
    // No token, subject or argument leaks into labels.
    assert!(!text.contains(&acme) && !text.contains("acme-user") && !text.contains("call 0"));

    // Health and readiness need no token.
    assert_eq!(get(server, "/healthz", None).await.status, StatusCode::OK);
    assert_eq!(get(server, "/readyz", None).await.status, StatusCode::OK);
}

#[tokio::test]
async fn readiness_fails_when_no_tool_is_loaded() {
    let setup = Setup::new("");
    for entry in std::fs::read_dir(setup.dir.path().join("tools")).unwrap() {
        std::fs::remove_file(entry.unwrap().path()).unwrap();
    }
    let served = setup.serve();
    let reply = get(&served.http, "/readyz", None).await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.body
    );
    assert_eq!(
        get(&served.http, "/healthz", None).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn sigterm_lets_running_calls_finish_then_exits_cleanly() {
    let setup = Setup::new("[server]\nshutdown_grace_secs = 20\n");
    let mut served = setup.serve();
    let slow = token("acme", &["editor"]);
    let mut calls = Vec::new();
    for ms in [1500, 2500] {
        let base = served.http.base.clone();
        let slow = slow.clone();
        calls.push(tokio::spawn(async move {
            let http = Http::new(base);
            call_as(&http, &slow, "sleep_ms", json!({"ms": ms})).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    served.process.signal("TERM");
    for call in calls {
        let reply = call.await.unwrap();
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{}\n{}",
            reply.body,
            served.process.log()
        );
        assert_eq!(
            reply.json()["result"]["isError"],
            json!(false),
            "{}",
            reply.body
        );
    }
    served.process.expect_clean_exit(Duration::from_secs(20));
    cordon::audit::verify(&setup.audit_log()).expect("the audit chain verifies");
    let records = audit_records(&setup.audit_log(), 2);
    assert_eq!(
        records
            .iter()
            .filter(|r| r["tool"] == "sleep_ms" && r["outcome"] == "ok")
            .count(),
        2
    );
}

#[tokio::test]
async fn calls_past_the_grace_period_are_cancelled_and_recorded() {
    let setup = Setup::new("[server]\nshutdown_grace_secs = 1\n");
    let mut served = setup.serve();
    let slow = token("acme", &["editor"]);
    let base = served.http.base.clone();
    let call = tokio::spawn(async move {
        let http = Http::new(base);
        call_as(&http, &slow, "sleep_ms", json!({"ms": 30000})).await
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    let started = std::time::Instant::now();
    served.process.signal("TERM");
    served.process.expect_clean_exit(Duration::from_secs(15));
    assert!(started.elapsed() < Duration::from_secs(12));
    let _ = call.await;
    cordon::audit::verify(&setup.audit_log()).expect("the audit chain verifies");
    let records = audit_records(&setup.audit_log(), 1);
    assert!(
        records
            .iter()
            .any(|r| r["tool"] == "sleep_ms" && r["outcome"] == "cancelled"),
        "{records:?}"
    );
}

/// Configs that must not start, each with the key its message must name.
fn broken_configs() -> Vec<(&'static str, String, &'static str)> {
    vec![
        ("unknown key", "[server]\nlisten_on = \"127.0.0.1:1\"\n".into(), "listen_on"),
        ("not TOML", "[server\n".into(), "TOML"),
        ("wrong type", "[server]\nmax_sessions = \"many\"\n".into(), "max_sessions"),
        ("auth off on a public address", "[server]\nlisten = \"0.0.0.0:8750\"\n[auth]\nmode = \"none\"\n".into(), "auth.mode"),
        ("no credentials", "[auth]\nmode = \"tokens\"\n[tenants.a]\n".into(), "no credentials are configured"),
        ("tokens without tenants", "[[auth.api_keys]]\nname = \"k\"\nsha256 = \"00\"\ntenant = \"a\"\n".into(), "auth.api_keys[0]"),
        ("bad glob", "[auth]\nmode = \"none\"\n[roles.r]\nallow = [\"a[\"]\n".into(), "roles.r.allow"),
        ("bad local tenant id", "[server]\nlocal_tenant = \"X Y\"\n[auth]\nmode = \"none\"\n".into(), "server.local_tenant"),
        ("tenant id with a slash", "[auth]\nmode = \"none\"\n[tenants.\"a/b\"]\n".into(), "tenants.a/b"),
        ("memory over the ceiling", "[auth]\nmode = \"none\"\n[limits]\nmemory_mib = 100000\n".into(), "limits.memory_mib"),
        ("missing tools dir", "[auth]\nmode = \"none\"\n[runtime]\ntools_dir = \"nowhere\"\n".into(), "runtime.tools_dir"),
        ("grant escaping the data root", "[auth]\nmode = \"none\"\n[tools.notes]\ndirs = [{ path = \"../x\", guest = \"/x\" }]\n".into(), "tools.notes.dirs[0].path"),
        ("keeping more resident than a memory holds", "[auth]\nmode = \"none\"\n[runtime.engine]\nmax_memory_mib = 16\nkeep_resident_kib = 32768\n".into(), "runtime.engine.keep_resident_kib"),
        ("audit batch of 0 ms", "[auth]\nmode = \"none\"\n[audit]\nbatch_ms = 0\n".into(), "audit.batch_ms"),
        ("missing HS secret file", "[[auth.jwt_keys]]\nalgorithms = [\"HS256\"]\nsecret_file = \"missing.secret\"\n[tenants.a]\n".into(), "auth.jwt_keys[0]"),
        ("key without algorithms", "[[auth.jwt_keys]]\nsecret_env = \"X\"\n[tenants.a]\n".into(), "auth.jwt_keys[0]"),
        ("unreadable TLS certificate", "[auth]\nmode = \"none\"\n[server.tls]\ncert_file = \"no.pem\"\nkey_file = \"no.key\"\n".into(), "server.tls"),
        ("admin tenant not declared", "[auth]\nmode = \"none\"\n[admin]\ntenant = \"ops\"\n".into(), "admin.tenant"),
        ("plain HTTP on a public address", "[server]\nlisten = \"0.0.0.0:8750\"\n[[auth.api_keys]]\nname = \"k\"\nsha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\ntenant = \"a\"\n[tenants.a]\n".into(), "server.tls"),
    ]
}

#[test]
fn broken_configs_are_refused_with_their_key_and_nothing_starts() {
    for (name, text, key) in broken_configs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tools")).unwrap();
        let text = format!("[runtime]\ntools_dir = \"tools\"\nwatch = false\n{text}");
        // A table may appear once: drop our [runtime] when the case has one.
        let text = if text.matches("[runtime]").count() > 1 {
            text.replacen("[runtime]\ntools_dir = \"tools\"\nwatch = false\n", "", 1)
        } else {
            text
        };
        let config = dir.path().join("cordon.toml");
        std::fs::write(&config, &text).unwrap();
        let check = cordon_cmd()
            .args(["config", "check", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&check.stderr);
        assert!(
            !check.status.success(),
            "{name}: config check passed:\n{text}"
        );
        assert!(
            stderr.contains(key),
            "{name}: the message must name {key}:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        let serve = cordon_cmd()
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&serve.stderr);
        assert!(!serve.status.success(), "{name}: serve started");
        assert!(!stderr.contains("Cordon is serving"), "{name}: {stderr}");
        assert!(
            stderr.contains(key),
            "{name}: serve must name {key}:\n{stderr}"
        );
    }
}

fn cordon_cmd() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_cordon"))
}

#[tokio::test]
async fn sighup_applies_a_good_config_keeps_sessions_and_rejects_a_bad_one() {
    let setup = Setup::new("");
    let served = setup.serve();
    let server = &served.http;
    let viewer = token("acme", &["viewer"]);

    // A session opened before any reload.
    let reply = server
        .send(
            common::http::mcp_post(server).header("authorization", format!("Bearer {viewer}")),
            common::http::initialize_body("2025-06-18"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let session = reply.headers["mcp-session-id"].to_str().unwrap().to_owned();
    let list_in_session = || {
        server.send(
            common::http::mcp_post(server)
                .header("authorization", format!("Bearer {viewer}"))
                .header("mcp-session-id", session.clone())
                .header("mcp-protocol-version", "2025-06-18"),
            json!({"jsonrpc": "2.0", "id": 7, "method": "tools/list"}).to_string(),
        )
    };
    let names = |reply: &Reply| -> Vec<String> {
        reply.json()["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let before = names(&list_in_session().await);
    assert!(before.contains(&"text_stats".to_owned()), "{before:?}");

    // A broken config: refused, the old one keeps serving.
    let good = std::fs::read_to_string(setup.config()).unwrap();
    std::fs::write(
        setup.config(),
        format!("{good}\n[limits]\nmemory_mib = 0\n"),
    )
    .unwrap();
    served.process.signal("HUP");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        served.process.log().contains("NOT reloaded"),
        "{}",
        served.process.log()
    );
    assert_eq!(names(&list_in_session().await), before);

    // A good one that narrows `viewer`: applied, same session.
    let narrowed = good.replace(
        "[roles.viewer]\nallow = [\"text_*\", \"json_*\", \"list_notes\"]",
        "[roles.viewer]\nallow = [\"json_*\"]",
    );
    assert_ne!(narrowed, good);
    std::fs::write(setup.config(), narrowed).unwrap();
    served.process.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = list_in_session().await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "the session survives: {}",
            reply.body
        );
        let now = names(&reply);
        if !now.contains(&"text_stats".to_owned()) {
            assert!(now.contains(&"json_pretty".to_owned()), "{now:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new policy never applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let denied = call_as(server, &viewer, "text_stats", json!({"text": "x"})).await;
    assert!(denied.json()["error"].is_object(), "{}", denied.body);
}

#[tokio::test]
async fn the_log_of_a_full_run_holds_no_token_or_secret() {
    let setup = Setup::new("");
    let process = ServeProcess::start(&setup.config(), &[("RUST_LOG", "trace")]);
    let base = process.url.strip_suffix("/mcp").unwrap().to_owned();
    let server = Http::new(base);
    let editor = token("acme", &["editor"]);
    let secret_text = "a-secret-argument-value-4711";
    for (token, tool) in [
        (editor.as_str(), "write_note"),
        (API_KEY, "text_stats"),
        ("wrong-token-value-123", "text_stats"),
    ] {
        call_as(
            &server,
            token,
            tool,
            json!({"name": "n", "content": secret_text, "text": secret_text}),
        )
        .await;
    }
    let _ = list_with(
        &server,
        Some(&format!("Bearer {editor}")),
        "/mcp?access_token=query-token-value",
    )
    .await;
    // Arguments that fail the input schema: the error names the place and
    // the problem, not the value.
    let invalid = call_as(
        &server,
        &editor,
        "text_stats",
        json!({"text": {"password": secret_text}}),
    )
    .await;
    assert_eq!(invalid.json()["error"]["code"], -32602, "{}", invalid.body);
    assert!(!invalid.body.contains(secret_text), "{}", invalid.body);
    // A tool name no tool can have is cut before the log and the record.
    let long_name = format!("{}-name-marker-0815", "a".repeat(200));
    let unknown = call_as(&server, &editor, &long_name, json!({})).await;
    assert!(unknown.json()["error"].is_object(), "{}", unknown.body);
    // What a client says about itself when it opens a session.
    let mut initialize: serde_json::Value =
        serde_json::from_str(&common::http::initialize_body("2025-11-25")).unwrap();
    initialize["params"]["clientInfo"]["name"] = json!("client-info-marker-4712");
    let opened = server
        .send(
            common::http::mcp_post(&server).header("authorization", format!("Bearer {editor}")),
            initialize.to_string(),
        )
        .await;
    assert_eq!(opened.status, StatusCode::OK, "{}", opened.body);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = process.log();
    assert!(log.len() > 1000, "trace logging is on: {log}");
    for secret in [
        editor.as_str(),
        API_KEY,
        HS_SECRET,
        "wrong-token-value-123",
        "query-token-value",
        secret_text,
        "name-marker-0815",
        "client-info-marker-4712",
    ] {
        let leak: Vec<&str> = log.lines().filter(|l| l.contains(secret)).collect();
        assert!(leak.is_empty(), "the log holds {secret:?}: {leak:#?}");
    }
}

#[test]
fn config_check_reports_every_problem_at_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("tools")).unwrap();
    let config = dir.path().join("cordon.toml");
    std::fs::write(
        &config,
        "[runtime]\ntools_dir = \"tools\"\n[limits]\nmemory_mib = 0\n\
         [[auth.jwt_keys]]\nalgorithms = [\"HS256\"]\nsecret_file = \"missing.secret\"\n\
         [tenants.a]\n[databases.shop]\nkind = \"sqlite\"\npath = \"shop.db\"\ntenants = [\"b\"]\n",
    )
    .unwrap();
    let out = cordon_cmd()
        .args(["config", "check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for key in [
        "limits.memory_mib",
        "auth.jwt_keys[0]",
        "databases.shop.tenants",
    ] {
        assert!(stderr.contains(key), "{key} is reported:\n{stderr}");
    }
}

// Multi-threaded: the collector must answer while the test blocks waiting
// for the server to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_go_to_an_otlp_collector_under_the_clients_traceparent() {
    // A stand-in OTLP/HTTP collector: it keeps every body POSTed to /v1/traces.
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let sink = received.clone();
    let collector = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().extend_from_slice(&body);
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, collector).await });

    let setup = Setup::new(&format!(
        "[telemetry]\notlp_endpoint = \"http://{collector_addr}/v1/traces\"\nservice_name = \"cordon-under-test\"\n"
    ));
    let mut served = setup.serve();
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let mut body: serde_json::Value = serde_json::from_str(&common::http::stateless_body(
        1,
        "tools/call",
        json!({"name": "text_stats", "arguments": {"text": "traced"}}),
    ))
    .unwrap();
    body["params"]["_meta"]["traceparent"] = json!(format!("00-{trace_id}-{parent_id}-01"));
    let reply = served
        .http
        .send(
            common::http::stateless(&served.http, "tools/call", Some("text_stats")).header(
                "authorization",
                format!("Bearer {}", token("acme", &["viewer"])),
            ),
            body.to_string(),
        )
        .await;
    assert_eq!(
        reply.json()["result"]["isError"],
        json!(false),
        "{}",
        reply.body
    );

    // Shutting down sends the batched spans.
    served.process.signal("TERM");
    served.process.expect_clean_exit(Duration::from_secs(20));
    let received = received.lock().unwrap().clone();
    let contains = |needle: &[u8]| received.windows(needle.len()).any(|w| w == needle);
    assert!(
        !received.is_empty(),
        "the collector got nothing\n{}",
        served.process.log()
    );
    assert!(contains(b"tool_call"), "the call's span is exported");
    assert!(
        contains(b"cordon-under-test"),
        "with the configured service name"
    );
    assert!(
        contains(&hex::decode(trace_id).unwrap()),
        "inside the client's trace"
    );
    assert!(
        contains(&hex::decode(parent_id).unwrap()),
        "under the client's span"
    );
}
