//! The gateway's own answers: `{"error": {"code", "message"}}` with a
//! stable code, the same shape as the control plane's API errors.

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;

/// A JSON error response: `{"error":{"code":code,"message":message}}`.
pub fn error_response(status: StatusCode, code: &'static str, message: &str) -> Response {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    let mut resp = Response::new(Body::from(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
