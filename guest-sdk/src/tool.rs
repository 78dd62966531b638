//! Tool definitions, typed handlers and dispatch.

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::output::IntoCallResult;
use crate::{Annotations, CallError, CallResult, ToolDefinition};

/// The argument type of a tool that takes no arguments.
///
/// Its schema is an object with no properties; any arguments sent are ignored.
/// A handler with no parameter at all (`fn() -> R`) gets the same schema.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct NoArgs {}

impl JsonSchema for NoArgs {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "NoArgs".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        schemars::json_schema!({
            "type": "object",
            "properties": {},
            "additionalProperties": false,
        })
    }
}

type Call = Box<dyn Fn(&str) -> Result<CallResult, CallError>>;

/// One tool: its definition and the function that runs it.
///
/// Build with [`Tool::new`], set options on the [`ToolBuilder`], and finish
/// with [`ToolBuilder::run`]:
///
/// ```
/// use cordon_guest::prelude::*;
///
/// #[derive(Deserialize, JsonSchema)]
/// struct GreetArgs {
///     /// Whom to greet.
///     name: String,
/// }
///
/// let tool = Tool::new("greet", "Greets someone by name.")
///     .title("Greeter")
///     .read_only()
///     .idempotent()
///     .run(|args: GreetArgs| Output::text(format!("Hello, {}!", args.name)));
/// let result = tool.call(r#"{"name": "Ada"}"#).unwrap();
/// assert_eq!(result.content, vec![Content::text("Hello, Ada!")]);
/// ```
pub struct Tool {
    /// Everything but the schemas, which are derived only when `list-tools`
    /// asks: every call runs in a fresh instance and rebuilds the tool list,
    /// so deriving schemas eagerly would cost every call tens of microseconds.
    definition: ToolDefinition,
    input_schema: Option<GivenSchema>,
    output_schema: Option<GivenSchema>,
    derive_schemas: fn() -> (Value, Option<Value>),
    call: Call,
}

impl Tool {
    /// Starts a tool named `name` (1 to 64 characters of `[A-Za-z0-9_.-]`,
    /// unique within the component) described by `description`.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(name: impl Into<String>, description: impl Into<String>) -> ToolBuilder {
        ToolBuilder {
            name: name.into(),
            description: description.into(),
            title: None,
            annotations: Annotations {
                read_only: None,
                destructive: None,
                idempotent: None,
                open_world: None,
            },
            input_schema: None,
            output_schema: None,
        }
    }

    /// The tool's name.
    pub fn name(&self) -> &str {
        &self.definition.name
    }

    /// The definition `list-tools` returns for this tool, schemas included.
    ///
    /// # Panics
    ///
    /// If the input or output schema does not describe a JSON object (see
    /// [`ToolBuilder::run`]).
    pub fn definition(&self) -> ToolDefinition {
        let derived =
            (self.input_schema.is_none() || self.output_schema.is_none()).then(self.derive_schemas);
        let input_schema = match (&self.input_schema, &derived) {
            (Some(schema), _) => schema.build(),
            (None, Some((derived, _))) => derived.clone(),
            (None, None) => unreachable!("derived above when no input schema is set"),
        };
        let output_schema = match (&self.output_schema, derived) {
            (Some(schema), _) => Some(schema.build()),
            (None, Some((_, derived))) => derived,
            (None, None) => None,
        };
        check_object_schema(&self.definition.name, "input", &input_schema);
        if let Some(schema) = &output_schema {
            check_object_schema(&self.definition.name, "output", schema);
        }
        ToolDefinition {
            input_schema: input_schema.to_string(),
            output_schema: output_schema.map(|s| s.to_string()),
            ..self.definition.clone()
        }
    }

    /// Runs the tool with `arguments` (a JSON object as text; empty text or
    /// `null` mean no arguments), as `call-tool` would.
    pub fn call(&self, arguments: &str) -> Result<CallResult, CallError> {
        (self.call)(arguments)
    }
}

impl std::fmt::Debug for Tool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tool")
            .field("definition", &self.definition)
            .finish_non_exhaustive()
    }
}

/// Options of a tool being defined; finish with [`ToolBuilder::run`].
///
/// The annotation methods set MCP behaviour hints. They are hints for the
/// client's user interface; leaving one unset means "unknown".
#[derive(Debug, Clone)]
#[must_use = "a tool is only defined once `.run(handler)` is called"]
pub struct ToolBuilder {
    name: String,
    description: String,
    title: Option<String>,
    annotations: Annotations,
    input_schema: Option<GivenSchema>,
    output_schema: Option<GivenSchema>,
}

