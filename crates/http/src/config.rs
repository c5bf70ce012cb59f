//! Configuration from environment variables (and an optional `.env`), validated at start-up.
//! Every invalid value stops the start with a message naming the variable. Secrets stay in
//! `SecretString`s so they cannot be logged by accident.

use std::net::SocketAddr;
use std::time::Duration;

use credit_domain::Pricing;
use secrecy::SecretString;

#[derive(Debug, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    pub var: &'static str,
    pub message: String,
}

fn err(var: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        message: message.into(),
    }
}

#[derive(Debug, Clone)]
pub struct StripeSettings {
    pub secret_key: SecretString,
    pub api_base: String,
}

#[derive(Debug, Clone)]
pub struct GrsaiSettings {
    pub api_key: SecretString,
    pub api_base: String,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: String,
    pub listen_addr: SocketAddr,
    pub public_base_url: String,
    /// HS256 secret of user tokens (Supabase's legacy JWT secret). With `jwks_url` also
    /// unset: demo sign-in (`POST /api/dev/token`, random per-process secret).
    pub jwt_secret: Option<SecretString>,
    /// Where the public keys of asymmetric user tokens (ES256, RS256) are published, e.g.
    /// `https://<project>.supabase.co/auth/v1/.well-known/jwks.json`.
    pub jwks_url: Option<String>,
    /// The cached key set is fetched again once it is this old.
    pub jwks_max_age: Duration,
    /// Checked against `iss` when set.
    pub jwt_issuer: Option<String>,
    /// Checked against `aud` when set.
    pub jwt_audience: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub jwt_leeway: Duration,
    /// `None`: admin endpoints are closed.
    pub admin_token: Option<SecretString>,
    /// `None`: demo payments (recharges complete at once).
    pub stripe: Option<StripeSettings>,
    pub stripe_webhook_secret: Option<SecretString>,
    pub stripe_success_url: String,
    pub stripe_cancel_url: String,
    /// `None`: the simulated video provider.
    pub grsai: Option<GrsaiSettings>,
    pub pricing: Pricing,
    pub recharge_min_fen: i64,
    pub recharge_max_fen: i64,
    pub task_poll_after: Duration,
    /// A task whose submission's outcome is unknown (or never known: the process stopped
    /// between charge and answer) is refunded after this long with no sign that the provider
    /// took it.
    pub task_unknown_refund_after: Duration,
    /// A recharge still pending this long after it was requested is checked at Stripe.
    pub recharge_reconcile_after: Duration,
    pub settlement_interval: Duration,
    pub demo_video_delay: Duration,
    pub cors_allowed_origins: Vec<String>,
    /// `None`: `GET /metrics` is open (keep it off the public proxy).
    pub metrics_token: Option<SecretString>,
    /// Per-user rate limits (`RATE_LIMIT_*`).
    pub limits: crate::limits::Limits,
    /// `/readyz` answers 503 when the projector is further behind than this.
    pub ready_max_lag: Duration,
    /// Between SIGTERM (readiness turns 503) and closing the listener.
    pub shutdown_delay: Duration,
    pub write_connections: u32,
    pub read_connections: usize,
}

