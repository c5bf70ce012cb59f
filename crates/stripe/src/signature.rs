//! Webhook signature verification, Stripe's scheme:
//! `Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>[,v1=...][,v0=...]`.
//!
//! It must run on the raw body exactly as received: any re-serialisation changes the bytes
//! and breaks the signature.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Name of the HTTP header carrying the signature.
pub const SIGNATURE_HEADER: &str = "Stripe-Signature";

/// Stripe's own libraries accept deliveries signed up to five minutes ago.
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

/// Why a webhook delivery was not accepted as coming from Stripe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("malformed signature header: {0}")]
    Malformed(&'static str),
    #[error("signature header has no timestamp")]
    MissingTimestamp,
    #[error("signature header has no v1 signature")]
    NoSignatures,
    #[error("no v1 signature matches the payload")]
    Mismatch,
    #[error(
        "signature timestamp {timestamp} is more than {tolerance_secs}s away from now ({now})"
    )]
    Stale {
        timestamp: i64,
        now: i64,
        tolerance_secs: i64,
    },
    #[error("the webhook signing secret is empty")]
    EmptySecret,
}

/// Checks that `payload` was signed by Stripe with `secret` within `tolerance_secs` of
/// `now_unix` (either direction). Any of several `v1` signatures may match (Stripe sends
/// one per active secret while a secret is being rolled); other schemes such as `v0` are
/// ignored. Signatures are compared in constant time.
pub fn verify_signature(
    payload: &[u8],
    header: &str,
    secret: &str,
    tolerance_secs: i64,
    now_unix: i64,
) -> Result<(), SignatureError> {
    if secret.is_empty() {
        return Err(SignatureError::EmptySecret);
    }
    let parsed = parse_header(header)?;
    let (timestamp_text, timestamp) = parsed.timestamp.ok_or(SignatureError::MissingTimestamp)?;
    if parsed.v1.is_empty() {
        return Err(SignatureError::NoSignatures);
    }

    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .map_err(|_| SignatureError::EmptySecret)?;
    mac.update(timestamp_text.as_bytes());
    mac.update(b".");
    mac.update(payload);

    // A candidate that is not valid hex simply does not match; it must not hide a valid one.
    let matches = parsed
        .v1
        .iter()
        .filter_map(|candidate| hex::decode(candidate).ok())
        .any(|candidate| mac.clone().verify_slice(&candidate).is_ok());
    if !matches {
        return Err(SignatureError::Mismatch);
    }

    let tolerance = u64::try_from(tolerance_secs).unwrap_or(0);
    if now_unix.abs_diff(timestamp) > tolerance {
        return Err(SignatureError::Stale {
            timestamp,
            now: now_unix,
            tolerance_secs,
        });
    }
    Ok(())
}

struct ParsedHeader<'a> {
    /// The timestamp as written (it is what was signed) and its value.
    timestamp: Option<(&'a str, i64)>,
    v1: Vec<&'a str>,
}

