//! Property tests: random command sequences over a small pool of ids, run through `decide`
//! and `apply_event` (and through cqrs-es's `handle`), checking the ledger's invariants
//! after every command.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use credit_domain::{
    CreditAccount, CreditCommand, CreditEvent, DisputeStage, RechargeStatus, VideoSpec,
};
use proptest::prelude::*;

const RECHARGE_IDS: [&str; 3] = ["r1", "r2", "r3"];
const TASK_IDS: [&str; 4] = ["t1", "t2", "t3", "t4"];
const ADJUSTMENT_IDS: [&str; 3] = ["a1", "a2", "a3"];

/// A command before it is resolved against the state: amounts may be "whatever the recharge
/// was requested for", so that completions and reversals actually happen.
#[derive(Debug, Clone)]
enum Op {
    Request {
        recharge: usize,
        amount_fen: i64,
        credits_per_yuan: i64,
    },
    Attach {
        recharge: usize,
        session: u8,
    },
    Complete {
        recharge: usize,
        /// `None`: the requested amount.
        amount_fen: Option<i64>,
        currency: &'static str,
    },
    Fail {
        recharge: usize,
    },
    Cancel {
        recharge: usize,
    },
    Reverse {
        recharge: usize,
        amount: ReverseAmount,
    },
    Dispute {
        recharge: usize,
        dispute: u8,
        percent: i64,
        stage: DisputeStage,
    },
    Deduct {
        task: usize,
        credits: i64,
    },
    Submit {
        task: usize,
    },
    Succeed {
        task: usize,
    },
    FailVideo {
        task: usize,
    },
    Adjust {
        adjustment: usize,
        credits: i64,
    },
}

#[derive(Debug, Clone)]
enum ReverseAmount {
    /// Percent (0..=120) of the requested amount, cumulative.
    Percent(i64),
    Raw(i64),
}

fn fen() -> impl Strategy<Value = i64> {
    prop_oneof![
        20 => 1..=20_000i64,
        1 => Just(1i64),
        1 => Just(0i64),
        1 => Just(-100i64),
        1 => Just(i64::MAX),
        1 => Just(i64::MIN),
        // Largest amounts that do not overflow at 100 and 150 credits a yuan.
        1 => Just(i64::MAX / 100),
        1 => Just(i64::MAX / 150),
        1 => Just(10_000_000_000i64),
    ]
}

fn credits_per_yuan() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => Just(100i64),
        2 => Just(150i64),
        1 => Just(1i64),
        1 => Just(50i64),
        1 => Just(1_000_000i64),
        1 => Just(0i64),
        1 => Just(-100i64),
    ]
}

fn task_credits() -> impl Strategy<Value = i64> {
    prop_oneof![
        8 => Just(10i64),
        8 => 1..=5_000i64,
        1 => Just(0i64),
        1 => Just(-10i64),
        1 => Just(i64::MAX),
        1 => Just(i64::MIN),
    ]
}

