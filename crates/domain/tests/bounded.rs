//! The account's state does not grow with its history: open tasks, a window of recently
//! settled tasks and of recent adjustments, every recharge. Its snapshot at 100,000 tasks is
//! under 16 KB (the size is deterministic, so it is asserted exactly), and the windows are
//! part of the state, so a snapshot taken anywhere and then replayed equals the replay.
#![allow(clippy::unwrap_used)]

use credit_domain::{
    CreditAccount, CreditCommand, CreditEvent, LedgerError, TaskStatus, VideoSpec,
    RECENT_ADJUSTMENTS, RECENT_SETTLED_TASKS,
};

fn task_id(n: usize) -> String {
    format!("vid_{n:032x}")
}

fn video() -> VideoSpec {
    VideoSpec {
        model: "sora-2".to_owned(),
        prompt: "a red fox running through snow".to_owned(),
        aspect_ratio: "16:9".to_owned(),
        duration: 10,
        size: "small".to_owned(),
        reference_url: None,
    }
}

fn run(account: &mut CreditAccount, command: CreditCommand) -> Vec<CreditEvent> {
    let events = account.decide(command).unwrap();
    for event in &events {
        account.apply_event(event.clone());
    }
    events
}

fn fund(account: &mut CreditAccount, credits_fen: i64) -> Vec<CreditEvent> {
    let mut events = run(
        account,
        CreditCommand::RequestRecharge {
            recharge_id: "rch_00000000000000000000000000000001".to_owned(),
            amount_fen: credits_fen,
            currency: "cny".to_owned(),
            credits_per_yuan: 100,
            provider: "stripe".to_owned(),
        },
    );
    events.extend(run(
        account,
        CreditCommand::CompleteRecharge {
            recharge_id: "rch_00000000000000000000000000000001".to_owned(),
            amount_fen: credits_fen,
            currency: "cny".to_owned(),
            payment_id: "pi_3PZr7mK2eZvKYlo2C0xXyWzq".to_owned(),
        },
    ));
    events
}

/// Task `n`'s whole life: charged, submitted, then succeeded (or, every third, failed and
/// refunded).
fn task_life(account: &mut CreditAccount, n: usize) -> Vec<CreditEvent> {
    let id = task_id(n);
    let mut events = run(
        account,
        CreditCommand::DeductForTask {
            task_id: id.clone(),
            credits: 10,
            description: "Sora 2 video (10s, 16:9)".to_owned(),
            video: video(),
            callback_token_sha256: format!("{:064x}", n),
        },
    );
    events.extend(run(
        account,
        CreditCommand::MarkTaskSubmitted {
            task_id: id.clone(),
            provider_task_id: format!("sim-{n:036}"),
        },
    ));
    let end = if n.is_multiple_of(3) {
        CreditCommand::FailVideo {
            task_id: id,
            failure_reason: "input_moderation".to_owned(),
            error_message: String::new(),
        }
    } else {
        CreditCommand::RecordVideoSuccess {
            task_id: id,
            video_url: format!("https://cdn.example.com/v/{n}.mp4"),
            remove_watermark: Some(true),
            pid: None,
        }
    };
    events.extend(run(account, end));
    events
}

fn adjust(account: &mut CreditAccount, n: usize) -> Vec<CreditEvent> {
    run(
        account,
        CreditCommand::Adjust {
            adjustment_id: format!("adj_{n:032x}"),
            credits: 1,
            actor: "admin".to_owned(),
            reason: "goodwill".to_owned(),
        },
    )
}

#[test]
fn a_snapshot_at_100000_settled_tasks_is_under_16_kb() {
    let mut account = CreditAccount::default();
    fund(&mut account, 100_000_000);
    for n in 0..100_000 {
        task_life(&mut account, n);
    }
    for n in 0..1_000 {
        adjust(&mut account, n);
    }
    let snapshot = serde_json::to_vec(&account).unwrap();
    assert!(snapshot.len() < 16 * 1024, "{} bytes", snapshot.len());
    // Deterministic: a change of what the account keeps shows here first.
    assert_eq!(snapshot.len(), 13_691);
    assert_eq!(
        account.balance(),
        100_000_000 - 100_000 * 10 + 33_334 * 10 + 1_000
    );
    // It reads back as the same account.
    let back: CreditAccount = serde_json::from_slice(&snapshot).unwrap();
    assert_eq!(back, account);
}

