//! The web console (`/console`) and the API docs page (`/docs`) on the
//! registry listener: static pages embedded in the binary, which read the
//! registry's JSON endpoints from the browser (see docs/CONSOLE.md).
//!
//! Nothing here reads host state: the pages call the same endpoints as any
//! client, under the same access rules (listing and admin tokens), so the
//! console can show or do nothing a client could not. What it adds is
//! browser hardening: every page is served with a Content-Security-Policy
//! that allows scripts and styles from this origin only (no inline script,
//! no network access elsewhere), `X-Frame-Options: DENY` and
//! `X-Content-Type-Options: nosniff`.

use axum::Router;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::IntoResponse;
use axum::routing::get;

/// The Swagger UI release vendored under `host/assets/vendor/` (README
/// says how to update it); part of its URL, so browsers may cache it for
/// good.
const SWAGGER_UI: &str = "swagger-ui-dist-5.35.0";

/// The console's policy: nothing but this origin's own files and JSON.
const CONSOLE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// The docs page's policy. Swagger UI sets `style` attributes and draws
/// icons as `data:` images, so those two are allowed, and its "Try it out"
/// calls the gateway, another origin (the gateway's CORS rules decide what
/// the page may read); scripts still come from this origin only.
const DOCS_CSP: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
    connect-src 'self' http: https:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

/// One embedded file and how it is served.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    csp: &'static str,
    /// Versioned vendor files never change under their URL.
    immutable: bool,
}

impl IntoResponse for &'static Asset {
    fn into_response(self) -> axum::response::Response {
        let cache = if self.immutable {
            "public, max-age=31536000, immutable"
        } else {
            "no-cache"
        };
        let headers: [(HeaderName, HeaderValue); 7] = [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(self.content_type),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(self.csp),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            (
                HeaderName::from_static("cross-origin-opener-policy"),
                HeaderValue::from_static("same-origin"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
        ];
        (headers, self.body).into_response()
    }
}

macro_rules! asset {
    ($path:literal, $content_type:expr, $csp:expr, $immutable:expr) => {
        &Asset {
            body: include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/", $path)),
            content_type: $content_type,
            csp: $csp,
            immutable: $immutable,
        }
    };
}

static CONSOLE_PAGE: &Asset = asset!("console/index.html", HTML, CONSOLE_CSP, false);
static CONSOLE_SCRIPT: &Asset = asset!("console/console.js", JS, CONSOLE_CSP, false);
static CONSOLE_STYLE: &Asset = asset!("console/console.css", CSS, CONSOLE_CSP, false);
static ICON: &Asset = asset!("console/favicon.svg", SVG, CONSOLE_CSP, false);
static DOCS_PAGE: &Asset = asset!("docs/index.html", HTML, DOCS_CSP, false);
static DOCS_SCRIPT: &Asset = asset!("docs/docs.js", JS, DOCS_CSP, false);
static SWAGGER_SCRIPT: &Asset = asset!(
    "vendor/swagger-ui-dist-5.35.0/swagger-ui-bundle.js",
    JS,
    DOCS_CSP,
    true
);
static SWAGGER_STYLE: &Asset = asset!(
    "vendor/swagger-ui-dist-5.35.0/swagger-ui.css",
    CSS,
    DOCS_CSP,
    true
);

/// The console's and the docs page's routes, to merge into the registry
/// listener's router.
pub fn router() -> Router {
    let vendor = format!("/docs/vendor/{SWAGGER_UI}");
    Router::new()
        .route("/console", get(|| async { CONSOLE_PAGE }))
        .route("/console/console.js", get(|| async { CONSOLE_SCRIPT }))
        .route("/console/console.css", get(|| async { CONSOLE_STYLE }))
        .route("/console/favicon.svg", get(|| async { ICON }))
        .route("/docs", get(|| async { DOCS_PAGE }))
        .route("/docs/docs.js", get(|| async { DOCS_SCRIPT }))
        .route(
            &format!("{vendor}/swagger-ui-bundle.js"),
            get(|| async { SWAGGER_SCRIPT }),
        )
        .route(
            &format!("{vendor}/swagger-ui.css"),
            get(|| async { SWAGGER_STYLE }),
        )
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;

    #[tokio::test]
    async fn every_page_and_file_is_served_hardened() {
        for (path, content_type) in [
            ("/console", HTML),
            ("/console/console.js", JS),
            ("/console/console.css", CSS),
            ("/console/favicon.svg", SVG),
            ("/docs", HTML),
            ("/docs/docs.js", JS),
            (
                "/docs/vendor/swagger-ui-dist-5.35.0/swagger-ui-bundle.js",
                JS,
            ),
            ("/docs/vendor/swagger-ui-dist-5.35.0/swagger-ui.css", CSS),
        ] {
            let answer = router()
                .oneshot(Request::get(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
            assert_eq!(answer.status(), StatusCode::OK, "{path}");
            let headers = answer.headers();
            assert_eq!(headers[header::CONTENT_TYPE], content_type, "{path}");
            assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY");
            let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
            assert!(csp.contains("script-src 'self';"), "{path}: {csp}");
            assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
        }
    }

    #[test]
    fn the_pages_load_no_inline_script_and_nothing_from_elsewhere() {
        for page in [CONSOLE_PAGE.body, DOCS_PAGE.body] {
            for script in page.split("<script").skip(1) {
                let tag = &script[..script.find('>').unwrap()];
                assert!(
                    tag.contains("src=\"/"),
                    "a script without a local src: {tag}"
                );
                assert!(script[tag.len() + 1..].starts_with("</script>"));
            }
            assert!(!page.contains("http:") && !page.contains("https:"));
            assert!(!page.contains(" style="));
            for (at, _) in page.match_indices(" on") {
                let name: String = page[at + 3..]
                    .chars()
                    .take_while(char::is_ascii_alphabetic)
                    .collect();
                let after = page[at + 3 + name.len()..].chars().next();
                assert!(after != Some('='), "an inline handler: on{name}");
            }
        }
        // Everything a service declared goes in as text.
        assert!(!CONSOLE_SCRIPT.body.contains("innerHTML"));
        assert!(!CONSOLE_SCRIPT.body.contains("insertAdjacentHTML"));
    }
}
