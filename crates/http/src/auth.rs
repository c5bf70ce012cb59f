//! Who is calling: users by JWT, operators by the admin token. Both as actix extractors.
//!
//! User tokens are Supabase Auth's: HS256 with the project's JWT secret (`AUTH_JWT_SECRET`),
//! and/or ES256 and RS256 with the project's signing keys, published as a JWKS
//! (`AUTH_JWKS_URL`) and chosen by the token's `kid`. Verification is the `jsonwebtoken`
//! crate's; what stays ours is choosing the key: the algorithm a key may verify comes from the
//! key (the secret is HS256, a JWKS key is its own ES256 or RS256), never from the token, so
//! an HS256 token "signed" with a public key is refused.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, FromRequest, HttpRequest};
use credit_domain::UserId;
use futures::future::LocalBoxFuture;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use tokio::sync::{Mutex, RwLock};

use crate::config::Config;
use crate::error::ApiError;
use crate::state::AppState;

/// An unknown `kid` makes the key set be fetched again at most this often: a flood of
/// tokens with made-up key ids must not become a flood of requests to Supabase.
const JWKS_MIN_REFRESH: Duration = Duration::from_secs(60);
/// One fetch of the key set; a slow JWKS endpoint must not hold requests for long.
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);

/// Verifies user tokens (and, in demo mode, issues them).
pub struct JwtKeys {
    /// HS256: the shared secret, for verifying and (demo mode) issuing.
    hs256: Option<(DecodingKey, EncodingKey)>,
    jwks: Option<Arc<Jwks>>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: Duration,
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: Option<String>,
}

impl JwtKeys {
    /// The keys `config` names; `None` when it names none (demo sign-in).
    pub fn from_config(config: &Config) -> anyhow::Result<Option<Self>> {
        if config.jwt_secret.is_none() && config.jwks_url.is_none() {
            return Ok(None);
        }
        let jwks = match &config.jwks_url {
            Some(url) => Some(Arc::new(Jwks::new(url.clone(), config.jwks_max_age)?)),
            None => None,
        };
        Ok(Some(Self {
            hs256: config.jwt_secret.as_ref().map(hs256_keys),
            jwks,
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
            leeway: config.jwt_leeway,
        }))
    }

    /// A random per-process secret, for demo sign-in.
    pub fn random() -> Self {
        Self {
            hs256: Some(hs256_keys(&SecretString::from(random_secret()))),
            jwks: None,
            issuer: None,
            audience: None,
            leeway: Duration::ZERO,
        }
    }

    /// Fetches the key set once, so the first requests do not wait for it. A failure is
    /// logged and not fatal: the set is fetched again when a token needs it.
    pub async fn prefetch(&self) {
        if let Some(jwks) = &self.jwks {
            if let Err(e) = jwks.refresh().await {
                tracing::warn!(error = %format!("{e:#}"), jwks.url = %jwks.url, "could not fetch the JWKS at start-up");
            }
        }
    }