fn parse_header(header: &str) -> Result<ParsedHeader<'_>, SignatureError> {
    let header = header.trim();
    if header.is_empty() {
        return Err(SignatureError::Malformed("empty header"));
    }
    let mut parsed = ParsedHeader {
        timestamp: None,
        v1: Vec::new(),
    };
    for item in header.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or(SignatureError::Malformed("element without `=`"))?;
        let (key, value) = (key.trim(), value.trim());
        match key {
            "t" => {
                if parsed.timestamp.is_some() {
                    return Err(SignatureError::Malformed("more than one timestamp"));
                }
                let seconds = value
                    .parse::<i64>()
                    .map_err(|_| SignatureError::Malformed("timestamp is not an integer"))?;
                parsed.timestamp = Some((value, seconds));
            }
            "v1" => parsed.v1.push(value),
            "" => return Err(SignatureError::Malformed("element without a name")),
            // v0 (test-mode legacy) and any future scheme: not ours to check.
            _ => {}
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test_secret";
    const NOW: i64 = 1_700_000_000;
    const BODY: &str = include_str!("../../testkit/fixtures/stripe/event.json");

    fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac takes any key");
        mac.update(format!("{timestamp}.").as_bytes());
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    fn header(secret: &str, timestamp: i64, body: &[u8]) -> String {
        format!("t={timestamp},v1={}", sign(secret, timestamp, body))
    }

    fn verify(header: &str) -> Result<(), SignatureError> {
        verify_signature(BODY.as_bytes(), header, SECRET, DEFAULT_TOLERANCE_SECS, NOW)
    }

    #[test]
    fn accepts_a_valid_signature() {
        assert_eq!(verify(&header(SECRET, NOW, BODY.as_bytes())), Ok(()));
    }

    #[test]
    fn accepts_when_any_of_several_v1_values_matches_and_ignores_v0() {
        let good = sign(SECRET, NOW, BODY.as_bytes());
        let other = sign("whsec_old_secret", NOW, BODY.as_bytes());
        let h = format!("t={NOW},v1={other},v1=not-hex,v1={good},v0={other}");
        assert_eq!(verify(&h), Ok(()));
        // Order and spacing do not matter.
        let h = format!("v0={other}, v1={good}, t={NOW}");
        assert_eq!(verify(&h), Ok(()));
    }

    #[test]
    fn rejects_a_signature_made_with_another_secret() {
        let h = header("whsec_wrong", NOW, BODY.as_bytes());
        assert_eq!(verify(&h), Err(SignatureError::Mismatch));
    }

    #[test]
    fn rejects_a_tampered_body() {
        let h = header(SECRET, NOW, BODY.as_bytes());
        let tampered = BODY.replace("2000", "2001");
        assert_ne!(tampered, BODY);
        assert_eq!(
            verify_signature(tampered.as_bytes(), &h, SECRET, DEFAULT_TOLERANCE_SECS, NOW),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn rejects_a_changed_timestamp() {
        let sig = sign(SECRET, NOW, BODY.as_bytes());
        let h = format!("t={},v1={sig}", NOW + 1);
        assert_eq!(verify(&h), Err(SignatureError::Mismatch));
    }

    #[test]
    fn rejects_timestamps_outside_the_tolerance_both_ways() {
        let old = NOW - DEFAULT_TOLERANCE_SECS - 1;
        assert!(matches!(
            verify(&header(SECRET, old, BODY.as_bytes())),
            Err(SignatureError::Stale { timestamp, .. }) if timestamp == old
        ));
        let future = NOW + DEFAULT_TOLERANCE_SECS + 1;
        assert!(matches!(
            verify(&header(SECRET, future, BODY.as_bytes())),
            Err(SignatureError::Stale { .. })
        ));
        // Exactly at the edge is still fine.
        let edge = NOW - DEFAULT_TOLERANCE_SECS;
        assert_eq!(verify(&header(SECRET, edge, BODY.as_bytes())), Ok(()));
    }

    #[test]
    fn rejects_malformed_headers() {
        let sig = sign(SECRET, NOW, BODY.as_bytes());
        assert!(matches!(verify(""), Err(SignatureError::Malformed(_))));
        assert!(matches!(
            verify("garbage"),
            Err(SignatureError::Malformed(_))
        ));
        assert!(matches!(
            verify(&format!("t=yesterday,v1={sig}")),
            Err(SignatureError::Malformed(_))
        ));
        assert!(matches!(
            verify(&format!("t={NOW},t={NOW},v1={sig}")),
            Err(SignatureError::Malformed(_))
        ));
        assert!(matches!(
            verify(&format!("t={NOW},{sig}")),
            Err(SignatureError::Malformed(_))
        ));
        assert_eq!(
            verify(&format!("v1={sig}")),
            Err(SignatureError::MissingTimestamp)
        );
        assert_eq!(
            verify(&format!("t={NOW},v0={sig}")),
            Err(SignatureError::NoSignatures)
        );
    }

    #[test]
    fn refuses_to_work_with_an_empty_secret() {
        let h = header("", NOW, BODY.as_bytes());
        assert_eq!(
            verify_signature(BODY.as_bytes(), &h, "", DEFAULT_TOLERANCE_SECS, NOW),
            Err(SignatureError::EmptySecret)
        );
    }
}
