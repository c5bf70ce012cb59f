//! The Stripe delivery simulator on the aggregate: thousands of generated stories (paid or
//! not, asynchronously or not, partial refunds, disputes in every lifecycle), their events
//! delivered in any order, some twice, the unacknowledged ones again later; the final
//! balance must be what the money says, whatever the order. Same translation as the
//! webhook (`parse_event` → `ledger_action`), the same routing rule (a dispute is tied to
//! its recharge only once the payment is known; until then it is not acknowledged and
//! Stripe redelivers it).
#![allow(clippy::unwrap_used)]

use credit_domain::{CreditAccount, CreditCommand, CreditEvent, LedgerError};
use credit_stripe::{ledger_action, parse_event, EventData, LedgerAction};
use credit_testkit::stripe_story::{deliver_in_any_order, story, Story};
use proptest::prelude::*;

const USER: &str = "usr_sim";
const RECHARGE: &str = "rch_sim";

/// What the webhook would answer: `true` for 2xx.
fn deliver(
    account: &mut CreditAccount,
    journal: &mut Vec<CreditEvent>,
    body: &serde_json::Value,
) -> bool {
    let event = parse_event(&serde_json::to_vec(body).unwrap()).unwrap();
    // Routing, as the webhook does it: sessions and refunds carry our metadata; a dispute
    // names only the payment, known once the recharge completed.
    if let EventData::Dispute(dispute) = &event.data {
        let known = account
            .recharge(RECHARGE)
            .and_then(|r| r.payment_id.as_deref())
            == dispute.payment_intent.as_deref();
        if !known {
            return false;
        }
    }
    let command = match ledger_action(&event, RECHARGE.to_owned()) {
        LedgerAction::Command(command) => command,
        LedgerAction::AwaitingAsyncPayment | LedgerAction::Ignored => return true,
        LedgerAction::UnknownDisputeStatus => panic!("unknown status in {body}"),
    };
    match account.decide(command.clone()) {
        Ok(events) => {
            for e in events {
                account.apply_event(e.clone());
                journal.push(e);
            }
            true
        }
        Err(
            LedgerError::RechargeAlreadyCompleted { .. }
            | LedgerError::RechargeNotPending { .. }
            | LedgerError::AlreadyRecorded { .. },
        ) => true,
        Err(other) => panic!("{command:?} refused: {other}"),
    }
}

fn run(story: &Story, seed: u64) -> Result<(), TestCaseError> {
    let mut account = CreditAccount::default();
    let mut journal = Vec::new();
    let requested = account
        .decide(CreditCommand::RequestRecharge {
            recharge_id: RECHARGE.into(),
            amount_fen: story.amount_fen,
            currency: "cny".into(),
            credits_per_yuan: 100,
            provider: "stripe".into(),
        })
        .unwrap();
    for e in requested {
        account.apply_event(e.clone());
        journal.push(e);
    }
    let events = story.events(&seed.to_string(), RECHARGE, USER, "cs_sim", "pi_sim");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let account = std::cell::RefCell::new(account);
    let journal = std::cell::RefCell::new(journal);
    runtime.block_on(deliver_in_any_order(events, seed, |body| {
        let ok = deliver(&mut account.borrow_mut(), &mut journal.borrow_mut(), &body);
        async move { ok }
    }));
    let account = account.into_inner();
    let journal = journal.into_inner();

    prop_assert_eq!(
        account.balance(),
        story.expected_credits(100),
        "story {:?}",
        story
    );
    // The log alone proves the balance: every money event follows from the one before.
    let mut balance = 0i64;
    for e in &journal {
        if let Some(delta) = e.credit_delta() {
            balance += delta;
            prop_assert_eq!(e.balance_after(), Some(balance));
        }
    }
    prop_assert_eq!(balance, account.balance());
    let mut replayed = CreditAccount::default();
    for e in journal {
        replayed.apply_event(e);
    }
    prop_assert_eq!(replayed, account);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn any_delivery_order_gives_what_the_money_says(story in story(), seed in any::<u64>()) {
        run(&story, seed)?;
    }
}

/// The simulator can fail: the example, checked against the model directly.
#[test]
fn the_model_says_a_refund_then_a_lost_dispute_of_the_rest_leaves_nothing() {
    use credit_testkit::stripe_story::{Dispute, DisputeEnd, Payment};
    let story = Story {
        amount_fen: 10_000,
        payment: Payment::Paid,
        refunds: vec![6_000],
        dispute: Some(Dispute {
            amount_fen: 4_000,
            end: DisputeEnd::Lost,
        }),
    };
    assert_eq!(story.expected_credits(100), 0);
    for seed in 0..50 {
        run(&story, seed).unwrap();
    }
}
