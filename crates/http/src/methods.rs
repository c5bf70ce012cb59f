//! 405 for a known path asked with a method it does not take. actix answers such a request
//! from the default service (our 404 `not_found`), since a route that does not match the
//! method does not match at all; HTTP says 405 with an `Allow` header. The methods of each
//! path come from the API description (`openapi.json`), which the contract test holds to
//! the routes.

use std::collections::HashMap;
use std::sync::OnceLock;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderValue, ALLOW};
use actix_web::http::StatusCode;
use actix_web::middleware::Next;
use actix_web::Error;

use crate::error::ApiError;

const OPENAPI: &str = include_str!("../openapi.json");

/// Path pattern (`/api/video/tasks/{task_id}`) → its methods, upper case.
fn methods() -> &'static HashMap<String, Vec<String>> {
    static TABLE: OnceLock<HashMap<String, Vec<String>>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap_or_default();
        let mut table = HashMap::new();
        if let Some(paths) = doc["paths"].as_object() {
            for (path, item) in paths {
                let mut allowed: Vec<String> = item
                    .as_object()
                    .into_iter()
                    .flat_map(|ops| ops.keys())
                    .filter(|m| matches!(m.as_str(), "get" | "post" | "put" | "patch" | "delete"))
                    .map(|m| m.to_ascii_uppercase())
                    .collect();
                allowed.sort();
                table.insert(path.clone(), allowed);
            }
        }
        table
    })
}

pub async fn method_not_allowed(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody + 'static>>, Error> {
    let method = req.method().as_str().to_owned();
    let res = next.call(req).await?;
    if res.status() != StatusCode::NOT_FOUND {
        return Ok(res.map_into_left_body());
    }
    let Some(pattern) = res.request().match_pattern() else {
        return Ok(res.map_into_left_body());
    };
    let Some(allowed) = methods().get(&pattern).filter(|a| !a.is_empty()) else {
        return Ok(res.map_into_left_body());
    };
    if allowed.contains(&method) {
        // The route exists for this method and answered 404 itself (an unknown task, ...).
        return Ok(res.map_into_left_body());
    }
    let allow = allowed.join(", ");
    let error = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {pattern}; allowed: {allow}"),
    );
    let (request, _) = res.into_parts();
    let mut res = ServiceResponse::from_err(error, request);
    if let Ok(value) = HeaderValue::from_str(&allow) {
        res.headers_mut().insert(ALLOW, value);
    }
    Ok(res.map_into_right_body())
}
