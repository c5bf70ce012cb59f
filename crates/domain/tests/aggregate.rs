//! Given/when/then tests of the `CreditAccount` aggregate through cqrs-es's `TestFramework`:
//! every command, and every way each one can be refused.
#![allow(clippy::unwrap_used)]

use cqrs_es::test::TestFramework;
use credit_domain::{
    CreditAccount, CreditCommand, CreditEvent, DisputeStage, IdError, LedgerError, VideoSpec,
};

type Framework = TestFramework<CreditAccount>;

fn framework() -> Framework {
    TestFramework::<CreditAccount>::with(())
}

// ---------------------------------------------------------------------------------------
// Builders: commands and the events they are expected to produce.
// ---------------------------------------------------------------------------------------

fn request(recharge_id: &str, amount_fen: i64, credits_per_yuan: i64) -> CreditCommand {
    CreditCommand::RequestRecharge {
        recharge_id: recharge_id.to_owned(),
        amount_fen,
        currency: "cny".to_owned(),
        credits_per_yuan,
        provider: "stripe".to_owned(),
    }
}

fn requested(
    recharge_id: &str,
    amount_fen: i64,
    credits: i64,
    credits_per_yuan: i64,
) -> CreditEvent {
    CreditEvent::RechargeRequested {
        recharge_id: recharge_id.to_owned(),
        amount_fen,
        currency: "cny".to_owned(),
        credits,
        credits_per_yuan,
        provider: "stripe".to_owned(),
    }
}

fn complete(recharge_id: &str, amount_fen: i64) -> CreditCommand {
    complete_in(recharge_id, amount_fen, "cny")
}

fn complete_in(recharge_id: &str, amount_fen: i64, currency: &str) -> CreditCommand {
    CreditCommand::CompleteRecharge {
        recharge_id: recharge_id.to_owned(),
        amount_fen,
        currency: currency.to_owned(),
        payment_id: format!("pi_{recharge_id}"),
    }
}

fn completed(recharge_id: &str, credits: i64, balance_after: i64) -> CreditEvent {
    CreditEvent::RechargeCompleted {
        recharge_id: recharge_id.to_owned(),
        credits,
        payment_id: format!("pi_{recharge_id}"),
        balance_after,
    }
}

fn failed(recharge_id: &str) -> CreditEvent {
    CreditEvent::RechargeFailed {
        recharge_id: recharge_id.to_owned(),
        reason: "card_declined".to_owned(),
    }
}

fn cancelled(recharge_id: &str) -> CreditEvent {
    CreditEvent::RechargeCancelled {
        recharge_id: recharge_id.to_owned(),
    }
}

fn reverse(recharge_id: &str, refunded_fen: i64) -> CreditCommand {
    CreditCommand::RecordRefund {
        recharge_id: recharge_id.to_owned(),
        refunded_fen,
        reference: "re_1".to_owned(),
    }
}

fn refund_fact(recharge_id: &str, refunded_fen: i64) -> CreditEvent {
    CreditEvent::PaymentRefunded {
        recharge_id: recharge_id.to_owned(),
        refunded_fen,
        reference: "re_1".to_owned(),
    }
}

fn dispute(recharge_id: &str, amount_fen: i64, stage: DisputeStage) -> CreditCommand {
    CreditCommand::RecordDispute {
        recharge_id: recharge_id.to_owned(),
        dispute_id: "dp_1".to_owned(),
        amount_fen,
        stage,
    }
}

fn dispute_fact(recharge_id: &str, amount_fen: i64, stage: DisputeStage) -> CreditEvent {
    CreditEvent::PaymentDisputed {
        recharge_id: recharge_id.to_owned(),
        dispute_id: "dp_1".to_owned(),
        amount_fen,
        stage,
    }
}

fn reversed(recharge_id: &str, credits: i64, reversed_fen: i64, balance_after: i64) -> CreditEvent {
    CreditEvent::RechargeReversed {
        recharge_id: recharge_id.to_owned(),
        credits,
        reversed_fen,
        reason: "refunded at the provider".to_owned(),
        reference: "re_1".to_owned(),
        balance_after,
    }
}

/// A paid recharge `r-paid` of `credits` credits at 100 credits a yuan, on an empty account.
fn paid(credits: i64) -> Vec<CreditEvent> {
    vec![
        requested("r-paid", credits, credits, 100),
        completed("r-paid", credits, credits),
    ]
}

fn video() -> VideoSpec {
    VideoSpec {
        model: "sora-2".to_owned(),
        prompt: "a cat surfing".to_owned(),
        aspect_ratio: "16:9".to_owned(),
        duration: 10,
        size: "small".to_owned(),
        reference_url: None,
    }
}

fn deduct(task_id: &str, credits: i64) -> CreditCommand {
    CreditCommand::DeductForTask {
        task_id: task_id.to_owned(),
        credits,
        description: "Sora video".to_owned(),
        video: video(),
        callback_token_sha256: "ab".repeat(32),
    }
}

fn deducted(task_id: &str, credits: i64, balance_after: i64) -> CreditEvent {
    CreditEvent::CreditsDeducted {
        task_id: task_id.to_owned(),
        credits,
        description: "Sora video".to_owned(),
        video: video(),
        callback_token_sha256: "ab".repeat(32),
        balance_after,
    }
}

fn submit(task_id: &str) -> CreditCommand {
    CreditCommand::MarkTaskSubmitted {
        task_id: task_id.to_owned(),
        provider_task_id: format!("grsai-{task_id}"),
    }
}

fn submitted(task_id: &str) -> CreditEvent {
    CreditEvent::VideoTaskSubmitted {
        task_id: task_id.to_owned(),
        provider_task_id: format!("grsai-{task_id}"),
    }
}

fn succeed(task_id: &str) -> CreditCommand {
    CreditCommand::RecordVideoSuccess {
        task_id: task_id.to_owned(),
        video_url: "https://cdn.example/v.mp4".to_owned(),
        remove_watermark: Some(true),
        pid: Some("p1".to_owned()),
    }
}

fn succeeded(task_id: &str) -> CreditEvent {
    CreditEvent::VideoSucceeded {
        task_id: task_id.to_owned(),
        video_url: "https://cdn.example/v.mp4".to_owned(),
        remove_watermark: Some(true),
        pid: Some("p1".to_owned()),
    }
}

