//! Who may do what: tenants, their roles, the tools each role may see and
//! call, and each tenant's quotas.
//!
//! Roles map to tool-name globs with `allow` and `deny`; across all of a
//! caller's roles, a matching `deny` wins over any `allow`, and a tool no
//! role allows is denied. A role is defined per tenant
//! (`[tenants.T.roles.R]`) or once for every tenant (`[roles.R]`); the
//! tenant's own definition takes precedence.
//!
//! When no tenant is declared at all the policy is *open*: every caller sees
//! every tool. The config check allows that only with `auth.mode = "none"`
//! (local development on loopback).

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use globset::{Glob, GlobSet, GlobSetBuilder};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::LimitsConfig;
use crate::dispatch::Principal;

/// `[roles.NAME]` and `[tenants.T.roles.NAME]`: the tools a role may use.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    /// Tool-name globs the role may see and call (`*`, `?`, `[a-z]`, `{a,b}`).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Tool-name globs the role may not use, whatever else allows them.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// `[tenants.NAME]`: one tenant.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TenantConfig {
    /// Role definitions of this tenant (override `[roles]` of the same name).
    pub roles: BTreeMap<String, RoleConfig>,
    /// Quotas and limit overrides.
    pub limits: TenantLimits,
    /// Config values per component for this tenant, on top of
    /// `[tools.NAME.config]`: `[tenants.T.config.NAME]`.
    pub config: BTreeMap<String, BTreeMap<String, String>>,
    /// What the audit log keeps of this tenant's calls.
    pub audit: TenantAuditConfig,
}

/// `[tenants.NAME.limits]`
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TenantLimits {
    /// Calls of this tenant running at once; more are refused.
    pub max_concurrent_calls: Option<u32>,
    /// Calls per minute (a token bucket holding one minute's worth).
    pub calls_per_minute: Option<u32>,
    /// Memory of each call in MiB, instead of the tool's (at most
    /// `runtime.engine.max_memory_mib`).
    pub memory_mib: Option<u64>,
    /// Deadline of each call in ms, instead of the tool's.
    pub timeout_ms: Option<u64>,
}

impl TenantLimits {
    /// The memory and deadline overrides, as tool limits.
    pub fn as_limits(&self) -> LimitsConfig {
        LimitsConfig {
            memory_mib: self.memory_mib,
            timeout_ms: self.timeout_ms,
            ..LimitsConfig::default()
        }
    }
}

/// `[tenants.NAME.audit]`
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TenantAuditConfig {
    /// Keep the full arguments of each call (otherwise only their digest).
    pub log_arguments: bool,
    /// Object keys whose values are replaced by `"[redacted]"` in kept
    /// arguments, at any depth.
    pub redact: Vec<String>,
}

/// A role, compiled.
#[derive(Debug)]
struct Role {
    allow: GlobSet,
    deny: GlobSet,
}

impl Role {
    fn compile(config: &RoleConfig) -> Result<Role, globset::Error> {
        Ok(Role {
            allow: glob_set(&config.allow)?,
            deny: glob_set(&config.deny)?,
        })
    }
}

fn glob_set(patterns: &[String]) -> Result<GlobSet, globset::Error> {
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        set.add(Glob::new(pattern)?);
    }
    set.build()
}

/// Checks that a glob compiles, for the config check.
pub fn check_glob(pattern: &str) -> Result<(), String> {
    Glob::new(pattern)
        .map(drop)
        .map_err(|e| e.kind().to_string())
}

/// One tenant, compiled, with its live quota state.
#[derive(Debug)]
pub struct Tenant {
    roles: HashMap<String, Arc<Role>>,
    /// The tenant's limits.
    pub limits: TenantLimits,
    /// Per-component config values.
    pub config: BTreeMap<String, BTreeMap<String, String>>,
    /// Audit settings.
    pub audit: TenantAuditConfig,
    concurrency: Option<Arc<Semaphore>>,
    rate: Option<DefaultDirectRateLimiter>,
}

/// Why a call was refused before it ran.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    /// Too many calls of the tenant are running.
    #[error("tenant `{tenant}` already has {limit} call(s) running; retry when one finishes")]
    Concurrency {
        /// The tenant.
        tenant: String,
        /// Its limit.
        limit: u32,
    },
    /// The tenant's call rate is used up.
    #[error("tenant `{tenant}` is over its rate of {limit} calls per minute; retry in {} ms", retry_after.as_millis())]
    Rate {
        /// The tenant.
        tenant: String,
        /// Its limit.
        limit: u32,
        /// When a call would be accepted again.
        retry_after: Duration,
    },
}

/// Held while a call runs; releases the tenant's concurrency slot on drop.
#[derive(Debug)]
pub struct CallPermit {
    _slot: Option<OwnedSemaphorePermit>,
}

impl Tenant {
    /// Takes a concurrency slot and a rate token, or says why not.
    pub fn admit(&self, tenant: &str) -> Result<CallPermit, QuotaError> {
        let slot = match &self.concurrency {
            Some(semaphore) => Some(semaphore.clone().try_acquire_owned().map_err(|_| {
                QuotaError::Concurrency {
                    tenant: tenant.to_owned(),
                    limit: self.limits.max_concurrent_calls.unwrap_or_default(),
                }
            })?),
            None => None,
        };
        if let Some(rate) = &self.rate
            && let Err(not_until) = rate.check()
        {
            return Err(QuotaError::Rate {
                tenant: tenant.to_owned(),
                limit: self.limits.calls_per_minute.unwrap_or_default(),
                retry_after: not_until.wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                )),
            });
        }
        Ok(CallPermit { _slot: slot })
    }
}