fn adjustment_credits() -> impl Strategy<Value = i64> {
    prop_oneof![
        12 => -5_000..=5_000i64,
        1 => Just(0i64),
        1 => Just(i64::MAX),
        1 => Just(i64::MIN),
        1 => Just(i64::MAX / 2),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let recharge = 0..RECHARGE_IDS.len();
    let task = 0..TASK_IDS.len();
    prop_oneof![
        4 => (recharge.clone(), fen(), credits_per_yuan()).prop_map(
            |(recharge, amount_fen, credits_per_yuan)| Op::Request {
                recharge,
                amount_fen,
                credits_per_yuan
            }
        ),
        1 => (recharge.clone(), 0u8..2).prop_map(|(recharge, session)| Op::Attach {
            recharge,
            session
        }),
        4 => (
            recharge.clone(),
            prop_oneof![4 => Just(None), 1 => fen().prop_map(Some)],
            prop_oneof![8 => Just("cny"), 1 => Just("CNY"), 1 => Just("usd")],
        )
            .prop_map(|(recharge, amount_fen, currency)| Op::Complete {
                recharge,
                amount_fen,
                currency
            }),
        1 => recharge.clone().prop_map(|recharge| Op::Fail { recharge }),
        1 => recharge.clone().prop_map(|recharge| Op::Cancel { recharge }),
        3 => (
            recharge.clone(),
            prop_oneof![
                4 => (0..=120i64).prop_map(ReverseAmount::Percent),
                1 => fen().prop_map(ReverseAmount::Raw),
            ],
        )
            .prop_map(|(recharge, amount)| Op::Reverse { recharge, amount }),
        2 => (
            recharge.clone(),
            0..2u8,
            1..=100i64,
            prop_oneof![
                Just(DisputeStage::Inquiry),
                Just(DisputeStage::Open),
                Just(DisputeStage::FundsWithdrawn),
                Just(DisputeStage::Won),
                Just(DisputeStage::Lost),
                Just(DisputeStage::InquiryClosed),
                Just(DisputeStage::Prevented),
            ],
        )
            .prop_map(|(recharge, dispute, percent, stage)| Op::Dispute {
                recharge,
                dispute,
                percent,
                stage
            }),
        4 => (task.clone(), task_credits())
            .prop_map(|(task, credits)| Op::Deduct { task, credits }),
        1 => task.clone().prop_map(|task| Op::Submit { task }),
        1 => task.clone().prop_map(|task| Op::Succeed { task }),
        2 => task.prop_map(|task| Op::FailVideo { task }),
        2 => (0..ADJUSTMENT_IDS.len(), adjustment_credits())
            .prop_map(|(adjustment, credits)| Op::Adjust { adjustment, credits }),
    ]
}

fn video() -> VideoSpec {
    VideoSpec {
        model: "sora-2".to_owned(),
        prompt: "a cat surfing".to_owned(),
        aspect_ratio: "9:16".to_owned(),
        duration: 10,
        size: "small".to_owned(),
        reference_url: None,
    }
}

fn resolve(op: &Op, state: &CreditAccount) -> CreditCommand {
    let requested_fen = |recharge: usize| {
        state
            .recharge(RECHARGE_IDS[recharge])
            .map_or(5000, |r| r.amount_fen)
    };
    match op.clone() {
        Op::Request {
            recharge,
            amount_fen,
            credits_per_yuan,
        } => CreditCommand::RequestRecharge {
            recharge_id: RECHARGE_IDS[recharge].to_owned(),
            amount_fen,
            currency: "cny".to_owned(),
            credits_per_yuan,
            provider: "demo".to_owned(),
        },
        Op::Attach { recharge, session } => CreditCommand::AttachCheckout {
            recharge_id: RECHARGE_IDS[recharge].to_owned(),
            checkout_session_id: format!("cs_{session}"),
            checkout_url: None,
        },
        Op::Complete {
            recharge,
            amount_fen,
            currency,
        } => CreditCommand::CompleteRecharge {
            recharge_id: RECHARGE_IDS[recharge].to_owned(),
            amount_fen: amount_fen.unwrap_or_else(|| requested_fen(recharge)),
            currency: currency.to_owned(),
            payment_id: format!("pi_{recharge}"),
        },
        Op::Fail { recharge } => CreditCommand::FailRecharge {
            recharge_id: RECHARGE_IDS[recharge].to_owned(),
            reason: "card_declined".to_owned(),
        },
        Op::Cancel { recharge } => CreditCommand::CancelRecharge {
            recharge_id: RECHARGE_IDS[recharge].to_owned(),
        },
        Op::Dispute {
            recharge,
            dispute,
            percent,
            stage,
        } => CreditCommand::RecordDispute {
            recharge_id: RECHARGE_IDS[recharge].to_owned(),
            dispute_id: format!("dp_{dispute}"),
            amount_fen: i64::try_from(
                i128::from(requested_fen(recharge)) * i128::from(percent) / 100,
            )
            .unwrap_or(i64::MAX)
            .max(1),
            stage,
        },
        Op::Reverse { recharge, amount } => CreditCommand::RecordRefund {
            recharge_id: RECHARGE_IDS[recharge].to_owned(),
            refunded_fen: match amount {
                ReverseAmount::Percent(p) => {
                    // Above 100% of a huge amount: saturate, the ledger caps it anyway.
                    i64::try_from(i128::from(requested_fen(recharge)) * i128::from(p) / 100)
                        .unwrap_or(i64::MAX)
                }
                ReverseAmount::Raw(fen) => fen,
            },
            reference: "re_1".to_owned(),
        },
        Op::Deduct { task, credits } => CreditCommand::DeductForTask {
            task_id: TASK_IDS[task].to_owned(),
            credits,
            description: "Sora video".to_owned(),
            video: video(),
            callback_token_sha256: "cd".repeat(32),
        },
        Op::Submit { task } => CreditCommand::MarkTaskSubmitted {
            task_id: TASK_IDS[task].to_owned(),
            provider_task_id: format!("grsai-{task}"),
        },
        Op::Succeed { task } => CreditCommand::RecordVideoSuccess {
            task_id: TASK_IDS[task].to_owned(),
            video_url: "https://cdn.example/v.mp4".to_owned(),
            remove_watermark: None,
            pid: None,
        },
        Op::FailVideo { task } => CreditCommand::FailVideo {
            task_id: TASK_IDS[task].to_owned(),
            failure_reason: "timeout".to_owned(),
            error_message: "provider timed out".to_owned(),
        },
        Op::Adjust {
            adjustment,
            credits,
        } => CreditCommand::Adjust {
            adjustment_id: ADJUSTMENT_IDS[adjustment].to_owned(),
            credits,
            actor: "ops".to_owned(),
            reason: "correction".to_owned(),
        },
    }
}

/// Runs a future that never waits on anything outside itself (cqrs-es's `handle` here: the
/// event sink's lock is uncontended), without an async runtime.
fn run_ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("handle awaited something outside the aggregate"),
    }
}