fn fail_video(task_id: &str) -> CreditCommand {
    CreditCommand::FailVideo {
        task_id: task_id.to_owned(),
        failure_reason: "output_moderation".to_owned(),
        error_message: "blocked".to_owned(),
    }
}

fn video_failed(task_id: &str) -> CreditEvent {
    CreditEvent::VideoFailed {
        task_id: task_id.to_owned(),
        failure_reason: "output_moderation".to_owned(),
        error_message: "blocked".to_owned(),
    }
}

fn refunded(task_id: &str, credits: i64, balance_after: i64) -> CreditEvent {
    CreditEvent::CreditsRefunded {
        task_id: task_id.to_owned(),
        credits,
        balance_after,
    }
}

fn adjust(adjustment_id: &str, credits: i64) -> CreditCommand {
    CreditCommand::Adjust {
        adjustment_id: adjustment_id.to_owned(),
        credits,
        actor: "ops@example.com".to_owned(),
        reason: "goodwill".to_owned(),
    }
}

fn adjusted(adjustment_id: &str, credits: i64, balance_after: i64) -> CreditEvent {
    CreditEvent::CreditsAdjusted {
        adjustment_id: adjustment_id.to_owned(),
        credits,
        actor: "ops@example.com".to_owned(),
        reason: "goodwill".to_owned(),
        balance_after,
    }
}

fn invalid_text(field: &'static str) -> LedgerError {
    LedgerError::InvalidText { field }
}

// ---------------------------------------------------------------------------------------
// Recharge request
// ---------------------------------------------------------------------------------------

#[test]
fn request_computes_credits_from_amount_and_price() {
    framework()
        .given_no_previous_events()
        .when(request("r1", 5000, 100))
        .then_expect_events(vec![requested("r1", 5000, 5000, 100)]);
}

#[test]
fn request_at_another_price_computes_more_credits() {
    framework()
        .given_no_previous_events()
        .when(request("r1", 5000, 150))
        .then_expect_events(vec![requested("r1", 5000, 7500, 150)]);
}

#[test]
fn request_rounds_credits_down_to_a_whole_credit() {
    // 333 fen at 150 credits a yuan is 499.5 credits.
    framework()
        .given_no_previous_events()
        .when(request("r1", 333, 150))
        .then_expect_events(vec![requested("r1", 333, 499, 150)]);
}

#[test]
fn request_that_buys_no_whole_credit_is_refused() {
    // 1 fen at 50 credits a yuan is half a credit.
    framework()
        .given_no_previous_events()
        .when(request("r1", 1, 50))
        .then_expect_error(LedgerError::NonPositiveAmount);
}

#[test]
fn request_with_an_existing_recharge_id_is_refused() {
    framework()
        .given(vec![requested("r1", 5000, 5000, 100)])
        .when(request("r1", 5000, 100))
        .then_expect_error(LedgerError::RechargeExists {
            recharge_id: "r1".to_owned(),
        });
}

#[test]
fn request_with_a_completed_recharge_id_is_refused() {
    framework()
        .given(paid(5000))
        .when(request("r-paid", 100, 100))
        .then_expect_error(LedgerError::RechargeExists {
            recharge_id: "r-paid".to_owned(),
        });
}

#[test]
fn request_with_zero_amount_is_refused() {
    framework()
        .given_no_previous_events()
        .when(request("r1", 0, 100))
        .then_expect_error(LedgerError::NonPositiveAmount);
}

#[test]
fn request_with_negative_amount_is_refused() {
    framework()
        .given_no_previous_events()
        .when(request("r1", -5000, 100))
        .then_expect_error(LedgerError::NonPositiveAmount);
}

#[test]
fn request_with_non_positive_price_is_refused() {
    framework()
        .given_no_previous_events()
        .when(request("r1", 5000, 0))
        .then_expect_error(LedgerError::NonPositiveAmount);
    framework()
        .given_no_previous_events()
        .when(request("r1", 5000, -100))
        .then_expect_error(LedgerError::NonPositiveAmount);
}

#[test]
fn request_whose_credits_overflow_is_refused() {
    framework()
        .given_no_previous_events()
        .when(request("r1", i64::MAX, 100))
        .then_expect_error(LedgerError::Overflow);
    framework()
        .given_no_previous_events()
        .when(request("r1", i64::MAX / 100 + 1, 100))
        .then_expect_error(LedgerError::Overflow);
}

#[test]
fn request_with_invalid_recharge_id_is_refused() {
    framework()
        .given_no_previous_events()
        .when(request("", 5000, 100))
        .then_expect_error(LedgerError::InvalidId(IdError::Empty));
    framework()
        .given_no_previous_events()
        .when(request("r 1", 5000, 100))
        .then_expect_error(LedgerError::InvalidId(IdError::BadCharacter));
    framework()
        .given_no_previous_events()
        .when(request("r1'; drop table users; --", 5000, 100))
        .then_expect_error(LedgerError::InvalidId(IdError::BadCharacter));
    framework()
        .given_no_previous_events()
        .when(request(&"r".repeat(129), 5000, 100))
        .then_expect_error(LedgerError::InvalidId(IdError::TooLong { max: 128 }));
}

#[test]
fn request_with_empty_currency_or_provider_is_refused() {
    framework()
        .given_no_previous_events()
        .when(CreditCommand::RequestRecharge {
            recharge_id: "r1".to_owned(),
            amount_fen: 5000,
            currency: String::new(),
            credits_per_yuan: 100,
            provider: "stripe".to_owned(),
        })
        .then_expect_error(invalid_text("currency"));
    framework()
        .given_no_previous_events()
        .when(CreditCommand::RequestRecharge {
            recharge_id: "r1".to_owned(),
            amount_fen: 5000,
            currency: "cny".to_owned(),
            credits_per_yuan: 100,
            provider: "   ".to_owned(),
        })
        .then_expect_error(invalid_text("provider"));
}

// ---------------------------------------------------------------------------------------
// Checkout
// ---------------------------------------------------------------------------------------

fn attach(recharge_id: &str, session: &str) -> CreditCommand {
    CreditCommand::AttachCheckout {
        recharge_id: recharge_id.to_owned(),
        checkout_session_id: session.to_owned(),
        checkout_url: Some(format!("https://checkout.stripe.com/c/{session}")),
    }
}