/// A schema the tool's author gives instead of the derived one.
#[derive(Debug, Clone)]
enum GivenSchema {
    Value(Value),
    /// Built only when `list-tools` asks: the tool table is rebuilt on every
    /// call (each runs in a fresh instance), and a schema written with
    /// `json!` allocates a whole tree each time it is built.
    Lazy(fn() -> Value),
}

impl GivenSchema {
    fn build(&self) -> Value {
        match self {
            GivenSchema::Value(schema) => schema.clone(),
            GivenSchema::Lazy(build) => build(),
        }
    }
}

impl ToolBuilder {
    /// Sets a human-readable title for display.
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.title = Some(title.into());
        self
    }

    /// Hint: the tool does not modify its environment.
    pub fn read_only(mut self) -> Self {
        self.annotations.read_only = Some(true);
        self
    }

    /// Hint: the tool modifies its environment (`read-only: false`).
    pub fn writes(mut self) -> Self {
        self.annotations.read_only = Some(false);
        self
    }

    /// Hint: the tool may perform destructive updates (delete or overwrite data).
    pub fn destructive(mut self) -> Self {
        self.annotations.destructive = Some(true);
        self
    }

    /// Hint: the tool's updates are only additive (`destructive: false`).
    pub fn non_destructive(mut self) -> Self {
        self.annotations.destructive = Some(false);
        self
    }

    /// Hint: calling the tool again with the same arguments has no further effect.
    pub fn idempotent(mut self) -> Self {
        self.annotations.idempotent = Some(true);
        self
    }

    /// Hint: the tool interacts with an open world of external entities.
    pub fn open_world(mut self) -> Self {
        self.annotations.open_world = Some(true);
        self
    }

    /// Hint: the tool's world is closed (`open-world: false`).
    pub fn closed_world(mut self) -> Self {
        self.annotations.open_world = Some(false);
        self
    }

    /// Sets all annotations at once.
    pub fn annotations(mut self, annotations: Annotations) -> Self {
        self.annotations = annotations;
        self
    }

    /// Uses `schema` as the input schema instead of deriving it from the
    /// handler's argument type (for example with a handler over
    /// [`serde_json::Value`]). It must be an object schema (`"type": "object"`).
    pub fn input_schema(mut self, schema: Value) -> Self {
        self.input_schema = Some(GivenSchema::Value(schema));
        self
    }

    /// Like [`input_schema`](Self::input_schema), but `build` runs only when
    /// the host lists the tools (once per load), not on every call. Prefer it
    /// for any schema bigger than a line: every call rebuilds the tool table.
    pub fn input_schema_with(mut self, build: fn() -> Value) -> Self {
        self.input_schema = Some(GivenSchema::Lazy(build));
        self
    }

    /// Uses `schema` as the output schema instead of the one derived from the
    /// handler's return type. Results must then carry structured content that
    /// matches it (see [`Output::json`](crate::Output::json)).
    pub fn output_schema(mut self, schema: Value) -> Self {
        self.output_schema = Some(GivenSchema::Value(schema));
        self
    }

    /// Like [`output_schema`](Self::output_schema), but `build` runs only
    /// when the host lists the tools (once per load), not on every call.
    pub fn output_schema_with(mut self, build: fn() -> Value) -> Self {
        self.output_schema = Some(GivenSchema::Lazy(build));
        self
    }

    /// Finishes the tool with the function that runs it.
    ///
    /// `handler` is `Fn(A) -> R` or `Fn() -> R`, where `A` is the argument
    /// type (`Deserialize + JsonSchema`, usually a struct deriving both) and
    /// `R` is [`IntoCallResult`]. The input schema is derived from `A`, the
    /// output schema from `R` (when it returns [`Structured<T>`](crate::Structured)).
    ///
    /// If the input or output schema does not describe a JSON object (for
    /// example when `A` is a `String`), [`Tool::definition`] panics: MCP
    /// requires object schemas, and the host asks for the definitions as soon
    /// as it loads the component, so the mistake surfaces at once.
    pub fn run<M, H: Handler<M>>(self, handler: H) -> Tool {
        Tool {
            definition: ToolDefinition {
                name: self.name,
                title: self.title,
                description: self.description,
                input_schema: String::new(),
                output_schema: None,
                annotations: self.annotations,
            },
            input_schema: self.input_schema,
            output_schema: self.output_schema,
            derive_schemas: derived_schemas::<M, H>,
            call: Box::new(move |arguments| handler.call(arguments)),
        }
    }
}

/// The input and output schemas derived from a handler's types.
fn derived_schemas<M, H: Handler<M>>() -> (Value, Option<Value>) {
    let mut generator = SchemaGenerator::default();
    let input = handler_input_schema::<M, H>(&mut generator);
    let output = <H as Handler<M>>::output_schema(&mut generator).map(tidy_root_schema);
    (input, output)
}

