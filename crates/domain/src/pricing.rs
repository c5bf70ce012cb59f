use serde::{Deserialize, Serialize};

/// The price list in force. It is configuration, and every event it priced records the
/// figures used, so a later price change never alters history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pricing {
    /// Credits bought by one yuan (100 fen). Default 100.
    pub credits_per_yuan: i64,
    /// Credits charged for one video. Default 10.
    pub video_cost_credits: i64,
    /// ISO currency, lower case. Default `cny`.
    pub currency: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error("credits per yuan must be between 1 and 1000000")]
    CreditsPerYuan,
    #[error("video cost must be between 1 and 1000000 credits")]
    VideoCost,
    #[error("currency must be a three-letter lower-case ISO code")]
    Currency,
}

impl Default for Pricing {
    fn default() -> Self {
        Self {
            credits_per_yuan: 100,
            video_cost_credits: 10,
            currency: "cny".to_owned(),
        }
    }
}

impl Pricing {
    pub fn new(
        credits_per_yuan: i64,
        video_cost_credits: i64,
        currency: &str,
    ) -> Result<Self, PricingError> {
        if !(1..=1_000_000).contains(&credits_per_yuan) {
            return Err(PricingError::CreditsPerYuan);
        }
        if !(1..=1_000_000).contains(&video_cost_credits) {
            return Err(PricingError::VideoCost);
        }
        if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_lowercase()) {
            return Err(PricingError::Currency);
        }
        Ok(Self {
            credits_per_yuan,
            video_cost_credits,
            currency: currency.to_owned(),
        })
    }

    /// Credits bought by `amount_fen`, rounded down to a whole credit; `None` on overflow.
    pub fn credits_for_fen(&self, amount_fen: i64) -> Option<i64> {
        credits_for_fen(amount_fen, self.credits_per_yuan)
    }
}

/// Credits bought by `amount_fen` at `credits_per_yuan`, rounded down; `None` on overflow.
pub(crate) fn credits_for_fen(amount_fen: i64, credits_per_yuan: i64) -> Option<i64> {
    amount_fen.checked_mul(credits_per_yuan).map(|v| v / 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_yuan_buys_one_hundred_credits_by_default() {
        let p = Pricing::default();
        assert_eq!(p.credits_for_fen(1000), Some(1000));
        assert_eq!(p.credits_for_fen(1), Some(1));
        assert_eq!(p.credits_for_fen(i64::MAX), None);
    }

    #[test]
    fn pricing_is_validated() {
        assert!(Pricing::new(0, 10, "cny").is_err());
        assert!(Pricing::new(100, 0, "cny").is_err());
        assert!(Pricing::new(100, 10, "CNY").is_err());
        assert!(Pricing::new(150, 10, "usd").is_ok());
    }
}
