//! What tools return: content blocks, structured output, and the conversions
//! from a tool function's return value to a `call-result`.

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::Serialize;
use serde_json::Value;

use crate::{
    CallError, CallResult, Content, EmbeddedResource, Media, ResourceContents, ResourceLink,
    ToolError,
};

impl Content {
    /// A text block.
    pub fn text(text: impl Into<String>) -> Self {
        Content::Text(text.into())
    }

    /// An image: raw bytes (not base64) and a media type such as `image/png`.
    pub fn image(data: impl Into<Vec<u8>>, mime_type: impl Into<String>) -> Self {
        Content::Image(Media {
            data: data.into(),
            mime_type: mime_type.into(),
        })
    }

    /// Audio: raw bytes (not base64) and a media type such as `audio/wav`.
    pub fn audio(data: impl Into<Vec<u8>>, mime_type: impl Into<String>) -> Self {
        Content::Audio(Media {
            data: data.into(),
            mime_type: mime_type.into(),
        })
    }

    /// An embedded resource with textual contents.
    pub fn resource_text(
        uri: impl Into<String>,
        mime_type: impl Into<String>,
        text: impl Into<String>,
    ) -> Self {
        Content::Resource(EmbeddedResource {
            uri: uri.into(),
            mime_type: Some(mime_type.into()),
            contents: ResourceContents::Text(text.into()),
        })
    }

    /// An embedded resource with binary contents (raw bytes; the host
    /// base64-encodes them).
    pub fn resource_blob(
        uri: impl Into<String>,
        mime_type: impl Into<String>,
        data: impl Into<Vec<u8>>,
    ) -> Self {
        Content::Resource(EmbeddedResource {
            uri: uri.into(),
            mime_type: Some(mime_type.into()),
            contents: ResourceContents::Blob(data.into()),
        })
    }

    /// A link to a resource the client may fetch itself; see [`ResourceLink::new`]
    /// for the optional fields.
    pub fn link(link: ResourceLink) -> Self {
        Content::ResourceLink(link)
    }
}

impl From<ResourceLink> for Content {
    fn from(link: ResourceLink) -> Self {
        Content::ResourceLink(link)
    }
}

impl From<EmbeddedResource> for Content {
    fn from(resource: EmbeddedResource) -> Self {
        Content::Resource(resource)
    }
}

impl From<String> for Content {
    fn from(text: String) -> Self {
        Content::Text(text)
    }
}

impl From<&str> for Content {
    fn from(text: &str) -> Self {
        Content::Text(text.to_owned())
    }
}

impl ResourceLink {
    /// A link to `uri`, whose programmatic name is `name`; set the optional
    /// fields with the builder methods.
    ///
    /// ```
    /// use cordon_guest::{Content, ResourceLink};
    /// let link = Content::link(
    ///     ResourceLink::new("file:///notes/todo.md", "todo").mime_type("text/markdown"),
    /// );
    /// ```
    pub fn new(uri: impl Into<String>, name: impl Into<String>) -> Self {
        ResourceLink {
            uri: uri.into(),
            name: name.into(),
            title: None,
            description: None,
            mime_type: None,
            size: None,
        }
    }

    /// Sets the human-readable title.
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.title = Some(title.into());
        self
    }

    /// Sets the description.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// Sets the media type.
    pub fn mime_type(mut self, mime_type: impl Into<String>) -> Self {
        self.mime_type = Some(mime_type.into());
        self
    }

    /// Sets the size in bytes.
    pub fn size(mut self, size: u64) -> Self {
        self.size = Some(size);
        self
    }
}

/// A successful tool result: content blocks and optional structured output.
///
/// ```
/// use cordon_guest::{Content, Output, json};
///
/// let out = Output::text("Found 2 files:")
///     .with(Content::resource_text("file:///a.txt", "text/plain", "a"))
///     .with_text("done");
/// let typed = Output::json(json!({"count": 2})); // structured + JSON text block
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Output {
    /// The content blocks shown to the model.
    pub content: Vec<Content>,
    /// Structured output (MCP `structuredContent`) as JSON text, if any.
    structured: Option<String>,
}

impl Output {
    /// An output with no content yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// One text block.
    pub fn text(text: impl Into<String>) -> Self {
        Self::new().with(Content::text(text))
    }

    /// One image block (raw bytes and a media type such as `image/png`).
    pub fn image(data: impl Into<Vec<u8>>, mime_type: impl Into<String>) -> Self {
        Self::new().with(Content::image(data, mime_type))
    }

    /// One audio block (raw bytes and a media type such as `audio/wav`).
    pub fn audio(data: impl Into<Vec<u8>>, mime_type: impl Into<String>) -> Self {
        Self::new().with(Content::audio(data, mime_type))
    }

    /// One content block of any kind.
    pub fn content(content: impl Into<Content>) -> Self {
        Self::new().with(content)
    }

    /// Structured output `value`, plus the same JSON as a text block (as MCP
    /// recommends, for clients that ignore structured content).
    ///
    /// For output checked against a schema derived from a Rust type, return
    /// [`Structured<T>`] instead.
    pub fn json(value: Value) -> Self {
        let text = value.to_string();
        Self::text(text).with_structured(value)
    }

    /// Appends a content block.
    pub fn with(mut self, content: impl Into<Content>) -> Self {
        self.content.push(content.into());
        self
    }

