//! Who is calling: users by HS256 JWT (a Supabase project's JWT secret works; the user id is
//! `sub`), operators by the admin token. Both as actix extractors.

use std::future::{ready, Ready};

use actix_web::{web, FromRequest, HttpRequest};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use credit_domain::UserId;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

use crate::error::ApiError;
use crate::state::AppState;

/// Verifies and issues user tokens.
pub struct JwtKeys {
    secret: SecretString,
    audience: Option<String>,
}

#[derive(serde::Deserialize)]
struct Header {
    alg: String,
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<i64>,
    #[serde(default)]
    aud: Option<serde_json::Value>,
}

impl JwtKeys {
    pub fn new(secret: SecretString, audience: Option<String>) -> Self {
        Self { secret, audience }
    }

    /// A random per-process secret, for demo sign-in.
    pub fn random() -> Self {
        Self::new(SecretString::from(random_secret()), None)
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC accepts keys of any length.
        #[allow(clippy::expect_used)]
        Hmac::<Sha256>::new_from_slice(self.secret.expose_secret().as_bytes())
            .expect("HMAC takes any key length")
    }

    /// Signs a token for `user` valid for `ttl_secs`.
    pub fn issue(&self, user: &UserId, ttl_secs: i64) -> (String, i64) {
        let exp = chrono::Utc::now().timestamp() + ttl_secs;
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let claims =
            serde_json::json!({ "sub": user.as_str(), "exp": exp, "role": "authenticated" });
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{claims}");
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        (format!("{signing_input}.{sig}"), exp)
    }

    /// Checks signature, algorithm, expiry and audience; returns the user.
    pub fn verify(&self, token: &str) -> Result<UserId, ApiError> {
        let invalid =
            |why: &str| ApiError::unauthorized("invalid_token", format!("invalid token: {why}"));
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("not a JWT"));
        };
        let header: Header = URL_SAFE_NO_PAD
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| invalid("unreadable header"))?;
        if header.alg != "HS256" {
            return Err(invalid("algorithm must be HS256"));
        }
        let sig = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| invalid("unreadable signature"))?;
        let mut mac = self.mac();
        mac.update(h.as_bytes());
        mac.update(b".");
        mac.update(c.as_bytes());
        mac.verify_slice(&sig)
            .map_err(|_| invalid("bad signature"))?;
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(c)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| invalid("unreadable claims"))?;
        let exp = claims.exp.ok_or_else(|| invalid("no exp claim"))?;
        if exp <= chrono::Utc::now().timestamp() {
            return Err(ApiError::unauthorized(
                "token_expired",
                "the token has expired",
            ));
        }
        if let Some(want) = &self.audience {
            let ok = match &claims.aud {
                Some(serde_json::Value::String(a)) => a == want,
                Some(serde_json::Value::Array(list)) => {
                    list.iter().any(|a| a.as_str() == Some(want))
                }
                _ => false,
            };
            if !ok {
                return Err(invalid("wrong audience"));
            }
        }
        let sub = claims.sub.ok_or_else(|| invalid("no sub claim"))?;
        UserId::parse(&sub).map_err(|_| invalid("sub is not a valid user id"))
    }
}

fn bearer(req: &HttpRequest) -> Result<&str, ApiError> {
    let value = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::unauthorized("missing_token", "Authorization: Bearer <token> is required")
        })?;
    value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::unauthorized("missing_token", "Authorization: Bearer <token> is required")
        })
}

fn state(req: &HttpRequest) -> Result<&web::Data<AppState>, ApiError> {
    req.app_data::<web::Data<AppState>>()
        .ok_or_else(|| ApiError::internal("application state missing"))
}

/// The signed-in user.
pub struct AuthUser(pub UserId);

impl FromRequest for AuthUser {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        ready((|| {
            let token = bearer(req)?;
            Ok(AuthUser(state(req)?.jwt.verify(token)?))
        })())
    }
}

/// An operator holding the admin token.
pub struct Admin;

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        ready((|| {
            let state = state(req)?;
            let Some(expected) = &state.config.admin_token else {
                return Err(ApiError::new(
                    actix_web::http::StatusCode::FORBIDDEN,
                    "admin_disabled",
                    "admin endpoints are closed: ADMIN_TOKEN is not configured",
                ));
            };
            let token = bearer(req)?;
            if !constant_time_eq(token.as_bytes(), expected.expose_secret().as_bytes()) {
                return Err(ApiError::unauthorized(
                    "invalid_admin_token",
                    "wrong admin token",
                ));
            }
            Ok(Admin)
        })())
    }
}

/// 32 random bytes, hex: the demo mode's per-process secrets.
pub fn random_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::Digest;
    // Compare digests so neither length nor content leaks through timing.
    let (da, db) = (Sha256::digest(a), Sha256::digest(b));
    da.iter()
        .zip(db.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_and_tampering_is_caught() {
        let keys = JwtKeys::new(SecretString::from("a-very-long-test-secret"), None);
        let user = UserId::parse("u1").unwrap_or_else(|e| panic!("{e}"));
        let (token, _) = keys.issue(&user, 60);
        assert_eq!(keys.verify(&token).ok(), Some(user.clone()));
        let other = JwtKeys::new(SecretString::from("another-long-secret!!"), None);
        assert_eq!(
            other.verify(&token).err().map(|e| e.code),
            Some("invalid_token")
        );
        let (expired, _) = keys.issue(&user, -10);
        assert_eq!(
            keys.verify(&expired).err().map(|e| e.code),
            Some("token_expired")
        );
        let aud = JwtKeys::new(
            SecretString::from("a-very-long-test-secret"),
            Some("authenticated".into()),
        );
        assert_eq!(
            aud.verify(&token).err().map(|e| e.code),
            Some("invalid_token")
        );
        assert!(keys.verify("a.b").is_err());
        assert!(keys.verify("").is_err());
    }
}
