//! Creating Checkout Sessions: the outgoing half of the adapter.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use credit_domain::ports::{
    CheckoutRequest, CheckoutSession, CheckoutStatus, PaymentProvider, ProviderError,
};
use secrecy::{ExposeSecret, SecretString};
use stripe::{IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionLineItems, CreateCheckoutSessionLineItemsPriceData,
    CreateCheckoutSessionPaymentIntentData, ProductData,
};
use stripe_checkout::CheckoutSessionMode;
use stripe_types::Currency;

/// Stripe's production API. `async-stripe` appends `v1/...` to it.
pub const DEFAULT_API_BASE: &str = "https://api.stripe.com/";

/// How long one attempt to create a session may take before it counts as `Unavailable`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings of the Stripe client. The secret key stays in a [`SecretString`] so it cannot
/// end up in a log line by accident.
#[derive(Debug, Clone)]
pub struct StripeConfig {
    pub secret_key: SecretString,
    /// Base URL of the API; tests point it at a local `http://` fake.
    pub api_base: String,
    /// Per-attempt time-out of a request.
    pub timeout: Duration,
}

impl StripeConfig {
    /// Configuration against Stripe's real API.
    pub fn new(secret_key: SecretString) -> Self {
        Self {
            secret_key,
            api_base: DEFAULT_API_BASE.to_owned(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn with_api_base(mut self, api_base: impl Into<String>) -> Self {
        self.api_base = api_base.into();
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// The Stripe client could not be built from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum StripeConfigError {
    #[error("the Stripe secret key is empty")]
    EmptySecretKey,
    #[error("invalid Stripe client configuration: {0}")]
    Invalid(String),
}

/// [`PaymentProvider`] backed by Stripe Checkout.
///
/// Every session is created with `Idempotency-Key = recharge id`, so a retried
/// `create_checkout` for the same recharge gets the same session back from Stripe instead of
/// a second one the user could also pay.
#[derive(Debug, Clone)]
pub struct StripeCheckout {
    client: stripe::Client,
    /// Plain HTTP client for retrievals, where only a few fields of nested expanded objects
    /// are read (the typed objects would need most of async-stripe's features compiled).
    http: reqwest::Client,
    api_base: String,
    secret_key: SecretString,
}

impl StripeCheckout {
    /// Builds the HTTP client (rustls; plain `http://` is accepted for local fakes).
    pub fn new(config: StripeConfig) -> Result<Self, StripeConfigError> {
        let secret = config.secret_key.expose_secret();
        if secret.trim().is_empty() {
            return Err(StripeConfigError::EmptySecretKey);
        }
        // async-stripe joins `<base>v1/...` without a separator.
        let mut api_base = config.api_base;
        if !api_base.ends_with('/') {
            api_base.push('/');
        }
        let client = stripe::ClientBuilder::new(secret)
            .url(api_base.clone())
            .timeout(config.timeout)
            .request_strategy(RequestStrategy::Once)
            .build()
            .map_err(|err| StripeConfigError::Invalid(err.to_string()))?;
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|err| StripeConfigError::Invalid(err.to_string()))?;
        Ok(Self {
            client,
            http,
            api_base,
            secret_key: config.secret_key,
        })
    }
}

/// The two fields of the created session the service needs. Reading only these (instead of
/// the full `CheckoutSession` type) means a session Stripe did create can never be lost to a
/// response we fail to deserialise.
#[derive(miniserde::Deserialize)]
struct CreatedSession {
    id: String,
    url: Option<String>,
}

#[async_trait]
impl PaymentProvider for StripeCheckout {
    fn name(&self) -> &'static str {
        "stripe"
    }

    #[tracing::instrument(
        name = "stripe.create_checkout",
        skip_all,
        fields(recharge.id = %req.recharge_id, account.id = %req.user_id)
    )]
    async fn create_checkout(
        &self,
        req: &CheckoutRequest,
    ) -> Result<CheckoutSession, ProviderError> {
        let key = IdempotencyKey::new(&req.recharge_id)
            .map_err(|err| ProviderError::Rejected(format!("unusable recharge id: {err}")))?;
        let params = session_params(req)?;
        let created: CreatedSession = params
            .build()
            .customize::<CreatedSession>()
            .request_strategy(RequestStrategy::Idempotent(key))
            .send(&self.client)
            .await
            .map_err(map_error)?;
        tracing::info!(stripe.session_id = %created.id, "checkout session created");
        Ok(CheckoutSession {
            session_id: created.id,
            url: created.url,
        })
    }

    #[tracing::instrument(name = "stripe.retrieve_checkout", skip_all, fields(stripe.session_id = %session_id))]
    async fn retrieve_checkout(&self, session_id: &str) -> Result<CheckoutStatus, ProviderError> {
        if session_id.is_empty()
            || !session_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(ProviderError::Rejected("not a checkout session id".into()));
        }
        let url = format!("{}v1/checkout/sessions/{session_id}", self.api_base);
        let response = self
            .http
            .get(url)
            .query(&[("expand[]", "payment_intent.latest_charge")])
            .bearer_auth(self.secret_key.expose_secret())
            .send()
            .await
            .map_err(|e| ProviderError::Unavailable(format!("could not reach stripe: {e}")))?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.map_err(|e| {
            ProviderError::Unavailable(format!("unreadable answer from stripe: {e}"))
        })?;
        if status.is_client_error() {
            let message = body["error"]["message"].as_str().unwrap_or("no message");
            return Err(ProviderError::Rejected(format!(
                "stripe answered {status}: {message}"
            )));
        }
        if !status.is_success() {
            return Err(ProviderError::Unavailable(format!(
                "stripe answered {status}"
            )));
        }
        Ok(checkout_status(&body))
    }
}

