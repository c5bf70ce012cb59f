//! Supabase Auth's tokens: HS256 with the project secret, ES256 and RS256 with the keys of
//! its JWKS (a local fake), chosen by `kid`; rotation, unknown keys, a JWKS outage, and the
//! claims (issuer, audience, expiry, not-before). Keys are made per test (ES256) or read
//! from the test kit's fixtures (RS256).

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use credit_testkit::fake_jwks::{rsa_public_pem, FakeJwks, SigningKey};
use jsonwebtoken::{Algorithm, Header};
use serde_json::{json, Value};

const ISSUER: &str = "https://project.supabase.co/auth/v1";

fn claims(user: &str) -> Value {
    json!({
        "sub": user,
        "iss": ISSUER,
        "aud": "authenticated",
        "role": "authenticated",
        "iat": now(),
        "exp": now() + 3600,
    })
}

/// The app with the fake's key set, the issuer and audience checked, and (unless
/// `jwks_only`) the HS256 secret too.
async fn app_with(jwks: &FakeJwks, jwks_only: bool) -> TestApp {
    app_with_also(jwks, jwks_only, &[]).await
}

async fn app_with_also(jwks: &FakeJwks, jwks_only: bool, also: &[(&str, &str)]) -> TestApp {
    let url = jwks.url();
    let mut vars = vec![
        ("AUTH_JWKS_URL", url.as_str()),
        ("AUTH_JWT_ISSUER", ISSUER),
        ("AUTH_JWT_AUDIENCE", "authenticated"),
    ];
    if jwks_only {
        vars.push(("AUTH_JWT_SECRET", ""));
    }
    vars.extend_from_slice(also);
    TestApp::spawn_with(&vars).await
}

#[tokio::test]
async fn es256_and_rs256_tokens_verify_by_kid_and_a_rotation_is_picked_up() {
    let jwks = FakeJwks::start().await;
    let (k1, r1) = (SigningKey::es256("ec-1"), SigningKey::rs256("rsa-1"));
    jwks.publish(&[&k1, &r1]);
    let app = app_with(&jwks, true).await;
    assert_eq!(jwks.fetches(), 1, "fetched once at start-up");
    let u = user("jwks");

    let r = app.stats(&k1.sign(&claims(&u))).await;
    r.expect(200);
    assert_eq!(r.body["user_id"], u.as_str());
    assert_eq!(r.body["demo"]["auth"], false);
    app.stats(&r1.sign(&claims(&u))).await.expect(200);
    assert_eq!(jwks.fetches(), 1, "known keys are served from the cache");

    // Rotation: Supabase publishes a new key and drops the old one.
    let k2 = SigningKey::es256("ec-2");
    jwks.publish(&[&k2, &r1]);
    app.stats(&k2.sign(&claims(&u))).await.expect(200);
    assert_eq!(jwks.fetches(), 2, "an unknown kid fetches the set again");
    // The dropped key is gone from the cache with the set it left.
    app.stats(&k1.sign(&claims(&u)))
        .await
        .expect_error(401, "invalid_token");

    // Unknown kids again within the minute: refused without asking Supabase each time.
    let stranger = SigningKey::es256("ec-unknown");
    for _ in 0..5 {
        app.stats(&stranger.sign(&claims(&u)))
            .await
            .expect_error(401, "invalid_token");
    }
    assert_eq!(jwks.fetches(), 2, "at most one refresh a minute");
    app.stats(&k2.sign(&claims(&u))).await.expect(200);
    assert_eq!(app.event_count().await, 0);
}

