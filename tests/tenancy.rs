//! Many tenants, one process: authentication, RBAC, isolation, quotas, the
//! audit chain and TLS, against the real `cordon serve` binary with real
//! tokens, a real MCP client (the Python SDK) and real HTTP.

mod common;

use std::path::Path;
use std::time::Duration;

use common::http::{Http, initialize_body, mcp_post, stateless, stateless_body};
use common::tenants::*;
use http::{Method, StatusCode};
use serde_json::{Value, json};

#[tokio::test]
async fn every_token_attack_gets_401_and_an_audit_record() {
    let setup = Setup::new("");
    let served = setup.serve();
    let server = &served.http;

    let good = claims("acme", &["viewer"]);
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut c = good.clone();
        edit(&mut c);
        hs256(Some("hs"), &c, HS_SECRET.as_bytes())
    };
    let header_none = b64(br#"{"alg":"none","typ":"JWT","kid":"hs"}"#);
    let payload = b64(good.to_string().as_bytes());
    let rsa_public = std::fs::read(keys_dir().join("rsa-public.pem")).unwrap();
    let valid = token("acme", &["viewer"]);
    // Change the signature's first character: the last one also carries
    // padding bits, and a strict base64url decoder rejects most changes there
    // as malformed before any signature is checked.
    let signature_start = valid.rfind('.').unwrap() + 1;
    let first = &valid[signature_start..=signature_start];
    let bad_signature = format!(
        "{}{}{}",
        &valid[..signature_start],
        if first == "A" { "B" } else { "A" },
        &valid[signature_start + 1..]
    );

    let cases: Vec<(&str, Option<String>, &str, &str)> = vec![
        ("no token", None, "", "missing"),
        (
            "malformed",
            Some("Bearer not-a-jwt.at.all".into()),
            "",
            "malformed",
        ),
        (
            "not bearer",
            Some(format!("Basic {valid}")),
            "",
            "not_bearer",
        ),
        (
            "bad signature",
            Some(format!("Bearer {bad_signature}")),
            "",
            "bad_signature",
        ),
        (
            "alg none",
            Some(format!("Bearer {header_none}.{payload}.")),
            "",
            "malformed",
        ),
        (
            "HS256 signed with the RSA public key",
            Some(format!("Bearer {}", hs256(Some("rs"), &good, &rsa_public))),
            "",
            "algorithm_not_allowed",
        ),
        (
            "expired",
            Some(format!(
                "Bearer {}",
                with(&|c| {
                    c["exp"] = json!(now() - 3600);
                })
            )),
            "",
            "expired",
        ),
        (
            "not yet valid",
            Some(format!(
                "Bearer {}",
                with(&|c| {
                    c["nbf"] = json!(now() + 3600);
                })
            )),
            "",
            "not_yet_valid",
        ),
        (
            "wrong audience",
            Some(format!(
                "Bearer {}",
                with(&|c| {
                    c["aud"] = json!("someone-else");
                })
            )),
            "",
            "wrong_audience",
        ),
        (
            "wrong issuer",
            Some(format!(
                "Bearer {}",
                with(&|c| {
                    c["iss"] = json!("evil");
                })
            )),
            "",
            "wrong_issuer",
        ),
        (
            "unknown kid",
            Some(format!(
                "Bearer {}",
                hs256(Some("nope"), &good, HS_SECRET.as_bytes())
            )),
            "",
            "unknown_kid",
        ),
        (
            "missing tenant claim",
            Some(format!(
                "Bearer {}",
                with(&|c| {
                    c.as_object_mut().unwrap().remove("tenant");
                })
            )),
            "",
            "missing_tenant",
        ),
        (
            "missing subject",
            Some(format!(
                "Bearer {}",
                with(&|c| {
                    c.as_object_mut().unwrap().remove("sub");
                })
            )),
            "",
            "missing_claim",
        ),
        (
            "unknown API key",
            Some("Bearer ck_test_wrong".into()),
            "",
            "unknown_api_key",
        ),
        (
            "token in the query string",
            None,
            "?access_token=whatever",
            "token_in_query",
        ),
        (
            "token in the query string, with a valid header too",
            Some(format!("Bearer {valid}")),
            "?token=x",
            "token_in_query",
        ),
        (
            "token in the query string, its name percent-encoded",
            Some(format!("Bearer {valid}")),
            "?x=1&access%5Ftoken=x",
            "token_in_query",
        ),
    ];
    for (name, authorization, query, _) in &cases {
        let reply = list_with(server, authorization.as_deref(), &format!("/mcp{query}")).await;
        assert_eq!(
            reply.status,
            StatusCode::UNAUTHORIZED,
            "{name}: {}",
            reply.body
        );
        let challenge = reply.headers["www-authenticate"].to_str().unwrap();
        assert!(
            challenge.starts_with("Bearer resource_metadata=\"http://")
                && challenge.contains("/.well-known/oauth-protected-resource"),
            "{name}: {challenge}"
        );
        if authorization.is_some() {
            assert!(challenge.contains("error="), "{name}: {challenge}");
        }
    }
    // The same through the classic SSE transport.
    let reply = server.send(server.request(Method::GET, "/sse"), "").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);

    // A valid token, an RS256 token and the API key pass.
    for good in [
        format!("Bearer {valid}"),
        format!("Bearer {}", rs256(&claims("acme", &["viewer"]))),
        format!("Bearer {API_KEY}"),
    ] {
        let reply = list_with(server, Some(&good), "/mcp").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    }

    // Each attack left a record saying why.
    let records = audit_records(&setup.audit_log(), cases.len() + 1);
    let reasons: Vec<&str> = records
        .iter()
        .filter(|r| r["event"] == "auth_failure")
        .filter_map(|r| r["reason"].as_str())
        .collect();
    for (name, _, _, reason) in &cases {
        assert!(
            reasons.contains(reason),
            "{name}: no auth_failure record with reason {reason}; got {reasons:?}"
        );
    }
    let log = served.process.log();
    assert!(!log.contains(&valid), "a token reached the log");

    // RFC 9728 metadata is public.
    let reply = server
        .send(
            server.request(Method::GET, "/.well-known/oauth-protected-resource/mcp"),
            "",
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.json()["resource"].as_str().unwrap().ends_with("/mcp"));
}