fn checkout_created(recharge_id: &str, session: &str) -> CreditEvent {
    CreditEvent::RechargeCheckoutCreated {
        recharge_id: recharge_id.to_owned(),
        checkout_session_id: session.to_owned(),
        checkout_url: Some(format!("https://checkout.stripe.com/c/{session}")),
    }
}

#[test]
fn attach_checkout_to_a_pending_recharge() {
    framework()
        .given(vec![requested("r1", 5000, 5000, 100)])
        .when(attach("r1", "cs_test_1"))
        .then_expect_events(vec![checkout_created("r1", "cs_test_1")]);
}

#[test]
fn attach_the_same_checkout_twice_is_refused() {
    framework()
        .given(vec![
            requested("r1", 5000, 5000, 100),
            checkout_created("r1", "cs_test_1"),
        ])
        .when(attach("r1", "cs_test_1"))
        .then_expect_error(LedgerError::RechargeNotPending {
            recharge_id: "r1".to_owned(),
            status: "checkout_attached",
        });
}

#[test]
fn attach_checkout_to_an_unknown_recharge_is_refused() {
    framework()
        .given_no_previous_events()
        .when(attach("r1", "cs_test_1"))
        .then_expect_error(LedgerError::UnknownRecharge {
            recharge_id: "r1".to_owned(),
        });
}

#[test]
fn attach_checkout_to_a_settled_recharge_is_refused() {
    framework()
        .given(paid(5000))
        .when(attach("r-paid", "cs_test_1"))
        .then_expect_error(LedgerError::RechargeNotPending {
            recharge_id: "r-paid".to_owned(),
            status: "completed",
        });
    framework()
        .given(vec![requested("r1", 5000, 5000, 100), cancelled("r1")])
        .when(attach("r1", "cs_test_1"))
        .then_expect_error(LedgerError::RechargeNotPending {
            recharge_id: "r1".to_owned(),
            status: "cancelled",
        });
}

#[test]
fn attach_an_empty_checkout_session_is_refused() {
    framework()
        .given(vec![requested("r1", 5000, 5000, 100)])
        .when(attach("r1", ""))
        .then_expect_error(invalid_text("checkout_session_id"));
}

// ---------------------------------------------------------------------------------------
// Completion
// ---------------------------------------------------------------------------------------

#[test]
fn complete_adds_the_requested_credits() {
    framework()
        .given(vec![
            requested("r1", 5000, 5000, 100),
            checkout_created("r1", "cs_test_1"),
        ])
        .when(complete("r1", 5000))
        .then_expect_events(vec![completed("r1", 5000, 5000)]);
}

#[test]
fn complete_records_the_balance_after_on_top_of_the_existing_balance() {
    framework()
        .given(paid(1200))
        .and(vec![requested("r1", 5000, 7500, 150)])
        .when(complete("r1", 5000))
        .then_expect_events(vec![completed("r1", 7500, 8700)]);
}

#[test]
fn complete_accepts_the_currency_in_any_case() {
    framework()
        .given(vec![requested("r1", 5000, 5000, 100)])
        .when(complete_in("r1", 5000, "CNY"))
        .then_expect_events(vec![completed("r1", 5000, 5000)]);
}

#[test]
fn second_completion_is_refused() {
    framework()
        .given(vec![
            requested("r1", 5000, 5000, 100),
            completed("r1", 5000, 5000),
        ])
        .when(complete("r1", 5000))
        .then_expect_error(LedgerError::RechargeAlreadyCompleted {
            recharge_id: "r1".to_owned(),
        });
}

#[test]
fn completion_after_reversal_is_refused() {
    framework()
        .given(vec![
            requested("r1", 5000, 5000, 100),
            completed("r1", 5000, 5000),
            reversed("r1", 5000, 5000, 0),
        ])
        .when(complete("r1", 5000))
        .then_expect_error(LedgerError::RechargeAlreadyCompleted {
            recharge_id: "r1".to_owned(),
        });
}

#[test]
fn completion_for_another_amount_is_refused() {
    framework()
        .given(vec![requested("r1", 5000, 5000, 100)])
        .when(complete("r1", 500))
        .then_expect_error(LedgerError::AmountMismatch {
            expected: 5000,
            actual: 500,
        });
}

#[test]
fn completion_in_another_currency_is_refused() {
    framework()
        .given(vec![requested("r1", 5000, 5000, 100)])
        .when(complete_in("r1", 5000, "usd"))
        .then_expect_error(LedgerError::CurrencyMismatch {
            expected: "cny".to_owned(),
            actual: "usd".to_owned(),
        });
}

#[test]
fn completion_of_an_unknown_recharge_is_refused() {
    framework()
        .given(paid(100))
        .when(complete("r1", 5000))
        .then_expect_error(LedgerError::UnknownRecharge {
            recharge_id: "r1".to_owned(),
        });
}

#[test]
fn completion_after_cancellation_is_credited_because_money_in_hand_wins() {
    framework()
        .given(vec![requested("r1", 5000, 5000, 100), cancelled("r1")])
        .when(complete("r1", 5000))
        .then_expect_events(vec![completed("r1", 5000, 5000)]);
}

#[test]
fn completion_after_failure_is_credited_because_money_in_hand_wins() {
    framework()
        .given(vec![requested("r1", 5000, 5000, 100), failed("r1")])
        .when(complete("r1", 5000))
        .then_expect_events(vec![completed("r1", 5000, 5000)]);
}

#[test]
fn completion_that_would_overflow_the_balance_is_refused() {
    framework()
        .given(vec![
            adjusted("a-big", i64::MAX - 10, i64::MAX - 10),
            requested("r1", 5000, 5000, 100),
        ])
        .when(complete("r1", 5000))
        .then_expect_error(LedgerError::Overflow);
}

// ---------------------------------------------------------------------------------------
// Failure and cancellation of a pending recharge
// ---------------------------------------------------------------------------------------

#[test]
fn fail_a_pending_recharge() {
    framework()
        .given(vec![requested("r1", 5000, 5000, 100)])
        .when(CreditCommand::FailRecharge {
            recharge_id: "r1".to_owned(),
            reason: "card_declined".to_owned(),
        })
        .then_expect_events(vec![failed("r1")]);
}

#[test]
fn cancel_a_pending_recharge() {
    framework()
        .given(vec![
            requested("r1", 5000, 5000, 100),
            checkout_created("r1", "cs_test_1"),
        ])
        .when(CreditCommand::CancelRecharge {
            recharge_id: "r1".to_owned(),
        })
        .then_expect_events(vec![cancelled("r1")]);
}

