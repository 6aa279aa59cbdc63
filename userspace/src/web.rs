//! The dashboard: three static files (`userspace/web/`) embedded in the binary, served at `/`,
//! `/assets/app.js` and `/assets/app.css`. They hold no data, so they need no token; the page
//! asks for one and talks to the API with it. Nothing is loaded from elsewhere (no CDN, no fonts),
//! and the Content-Security-Policy says so.

use axum::{
    Router,
    http::{HeaderName, HeaderValue, header},
    response::IntoResponse,
    routing::get,
};

pub const INDEX_HTML: &str = include_str!("../web/index.html");
pub const APP_JS: &str = include_str!("../web/app.js");
pub const APP_CSS: &str = include_str!("../web/app.css");

/// Same-origin only: scripts, styles and API/WebSocket calls come from the daemon itself; the
/// favicon is an inline `data:` URL.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Routes for the dashboard's static files.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/assets/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/assets/app.css", get(|| async { asset("text/css; charset=utf-8", APP_CSS) }))
}

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    let headers: [(HeaderName, HeaderValue); 5] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        // Revalidate on every load, so a new daemon binary's dashboard is used at once.
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)),
        (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
    ];
    (headers, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serve the routes on a loopback port and fetch each file over real HTTP.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_each_file_with_its_content_type() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, routes::<()>()).await });
        let http = reqwest::Client::new();
        for (path, ctype, body) in [
            ("/", "text/html; charset=utf-8", INDEX_HTML),
            ("/assets/app.js", "text/javascript; charset=utf-8", APP_JS),
            ("/assets/app.css", "text/css; charset=utf-8", APP_CSS),
        ] {
            let r = http.get(format!("http://{addr}{path}")).send().await.unwrap();
            assert_eq!(r.status(), 200, "{path}");
            let h = r.headers();
            assert_eq!(h[header::CONTENT_TYPE], ctype, "{path}");
            assert_eq!(h[header::CACHE_CONTROL], "no-cache", "{path}");
            assert!(h[header::CONTENT_SECURITY_POLICY].to_str().unwrap().contains("default-src 'none'"), "{path}");
            assert_eq!(r.text().await.unwrap(), body, "{path}");
        }
        let r = http.get(format!("http://{addr}/assets/nope.js")).send().await.unwrap();
        assert_eq!(r.status(), 404);
        server.abort();
    }

    /// The page references only the embedded assets: nothing from another origin.
    #[test]
    fn no_external_resources() {
        for (name, text) in [("index.html", INDEX_HTML), ("app.js", APP_JS), ("app.css", APP_CSS)] {
            for bad in ["http://", "https://", "//fonts.", "@import", "cdn"] {
                assert!(!text.contains(bad), "{name} mentions {bad:?}: the dashboard must work offline");
            }
        }
        for asset in ["/assets/app.js", "/assets/app.css"] {
            assert!(INDEX_HTML.contains(asset), "index.html does not load {asset}");
        }
    }
}
