//! Host-side bindings generated from the WIT contract in `wit/tool.wit`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "tool-provider",
    // Exports run guest code, which must be able to yield at epoch ticks so a
    // runaway guest never blocks a tokio worker thread.
    exports: { default: async },
});

pub(crate) use self::cordon::tool::types;
