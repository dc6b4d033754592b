//! The dashboard: a page and its scripts, compiled into the binary (no CDN, nothing to
//! install), served without a token (they hold no data). The page asks the token-protected
//! API for everything it shows, with the token the operator gives it.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};

/// (file name, content type, body).
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../assets/dashboard/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/dashboard/app.js"),
    ),
    (
        "plot.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/dashboard/plot.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../assets/dashboard/style.css"),
    ),
];

/// Scripts and styles from this origin only, no inline code, no framing: a page that holds
/// an admin token must not run anyone else's code.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self'; frame-ancestors 'none'; \
                   base-uri 'none'; form-action 'none'";

fn asset(name: &str) -> Response {
    let Some((_, kind, body)) = ASSETS.iter().find(|(n, _, _)| *n == name) else {
        return (StatusCode::NOT_FOUND, "no such dashboard file").into_response();
    };
    let mut r = (*body).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // Built into the binary: a new version comes with a restart, so a short cache is enough.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `GET /`: to the dashboard.
pub async fn root() -> Redirect {
    Redirect::to("/dashboard/")
}

/// `GET /dashboard/`.
pub async fn index() -> Response {
    asset("index.html")
}

/// `GET /dashboard/{file}`.
pub async fn file(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    asset(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page loads exactly the files that are served, and none from elsewhere.
    #[test]
    fn the_page_refers_only_to_embedded_files() {
        let page = ASSETS[0].2;
        let mut refs = Vec::new();
        for attr in ["src=\"", "href=\""] {
            let mut rest = page;
            while let Some(i) = rest.find(attr) {
                rest = &rest[i + attr.len()..];
                let end = rest.find('"').unwrap_or(rest.len());
                refs.push(&rest[..end]);
            }
        }
        refs.sort_unstable();
        let mut served: Vec<&str> = ASSETS[1..].iter().map(|(n, _, _)| *n).collect();
        served.sort_unstable();
        assert_eq!(refs, served);
        for (name, _, body) in ASSETS {
            // The SVG namespace is a name, not something fetched.
            let body = body.replace("http://www.w3.org/2000/svg", "");
            assert!(
                !body.contains("http://") && !body.contains("https://"),
                "{name} refers to another origin"
            );
        }
        assert_eq!(asset("nope.js").status(), StatusCode::NOT_FOUND);
        assert_eq!(asset("app.js").status(), StatusCode::OK);
    }
}