/// Runs `command` through cqrs-es's `Aggregate::handle` on `account`, as the framework does.
fn handle(account: &mut CreditAccount, command: CreditCommand) -> Result<Vec<CreditEvent>, String> {
    let sink = EventSink::<CreditAccount>::default();
    match run_ready(account.handle(command, &(), &sink)) {
        Ok(()) => Ok(run_ready(sink.collect())),
        Err(e) => Err(e.to_string()),
    }
}

/// What the history so far says, kept independently of the aggregate's own state.
#[derive(Default)]
struct Model {
    reversed: bool,
    /// Credits each recharge was requested for.
    requested: BTreeMap<String, i64>,
    /// Amount and currency each recharge was requested for.
    requested_payment: BTreeMap<String, (i64, String)>,
    completed: BTreeSet<String>,
    /// Credits clawed back per recharge.
    clawed_back: BTreeMap<String, i64>,
    /// Credits charged per task.
    charged: BTreeMap<String, i64>,
    refunded: BTreeSet<String>,
    settled: BTreeSet<String>,
    adjustments: BTreeSet<String>,
}

fn check_sequence(ops: &[Op]) -> Result<(), TestCaseError> {
    let mut state = CreditAccount::default();
    let mut model = Model::default();
    let mut journal: Vec<CreditEvent> = Vec::new();

    for op in ops {
        let command = resolve(op, &state);
        let before = state.clone();
        let decided = state.decide(command.clone());

        // The framework's path gives the same answer and the same state.
        let mut via_handle = state.clone();
        let handled = handle(&mut via_handle, command.clone());
        match (&decided, &handled) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.clone()),
            _ => prop_assert!(false, "decide {:?} but handle {:?}", decided, handled),
        }

        let events = match decided {
            Err(error) => {
                // A refusal emits nothing and changes nothing.
                prop_assert_eq!(&state, &before);
                prop_assert_eq!(&via_handle, &before);
                check_not_wrongly_refused(&command, &before, &model, &error.to_string())?;
                continue;
            }
            Ok(events) => events,
        };
        prop_assert!(!events.is_empty(), "accepted {:?} with no event", command);
        if let CreditCommand::CompleteRecharge {
            recharge_id,
            amount_fen,
            currency,
            ..
        } = &command
        {
            let (requested_fen, requested_currency) = &model.requested_payment[recharge_id];
            prop_assert_eq!(amount_fen, requested_fen, "completed for another amount");
            prop_assert!(
                currency.eq_ignore_ascii_case(requested_currency),
                "completed in another currency"
            );
        }

        for event in events {
            let previous = state.balance();
            check_event_against_model(&event, previous, &mut model)?;
            state.apply_event(event.clone());
            match event.credit_delta() {
                Some(delta) => {
                    prop_assert_eq!(event.balance_after(), previous.checked_add(delta));
                    prop_assert_eq!(Some(state.balance()), event.balance_after());
                }
                None => {
                    prop_assert_eq!(event.balance_after(), None);
                    prop_assert_eq!(state.balance(), previous);
                }
            }
            if let CreditEvent::RechargeReinstated {
                recharge_id,
                credits,
                ..
            } = &event
            {
                prop_assert!(*credits > 0);
                let clawed = model.clawed_back.entry(recharge_id.clone()).or_default();
                *clawed -= credits;
                prop_assert!(*clawed >= 0, "reinstated more than was clawed back");
            }
            if matches!(event, CreditEvent::RechargeReversed { .. }) {
                model.reversed = true;
            }
            let takes_back = matches!(event, CreditEvent::CreditsDeducted { .. })
                || matches!(event, CreditEvent::CreditsAdjusted { credits, .. } if credits < 0);
            if takes_back {
                prop_assert!(
                    state.balance() >= 0,
                    "{:?} took the balance to {}",
                    event,
                    state.balance()
                );
            }
            prop_assert!(
                state.balance() >= 0 || model.reversed,
                "balance {} below zero with no reversal in the history",
                state.balance()
            );

            let json = serde_json::to_string(&event).unwrap();
            let back: CreditEvent = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(&back, &event);

            journal.push(event);
        }
        prop_assert_eq!(&via_handle, &state);
    }

    // Replaying the journal into a fresh account gives the same state.
    let mut replayed = CreditAccount::default();
    for event in journal.iter().cloned() {
        replayed.apply_event(event);
    }
    prop_assert_eq!(&replayed, &state);

    let sum: i64 = journal.iter().filter_map(CreditEvent::credit_delta).sum();
    prop_assert_eq!(sum, state.balance());

    // The state agrees with the model on what was completed, refunded and clawed back.
    for (id, clawed) in &model.clawed_back {
        let recharge = state.recharge(id).unwrap();
        prop_assert_eq!(recharge.reversed_credits, *clawed);
        prop_assert!(*clawed <= recharge.credits);
    }
    for id in RECHARGE_IDS {
        if let Some(recharge) = state.recharge(id) {
            let completed = matches!(
                recharge.status,
                RechargeStatus::Completed | RechargeStatus::Reversed
            );
            prop_assert_eq!(completed, model.completed.contains(id));
            // What the money says: a credited recharge has lost exactly the credits for
            // min(paid, refunded + disputed and not won).
            if completed {
                let held: i128 = recharge
                    .disputes
                    .values()
                    .filter(|d| {
                        matches!(
                            d.stage,
                            DisputeStage::Open | DisputeStage::FundsWithdrawn | DisputeStage::Lost
                        )
                    })
                    .map(|d| i128::from(d.amount_fen))
                    .sum();
                let taken =
                    (i128::from(recharge.refunded_fen) + held).min(i128::from(recharge.amount_fen));
                let expected =
                    i128::from(recharge.credits) * taken / i128::from(recharge.amount_fen);
                prop_assert_eq!(i128::from(recharge.reversed_credits), expected);
            }
        }
    }
    for id in TASK_IDS {
        let refunded = state.task(id).is_some_and(|t| t.refunded);
        prop_assert_eq!(refunded, model.refunded.contains(id));
    }
    Ok(())
}

