//! Request pieces more than one route group parses the same way: a client address from the
//! path and a JSON body, each with a 400 that says what is wrong.

use std::net::IpAddr;

use axum::{Json, extract::rejection::JsonRejection};

use super::error::ApiError;

/// Parse a client address from the path: canonical IPv4 or IPv6 text.
pub fn parse_client(s: &str) -> Result<IpAddr, ApiError> {
    let ip: IpAddr = s.parse().map_err(|_| {
        ApiError::bad_request(format!("{s:?} is not an IP address (expected e.g. 10.8.0.2 or fd00:8::2)"))
    })?;
    if let IpAddr::V6(v6) = ip
        && let Some(v4) = v6.to_ipv4_mapped()
    {
        return Err(ApiError::bad_request(format!("{s:?} is IPv4-mapped: use {v4}")));
    }
    Ok(ip)
}

/// A JSON body, or 400 naming what is wrong with it.
pub fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(t)| t).map_err(|e| ApiError::bad_request(format!("bad request body: {}", e.body_text())))
}
