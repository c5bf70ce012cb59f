//! Webhook event parsing: hand-written, minimal structs for the few event types the service
//! acts on. Unknown fields are ignored and unknown event types parse to [`EventData::Other`],
//! so a Stripe API upgrade adding fields or event types cannot break the webhook endpoint.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

/// The event type strings this crate understands.
pub mod event_types {
    pub const CHECKOUT_SESSION_COMPLETED: &str = "checkout.session.completed";
    pub const CHECKOUT_SESSION_ASYNC_PAYMENT_SUCCEEDED: &str =
        "checkout.session.async_payment_succeeded";
    pub const CHECKOUT_SESSION_ASYNC_PAYMENT_FAILED: &str = "checkout.session.async_payment_failed";
    pub const CHECKOUT_SESSION_EXPIRED: &str = "checkout.session.expired";
    pub const CHARGE_REFUNDED: &str = "charge.refunded";
    pub const CHARGE_DISPUTE_CREATED: &str = "charge.dispute.created";
    pub const CHARGE_DISPUTE_UPDATED: &str = "charge.dispute.updated";
    pub const CHARGE_DISPUTE_FUNDS_WITHDRAWN: &str = "charge.dispute.funds_withdrawn";
    pub const CHARGE_DISPUTE_FUNDS_REINSTATED: &str = "charge.dispute.funds_reinstated";
    pub const CHARGE_DISPUTE_CLOSED: &str = "charge.dispute.closed";
}

/// One webhook delivery, reduced to what the service needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEvent {
    /// `evt_...`; the key for de-duplicating deliveries.
    pub id: String,
    /// Stripe's event type, e.g. `checkout.session.completed`.
    pub event_type: String,
    /// Unix seconds at which Stripe created the event.
    pub created: i64,
    pub data: EventData,
}

/// The object the event is about, for the types the service acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventData {
    /// `checkout.session.completed`, `.async_payment_succeeded`, `.async_payment_failed`,
    /// `.expired`; which one is in [`WebhookEvent::event_type`].
    CheckoutSession(SessionInfo),
    /// `charge.refunded` (full or partial: compare `amount_refunded` with `amount`).
    ChargeRefunded(ChargeInfo),
    /// `charge.dispute.created`, `.updated`, `.funds_withdrawn`, `.funds_reinstated`,
    /// `.closed`; which one is in [`WebhookEvent::event_type`].
    Dispute(DisputeInfo),
    /// Any other event type; acknowledged and ignored.
    Other,
}

/// A Checkout Session as carried by `checkout.session.*` events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// `cs_...`
    pub session_id: String,
    /// The recharge id we set when creating the session.
    pub client_reference_id: Option<String>,
    /// `metadata.user_id`
    pub user_id: Option<String>,
    /// `metadata.recharge_id`
    pub recharge_id: Option<String>,
    /// Total in the smallest currency unit (fen for `cny`).
    pub amount_total: Option<i64>,
    pub currency: Option<String>,
    /// `paid`, `unpaid` or `no_payment_required`.
    pub payment_status: String,
    /// `pi_...`, whether Stripe sent the id or the expanded object.
    pub payment_intent: Option<String>,
}

/// A charge as carried by `charge.refunded`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeInfo {
    /// `ch_...`
    pub charge_id: String,
    pub payment_intent: Option<String>,
    pub amount: i64,
    /// Cumulative amount refunded so far.
    pub amount_refunded: i64,
    pub currency: String,
    pub metadata: HashMap<String, String>,
}

/// A dispute as carried by `charge.dispute.*` events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisputeInfo {
    /// `dp_...`
    pub dispute_id: String,
    /// `ch_...` of the disputed charge.
    pub charge_id: String,
    pub payment_intent: Option<String>,
    /// Disputed amount (on its own, not cumulative with refunds).
    pub amount: i64,
    pub currency: String,
    /// `warning_needs_response`, `warning_under_review`, `warning_closed`,
    /// `needs_response`, `under_review`, `won`, `lost`, `prevented`.
    pub status: String,
}

