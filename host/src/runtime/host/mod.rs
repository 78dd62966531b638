//! Host implementations of the `cordon:tool` imports. The WIT file is their
//! specification; these stay thin.

mod db;
mod quota;
#[allow(unreachable_pub)] // see DbConnection
pub use db::DbConnection;
pub(crate) use quota::{FsQuota, QuotaFsView, add_to_linker as add_quota_to_linker};

use super::bindings::cordon::tool::{config, logging, progress, types};
use super::events::LogLevel;
use super::state::HostState;

impl types::Host for HostState {}

impl logging::Host for HostState {
    fn log(&mut self, level: logging::Level, logger: Option<String>, data: String) {
        let level = match level {
            logging::Level::Debug => LogLevel::Debug,
            logging::Level::Info => LogLevel::Info,
            logging::Level::Notice => LogLevel::Notice,
            logging::Level::Warning => LogLevel::Warning,
            logging::Level::Error => LogLevel::Error,
            logging::Level::Critical => LogLevel::Critical,
            logging::Level::Alert => LogLevel::Alert,
            logging::Level::Emergency => LogLevel::Emergency,
        };
        self.events.log(level, logger, data);
    }
}

impl progress::Host for HostState {
    fn report(&mut self, progress: f64, total: Option<f64>, message: Option<String>) {
        self.events.progress(progress, total, message);
    }
}

impl config::Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }

    fn keys(&mut self) -> Vec<String> {
        // BTreeMap: already sorted, as the WIT promises.
        self.config.keys().cloned().collect()
    }
}