    /// Appends a text block.
    pub fn with_text(self, text: impl Into<String>) -> Self {
        self.with(Content::text(text))
    }

    /// Sets the structured output, leaving the content blocks as they are.
    pub fn with_structured(mut self, value: Value) -> Self {
        self.structured = Some(value.to_string());
        self
    }

    /// The structured output as JSON text, if any.
    pub fn structured(&self) -> Option<&str> {
        self.structured.as_deref()
    }

    /// Appends a content block in place.
    pub fn push(&mut self, content: impl Into<Content>) {
        self.content.push(content.into());
    }

    pub(crate) fn into_call_result(self) -> CallResult {
        CallResult {
            content: self.content,
            structured_content: self.structured,
            is_error: false,
        }
    }
}

/// Typed structured output: the tool's output schema is derived from `T`, and
/// the result carries `T` as structured content.
///
/// Unless content blocks are added with [`Structured::with`], the result also
/// carries the JSON text of the value as its only text block.
///
/// ```
/// use cordon_guest::prelude::*;
///
/// #[derive(Serialize, JsonSchema)]
/// struct Sum {
///     total: i64,
/// }
///
/// fn add(a: i64, b: i64) -> ToolResult<Structured<Sum>> {
///     Ok(Structured::new(Sum { total: a + b }).with_text(format!("{a} + {b} = {}", a + b)))
/// }
/// ```
///
/// `T` must serialise to a JSON object (MCP requires an object schema).
#[derive(Debug, Clone, PartialEq)]
pub struct Structured<T> {
    /// The structured value.
    pub value: T,
    /// Content blocks; when empty, the JSON text of `value` is used.
    pub content: Vec<Content>,
}

impl<T> Structured<T> {
    /// Structured output `value`, with its JSON text as content.
    pub fn new(value: T) -> Self {
        Self {
            value,
            content: Vec::new(),
        }
    }

    /// Appends a content block (replacing the default JSON text block).
    pub fn with(mut self, content: impl Into<Content>) -> Self {
        self.content.push(content.into());
        self
    }

    /// Appends a text block (replacing the default JSON text block).
    pub fn with_text(self, text: impl Into<String>) -> Self {
        self.with(Content::text(text))
    }
}

impl<T> From<T> for Structured<T> {
    fn from(value: T) -> Self {
        Self::new(value)
    }
}

/// A successful tool return value: what [`IntoCallResult`] accepts in `Ok`.
///
/// Implemented for [`Output`], [`Structured<T>`], [`Content`], `String` and
/// `&'static str` (a text block).
pub trait IntoOutput {
    /// Converts the value into an [`Output`].
    fn into_output(self) -> Result<Output, ToolError>;

    /// The JSON Schema of the structured output, if this type has one.
    fn output_schema(generator: &mut SchemaGenerator) -> Option<Schema> {
        let _ = generator;
        None
    }
}

impl IntoOutput for Output {
    fn into_output(self) -> Result<Output, ToolError> {
        Ok(self)
    }
}

impl IntoOutput for Content {
    fn into_output(self) -> Result<Output, ToolError> {
        Ok(Output::content(self))
    }
}

impl IntoOutput for String {
    fn into_output(self) -> Result<Output, ToolError> {
        Ok(Output::text(self))
    }
}

impl IntoOutput for &'static str {
    fn into_output(self) -> Result<Output, ToolError> {
        Ok(Output::text(self))
    }
}

impl<T: Serialize + JsonSchema> IntoOutput for Structured<T> {
    fn into_output(self) -> Result<Output, ToolError> {
        // Serialised straight to text (not via `Value`) to keep field order.
        let json = serde_json::to_string(&self.value)
            .map_err(|e| ToolError::failed(format!("cannot serialise structured output: {e}")))?;
        let mut content = self.content;
        if content.is_empty() {
            content.push(Content::Text(json.clone()));
        }
        Ok(Output {
            content,
            structured: Some(json),
        })
    }

    fn output_schema(generator: &mut SchemaGenerator) -> Option<Schema> {
        Some(generator.root_schema_for::<T>())
    }
}

/// What a tool function may return: `Result<T, E>` with `T:` [`IntoOutput`]
/// and `E: Into<`[`ToolError`]`>`, or a bare `T:` [`IntoOutput`].
pub trait IntoCallResult {
    /// Converts the return value into what `call-tool` returns.
    fn into_call_result(self) -> Result<CallResult, CallError>;

    /// The JSON Schema of the structured output, if the tool has one.
    fn output_schema(generator: &mut SchemaGenerator) -> Option<Schema>;
}

impl<T: IntoOutput> IntoCallResult for T {
    fn into_call_result(self) -> Result<CallResult, CallError> {
        match self.into_output() {
            Ok(out) => Ok(out.into_call_result()),
            Err(e) => e.into_call(),
        }
    }

    fn output_schema(generator: &mut SchemaGenerator) -> Option<Schema> {
        T::output_schema(generator)
    }
}

impl<T: IntoOutput, E: Into<ToolError>> IntoCallResult for Result<T, E> {
    fn into_call_result(self) -> Result<CallResult, CallError> {
        match self {
            Ok(value) => value.into_call_result(),
            Err(e) => e.into().into_call(),
        }
    }

    fn output_schema(generator: &mut SchemaGenerator) -> Option<Schema> {
        T::output_schema(generator)
    }
}