    /// Signs an HS256 token for `user` valid for `ttl_secs` (demo sign-in only).
    pub fn issue(&self, user: &UserId, ttl_secs: i64) -> Result<(String, i64), ApiError> {
        let (_, key) = self
            .hs256
            .as_ref()
            .ok_or_else(|| ApiError::internal("no HS256 secret to sign with"))?;
        let exp = chrono::Utc::now().timestamp() + ttl_secs;
        let claims =
            serde_json::json!({ "sub": user.as_str(), "exp": exp, "role": "authenticated" });
        let token =
            jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::HS256), &claims, key)
                .map_err(ApiError::internal)?;
        Ok((token, exp))
    }

    /// Checks the signature with the key the token's algorithm and `kid` select, then
    /// expiry (`exp` required), `nbf`, issuer and audience; returns the user (`sub`).
    pub async fn verify(&self, token: &str) -> Result<UserId, ApiError> {
        let invalid =
            |why: &str| ApiError::unauthorized("invalid_token", format!("invalid token: {why}"));
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("not a JWT"))?;
        let (key, alg) = match header.alg {
            Algorithm::HS256 => {
                let (key, _) = self
                    .hs256
                    .as_ref()
                    .ok_or_else(|| invalid("HS256 tokens are not accepted"))?;
                (key.clone(), Algorithm::HS256)
            }
            Algorithm::ES256 | Algorithm::RS256 => {
                let jwks = self
                    .jwks
                    .as_ref()
                    .ok_or_else(|| invalid("only HS256 tokens are accepted"))?;
                let kid = header.kid.as_deref().ok_or_else(|| invalid("no kid"))?;
                let key = jwks.key(kid).await?;
                if key.alg != header.alg {
                    return Err(invalid("the algorithm does not match the key"));
                }
                (key.key, key.alg)
            }
            _ => return Err(invalid("algorithm not accepted")),
        };
        let mut validation = Validation::new(alg);
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        // jsonwebtoken checks `iss` and `aud` only when present unless they are required.
        let mut required = vec!["exp", "sub"];
        match &self.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => {
                    ApiError::unauthorized("token_expired", "the token has expired")
                }
                K::ImmatureSignature => invalid("not valid yet (nbf)"),
                K::InvalidSignature => invalid("bad signature"),
                K::InvalidIssuer => invalid("wrong issuer"),
                K::InvalidAudience => invalid("wrong audience"),
                K::MissingRequiredClaim(claim) => invalid(&format!("no {claim} claim")),
                _ => invalid("unreadable"),
            }
        })?;
        let sub = data.claims.sub.ok_or_else(|| invalid("no sub claim"))?;
        UserId::parse(&sub).map_err(|_| invalid("sub is not a valid user id"))
    }
}

fn hs256_keys(secret: &SecretString) -> (DecodingKey, EncodingKey) {
    let bytes = secret.expose_secret().as_bytes();
    (
        DecodingKey::from_secret(bytes),
        EncodingKey::from_secret(bytes),
    )
}

/// A verifying key from the JWKS, with the one algorithm it verifies.
#[derive(Clone)]
struct JwksKey {
    key: DecodingKey,
    alg: Algorithm,
}

/// Supabase Auth's published signing keys, by `kid`. Cached; fetched again when a token
/// names a `kid` not in the cache (a rotation), or when the cached set is older than
/// `max_age` (so a key Supabase revoked stops verifying), at most once a
/// [`JWKS_MIN_REFRESH`]. While the endpoint is down, tokens whose key is cached keep
/// verifying.
struct Jwks {
    url: String,
    http: reqwest::Client,
    keys: RwLock<HashMap<String, JwksKey>>,
    max_age: Duration,
    /// When the cached set was fetched.
    fetched_at: std::sync::Mutex<Option<Instant>>,
    /// Held while fetching (one fetch at a time); the instant of the last attempt.
    last_attempt: Mutex<Option<Instant>>,
}