/// Reads the fields reconciliation needs from a retrieved session, whether its payment intent
/// (and the intent's latest charge) came expanded or as an id.
pub fn checkout_status(session: &serde_json::Value) -> CheckoutStatus {
    let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
    let intent = &session["payment_intent"];
    let (payment_intent, intent_status, charge) = match intent {
        serde_json::Value::String(id) => (Some(id.clone()), None, &serde_json::Value::Null),
        serde_json::Value::Object(_) => (
            text(&intent["id"]),
            text(&intent["status"]),
            &intent["latest_charge"],
        ),
        _ => (None, None, &serde_json::Value::Null),
    };
    CheckoutStatus {
        session_id: text(&session["id"]).unwrap_or_default(),
        status: text(&session["status"]).unwrap_or_default(),
        payment_status: text(&session["payment_status"]).unwrap_or_default(),
        amount_total: session["amount_total"].as_i64(),
        currency: text(&session["currency"]),
        payment_intent,
        payment_failed: matches!(
            intent_status.as_deref(),
            Some("canceled" | "requires_payment_method")
        ) && session["payment_status"] != "paid",
        amount_refunded: charge["amount_refunded"].as_i64().unwrap_or(0),
        disputed: charge["disputed"].as_bool().unwrap_or(false),
    }
}

/// The form Stripe receives: one `price_data` line item, ids in metadata and as
/// `client_reference_id`, so the webhook can be tied back to the recharge.
fn session_params(req: &CheckoutRequest) -> Result<CreateCheckoutSession, ProviderError> {
    if req.amount_fen <= 0 {
        return Err(ProviderError::Rejected(format!(
            "amount must be positive, got {}",
            req.amount_fen
        )));
    }
    let Ok(currency) = Currency::from_str(&req.currency);
    if let Currency::Unknown(code) = currency {
        // `Unknown` would be sent in a shape Stripe does not accept; refuse it here.
        return Err(ProviderError::Rejected(format!(
            "unsupported currency `{code}`"
        )));
    }

    let metadata = HashMap::from([
        ("user_id".to_owned(), req.user_id.clone()),
        ("recharge_id".to_owned(), req.recharge_id.clone()),
    ]);

    let mut price_data = CreateCheckoutSessionLineItemsPriceData::new(currency);
    price_data.unit_amount = Some(req.amount_fen);
    price_data.product_data = Some(ProductData::new(format!("{} credits", req.credits)));

    let mut line_item = CreateCheckoutSessionLineItems::new();
    line_item.price_data = Some(price_data);
    line_item.quantity = Some(1);

    // The ids also go on the PaymentIntent, so refunds and disputes (events about charges,
    // which name the PaymentIntent) can be traced back from Stripe's side too. The link the
    // service relies on is the `payment_intent` id of the completed session.
    let mut payment_intent_data = CreateCheckoutSessionPaymentIntentData::new();
    payment_intent_data.metadata = Some(metadata.clone());

    Ok(CreateCheckoutSession::new()
        .mode(CheckoutSessionMode::Payment)
        .line_items(vec![line_item])
        .metadata(metadata)
        .payment_intent_data(payment_intent_data)
        .client_reference_id(req.recharge_id.clone())
        .success_url(req.success_url.clone())
        .cancel_url(req.cancel_url.clone()))
}

/// A definite answer from Stripe about the request (4xx) is `Rejected`; anything that leaves
/// the outcome unknown or may pass on retry (transport, time-out, 5xx, 409 concurrent use of the
/// idempotency key, 429 rate limit, unreadable answer) is `Unavailable`.
fn map_error(err: StripeError) -> ProviderError {
    let mapped = match &err {
        StripeError::Stripe(api, status) => {
            let message = format!(
                "stripe answered {status} {}{}: {}",
                api.type_,
                api.code
                    .as_ref()
                    .map(|code| format!(" ({code})"))
                    .unwrap_or_default(),
                api.message.as_deref().unwrap_or("no message")
            );
            match status {
                409 | 429 => ProviderError::Unavailable(message),
                400..=499 => ProviderError::Rejected(message),
                _ => ProviderError::Unavailable(message),
            }
        }
        StripeError::Timeout => ProviderError::Unavailable("request to stripe timed out".into()),
        StripeError::ClientError(msg) => {
            ProviderError::Unavailable(format!("could not reach stripe: {msg}"))
        }
        StripeError::JSONDeserialize(msg) => {
            ProviderError::Unavailable(format!("unreadable answer from stripe: {msg}"))
        }
        StripeError::ConfigError(msg) => {
            ProviderError::Unavailable(format!("stripe client misconfigured: {msg}"))
        }
    };
    tracing::warn!(error = %mapped, "stripe checkout session not created");
    mapped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> CheckoutRequest {
        CheckoutRequest {
            user_id: "u_1".into(),
            recharge_id: "r_1".into(),
            amount_fen: 1000,
            currency: "cny".into(),
            credits: 1000,
            success_url: "https://app.example/ok".into(),
            cancel_url: "https://app.example/cancel".into(),
        }
    }

    #[test]
    fn refuses_unknown_currency_and_non_positive_amounts_before_calling_stripe() {
        let mut req = request();
        req.currency = "xyz".into();
        assert!(matches!(
            session_params(&req),
            Err(ProviderError::Rejected(_))
        ));
        let mut req = request();
        req.amount_fen = 0;
        assert!(matches!(
            session_params(&req),
            Err(ProviderError::Rejected(_))
        ));
        assert!(session_params(&request()).is_ok());
    }

    #[test]
    fn refuses_an_empty_secret_key() {
        let config = StripeConfig::new(SecretString::from(" "));
        assert!(matches!(
            StripeCheckout::new(config),
            Err(StripeConfigError::EmptySecretKey)
        ));
    }
}