fn fail_recharge(recharge_id: &str) -> CreditCommand {
    CreditCommand::FailRecharge {
        recharge_id: recharge_id.to_owned(),
        reason: "card_declined".to_owned(),
    }
}

fn cancel_recharge(recharge_id: &str) -> CreditCommand {
    CreditCommand::CancelRecharge {
        recharge_id: recharge_id.to_owned(),
    }
}

#[test]
fn fail_or_cancel_is_refused_unless_pending() {
    let not_pending = |status: &'static str| LedgerError::RechargeNotPending {
        recharge_id: "r1".to_owned(),
        status,
    };
    let histories: [(Vec<CreditEvent>, &'static str); 4] = [
        (
            vec![
                requested("r1", 5000, 5000, 100),
                completed("r1", 5000, 5000),
            ],
            "completed",
        ),
        (
            vec![requested("r1", 5000, 5000, 100), failed("r1")],
            "failed",
        ),
        (
            vec![requested("r1", 5000, 5000, 100), cancelled("r1")],
            "cancelled",
        ),
        (
            vec![
                requested("r1", 5000, 5000, 100),
                completed("r1", 5000, 5000),
                reversed("r1", 5000, 5000, 0),
            ],
            "reversed",
        ),
    ];
    for (history, status) in histories {
        framework()
            .given(history.clone())
            .when(fail_recharge("r1"))
            .then_expect_error(not_pending(status));
        framework()
            .given(history)
            .when(cancel_recharge("r1"))
            .then_expect_error(not_pending(status));
    }
}

#[test]
fn fail_or_cancel_an_unknown_recharge_is_refused() {
    let unknown = LedgerError::UnknownRecharge {
        recharge_id: "r1".to_owned(),
    };
    framework()
        .given_no_previous_events()
        .when(fail_recharge("r1"))
        .then_expect_error(unknown.clone());
    framework()
        .given_no_previous_events()
        .when(cancel_recharge("r1"))
        .then_expect_error(unknown);
}

#[test]
fn fail_without_a_reason_is_refused() {
    framework()
        .given(vec![requested("r1", 5000, 5000, 100)])
        .when(CreditCommand::FailRecharge {
            recharge_id: "r1".to_owned(),
            reason: " ".to_owned(),
        })
        .then_expect_error(invalid_text("reason"));
}

// ---------------------------------------------------------------------------------------
// Reversal (refund or dispute after completion)
// ---------------------------------------------------------------------------------------

fn completed_r1() -> Vec<CreditEvent> {
    vec![
        requested("r1", 5000, 5000, 100),
        completed("r1", 5000, 5000),
    ]
}

#[test]
fn full_reversal_claws_back_every_credit() {
    framework()
        .given(completed_r1())
        .when(reverse("r1", 5000))
        .then_expect_events(vec![refund_fact("r1", 5000), reversed("r1", 5000, 5000, 0)]);
}

#[test]
fn partial_reversal_claws_back_in_proportion() {
    framework()
        .given(completed_r1())
        .when(reverse("r1", 1500))
        .then_expect_events(vec![
            refund_fact("r1", 1500),
            reversed("r1", 1500, 1500, 3500),
        ]);
}

#[test]
fn partial_reversal_is_proportional_to_the_price_paid() {
    // 5000 fen bought 7500 credits; refunding 30% takes back 2250.
    framework()
        .given(vec![
            requested("r1", 5000, 7500, 150),
            completed("r1", 7500, 7500),
        ])
        .when(reverse("r1", 1500))
        .then_expect_events(vec![
            refund_fact("r1", 1500),
            reversed("r1", 2250, 1500, 5250),
        ]);
}

#[test]
fn reversals_are_cumulative_a_later_full_refund_claws_back_the_rest() {
    framework()
        .given(completed_r1())
        .and(vec![reversed("r1", 1500, 1500, 3500)])
        .when(reverse("r1", 5000))
        .then_expect_events(vec![refund_fact("r1", 5000), reversed("r1", 3500, 5000, 0)]);
}

#[test]
fn reversals_with_rounding_never_claw_back_more_than_was_bought() {
    // 333 fen bought 499 credits at 150/yuan; 100 fen is 149.8 credits, rounded down.
    framework()
        .given(vec![
            requested("r1", 333, 499, 150),
            completed("r1", 499, 499),
        ])
        .when(reverse("r1", 100))
        .then_expect_events(vec![refund_fact("r1", 100), reversed("r1", 149, 100, 350)]);
    framework()
        .given(vec![
            requested("r1", 333, 499, 150),
            completed("r1", 499, 499),
            reversed("r1", 149, 100, 350),
        ])
        .when(reverse("r1", 333))
        .then_expect_events(vec![refund_fact("r1", 333), reversed("r1", 350, 333, 0)]);
}

#[test]
fn reversal_of_more_than_was_paid_is_capped_at_the_amount() {
    framework()
        .given(completed_r1())
        .when(reverse("r1", 9000))
        .then_expect_events(vec![refund_fact("r1", 5000), reversed("r1", 5000, 5000, 0)]);
}

#[test]
fn reversal_repeating_the_same_total_has_nothing_to_reverse() {
    let nothing = LedgerError::AlreadyRecorded {
        recharge_id: "r1".to_owned(),
    };
    framework()
        .given(completed_r1())
        .and(vec![reversed("r1", 1500, 1500, 3500)])
        .when(reverse("r1", 1500))
        .then_expect_error(nothing.clone());
    framework()
        .given(completed_r1())
        .and(vec![reversed("r1", 1500, 1500, 3500)])
        .when(reverse("r1", 1000))
        .then_expect_error(nothing.clone());
    framework()
        .given(completed_r1())
        .and(vec![reversed("r1", 5000, 5000, 0)])
        .when(reverse("r1", 5000))
        .then_expect_error(nothing.clone());
    framework()
        .given(completed_r1())
        .and(vec![reversed("r1", 5000, 5000, 0)])
        .when(reverse("r1", 6000))
        .then_expect_error(nothing);
}

