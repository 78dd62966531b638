//! Every example tool through the real runtime: definitions, results, errors,
//! grants, logging and progress.

mod common;

use common::{Sandbox, text};
use cordon::runtime::{CallEvent, CallFailure};
use serde_json::json;

const NOTES_GRANT: &str = r#"
[tools.notes]
dirs = [{ path = "notes/{tenant}", guest = "/notes", mode = "rw" }]
config = { "notes.max_bytes" = "1000" }
"#;

#[tokio::test]
async fn every_example_tool_is_listed_with_a_schema() {
    let sandbox = Sandbox::new(&["text", "notes", "conformance"], "").await;
    let tools = sandbox
        .app
        .dispatcher
        .list_tools(&cordon::dispatch::Principal::local("t1"));
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    for expected in [
        "text_stats",
        "regex_replace",
        "json_query",
        "json_pretty",
        "list_notes",
        "read_note",
        "write_note",
        "search_notes",
        "delete_note",
        "test_simple_text",
        "test_image_content",
        "test_audio_content",
        "test_embedded_resource",
        "test_multiple_content_types",
        "test_error_handling",
        "test_tool_with_logging",
        "test_tool_with_progress",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "tools/list order must be stable (sorted)");
    for tool in &tools {
        assert_eq!(
            tool.input_schema.get("type"),
            Some(&json!("object")),
            "{}",
            tool.name
        );
        assert!(
            tool.description.as_deref().is_some_and(|d| !d.is_empty()),
            "{}",
            tool.name
        );
    }
    let stats = tools.iter().find(|t| t.name == "text_stats").unwrap();
    assert!(
        stats.output_schema.is_some(),
        "text_stats declares an output schema"
    );
    assert_eq!(
        stats.annotations.as_ref().and_then(|a| a.read_only_hint),
        Some(true)
    );
}

#[tokio::test]
async fn text_tools_compute_and_report_bad_input_as_tool_errors() {
    let sandbox = Sandbox::new(&["text"], "").await;
    let stats = sandbox
        .ok("text_stats", json!({"text": "one two three\nfour"}))
        .await;
    let structured = stats.structured_content.expect("structured output");
    assert_eq!(structured["words"], json!(4));
    assert_eq!(structured["lines"], json!(2));

    let replaced = sandbox
        .ok(
            "regex_replace",
            json!({"pattern": "o+", "replacement": "0", "text": "foo boo", "all": true}),
        )
        .await;
    assert!(text(&replaced).contains("f0 b0"), "{}", text(&replaced));

    let bad = sandbox
        .call(
            "regex_replace",
            json!({"pattern": "(", "replacement": "", "text": "x"}),
        )
        .await;
    let bad = bad
        .result
        .expect("a bad regex is a tool error, not a failure");
    assert_eq!(bad.is_error, Some(true));

    let query = sandbox
        .ok(
            "json_query",
            json!({"json": "{\"a\":{\"b\":[1,2,42]}}", "pointer": "/a/b/2"}),
        )
        .await;
    assert!(text(&query).contains("42"), "{}", text(&query));

    // Arguments that do not match the schema never reach the guest.
    let failure = sandbox.failure("text_stats", json!({"text": 5})).await;
    assert!(
        matches!(failure, CallFailure::InvalidArguments(_)),
        "{failure:?}"
    );
    let failure = sandbox.failure("no_such_tool", json!({})).await;
    assert!(
        matches!(failure, CallFailure::UnknownTool(_)),
        "{failure:?}"
    );
}

