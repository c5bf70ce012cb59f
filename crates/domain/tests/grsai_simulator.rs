//! The Grsai delivery simulator on the aggregate: tasks whose submission is accepted,
//! refused, or times out (taken or not), whose provider finishes them (or never does), with
//! callbacks (running, succeeded, failed) delivered late, twice or never, settlement polls,
//! and the settlement deadline, all interleaved at random. The commands are those the flows
//! send (`crates/http/src/flows/video.rs` and `settle.rs`). Every task must end charged or
//! refunded exactly once; a task the provider completed and told us about is never refunded
//! without its video on record; the log proves the balance.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use credit_domain::{
    CreditAccount, CreditCommand, CreditEvent, LedgerError, TaskStatus, VideoSpec,
};
use proptest::prelude::*;

const COST: i64 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Submit {
    Accepted,
    /// A clear refusal: refunded at once.
    Refused,
    /// The answer never came; the provider took the task anyway.
    TimedOutTaken,
    /// The answer never came; the provider never had it.
    TimedOutLost,
    /// The process stopped between the charge and the answer (nothing recorded).
    Crashed {
        taken: bool,
    },
}

impl Submit {
    fn taken(self) -> bool {
        matches!(
            self,
            Self::Accepted | Self::TimedOutTaken | Self::Crashed { taken: true }
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finish {
    Succeeded,
    Failed,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Grsai calls back with the task's current state (running, or its end once finished).
    Callback { task: usize, final_state: bool },
    /// The settlement job polls a task whose provider id it knows.
    Poll { task: usize },
    /// The settlement deadline passes for tasks without a provider id.
    Deadline { task: usize },
}

#[derive(Debug, Clone)]
struct TaskStory {
    submit: Submit,
    finish: Finish,
}

fn task_story() -> impl Strategy<Value = TaskStory> {
    let submit = prop_oneof![
        4 => Just(Submit::Accepted),
        2 => Just(Submit::Refused),
        2 => Just(Submit::TimedOutTaken),
        1 => Just(Submit::TimedOutLost),
        1 => any::<bool>().prop_map(|taken| Submit::Crashed { taken }),
    ];
    let finish = prop_oneof![
        3 => Just(Finish::Succeeded),
        2 => Just(Finish::Failed),
        1 => Just(Finish::Never),
    ];
    (submit, finish).prop_map(|(submit, finish)| TaskStory { submit, finish })
}

fn step(tasks: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..tasks, any::<bool>())
            .prop_map(|(task, final_state)| Step::Callback { task, final_state }),
        1 => (0..tasks).prop_map(|task| Step::Poll { task }),
        1 => (0..tasks).prop_map(|task| Step::Deadline { task }),
    ]
}

fn video() -> VideoSpec {
    VideoSpec {
        model: "sora-2".into(),
        prompt: "a fox".into(),
        aspect_ratio: "9:16".into(),
        duration: 10,
        size: "small".into(),
        reference_url: None,
    }
}

struct Sim {
    account: CreditAccount,
    journal: Vec<CreditEvent>,
}

impl Sim {
    /// Runs a command as the executor would: refused commands write nothing.
    fn run(&mut self, command: CreditCommand) -> Result<(), LedgerError> {
        let events = self.account.decide(command)?;
        for e in events {
            self.account.apply_event(e.clone());
            self.journal.push(e);
        }
        Ok(())
    }

