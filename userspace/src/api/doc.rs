//! The OpenAPI document: every route group's paths and schemas merged into one, with the
//! bearer security scheme, served at `/api/v1/openapi.json`.

use axum::{http::header, response::IntoResponse};
use utoipa::OpenApi;

use super::{auth::Caller, hooks, registry, routes, stream, webhooks};

#[derive(OpenApi)]
#[openapi(
    info(title = "tunmeter", description = "Per-VPN-client usage ledger, resets and live rates"),
    paths(
        routes::healthz, routes::me, routes::list_clients, routes::get_client, routes::usage, routes::reset,
        routes::resets, routes::stats, routes::metrics, stream::stream, hooks::openvpn
    ),
    modifiers(&BearerScheme)
)]
pub struct ApiDoc;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        api.components.get_or_insert_with(Default::default).add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The whole document.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.merge(registry::RegistryDoc::openapi());
    doc.merge(webhooks::WebhookDoc::openapi());
    doc
}

pub async fn openapi(_c: Caller) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], document().to_pretty_json().unwrap_or_default())
}
