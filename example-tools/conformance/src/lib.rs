//! `conformance`: the fixture tools of the official MCP conformance suite
//! (`npm @modelcontextprotocol/conformance`, scenarios in
//! `src/scenarios/server/tools.ts` and `json-schema-2020-12.ts`), plus `echo`
//! and `sleep_ms` for benchmarks and long-call tests.
//!
//! Needs no grants. The suite's sampling and elicitation tools are absent:
//! the Cordon contract gives tools no way to call back into the client.

use std::thread::sleep;
use std::time::{Duration, Instant};

use cordon_guest::prelude::*;
use cordon_guest::{json, serde_json};

/// A 1x1 red pixel, as PNG.
const RED_PIXEL_PNG: [u8; 69] = [
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x02, 0x00, 0x00, 0x00, 0x90, 0x77, 0x53,
    0xde, 0x00, 0x00, 0x00, 0x0c, 0x49, 0x44, 0x41, 0x54, 0x78, 0xda, 0x63, 0xf8, 0xcf, 0xc0, 0x00,
    0x00, 0x03, 0x01, 0x01, 0x00, 0xf7, 0x03, 0x41, 0x43, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e,
    0x44, 0xae, 0x42, 0x60, 0x82,
];

/// One millisecond of silence: 8 samples of 16-bit mono PCM at 8 kHz, as WAV.
const SILENCE_WAV: [u8; 60] = [
    0x52, 0x49, 0x46, 0x46, 0x34, 0x00, 0x00, 0x00, 0x57, 0x41, 0x56, 0x45, 0x66, 0x6d, 0x74, 0x20,
    0x10, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01, 0x00, 0x40, 0x1f, 0x00, 0x00, 0x80, 0x3e, 0x00, 0x00,
    0x02, 0x00, 0x10, 0x00, 0x64, 0x61, 0x74, 0x61, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];

/// The pause between the steps of the logging and progress fixtures.
const STEP_PAUSE: Duration = Duration::from_millis(50);

/// The longest `sleep_ms` sleeps.
const MAX_SLEEP_MS: u64 = 60_000;

fn test_simple_text() -> Output {
    Output::text("This is a simple text response for testing.")
}

fn test_image_content() -> Output {
    Output::image(RED_PIXEL_PNG, "image/png")
}

fn test_audio_content() -> Output {
    Output::audio(SILENCE_WAV, "audio/wav")
}

fn test_embedded_resource() -> Output {
    Output::content(Content::resource_text(
        "test://embedded-resource",
        "text/plain",
        "This is an embedded resource content.",
    ))
}

fn test_multiple_content_types() -> Output {
    Output::text("Multiple content types test:")
        .with(Content::image(RED_PIXEL_PNG, "image/png"))
        .with(Content::resource_text(
            "test://mixed-content-resource",
            "application/json",
            json!({"test": "data", "value": 123}).to_string(),
        ))
}

fn test_error_handling() -> ToolResult {
    Err(ToolError::new(
        "This tool intentionally returns an error for testing",
    ))
}

fn test_tool_with_logging() -> Output {
    log::info("Tool execution started");
    sleep(STEP_PAUSE);
    log::info("Tool processing data");
    sleep(STEP_PAUSE);
    log::info("Tool execution completed");
    Output::text("Tool with logging executed successfully")
}

fn test_tool_with_progress() -> Output {
    for step in [0.0, 50.0, 100.0] {
        if step > 0.0 {
            sleep(STEP_PAUSE);
        }
        let message = format!("Completed step {step} of 100");
        progress(step, Some(100.0), Some(&message));
    }
    Output::text("Tool with progress executed successfully")
}

/// The JSON Schema 2020-12 fixture's raw input schema (SEP-1613, SEP-2106).
fn json_schema_2020_12_input() -> serde_json::Value {
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "$defs": {
            "address": {
                "$anchor": "addressDef",
                "type": "object",
                "properties": {
                    "street": { "type": "string" },
                    "city": { "type": "string" }
                }
            }
        },
        "properties": {
            "name": { "type": "string" },
            "address": { "$ref": "#/$defs/address" },
            "contactMethod": { "type": "string", "enum": ["phone", "email"] },
            "phone": { "type": "string" },
            "email": { "type": "string" }
        },
        "allOf": [
            { "anyOf": [{ "required": ["phone"] }, { "required": ["email"] }] }
        ],
        "if": {
            "properties": { "contactMethod": { "const": "phone" } },
            "required": ["contactMethod"]
        },
        "then": { "required": ["phone"] },
        "else": { "required": ["email"] },
        "additionalProperties": false
    })
}

fn json_schema_2020_12_tool(args: serde_json::Value) -> Output {
    Output::text(format!("Received: {args}"))
}

#[derive(Deserialize, JsonSchema)]
struct EchoArgs {
    /// The text to send back.
    message: String,
}

