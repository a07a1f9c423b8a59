//! Strict request-body decoding: bounded size, JSON only, unknown fields
//! refused, and a precise error code for each way a body can be wrong.
//! Pure ([`decode_json`]) so it is property-tested without a server.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use super::ApiError;

/// The largest request body, bytes.
pub const MAX_BODY: usize = 1024 * 1024;

/// Reads a body of at most [`MAX_BODY`] bytes (413 `body_too_large`).
pub async fn read_limited(body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is larger than {MAX_BODY} bytes (or broke off)"),
        )
    })
}

/// Decodes a JSON body into `T`:
/// - not JSON, or truncated: 400 `malformed_json`;
/// - a field `T` does not have: 400 `unknown_field`;
/// - a missing field, a wrong type, a value out of its type's range or a
///   name that does not parse: 422 `invalid_body`.
pub fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        let msg = e.to_string();
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", msg)
            }
            Category::Data
                if msg.starts_with("unknown field") || msg.contains("unknown variant") =>
            {
                let code = if msg.starts_with("unknown field") {
                    "unknown_field"
                } else {
                    "invalid_body"
                };
                let status = if code == "unknown_field" {
                    StatusCode::BAD_REQUEST
                } else {
                    StatusCode::UNPROCESSABLE_ENTITY
                };
                ApiError::new(status, code, msg)
            }
            Category::Data => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", msg),
        }
    })
}

/// A JSON body extractor with [`decode_json`]'s errors (415
/// `unsupported_media_type` unless the content type is JSON).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, ApiError> {
        let ct = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mime = ct.split(';').next().unwrap_or("").trim();
        if !mime.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send `Content-Type: application/json`",
            ));
        }
        let bytes = read_limited(req.into_body()).await?;
        decode_json(&bytes).map(JsonBody)
    }
}