    /// `flows::video::apply_result`: records the provider id if the task lacks one, then the
    /// result.
    fn apply_result(&mut self, task_id: &str, provider_id: &str, finish: Option<Finish>) {
        let task = self.account.task(task_id).unwrap().clone();
        if task.provider_task_id.is_none()
            && matches!(task.status, TaskStatus::Pending | TaskStatus::Uncertain)
        {
            let _ = self.run(CreditCommand::MarkTaskSubmitted {
                task_id: task_id.into(),
                provider_task_id: provider_id.into(),
            });
        }
        let command = match finish {
            Some(Finish::Succeeded) => CreditCommand::RecordVideoSuccess {
                task_id: task_id.into(),
                video_url: format!("https://cdn.example/{task_id}.mp4"),
                remove_watermark: Some(true),
                pid: None,
            },
            Some(Finish::Failed) => CreditCommand::FailVideo {
                task_id: task_id.into(),
                failure_reason: "output_moderation".into(),
                error_message: "blocked".into(),
            },
            // Running: progress only, no event.
            Some(Finish::Never) | None => return,
        };
        match self.run(command) {
            Ok(()) | Err(LedgerError::TaskAlreadySettled { .. }) => {}
            Err(other) => panic!("result refused: {other}"),
        }
    }
}

fn check(stories: &[TaskStory], steps: &[Step]) -> Result<(), TestCaseError> {
    let start = COST * stories.len() as i64;
    let mut sim = Sim {
        account: CreditAccount::default(),
        journal: Vec::new(),
    };
    sim.run(CreditCommand::Adjust {
        adjustment_id: "grant".into(),
        credits: start,
        actor: "sim".into(),
        reason: "start".into(),
    })
    .unwrap();
    let ids: Vec<String> = (0..stories.len()).map(|i| format!("t{i}")).collect();
    let provider_ids: Vec<String> = (0..stories.len()).map(|i| format!("grsai-{i}")).collect();
    // `flows::video::generate`: charge, call, record the answer.
    for (i, story) in stories.iter().enumerate() {
        sim.run(CreditCommand::DeductForTask {
            task_id: ids[i].clone(),
            credits: COST,
            description: "video".into(),
            video: video(),
            callback_token_sha256: "0".repeat(64),
        })
        .unwrap();
        let answer = match story.submit {
            Submit::Accepted => Some(CreditCommand::MarkTaskSubmitted {
                task_id: ids[i].clone(),
                provider_task_id: provider_ids[i].clone(),
            }),
            Submit::Refused => Some(CreditCommand::FailVideo {
                task_id: ids[i].clone(),
                failure_reason: "provider_error".into(),
                error_message: "refused".into(),
            }),
            Submit::TimedOutTaken | Submit::TimedOutLost => {
                Some(CreditCommand::MarkSubmissionUncertain {
                    task_id: ids[i].clone(),
                    error_message: "timed out".into(),
                })
            }
            Submit::Crashed { .. } => None,
        };
        if let Some(answer) = answer {
            sim.run(answer).unwrap();
        }
    }
    // Deliveries a taken task's provider made with its final state, for the checks below.
    let mut final_delivered = vec![false; stories.len()];
    for step in steps {
        match *step {
            Step::Callback { task, final_state } => {
                let story = &stories[task];
                if !story.submit.taken() {
                    continue; // nobody calls back for a task nobody has
                }
                let finish = final_state.then_some(story.finish);
                if final_state && story.finish != Finish::Never {
                    final_delivered[task] = true;
                }
                sim.apply_result(
                    &ids[task],
                    &provider_ids[task],
                    finish.or(Some(Finish::Never)),
                );
            }
            Step::Poll { task } => {
                let Some(t) = sim.account.task(&ids[task]) else {
                    continue;
                };
                if t.is_settled() || t.provider_task_id.is_none() {
                    continue;
                }
                let story = &stories[task];
                if story.finish != Finish::Never {
                    final_delivered[task] = true;
                }
                sim.apply_result(&ids[task], &provider_ids[task], Some(story.finish));
            }
            Step::Deadline { task } => {
                // `flows::settle::settle_task` past TASK_UNKNOWN_REFUND_AFTER.
                let t = sim.account.task(&ids[task]).unwrap();
                if !t.is_settled() && t.provider_task_id.is_none() {
                    sim.run(CreditCommand::FailVideo {
                        task_id: ids[task].clone(),
                        failure_reason: "submission_unknown".into(),
                        error_message: "deadline".into(),
                    })
                    .unwrap();
                }
            }
        }
    }

    // Each task is charged once and refunded at most once; the balance is what that says.
    let mut refunds: BTreeMap<&str, usize> = BTreeMap::new();
    let mut charges: BTreeMap<&str, usize> = BTreeMap::new();
    let mut videos: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &sim.journal {
        match e {
            CreditEvent::CreditsRefunded { task_id, .. } => {
                *refunds.entry(task_id).or_default() += 1
            }
            CreditEvent::CreditsDeducted { task_id, .. } => {
                *charges.entry(task_id).or_default() += 1
            }
            CreditEvent::VideoSucceeded { task_id, .. }
            | CreditEvent::VideoDeliveredAfterRefund { task_id, .. } => {
                *videos.entry(task_id).or_default() += 1
            }
            _ => {}
        }
    }
    let mut expected = start;
    for (i, story) in stories.iter().enumerate() {
        let id = ids[i].as_str();
        let refunded = refunds.get(id).copied().unwrap_or(0);
        prop_assert_eq!(charges.get(id).copied(), Some(1));
        prop_assert!(refunded <= 1, "task {} refunded {} times", id, refunded);
        expected -= COST;
        expected += COST * refunded as i64;
        if story.submit == Submit::Refused {
            prop_assert_eq!(refunded, 1, "a refused task is refunded at once");
        }
        // The provider completed it and told us: its video is on record, refunded or not.
        if final_delivered[i] && story.finish == Finish::Succeeded {
            prop_assert_eq!(videos.get(id).copied(), Some(1), "task {} video lost", id);
        }
        if final_delivered[i] && story.finish == Finish::Failed {
            prop_assert_eq!(refunded, 1, "a failed task is refunded");
        }
        // A task the provider accepted and finished successfully, told us before any
        // deadline could touch it (it has a provider id), is never refunded.
        if story.submit == Submit::Accepted
            && story.finish == Finish::Succeeded
            && final_delivered[i]
        {
            prop_assert_eq!(refunded, 0, "an accepted, succeeded task was refunded");
        }
        let task = sim.account.task(id).unwrap();
        prop_assert_eq!(task.refunded, refunded == 1);
    }
    prop_assert_eq!(sim.account.balance(), expected);
    prop_assert!(sim.account.balance() >= 0);
    let mut balance = 0;
    for e in &sim.journal {
        if let Some(delta) = e.credit_delta() {
            balance += delta;
            prop_assert_eq!(e.balance_after(), Some(balance));
        }
    }
    let mut replayed = CreditAccount::default();
    for e in sim.journal.clone() {
        replayed.apply_event(e);
    }
    prop_assert_eq!(replayed, sim.account);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn any_interleaving_settles_each_task_exactly_once(
        (stories, steps) in prop::collection::vec(task_story(), 1..6)
            .prop_flat_map(|stories| {
                let n = stories.len();
                (Just(stories), prop::collection::vec(step(n), 0..30))
            })
    ) {
        check(&stories, &steps)?;
    }
}