#[test]
fn settled_tasks_beyond_the_window_are_forgotten_open_ones_never() {
    let mut account = CreditAccount::default();
    fund(&mut account, 1_000_000);
    // Open tasks first: they stay however many tasks settle after them.
    for n in 0..5 {
        run(
            &mut account,
            CreditCommand::DeductForTask {
                task_id: format!("open_{n}"),
                credits: 10,
                description: "d".to_owned(),
                video: video(),
                callback_token_sha256: "00".to_owned(),
            },
        );
    }
    let settled = RECENT_SETTLED_TASKS * 3;
    for n in 0..settled {
        task_life(&mut account, n);
    }
    assert_eq!(account.open_tasks().count(), 5);
    for n in 0..5 {
        assert!(account.task(&format!("open_{n}")).is_some());
    }
    // The most recent window of settled tasks is kept, older ones are not.
    for n in 0..settled {
        let kept = account.task(&task_id(n)).is_some();
        assert_eq!(kept, n >= settled - RECENT_SETTLED_TASKS, "task {n}");
    }
    let last = account.task(&task_id(settled - 1)).unwrap();
    assert!(matches!(
        last.status,
        TaskStatus::Succeeded | TaskStatus::Failed
    ));

    // A command about a forgotten task is refused with no money effect; the executor turns
    // `UnknownTask` into `TaskAlreadySettled` when the journal shows the charge.
    let balance = account.balance();
    let refused = account.decide(CreditCommand::FailVideo {
        task_id: task_id(0),
        failure_reason: "late".to_owned(),
        error_message: String::new(),
    });
    assert_eq!(
        refused,
        Err(LedgerError::UnknownTask {
            task_id: task_id(0)
        })
    );
    assert_eq!(account.balance(), balance);

    // A recent one is still refused by the account itself.
    let recent = task_id(settled - 1);
    let again = account.decide(CreditCommand::DeductForTask {
        task_id: recent.clone(),
        credits: 10,
        description: "d".to_owned(),
        video: video(),
        callback_token_sha256: "00".to_owned(),
    });
    assert_eq!(
        again,
        Err(LedgerError::TaskAlreadyCharged { task_id: recent })
    );
}

#[test]
fn recent_adjustments_are_kept_with_their_fingerprint() {
    let mut account = CreditAccount::default();
    let total = RECENT_ADJUSTMENTS + 10;
    for n in 0..total {
        adjust(&mut account, n);
    }
    let fingerprint = credit_domain::adjustment_fingerprint(1, "goodwill");
    for n in 0..total {
        let kept = account.adjustment(&format!("adj_{n:032x}"));
        if n >= total - RECENT_ADJUSTMENTS {
            assert_eq!(kept, Some(fingerprint.as_str()), "adjustment {n}");
        } else {
            assert_eq!(kept, None, "adjustment {n}");
        }
    }
    let again = account.decide(CreditCommand::Adjust {
        adjustment_id: format!("adj_{:032x}", total - 1),
        credits: 1,
        actor: "admin".to_owned(),
        reason: "goodwill".to_owned(),
    });
    assert!(matches!(again, Err(LedgerError::AdjustmentExists { .. })));
}

#[test]
fn a_snapshot_taken_anywhere_then_replayed_equals_the_replay() {
    let mut events = Vec::new();
    let mut account = CreditAccount::default();
    events.extend(fund(&mut account, 1_000_000));
    for n in 0..(RECENT_SETTLED_TASKS * 2 + 7) {
        events.extend(task_life(&mut account, n));
        if n.is_multiple_of(5) {
            events.extend(adjust(&mut account, n));
        }
    }
    let mut replayed = CreditAccount::default();
    for event in &events {
        replayed.apply_event(event.clone());
    }
    assert_eq!(replayed, account);
    for cut in (0..events.len()).step_by(37) {
        let mut head = CreditAccount::default();
        for event in &events[..cut] {
            head.apply_event(event.clone());
        }
        let mut resumed: CreditAccount =
            serde_json::from_str(&serde_json::to_string(&head).unwrap()).unwrap();
        for event in &events[cut..] {
            resumed.apply_event(event.clone());
        }
        assert_eq!(resumed, account, "snapshot after {cut} events");
    }
}

#[test]
fn a_snapshot_in_the_shape_written_before_the_windows_does_not_read_as_an_account() {
    // The store then rebuilds the account from its journal (crates/store/tests/bounded.rs).
    let old = r#"{"balance": 90, "recharges": {}, "tasks": {"t1": {"credits": 10,
        "status": "succeeded", "refunded": false, "provider_task_id": "p1",
        "callback_token_sha256": "00", "spec_sha256": null, "delivered_after_refund": false,
        "progress": 0}}, "adjustments": ["a1"], "adjustment_fingerprints": {"a1": "ff"}}"#;
    assert!(serde_json::from_str::<CreditAccount>(old).is_err());
}
