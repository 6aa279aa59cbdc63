//! `[[webhook]]`: the receivers of webhook events, with their secrets, the events each wants,
//! timeouts and backoff. `redact_url` is how their URLs appear anywhere but in a request.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{ConfigError, ranged, read_secret};
use crate::types::EventKind;

/// One configured receiver (`[[webhook]]` in the config file).
#[derive(Clone)]
pub struct Endpoint {
    /// Unique name, used in the outbox and the delivery log.
    pub name: String,
    pub url: String,
    /// HMAC-SHA256 key.
    pub secret: Vec<u8>,
    /// Kinds sent to this endpoint.
    pub events: Vec<EventKind>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Backoff after the first failure; doubles per failure up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Deliver to loopback, private, link-local and metadata addresses too (default: refused).
    pub allow_private: bool,
}

/// Never prints the secret.
impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("name", &self.name)
            .field("url", &redact_url(&self.url))
            .field("secret", &format_args!("<{} bytes>", self.secret.len()))
            .field("events", &self.events)
            .field("timeout", &self.timeout)
            .field("min_backoff", &self.min_backoff)
            .field("max_backoff", &self.max_backoff)
            .field("allow_private", &self.allow_private)
            .finish()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileWebhook {
    name: String,
    url: String,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    events: Option<Vec<String>>,
    timeout_ms: Option<u64>,
    min_backoff_ms: Option<u64>,
    max_backoff_secs: Option<u64>,
    allow_private: Option<bool>,
}

pub(super) fn build(hooks: Vec<FileWebhook>) -> Result<Vec<Endpoint>, ConfigError> {
    let mut out: Vec<Endpoint> = Vec::new();
    for h in hooks {
        let bad = |reason: String| ConfigError::BadWebhook { name: h.name.clone(), reason };
        if h.name.is_empty() || h.name.len() > 64 || h.name.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("name must be 1 to 64 characters without spaces".into()));
        }
        if out.iter().any(|e| e.name == h.name) {
            return Err(bad("configured twice".into()));
        }
        if !(h.url.starts_with("http://") || h.url.starts_with("https://")) || h.url.len() < 10 {
            return Err(bad(format!("url {:?} must start with http:// or https://", redact_url(&h.url))));
        }
        let secret = match (&h.secret, &h.secret_file) {
            (Some(s), None) => s.clone(),
            (None, Some(p)) => read_secret("webhook secret file", p)?,
            _ => return Err(bad("give exactly one of secret or secret_file".into())),
        };
        if secret.len() < 16 {
            return Err(bad("the secret must be at least 16 characters".into()));
        }
        let events = match &h.events {
            None => EventKind::ALL.to_vec(),
            Some(list) if list.is_empty() => {
                return Err(bad("events is empty: leave it out to send every event".into()));
            }
            Some(list) => {
                let mut v = Vec::new();
                for e in list {
                    let k: EventKind = e
                        .parse()
                        .map_err(|_| bad(format!("unknown event {e:?}: expected one of {}", EventKind::expected())))?;
                    if !v.contains(&k) {
                        v.push(k);
                    }
                }
                v
            }
        };
        let timeout_ms = ranged("[[webhook]] timeout_ms", h.timeout_ms.unwrap_or(5000), 100, 120_000)?;
        let min_backoff_ms = ranged("[[webhook]] min_backoff_ms", h.min_backoff_ms.unwrap_or(1000), 10, 3_600_000)?;
        let max_backoff_secs = ranged("[[webhook]] max_backoff_secs", h.max_backoff_secs.unwrap_or(300), 1, 86_400)?;
        if min_backoff_ms > max_backoff_secs * 1000 {
            return Err(bad(format!(
                "min_backoff_ms ({min_backoff_ms}) is longer than max_backoff_secs ({max_backoff_secs} s)"
            )));
        }
        out.push(Endpoint {
            name: h.name.clone(),
            url: h.url.clone(),
            secret: secret.into_bytes(),
            events,
            timeout: Duration::from_millis(timeout_ms),
            min_backoff: Duration::from_millis(min_backoff_ms),
            max_backoff: Duration::from_secs(max_backoff_secs),
            allow_private: h.allow_private.unwrap_or(false),
        });
    }
    Ok(out)
}

/// `url` without what may be a credential: the userinfo (`user:password@`) and the fragment are
/// removed, a query is replaced by `?…`. `https://user:pw@h/p?token=x` -> `https://h/p?…`. A URL
/// with none of these is returned unchanged.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            let query = u.query().is_some();
            if u.username().is_empty() && u.password().is_none() && !query && u.fragment().is_none() {
                return url.to_string();
            }
            // Cannot fail for a URL that had userinfo (it has a host).
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            let mut s = u.to_string();
            if query {
                s.push_str("?…");
            }
            s
        }
        Err(_) => {
            // Not a URL: cut by hand (query and fragment, then anything up to an '@' in the
            // authority).
            let (mut s, query) = match url.find(['?', '#']) {
                Some(i) => (url[..i].to_string(), url[i..].starts_with('?')),
                None => (url.to_string(), false),
            };
            if let Some(i) = s.find("://") {
                let start = i + 3;
                let end = s[start..].find('/').map_or(s.len(), |j| start + j);
                if let Some(at) = s[start..end].rfind('@') {
                    s.replace_range(start..=start + at, "");
                }
            }
            if query {
                s.push_str("?…");
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn webhook_redact_url() {
        assert_eq!(redact_url("https://user:pw@h/p?token=x"), "https://h/p?…");
        assert_eq!(redact_url("https://user@h:8443/p"), "https://h:8443/p");
        assert_eq!(redact_url("http://h/p?"), "http://h/p?…");
        assert_eq!(redact_url("http://h/p#frag"), "http://h/p");
        // Nothing to hide: unchanged (not normalised).
        assert_eq!(redact_url("http://127.0.0.1:9/hooks/panel"), "http://127.0.0.1:9/hooks/panel");
        assert_eq!(redact_url("https://h"), "https://h");
        // Not parseable: cut by hand.
        assert_eq!(redact_url("http://u:s3cret@bad host/p?k=v"), "http://bad host/p?…");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(redact_url("x?token=1"), "x?…");
    }
}
