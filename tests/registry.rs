//! The tools directory: compile cache, load problems, hot reload.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Sandbox, guest, text};
use cordon::app::App;
use cordon::config::Config;
use cordon::dispatch::Principal;
use cordon::runtime::CacheStatus;
use serde_json::json;

fn write_config(
    dir: &std::path::Path,
    cache: &std::path::Path,
    extra: &str,
    watch: bool,
) -> Config {
    let text =
        Sandbox::config_text(cache, extra).replace("watch = false", &format!("watch = {watch}"));
    std::fs::write(dir.join("cordon.toml"), text).unwrap();
    Config::load(&dir.join("cordon.toml")).unwrap()
}

fn names(app: &App) -> Vec<String> {
    app.dispatcher
        .list_tools(&Principal::local("t1"))
        .into_iter()
        .map(|t| t.name.to_string())
        .collect()
}

#[tokio::test]
async fn a_second_start_loads_from_the_compile_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(dir.path().join("tools")).unwrap();
    std::fs::copy(guest("text"), dir.path().join("tools/text.wasm")).unwrap();

    let config = write_config(dir.path(), &cache, "", false);
    let first = App::open(config.clone(), false).await.unwrap();
    let component = first.dispatcher.registry().snapshot().components()["text"].clone();
    assert_eq!(component.cache_status(), CacheStatus::Miss);
    drop(first);

    let second = App::open(config, false).await.unwrap();
    let component = second.dispatcher.registry().snapshot().components()["text"].clone();
    assert_eq!(
        component.cache_status(),
        CacheStatus::Hit,
        "the second start must not recompile"
    );
    assert!(names(&second).contains(&"text_stats".to_string()));
}

#[tokio::test]
async fn broken_files_pin_mismatches_and_clashes_do_not_stop_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let tools = dir.path().join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    std::fs::copy(guest("text"), tools.join("text.wasm")).unwrap();
    std::fs::copy(guest("notes"), tools.join("notes.wasm")).unwrap();
    // Same tools as text.wasm under another file name: sorts after it.
    std::fs::copy(guest("text"), tools.join("zz-copy.wasm")).unwrap();
    std::fs::write(tools.join("broken.wasm"), b"\0asm not really").unwrap();
    let extra = format!("[tools.notes]\nsha256 = \"{}\"\n", "0".repeat(64));
    let config = write_config(dir.path(), &common::shared_cache_dir(), &extra, false);
    let app = App::open(config, false).await.unwrap();

    let snapshot = app.dispatcher.registry().snapshot();
    let problems: Vec<String> = snapshot.problems().iter().map(|p| p.to_string()).collect();
    let find = |needle: &str| problems.iter().find(|p| p.contains(needle)).cloned();
    assert!(
        find("broken.wasm").is_some_and(|p| p.contains("not a usable tool component")),
        "{problems:?}"
    );
    assert!(
        find("notes.wasm").is_some_and(|p| p.contains("sha256")),
        "{problems:?}"
    );
    assert!(
        find("zz-copy.wasm").is_some_and(|p| p.contains("text_stats")),
        "{problems:?}"
    );
    // text.wasm sorts first and keeps its names.
    assert_eq!(
        snapshot.tool("text_stats").unwrap().component.name(),
        "text"
    );
    assert!(!names(&app).iter().any(|n| n.contains("note")));
}

