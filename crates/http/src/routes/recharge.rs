//! `POST /api/recharge` and `GET /api/recharge`.

use std::collections::HashMap;

use actix_web::{web, HttpRequest, HttpResponse};
use credit_domain::ports::CheckoutRequest;
use credit_domain::{CreditCommand, LedgerError, Recharge, RechargeStatus, UserId};
use credit_store::ExecuteError;
use serde::Deserialize;
use serde_json::json;

use super::{page_of, Page};
use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::money::{fen_to_yuan, json_yuan_to_fen, AmountError};
use crate::state::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RechargeRequest {
    amount: serde_json::Value,
}

/// The id of a new thing: derived from the client's `Idempotency-Key` when it sent one (so a
/// retried request names the same thing), random otherwise.
pub fn new_id(req: &HttpRequest, prefix: &str, user: &UserId) -> Result<String, ApiError> {
    let Some(key) = req.headers().get("Idempotency-Key") else {
        return Ok(format!("{prefix}_{}", uuid::Uuid::new_v4().simple()));
    };
    let key = key
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_idempotency_key",
                "Idempotency-Key must be 1 to 255 visible ASCII characters",
            )
        })?;
    let name = format!("{prefix}:{}:{key}", user.as_str());
    Ok(format!(
        "{prefix}_{}",
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).simple()
    ))
}

pub fn metadata(req: &HttpRequest) -> HashMap<String, String> {
    let mut m = HashMap::new();
    if let Some(id) = crate::telemetry::request_id(req) {
        m.insert("request_id".to_owned(), id);
    }
    m
}

fn recharge_body(id: &str, r: &Recharge, balance: i64) -> serde_json::Value {
    json!({
        "recharge_id": id,
        "status": r.status.as_str(),
        "amount": fen_to_yuan(r.amount_fen),
        "amount_fen": r.amount_fen,
        "currency": r.currency,
        "credits": r.credits,
        "payment_method": r.provider,
        "checkout_url": r.checkout_url,
        "balance": balance,
    })
}

