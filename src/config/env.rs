//! The environment, read through a trait so that tests can pass a map.

use std::collections::BTreeMap;

use super::{ConfigError, Origin};

/// Reads the environment; a function so tests can pass a map instead of the process
/// environment.
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
}

/// The real process environment. Empty values count as unset, as they did in the original.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }
}

impl Env for BTreeMap<&str, &str> {
    fn get(&self, name: &str) -> Option<String> {
        BTreeMap::get(self, name).map(|v| v.to_string())
    }
}

pub(super) fn env_parse<T: std::str::FromStr>(
    env: &dyn Env,
    var: &'static str,
) -> Result<Option<T>, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match env.get(var) {
        None => Ok(None),
        Some(raw) => raw
            .trim()
            .parse()
            .map(Some)
            .map_err(|e: T::Err| ConfigError::Invalid {
                origin: Origin::Env(var),
                key: var.to_string(),
                reason: format!("`{raw}`: {e}"),
            }),
    }
}
