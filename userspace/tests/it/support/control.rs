//! Requests with JSON bodies on the daemon's control socket (acts as admin), for the identity
//! tests.

use std::{path::Path, time::Duration};

use serde_json::Value;

/// `method path` with an optional JSON body; the answer parsed as JSON (or a JSON string).
pub fn call(state: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let m = hyper::Method::from_bytes(method.as_bytes()).unwrap();
    let timeout = Duration::from_secs(30);
    let sent = match body {
        Some(b) => rt.block_on(tunmeter::control::request_json(state, m, path, b.to_string().into_bytes(), timeout)),
        None => rt.block_on(tunmeter::control::request(state, m, path, timeout.as_secs())),
    };
    let (status, text) = sent.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}
