//! Per-user rate limits on the endpoints that cost money or mint credentials: video
//! generation, recharges and the demo token. A token bucket per (endpoint, user): `N/m`
//! allows bursts of N and N a minute on average. The user is the verified token's `sub`;
//! without a valid token (and for the demo token endpoint, which has none) the caller's
//! address is the key, so forged tokens cannot spend someone else's allowance.
//!
//! Limits are per process: with several instances behind a balancer each applies its own.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderValue, RETRY_AFTER};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, Error};

use crate::error::ApiError;
use crate::state::AppState;

/// `burst` requests, refilled evenly over `period`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rule {
    pub burst: u32,
    pub period: Duration,
}

impl Rule {
    /// `30/m`, `5/s`, `100/h`; `off` (or `0`) for no limit.
    pub fn parse(value: &str) -> Result<Option<Self>, String> {
        let value = value.trim();
        if value == "off" || value == "0" {
            return Ok(None);
        }
        let bad = || format!("must be like 30/m, 5/s or 100/h, or off; got {value:?}");
        let (n, unit) = value.split_once('/').ok_or_else(bad)?;
        let burst: u32 = n.trim().parse().map_err(|_| bad())?;
        let period = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        if burst == 0 {
            return Ok(None);
        }
        Ok(Some(Self { burst, period }))
    }
}

/// The limits configured for each limited endpoint (`None`: unlimited).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub generate: Option<Rule>,
    pub recharge: Option<Rule>,
    pub dev_token: Option<Rule>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets past this many are swept of the ones that have refilled (they equal new ones).
const SWEEP_AT: usize = 50_000;

#[derive(Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// Takes one request from `key`'s bucket, or says how long until one is available.
    fn take(&self, key: String, rule: Rule, now: Instant) -> Result<(), Duration> {
        let burst = f64::from(rule.burst);
        let per_second = burst / rule.period.as_secs_f64();
        let refilled = |b: &Bucket| {
            (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_second).min(burst)
        };
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= SWEEP_AT {
            buckets.retain(|_, b| refilled(b) < burst);
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        bucket.tokens = refilled(bucket);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / per_second))
        }
    }
}

/// Middleware: 429 `rate_limited` with `Retry-After` (whole seconds, at least 1) when the
/// caller's bucket for this endpoint is empty.
pub async fn rate_limits(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody + 'static>>, Error> {
    let Some(state) = req.app_data::<web::Data<AppState>>().cloned() else {
        return Ok(next.call(req).await?.map_into_left_body());
    };
    let limits = state.config.limits;
    let (name, rule, by_user) = match (req.method(), req.path()) {
        (&Method::POST, "/api/video/generate") => ("generate", limits.generate, true),
        (&Method::POST, "/api/recharge") => ("recharge", limits.recharge, true),
        (&Method::POST, "/api/dev/token") => ("dev_token", limits.dev_token, false),
        _ => ("", None, false),
    };
    let (Some(rule), Some(limiter)) = (rule, req.app_data::<web::Data<RateLimiter>>().cloned())
    else {
        return Ok(next.call(req).await?.map_into_left_body());
    };
    let mut key = None;
    if by_user {
        if let Ok(token) = crate::auth::bearer(req.request()) {
            if let Ok(user) = state.jwt.verify(token).await {
                key = Some(format!("{name}:user:{}", user.as_str()));
            }
        }
    }
    let key = key.unwrap_or_else(|| {
        let addr = req
            .peer_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        format!("{name}:addr:{addr}")
    });
    match limiter.take(key, rule, Instant::now()) {
        Ok(()) => Ok(next.call(req).await?.map_into_left_body()),
        Err(wait) => {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let secs = secs.max(1);
            metrics::counter!("rate_limited_total", "endpoint" => name).increment(1);
            let error = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many requests to this endpoint; retry in {secs} s"),
            )
            .with("retry_after", secs);
            let mut res = req.error_response(error);
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
            Ok(res.map_into_right_body())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse() {
        assert_eq!(
            Rule::parse("30/m"),
            Ok(Some(Rule {
                burst: 30,
                period: Duration::from_secs(60)
            }))
        );
        assert_eq!(Rule::parse("off"), Ok(None));
        assert_eq!(Rule::parse("0/m"), Ok(None));
        assert!(Rule::parse("30").is_err());
        assert!(Rule::parse("x/m").is_err());
        assert!(Rule::parse("3/d").is_err());
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills_evenly() {
        let limiter = RateLimiter::default();
        let rule = Rule {
            burst: 3,
            period: Duration::from_secs(60),
        };
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.take("k".into(), rule, t0), Ok(()));
        }
        let wait = limiter.take("k".into(), rule, t0).err();
        assert_eq!(wait.map(|w| w.as_secs()), Some(20));
        // Another key has its own bucket.
        assert_eq!(limiter.take("other".into(), rule, t0), Ok(()));
        // 20 s later one request is allowed again, and only one.
        let t1 = t0 + Duration::from_secs(20);
        assert_eq!(limiter.take("k".into(), rule, t1), Ok(()));
        assert!(limiter.take("k".into(), rule, t1).is_err());
    }
}
