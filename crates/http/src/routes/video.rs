//! Video generation: `POST /api/video/generate`, Grsai's `POST /api/video/callback`, the
//! user's tasks and consumption records.

use actix_web::{web, HttpRequest, HttpResponse};
use credit_domain::{UserId, VideoSpec};
use credit_store::read_models;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::recharge::{metadata, new_id};
use super::{page_of, Page};
use crate::auth::{constant_time_eq, AuthUser};
use crate::error::ApiError;
use crate::flows::{self, video::GenerateOutcome};
use crate::state::AppState;

pub const MODEL: &str = "sora-2";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    prompt: String,
    aspect_ratio: Option<String>,
    duration: Option<u32>,
    size: Option<String>,
    image_url: Option<String>,
}

impl GenerateRequest {
    fn validate(self) -> Result<VideoSpec, ApiError> {
        let prompt = self.prompt.trim().to_owned();
        let chars = prompt.chars().count();
        if chars == 0 || chars > 2000 {
            return Err(ApiError::invalid(
                "invalid_prompt",
                "prompt must be 1 to 2000 characters",
            ));
        }
        let aspect_ratio = self.aspect_ratio.unwrap_or_else(|| "9:16".to_owned());
        if !matches!(aspect_ratio.as_str(), "9:16" | "16:9") {
            return Err(ApiError::invalid(
                "invalid_aspect_ratio",
                "aspect_ratio must be \"9:16\" or \"16:9\"",
            ));
        }
        let duration = self.duration.unwrap_or(10);
        if !matches!(duration, 10 | 15) {
            return Err(ApiError::invalid(
                "invalid_duration",
                "duration must be 10 or 15",
            ));
        }
        let size = self.size.unwrap_or_else(|| "small".to_owned());
        if !matches!(size.as_str(), "small" | "large") {
            return Err(ApiError::invalid(
                "invalid_size",
                "size must be \"small\" or \"large\"",
            ));
        }
        if let Some(url) = &self.image_url {
            let ok = url.starts_with("https://")
                && url.len() > "https://".len()
                && url.len() <= 2048
                && !url.contains(char::is_whitespace);
            if !ok {
                return Err(ApiError::invalid(
                    "invalid_image_url",
                    "image_url must be an https:// URL of at most 2048 characters",
                ));
            }
        }
        Ok(VideoSpec {
            model: MODEL.to_owned(),
            prompt,
            aspect_ratio,
            duration,
            size,
            reference_url: self.image_url,
        })
    }
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

pub async fn generate(
    state: web::Data<AppState>,
    user: AuthUser,
    req: HttpRequest,
    body: crate::body::Body<GenerateRequest>,
) -> Result<HttpResponse, ApiError> {
    let user = user.0;
    let video = body.into_inner().validate()?;
    let task_id = new_id(&req, "vid", &user)?;
    let token = random_token();
    let outcome = flows::video::generate(
        &state,
        flows::video::Generate {
            user,
            task_id: task_id.clone(),
            video,
            callback_token_sha256: sha256_hex(&token),
            callback_token: token,
            metadata: metadata(&req),
        },
    )
    .await?;
    match outcome {
        GenerateOutcome::Submitted {
            credits_charged,
            balance,
        } => Ok(HttpResponse::Accepted().json(json!({
            "task_id": task_id,
            "status": "processing",
            "credits_charged": credits_charged,
            "credits": balance,
        }))),
        GenerateOutcome::Uncertain {
            credits_charged,
            balance,
        } => Ok(HttpResponse::Accepted().json(json!({
            "task_id": task_id,
            "status": "uncertain",
            "credits_charged": credits_charged,
            "credits": balance,
            "message": "the video provider did not answer in time; the task may still run. \
                        It settles by the provider's callback, or is refunded if the provider never took it",
        }))),
        GenerateOutcome::Refunded { balance } => Err(ApiError::provider(
            "the video provider refused the task; your credits were refunded",
        )
        .with("refunded", true)
        .with("task_id", task_id)
        .with("credits", balance)),
        GenerateOutcome::Replayed(task) => Ok(HttpResponse::Accepted().json(json!({
            "task_id": task_id,
            "status": task.status.as_str(),
            "credits_charged": task.credits_charged,
            "refunded": task.refunded,
            "credits": task.balance,
        }))),
    }
}

#[derive(Deserialize)]
pub struct CallbackQuery {
    account: Option<String>,
    task: Option<String>,
    token: Option<String>,
}

/// Grsai's deliveries. Authenticated by the per-task token in the URL (compared with the
/// hash recorded in the deduction event). Every authenticated delivery gets 200, whatever its
/// order or repetition; a malformed body gets 400.
pub async fn callback(
    state: web::Data<AppState>,
    query: web::Query<CallbackQuery>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let unauthorized =
        || ApiError::unauthorized("invalid_callback_token", "unknown task or wrong token");
    let (Some(account), Some(task_id), Some(token)) = (&query.account, &query.task, &query.token)
    else {
        return Err(unauthorized());
    };
    let user = UserId::parse(account).map_err(|_| unauthorized())?;
    let (state_now, _) = state.ledger.load(&user).await?;
    // The account keeps open and recently settled tasks; one settled long ago is found in the
    // journal, authenticated the same way, and changes nothing.
    let (token_sha256, settled_long_ago) = match state_now.task(task_id) {
        Some(task) => (task.callback_token_sha256.clone(), false),
        None => {
            let client = state.read().await?;
            match credit_store::queries::charged_task(&client, user.as_str(), task_id)
                .await
                .map_err(ApiError::from_store)?
            {
                Some(charged) => (charged.callback_token_sha256, true),
                None => return Err(unauthorized()),
            }
        }
    };
    if !constant_time_eq(sha256_hex(token).as_bytes(), token_sha256.as_bytes()) {
        return Err(unauthorized());
    }
    let body = crate::body::read_limited(payload, 64 * 1024).await?;
    crate::body::reject_nul_in(&body).map_err(|_| {
        ApiError::bad_request("invalid_payload", "the result contains a NUL character")
    })?;
    let result = credit_grsai::parse_result(&body)
        .map_err(|e| ApiError::bad_request("invalid_payload", e.to_string()))?;
    let outcome = if settled_long_ago {
        flows::video::ResultOutcome::AlreadySettled
    } else {
        flows::video::apply_result(&state, &user, task_id, &result).await?
    };
    Ok(HttpResponse::Ok().json(json!({ "received": true, "outcome": outcome })))
}

fn shown<T: serde::Serialize>(record: &T) -> serde_json::Value {
    serde_json::to_value(record).unwrap_or_default()
}

pub async fn list(
    state: web::Data<AppState>,
    user: AuthUser,
    page: web::Query<Page>,
) -> Result<HttpResponse, ApiError> {
    let keyset = page.keyset()?;
    let client = state.read_own(&user.0).await?;
    let page = read_models::tasks(&client, user.0.as_str(), &keyset).await?;
    Ok(page_of(&page, shown))
}

pub async fn get(
    state: web::Data<AppState>,
    user: AuthUser,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let client = state.read_own(&user.0).await?;
    match read_models::task(&client, user.0.as_str(), path.as_str()).await? {
        Some(task) => Ok(HttpResponse::Ok().json(task)),
        None => Err(ApiError::not_found("no such task")),
    }
}

pub async fn consumption(
    state: web::Data<AppState>,
    user: AuthUser,
    page: web::Query<Page>,
) -> Result<HttpResponse, ApiError> {
    let keyset = page.keyset()?;
    let client = state.read_own(&user.0).await?;
    let page = read_models::consumption(&client, user.0.as_str(), &keyset).await?;
    Ok(page_of(&page, shown))
}