#[tokio::test]
async fn notes_live_in_the_granted_directory_only() {
    let sandbox = Sandbox::new(&["notes"], NOTES_GRANT).await;
    sandbox
        .ok(
            "write_note",
            json!({"name": "plan", "content": "ship the sandbox\nthen the transports"}),
        )
        .await;
    // A read-write grant: the write is visible on the host, beneath the tenant's folder.
    let on_host = std::fs::read_to_string(sandbox.data().join("notes/t1/plan.md")).unwrap();
    assert!(on_host.contains("ship the sandbox"));

    let listed = sandbox.ok("list_notes", json!({})).await;
    assert!(
        listed
            .structured_content
            .unwrap()
            .to_string()
            .contains("plan")
    );
    let read = sandbox.ok("read_note", json!({"name": "plan"})).await;
    assert!(text(&read).contains("then the transports"));
    let found = sandbox
        .ok("search_notes", json!({"query": "TRANSPORTS"}))
        .await;
    assert!(text(&found).contains("plan"), "{}", text(&found));

    // The note name is checked by the tool too.
    let bad = sandbox
        .call("read_note", json!({"name": "../../etc/passwd"}))
        .await
        .result;
    assert!(bad.is_err() || bad.unwrap().is_error == Some(true));

    // Another tenant's folder is a different directory.
    let other = sandbox
        .call_as("t2", "read_note", json!({"name": "plan"}))
        .await
        .result
        .unwrap();
    assert_eq!(
        other.is_error,
        Some(true),
        "tenant t2 must not see t1's note"
    );

    // The granted config value bounds note size.
    let big = sandbox
        .call(
            "write_note",
            json!({"name": "big", "content": "x".repeat(2000)}),
        )
        .await;
    assert_eq!(
        big.result.unwrap().is_error,
        Some(true),
        "notes.max_bytes = 1000 must be enforced"
    );

    sandbox.ok("delete_note", json!({"name": "plan"})).await;
    assert!(!sandbox.data().join("notes/t1/plan.md").exists());
}

#[tokio::test]
async fn notes_without_a_grant_get_a_clear_tool_error() {
    let sandbox = Sandbox::new(&["notes"], "").await;
    let result = sandbox
        .call("write_note", json!({"name": "x", "content": "y"}))
        .await
        .result
        .unwrap();
    assert_eq!(result.is_error, Some(true));
    assert!(!text(&result).is_empty());
}

#[tokio::test]
async fn conformance_fixtures_return_every_content_type() {
    let sandbox = Sandbox::new(&["conformance"], "").await;
    let simple = sandbox.ok("test_simple_text", json!({})).await;
    assert_eq!(text(&simple), "This is a simple text response for testing.");

    let image = sandbox.ok("test_image_content", json!({})).await;
    let image = image.content[0].as_image().expect("an image block");
    assert_eq!(image.mime_type, "image/png");
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD
        .decode(&image.data)
        .unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    let audio = sandbox.ok("test_audio_content", json!({})).await;
    assert_eq!(
        audio.content[0]
            .as_audio()
            .expect("an audio block")
            .mime_type,
        "audio/wav"
    );

    let embedded = sandbox.ok("test_embedded_resource", json!({})).await;
    assert!(embedded.content[0].as_resource().is_some());

    let mixed = sandbox.ok("test_multiple_content_types", json!({})).await;
    assert_eq!(mixed.content.len(), 3);

    let error = sandbox
        .call("test_error_handling", json!({}))
        .await
        .result
        .unwrap();
    assert_eq!(error.is_error, Some(true));
}

#[tokio::test]
async fn logging_and_progress_flow_up_as_events() {
    let sandbox = Sandbox::new(&["conformance"], "").await;
    let (outcome, events) = sandbox
        .call_with_events("test_tool_with_logging", json!({}))
        .await;
    outcome.result.unwrap();
    let logs = events
        .iter()
        .filter(|e| matches!(e, CallEvent::Log { .. }))
        .count();
    assert_eq!(logs, 3, "{events:?}");

    let (outcome, events) = sandbox
        .call_with_events("test_tool_with_progress", json!({}))
        .await;
    outcome.result.unwrap();
    let progress: Vec<f64> = events
        .iter()
        .filter_map(|e| match e {
            CallEvent::Progress { progress, .. } => Some(*progress),
            _ => None,
        })
        .collect();
    assert!(progress.len() >= 3, "{events:?}");
    assert!(
        progress.windows(2).all(|w| w[0] < w[1]),
        "progress must increase: {progress:?}"
    );
}