/// Checks one accepted event against the history before it.
fn check_event_against_model(
    event: &CreditEvent,
    balance: i64,
    model: &mut Model,
) -> Result<(), TestCaseError> {
    match event {
        CreditEvent::RechargeRequested {
            recharge_id,
            amount_fen,
            currency,
            credits,
            credits_per_yuan,
            ..
        } => {
            model
                .requested_payment
                .insert(recharge_id.clone(), (*amount_fen, currency.clone()));
            prop_assert!(!model.requested.contains_key(recharge_id));
            prop_assert!(*amount_fen > 0 && *credits > 0);
            let expected = i128::from(*amount_fen) * i128::from(*credits_per_yuan) / 100;
            prop_assert_eq!(i128::from(*credits), expected);
            model.requested.insert(recharge_id.clone(), *credits);
        }
        CreditEvent::RechargeCompleted {
            recharge_id,
            credits,
            ..
        } => {
            prop_assert!(
                model.completed.insert(recharge_id.clone()),
                "recharge {} completed twice",
                recharge_id
            );
            prop_assert_eq!(model.requested.get(recharge_id), Some(credits));
        }
        CreditEvent::RechargeReversed {
            recharge_id,
            credits,
            ..
        } => {
            prop_assert!(model.completed.contains(recharge_id));
            prop_assert!(*credits > 0);
            let clawed = model.clawed_back.entry(recharge_id.clone()).or_default();
            *clawed += credits;
            prop_assert!(
                *clawed <= model.requested[recharge_id],
                "clawed back {} of {}",
                clawed,
                model.requested[recharge_id]
            );
        }
        CreditEvent::CreditsDeducted {
            task_id, credits, ..
        } => {
            prop_assert!(!model.charged.contains_key(task_id));
            prop_assert!(*credits > 0 && *credits <= balance);
            model.charged.insert(task_id.clone(), *credits);
        }
        CreditEvent::VideoTaskSubmitted { task_id, .. }
        | CreditEvent::VideoSucceeded { task_id, .. } => {
            prop_assert!(model.charged.contains_key(task_id));
            prop_assert!(!model.settled.contains(task_id));
            if matches!(event, CreditEvent::VideoSucceeded { .. }) {
                model.settled.insert(task_id.clone());
            }
        }
        CreditEvent::VideoFailed { task_id, .. } => {
            prop_assert!(model.charged.contains_key(task_id));
            prop_assert!(model.settled.insert(task_id.clone()));
        }
        CreditEvent::CreditsRefunded {
            task_id, credits, ..
        } => {
            prop_assert_eq!(
                model.charged.get(task_id),
                Some(credits),
                "refund of a task not charged that much"
            );
            prop_assert!(
                model.refunded.insert(task_id.clone()),
                "task {} refunded twice",
                task_id
            );
        }
        CreditEvent::CreditsAdjusted {
            adjustment_id,
            credits,
            ..
        } => {
            prop_assert!(*credits != 0);
            prop_assert!(model.adjustments.insert(adjustment_id.clone()));
        }
        CreditEvent::RechargeCheckoutCreated { recharge_id, .. }
        | CreditEvent::RechargeFailed { recharge_id, .. }
        | CreditEvent::RechargeCancelled { recharge_id } => {
            prop_assert!(model.requested.contains_key(recharge_id));
            prop_assert!(!model.completed.contains(recharge_id));
        }
        CreditEvent::RechargeReinstated { recharge_id, .. } => {
            prop_assert!(model.completed.contains(recharge_id));
        }
        CreditEvent::PaymentRefunded { recharge_id, .. }
        | CreditEvent::PaymentDisputed { recharge_id, .. } => {
            prop_assert!(model.requested.contains_key(recharge_id));
        }
        CreditEvent::VideoSubmissionUncertain { task_id, .. }
        | CreditEvent::VideoProgressed { task_id, .. }
        | CreditEvent::VideoDeliveredAfterRefund { task_id, .. } => {
            prop_assert!(model.charged.contains_key(task_id));
        }
    }
    Ok(())
}