impl Config {
    /// Reads the process environment (after loading `.env` if there is one).
    pub fn from_env() -> Result<Self, ConfigError> {
        let _ = dotenvy::dotenv();
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads configuration through `get` (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |k: &str| {
            get(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let secret = |k: &'static str| get(k).map(SecretString::from);

        let database_url = get("DATABASE_URL")
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/credit_ledger".to_owned());
        if !(database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")) {
            return Err(err("DATABASE_URL", "must be a postgres:// URL"));
        }
        let listen_addr: SocketAddr = get("LISTEN_ADDR")
            .unwrap_or_else(|| "127.0.0.1:8080".to_owned())
            .parse()
            .map_err(|_| err("LISTEN_ADDR", "must be an address like 127.0.0.1:8080"))?;
        let public_base_url = match get("PUBLIC_BASE_URL") {
            Some(url) => parse_url("PUBLIC_BASE_URL", &url)?,
            None => format!("http://{listen_addr}"),
        };
        let jwt_secret = secret("AUTH_JWT_SECRET");
        if let Some(s) = &jwt_secret {
            use secrecy::ExposeSecret;
            if s.expose_secret().len() < 16 {
                return Err(err("AUTH_JWT_SECRET", "must be at least 16 characters"));
            }
        }
        let jwks_url = match get("AUTH_JWKS_URL") {
            Some(url) => Some(parse_url("AUTH_JWKS_URL", &url)?),
            None => None,
        };
        let jwks_max_age = match get("AUTH_JWKS_MAX_AGE") {
            Some(v) => parse_duration("AUTH_JWKS_MAX_AGE", &v)?,
            None => Duration::from_secs(600),
        };
        if jwks_max_age.is_zero() {
            return Err(err("AUTH_JWKS_MAX_AGE", "must be more than zero"));
        }
        let jwt_leeway = match get("AUTH_JWT_LEEWAY") {
            Some(v) => parse_duration("AUTH_JWT_LEEWAY", &v)?,
            None => Duration::from_secs(30),
        };
        if jwt_leeway > Duration::from_secs(300) {
            return Err(err("AUTH_JWT_LEEWAY", "must be at most 5m"));
        }
        let metrics_token = secret("METRICS_TOKEN");
        if let Some(s) = &metrics_token {
            use secrecy::ExposeSecret;
            if s.expose_secret().len() < 12 {
                return Err(err("METRICS_TOKEN", "must be at least 12 characters"));
            }
        }
        let admin_token = secret("ADMIN_TOKEN");
        if let Some(s) = &admin_token {
            use secrecy::ExposeSecret;
            if s.expose_secret().len() < 12 {
                return Err(err("ADMIN_TOKEN", "must be at least 12 characters"));
            }
        }
        let stripe_api_base = match get("STRIPE_API_BASE") {
            Some(url) => parse_url("STRIPE_API_BASE", &url)?,
            None => "https://api.stripe.com".to_owned(),
        };
        let stripe = secret("STRIPE_SECRET_KEY").map(|secret_key| StripeSettings {
            secret_key,
            api_base: stripe_api_base,
        });
        let stripe_success_url = match get("STRIPE_SUCCESS_URL") {
            Some(url) => parse_url("STRIPE_SUCCESS_URL", &url)?,
            None => format!("{public_base_url}/?recharge=success"),
        };
        let stripe_cancel_url = match get("STRIPE_CANCEL_URL") {
            Some(url) => parse_url("STRIPE_CANCEL_URL", &url)?,
            None => format!("{public_base_url}/?recharge=cancel"),
        };
        let grsai_api_base = match get("GRSAI_API_BASE") {
            Some(url) => parse_url("GRSAI_API_BASE", &url)?,
            None => "https://grsai.dakka.com.cn".to_owned(),
        };
        let grsai_timeout = match get("GRSAI_TIMEOUT") {
            Some(v) => parse_duration("GRSAI_TIMEOUT", &v)?,
            None => Duration::from_secs(20),
        };
        let grsai = secret("GRSAI_API_KEY").map(|api_key| GrsaiSettings {
            api_key,
            api_base: grsai_api_base,
            timeout: grsai_timeout,
        });

        let currency = get("CURRENCY").unwrap_or_else(|| "cny".to_owned());
        let credits_per_yuan = parse_int("CREDITS_PER_YUAN", get("CREDITS_PER_YUAN"), 100)?;
        let video_cost = parse_int("VIDEO_COST_CREDITS", get("VIDEO_COST_CREDITS"), 10)?;
        let pricing = Pricing::new(credits_per_yuan, video_cost, &currency.to_ascii_lowercase())
            .map_err(|e| {
                let var = match e {
                    credit_domain::PricingError::CreditsPerYuan => "CREDITS_PER_YUAN",
                    credit_domain::PricingError::VideoCost => "VIDEO_COST_CREDITS",
                    credit_domain::PricingError::Currency => "CURRENCY",
                };
                err(var, e.to_string())
            })?;
        let recharge_min_fen = match get("RECHARGE_MIN_YUAN") {
            Some(v) => crate::money::yuan_text_to_fen(&v)
                .map_err(|e| err("RECHARGE_MIN_YUAN", e.to_string()))?,
            None => 100,
        };
        let recharge_max_fen = match get("RECHARGE_MAX_YUAN") {
            Some(v) => crate::money::yuan_text_to_fen(&v)
                .map_err(|e| err("RECHARGE_MAX_YUAN", e.to_string()))?,
            None => 1_000_000,
        };
        if recharge_min_fen <= 0 {
            return Err(err("RECHARGE_MIN_YUAN", "must be positive"));
        }
        if recharge_max_fen < recharge_min_fen || recharge_max_fen > 100_000_000 {
            return Err(err(
                "RECHARGE_MAX_YUAN",
                "must be at least RECHARGE_MIN_YUAN and at most 1000000",
            ));
        }
        let task_poll_after = match get("TASK_POLL_AFTER") {
            Some(v) => parse_duration("TASK_POLL_AFTER", &v)?,
            None => Duration::from_secs(600),
        };
        let task_unknown_refund_after = match get("TASK_UNKNOWN_REFUND_AFTER") {
            Some(v) => parse_duration("TASK_UNKNOWN_REFUND_AFTER", &v)?,
            None => Duration::from_secs(3600),
        };
        let recharge_reconcile_after = match get("RECHARGE_RECONCILE_AFTER") {
            Some(v) => parse_duration("RECHARGE_RECONCILE_AFTER", &v)?,
            None => Duration::from_secs(600),
        };
        let settlement_interval = match get("SETTLEMENT_INTERVAL") {
            Some(v) => parse_duration("SETTLEMENT_INTERVAL", &v)?,
            None => Duration::from_secs(30),
        };
        let rule = |var: &'static str, default: &str| {
            crate::limits::Rule::parse(&get(var).unwrap_or_else(|| default.to_owned()))
                .map_err(|e| err(var, e))
        };
        let limits = crate::limits::Limits {
            generate: rule("RATE_LIMIT_GENERATE", "30/m")?,
            recharge: rule("RATE_LIMIT_RECHARGE", "10/m")?,
            dev_token: rule("RATE_LIMIT_DEV_TOKEN", "20/m")?,
        };
        let ready_max_lag = match get("READY_MAX_LAG") {
            Some(v) => parse_duration("READY_MAX_LAG", &v)?,
            None => Duration::from_secs(5),
        };
        let shutdown_delay = match get("SHUTDOWN_DELAY") {
            Some(v) => parse_duration("SHUTDOWN_DELAY", &v)?,
            None => Duration::from_secs(5),
        };
        if shutdown_delay > Duration::from_secs(60) {
            return Err(err("SHUTDOWN_DELAY", "must be at most 60s"));
        }
        let demo_video_delay = match get("DEMO_VIDEO_DELAY") {
            Some(v) => parse_duration("DEMO_VIDEO_DELAY", &v)?,
            None => Duration::from_secs(3),
        };
        let cors_allowed_origins = get("CORS_ALLOWED_ORIGINS")
            .map(|v| {
                v.split(',')
                    .map(|o| o.trim().trim_end_matches('/').to_owned())
                    .filter(|o| !o.is_empty())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        for origin in &cors_allowed_origins {
            if origin != "*" {
                parse_url("CORS_ALLOWED_ORIGINS", origin)?;
            }
        }
        let write_connections = parse_int(
            "DATABASE_WRITE_CONNECTIONS",
            get("DATABASE_WRITE_CONNECTIONS"),
            16,
        )?;
        let read_connections = parse_int(
            "DATABASE_READ_CONNECTIONS",
            get("DATABASE_READ_CONNECTIONS"),
            16,
        )?;
        if !(1..=500).contains(&write_connections) {
            return Err(err(
                "DATABASE_WRITE_CONNECTIONS",
                "must be between 1 and 500",
            ));
        }
        if !(2..=500).contains(&read_connections) {
            return Err(err(
                "DATABASE_READ_CONNECTIONS",
                "must be between 2 and 500",
            ));
        }

        // A task whose submission is still waiting for Grsai must not look abandoned.
        if grsai.is_some() && task_poll_after <= grsai_timeout * 2 {
            return Err(err(
                "TASK_POLL_AFTER",
                "must be more than twice GRSAI_TIMEOUT, or tasks still being submitted would be refunded",
            ));
        }
        if grsai.is_some() && task_unknown_refund_after <= grsai_timeout * 2 {
            return Err(err(
                "TASK_UNKNOWN_REFUND_AFTER",
                "must be more than twice GRSAI_TIMEOUT, or tasks still being submitted would be refunded",
            ));
        }
        let config = Self {
            database_url,
            listen_addr,
            public_base_url,
            jwt_secret,
            jwks_url,
            jwks_max_age,
            jwt_issuer: get("AUTH_JWT_ISSUER"),
            jwt_audience: get("AUTH_JWT_AUDIENCE"),
            jwt_leeway,
            admin_token,
            stripe,
            stripe_webhook_secret: secret("STRIPE_WEBHOOK_SECRET"),
            stripe_success_url,
            stripe_cancel_url,
            grsai,
            pricing,
            recharge_min_fen,
            recharge_max_fen,
            task_poll_after,
            task_unknown_refund_after,
            recharge_reconcile_after,
            settlement_interval,
            demo_video_delay,
            cors_allowed_origins,
            metrics_token,
            limits,
            ready_max_lag,
            shutdown_delay,
            write_connections: write_connections as u32,
            read_connections: read_connections as usize,
        };
        config.check_no_partial_configuration()?;
        config.check_demo_is_local()?;
        Ok(config)
    }

    /// Demo mode is for a machine with nothing configured. Once any real credential is set,
    /// this is a real deployment and every credential it needs must be there: a half
    /// configured service would otherwise run with fake payments, fake videos or anyone's
    /// sign-in behind a real one. A loopback address is no guard (real deployments listen
    /// on 127.0.0.1 behind a proxy), so this holds on every address.
    fn check_no_partial_configuration(&self) -> Result<(), ConfigError> {
        let required: [(&'static str, bool); 5] = [
            (
                "AUTH_JWT_SECRET or AUTH_JWKS_URL",
                self.jwt_secret.is_some() || self.jwks_url.is_some(),
            ),
            ("STRIPE_SECRET_KEY", self.stripe.is_some()),
            (
                "STRIPE_WEBHOOK_SECRET",
                self.stripe_webhook_secret.is_some(),
            ),
            ("GRSAI_API_KEY", self.grsai.is_some()),
            ("ADMIN_TOKEN", self.admin_token.is_some()),
        ];
        let set: Vec<&str> = required
            .iter()
            .filter(|(_, is_set)| *is_set)
            .map(|(var, _)| *var)
            .collect();
        let missing: Vec<&'static str> = required
            .iter()
            .filter(|(_, is_set)| !*is_set)
            .map(|(var, _)| *var)
            .collect();
        match (set.is_empty(), missing.first()) {
            (false, Some(first)) => Err(err(
                first,
                format!(
                    "missing. {} set, so this is a real deployment, and it also needs: {}. \
                     Demo mode is only for a machine with none of them set.",
                    set.join(", "),
                    missing.join(", "),
                ),
            )),
            _ => Ok(()),
        }
    }

    /// True on a machine with nothing configured (the only way demo mode starts).
    pub fn is_demo(&self) -> bool {
        self.jwt_secret.is_none()
            && self.jwks_url.is_none()
            && self.stripe.is_none()
            && self.stripe_webhook_secret.is_none()
            && self.grsai.is_none()
            && self.admin_token.is_none()
    }

    /// The demo features that are on (no key configured for them).
    pub fn demo_features(&self) -> Vec<&'static str> {
        let mut on = Vec::new();
        if self.stripe.is_none() {
            on.push("payments (recharges complete at once; STRIPE_SECRET_KEY unset)");
        }
        if self.grsai.is_none() {
            on.push("video provider (simulated; GRSAI_API_KEY unset)");
        }
        if self.jwt_secret.is_none() && self.jwks_url.is_none() {
            on.push("sign-in (POST /api/dev/token; AUTH_JWT_SECRET and AUTH_JWKS_URL unset)");
        }
        on
    }

    /// Demo mode is allowed only on a loopback address (and only with nothing configured,
    /// see [`Config::check_no_partial_configuration`]).
    fn check_demo_is_local(&self) -> Result<(), ConfigError> {
        let demo = self.demo_features();
        if !demo.is_empty() && !self.listen_addr.ip().is_loopback() {
            return Err(err(
                "LISTEN_ADDR",
                format!(
                    "{} is not a loopback address, and demo mode is only allowed on loopback; \
                     configure AUTH_JWT_SECRET or AUTH_JWKS_URL, STRIPE_SECRET_KEY, \
                     STRIPE_WEBHOOK_SECRET, GRSAI_API_KEY and ADMIN_TOKEN, or listen on \
                     127.0.0.1 (demo features that would be on: {})",
                    self.listen_addr,
                    demo.join("; ")
                ),
            ));
        }
        Ok(())
    }
}

fn parse_url(var: &'static str, value: &str) -> Result<String, ConfigError> {
    let ok = (value.starts_with("http://") || value.starts_with("https://"))
        && value.len() > "http://".len()
        && !value.contains(char::is_whitespace);
    if !ok {
        return Err(err(var, "must be an http:// or https:// URL"));
    }
    Ok(value.trim_end_matches('/').to_owned())
}

fn parse_int(var: &'static str, value: Option<String>, default: i64) -> Result<i64, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => v
            .parse::<i64>()
            .map_err(|_| err(var, format!("must be an integer, got {v:?}"))),
    }
}

/// `600`, `600s`, `10m`, `1h`, `500ms`.
pub fn parse_duration(var: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let bad = || {
        err(
            var,
            format!("must be a duration like 600, 600s, 10m or 1h, got {value:?}"),
        )
    };
    let (digits, unit) = value
        .find(|c: char| !c.is_ascii_digit())
        .map_or((value, ""), |i| value.split_at(i));
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(bad)?),
        _ => return Err(bad()),
    };
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_are_demo_on_loopback() {
        let c = config(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.listen_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.pricing, Pricing::default());
        assert_eq!((c.recharge_min_fen, c.recharge_max_fen), (100, 1_000_000));
        assert_eq!(c.task_poll_after, Duration::from_secs(600));
        assert_eq!(c.demo_features().len(), 3);
        assert!(c.is_demo());
    }

    #[test]
    fn demo_mode_refuses_a_public_address() {
        let e = config(&[("LISTEN_ADDR", "0.0.0.0:8080")]).err();
        assert_eq!(e.map(|e| e.var), Some("LISTEN_ADDR"));
    }

    const FULL: [(&str, &str); 5] = [
        ("AUTH_JWT_SECRET", "a-very-long-test-secret"),
        ("STRIPE_SECRET_KEY", "sk_test_x"),
        ("STRIPE_WEBHOOK_SECRET", "whsec_x"),
        ("GRSAI_API_KEY", "grsai-key"),
        ("ADMIN_TOKEN", "an-admin-token-long-enough"),
    ];

    #[test]
    fn a_fully_configured_service_has_no_demo_feature_and_may_listen_anywhere() {
        let mut vars = FULL.to_vec();
        vars.push(("LISTEN_ADDR", "0.0.0.0:8080"));
        let c = config(&vars).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.demo_features().is_empty());
        // A JWKS URL stands in for the secret.
        let mut vars = FULL[1..].to_vec();
        vars.push((
            "AUTH_JWKS_URL",
            "https://x.supabase.co/auth/v1/.well-known/jwks.json",
        ));
        let c = config(&vars).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.demo_features().is_empty());
    }

    #[test]
    fn any_credential_without_the_others_is_refused_naming_each_missing_one() {
        for (i, (var, value)) in FULL.iter().enumerate() {
            // Alone, on loopback: refused, and every other credential is named.
            let e = config(&[(var, value)]).err();
            let Some(e) = e else {
                panic!("{var} alone was accepted");
            };
            let text = e.to_string();
            for (j, (other, _)) in FULL.iter().enumerate() {
                if i != j {
                    let name = if *other == "AUTH_JWT_SECRET" {
                        "AUTH_JWT_SECRET or AUTH_JWKS_URL"
                    } else {
                        other
                    };
                    assert!(
                        text.contains(name),
                        "{var} alone: {other} not named in {text}"
                    );
                }
            }
            // Everything but one: refused, naming that one.
            let rest: Vec<_> = FULL
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, kv)| *kv)
                .collect();
            let e = config(&rest).err().map(|e| e.var);
            let expected = if *var == "AUTH_JWT_SECRET" {
                "AUTH_JWT_SECRET or AUTH_JWKS_URL"
            } else {
                var
            };
            assert_eq!(e, Some(expected), "all but {var}");
        }
        let e = config(&[(
            "AUTH_JWKS_URL",
            "https://x.supabase.co/auth/v1/.well-known/jwks.json",
        )])
        .err();
        assert_eq!(e.map(|e| e.var), Some("STRIPE_SECRET_KEY"));
    }

    #[test]
    fn invalid_values_name_their_variable() {
        for (var, value) in [
            ("CREDITS_PER_YUAN", "abc"),
            ("VIDEO_COST_CREDITS", "0"),
            ("CURRENCY", "yuan"),
            ("RECHARGE_MIN_YUAN", "-1"),
            ("RECHARGE_MAX_YUAN", "0.5"),
            ("TASK_POLL_AFTER", "soon"),
            ("PUBLIC_BASE_URL", "ftp://x"),
            ("LISTEN_ADDR", "nowhere"),
            ("AUTH_JWT_SECRET", "short"),
        ] {
            let e = config(&[(var, value)]).err();
            assert_eq!(e.map(|e| e.var), Some(var), "{var}={value}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("X", "10m").ok(),
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            parse_duration("X", "15").ok(),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            parse_duration("X", "250ms").ok(),
            Some(Duration::from_millis(250))
        );
        assert!(parse_duration("X", "1d").is_err());
    }
}