#[test]
fn reversal_worth_less_than_a_credit_has_nothing_to_reverse() {
    // 150 fen bought 1 credit at 1 credit a yuan; 100 fen back is two thirds of a credit.
    framework()
        .given(vec![requested("r1", 150, 1, 1), completed("r1", 1, 1)])
        .when(reverse("r1", 100))
        .then_expect_events(vec![refund_fact("r1", 100)]);
}

#[test]
fn a_refund_before_the_completion_is_recorded_and_moves_no_credits() {
    for history in [
        vec![requested("r1", 5000, 5000, 100)],
        vec![requested("r1", 5000, 5000, 100), failed("r1")],
        vec![requested("r1", 5000, 5000, 100), cancelled("r1")],
    ] {
        framework()
            .given(history)
            .when(reverse("r1", 5000))
            .then_expect_events(vec![refund_fact("r1", 5000)]);
    }
}

#[test]
fn a_refund_recorded_before_the_completion_is_netted_when_it_completes() {
    framework()
        .given(vec![
            requested("r1", 5000, 5000, 100),
            refund_fact("r1", 2000),
        ])
        .when(complete("r1", 5000))
        .then_expect_events(vec![
            completed("r1", 5000, 5000),
            CreditEvent::RechargeReversed {
                recharge_id: "r1".to_owned(),
                credits: 2000,
                reversed_fen: 2000,
                reason: "refunded or disputed before the payment completed".to_owned(),
                reference: "pi_r1".to_owned(),
                balance_after: 3000,
            },
        ]);
}

#[test]
fn refunds_and_disputes_are_separate_amounts() {
    // 100 yuan paid, 60 refunded, then a dispute of the remaining 40: nothing left.
    framework()
        .given(vec![
            requested("r1", 10000, 10000, 100),
            completed("r1", 10000, 10000),
            refund_fact("r1", 6000),
            reversed("r1", 6000, 6000, 4000),
        ])
        .when(dispute("r1", 4000, DisputeStage::Open))
        .then_expect_events(vec![
            dispute_fact("r1", 4000, DisputeStage::Open),
            CreditEvent::RechargeReversed {
                recharge_id: "r1".to_owned(),
                credits: 4000,
                reversed_fen: 10000,
                reason: "dispute open".to_owned(),
                reference: "dp_1".to_owned(),
                balance_after: 0,
            },
        ]);
}

#[test]
fn an_inquiry_claws_back_nothing() {
    framework()
        .given(completed_r1())
        .when(dispute("r1", 5000, DisputeStage::Inquiry))
        .then_expect_events(vec![dispute_fact("r1", 5000, DisputeStage::Inquiry)]);
    framework()
        .given(completed_r1())
        .and(vec![dispute_fact("r1", 5000, DisputeStage::Inquiry)])
        .when(dispute("r1", 5000, DisputeStage::InquiryClosed))
        .then_expect_events(vec![dispute_fact("r1", 5000, DisputeStage::InquiryClosed)]);
}

#[test]
fn a_won_dispute_gives_the_credits_back() {
    framework()
        .given(completed_r1())
        .and(vec![
            dispute_fact("r1", 5000, DisputeStage::Open),
            CreditEvent::RechargeReversed {
                recharge_id: "r1".to_owned(),
                credits: 5000,
                reversed_fen: 5000,
                reason: "dispute open".to_owned(),
                reference: "dp_1".to_owned(),
                balance_after: 0,
            },
        ])
        .when(dispute("r1", 5000, DisputeStage::Won))
        .then_expect_events(vec![
            dispute_fact("r1", 5000, DisputeStage::Won),
            CreditEvent::RechargeReinstated {
                recharge_id: "r1".to_owned(),
                credits: 5000,
                reversed_fen: 0,
                reason: "dispute won".to_owned(),
                reference: "dp_1".to_owned(),
                balance_after: 5000,
            },
        ]);
}

#[test]
fn a_dispute_stage_never_moves_back() {
    let recorded = LedgerError::AlreadyRecorded {
        recharge_id: "r1".to_owned(),
    };
    for (later, earlier) in [
        (DisputeStage::Won, DisputeStage::Open),
        (DisputeStage::Won, DisputeStage::FundsWithdrawn),
        (DisputeStage::Lost, DisputeStage::Won),
        (DisputeStage::FundsWithdrawn, DisputeStage::Open),
        (DisputeStage::Open, DisputeStage::Open),
    ] {
        framework()
            .given(vec![
                requested("r1", 5000, 5000, 100),
                dispute_fact("r1", 5000, later),
            ])
            .when(dispute("r1", 5000, earlier))
            .then_expect_error(recorded.clone());
    }
}

#[test]
fn reversal_of_an_unknown_recharge_is_refused() {
    framework()
        .given(paid(100))
        .when(reverse("r1", 5000))
        .then_expect_error(LedgerError::UnknownRecharge {
            recharge_id: "r1".to_owned(),
        });
}

#[test]
fn reversal_of_a_non_positive_amount_is_refused() {
    for fen in [0, -1, i64::MIN] {
        framework()
            .given(completed_r1())
            .when(reverse("r1", fen))
            .then_expect_error(LedgerError::NonPositiveAmount);
    }
}

#[test]
fn a_refund_without_reference_is_refused() {
    framework()
        .given(completed_r1())
        .when(CreditCommand::RecordRefund {
            recharge_id: "r1".to_owned(),
            refunded_fen: 5000,
            reference: String::new(),
        })
        .then_expect_error(invalid_text("reference"));
}

#[test]
fn reversal_of_a_very_large_recharge_does_not_overflow() {
    // 100 million yuan: credits * reversed fen exceeds i64, the result does not.
    let fen = 10_000_000_000;
    framework()
        .given(vec![
            requested("r1", fen, fen, 100),
            completed("r1", fen, fen),
        ])
        .when(reverse("r1", fen / 2))
        .then_expect_events(vec![
            refund_fact("r1", fen / 2),
            reversed("r1", fen / 2, fen / 2, fen / 2),
        ]);
    framework()
        .given(vec![
            requested("r1", fen, fen, 100),
            completed("r1", fen, fen),
        ])
        .when(reverse("r1", fen))
        .then_expect_events(vec![refund_fact("r1", fen), reversed("r1", fen, fen, 0)]);
}

/// 5000 credits bought, 4000 spent, then the whole payment refunded: 4000 in debt.
fn in_debt() -> Vec<CreditEvent> {
    let mut history = completed_r1();
    history.push(deducted("t1", 4000, 1000));
    history.push(succeeded("t1"));
    history
}

