//! The edge's defence against DNS rebinding and cross-site requests: a
//! request's `Host` must be one of `server.allowed_hosts`, and a request
//! with an `Origin` (a browser's) must come from one of
//! `server.allowed_origins`. The rules are rmcp's for `/mcp` (tests below),
//! so every route answers alike.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode, Uri};

use crate::config::ServerConfig;

/// The hosts and origins a server accepts. Cheap to clone.
#[derive(Clone)]
pub struct AllowedPeers {
    hosts: Arc<[String]>,
    origins: Arc<[String]>,
}

impl AllowedPeers {
    /// `server.allowed_hosts` and `server.allowed_origins`.
    pub fn new(config: &ServerConfig) -> Self {
        AllowedPeers {
            hosts: config.allowed_hosts.clone().into(),
            origins: config.allowed_origins.clone().into(),
        }
    }
}

/// Why a request was turned away: a plain-text status and message.
#[derive(Debug)]
struct Refusal(StatusCode, String);

impl Refusal {
    fn text(status: StatusCode, message: impl Into<String>) -> Self {
        Refusal(status, message.into())
    }

    fn forbidden(message: &str) -> Self {
        Refusal(StatusCode::FORBIDDEN, format!("Forbidden: {message}"))
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

/// Rejects requests whose `Host` is not allowed (DNS rebinding) or whose
/// `Origin` is not allowed, the way rmcp checks `/mcp`: 400 for a malformed
/// `Host`, 403 otherwise. The server applies it to every route but
/// `/healthz` and `/readyz` (`server::router`); rmcp checks `/mcp` again.
pub async fn check_host_and_origin(
    State(allowed): State<AllowedPeers>,
    request: Request,
    next: Next,
) -> Response {
    let checked = check_host(request.uri(), request.headers(), &allowed.hosts)
        .and_then(|()| check_origin(request.headers(), &allowed.origins));
    match checked {
        Ok(()) => next.run(request).await,
        Err(refusal) => refusal.into_response(),
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Authority {
    host: String,
    port: Option<u16>,
}

fn normalize_host(host: &str) -> String {
    host.trim_matches('[')
        .trim_matches(']')
        .to_ascii_lowercase()
}

fn authority(host: &str, port: Option<u16>) -> Authority {
    Authority {
        host: normalize_host(host),
        port,
    }
}

/// As rmcp: the `Host` header (or the URI's authority, for HTTP/2) must match
/// an entry of `allowed` (host, or host:port); an empty list allows any.
fn check_host(uri: &Uri, headers: &HeaderMap, allowed: &[String]) -> Result<(), Refusal> {
    let bad = |m: &str| Refusal::text(StatusCode::BAD_REQUEST, format!("Bad Request: {m}"));
    let host = match headers.get(http::header::HOST) {
        Some(value) => {
            let value = value
                .to_str()
                .map_err(|_| bad("Invalid Host header encoding"))?;
            let parsed =
                http::uri::Authority::try_from(value).map_err(|_| bad("Invalid Host header"))?;
            authority(parsed.host(), parsed.port_u16())
        }
        None => {
            let parsed = uri.authority().ok_or_else(|| bad("missing Host header"))?;
            authority(parsed.host(), parsed.port_u16())
        }
    };
    if allowed.is_empty() {
        return Ok(());
    }
    let is_allowed = allowed.iter().any(|entry| {
        let entry = entry.trim();
        if entry.is_empty() {
            return false;
        }
        let entry = match http::uri::Authority::try_from(entry) {
            Ok(a) => authority(a.host(), a.port_u16()),
            Err(_) => authority(entry, None),
        };
        entry.host == host.host && entry.port.is_none_or(|port| host.port == Some(port))
    });
    if is_allowed {
        Ok(())
    } else {
        tracing::warn!(?host, "rejected a request with a disallowed Host header");
        Err(Refusal::forbidden("Host header is not allowed"))
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Origin {
    Null,
    Tuple {
        scheme: String,
        host: String,
        port: Option<u16>,
    },
}

fn parse_origin(value: &str) -> Option<Origin> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if value.eq_ignore_ascii_case("null") {
        return Some(Origin::Null);
    }
    let uri = Uri::try_from(value).ok()?;
    let authority = uri.authority()?;
    Some(Origin::Tuple {
        scheme: uri.scheme_str()?.to_ascii_lowercase(),
        host: normalize_host(authority.host()),
        port: authority.port_u16(),
    })
}

/// Whether `origin` matches an allow-list entry: `scheme://host:port`,
/// `scheme://host:*` (any port), `scheme://host` (any port, as rmcp still
/// does) or `null`.
fn origin_matches(entry: &str, origin: &Origin) -> bool {
    let entry = entry.trim();
    let (base, any_port) = match entry.strip_suffix(":*") {
        Some(base) => (base, true),
        None => (entry, false),
    };
    match (parse_origin(base), origin) {
        (Some(Origin::Null), Origin::Null) => !any_port,
        (
            Some(Origin::Tuple { scheme, host, port }),
            Origin::Tuple {
                scheme: o_scheme,
                host: o_host,
                port: o_port,
            },
        ) => {
            if any_port && port.is_some() {
                return false;
            }
            let default_port = match o_scheme.as_str() {
                "http" => Some(80),
                "https" => Some(443),
                _ => None,
            };
            scheme == *o_scheme
                && host == *o_host
                && match port {
                    Some(port) if !any_port => o_port.or(default_port) == Some(port),
                    _ => true,
                }
        }
        _ => false,
    }
}

/// A request with an `Origin` (a browser) must come from an allowed origin;
/// an empty list allows no browser origin at all.
fn check_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), Refusal> {
    let Some(value) = headers.get(http::header::ORIGIN) else {
        return Ok(());
    };
    let value = value
        .to_str()
        .map_err(|_| Refusal::forbidden("Invalid Origin header encoding"))?;
    let origin = parse_origin(value).ok_or_else(|| Refusal::forbidden("Invalid Origin header"))?;
    if allowed.iter().any(|entry| origin_matches(entry, &origin)) {
        Ok(())
    } else {
        tracing::warn!(
            ?origin,
            "rejected a request with a disallowed Origin header"
        );
        Err(Refusal::forbidden("Origin header is not allowed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        map
    }

    fn host_ok(host: &str, allowed: &[&str]) -> bool {
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        check_host(
            &Uri::from_static("/sse"),
            &headers(&[("host", host)]),
            &allowed,
        )
        .is_ok()
    }

    fn origin_ok(origin: &str, allowed: &[&str]) -> bool {
        let allowed: Vec<String> = allowed.iter().map(|s| s.to_string()).collect();
        check_origin(&headers(&[("origin", origin)]), &allowed).is_ok()
    }

    #[test]
    fn hosts_match_like_rmcp() {
        let loopback = ["localhost", "127.0.0.1", "::1"];
        assert!(host_ok("localhost:8750", &loopback));
        assert!(host_ok("LOCALHOST", &loopback));
        assert!(host_ok("127.0.0.1:1", &loopback));
        assert!(host_ok("[::1]:8750", &loopback));
        assert!(!host_ok("evil.example", &loopback));
        assert!(!host_ok("localhost.evil.example:8750", &loopback));
        assert!(host_ok("mcp.example:443", &["mcp.example:443"]));
        assert!(!host_ok("mcp.example:8443", &["mcp.example:443"]));
        assert!(host_ok("anything", &[]));
    }

    #[test]
    fn origins_match_like_rmcp() {
        assert!(!origin_ok("http://localhost:3000", &[]));
        assert!(origin_ok("http://localhost:3000", &["http://localhost:*"]));
        assert!(!origin_ok(
            "https://localhost:3000",
            &["http://localhost:*"]
        ));
        assert!(origin_ok(
            "https://app.example",
            &["https://app.example:443"]
        ));
        assert!(!origin_ok(
            "https://app.example:8443",
            &["https://app.example:443"]
        ));
        assert!(origin_ok(
            "https://app.example:8443",
            &["https://app.example"]
        ));
        assert!(!origin_ok(
            "https://evil.example",
            &["https://app.example:443"]
        ));
        assert!(origin_ok("null", &["null"]));
        assert!(!origin_ok("null", &["http://localhost:*"]));
        assert!(!origin_ok("not a url", &["http://localhost:*"]));
        assert!(check_origin(&HeaderMap::new(), &[]).is_ok());
    }
}