/// Commands the ledger must accept: refusing them would lose money or block a user.
fn check_not_wrongly_refused(
    command: &CreditCommand,
    state: &CreditAccount,
    model: &Model,
    error: &str,
) -> Result<(), TestCaseError> {
    let must_accept = match command {
        CreditCommand::CompleteRecharge {
            recharge_id,
            amount_fen,
            currency,
            ..
        } => state.recharge(recharge_id).is_some_and(|r| {
            !model.completed.contains(recharge_id)
                && r.amount_fen == *amount_fen
                && r.currency.eq_ignore_ascii_case(currency)
                && state.balance().checked_add(r.credits).is_some()
        }),
        CreditCommand::DeductForTask {
            task_id, credits, ..
        } => !model.charged.contains_key(task_id) && *credits > 0 && *credits <= state.balance(),
        CreditCommand::FailVideo { task_id, .. } => state.task(task_id).is_some_and(|t| {
            !model.settled.contains(task_id) && state.balance().checked_add(t.credits).is_some()
        }),
        CreditCommand::Adjust {
            adjustment_id,
            credits,
            ..
        } => {
            !model.adjustments.contains(adjustment_id)
                && *credits > 0
                && state.balance().checked_add(*credits).is_some()
        }
        CreditCommand::RecordRefund {
            recharge_id,
            refunded_fen,
            ..
        } => state.recharge(recharge_id).is_some_and(|r| {
            *refunded_fen > 0
                && (*refunded_fen).min(r.amount_fen) > r.refunded_fen
                && state.balance().checked_sub(r.credits).is_some()
        }),
        CreditCommand::RecordDispute {
            recharge_id,
            dispute_id,
            stage,
            ..
        } => state.recharge(recharge_id).is_some_and(|r| {
            // A reinstatement near i64::MAX may overflow: a legitimate refusal.
            r.disputes
                .get(dispute_id)
                .is_none_or(|d| stage.rank() > d.stage.rank())
                && state.balance().checked_add(r.credits).is_some()
                && state.balance().checked_sub(r.credits).is_some()
        }),
        _ => false,
    };
    prop_assert!(!must_accept, "{:?} refused: {}", command, error);
    Ok(())
}