fn handler_input_schema<M, H: Handler<M>>(generator: &mut SchemaGenerator) -> Value {
    let schema = tidy_root_schema(<H as Handler<M>>::input_schema(generator));
    // `serde_json::Value` and other "anything" types derive the schema `true`
    // or `{}`; MCP wants an object schema, and any object is what they accept.
    match &schema {
        Value::Bool(true) => serde_json::json!({ "type": "object" }),
        Value::Object(map) if map.keys().all(|k| k.starts_with('$')) => {
            let mut map = map.clone();
            map.insert("type".into(), "object".into());
            Value::Object(map)
        }
        _ => schema,
    }
}

/// Drops the root `title`, which schemars sets to the Rust type's name (an
/// implementation detail, not something the model should see).
fn tidy_root_schema(schema: Schema) -> Value {
    let mut value = schema.to_value();
    if let Value::Object(map) = &mut value {
        map.remove("title");
    }
    value
}

fn check_object_schema(tool: &str, which: &str, schema: &Value) {
    let is_object = schema.get("type").and_then(Value::as_str) == Some("object");
    assert!(
        is_object,
        "tool `{tool}`: the {which} schema must describe a JSON object (\"type\": \"object\"), \
         e.g. derive it from a struct; got {schema}"
    );
}

/// A function that can run a tool: `Fn(A) -> R` or `Fn() -> R`.
///
/// `M` is a marker that tells the two shapes apart; it is inferred. You do not
/// implement this trait: pass a function or closure to [`ToolBuilder::run`].
pub trait Handler<M>: 'static {
    /// The JSON Schema of the arguments.
    fn input_schema(generator: &mut SchemaGenerator) -> Schema;

    /// The JSON Schema of the structured output, if any.
    fn output_schema(generator: &mut SchemaGenerator) -> Option<Schema>;

    /// Parses `arguments` and runs the function.
    fn call(&self, arguments: &str) -> Result<CallResult, CallError>;
}

/// Marker for handlers that take one argument of type `A`.
#[doc(hidden)]
pub struct WithArgs<A>(std::marker::PhantomData<A>);

/// Marker for handlers that take no argument.
#[doc(hidden)]
pub struct WithoutArgs;

impl<F, A, R> Handler<WithArgs<A>> for F
where
    F: Fn(A) -> R + 'static,
    A: DeserializeOwned + JsonSchema + 'static,
    R: IntoCallResult + 'static,
{
    fn input_schema(generator: &mut SchemaGenerator) -> Schema {
        generator.root_schema_for::<A>()
    }

    fn output_schema(generator: &mut SchemaGenerator) -> Option<Schema> {
        R::output_schema(generator)
    }

    fn call(&self, arguments: &str) -> Result<CallResult, CallError> {
        let args = parse_arguments::<A>(arguments)?;
        self(args).into_call_result()
    }
}

impl<F, R> Handler<WithoutArgs> for F
where
    F: Fn() -> R + 'static,
    R: IntoCallResult + 'static,
{
    fn input_schema(generator: &mut SchemaGenerator) -> Schema {
        NoArgs::json_schema(generator)
    }

    fn output_schema(generator: &mut SchemaGenerator) -> Option<Schema> {
        R::output_schema(generator)
    }

    fn call(&self, _arguments: &str) -> Result<CallResult, CallError> {
        self().into_call_result()
    }
}

fn parse_arguments<A: DeserializeOwned>(arguments: &str) -> Result<A, CallError> {
    let trimmed = arguments.trim();
    let text = if trimmed.is_empty() || trimmed == "null" {
        "{}"
    } else {
        trimmed
    };
    serde_json::from_str(text).map_err(|e| CallError::InvalidArguments(e.to_string()))
}

/// The definitions of `tools`, as `list-tools` returns them.
pub fn list_tools(tools: &[Tool]) -> Vec<ToolDefinition> {
    tools.iter().map(Tool::definition).collect()
}