#[tokio::test]
async fn a_jwks_outage_does_not_fail_tokens_whose_key_is_cached() {
    let jwks = FakeJwks::start().await;
    let k1 = SigningKey::es256("ec-1");
    jwks.publish(&[&k1]);
    let app = app_with(&jwks, true).await;
    let u = user("outage");
    jwks.set_down(true);
    app.stats(&k1.sign(&claims(&u))).await.expect(200);

    // A key the service has never seen cannot be checked: 503, so the client retries
    // instead of signing the user out.
    let k2 = SigningKey::es256("ec-2");
    let r = app
        .http
        .get(app.url("/api/stats"))
        .bearer_auth(k2.sign(&claims(&u)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "auth_keys_unavailable");
    app.stats(&k1.sign(&claims(&u))).await.expect(200);
}

#[tokio::test]
async fn claims_issuer_audience_expiry_and_algorithms_are_checked() {
    let jwks = FakeJwks::start().await;
    let (k1, r1) = (SigningKey::es256("ec-1"), SigningKey::rs256("rsa-1"));
    jwks.publish(&[&k1, &r1]);
    let app = app_with(&jwks, false).await;
    let u = user("claims");
    let with = |patch: Value| {
        let mut c = claims(&u);
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let es_header = |kid: Option<&str>| {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = kid.map(str::to_owned);
        h
    };

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "wrong issuer",
            k1.sign(&with(json!({"iss": "https://evil.supabase.co/auth/v1"}))),
            "invalid_token",
        ),
        (
            "no issuer",
            k1.sign(&with(json!({"iss": null}))),
            "invalid_token",
        ),
        (
            "wrong audience",
            k1.sign(&with(json!({"aud": "anon"}))),
            "invalid_token",
        ),
        (
            "expired beyond the leeway",
            k1.sign(&with(json!({"exp": now() - 120}))),
            "token_expired",
        ),
        (
            "not valid yet",
            r1.sign(&with(json!({"nbf": now() + 120}))),
            "invalid_token",
        ),
        (
            "no exp",
            k1.sign(&with(json!({"exp": null}))),
            "invalid_token",
        ),
        (
            "no sub",
            k1.sign(&with(json!({"sub": null}))),
            "invalid_token",
        ),
        (
            "no kid",
            k1.sign_with_header(&es_header(None), &claims(&u)),
            "invalid_token",
        ),
        (
            // The RSA key's kid on an ES256 token: the key decides the algorithm.
            "algorithm that is not the key's",
            k1.sign_with_header(&es_header(Some("rsa-1")), &claims(&u)),
            "invalid_token",
        ),
        (
            // The classic confusion: HS256 keyed with the public key, which anyone has.
            "HS256 signed with the public key",
            jwt_with_header(
                rsa_public_pem(),
                &json!({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}),
                &claims(&u),
            ),
            "invalid_token",
        ),
    ];
    for (what, token, code) in &cases {
        let r = app.stats(token).await;
        assert_eq!((r.status, r.code()), (401, *code), "{what}: {}", r.text);
    }
    // Inside the leeway (30 s by default) a just-expired token still passes.
    app.stats(&k1.sign(&with(json!({"exp": now() - 5}))))
        .await
        .expect(200);
    // The HS256 secret works beside the key set, with the same claim checks.
    app.stats(&jwt(JWT_SECRET, &claims(&u))).await.expect(200);
    app.stats(&jwt(JWT_SECRET, &with(json!({"iss": "https://x"}))))
        .await
        .expect_error(401, "invalid_token");
    assert_eq!(app.event_count().await, 0);
}

#[tokio::test]
async fn with_only_a_jwks_hs256_tokens_are_refused_even_keyed_with_the_public_key() {
    let jwks = FakeJwks::start().await;
    let r1 = SigningKey::rs256("rsa-1");
    jwks.publish(&[&r1]);
    let app = app_with(&jwks, true).await;
    let u = user("confusion");
    for secret in [rsa_public_pem(), JWT_SECRET] {
        let token = jwt_with_header(
            secret,
            &json!({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}),
            &claims(&u),
        );
        app.stats(&token).await.expect_error(401, "invalid_token");
    }
    app.stats(&r1.sign(&claims(&u))).await.expect(200);
}

#[tokio::test]
async fn a_key_revoked_from_the_set_stops_verifying_once_the_cache_is_older_than_its_max_age() {
    let jwks = FakeJwks::start().await;
    let (k1, k2) = (SigningKey::es256("ec-1"), SigningKey::es256("ec-2"));
    jwks.publish(&[&k1, &k2]);
    let app = app_with_also(&jwks, true, &[("AUTH_JWKS_MAX_AGE", "1s")]).await;
    let u = user("revoked");
    app.stats(&k1.sign(&claims(&u))).await.expect(200);

    // Supabase revokes k1. Within the max age the cached set still holds it...
    jwks.publish(&[&k2]);
    app.stats(&k1.sign(&claims(&u))).await.expect(200);
    assert_eq!(jwks.fetches(), 1);
    // ...past it, the next token fetches the set again, and k1 is refused.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    app.stats(&k1.sign(&claims(&u)))
        .await
        .expect_error(401, "invalid_token");
    assert_eq!(jwks.fetches(), 2);
    app.stats(&k2.sign(&claims(&u))).await.expect(200);

    // A stale cache during an outage keeps verifying the keys it has.
    jwks.set_down(true);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    app.stats(&k2.sign(&claims(&u))).await.expect(200);
}