/// A paid recharge, partly spent, then wholly refunded: the account starts in debt, which
/// random sequences alone reach only rarely.
fn debt_prefix() -> impl Strategy<Value = Vec<Op>> {
    (1..=20_000i64)
        .prop_flat_map(|amount_fen| (Just(amount_fen), 1..=amount_fen))
        .prop_map(|(amount_fen, spent)| {
            vec![
                Op::Request {
                    recharge: 0,
                    amount_fen,
                    credits_per_yuan: 100,
                },
                Op::Complete {
                    recharge: 0,
                    amount_fen: None,
                    currency: "cny",
                },
                Op::Deduct {
                    task: 0,
                    credits: spent,
                },
                Op::Reverse {
                    recharge: 0,
                    amount: ReverseAmount::Percent(100),
                },
            ]
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_command_sequences_keep_the_ledger_consistent(
        ops in prop::collection::vec(op(), 1..80)
    ) {
        check_sequence(&ops)?;
    }

    #[test]
    fn random_commands_on_an_account_in_debt_keep_the_ledger_consistent(
        prefix in debt_prefix(),
        ops in prop::collection::vec(op(), 1..40)
    ) {
        let mut all = prefix;
        all.extend(ops);
        check_sequence(&all)?;
    }
}

/// The properties can fail: a journal whose deduction overdraws is caught by the same checks
/// the random sequences go through.
#[test]
fn an_overdrawing_deduction_would_be_caught() {
    let mut model = Model::default();
    let overdraw = CreditEvent::CreditsDeducted {
        task_id: "t1".to_owned(),
        credits: 10,
        description: "Sora video".to_owned(),
        video: video(),
        callback_token_sha256: "cd".repeat(32),
        balance_after: -10,
    };
    assert!(check_event_against_model(&overdraw, 0, &mut model).is_err());

    let mut model = Model::default();
    model.charged.insert("t1".to_owned(), 10);
    model.refunded.insert("t1".to_owned());
    let second_refund = CreditEvent::CreditsRefunded {
        task_id: "t1".to_owned(),
        credits: 10,
        balance_after: 20,
    };
    assert!(check_event_against_model(&second_refund, 10, &mut model).is_err());
}