impl Jwks {
    fn new(url: String, max_age: Duration) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().timeout(JWKS_TIMEOUT).build()?;
        Ok(Self {
            url,
            http,
            keys: RwLock::new(HashMap::new()),
            max_age,
            fetched_at: std::sync::Mutex::new(None),
            last_attempt: Mutex::new(None),
        })
    }

    fn stale(&self) -> bool {
        let fetched_at = *self
            .fetched_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        fetched_at.is_none_or(|at| at.elapsed() >= self.max_age)
    }

    async fn replace(&self, keys: HashMap<String, JwksKey>) {
        *self.keys.write().await = keys;
        *self
            .fetched_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
    }

    async fn key(&self, kid: &str) -> Result<JwksKey, ApiError> {
        if !self.stale() {
            if let Some(key) = self.keys.read().await.get(kid) {
                return Ok(key.clone());
            }
        }
        let mut last = self.last_attempt.lock().await;
        // Another request may have fetched the set while this one waited for the lock.
        let cached = self.keys.read().await.get(kid).cloned();
        let unknown =
            || ApiError::unauthorized("invalid_token", "invalid token: unknown signing key (kid)");
        let needed = cached.is_none() || self.stale();
        let allowed = !last.is_some_and(|at| at.elapsed() < JWKS_MIN_REFRESH);
        if !(needed && allowed) {
            return cached.ok_or_else(unknown);
        }
        *last = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                let found = keys.get(kid).cloned();
                self.replace(keys).await;
                found.ok_or_else(unknown)
            }
            // An outage: what is cached keeps verifying.
            Err(e) if cached.is_some() => {
                tracing::warn!(error = %format!("{e:#}"), jwks.url = %self.url, "could not refresh the JWKS; using the cached keys");
                cached.ok_or_else(unknown)
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), jwks.url = %self.url, "could not fetch the JWKS");
                Err(ApiError::new(
                    actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
                    "auth_keys_unavailable",
                    "the token's signing key is not known yet and the key set cannot be fetched; retry shortly",
                ))
            }
        }
    }

    /// Fetches the set now (start-up). It does not count as an attempt: the first token
    /// with a key published since start-up may fetch again at once.
    async fn refresh(&self) -> anyhow::Result<()> {
        let _one_fetch_at_a_time = self.last_attempt.lock().await;
        let keys = self.fetch().await?;
        tracing::info!(jwks.keys = keys.len(), "JWKS fetched");
        self.replace(keys).await;
        Ok(())
    }

    /// The set's ES256 (P-256) and RS256 keys that have a `kid`. Other keys (symmetric
    /// ones above all) are skipped, one unreadable key does not hide the others.
    async fn fetch(&self) -> anyhow::Result<HashMap<String, JwksKey>> {
        use anyhow::Context;
        #[derive(serde::Deserialize)]
        struct Set {
            keys: Vec<serde_json::Value>,
        }
        let set: Set = self
            .http
            .get(&self.url)
            .send()
            .await
            .context("JWKS request")?
            .error_for_status()
            .context("JWKS answer")?
            .json()
            .await
            .context("JWKS body")?;
        let mut keys = HashMap::new();
        for raw in set.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(raw) else {
                continue;
            };
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let alg = match &jwk.algorithm {
                AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                _ => continue,
            };
            if let Some(declared) = jwk.common.key_algorithm {
                if format!("{declared:?}") != format!("{alg:?}") {
                    continue;
                }
            }
            if let Ok(key) = DecodingKey::from_jwk(&jwk) {
                keys.insert(kid, JwksKey { key, alg });
            }
        }
        Ok(keys)
    }
}

pub(crate) fn bearer(req: &HttpRequest) -> Result<&str, ApiError> {
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
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let found = bearer(req).and_then(|token| Ok((token.to_owned(), state(req)?.clone())));
        Box::pin(async move {
            let (token, state) = found?;
            Ok(AuthUser(state.jwt.verify(&token).await?))
        })
    }
}

/// An operator holding the admin token.
pub struct Admin;

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        std::future::ready((|| {
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

    fn keys(secret: &str, audience: Option<&str>) -> JwtKeys {
        JwtKeys {
            hs256: Some(hs256_keys(&SecretString::from(secret))),
            jwks: None,
            issuer: None,
            audience: audience.map(str::to_owned),
            leeway: Duration::ZERO,
        }
    }

    #[tokio::test]
    async fn issued_tokens_verify_and_tampering_is_caught() {
        let keys = keys("a-very-long-test-secret", None);
        let user = UserId::parse("u1").unwrap_or_else(|e| panic!("{e}"));
        let (token, _) = keys.issue(&user, 60).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(keys.verify(&token).await.ok(), Some(user.clone()));
        let other = self::keys("another-long-secret!!", None);
        assert_eq!(
            other.verify(&token).await.err().map(|e| e.code),
            Some("invalid_token")
        );
        let (expired, _) = keys.issue(&user, -10).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            keys.verify(&expired).await.err().map(|e| e.code),
            Some("token_expired")
        );
        let aud = self::keys("a-very-long-test-secret", Some("authenticated"));
        assert_eq!(
            aud.verify(&token).await.err().map(|e| e.code),
            Some("invalid_token")
        );
        assert!(keys.verify("a.b").await.is_err());
        assert!(keys.verify("").await.is_err());
    }
}
