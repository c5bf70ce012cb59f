//! Writing large, valid journals fast: events are decided by the real domain in memory (so
//! payloads and balances are exactly what the service would write), then inserted with
//! big multi-row `INSERT`s that go through the journal's trigger (so the hash chain and the
//! outbox rows are the real ones).

use std::collections::VecDeque;

use anyhow::Context;
use credit_domain::{CreditAccount, CreditCommand, CreditEvent, VideoSpec};
use tokio_postgres::Client;

/// Rows per `INSERT` statement.
const CHUNK: usize = 5_000;

/// One account's history being written in memory.
pub struct Account {
    pub id: String,
    state: CreditAccount,
    sequence: i64,
}

impl Account {
    pub fn new(id: String) -> Self {
        Self {
            id,
            state: CreditAccount::default(),
            sequence: 0,
        }
    }

    /// The account's last sequence.
    pub fn sequence(&self) -> i64 {
        self.sequence
    }

    /// The account's state after the events decided so far.
    pub fn state(&self) -> &CreditAccount {
        &self.state
    }

    /// Decides `command` and returns its events with their sequences.
    pub fn decide(&mut self, command: CreditCommand) -> anyhow::Result<Vec<(i64, CreditEvent)>> {
        let events = self
            .state
            .decide(command)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.id))?;
        Ok(events
            .into_iter()
            .map(|e| {
                self.state.apply_event(e.clone());
                self.sequence += 1;
                (self.sequence, e)
            })
            .collect())
    }
}

pub fn recharge(recharge_id: &str, amount_fen: i64) -> [CreditCommand; 2] {
    [
        CreditCommand::RequestRecharge {
            recharge_id: recharge_id.to_owned(),
            amount_fen,
            currency: "cny".into(),
            credits_per_yuan: 100,
            provider: "demo".into(),
        },
        CreditCommand::CompleteRecharge {
            recharge_id: recharge_id.to_owned(),
            amount_fen,
            currency: "cny".into(),
            payment_id: format!("pi_{recharge_id}"),
        },
    ]
}

pub fn deduct(task_id: String) -> CreditCommand {
    CreditCommand::DeductForTask {
        task_id,
        credits: 10,
        description: "Sora 2 video".into(),
        video: VideoSpec {
            model: "sora-2".into(),
            prompt: "a cat surfing a wave at sunset, cinematic".into(),
            aspect_ratio: "9:16".into(),
            duration: 10,
            size: "small".into(),
            reference_url: None,
        },
        callback_token_sha256: "ab".repeat(32),
    }
}

/// Events waiting to be inserted, in the order they get their global positions.
#[derive(Default)]
pub struct Batch {
    accounts: Vec<String>,
    sequences: Vec<i64>,
    types: Vec<String>,
    payloads: Vec<String>,
}

impl Batch {
    pub fn push(
        &mut self,
        account: &str,
        sequence: i64,
        event: &CreditEvent,
    ) -> anyhow::Result<()> {
        self.accounts.push(account.to_owned());
        self.sequences.push(sequence);
        self.types.push(event.name().to_owned());
        self.payloads.push(serde_json::to_string(event)?);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.accounts.len()
    }

    /// Inserts everything pushed so far, in order, and empties the batch.
    pub async fn flush(&mut self, client: &Client) -> anyhow::Result<()> {
        let stmt = client
            .prepare(
                "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                     event_version, payload, metadata)
                 SELECT 'CreditAccount', a, s, t, '1.0', p::jsonb::json, '{}'::jsonb::json
                   FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[])
                        WITH ORDINALITY AS x(a, s, t, p, n)
                  ORDER BY n",
            )
            .await?;
        for start in (0..self.len()).step_by(CHUNK) {
            let end = (start + CHUNK).min(self.len());
            client
                .execute(
                    &stmt,
                    &[
                        &&self.accounts[start..end],
                        &&self.sequences[start..end],
                        &&self.types[start..end],
                        &&self.payloads[start..end],
                    ],
                )
                .await
                .context("bulk insert into events")?;
        }
        *self = Self::default();
        Ok(())
    }
}

/// Funds each account with one completed recharge of `credits`.
pub async fn fund(client: &Client, ids: &[String], credits: i64) -> anyhow::Result<()> {
    let mut batch = Batch::default();
    for id in ids {
        let mut account = Account::new(id.clone());
        for command in recharge(&format!("{id}-fund"), credits) {
            for (seq, event) in account.decide(command)? {
                batch.push(id, seq, &event)?;
            }
        }
    }
    batch.flush(client).await
}

/// The id of the `i`-th account of a journal written by `build`.
pub fn account_id(i: usize) -> String {
    format!("audit-{i:06}")
}

/// Writes a journal of about `total` events over `accounts` accounts, interleaved across
/// accounts like real traffic: a recharge each, then video tasks (a third fail and are
/// refunded, a third succeed, a third stay submitted). Returns the events written.
/// With fewer than 3 events per account, each account opens with an admin grant (one
/// event) instead of a recharge (two), so every account has credits to spend.
pub async fn build(client: &Client, accounts: usize, total: usize) -> anyhow::Result<u64> {
    let mut books: Vec<Account> = (0..accounts).map(|i| Account::new(account_id(i))).collect();
    let per_account = total.div_ceil(accounts);
    let mut queues: Vec<VecDeque<(i64, CreditEvent)>> = vec![VecDeque::new(); accounts];
    let mut written = 0u64;
    let mut next_task = vec![0usize; accounts];
    // Round by round: each round appends the next event of every account.
    for _round in 0..per_account {
        let mut batch = Batch::default();
        for (i, account) in books.iter_mut().enumerate() {
            let queue = &mut queues[i];
            if queue.is_empty() {
                for command in next_commands(account, &mut next_task[i], per_account) {
                    queue.extend(account.decide(command)?);
                }
            }
            if let Some((seq, event)) = queue.pop_front() {
                batch.push(&account.id, seq, &event)?;
            }
        }
        written += batch.len() as u64;
        batch.flush(client).await?;
        if written as usize >= total {
            break;
        }
    }
    Ok(written)
}

/// The next commands of an account's synthetic history.
fn next_commands(
    account: &Account,
    next_task: &mut usize,
    per_account: usize,
) -> Vec<CreditCommand> {
    if account.sequence == 0 {
        // Enough credit for every task of the history, and for a few more.
        let credits = 10 * per_account as i64 + 100;
        if per_account < 3 {
            return vec![CreditCommand::Adjust {
                adjustment_id: format!("{}-grant", account.id),
                credits,
                actor: "bench".into(),
                reason: "opening balance".into(),
            }];
        }
        return recharge(&format!("{}-r1", account.id), credits).to_vec();
    }
    let t = *next_task;
    *next_task += 1;
    let task = format!("{}-t{t}", account.id);
    let submitted = CreditCommand::MarkTaskSubmitted {
        task_id: task.clone(),
        provider_task_id: format!("prov-{task}"),
    };
    match t % 3 {
        0 => vec![
            deduct(task.clone()),
            CreditCommand::FailVideo {
                task_id: task,
                failure_reason: "error".into(),
                error_message: "content policy".into(),
            },
        ],
        1 => vec![
            deduct(task.clone()),
            submitted,
            CreditCommand::RecordVideoSuccess {
                video_url: format!("https://cdn.example/{task}.mp4"),
                task_id: task,
                remove_watermark: Some(true),
                pid: None,
            },
        ],
        _ => vec![deduct(task), submitted],
    }
}
