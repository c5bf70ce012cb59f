//! `Body<T>`: a JSON request body that must be an object. serde's derive would otherwise
//! accept an array for a struct (`[10]` as `{"amount": 10}`); clients must name their fields.

use actix_web::{web, FromRequest, HttpRequest};
use futures::future::LocalBoxFuture;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

pub struct Body<T>(pub T);

impl<T> Body<T> {
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> std::ops::Deref for Body<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: DeserializeOwned + 'static> FromRequest for Body<T> {
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        // Size, content type and syntax errors are mapped by the app's `JsonConfig`.
        let json = web::Json::<serde_json::Value>::from_request(req, payload);
        Box::pin(async move {
            let web::Json(value) = json.await?;
            if !value.is_object() {
                return Err(ApiError::bad_request(
                    "invalid_body",
                    "the body must be a JSON object",
                )
                .into());
            }
            serde_json::from_value(value)
                .map(Body)
                .map_err(|e| ApiError::bad_request("invalid_body", e.to_string()).into())
        })
    }
}