#[tokio::test]
async fn replacing_a_wasm_while_calls_run_swaps_the_tool_list_without_failing_a_call() {
    let dir = tempfile::tempdir().unwrap();
    let tools = dir.path().join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    std::fs::copy(guest("text"), tools.join("tool.wasm")).unwrap();
    let config = write_config(dir.path(), &common::shared_cache_dir(), "", true);
    let app = Arc::new(App::open(config, true).await.unwrap());
    let mut changes = app.dispatcher.registry().subscribe();
    assert!(names(&app).contains(&"text_stats".to_string()));

    // Keep calling while the file is replaced.
    let caller = {
        let app = app.clone();
        tokio::spawn(async move {
            let mut calls = 0;
            for _ in 0..400 {
                let registry = app.dispatcher.registry().snapshot();
                let tool = if registry.tool("text_stats").is_some() {
                    "text_stats"
                } else {
                    "test_simple_text"
                };
                let args = if tool == "text_stats" {
                    json!({"text": "a b"})
                } else {
                    json!({})
                };
                let outcome = app
                    .dispatcher
                    .call(
                        &Principal::local("t1"),
                        cordon::dispatch::CallRequest {
                            tool: tool.into(),
                            arguments: args,
                            events: cordon::runtime::EventSink::discard(),
                            cancel: Default::default(),
                            origin: Default::default(),
                        },
                    )
                    .await;
                match outcome.result {
                    Ok(r) => assert_ne!(r.is_error, Some(true), "{}", text(&r)),
                    // The only acceptable miss: the name vanished between
                    // choosing it and calling it.
                    Err(cordon::runtime::CallFailure::UnknownTool(_)) => {}
                    Err(e) => panic!("a call failed during reload: {e}"),
                }
                calls += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            calls
        })
    };

    tokio::time::sleep(Duration::from_millis(200)).await;
    // Replace atomically, as an operator should (write beside, rename over).
    std::fs::copy(guest("conformance"), tools.join(".tool.wasm.tmp")).unwrap();
    std::fs::rename(tools.join(".tool.wasm.tmp"), tools.join("tool.wasm")).unwrap();

    let changed = tokio::time::timeout(Duration::from_secs(20), changes.recv())
        .await
        .expect("a list-changed event within 20 s")
        .unwrap();
    assert!(changed.generation >= 2);
    let now = names(&app);
    assert!(now.contains(&"test_simple_text".to_string()), "{now:?}");
    assert!(!now.contains(&"text_stats".to_string()), "{now:?}");
    assert_eq!(caller.await.unwrap(), 400);

    // Removing the file removes its tools.
    std::fs::remove_file(tools.join("tool.wasm")).unwrap();
    tokio::time::timeout(Duration::from_secs(20), changes.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(names(&app).is_empty());
}

#[tokio::test]
async fn a_component_is_loaded_within_its_configured_limits() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(dir.path().join("tools")).unwrap();
    std::fs::copy(guest("text"), dir.path().join("tools/text.wasm")).unwrap();

    // Too little memory for the component even to start: refused at load,
    // with the reason (its list-tools runs within the tool's own limits).
    let config = write_config(
        dir.path(),
        &cache,
        "[tools.text.limits]\nmemory_mib = 1\n",
        false,
    );
    let app = App::open(config, false).await.unwrap();
    let snapshot = app.dispatcher.registry().snapshot();
    assert!(snapshot.tools().next().is_none());
    let problems: Vec<String> = snapshot.problems().iter().map(|p| p.to_string()).collect();
    assert!(
        problems.iter().any(|p| p.contains("memory")),
        "{problems:?}"
    );
    drop(app);

    let config = write_config(
        dir.path(),
        &cache,
        "[tools.text.limits]\nmemory_mib = 8\n",
        false,
    );
    let app = App::open(config, false).await.unwrap();
    assert!(names(&app).contains(&"text_stats".to_string()));
}

#[tokio::test]
async fn a_component_that_imports_nothing_is_served_like_any_other() {
    // The `trivial` fixture is `no_std` and imports no WASI and none of
    // Cordon's host interfaces: the linker must not require any import, and
    // its calls, which get no WASI context built, must work all the same.
    let wasm = std::fs::read(guest("trivial")).unwrap();
    let component = wasmtime::component::Component::new(&wasmtime::Engine::default(), &wasm)
        .expect("the fixture is a valid component");
    let imports: Vec<String> = component
        .component_type()
        .imports(component.engine())
        .map(|(name, _)| name.to_owned())
        .collect();
    assert_eq!(
        imports,
        ["cordon:tool/types@0.1.0"],
        "the fixture grew imports"
    );

    let sandbox = Sandbox::new(&["trivial"], "").await;
    assert_eq!(names(&sandbox.app), ["null"]);
    for _ in 0..3 {
        let outcome = sandbox.call("null", json!({})).await;
        let result = outcome.result.expect("null succeeds");
        assert_eq!(text(&result), "ok");
        assert_ne!(result.is_error, Some(true));
    }
    let outcome = sandbox.call("missing", json!({})).await;
    assert!(outcome.result.is_err(), "an unknown tool is refused");
}

/// A component that exports `cordon:tool/tool` with a `call-tool` of another
/// signature than the contract's: returns a plain string.
const CALL_TOOL_RETURNS_A_STRING: &str = r#"
(component
  (type $annotations (record
    (field "read-only" (option bool))
    (field "destructive" (option bool))
    (field "idempotent" (option bool))
    (field "open-world" (option bool))))
  (export $annotations-e "annotations" (type $annotations))
  (type $tool-definition (record
    (field "name" string)
    (field "title" (option string))
    (field "description" string)
    (field "input-schema" string)
    (field "output-schema" (option string))
    (field "annotations" $annotations-e)))
  (export $tool-definition-e "tool-definition" (type $tool-definition))
  (core module $m
    (memory (export "memory") 1)
    ;; Both return the zeroed bytes at 16: an empty list, an empty string.
    (func (export "list-tools") (result i32) i32.const 16)
    (func (export "call-tool") (param i32 i32 i32 i32) (result i32) i32.const 16)
    (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32) i32.const 1024))
  (core instance $i (instantiate $m))
  (func $list-tools (result (list $tool-definition-e))
    (canon lift (core func $i "list-tools") (memory (core memory $i "memory"))
      (realloc (core func $i "cabi_realloc"))))
  (func $call-tool (param "name" string) (param "arguments" string) (result string)
    (canon lift (core func $i "call-tool") (memory (core memory $i "memory"))
      (realloc (core func $i "cabi_realloc"))))
  (instance $tool
    (export "tool-definition" (type $tool-definition-e))
    (export "list-tools" (func $list-tools))
    (export "call-tool" (func $call-tool)))
  (export "cordon:tool/tool@0.1.0" (instance $tool)))
"#;

#[tokio::test]
async fn a_component_whose_call_tool_has_another_signature_is_refused_at_load() {
    // Calls skip the per-instance type check of `call-tool` because loading
    // checked it once: a mismatch must stop the component here.
    let dir = tempfile::tempdir().unwrap();
    let tools = dir.path().join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    let wasm = wat::parse_str(CALL_TOOL_RETURNS_A_STRING).expect("the WAT is a valid component");
    std::fs::write(tools.join("odd.wasm"), wasm).unwrap();
    std::fs::copy(guest("trivial"), tools.join("trivial.wasm")).unwrap();
    let config = write_config(dir.path(), &common::shared_cache_dir(), "", false);
    let app = App::open(config, false).await.unwrap();

    let snapshot = app.dispatcher.registry().snapshot();
    let problems: Vec<String> = snapshot.problems().iter().map(|p| p.to_string()).collect();
    assert!(
        problems.iter().any(|p| p.contains("odd.wasm")
            && p.contains("its call-tool does not match the cordon:tool contract")),
        "{problems:?}"
    );
    assert!(!snapshot.components().contains_key("odd"));
    assert_eq!(names(&app), ["null"], "the other component still loads");
}
