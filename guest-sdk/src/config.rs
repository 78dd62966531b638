//! Configuration values the operator granted to this tool.
//!
//! A tool sees only the keys granted to it (for the calling tenant); nothing
//! else of the host's configuration or environment is visible.
//!
//! ```no_run
//! use cordon_guest::config;
//!
//! let limit: u64 = config::parse("notes.max_bytes").unwrap().unwrap_or(1 << 20);
//! for key in config::keys() {
//!     let _ = config::get(&key);
//! }
//! ```

use std::fmt::Display;
use std::str::FromStr;

use crate::ToolError;

/// The value of `key`, or `None` if it was not granted.
pub fn get(key: &str) -> Option<String> {
    imp::get(key)
}

/// The keys granted to this tool, sorted.
pub fn keys() -> Vec<String> {
    imp::keys()
}

/// The value of `key` parsed as `T`: `Ok(None)` if not granted, a
/// [`ToolError`] naming the key if the value does not parse.
pub fn parse<T>(key: &str) -> Result<Option<T>, ToolError>
where
    T: FromStr,
    T::Err: Display,
{
    match get(key) {
        None => Ok(None),
        Some(text) => text.trim().parse().map(Some).map_err(|e| {
            ToolError::new(format!(
                "configuration value {key} = {text:?} is not valid: {e}"
            ))
        }),
    }
}

/// Natively (not on `wasm32`), sets the value [`get`] returns for `key`, for
/// unit tests. Values are per thread.
#[cfg(not(target_arch = "wasm32"))]
pub fn set_for_test(key: &str, value: Option<&str>) {
    imp::VALUES.with(|values| {
        let mut values = values.borrow_mut();
        match value {
            Some(v) => values.insert(key.to_owned(), v.to_owned()),
            None => values.remove(key),
        };
    });
}

#[cfg(target_arch = "wasm32")]
mod imp {
    pub fn get(key: &str) -> Option<String> {
        crate::bindings::cordon::tool::config::get(key)
    }

    pub fn keys() -> Vec<String> {
        crate::bindings::cordon::tool::config::keys()
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    thread_local! {
        pub static VALUES: RefCell<BTreeMap<String, String>> = const { RefCell::new(BTreeMap::new()) };
    }

    pub fn get(key: &str) -> Option<String> {
        VALUES.with(|v| v.borrow().get(key).cloned())
    }

    pub fn keys() -> Vec<String> {
        VALUES.with(|v| v.borrow().keys().cloned().collect())
    }
}
