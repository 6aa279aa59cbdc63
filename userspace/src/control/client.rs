//! The client side of the control socket: one HTTP/1 request to the running daemon, with a
//! timeout, answered with the status code and the body.

use std::{path::Path, time::Duration};

use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, body::Bytes};
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the daemon at {path}: {source} (is `tunmeter run` running with this --state-dir?)")]
    Connect { path: String, source: std::io::Error },
    #[error("talking to the daemon: {0}")]
    Http(#[from] hyper::Error),
    #[error("building the request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("the daemon did not answer within {0} s")]
    Timeout(u64),
}

/// One request without a body; returns the status code and the body.
pub async fn request(
    state_dir: &Path,
    method: Method,
    path: &str,
    timeout_secs: u64,
) -> Result<(u16, String), ControlError> {
    send_at(&super::socket_path(state_dir), method, path, None, Duration::from_secs(timeout_secs)).await
}

/// One request with a JSON body; returns the status code and the body.
pub async fn request_json(
    state_dir: &Path,
    method: Method,
    path: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<(u16, String), ControlError> {
    send_at(&super::socket_path(state_dir), method, path, Some(body), timeout).await
}

/// `request_json` on the socket at `sock` (the hook socket, or a control socket elsewhere).
pub async fn request_json_at(
    sock: &Path,
    method: Method,
    path: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> Result<(u16, String), ControlError> {
    send_at(sock, method, path, Some(body), timeout).await
}

async fn send_at(
    sock: &Path,
    method: Method,
    path: &str,
    json: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(u16, String), ControlError> {
    let fut = async {
        let stream = tokio::net::UnixStream::connect(sock)
            .await
            .map_err(|source| ControlError::Connect { path: sock.display().to_string(), source })?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let mut req = Request::builder().method(method).uri(path).header("host", "localhost");
        if json.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(Full::new(Bytes::from(json.unwrap_or_default())))?;
        let resp = send.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, fut).await.map_err(|_| ControlError::Timeout(timeout.as_secs()))?
}