/// The compiled access policy of a configuration.
#[derive(Debug)]
pub struct Policy {
    tenants: HashMap<String, Tenant>,
}

impl Policy {
    /// Compiles the policy; `problems` of the config check cover every
    /// error this can return.
    pub fn new(
        roles: &BTreeMap<String, RoleConfig>,
        tenants: &BTreeMap<String, TenantConfig>,
    ) -> Result<Policy, String> {
        let mut global = HashMap::new();
        for (name, role) in roles {
            let role = Role::compile(role).map_err(|e| format!("roles.{name}: {e}"))?;
            global.insert(name.clone(), Arc::new(role));
        }
        let mut compiled = HashMap::new();
        for (id, tenant) in tenants {
            let mut roles = global.clone();
            for (name, role) in &tenant.roles {
                let role =
                    Role::compile(role).map_err(|e| format!("tenants.{id}.roles.{name}: {e}"))?;
                roles.insert(name.clone(), Arc::new(role));
            }
            let limits = tenant.limits.clone();
            compiled.insert(
                id.clone(),
                Tenant {
                    roles,
                    concurrency: limits
                        .max_concurrent_calls
                        .map(|n| Arc::new(Semaphore::new(n as usize))),
                    rate: limits
                        .calls_per_minute
                        .and_then(NonZeroU32::new)
                        .map(|n| RateLimiter::direct(Quota::per_minute(n))),
                    limits,
                    config: tenant.config.clone(),
                    audit: tenant.audit.clone(),
                },
            );
        }
        Ok(Policy { tenants: compiled })
    }

    /// True when no tenant is declared: everyone may use every tool.
    pub fn is_open(&self) -> bool {
        self.tenants.is_empty()
    }

    /// The declared tenant `id`.
    pub fn tenant(&self, id: &str) -> Option<&Tenant> {
        self.tenants.get(id)
    }

    /// Declared tenant ids, sorted.
    pub fn tenant_ids(&self) -> Vec<&str> {
        let mut ids: Vec<_> = self.tenants.keys().map(String::as_str).collect();
        ids.sort_unstable();
        ids
    }

    /// True when `principal` has at least one role its tenant defines (a
    /// token with none may do nothing: `insufficient_scope`).
    pub fn has_known_role(&self, principal: &Principal) -> bool {
        self.is_open()
            || self
                .tenants
                .get(&principal.tenant)
                .is_some_and(|tenant| principal.roles.iter().any(|r| tenant.roles.contains_key(r)))
    }

    /// May `principal` see and call `tool`?
    pub fn allows(&self, principal: &Principal, tool: &str) -> bool {
        if self.is_open() {
            return true;
        }
        let Some(tenant) = self.tenants.get(&principal.tenant) else {
            return false;
        };
        let roles = || {
            principal
                .roles
                .iter()
                .filter_map(|r| tenant.roles.get(r).map(Arc::as_ref))
        };
        // One candidate path for every glob test (globset would build it per set).
        let tool = globset::Candidate::new(tool);
        !roles().any(|r| r.deny.is_match_candidate(&tool))
            && roles().any(|r| r.allow.is_match_candidate(&tool))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(tenant: &str, roles: &[&str]) -> Principal {
        Principal {
            tenant: tenant.into(),
            subject: "s".into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
        }
    }

    fn policy() -> Policy {
        let config: crate::config::Config = toml::from_str(
            r#"
            [roles.reader]
            allow = ["text_*"]
            [roles.writer]
            allow = ["*"]
            deny = ["admin_*"]
            [tenants.acme.roles.reader]
            allow = ["text_upper", "notes_list"]
            [tenants.beta]
            "#,
        )
        .unwrap();
        Policy::new(&config.roles, &config.tenants).unwrap()
    }

    #[test]
    fn deny_wins_and_tenant_roles_override_global_ones() {
        let p = policy();
        assert!(p.allows(&principal("acme", &["reader"]), "notes_list"));
        assert!(!p.allows(&principal("acme", &["reader"]), "text_lower"));
        assert!(p.allows(&principal("beta", &["reader"]), "text_lower"));
        assert!(p.allows(&principal("beta", &["writer"]), "notes_list"));
        assert!(!p.allows(&principal("beta", &["writer", "reader"]), "admin_reset"));
        assert!(!p.allows(&principal("beta", &[]), "text_lower"));
        assert!(!p.allows(&principal("gamma", &["writer"]), "text_lower"));
        assert!(!p.has_known_role(&principal("beta", &["nobody"])));
    }

    #[test]
    fn quotas_refuse_beyond_the_limit_and_release_on_drop() {
        let config: crate::config::Config = toml::from_str(
            "[tenants.acme.limits]\nmax_concurrent_calls = 1\ncalls_per_minute = 3\n",
        )
        .unwrap();
        let p = Policy::new(&config.roles, &config.tenants).unwrap();
        let acme = p.tenant("acme").unwrap();
        let first = acme.admit("acme").unwrap();
        assert!(matches!(
            acme.admit("acme"),
            Err(QuotaError::Concurrency { .. })
        ));
        drop(first);
        drop(acme.admit("acme").unwrap());
        drop(acme.admit("acme").unwrap());
        assert!(matches!(acme.admit("acme"), Err(QuotaError::Rate { .. })));
    }
}
