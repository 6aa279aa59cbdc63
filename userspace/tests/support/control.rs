//! Requests with JSON bodies on the daemon's control socket (acts as admin), for the identity
//! tests.

use std::{path::Path, time::Duration};

use serde_json::Value;

async fn request(state: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
    use http_body_util::{BodyExt as _, Full};
    use hyper_util::rt::TokioIo;
    let sock = state.join("control.sock");
    let stream = tokio::net::UnixStream::connect(&sock).await.unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(hyper::body::Bytes::from(body.map(|b| b.to_string()).unwrap_or_default())))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), send.send_request(req))
        .await
        .unwrap_or_else(|_| panic!("{method} {path}: no answer within 30 s"))
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// `method path` with an optional JSON body; the answer parsed as JSON (or a JSON string).
pub fn call(state: &Path, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (status, text) = rt.block_on(request(state, method, path, body));
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}