pub async fn create(
    state: web::Data<AppState>,
    user: AuthUser,
    req: HttpRequest,
    body: crate::body::Body<RechargeRequest>,
) -> Result<HttpResponse, ApiError> {
    let user = user.0;
    let c = &state.config;
    let amount_fen = json_yuan_to_fen(&body.amount).map_err(|e| match e {
        AmountError::NotDecimal => ApiError::bad_request("invalid_amount", e.to_string()),
        _ => ApiError::invalid("invalid_amount", e.to_string()),
    })?;
    if amount_fen < c.recharge_min_fen || amount_fen > c.recharge_max_fen {
        return Err(ApiError::invalid(
            "amount_out_of_range",
            format!(
                "amount must be between {} and {} yuan",
                fen_to_yuan(c.recharge_min_fen),
                fen_to_yuan(c.recharge_max_fen)
            ),
        )
        .with("min", fen_to_yuan(c.recharge_min_fen))
        .with("max", fen_to_yuan(c.recharge_max_fen)));
    }
    let recharge_id = new_id(&req, "rch", &user)?;
    let meta = metadata(&req);
    let provider = state.payments.as_ref().map_or("demo", |p| p.name());

    let requested = state
        .ledger
        .execute(
            &user,
            CreditCommand::RequestRecharge {
                recharge_id: recharge_id.clone(),
                amount_fen,
                currency: c.pricing.currency.clone(),
                credits_per_yuan: c.pricing.credits_per_yuan,
                provider: provider.to_owned(),
            },
            meta.clone(),
        )
        .await;
    // `account` shows this recharge as it stands: from the events just committed, or, for a
    // retry with the same Idempotency-Key, from the journal.
    let (mut account, replay) = match requested {
        Ok(done) => (view_of(&done), false),
        Err(ExecuteError::Rejected(LedgerError::RechargeExists { .. })) => {
            (state.ledger.load(&user).await?.0, true)
        }
        Err(e) => return Err(e.into()),
    };

    let Some(recharge) = account.recharge(&recharge_id).cloned() else {
        return Err(ApiError::internal(
            "recharge vanished after it was recorded",
        ));
    };
    if replay && recharge.amount_fen != amount_fen {
        return Err(crate::error::idempotency_conflict());
    }
    if recharge.status != RechargeStatus::Pending || recharge.checkout_url.is_some() {
        let status = if replay {
            actix_web::http::StatusCode::OK
        } else {
            actix_web::http::StatusCode::CREATED
        };
        return Ok(HttpResponse::build(status).json(recharge_body(
            &recharge_id,
            &recharge,
            account.balance(),
        )));
    }

    let done = match &state.payments {
        // Demo payments: the money is "received" at once.
        None => {
            state
                .ledger
                .execute(
                    &user,
                    CreditCommand::CompleteRecharge {
                        recharge_id: recharge_id.clone(),
                        amount_fen,
                        currency: recharge.currency.clone(),
                        payment_id: format!("demo_{recharge_id}"),
                    },
                    meta,
                )
                .await?
        }
        Some(payments) => {
            let checkout = payments
                .create_checkout(&CheckoutRequest {
                    user_id: user.as_str().to_owned(),
                    recharge_id: recharge_id.clone(),
                    amount_fen,
                    currency: recharge.currency.clone(),
                    credits: recharge.credits,
                    success_url: c.stripe_success_url.clone(),
                    cancel_url: c.stripe_cancel_url.clone(),
                })
                .await;
            match checkout {
                Ok(session) => {
                    let attached = state
                        .ledger
                        .execute(
                            &user,
                            CreditCommand::AttachCheckout {
                                recharge_id: recharge_id.clone(),
                                checkout_session_id: session.session_id,
                                checkout_url: session.url,
                            },
                            meta,
                        )
                        .await;
                    match attached {
                        Ok(done) => done,
                        // A concurrent retry with the same Idempotency-Key attached the
                        // (same, idempotent) session first: answer with the recharge as it is.
                        Err(ExecuteError::Rejected(LedgerError::RechargeNotPending { .. })) => {
                            let (account, _) = state.ledger.load(&user).await?;
                            let recharge =
                                account.recharge(&recharge_id).cloned().unwrap_or(recharge);
                            return Ok(HttpResponse::Ok().json(recharge_body(
                                &recharge_id,
                                &recharge,
                                account.balance(),
                            )));
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, recharge.id = %recharge_id, "checkout creation failed");
                    state
                        .ledger
                        .execute(
                            &user,
                            CreditCommand::FailRecharge {
                                recharge_id: recharge_id.clone(),
                                reason: format!("checkout creation failed: {e}"),
                            },
                            meta,
                        )
                        .await?;
                    return Err(ApiError::provider(
                        "the payment provider failed; nothing was charged",
                    )
                    .with("recharge_id", recharge_id));
                }
            }
        }
    };
    for event in &done.events {
        account.apply_event(event.payload.clone());
    }
    let recharge = account.recharge(&recharge_id).cloned().unwrap_or(recharge);
    Ok(HttpResponse::Created().json(recharge_body(&recharge_id, &recharge, done.balance)))
}

/// The recharge a command's events describe, without reading the account back: the events of
/// one recharge are all its record needs (the balance comes with the command's result).
fn view_of(done: &credit_store::Committed) -> credit_domain::CreditAccount {
    let mut view = credit_domain::CreditAccount::default();
    for event in &done.events {
        view.apply_event(event.payload.clone());
    }
    view
}

pub async fn list(
    state: web::Data<AppState>,
    user: AuthUser,
    page: web::Query<Page>,
) -> Result<HttpResponse, ApiError> {
    let keyset = page.keyset()?;
    let client = state.read_own(&user.0).await?;
    let page = credit_store::read_models::recharges(&client, user.0.as_str(), &keyset).await?;
    Ok(page_of(&page, |r| {
        let mut shown = serde_json::to_value(r).unwrap_or_default();
        shown["amount"] = fen_to_yuan(r.amount_fen);
        shown
    }))
}