/// Runs the tool called `name` from `tools` with `arguments` (a JSON object as
/// text), as `call-tool` does: `call-error::unknown-tool` if there is no such
/// tool, `call-error::invalid-arguments` if the arguments do not deserialise.
///
/// Handy in unit tests, with the `cordon_tools()` function that
/// [`export_tools!`](crate::export_tools) defines.
pub fn call_tool(tools: &[Tool], name: &str, arguments: &str) -> Result<CallResult, CallError> {
    match tools.iter().find(|t| t.definition.name == name) {
        Some(tool) => tool.call(arguments),
        None => Err(CallError::UnknownTool(name.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prelude::*;
    use crate::{CallError, json};

    #[derive(Deserialize, JsonSchema)]
    struct CountArgs {
        /// The text to count.
        text: String,
    }

    fn count(args: CountArgs) -> ToolResult {
        if args.text.is_empty() {
            bail!("nothing to count");
        }
        Ok(Output::text(format!(
            "{} words",
            args.text.split_whitespace().count()
        )))
    }

    #[derive(Serialize, JsonSchema)]
    struct Stats {
        words: usize,
    }

    fn tools() -> Vec<Tool> {
        vec![
            Tool::new("count", "Counts words.").read_only().run(count),
            Tool::new("stats", "Counts words, structured.").run(|a: CountArgs| {
                Structured::new(Stats {
                    words: a.text.split_whitespace().count(),
                })
            }),
            Tool::new("hello", "Says hello.").run(|| "hello"),
            Tool::new("raw", "Raw schema.")
                .input_schema(json!({"type": "object", "properties": {"x": {"type": "integer"}}}))
                .run(|v: serde_json::Value| Output::json(v)),
            Tool::new("lazy", "Schemas built when listed.")
                .input_schema_with(
                    || json!({"type": "object", "properties": {"y": {"type": "string"}}}),
                )
                .output_schema_with(
                    || json!({"type": "object", "properties": {"z": {"type": "number"}}}),
                )
                .run(|v: serde_json::Value| {
                    Output::json(json!({"z": v.as_object().map_or(0, |o| o.len())}))
                }),
            Tool::new("any", "Any object.").run(|v: serde_json::Value| Output::json(v)),
            Tool::new("fail", "Fails.").run(|| -> ToolResult { Err(ToolError::failed("broken")) }),
        ]
    }

    fn schema(tool: &str, output: bool) -> Value {
        let defs = list_tools(&tools());
        let def = defs.into_iter().find(|d| d.name == tool).unwrap();
        let text = if output {
            def.output_schema.unwrap()
        } else {
            def.input_schema
        };
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn derives_object_input_schema() {
        let s = schema("count", false);
        assert_eq!(s["type"], "object");
        assert_eq!(s["$schema"], "https://json-schema.org/draft/2020-12/schema");
        assert_eq!(s["properties"]["text"]["type"], "string");
        assert_eq!(s["properties"]["text"]["description"], "The text to count.");
        assert_eq!(s["required"], json!(["text"]));
        assert!(s.get("title").is_none());
        let defs = list_tools(&tools());
        assert_eq!(defs[0].annotations.read_only, Some(true));
        assert_eq!(defs[0].annotations.destructive, None);
        assert!(defs[0].output_schema.is_none());
    }

    #[test]
    fn no_args_and_value_schemas_are_objects() {
        assert_eq!(
            schema("hello", false),
            json!({"type": "object", "properties": {}, "additionalProperties": false})
        );
        assert_eq!(schema("any", false)["type"], "object");
        assert_eq!(schema("raw", false)["properties"]["x"]["type"], "integer");
        assert_eq!(schema("lazy", false)["properties"]["y"]["type"], "string");
        assert_eq!(schema("lazy", true)["properties"]["z"]["type"], "number");
    }

    #[test]
    fn structured_output() {
        let s = schema("stats", true);
        assert_eq!(s["type"], "object");
        assert_eq!(s["properties"]["words"]["type"], "integer");
        let r = call_tool(&tools(), "stats", r#"{"text":"a b c"}"#).unwrap();
        assert_eq!(r.structured_content.as_deref(), Some(r#"{"words":3}"#));
        assert_eq!(r.content, vec![Content::text(r#"{"words":3}"#)]);
        assert!(!r.is_error);
    }

    #[test]
    fn dispatch_outcomes() {
        let t = tools();
        let ok = call_tool(&t, "count", r#"{"text":"a b"}"#).unwrap();
        assert_eq!(ok.content, vec![Content::text("2 words")]);
        let err = call_tool(&t, "count", r#"{"text":""}"#).unwrap();
        assert!(err.is_error);
        assert_eq!(err.content, vec![Content::text("nothing to count")]);
        assert!(matches!(
            call_tool(&t, "count", r#"{"txt":"a"}"#),
            Err(CallError::InvalidArguments(m)) if m.contains("missing field `text`")
        ));
        assert!(matches!(
            call_tool(&t, "nope", "{}"),
            Err(CallError::UnknownTool(n)) if n == "nope"
        ));
        assert!(matches!(call_tool(&t, "fail", ""), Err(CallError::Failed(m)) if m == "broken"));
        let hello = call_tool(&t, "hello", "").unwrap();
        assert_eq!(hello.content, vec![Content::text("hello")]);
    }

    #[test]
    #[should_panic(expected = "must describe a JSON object")]
    fn non_object_arguments_panic() {
        let _ = Tool::new("bad", "Bad.").run(|s: String| s).definition();
    }
}
