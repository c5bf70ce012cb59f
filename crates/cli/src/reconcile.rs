//! `credit-ledger reconcile`: every difference between our recharges and Stripe's sessions
//! and charges (对账). Our side is read from the journal (each account's events), Stripe's by
//! retrieving each recharge's Checkout Session with its payment and charge. Read-only.

use std::process::ExitCode;

use anyhow::Context;
use chrono::{DateTime, Utc};
use credit_domain::ports::{CheckoutStatus, PaymentProvider};
use credit_domain::{Recharge, UserId};
use credit_store::{db, queries, Ledger};
use deadpool_postgres::Pool;
use secrecy::SecretString;
use serde::Serialize;

use crate::commands::EXIT_DISCREPANCIES;

/// One difference between the ledger and Stripe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// `paid_not_credited`, `credited_not_paid`, `amount_differs`, `refunded_not_reversed`,
    /// `disputed_not_recorded`, `session_unreadable`.
    pub kind: &'static str,
    pub account: String,
    pub recharge_id: String,
    pub detail: String,
}

/// What Stripe says against what the account's events say, for one recharge.
pub fn differences(recharge: &Recharge, stripe: &CheckoutStatus) -> Vec<(&'static str, String)> {
    let mut found = Vec::new();
    let paid = stripe.payment_status == "paid";
    let credited = recharge.is_credited();
    if paid && !credited {
        found.push((
            "paid_not_credited",
            format!(
                "Stripe session {} is paid ({} fen), the recharge is {}",
                stripe.session_id,
                stripe.amount_total.unwrap_or(0),
                recharge.status.as_str()
            ),
        ));
    }
    if credited && !paid {
        found.push((
            "credited_not_paid",
            format!(
                "the recharge is credited, Stripe session {} is {} / {}",
                stripe.session_id, stripe.status, stripe.payment_status
            ),
        ));
    }
    if paid && stripe.amount_total != Some(recharge.amount_fen) {
        found.push((
            "amount_differs",
            format!(
                "Stripe charged {:?} fen, the recharge is {} fen",
                stripe.amount_total, recharge.amount_fen
            ),
        ));
    }
    if stripe.amount_refunded > recharge.refunded_fen {
        found.push((
            "refunded_not_reversed",
            format!(
                "Stripe refunded {} fen, the ledger knows of {} fen",
                stripe.amount_refunded, recharge.refunded_fen
            ),
        ));
    }
    if stripe.disputed && recharge.disputes.is_empty() {
        found.push((
            "disputed_not_recorded",
            "Stripe's charge is disputed, the ledger has no dispute".to_owned(),
        ));
    }
    found
}

pub async fn run(
    url: &str,
    pool: &Pool,
    since: Option<DateTime<Utc>>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let key = std::env::var("STRIPE_SECRET_KEY")
        .context("STRIPE_SECRET_KEY must be set: reconcile asks Stripe")?;
    let mut config = credit_stripe::StripeConfig::new(SecretString::from(key));
    if let Ok(base) = std::env::var("STRIPE_API_BASE") {
        config = config.with_api_base(base);
    }
    let stripe = credit_stripe::StripeCheckout::new(config)?;
    let ledger = Ledger::new(db::write_pool(url, 2).await?);
    let candidates = {
        let client = pool.get().await.context("connecting to the database")?;
        queries::recharges_since(&client, stripe.name(), since).await?
    };
    let mut found = Vec::new();
    let mut checked = 0usize;
    for candidate in candidates {
        let user = UserId::parse(&candidate.user_id)
            .map_err(|e| anyhow::anyhow!("account {}: {e}", candidate.user_id))?;
        let (account, _) = ledger.load(&user).await?;
        let Some(recharge) = account.recharge(&candidate.recharge_id) else {
            continue;
        };
        let Some(session_id) = &recharge.checkout_session_id else {
            continue; // no session was ever created: nobody could pay
        };
        checked += 1;
        let mut push = |kind: &'static str, detail: String| {
            found.push(Difference {
                kind,
                account: candidate.user_id.clone(),
                recharge_id: candidate.recharge_id.clone(),
                detail,
            })
        };
        match stripe.retrieve_checkout(session_id).await {
            Ok(status) => {
                for (kind, detail) in differences(recharge, &status) {
                    push(kind, detail);
                }
            }
            Err(e) => push("session_unreadable", e.to_string()),
        }
    }
    if json {
        println!(
            "{}",
            serde_json::json!({ "recharges_checked": checked, "differences": found })
        );
    } else {
        println!("recharges checked  {checked}");
        for d in &found {
            println!(
                "{} account={} recharge={}: {}",
                d.kind, d.account, d.recharge_id, d.detail
            );
        }
        if found.is_empty() {
            println!("result             OK: the ledger and Stripe agree");
        } else {
            println!("result             {} difference(s)", found.len());
        }
    }
    Ok(if found.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DISCREPANCIES)
    })
}
