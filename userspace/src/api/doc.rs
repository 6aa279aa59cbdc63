//! The OpenAPI document: every route group's paths and schemas merged into one, with the
//! bearer security scheme, the statuses every authenticated route shares, and the links
//! between a create and the get and delete of what it made; served at `/api/v1/openapi.json`.

use axum::{http::header, response::IntoResponse};
use utoipa::{
    OpenApi,
    openapi::{
        self, RefOr, Response, ResponseBuilder,
        path::Operation,
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};

use super::{
    auth::Caller,
    clients, hooks,
    params::{ClientIp, ResourceId},
    registry, routes, stream, webhooks,
};

#[derive(OpenApi)]
#[openapi(
    info(title = "tunmeter", description = "Per-VPN-client usage ledger, resets and live rates"),
    paths(
        routes::healthz, routes::livez, routes::me, clients::list_clients, routes::get_client, routes::usage,
        routes::reset, routes::resets, routes::stats, routes::metrics, stream::stream, stream::ticket,
        hooks::openvpn
    ),
    components(schemas(ClientIp, ResourceId)),
    modifiers(&BearerScheme)
)]
pub struct ApiDoc;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, api: &mut openapi::OpenApi) {
        api.components.get_or_insert_with(Default::default).add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The whole document.
pub fn document() -> openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.merge(registry::RegistryDoc::openapi());
    doc.merge(webhooks::WebhookDoc::openapi());
    shared_statuses(&mut doc);
    doc
}

fn error(description: &str) -> RefOr<Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            openapi::ContentBuilder::new().schema(Some(openapi::Ref::from_schema_name("ErrorBody"))).build(),
        )
        .into()
}

/// What the authentication extractor and the request parsers answer on every route they
/// guard, so that no route can leave one out: 401 (no, unknown or revoked token) and 503 (the
/// token cannot be checked: database unavailable) wherever a token is needed, 403 (read token)
/// on every mutating method, 400 wherever there is a parameter or a body to parse.
fn shared_statuses(doc: &mut openapi::OpenApi) {
    for (path, item) in doc.paths.paths.iter_mut() {
        // Any token may ask for a stream ticket: a POST that changes nothing.
        let any_role = path == "/api/v1/stream/ticket";
        let ops: [(bool, &mut Option<Operation>); 4] =
            [(false, &mut item.get), (true, &mut item.post), (true, &mut item.delete), (true, &mut item.put)];
        for (mutating, op) in ops {
            let Some(op) = op.as_mut() else { continue };
            let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
            let parses = op.parameters.as_ref().is_some_and(|p| !p.is_empty()) || op.request_body.is_some();
            let r = &mut op.responses.responses;
            let mut add = |code: &str, description: &str| {
                r.entry(code.to_string()).or_insert_with(|| error(description));
            };
            if parses {
                add("400", "Malformed parameter or body");
            }
            if secured {
                add("401", "No token, or an unknown or revoked one");
                add("503", "Unavailable (the token cannot be checked, or a limit is reached): see the message");
                if mutating && !any_role {
                    add("403", "The token's role is read; this needs an admin token");
                }
            }
        }
    }
}

/// OpenAPI links from each create to the get and the delete (or close) of what it created,
/// by the `id` of the 201 body: the stateful fuzzer and a reader both follow them. Written into
/// the JSON, because utoipa 5.5 serialises `Link` with snake_case keys (`operation_id`), which
/// no OpenAPI tool reads.
fn links(doc: &mut serde_json::Value) {
    let plan = [
        ("/api/v1/devices", [("GetDevice", "get_device"), ("DeleteDevice", "delete_device")]),
        ("/api/v1/connections", [("GetConnection", "get_connection"), ("DeleteConnection", "delete_connection")]),
        ("/api/v1/sessions", [("GetSession", "get_session"), ("CloseSession", "close_session")]),
    ];
    for (path, targets) in plan {
        let Some(created) = doc.pointer_mut(&format!("/paths/{}/post/responses/201", path.replace('/', "~1"))) else {
            continue;
        };
        let links: serde_json::Map<_, _> = targets
            .iter()
            .map(|(name, op)| {
                let link = serde_json::json!({
                    "operationId": op,
                    "parameters": { "id": "$response.body#/id" },
                    "description": format!("{op} on the object this request created"),
                });
                (name.to_string(), link)
            })
            .collect();
        created["links"] = serde_json::Value::Object(links);
    }
}

/// The document as served.
pub fn document_json() -> serde_json::Value {
    let mut v = serde_json::to_value(document()).expect("the document serialises");
    links(&mut v);
    v
}

pub async fn openapi(_c: Caller) -> impl IntoResponse {
    let body = serde_json::to_string_pretty(&document_json()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_authenticated_route_documents_401_503_and_every_mutation_403() {
        let doc = document();
        let mut checked = 0;
        for (path, item) in &doc.paths.paths {
            for (mutating, op) in [(false, &item.get), (true, &item.post), (true, &item.delete)] {
                let Some(op) = op else { continue };
                if !op.security.as_ref().is_some_and(|s| !s.is_empty()) {
                    continue;
                }
                let r = &op.responses.responses;
                for code in ["401", "503"] {
                    assert!(r.contains_key(code), "{path}: {code} missing");
                }
                if mutating && path != "/api/v1/stream/ticket" {
                    assert!(r.contains_key("403"), "{path}: 403 missing");
                }
                checked += 1;
            }
        }
        assert!(checked > 20, "only {checked} operations");
        let v = document_json();
        let link = &v["paths"]["/api/v1/devices"]["post"]["responses"]["201"]["links"]["GetDevice"];
        assert_eq!(link["operationId"], "get_device", "{link}");
        assert!(
            v["components"]["schemas"]["ResourceId"].is_object() && v["components"]["schemas"]["ClientIp"].is_object()
        );
        let q = &doc.paths.paths["/api/v1/webhooks/events"].get.as_ref().unwrap().parameters.as_ref().unwrap()[0];
        assert!(q.parameter_in == utoipa::openapi::path::ParameterIn::Query, "query parameters are in the query");
    }
}
