//! A local stand-in for Supabase Auth's key set (`/auth/v1/.well-known/jwks.json`), and the
//! signing keys to make tokens it vouches for: ES256 keys generated per test (ring), and one
//! committed RSA key for RS256 (`fixtures/jwt/`, since generating RSA keys is slow).
//!
//! ```ignore
//! let jwks = FakeJwks::start().await;
//! let key = SigningKey::es256("k1");
//! jwks.publish(&[&key]);
//! let token = key.sign(&json!({"sub": "alice", "exp": now + 60}));
//! jwks.set_down(true);            // the endpoint answers 503
//! assert_eq!(jwks.fetches(), 1);
//! ```

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpResponse, HttpServer};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};

/// The path the fake serves its key set at (Supabase's).
pub const JWKS_PATH: &str = "/auth/v1/.well-known/jwks.json";

const RSA_PRIVATE_PEM: &str = include_str!("../fixtures/jwt/rsa-2048.pem");
const RSA_PUBLIC_PEM: &str = include_str!("../fixtures/jwt/rsa-2048.pub.pem");
const RSA_JWK: &str = include_str!("../fixtures/jwt/rsa-2048.jwk.json");

/// A private key with its `kid`, and its public half as a JWK.
pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    encoding: EncodingKey,
    /// The public JWK, as the key set publishes it.
    pub jwk: Value,
}

impl SigningKey {
    /// A fresh P-256 key (ES256).
    pub fn es256(kid: &str) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap_or_else(|e| panic!("P-256 key generation: {e}"));
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap_or_else(|e| panic!("P-256 key: {e}"));
        // Uncompressed point: 0x04, x (32 bytes), y (32 bytes).
        let point = pair.public_key().as_ref();
        let jwk = json!({
            "kty": "EC",
            "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
            "kid": kid,
            "alg": "ES256",
            "use": "sig",
        });
        Self {
            kid: kid.to_owned(),
            alg: Algorithm::ES256,
            encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk,
        }
    }

    /// The committed RSA key (RS256) under `kid`.
    pub fn rs256(kid: &str) -> Self {
        let mut jwk: Value =
            serde_json::from_str(RSA_JWK).unwrap_or_else(|e| panic!("RSA JWK fixture: {e}"));
        jwk["kid"] = json!(kid);
        jwk["alg"] = json!("RS256");
        jwk["use"] = json!("sig");
        Self {
            kid: kid.to_owned(),
            alg: Algorithm::RS256,
            encoding: EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes())
                .unwrap_or_else(|e| panic!("RSA key fixture: {e}")),
            jwk,
        }
    }

    /// A token over `claims`, with this key's `alg` and `kid` in its header.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        self.sign_with_header(&header, claims)
    }

    /// A token with any header (e.g. another `kid`), signed with this key.
    pub fn sign_with_header(&self, header: &Header, claims: &Value) -> String {
        jsonwebtoken::encode(header, claims, &self.encoding)
            .unwrap_or_else(|e| panic!("signing a test token: {e}"))
    }
}

/// The committed RSA public key as PEM: what an `alg` confusion attack "signs" an HS256
/// token with.
pub fn rsa_public_pem() -> &'static str {
    RSA_PUBLIC_PEM
}

#[derive(Default)]
struct State {
    keys: Mutex<Vec<Value>>,
    down: AtomicBool,
    fetches: AtomicU64,
}

/// The key-set server on `127.0.0.1`, port 0.
pub struct FakeJwks {
    url: String,
    state: Arc<State>,
    handle: ServerHandle,
}

impl FakeJwks {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("fake JWKS cannot bind 127.0.0.1:0: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("fake JWKS has no local address: {e}"))
            .port();
        let state = Arc::new(State::default());
        let app_state = web::Data::from(Arc::clone(&state));
        let server = HttpServer::new(move || {
            App::new()
                .app_data(app_state.clone())
                .route(JWKS_PATH, web::get().to(serve))
        })
        .workers(1)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)
        .unwrap_or_else(|e| panic!("fake JWKS cannot listen: {e}"))
        .run();
        let handle = server.handle();
        tokio::spawn(server);
        Self {
            url: format!("http://127.0.0.1:{port}{JWKS_PATH}"),
            state,
            handle,
        }
    }

    /// The key set's URL (`AUTH_JWKS_URL`).
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// From now on the set holds exactly these keys' public halves.
    pub fn publish(&self, keys: &[&SigningKey]) {
        let jwks = keys.iter().map(|k| k.jwk.clone()).collect();
        self.publish_raw(jwks);
    }

    /// From now on the set holds exactly these JWKs (any JSON).
    pub fn publish_raw(&self, jwks: Vec<Value>) {
        *self
            .state
            .keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = jwks;
    }

    /// While down, the endpoint answers 503.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// Requests received so far.
    pub fn fetches(&self) -> u64 {
        self.state.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for FakeJwks {
    fn drop(&mut self) {
        drop(self.handle.stop(false));
    }
}

async fn serve(state: web::Data<State>) -> HttpResponse {
    state.fetches.fetch_add(1, Ordering::SeqCst);
    if state.down.load(Ordering::SeqCst) {
        return HttpResponse::ServiceUnavailable().body("down");
    }
    let keys = state
        .keys
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    HttpResponse::Ok().json(json!({ "keys": keys }))
}
