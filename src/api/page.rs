//! The usage page, served by quotad itself at `/usage`: static files compiled into the binary
//! (no build step, nothing to deploy beside quotad), which read and change one account through
//! the JSON door with the token the page was opened with. A person opens it with an
//! account-scoped token (`/usage#token=…`); support staff open any account with the admin token.
//!
//! The files are strict about where code may come from (a Content-Security-Policy of `'self'`
//! only, no inline script or style), so a value shown on the page can never run as code.

use http_body_util::Full;
use hyper::body::Bytes;
use tonic::body::Body;
use tonic::codegen::http::{self, HeaderValue, Method, StatusCode, header};

/// Where the page lives.
pub const PATH: &str = "/usage";

const HTML: &str = include_str!("page/usage.html");
const CSS: &str = include_str!("page/usage.css");
const JS: &str = include_str!("page/usage.js");

/// Whether `path` is one of the page's.
pub fn serves(path: &str) -> bool {
    path == PATH
        || path
            .strip_prefix(PATH)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The answer for a request to one of the page's paths.
pub fn answer(method: &Method, path: &str) -> http::Response<Body> {
    let file = match path {
        "/usage" | "/usage/" => Some((HTML, "text/html; charset=utf-8")),
        "/usage/usage.css" => Some((CSS, "text/css; charset=utf-8")),
        "/usage/usage.js" => Some((JS, "text/javascript; charset=utf-8")),
        _ => None,
    };
    let (status, body, kind) = match file {
        _ if method != Method::GET && method != Method::HEAD => (
            StatusCode::METHOD_NOT_ALLOWED,
            "GET only",
            "text/plain; charset=utf-8",
        ),
        Some((body, kind)) => (StatusCode::OK, body, kind),
        None => (
            StatusCode::NOT_FOUND,
            "not found",
            "text/plain; charset=utf-8",
        ),
    };
    let body = if method == Method::HEAD { "" } else { body };
    let mut response =
        http::Response::new(Body::new(Full::new(Bytes::from_static(body.as_bytes()))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_and_its_files_are_served_and_nothing_else() {
        assert!(serves("/usage") && serves("/usage/usage.js"));
        assert!(!serves("/usages") && !serves("/quota.v1.QuotaService/GetUsage"));
        assert_eq!(answer(&Method::GET, "/usage").status(), StatusCode::OK);
        assert_eq!(
            answer(&Method::GET, "/usage/usage.css").status(),
            StatusCode::OK
        );
        assert_eq!(
            answer(&Method::GET, "/usage/x").status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            answer(&Method::POST, "/usage").status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn the_page_loads_only_its_own_files() {
        assert!(HTML.contains("src=\"/usage/usage.js\""));
        assert!(HTML.contains("href=\"/usage/usage.css\""));
        assert!(!HTML.contains("<script>") && !HTML.contains("style="));
        assert!(!JS.contains("innerHTML"), "data goes in as text only");
    }
}
