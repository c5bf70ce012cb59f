//! Deliveries built by the test kit (from Stripe's fixtures, signed as Stripe signs) pass
//! `verify_signature` and parse into the expected `WebhookEvent`s: the two sides were written
//! independently, so this pins them to the same wire format.

use credit_stripe::{
    parse_event, verify_signature, EventData, SignatureError, DEFAULT_TOLERANCE_SECS,
};
use credit_testkit::fake_stripe::{
    charge_refunded_event, checkout_completed_event, dispute_created_event, session_expired_event,
    signed_event, signed_event_at, v1_signature,
};

const SECRET: &str = "whsec_test_kit";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .expect("clock after 1970")
}

#[test]
fn a_signed_checkout_completed_delivery_verifies_and_parses() {
    let event = checkout_completed_event(
        "evt_1",
        "cs_test_1",
        "rch_1",
        "usr_1",
        1000,
        "cny",
        "paid",
        Some("pi_1"),
    );
    let (body, header) = signed_event(SECRET, &event);
    verify_signature(
        body.as_bytes(),
        &header,
        SECRET,
        DEFAULT_TOLERANCE_SECS,
        now(),
    )
    .expect("valid signature");
    let parsed = parse_event(body.as_bytes()).expect("parses");
    assert_eq!(parsed.id, "evt_1");
    let EventData::CheckoutSession(session) = parsed.data else {
        panic!("not a session: {parsed:?}");
    };
    assert_eq!(session.session_id, "cs_test_1");
    assert_eq!(session.client_reference_id.as_deref(), Some("rch_1"));
    assert_eq!(session.recharge_id.as_deref(), Some("rch_1"));
    assert_eq!(session.user_id.as_deref(), Some("usr_1"));
    assert_eq!(session.amount_total, Some(1000));
    assert_eq!(session.currency.as_deref(), Some("cny"));
    assert_eq!(session.payment_status, "paid");
    assert_eq!(session.payment_intent.as_deref(), Some("pi_1"));
}

#[test]
fn wrong_secret_stale_and_tampered_deliveries_are_refused() {
    let event = session_expired_event("evt_2", "cs_test_2", "rch_2", "usr_2", 500, "cny");
    let (body, header) = signed_event("whsec_someone_else", &event);
    assert_eq!(
        verify_signature(
            body.as_bytes(),
            &header,
            SECRET,
            DEFAULT_TOLERANCE_SECS,
            now()
        ),
        Err(SignatureError::Mismatch)
    );

    let (body, header) = signed_event_at(SECRET, &event, now() - 3600);
    assert!(matches!(
        verify_signature(
            body.as_bytes(),
            &header,
            SECRET,
            DEFAULT_TOLERANCE_SECS,
            now()
        ),
        Err(SignatureError::Stale { .. })
    ));

    let (body, header) = signed_event(SECRET, &event);
    let tampered = body.replace("\"amount_total\":500", "\"amount_total\":50000");
    assert_ne!(tampered, body);
    assert_eq!(
        verify_signature(
            tampered.as_bytes(),
            &header,
            SECRET,
            DEFAULT_TOLERANCE_SECS,
            now()
        ),
        Err(SignatureError::Mismatch)
    );
}

#[test]
fn a_rolled_secret_delivery_with_two_v1_values_verifies() {
    let event = session_expired_event("evt_3", "cs_test_3", "rch_3", "usr_3", 500, "cny");
    let body = event.to_string();
    let t = now();
    let header = format!(
        "t={t},v1={},v1={}",
        v1_signature("whsec_old", &body, t),
        v1_signature(SECRET, &body, t)
    );
    verify_signature(body.as_bytes(), &header, SECRET, DEFAULT_TOLERANCE_SECS, t)
        .expect("one v1 matches");
}

#[test]
fn refund_and_dispute_deliveries_parse() {
    let event = charge_refunded_event(
        "evt_4",
        "ch_1",
        Some("pi_1"),
        1000,
        1000,
        "cny",
        &[("recharge_id", "rch_1")],
    );
    let parsed = parse_event(event.to_string().as_bytes()).expect("parses");
    let EventData::ChargeRefunded(charge) = parsed.data else {
        panic!("not a refund: {parsed:?}");
    };
    assert_eq!(charge.charge_id, "ch_1");
    assert_eq!(charge.payment_intent.as_deref(), Some("pi_1"));
    assert_eq!((charge.amount, charge.amount_refunded), (1000, 1000));
    assert_eq!(
        charge.metadata.get("recharge_id").map(String::as_str),
        Some("rch_1")
    );

    let event = dispute_created_event("evt_5", "dp_1", "ch_1", Some("pi_1"), 1000, "cny");
    let parsed = parse_event(event.to_string().as_bytes()).expect("parses");
    let EventData::Dispute(dispute) = parsed.data else {
        panic!("not a dispute: {parsed:?}");
    };
    assert_eq!(dispute.dispute_id, "dp_1");
    assert_eq!(dispute.charge_id, "ch_1");
    assert_eq!(dispute.payment_intent.as_deref(), Some("pi_1"));
    assert_eq!((dispute.amount, dispute.currency.as_str()), (1000, "cny"));
}