/// The body is not a Stripe event we can read.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("webhook body is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("webhook body is not a Stripe event: {0}")]
    InvalidEnvelope(String),
    #[error("`{event_type}` event carries an unexpected object: {source}")]
    InvalidObject {
        event_type: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Parses a webhook body (already signature-checked) into a [`WebhookEvent`]. Fails only if
/// the body is not JSON, lacks a non-empty `id` or `type`, or carries an object of a
/// known event type that lacks a field the service needs.
pub fn parse_event(payload: &[u8]) -> Result<WebhookEvent, ParseError> {
    let value: Value = serde_json::from_slice(payload).map_err(ParseError::NotJson)?;
    let envelope =
        Envelope::deserialize(value).map_err(|err| ParseError::InvalidEnvelope(err.to_string()))?;
    if envelope.id.is_empty() || envelope.event_type.is_empty() {
        return Err(ParseError::InvalidEnvelope(
            "empty `id` or `type`".to_owned(),
        ));
    }

    let object = envelope.data.map(|data| data.object).unwrap_or(Value::Null);
    let invalid = |source| ParseError::InvalidObject {
        event_type: envelope.event_type.clone(),
        source,
    };
    use event_types::*;
    let data = match envelope.event_type.as_str() {
        CHECKOUT_SESSION_COMPLETED
        | CHECKOUT_SESSION_ASYNC_PAYMENT_SUCCEEDED
        | CHECKOUT_SESSION_ASYNC_PAYMENT_FAILED
        | CHECKOUT_SESSION_EXPIRED => {
            EventData::CheckoutSession(SessionObject::deserialize(object).map_err(invalid)?.into())
        }
        CHARGE_REFUNDED => {
            EventData::ChargeRefunded(ChargeObject::deserialize(object).map_err(invalid)?.into())
        }
        CHARGE_DISPUTE_CREATED
        | CHARGE_DISPUTE_UPDATED
        | CHARGE_DISPUTE_FUNDS_WITHDRAWN
        | CHARGE_DISPUTE_FUNDS_REINSTATED
        | CHARGE_DISPUTE_CLOSED => {
            EventData::Dispute(DisputeObject::deserialize(object).map_err(invalid)?.into())
        }
        _ => EventData::Other,
    };

    Ok(WebhookEvent {
        id: envelope.id,
        event_type: envelope.event_type,
        created: envelope.created,
        data,
    })
}

#[derive(Deserialize)]
struct Envelope {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    created: i64,
    #[serde(default)]
    data: Option<EnvelopeData>,
}

#[derive(Deserialize)]
struct EnvelopeData {
    #[serde(default)]
    object: Value,
}

/// A reference to another Stripe object: its id, or the object itself when expanded.
#[derive(Deserialize)]
#[serde(untagged)]
enum Expandable {
    Id(String),
    Object { id: String },
}

impl Expandable {
    fn into_id(self) -> String {
        match self {
            Expandable::Id(id) | Expandable::Object { id } => id,
        }
    }
}

#[derive(Deserialize)]
struct SessionObject {
    id: String,
    #[serde(default)]
    client_reference_id: Option<String>,
    #[serde(default)]
    metadata: Option<HashMap<String, String>>,
    #[serde(default)]
    amount_total: Option<i64>,
    #[serde(default)]
    currency: Option<String>,
    payment_status: String,
    #[serde(default)]
    payment_intent: Option<Expandable>,
}

impl From<SessionObject> for SessionInfo {
    fn from(s: SessionObject) -> Self {
        let mut metadata = s.metadata.unwrap_or_default();
        SessionInfo {
            session_id: s.id,
            client_reference_id: s.client_reference_id,
            user_id: metadata.remove("user_id"),
            recharge_id: metadata.remove("recharge_id"),
            amount_total: s.amount_total,
            currency: s.currency,
            payment_status: s.payment_status,
            payment_intent: s.payment_intent.map(Expandable::into_id),
        }
    }
}

#[derive(Deserialize)]
struct ChargeObject {
    id: String,
    #[serde(default)]
    payment_intent: Option<Expandable>,
    amount: i64,
    amount_refunded: i64,
    currency: String,
    #[serde(default)]
    metadata: Option<HashMap<String, String>>,
}

impl From<ChargeObject> for ChargeInfo {
    fn from(c: ChargeObject) -> Self {
        ChargeInfo {
            charge_id: c.id,
            payment_intent: c.payment_intent.map(Expandable::into_id),
            amount: c.amount,
            amount_refunded: c.amount_refunded,
            currency: c.currency,
            metadata: c.metadata.unwrap_or_default(),
        }
    }
}

#[derive(Deserialize)]
struct DisputeObject {
    id: String,
    charge: Expandable,
    #[serde(default)]
    payment_intent: Option<Expandable>,
    amount: i64,
    currency: String,
    #[serde(default)]
    status: String,
}

impl From<DisputeObject> for DisputeInfo {
    fn from(d: DisputeObject) -> Self {
        DisputeInfo {
            dispute_id: d.id,
            charge_id: d.charge.into_id(),
            payment_intent: d.payment_intent.map(Expandable::into_id),
            amount: d.amount,
            currency: d.currency,
            status: d.status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const EVENT: &str = include_str!("../../testkit/fixtures/stripe/event.json");
    const SESSION: &str = include_str!("../../testkit/fixtures/stripe/checkout.session.json");
    const CHARGE: &str = include_str!("../../testkit/fixtures/stripe/charge.json");
    const DISPUTE: &str = include_str!("../../testkit/fixtures/stripe/dispute.json");
    const PAYMENT_INTENT: &str = include_str!("../../testkit/fixtures/stripe/payment_intent.json");

    fn fixture(text: &str) -> Value {
        serde_json::from_str(text).expect("fixture is JSON")
    }

    /// Wraps `object` in the fixture event envelope, as Stripe delivers it.
    fn event(id: &str, event_type: &str, object: Value) -> Vec<u8> {
        let mut event = fixture(EVENT);
        event["id"] = json!(id);
        event["type"] = json!(event_type);
        event["created"] = json!(1_700_000_123);
        event["data"]["object"] = object;
        serde_json::to_vec(&event).expect("serialisable")
    }

    fn paid_session() -> Value {
        let mut session = fixture(SESSION);
        session["id"] = json!("cs_test_123");
        session["client_reference_id"] = json!("rch_1");
        session["metadata"] = json!({"user_id": "usr_1", "recharge_id": "rch_1", "other": "x"});
        session["amount_total"] = json!(1000);
        session["currency"] = json!("cny");
        session["payment_status"] = json!("paid");
        session["status"] = json!("complete");
        session
    }

    fn parse(body: &[u8]) -> WebhookEvent {
        parse_event(body).expect("parses")
    }

    #[test]
    fn parses_checkout_session_completed() {
        let body = event("evt_1", "checkout.session.completed", paid_session());
        let parsed = parse(&body);
        assert_eq!(parsed.id, "evt_1");
        assert_eq!(parsed.event_type, "checkout.session.completed");
        assert_eq!(parsed.created, 1_700_000_123);
        assert_eq!(
            parsed.data,
            EventData::CheckoutSession(SessionInfo {
                session_id: "cs_test_123".into(),
                client_reference_id: Some("rch_1".into()),
                user_id: Some("usr_1".into()),
                recharge_id: Some("rch_1".into()),
                amount_total: Some(1000),
                currency: Some("cny".into()),
                payment_status: "paid".into(),
                payment_intent: Some("pi_1PgafyB7WZ01zgkWSjxsAJo3".into()),
            })
        );
    }

    #[test]
    fn parses_an_expanded_payment_intent() {
        let mut session = paid_session();
        session["payment_intent"] = fixture(PAYMENT_INTENT);
        let parsed = parse(&event("evt_2", "checkout.session.completed", session));
        let EventData::CheckoutSession(info) = parsed.data else {
            panic!("not a session: {parsed:?}");
        };
        assert_eq!(
            info.payment_intent.as_deref(),
            Some("pi_1PgafyB7WZ01zgkWSjxsAJo3")
        );
    }

    #[test]
    fn parses_every_checkout_session_event_type() {
        for event_type in [
            event_types::CHECKOUT_SESSION_ASYNC_PAYMENT_SUCCEEDED,
            event_types::CHECKOUT_SESSION_ASYNC_PAYMENT_FAILED,
            event_types::CHECKOUT_SESSION_EXPIRED,
        ] {
            let parsed = parse(&event("evt_3", event_type, paid_session()));
            assert_eq!(parsed.event_type, event_type);
            assert!(matches!(parsed.data, EventData::CheckoutSession(_)));
        }
    }

    #[test]
    fn parses_the_untouched_fixture_session_with_nulls_and_empty_metadata() {
        let mut session = fixture(SESSION);
        session["payment_intent"] = Value::Null;
        let parsed = parse(&event("evt_4", "checkout.session.expired", session));
        let EventData::CheckoutSession(info) = parsed.data else {
            panic!("not a session: {parsed:?}");
        };
        assert_eq!(
            info.session_id,
            "cs_test_a1YS1URlnyQCN5fUUduORoQ7Pw41PJqDWkIVQCpJPqkfIhd6tVY8XB1OLY"
        );
        assert_eq!(info.client_reference_id, None);
        assert_eq!(info.recharge_id, None);
        assert_eq!(info.amount_total, None);
        assert_eq!(info.currency, None);
        assert_eq!(info.payment_status, "unpaid");
        assert_eq!(info.payment_intent, None);
    }

    #[test]
    fn parses_charge_refunded() {
        let mut charge = fixture(CHARGE);
        charge["payment_intent"] = json!("pi_9");
        charge["amount"] = json!(1000);
        charge["amount_refunded"] = json!(400);
        charge["currency"] = json!("cny");
        charge["refunded"] = json!(false);
        charge["metadata"] = json!({"recharge_id": "rch_1"});
        let parsed = parse(&event("evt_5", "charge.refunded", charge));
        assert_eq!(
            parsed.data,
            EventData::ChargeRefunded(ChargeInfo {
                charge_id: "ch_1PgafuB7WZ01zgkWXYmPNZs8".into(),
                payment_intent: Some("pi_9".into()),
                amount: 1000,
                amount_refunded: 400,
                currency: "cny".into(),
                metadata: HashMap::from([("recharge_id".into(), "rch_1".into())]),
            })
        );
    }

    #[test]
    fn parses_the_untouched_fixture_charge() {
        let parsed = parse(&event("evt_6", "charge.refunded", fixture(CHARGE)));
        let EventData::ChargeRefunded(info) = parsed.data else {
            panic!("not a charge: {parsed:?}");
        };
        assert_eq!(info.payment_intent, None);
        assert!(info.metadata.is_empty());
    }

    #[test]
    fn parses_dispute_created_with_id_or_expanded_charge() {
        let mut dispute = fixture(DISPUTE);
        dispute["payment_intent"] = json!("pi_9");
        let parsed = parse(&event("evt_7", "charge.dispute.created", dispute.clone()));
        assert_eq!(
            parsed.data,
            EventData::Dispute(DisputeInfo {
                dispute_id: "dp_1Pgc71B7WZ01zgkWMevJiAUx".into(),
                charge_id: "ch_1PgafuB7WZ01zgkWXYmPNZs8".into(),
                payment_intent: Some("pi_9".into()),
                amount: 1000,
                currency: "usd".into(),
                status: "warning_needs_response".into(),
            })
        );

        dispute["charge"] = fixture(CHARGE);
        let parsed = parse(&event("evt_8", "charge.dispute.created", dispute));
        let EventData::Dispute(info) = parsed.data else {
            panic!("not a dispute: {parsed:?}");
        };
        assert_eq!(info.charge_id, "ch_1PgafuB7WZ01zgkWXYmPNZs8");
    }

    #[test]
    fn other_event_types_parse_as_other() {
        // The fixture event is a `plan.created`.
        let parsed = parse(EVENT.as_bytes());
        assert_eq!(parsed.id, "evt_1Pgc76B7WZ01zgkWwyRHS12y");
        assert_eq!(parsed.event_type, "plan.created");
        assert_eq!(parsed.data, EventData::Other);

        // Even without `data` or `created`.
        let parsed = parse(br#"{"id":"evt_x","type":"some.future.event"}"#);
        assert_eq!(parsed.data, EventData::Other);
        assert_eq!(parsed.created, 0);
    }

    #[test]
    fn rejects_bodies_that_are_not_events() {
        assert!(matches!(
            parse_event(b"not json"),
            Err(ParseError::NotJson(_))
        ));
        assert!(matches!(parse_event(b""), Err(ParseError::NotJson(_))));
        assert!(matches!(
            parse_event(br#"{"type":"charge.refunded"}"#),
            Err(ParseError::InvalidEnvelope(_))
        ));
        assert!(matches!(
            parse_event(br#"{"id":"evt_1"}"#),
            Err(ParseError::InvalidEnvelope(_))
        ));
        assert!(matches!(
            parse_event(br#"{"id":"","type":"x"}"#),
            Err(ParseError::InvalidEnvelope(_))
        ));
        assert!(matches!(
            parse_event(br#"[1,2]"#),
            Err(ParseError::InvalidEnvelope(_))
        ));
    }

    #[test]
    fn rejects_a_known_event_type_whose_object_lacks_needed_fields() {
        let body = event(
            "evt_9",
            "checkout.session.completed",
            json!({"object": "checkout.session"}),
        );
        assert!(matches!(
            parse_event(&body),
            Err(ParseError::InvalidObject { event_type, .. }) if event_type == "checkout.session.completed"
        ));
        let body = br#"{"id":"evt_10","type":"charge.refunded"}"#;
        assert!(matches!(
            parse_event(body),
            Err(ParseError::InvalidObject { .. })
        ));
    }
}