#[test]
fn reversal_of_spent_credits_takes_the_balance_below_zero() {
    framework()
        .given(in_debt())
        .when(reverse("r1", 5000))
        .then_expect_events(vec![
            refund_fact("r1", 5000),
            reversed("r1", 5000, 5000, -4000),
        ]);
}

#[test]
fn while_in_debt_deductions_are_refused() {
    framework()
        .given(in_debt())
        .and(vec![reversed("r1", 5000, 5000, -4000)])
        .when(deduct("t2", 10))
        .then_expect_error(LedgerError::InsufficientCredits {
            required: 10,
            available: -4000,
        });
}

#[test]
fn while_in_debt_a_recharge_repays_first() {
    // 4005 credits bring the balance to 5: still not enough for a 10-credit video.
    framework()
        .given(in_debt())
        .and(vec![
            reversed("r1", 5000, 5000, -4000),
            requested("r2", 4005, 4005, 100),
            completed("r2", 4005, 5),
        ])
        .when(deduct("t2", 10))
        .then_expect_error(LedgerError::InsufficientCredits {
            required: 10,
            available: 5,
        });
}

#[test]
fn once_the_debt_is_repaid_deductions_are_accepted_again() {
    framework()
        .given(in_debt())
        .and(vec![reversed("r1", 5000, 5000, -4000)])
        .and(vec![requested("r2", 4010, 4010, 100)])
        .when(complete("r2", 4010))
        .then_expect_events(vec![completed("r2", 4010, 10)]);
    framework()
        .given(in_debt())
        .and(vec![
            reversed("r1", 5000, 5000, -4000),
            requested("r2", 4010, 4010, 100),
            completed("r2", 4010, 10),
        ])
        .when(deduct("t2", 10))
        .then_expect_events(vec![deducted("t2", 10, 0)]);
}

#[test]
fn while_in_debt_an_operator_grant_repays_part_of_it() {
    framework()
        .given(in_debt())
        .and(vec![reversed("r1", 5000, 5000, -4000)])
        .when(adjust("a1", 1000))
        .then_expect_events(vec![adjusted("a1", 1000, -3000)]);
}

#[test]
fn while_in_debt_a_negative_adjustment_is_refused() {
    framework()
        .given(in_debt())
        .and(vec![reversed("r1", 5000, 5000, -4000)])
        .when(adjust("a1", -1))
        .then_expect_error(LedgerError::AdjustmentBelowZero { would_be: -4001 });
}

#[test]
fn while_in_debt_a_failed_video_is_still_refunded() {
    framework()
        .given(in_debt())
        .and(vec![
            deducted("t2", 1000, 0),
            reversed("r1", 5000, 5000, -5000),
        ])
        .when(fail_video("t2"))
        .then_expect_events(vec![video_failed("t2"), refunded("t2", 1000, -4000)]);
}

// ---------------------------------------------------------------------------------------
// Deduction for a video task
// ---------------------------------------------------------------------------------------

#[test]
fn deduct_takes_the_credits_for_a_task() {
    framework()
        .given(paid(100))
        .when(deduct("t1", 10))
        .then_expect_events(vec![deducted("t1", 10, 90)]);
}

#[test]
fn deduct_the_exact_balance_leaves_zero() {
    framework()
        .given(paid(10))
        .when(deduct("t1", 10))
        .then_expect_events(vec![deducted("t1", 10, 0)]);
}

#[test]
fn deduct_more_than_the_balance_is_refused() {
    framework()
        .given(paid(9))
        .when(deduct("t1", 10))
        .then_expect_error(LedgerError::InsufficientCredits {
            required: 10,
            available: 9,
        });
}

#[test]
fn deduct_from_an_empty_account_is_refused() {
    framework()
        .given_no_previous_events()
        .when(deduct("t1", 10))
        .then_expect_error(LedgerError::InsufficientCredits {
            required: 10,
            available: 0,
        });
}

#[test]
fn deduct_from_an_account_with_only_pending_recharges_is_refused() {
    framework()
        .given(vec![requested("r1", 5000, 5000, 100)])
        .when(deduct("t1", 10))
        .then_expect_error(LedgerError::InsufficientCredits {
            required: 10,
            available: 0,
        });
}

#[test]
fn deduct_for_a_task_already_charged_is_refused() {
    let charged = LedgerError::TaskAlreadyCharged {
        task_id: "t1".to_owned(),
    };
    framework()
        .given(paid(100))
        .and(vec![deducted("t1", 10, 90)])
        .when(deduct("t1", 10))
        .then_expect_error(charged.clone());
    // Even once it failed and was refunded, a task id is charged only once.
    framework()
        .given(paid(100))
        .and(vec![
            deducted("t1", 10, 90),
            video_failed("t1"),
            refunded("t1", 10, 100),
        ])
        .when(deduct("t1", 10))
        .then_expect_error(charged);
}

#[test]
fn deduct_a_non_positive_amount_is_refused() {
    for credits in [0, -10, i64::MIN] {
        framework()
            .given(paid(100))
            .when(deduct("t1", credits))
            .then_expect_error(LedgerError::NonPositiveAmount);
    }
}

#[test]
fn deduct_with_invalid_task_id_or_text_is_refused() {
    framework()
        .given(paid(100))
        .when(deduct("", 10))
        .then_expect_error(LedgerError::InvalidId(IdError::Empty));
    framework()
        .given(paid(100))
        .when(deduct("t/1", 10))
        .then_expect_error(LedgerError::InvalidId(IdError::BadCharacter));
    framework()
        .given(paid(100))
        .when(CreditCommand::DeductForTask {
            task_id: "t1".to_owned(),
            credits: 10,
            description: String::new(),
            video: video(),
            callback_token_sha256: "ab".repeat(32),
        })
        .then_expect_error(invalid_text("description"));
    framework()
        .given(paid(100))
        .when(CreditCommand::DeductForTask {
            task_id: "t1".to_owned(),
            credits: 10,
            description: "Sora video".to_owned(),
            video: VideoSpec {
                prompt: "\n\t ".to_owned(),
                ..video()
            },
            callback_token_sha256: "ab".repeat(32),
        })
        .then_expect_error(invalid_text("prompt"));
    framework()
        .given(paid(100))
        .when(CreditCommand::DeductForTask {
            task_id: "t1".to_owned(),
            credits: 10,
            description: "Sora video".to_owned(),
            video: VideoSpec {
                prompt: "x".repeat(8193),
                ..video()
            },
            callback_token_sha256: "ab".repeat(32),
        })
        .then_expect_error(invalid_text("prompt"));
}

