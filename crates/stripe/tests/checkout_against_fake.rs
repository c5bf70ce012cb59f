//! `StripeCheckout` against the local fake Stripe API: what goes over the wire, idempotency,
//! and how failures map to `ProviderError`.

use std::time::Duration;

use credit_domain::ports::{CheckoutRequest, PaymentProvider, ProviderError};
use credit_stripe::{StripeCheckout, StripeConfig};
use credit_testkit::fake_stripe::{FailMode, FakeStripe, SESSIONS_PATH};
use secrecy::SecretString;

const KEY: &str = "sk_test_fake_key";

fn checkout(stripe: &FakeStripe) -> StripeCheckout {
    let config = StripeConfig::new(SecretString::from(KEY))
        .with_api_base(stripe.base_url())
        .with_timeout(Duration::from_secs(5));
    StripeCheckout::new(config).expect("client builds")
}

fn request(recharge_id: &str) -> CheckoutRequest {
    CheckoutRequest {
        user_id: "usr_42".into(),
        recharge_id: recharge_id.into(),
        amount_fen: 1000,
        currency: "cny".into(),
        credits: 1000,
        success_url: "https://app.example/recharge/success?session_id={CHECKOUT_SESSION_ID}".into(),
        cancel_url: "https://app.example/recharge/cancel".into(),
    }
}

#[tokio::test]
async fn creates_a_session_with_the_expected_form_and_idempotency_key() {
    let stripe = FakeStripe::start().await;
    let provider = checkout(&stripe);
    assert_eq!(provider.name(), "stripe");

    let session = provider
        .create_checkout(&request("rch_1"))
        .await
        .expect("session created");
    assert!(session.session_id.starts_with("cs_test_"), "{session:?}");
    assert_eq!(
        session.url.as_deref(),
        Some(format!("https://checkout.stripe.com/c/pay/{}", session.session_id).as_str())
    );

    let requests = stripe.requests();
    assert_eq!(requests.len(), 1);
    let sent = &requests[0];
    assert_eq!(sent.method, "POST");
    assert_eq!(sent.path, SESSIONS_PATH);
    assert_eq!(sent.idempotency_key(), Some("rch_1"));
    assert_eq!(sent.authorization(), Some(format!("Bearer {KEY}").as_str()));
    assert_eq!(
        sent.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert!(sent.header("stripe-version").is_some());
    let field = |name: &str| sent.field(name);
    assert_eq!(field("mode"), Some("payment"));
    assert_eq!(field("line_items[0][quantity]"), Some("1"));
    assert_eq!(field("line_items[0][price_data][currency]"), Some("cny"));
    assert_eq!(
        field("line_items[0][price_data][unit_amount]"),
        Some("1000")
    );
    assert_eq!(
        field("line_items[0][price_data][product_data][name]"),
        Some("1000 credits")
    );
    assert_eq!(field("line_items[1][quantity]"), None);
    assert_eq!(field("metadata[user_id]"), Some("usr_42"));
    assert_eq!(field("metadata[recharge_id]"), Some("rch_1"));
    assert_eq!(
        field("payment_intent_data[metadata][recharge_id]"),
        Some("rch_1")
    );
    assert_eq!(
        field("payment_intent_data[metadata][user_id]"),
        Some("usr_42")
    );
    assert_eq!(field("client_reference_id"), Some("rch_1"));
    assert_eq!(
        field("success_url"),
        Some("https://app.example/recharge/success?session_id={CHECKOUT_SESSION_ID}")
    );
    assert_eq!(
        field("cancel_url"),
        Some("https://app.example/recharge/cancel")
    );

    // The fake echoes what it was asked for, as Stripe does.
    let stored = stripe.session(&session.session_id).expect("stored");
    assert_eq!(stored["amount_total"], 1000);
    assert_eq!(stored["currency"], "cny");
    assert_eq!(stored["client_reference_id"], "rch_1");
    assert_eq!(stored["metadata"]["recharge_id"], "rch_1");
}

#[tokio::test]
async fn the_same_recharge_gets_the_same_session() {
    let stripe = FakeStripe::start().await;
    let provider = checkout(&stripe);
    let first = provider
        .create_checkout(&request("rch_same"))
        .await
        .expect("first");
    let second = provider
        .create_checkout(&request("rch_same"))
        .await
        .expect("second");
    let other = provider
        .create_checkout(&request("rch_other"))
        .await
        .expect("other");
    assert_eq!(first, second);
    assert_ne!(first.session_id, other.session_id);
    assert_eq!(stripe.session_count(), 2);
}

#[tokio::test]
async fn stripe_4xx_is_rejected() {
    let stripe = FakeStripe::start().await;
    let provider = checkout(&stripe);
    stripe.set_failure(Some(FailMode::InvalidRequest));
    let err = provider
        .create_checkout(&request("rch_1"))
        .await
        .expect_err("must fail");
    assert!(matches!(err, ProviderError::Rejected(_)), "{err:?}");

    stripe.set_failure(Some(FailMode::Unauthorized));
    let err = provider
        .create_checkout(&request("rch_1"))
        .await
        .expect_err("must fail");
    assert!(matches!(err, ProviderError::Rejected(_)), "{err:?}");

    // Reusing a key with different parameters is a definite "no" from Stripe.
    stripe.set_failure(None);
    provider
        .create_checkout(&request("rch_2"))
        .await
        .expect("created");
    let mut changed = request("rch_2");
    changed.amount_fen = 2000;
    let err = provider
        .create_checkout(&changed)
        .await
        .expect_err("must fail");
    assert!(
        matches!(&err, ProviderError::Rejected(m) if m.contains("idempotency_error")),
        "{err:?}"
    );
}

#[tokio::test]
async fn stripe_5xx_rate_limits_and_timeouts_are_unavailable_and_retry_with_the_same_key() {
    let stripe = FakeStripe::start().await;
    let provider = checkout(&stripe);

    stripe.set_failure(Some(FailMode::ServerError));
    let err = provider
        .create_checkout(&request("rch_1"))
        .await
        .expect_err("must fail");
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");

    stripe.set_failure(Some(FailMode::RateLimited));
    let err = provider
        .create_checkout(&request("rch_1"))
        .await
        .expect_err("must fail");
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");

    stripe.set_failure(Some(FailMode::Delay(Duration::from_secs(3))));
    let slow = StripeCheckout::new(
        StripeConfig::new(SecretString::from(KEY))
            .with_api_base(stripe.base_url())
            .with_timeout(Duration::from_millis(200)),
    )
    .expect("client builds");
    let err = slow
        .create_checkout(&request("rch_1"))
        .await
        .expect_err("must fail");
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");

    stripe.set_failure(None);
    let session = provider
        .create_checkout(&request("rch_1"))
        .await
        .expect("recovers");
    assert!(session.session_id.starts_with("cs_test_"));
    assert!(stripe
        .requests()
        .iter()
        .all(|r| r.idempotency_key() == Some("rch_1")));
}

#[tokio::test]
async fn an_unreachable_stripe_is_unavailable() {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let base_url = format!("http://127.0.0.1:{port}");
    let provider = StripeCheckout::new(
        StripeConfig::new(SecretString::from(KEY))
            .with_api_base(base_url)
            .with_timeout(Duration::from_secs(2)),
    )
    .expect("client builds");
    let err = provider
        .create_checkout(&request("rch_1"))
        .await
        .expect_err("must fail");
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");
}