/// The calls of the RBAC matrix, with valid arguments.
fn matrix_calls() -> Value {
    json!([
        {"tool": "text_stats", "arguments": {"text": "a b c"}},
        {"tool": "json_pretty", "arguments": {"json": "{\"a\":1}"}},
        {"tool": "list_notes", "arguments": {}},
        {"tool": "write_note", "arguments": {"name": "rbac", "content": "x"}},
        {"tool": "delete_note", "arguments": {"name": "rbac"}},
        {"tool": "no_such_tool", "arguments": {}},
    ])
}

#[tokio::test]
async fn rbac_matrix_agrees_with_the_policy_through_the_python_sdk() {
    let setup = Setup::new("");
    let served = setup.serve();
    // What each (tenant, role) may use, of the matrix's five tools.
    let expected: &[(&str, &str, &[&str])] = &[
        (
            "acme",
            "viewer",
            &["json_pretty", "list_notes", "text_stats"],
        ),
        (
            "acme",
            "editor",
            &["json_pretty", "list_notes", "text_stats", "write_note"],
        ),
        ("acme", "auditor", &["list_notes"]),
        ("globex", "viewer", &["text_stats"]),
        ("globex", "editor", &["delete_note", "list_notes"]),
        ("globex", "auditor", &["list_notes"]),
    ];
    let principals: Vec<Value> = expected
        .iter()
        .map(|(tenant, role, _)| {
            json!({"label": format!("{tenant}/{role}"), "token": token(tenant, &[role])})
        })
        .collect();
    let results = python_client(&json!({
        "url": format!("{}/mcp", served.http.base),
        "transport": "streamable",
        "principals": principals,
        "calls": matrix_calls(),
    }));
    assert_eq!(results.len(), expected.len());
    let matrix_tools = [
        "text_stats",
        "json_pretty",
        "list_notes",
        "write_note",
        "delete_note",
    ];
    for ((tenant, role, allowed), result) in expected.iter().zip(&results) {
        let label = format!("{tenant}/{role}");
        let listed: Vec<&str> = result["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .filter(|t| matrix_tools.contains(t))
            .collect();
        let mut want: Vec<&str> = allowed.to_vec();
        want.sort();
        let mut got = listed.clone();
        got.sort();
        assert_eq!(got, want, "{label}: tools/list");
        let unknown = &result["calls"]["no_such_tool"];
        for tool in matrix_tools {
            let call = &result["calls"][tool];
            if allowed.contains(&tool) {
                assert!(
                    call["code"].is_null(),
                    "{label}: {tool} must be callable: {call}"
                );
            } else {
                // Exactly what an unknown tool gets, but for the name.
                assert_eq!(call["code"], unknown["code"], "{label}: {tool}: {call}");
                assert_eq!(
                    call["message"].as_str().unwrap().replace(tool, "X"),
                    unknown["message"]
                        .as_str()
                        .unwrap()
                        .replace("no_such_tool", "X"),
                    "{label}: {tool} must look like an unknown tool"
                );
            }
        }
    }
    // Every refused call is audited as denied.
    let records = audit_records(&setup.audit_log(), 36);
    let denied = records
        .iter()
        .filter(|r| r["event"] == "call" && r["outcome"] == "denied" && r["tool"] != "no_such_tool")
        .count();
    let refused: usize = expected.iter().map(|(_, _, a)| 5 - a.len()).sum();
    assert_eq!(denied, refused, "denied call records");
}

#[tokio::test]
async fn tenants_are_isolated_and_sessions_cannot_be_hijacked() {
    let setup = Setup::new("");
    let served = setup.serve();
    let server = &served.http;
    let acme = token("acme", &["editor"]);
    let globex = token("globex", &["editor"]);

    // The same notes tool, two tenants, two folders.
    let reply = call_as(
        server,
        &acme,
        "write_note",
        json!({"name": "secret", "content": "acme only"}),
    )
    .await;
    assert_eq!(
        reply.json()["result"]["isError"],
        json!(false),
        "{}",
        reply.body
    );
    let reply = call_as(server, &globex, "list_notes", json!({})).await;
    let listed = reply.json()["result"].to_string();
    assert!(
        !listed.contains("secret"),
        "globex sees acme's note: {listed}"
    );
    let reply = call_as(server, &acme, "list_notes", json!({})).await;
    assert!(reply.json()["result"].to_string().contains("secret"));
    assert!(
        std::fs::read_dir(setup.dir.path().join("data/notes/acme"))
            .unwrap()
            .next()
            .is_some(),
        "acme's note is in acme's folder"
    );

    // Tenant claims that are paths, or undeclared, are refused.
    for tenant in ["..", "a/../b", "/etc", "undeclared", "ACME"] {
        let bad = hs256(
            Some("hs"),
            &claims(tenant, &["editor"]),
            HS_SECRET.as_bytes(),
        );
        let reply = list_with(server, Some(&format!("Bearer {bad}")), "/mcp").await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "tenant {tenant:?}");
    }
    assert!(!setup.dir.path().join("data/notes/undeclared").exists());
    // A token with no role its tenant defines: 403 insufficient_scope.
    let reply = list_with(
        server,
        Some(&format!("Bearer {}", token("acme", &["nobody"]))),
        "/mcp",
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert!(
        reply.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("insufficient_scope")
    );

    // Streamable HTTP: a session opened by acme is not globex's.
    let reply = server
        .send(
            mcp_post(server).header("authorization", format!("Bearer {acme}")),
            initialize_body("2025-06-18"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let session = reply.headers["mcp-session-id"].to_str().unwrap().to_owned();
    let ping = json!({"jsonrpc": "2.0", "id": 2, "method": "ping"}).to_string();
    let as_ = |token: &str| {
        mcp_post(server)
            .header("authorization", format!("Bearer {token}"))
            .header("mcp-session-id", session.clone())
            .header("mcp-protocol-version", "2025-06-18")
    };
    assert_eq!(
        server.send(as_(&globex), ping.clone()).await.status,
        StatusCode::NOT_FOUND
    );
    assert_ne!(
        server.send(as_(&acme), ping.clone()).await.status,
        StatusCode::NOT_FOUND
    );

    // HTTP+SSE: the same for the message endpoint.
    let uri: http::Uri = format!("{}/sse", server.base).parse().unwrap();
    let response = server
        .client
        .request(
            http::Request::get(uri)
                .header("authorization", format!("Bearer {acme}"))
                .body(String::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = axum::body::Body::new(response.into_body()).into_data_stream();
    let endpoint = loop {
        use futures::StreamExt as _;
        let data = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&data).into_owned();
        if let Some(line) = text.lines().find_map(|l| l.strip_prefix("data: ")) {
            break line.trim().to_owned();
        }
    };
    let post = |token: &str| {
        server
            .request(Method::POST, &endpoint)
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {token}"))
    };
    assert_eq!(
        server.send(post(&globex), ping.clone()).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        server
            .send(post(&acme), initialize_body("2024-11-05"))
            .await
            .status,
        StatusCode::ACCEPTED
    );

    // Earlier calls have records already: wait for this one.
    let hijack = |records: &[Value]| {
        records
            .iter()
            .any(|r| r["reason"] == "session_of_another_caller")
    };
    assert!(
        hijack(&audit_records_until(&setup.audit_log(), hijack)),
        "the hijack attempt is audited"
    );
}

#[tokio::test]
async fn quotas_refuse_one_tenant_while_another_is_served() {
    let setup = Setup::new("");
    let served = setup.serve();
    let server = &served.http;
    let slow = token("slow", &["worker"]);
    let metered = token("metered", &["worker"]);
    let acme = token("acme", &["editor"]);

    // `slow` may run one call at a time: hold one, the next is refused.
    let base = server.base.clone();
    let holder = {
        let slow = slow.clone();
        tokio::spawn(async move {
            let http = Http::new(base);
            call_as(&http, &slow, "sleep_ms", json!({"ms": 3000})).await
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let refused = call_as(server, &slow, "echo", json!({"message": "hi"})).await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.body
    );
    assert_eq!(refused.json()["error"]["code"], -32029);
    // Meanwhile another tenant is served normally.
    let other = call_as(server, &acme, "text_stats", json!({"text": "still served"})).await;
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(other.json()["result"]["isError"], json!(false));
    let held = holder.await.unwrap();
    assert_eq!(held.status, StatusCode::OK, "{}", held.body);
    let again = call_as(server, &slow, "echo", json!({"message": "hi"})).await;
    assert_eq!(
        again.status,
        StatusCode::OK,
        "the slot is free again: {}",
        again.body
    );

    // `metered` may make 3 calls a minute.
    for i in 0..3 {
        let reply = call_as(server, &metered, "echo", json!({"message": i.to_string()})).await;
        assert_eq!(reply.status, StatusCode::OK, "call {i}: {}", reply.body);
    }
    let over = call_as(server, &metered, "echo", json!({"message": "4"})).await;
    assert_eq!(over.status, StatusCode::TOO_MANY_REQUESTS);
    let other = call_as(server, &acme, "text_stats", json!({"text": "x"})).await;
    assert_eq!(other.status, StatusCode::OK);

    let records = audit_records(&setup.audit_log(), 8);
    let quota: Vec<_> = records.iter().filter(|r| r["event"] == "quota").collect();
    assert_eq!(quota.len(), 2, "both refusals are audited: {quota:?}");
    assert!(quota.iter().any(|r| r["tenant"] == "slow"));
    assert!(quota.iter().any(|r| r["tenant"] == "metered"));
}

#[tokio::test]
async fn the_admin_surface_is_for_the_admin_role_only() {
    let setup = Setup::new("");
    let served = setup.serve();
    let server = &served.http;
    let get = |path: &str, token: &str| {
        server
            .request(Method::GET, path)
            .header("authorization", format!("Bearer {token}"))
    };
    let editor = token("acme", &["editor"]);
    let admin = token("ops", &["admin"]);
    for path in ["/admin/tenants", "/admin/audit/tail", "/admin/audit/verify"] {
        assert_eq!(
            server.send(get(path, &editor), "").await.status,
            StatusCode::FORBIDDEN,
            "{path}"
        );
        let reply = server.send(get(path, &admin), "").await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.body);
    }
    let tenants = server.send(get("/admin/tenants", &admin), "").await.json();
    assert_eq!(
        tenants["tenants"]["globex"]["roles"]["viewer"],
        json!(["text_stats"])
    );
    let reload = server
        .send(
            server
                .request(Method::POST, "/admin/reload")
                .header("authorization", format!("Bearer {admin}")),
            "",
        )
        .await;
    assert_eq!(reload.status, StatusCode::OK);
    assert_eq!(
        server
            .send(get("/admin/tenants", "garbage"), "")
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn foreign_hosts_and_origins_are_refused_everywhere_but_the_probes() {
    let setup = Setup::new("");
    let served = setup.serve();
    let server = &served.http;
    let admin = token("ops", &["admin"]);
    let as_admin = |method: Method, path: &str| {
        server
            .request(method, path)
            .header("authorization", format!("Bearer {admin}"))
    };
    let routes = [
        (Method::GET, "/admin/tenants"),
        (Method::GET, "/admin/audit/tail"),
        (Method::POST, "/admin/reload"),
        (Method::GET, "/metrics"),
        (Method::GET, "/.well-known/oauth-protected-resource/mcp"),
    ];
    for (method, path) in &routes {
        let reply = server.send(as_admin(method.clone(), path), "").await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.body);
        for (name, value) in [
            ("origin", "http://evil.example"),
            ("host", "evil.example"),
            ("host", "evil.example:8750"),
        ] {
            let reply = server
                .send(as_admin(method.clone(), path).header(name, value), "")
                .await;
            assert_eq!(
                reply.status,
                StatusCode::FORBIDDEN,
                "{path} with {name}: {value}: {}",
                reply.body
            );
        }
    }
    // The probes answer whatever the Host (orchestrators use the pod's IP).
    for path in ["/healthz", "/readyz"] {
        let reply = server
            .send(
                server
                    .request(Method::GET, path)
                    .header("host", "10.1.2.3:8750"),
                "",
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.body);
    }

    // The 401 challenge and the metadata name only a checked Host, and
    // nothing of the header but its host and port.
    let reply = list_with_host(server, "x\", error=\"spoofed").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.body);
    assert!(!reply.headers.contains_key("www-authenticate"));
    let reply = list_with_host(server, "evil.example").await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.body);
    assert!(!reply.headers.contains_key("www-authenticate"));
    let reply = list_with_host(server, "spoofed@localhost:8750").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.body);
    let challenge = reply.headers["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.starts_with(
            "Bearer resource_metadata=\"http://localhost:8750/.well-known/oauth-protected-resource/mcp\""
        ),
        "{challenge}"
    );
    assert!(!challenge.contains("spoofed"), "{challenge}");
    let metadata = server
        .send(
            server
                .request(Method::GET, "/.well-known/oauth-protected-resource")
                .header("host", "spoofed@localhost"),
            "",
        )
        .await;
    assert_eq!(metadata.json()["resource"], "http://localhost/mcp");
}

/// An unauthenticated stateless `tools/list` with `host` as the Host header.
async fn list_with_host(server: &Http, host: &str) -> common::http::Reply {
    server
        .send(
            stateless(server, "tools/list", None).header("host", host),
            stateless_body(1, "tools/list", json!({})),
        )
        .await
}

#[tokio::test]
async fn the_audit_chain_verifies_after_load_and_any_tampering_is_found() {
    let setup = Setup::new("");
    let served = setup.serve();
    let acme = token("acme", &["editor"]);
    let mut calls = Vec::new();
    for i in 0..40 {
        let base = served.http.base.clone();
        let acme = acme.clone();
        calls.push(tokio::spawn(async move {
            let http = Http::new(base);
            call_as(
                &http,
                &acme,
                "text_stats",
                json!({"text": format!("load {i}")}),
            )
            .await
            .status
        }));
    }
    for call in calls {
        assert_eq!(call.await.unwrap(), StatusCode::OK);
    }
    let _ = list_with(&served.http, None, "/mcp").await;
    let log = setup.audit_log();
    // Batched records reach the disk within `batch_ms`. Stop the server the
    // way an operator does: SIGTERM flushes the log and moves the head file
    // to its last record. (A SIGKILL may leave the head one fsync behind,
    // which `verify` accepts; then cutting the last record would go unseen.)
    assert!(audit_records(&log, 41).len() >= 41);
    let mut served = served;
    served.process.signal("TERM");
    served.process.expect_clean_exit(Duration::from_secs(20));
    let verify = |path: &Path| {
        let out = cordon()
            .args(["audit", "verify"])
            .arg(path)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, report) = verify(&log);
    assert!(ok, "{report}");
    assert!(
        report.contains("head file matches the last record"),
        "after a clean stop the head names the last record: {report}"
    );

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 41);
    let tampered = |name: &str, lines: Vec<String>| {
        let path = setup.dir.path().join(name);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        // The head file travels with the log.
        std::fs::copy(
            setup.dir.path().join("audit.jsonl.head"),
            setup.dir.path().join(format!("{name}.head")),
        )
        .ok();
        path
    };
    let own = |lines: &[&str]| lines.iter().map(|l| l.to_string()).collect::<Vec<_>>();
    let mut edited = own(&lines);
    edited[10] = edited[10].replace("\"outcome\":\"ok\"", "\"outcome\":\"denied\"");
    assert_ne!(edited[10], lines[10]);
    let mut deleted = own(&lines);
    deleted.remove(20);
    let mut reordered = own(&lines);
    reordered.swap(5, 6);
    let mut truncated = own(&lines);
    truncated.pop();
    for (name, lines, line) in [
        ("edited.jsonl", edited, "line 11"),
        ("deleted.jsonl", deleted, "line 21"),
        ("reordered.jsonl", reordered, "line 6"),
        ("truncated.jsonl", truncated, ""),
    ] {
        let path = tampered(name, lines);
        let (ok, report) = verify(&path);
        assert!(!ok, "{name} must not verify: {report}");
        assert!(
            report.contains(line),
            "{name}: the report says where ({line}): {report}"
        );
    }
    // Queries work on the real log.
    let out = cordon()
        .args(["audit", "query", "--file"])
        .arg(&log)
        .args(["--tenant", "acme", "--tool", "text_stats", "--since", "1h"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 40);
}

#[tokio::test]
async fn sigkill_under_always_durability_loses_no_acknowledged_call() {
    let setup = Setup::new("[audit]\npath = \"audit.jsonl\"\ndurability = \"always\"\n");
    let served = setup.serve();
    let acme = token("acme", &["editor"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4 {
        let base = served.http.base.clone();
        let acme = acme.clone();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let http = Http::new(base);
            let mut acknowledged = Vec::new();
            for i in 0.. {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let arguments = json!({"text": format!("worker {w} call {i}")});
                let request = http.client.request(
                    stateless(&http, "tools/call", Some("text_stats"))
                        .header("authorization", format!("Bearer {acme}"))
                        .body(stateless_body(
                            1,
                            "tools/call",
                            json!({"name": "text_stats", "arguments": arguments.clone()}),
                        ))
                        .unwrap(),
                );
                match tokio::time::timeout(Duration::from_secs(5), request).await {
                    Ok(Ok(response)) if response.status() == StatusCode::OK => {
                        let body = axum::body::Body::new(response.into_body());
                        if let Ok(body) = axum::body::to_bytes(body, usize::MAX).await {
                            let body: Value = serde_json::from_slice(&body).unwrap_or_default();
                            if body["result"]["isError"] == json!(false) {
                                acknowledged.push(arguments);
                            }
                        }
                    }
                    _ => break,
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // SIGKILL while calls are in flight.
    let mut served = served;
    served.process.kill();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acknowledged = Vec::new();
    for worker in workers {
        acknowledged.extend(worker.await.unwrap());
    }
    assert!(
        acknowledged.len() >= 20,
        "only {} calls were acknowledged",
        acknowledged.len()
    );

    let text = std::fs::read_to_string(setup.audit_log()).unwrap();
    let digests: std::collections::HashSet<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|r| r["args_digest"].as_str().map(str::to_owned))
        .collect();
    for arguments in &acknowledged {
        assert!(
            digests.contains(&cordon::audit::args_digest(arguments)),
            "acknowledged call {arguments} has no audit record"
        );
    }
    // The chain is intact (at most a torn final line from the kill).
    match cordon::audit::verify(&setup.audit_log()) {
        Ok(_) => {}
        Err(e) => assert!(
            matches!(e.problem(), Some(cordon::audit::Problem::TornLine { .. })),
            "{e}"
        ),
    }
}

#[tokio::test]
async fn a_real_mcp_client_connects_over_https_with_a_test_ca() {
    let certs = tempfile::tempdir().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Cordon test CA");
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_params =
        rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();
    std::fs::write(certs.path().join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(certs.path().join("cert.pem"), server_cert.pem()).unwrap();
    std::fs::write(certs.path().join("key.pem"), server_key.serialize_pem()).unwrap();

    let setup = Setup::new(&format!(
        "[server.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        certs.path().join("cert.pem"),
        certs.path().join("key.pem")
    ));
    let served = setup.serve();
    assert!(
        served.process.url.starts_with("https://127.0.0.1:"),
        "{}",
        served.process.url
    );
    assert!(served.process.log().contains("serving HTTPS"));
    let results = python_client(&json!({
        "url": served.process.url,
        "transport": "streamable",
        "ca": certs.path().join("ca.pem"),
        "principals": [{"label": "acme", "token": token("acme", &["viewer"])}],
        "calls": [{"tool": "text_stats", "arguments": {"text": "over tls"}}],
    }));
    assert_eq!(
        results[0]["calls"]["text_stats"]["ok"],
        json!(true),
        "{results:?}"
    );
    assert!(
        results[0]["tools"]
            .as_array()
            .unwrap()
            .contains(&json!("text_stats"))
    );
}

#[test]
fn token_issue_mints_a_token_the_server_accepts_and_config_check_finds_key_problems() {
    let setup = Setup::new("");
    let out = cordon()
        .args(["token", "issue", "--config"])
        .arg(setup.config())
        .args(["--tenant", "acme", "--role", "viewer", "--ttl", "5m"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let minted = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let served = setup.serve();
    let reply = runtime.block_on(list_with(
        &served.http,
        Some(&format!("Bearer {minted}")),
        "/mcp",
    ));
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);

    // An undeclared tenant cannot get a token; a missing key file is a problem.
    let out = cordon()
        .args(["token", "issue", "--config"])
        .arg(setup.config())
        .args(["--tenant", "nobody"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    std::fs::remove_file(setup.dir.path().join("hs.secret")).unwrap();
    let out = cordon()
        .args(["config", "check", "--config"])
        .arg(setup.config())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("auth.jwt_keys[0]") && stderr.contains("hs.secret"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_flood_of_bad_tokens_cannot_grow_the_audit_log_at_will() {
    let setup = Setup::new("");
    let served = setup.serve();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let base = served.http.base.clone();
        tasks.push(tokio::spawn(async move {
            let http = Http::new(base);
            for _ in 0..250 {
                let reply = list_with(&http, Some("Bearer not-a-real-key"), "/mcp").await;
                assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    // Still serving, and the refusals were paced.
    let reply = list_with(
        &served.http,
        Some(&format!("Bearer {}", token("acme", &["viewer"]))),
        "/mcp",
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let _ = list_with(&served.http, Some("Bearer one-more-bad-key"), "/mcp").await;
    std::thread::sleep(Duration::from_millis(300));
    let records = audit_records(&setup.audit_log(), 1);
    let failures = records
        .iter()
        .filter(|r| r["event"] == "auth_failure")
        .count();
    assert!(failures < 1500, "{failures} records for 2,001 refusals");
    assert!(
        records.iter().any(|r| r["reason"]
            .as_str()
            .is_some_and(|s| s.contains("suppressed"))),
        "the suppressed count is recorded"
    );
}