// ---------------------------------------------------------------------------------------
// Submission, success, failure and refund
// ---------------------------------------------------------------------------------------

fn charged_t1() -> Vec<CreditEvent> {
    let mut history = paid(100);
    history.push(deducted("t1", 10, 90));
    history
}

#[test]
fn submit_a_charged_task() {
    framework()
        .given(charged_t1())
        .when(submit("t1"))
        .then_expect_events(vec![submitted("t1")]);
}

#[test]
fn submit_twice_is_refused() {
    framework()
        .given(charged_t1())
        .and(vec![submitted("t1")])
        .when(submit("t1"))
        .then_expect_error(LedgerError::TaskAlreadySubmitted {
            task_id: "t1".to_owned(),
        });
}

#[test]
fn submit_a_settled_task_is_refused() {
    let settled = LedgerError::TaskAlreadySettled {
        task_id: "t1".to_owned(),
    };
    framework()
        .given(charged_t1())
        .and(vec![succeeded("t1")])
        .when(submit("t1"))
        .then_expect_error(settled.clone());
    framework()
        .given(charged_t1())
        .and(vec![video_failed("t1"), refunded("t1", 10, 100)])
        .when(submit("t1"))
        .then_expect_error(settled);
}

#[test]
fn submit_an_unknown_task_is_refused() {
    framework()
        .given(paid(100))
        .when(submit("t1"))
        .then_expect_error(LedgerError::UnknownTask {
            task_id: "t1".to_owned(),
        });
}

#[test]
fn submit_without_provider_task_id_is_refused() {
    framework()
        .given(charged_t1())
        .when(CreditCommand::MarkTaskSubmitted {
            task_id: "t1".to_owned(),
            provider_task_id: String::new(),
        })
        .then_expect_error(invalid_text("provider_task_id"));
}

#[test]
fn success_of_a_submitted_task() {
    framework()
        .given(charged_t1())
        .and(vec![submitted("t1")])
        .when(succeed("t1"))
        .then_expect_events(vec![succeeded("t1")]);
}

#[test]
fn success_of_a_task_never_marked_submitted() {
    // The callback may beat the submission's acknowledgement.
    framework()
        .given(charged_t1())
        .when(succeed("t1"))
        .then_expect_events(vec![succeeded("t1")]);
}

#[test]
fn success_after_a_refund_is_recorded_once_and_moves_no_credits() {
    let late = CreditEvent::VideoDeliveredAfterRefund {
        task_id: "t1".to_owned(),
        video_url: "https://cdn.example/v.mp4".to_owned(),
        remove_watermark: Some(true),
        pid: Some("p1".to_owned()),
    };
    framework()
        .given(charged_t1())
        .and(vec![
            submitted("t1"),
            video_failed("t1"),
            refunded("t1", 10, 100),
        ])
        .when(succeed("t1"))
        .then_expect_events(vec![late.clone()]);
    framework()
        .given(charged_t1())
        .and(vec![
            submitted("t1"),
            video_failed("t1"),
            refunded("t1", 10, 100),
            late,
        ])
        .when(succeed("t1"))
        .then_expect_error(LedgerError::TaskAlreadySettled {
            task_id: "t1".to_owned(),
        });
}

#[test]
fn an_uncertain_submission_stays_charged_until_decided() {
    let uncertain = CreditEvent::VideoSubmissionUncertain {
        task_id: "t1".to_owned(),
        error_message: "timed out".to_owned(),
    };
    framework()
        .given(charged_t1())
        .when(CreditCommand::MarkSubmissionUncertain {
            task_id: "t1".to_owned(),
            error_message: "timed out".to_owned(),
        })
        .then_expect_events(vec![uncertain.clone()]);
    // Its callback may still come, with the provider's id.
    framework()
        .given(charged_t1())
        .and(vec![uncertain.clone()])
        .when(succeed("t1"))
        .then_expect_events(vec![succeeded("t1")]);
    framework()
        .given(charged_t1())
        .and(vec![uncertain])
        .when(fail_video("t1"))
        .then_expect_events(vec![video_failed("t1"), refunded("t1", 10, 100)]);
}

#[test]
fn control_characters_in_client_text_are_refused() {
    framework()
        .given(paid(100))
        .when(CreditCommand::Adjust {
            adjustment_id: "a1".to_owned(),
            credits: 5,
            actor: "ops@example.com".to_owned(),
            reason: "bad\u{0}reason".to_owned(),
        })
        .then_expect_error(LedgerError::ControlCharacters { field: "reason" });
}

#[test]
fn second_success_is_refused() {
    framework()
        .given(charged_t1())
        .and(vec![succeeded("t1")])
        .when(succeed("t1"))
        .then_expect_error(LedgerError::TaskAlreadySettled {
            task_id: "t1".to_owned(),
        });
}

#[test]
fn success_of_an_unknown_task_is_refused() {
    framework()
        .given(paid(100))
        .when(succeed("t1"))
        .then_expect_error(LedgerError::UnknownTask {
            task_id: "t1".to_owned(),
        });
}

#[test]
fn success_without_video_url_is_refused() {
    framework()
        .given(charged_t1())
        .when(CreditCommand::RecordVideoSuccess {
            task_id: "t1".to_owned(),
            video_url: String::new(),
            remove_watermark: None,
            pid: None,
        })
        .then_expect_error(invalid_text("video_url"));
}

#[test]
fn failure_records_the_failure_and_refunds_the_credits() {
    framework()
        .given(charged_t1())
        .and(vec![submitted("t1")])
        .when(fail_video("t1"))
        .then_expect_events(vec![video_failed("t1"), refunded("t1", 10, 100)]);
}

#[test]
fn failure_before_submission_refunds_too() {
    framework()
        .given(charged_t1())
        .when(fail_video("t1"))
        .then_expect_events(vec![video_failed("t1"), refunded("t1", 10, 100)]);
}

#[test]
fn refund_goes_on_top_of_whatever_the_balance_is_now() {
    framework()
        .given(charged_t1())
        .and(vec![deducted("t2", 30, 60), adjusted("a1", 5, 65)])
        .when(fail_video("t1"))
        .then_expect_events(vec![video_failed("t1"), refunded("t1", 10, 75)]);
}

