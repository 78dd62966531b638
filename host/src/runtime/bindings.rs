//! Host-side bindings generated from the WIT contract in `wit/tool.wit`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "tool-provider",
    // Exports run guest code, which must be able to yield at epoch ticks so a
    // runaway guest never blocks a tokio worker thread.
    exports: { default: async },
    // Queries wait on a database (a blocking-pool thread for SQLite, the
    // network for PostgreSQL): async, so the guest's worker thread is free
    // meanwhile and the call's deadline can stop them.
    imports: {
        "cordon:tool/database.[method]connection.query": async,
    },
    with: {
        "cordon:tool/database.connection": super::host::DbConnection,
    },
});

pub(crate) use self::cordon::tool::types;
