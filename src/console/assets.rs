//! The console's page, style and script, embedded in the binary: no build step, and
//! nothing is fetched from anywhere but this node.

use bytes::Bytes;
use http::StatusCode;
use warp::reply::Response;

const INDEX: &str = include_str!("assets/index.html");
const LOGIN: &str = include_str!("assets/login.html");
const SCRIPT: &str = include_str!("assets/console.js");
const STYLE: &str = include_str!("assets/console.css");

/// Where the login form says a token was wrong.
const MESSAGE_SLOT: &str = "<!--message-->";
const WRONG_TOKEN: &str = r#"<p class="error">That is not the console token.</p>"#;

const HTML: &str = "text/html; charset=utf-8";

pub(super) fn index() -> Response {
    super::respond(StatusCode::OK, HTML, Bytes::from_static(INDEX.as_bytes()))
}

pub(super) fn is_asset(path: &str) -> bool {
    matches!(path, "/console.js" | "/console.css")
}

pub(super) fn asset(path: &str) -> Response {
    let (content_type, body) = match path {
        "/console.js" => ("text/javascript; charset=utf-8", SCRIPT),
        "/console.css" => ("text/css; charset=utf-8", STYLE),
        _ => return super::text(StatusCode::NOT_FOUND, "not found\n"),
    };
    super::respond(
        StatusCode::OK,
        content_type,
        Bytes::from_static(body.as_bytes()),
    )
}

/// The login form, with a word about a wrong token when `wrong`.
pub(super) fn login_page(status: StatusCode, wrong: bool) -> Response {
    let page = match wrong {
        true => LOGIN.replace(MESSAGE_SLOT, WRONG_TOKEN),
        false => LOGIN.to_string(),
    };
    let mut response = super::respond(status, HTML, Bytes::from(page));
    // Its style is inline, so that the stylesheet, like all else, needs the token.
    response.headers_mut().insert(
        http::header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    response
}