#[test]
fn failure_of_an_uncharged_task_refunds_nothing() {
    framework()
        .given(paid(100))
        .when(fail_video("t1"))
        .then_expect_error(LedgerError::UnknownTask {
            task_id: "t1".to_owned(),
        });
}

#[test]
fn second_failure_is_refused_so_a_task_is_refunded_once() {
    framework()
        .given(charged_t1())
        .and(vec![video_failed("t1"), refunded("t1", 10, 100)])
        .when(fail_video("t1"))
        .then_expect_error(LedgerError::TaskAlreadySettled {
            task_id: "t1".to_owned(),
        });
}

#[test]
fn failure_after_success_is_refused() {
    framework()
        .given(charged_t1())
        .and(vec![submitted("t1"), succeeded("t1")])
        .when(fail_video("t1"))
        .then_expect_error(LedgerError::TaskAlreadySettled {
            task_id: "t1".to_owned(),
        });
}

#[test]
fn failure_text_from_the_provider_is_kept_but_bounded() {
    framework()
        .given(charged_t1())
        .when(CreditCommand::FailVideo {
            task_id: "t1".to_owned(),
            failure_reason: "é".repeat(5000),
            error_message: "x".repeat(9000),
        })
        .then_expect_events(vec![
            CreditEvent::VideoFailed {
                task_id: "t1".to_owned(),
                // 2 bytes a character: cut at the last whole character within 8192 bytes.
                failure_reason: "é".repeat(4096),
                error_message: "x".repeat(8192),
            },
            refunded("t1", 10, 100),
        ]);
}

// ---------------------------------------------------------------------------------------
// Operator adjustments
// ---------------------------------------------------------------------------------------

#[test]
fn positive_adjustment_grants_credits() {
    framework()
        .given_no_previous_events()
        .when(adjust("a1", 500))
        .then_expect_events(vec![adjusted("a1", 500, 500)]);
}

#[test]
fn negative_adjustment_takes_credits_back() {
    framework()
        .given(paid(100))
        .when(adjust("a1", -40))
        .then_expect_events(vec![adjusted("a1", -40, 60)]);
}

#[test]
fn negative_adjustment_to_exactly_zero_is_accepted() {
    framework()
        .given(paid(100))
        .when(adjust("a1", -100))
        .then_expect_events(vec![adjusted("a1", -100, 0)]);
}

#[test]
fn adjustment_below_zero_is_refused() {
    framework()
        .given(paid(100))
        .when(adjust("a1", -101))
        .then_expect_error(LedgerError::AdjustmentBelowZero { would_be: -1 });
    framework()
        .given_no_previous_events()
        .when(adjust("a1", i64::MIN))
        .then_expect_error(LedgerError::AdjustmentBelowZero { would_be: i64::MIN });
}

#[test]
fn zero_adjustment_is_refused() {
    framework()
        .given(paid(100))
        .when(adjust("a1", 0))
        .then_expect_error(LedgerError::ZeroAdjustment);
}

#[test]
fn duplicate_adjustment_id_is_refused() {
    framework()
        .given(paid(100))
        .and(vec![adjusted("a1", 500, 600)])
        .when(adjust("a1", 500))
        .then_expect_error(LedgerError::AdjustmentExists {
            adjustment_id: "a1".to_owned(),
        });
}

#[test]
fn adjustment_that_would_overflow_is_refused() {
    framework()
        .given(paid(100))
        .when(adjust("a1", i64::MAX))
        .then_expect_error(LedgerError::Overflow);
}

#[test]
fn adjustment_with_invalid_id_or_text_is_refused() {
    framework()
        .given_no_previous_events()
        .when(adjust("", 5))
        .then_expect_error(LedgerError::InvalidId(IdError::Empty));
    framework()
        .given_no_previous_events()
        .when(adjust("a 1", 5))
        .then_expect_error(LedgerError::InvalidId(IdError::BadCharacter));
    framework()
        .given_no_previous_events()
        .when(CreditCommand::Adjust {
            adjustment_id: "a1".to_owned(),
            credits: 5,
            actor: String::new(),
            reason: "goodwill".to_owned(),
        })
        .then_expect_error(invalid_text("actor"));
    framework()
        .given_no_previous_events()
        .when(CreditCommand::Adjust {
            adjustment_id: "a1".to_owned(),
            credits: 5,
            actor: "ops@example.com".to_owned(),
            reason: "  ".to_owned(),
        })
        .then_expect_error(invalid_text("reason"));
}

// ---------------------------------------------------------------------------------------
// The whole story, and what the state says at the end
// ---------------------------------------------------------------------------------------

#[test]
fn a_full_history_replays_to_the_balance_it_records() {
    let history = vec![
        requested("r1", 5000, 5000, 100),
        checkout_created("r1", "cs_test_1"),
        completed("r1", 5000, 5000),
        deducted("t1", 10, 4990),
        submitted("t1"),
        succeeded("t1"),
        deducted("t2", 10, 4980),
        submitted("t2"),
        video_failed("t2"),
        refunded("t2", 10, 4990),
        adjusted("a1", -990, 4000),
        reversed("r1", 1500, 1500, 2500),
    ];
    let mut account = CreditAccount::default();
    for event in history.clone() {
        account.apply_event(event);
    }
    assert_eq!(account.balance(), 2500);
    let deltas: i64 = history.iter().filter_map(CreditEvent::credit_delta).sum();
    assert_eq!(deltas, 2500);
    let r1 = account.recharge("r1").unwrap();
    assert_eq!(r1.reversed_fen, 1500);
    assert_eq!(r1.reversed_credits, 1500);
    assert_eq!(r1.payment_id.as_deref(), Some("pi_r1"));
    assert_eq!(r1.checkout_session_id.as_deref(), Some("cs_test_1"));
    assert!(account.task("t2").unwrap().refunded);
    assert!(!account.task("t1").unwrap().refunded);
    assert_eq!(
        account.task("t1").unwrap().provider_task_id.as_deref(),
        Some("grsai-t1")
    );
    assert_eq!(account.open_tasks().count(), 0);

    framework()
        .given(history)
        .when(deduct("t3", 2500))
        .then_expect_events(vec![deducted("t3", 2500, 0)]);
}