fn echo(args: EchoArgs) -> Output {
    Output::text(args.message)
}

#[derive(Deserialize, JsonSchema)]
struct SleepArgs {
    /// How long to sleep, in milliseconds (at most 60000).
    #[schemars(range(max = 60000))]
    ms: u64,
}

fn sleep_ms(args: SleepArgs) -> Output {
    let total = args.ms.min(MAX_SLEEP_MS);
    let start = Instant::now();
    let deadline = start + Duration::from_millis(total);
    progress(0.0, Some(total as f64), Some("sleeping"));
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        sleep((deadline - now).min(Duration::from_secs(1)));
        let elapsed = start.elapsed().as_millis().min(u128::from(total));
        progress(
            elapsed as f64,
            Some(total as f64),
            Some(&format!("slept {elapsed} of {total} ms")),
        );
    }
    Output::text(format!("Slept {total} ms."))
}

cordon_guest::export_tools!(
    Tool::new("test_simple_text", "Tests simple text content response")
        .read_only()
        .run(test_simple_text),
    Tool::new("test_image_content", "Tests image content response")
        .read_only()
        .run(test_image_content),
    Tool::new("test_audio_content", "Tests audio content response")
        .read_only()
        .run(test_audio_content),
    Tool::new(
        "test_embedded_resource",
        "Tests embedded resource content response"
    )
    .read_only()
    .run(test_embedded_resource),
    Tool::new(
        "test_multiple_content_types",
        "Tests response with multiple content types (text, image, resource)"
    )
    .read_only()
    .run(test_multiple_content_types),
    Tool::new("test_error_handling", "Tests error response handling")
        .read_only()
        .run(test_error_handling),
    Tool::new(
        "test_tool_with_logging",
        "Tests tool that emits log messages during execution"
    )
    .read_only()
    .run(test_tool_with_logging),
    Tool::new(
        "test_tool_with_progress",
        "Tests tool that reports progress notifications"
    )
    .read_only()
    .run(test_tool_with_progress),
    Tool::new(
        "json_schema_2020_12_tool",
        "Tool with JSON Schema 2020-12 features"
    )
    .read_only()
    .input_schema_with(json_schema_2020_12_input)
    .run(json_schema_2020_12_tool),
    Tool::new("echo", "Returns its message unchanged.")
        .read_only()
        .idempotent()
        .run(echo),
    Tool::new(
        "sleep_ms",
        "Sleeps for the given number of milliseconds (at most 60000), reporting progress every second."
    )
    .read_only()
    .idempotent()
    .run(sleep_ms),
);

#[cfg(test)]
mod tests {
    use cordon_guest::serde_json::Value;
    use cordon_guest::{CallResult, ResourceContents, call_tool};

    use super::*;

    fn call(name: &str) -> CallResult {
        call_tool(&cordon_tools(), name, "{}").unwrap()
    }

    #[test]
    fn fixtures() {
        assert_eq!(
            call("test_simple_text").content,
            [Content::text("This is a simple text response for testing.")]
        );
        let err = call("test_error_handling");
        assert!(err.is_error);
        assert_eq!(
            err.content,
            [Content::text(
                "This tool intentionally returns an error for testing"
            )]
        );
        let mixed = call("test_multiple_content_types").content;
        assert_eq!(mixed.len(), 3);
        match &mixed[2] {
            Content::Resource(r) => {
                assert_eq!(r.uri, "test://mixed-content-resource");
                assert_eq!(r.mime_type.as_deref(), Some("application/json"));
                assert_eq!(
                    r.contents,
                    ResourceContents::Text(r#"{"test":"data","value":123}"#.into())
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(&call("test_image_content").content[..], [Content::Image(m)] if m.mime_type == "image/png")
        );
        assert!(
            matches!(&call("test_audio_content").content[..], [Content::Audio(m)] if m.mime_type == "audio/wav")
        );
        assert_eq!(
            call("test_tool_with_progress").content,
            [Content::text("Tool with progress executed successfully")]
        );
        let echo = call_tool(&cordon_tools(), "echo", r#"{"message":"hi"}"#).unwrap();
        assert_eq!(echo.content, [Content::text("hi")]);
        let slept = call_tool(&cordon_tools(), "sleep_ms", r#"{"ms":5}"#).unwrap();
        assert_eq!(slept.content, [Content::text("Slept 5 ms.")]);
    }

    #[test]
    fn schemas() {
        let defs = cordon_guest::list_tools(&cordon_tools());
        for d in &defs {
            let schema: Value = serde_json::from_str(&d.input_schema).unwrap();
            assert_eq!(schema["type"], "object", "{}", d.name);
        }
        let raw = defs
            .iter()
            .find(|d| d.name == "json_schema_2020_12_tool")
            .unwrap();
        let schema: Value = serde_json::from_str(&raw.input_schema).unwrap();
        assert_eq!(schema, json_schema_2020_12_input());
    }
}
