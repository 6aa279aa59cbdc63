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

/// The OpenAPI schema of a client address in a path or body: IPv4 or IPv6 text (IPv4-mapped
/// IPv6 is refused with 400: use the IPv4 form).
pub struct ClientIp;

impl utoipa::PartialSchema for ClientIp {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat, Type};
        let text = |f| ObjectBuilder::new().schema_type(Type::String).format(Some(SchemaFormat::KnownFormat(f)));
        OneOfBuilder::new()
            .item(text(KnownFormat::Ipv4))
            .item(text(KnownFormat::Ipv6))
            .description(Some("A VPN address, IPv4 (10.8.0.2) or IPv6 (fd00:8::2)"))
            .into()
    }
}

impl utoipa::ToSchema for ClientIp {}

/// The OpenAPI schema of a resource id (session, device, connection): a UUID.
pub struct ResourceId;

impl utoipa::PartialSchema for ResourceId {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)))
            .description(Some("A UUID"))
            .into()
    }
}

impl utoipa::ToSchema for ResourceId {}
