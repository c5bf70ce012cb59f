//! Yuan amounts as clients write them, turned into exact fen. No floating point arithmetic:
//! the number's decimal text is read digit by digit.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("amount must be a number of yuan with at most 2 decimals")]
    NotDecimal,
    #[error("amount has more than 2 decimals")]
    TooPrecise,
    #[error("amount must be positive")]
    NotPositive,
    #[error("amount is too large")]
    TooLarge,
}

/// Parses `"50"`, `"50.5"`, `"0.01"` into fen. Refuses signs, exponents, more than 2
/// decimals, zero and absurdly large values.
pub fn yuan_text_to_fen(text: &str) -> Result<i64, AmountError> {
    if text.starts_with('-') {
        return Err(AmountError::NotPositive);
    }
    let (whole, frac) = match text.split_once('.') {
        Some((w, f)) => (w, f),
        None => (text, ""),
    };
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AmountError::NotDecimal);
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(AmountError::NotDecimal);
    }
    let frac = frac.trim_end_matches('0');
    if frac.len() > 2 {
        return Err(AmountError::TooPrecise);
    }
    if whole.trim_start_matches('0').len() > 12 {
        return Err(AmountError::TooLarge);
    }
    let whole: i64 = whole.parse().map_err(|_| AmountError::TooLarge)?;
    let mut cents = 0i64;
    for (i, b) in frac.bytes().enumerate() {
        cents += i64::from(b - b'0') * if i == 0 { 10 } else { 1 };
    }
    let fen = whole
        .checked_mul(100)
        .and_then(|v| v.checked_add(cents))
        .ok_or(AmountError::TooLarge)?;
    if fen <= 0 {
        return Err(AmountError::NotPositive);
    }
    Ok(fen)
}

/// Reads a JSON number (as serde_json prints it) as yuan.
pub fn json_yuan_to_fen(value: &serde_json::Value) -> Result<i64, AmountError> {
    match value {
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                if i <= 0 {
                    return Err(AmountError::NotPositive);
                }
                return i.checked_mul(100).ok_or(AmountError::TooLarge);
            }
            if n.as_u64().is_some() {
                return Err(AmountError::TooLarge);
            }
            // A float: its shortest round-trip text is what the client wrote (50.1 → "50.1").
            let text = n.to_string();
            if text.contains(['e', 'E']) {
                return Err(if text.contains("e-") || text.contains("E-") {
                    AmountError::TooPrecise
                } else {
                    AmountError::TooLarge
                });
            }
            yuan_text_to_fen(&text)
        }
        _ => Err(AmountError::NotDecimal),
    }
}

/// Fen as yuan for responses (exact for every amount below 2^53 fen).
pub fn fen_to_yuan(fen: i64) -> serde_json::Value {
    if fen % 100 == 0 {
        serde_json::Value::from(fen / 100)
    } else {
        serde_json::Value::from(fen as f64 / 100.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn yuan_texts() {
        assert_eq!(yuan_text_to_fen("50"), Ok(5000));
        assert_eq!(yuan_text_to_fen("50.5"), Ok(5050));
        assert_eq!(yuan_text_to_fen("0.01"), Ok(1));
        assert_eq!(yuan_text_to_fen("10.10"), Ok(1010));
        assert_eq!(yuan_text_to_fen("1.005"), Err(AmountError::TooPrecise));
        assert_eq!(yuan_text_to_fen("0"), Err(AmountError::NotPositive));
        assert_eq!(yuan_text_to_fen("-5"), Err(AmountError::NotPositive));
        assert_eq!(yuan_text_to_fen("1e3"), Err(AmountError::NotDecimal));
        assert_eq!(yuan_text_to_fen(".5"), Err(AmountError::NotDecimal));
        assert_eq!(
            yuan_text_to_fen("99999999999999999"),
            Err(AmountError::TooLarge)
        );
    }

    #[test]
    fn json_numbers() {
        assert_eq!(json_yuan_to_fen(&json!(50)), Ok(5000));
        assert_eq!(json_yuan_to_fen(&json!(19.99)), Ok(1999));
        assert_eq!(json_yuan_to_fen(&json!(0.1)), Ok(10));
        assert_eq!(
            json_yuan_to_fen(&json!(10.001)),
            Err(AmountError::TooPrecise)
        );
        assert_eq!(json_yuan_to_fen(&json!(-1)), Err(AmountError::NotPositive));
        assert_eq!(json_yuan_to_fen(&json!(0)), Err(AmountError::NotPositive));
        assert_eq!(json_yuan_to_fen(&json!(1e300)), Err(AmountError::TooLarge));
        assert_eq!(json_yuan_to_fen(&json!("50")), Err(AmountError::NotDecimal));
        assert_eq!(
            json_yuan_to_fen(&json!(u64::MAX)),
            Err(AmountError::TooLarge)
        );
        assert_eq!(fen_to_yuan(5000), json!(50));
        assert_eq!(fen_to_yuan(1999), json!(19.99));
    }
}
