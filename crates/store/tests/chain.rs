//! The hash chain, linked by the executor and checked by the journal
//! (migrations/0012_chain_linked_by_the_appender.sql): every stored link is the one the
//! journal's own formula gives, whoever wrote the event and however the account's last hash
//! was learnt; an insert with a wrong link or date is refused and writes nothing.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use credit_store::chain::Link;
use credit_store::executor::SNAPSHOT_EVERY;
use credit_store::Ledger;
use tokio_postgres::error::SqlState;

/// Events whose stored hash differs from the one `event_canonical` and the previous event's
/// stored hash give (the row trigger's formula, migration 0001).
async fn mislinked(client: &tokio_postgres::Client) -> i64 {
    count(
        client,
        "SELECT count(*) FROM events e
          WHERE e.hash <> sha256(coalesce((SELECT p.hash FROM events p
                                            WHERE p.aggregate_type = e.aggregate_type
                                              AND p.aggregate_id = e.aggregate_id
                                              AND p.sequence = e.sequence - 1), '\\x'::bytea)
                                 || convert_to(event_canonical(e), 'UTF8'))",
    )
    .await
}

#[tokio::test]
async fn every_link_is_the_journals_whoever_appended_and_however_the_head_was_learnt() {
    let env = env().await;
    // Concurrent batches over several accounts, several events per account and batch.
    populate(&env, 4, 6).await;
    // An account long enough to have a snapshot, so that a restarted executor learns its
    // last hash from the snapshot's row.
    let long = user("user-long");
    env.recharge(&long, "r-long", 100_000).await;
    for i in 0..SNAPSHOT_EVERY {
        env.run(&long, deduct(&format!("long-{i}"))).await.unwrap();
    }
    let client = env.test.client().await;
    assert!(
        count(
            &client,
            "SELECT count(*) FROM snapshots WHERE aggregate_id = 'user-long'"
        )
        .await
            > 0
    );

    // Another writer, giving no hash: the journal links it.
    let by_hand = user("user-sql");
    env.recharge(&by_hand, "r-sql", 1_000).await;
    client
        .execute(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                 event_version, payload, metadata)
             VALUES ('CreditAccount', 'user-sql', 3, 'CreditsAdjusted', '1.0', $1::text::json, '{}')",
            &[&adjustment("sql-1", 1_005)],
        )
        .await
        .unwrap();

    // The service restarted: a new executor learns every head from the journal (from the
    // snapshot's row, from the last event, or from the event the other writer added, which
    // the first executor's cached state does not know).
    let restarted = Ledger::new(env.test.db.write.clone());
    for id in ["user-000", "user-001", "user-long", "user-sql"] {
        restarted
            .execute(
                &user(id),
                deduct(&format!("{id}-after")),
                Default::default(),
            )
            .await
            .unwrap();
    }
    // The first executor's states of these accounts are behind the journal: their appends
    // conflict, and they are decided again on the states loaded afresh.
    for id in ["user-000", "user-sql"] {
        env.run(&user(id), deduct(&format!("{id}-stale")))
            .await
            .unwrap();
    }

    assert_eq!(mislinked(&client).await, 0);
    env.projector.drain().await.unwrap();
    let report = env.audit().await;
    assert!(report.ok, "{:#?}", report.discrepancies);
}

/// Two executors (two processes) racing on the same few accounts, in orders drawn at random:
/// one-event and two-event commands (a charge; a failure and its refund), each account's
/// commands sent to either executor. Every lost race is a conflict decided again on the
/// state loaded afresh, with the head loaded with it: no append is refused for its links,
/// every stored link is the journal's formula, and the audit is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_executors_link_every_event_whatever_the_order() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let env = env().await;
    let other = std::sync::Arc::new(Ledger::new(env.test.db.write.clone()));
    let accounts: Vec<_> = (0..3).map(|i| user(&format!("racer-{i}"))).collect();
    for (i, account) in accounts.iter().enumerate() {
        env.recharge(account, &format!("r{i}"), 10_000).await;
    }
    let mut jobs = Vec::new();
    for t in 0..60 {
        let account = accounts[rng.gen_range(0..accounts.len())].clone();
        let ledger = if rng.gen_bool(0.5) {
            env.ledger.clone()
        } else {
            other.clone()
        };
        let fails = rng.gen_bool(0.4);
        let pause = std::time::Duration::from_micros(rng.gen_range(0..3_000));
        jobs.push(tokio::spawn(async move {
            tokio::time::sleep(pause).await;
            let task = format!("{account}-t{t}");
            let run = |command| ledger.execute(&account, command, Default::default());
            run(deduct(&task)).await?;
            if fails {
                run(fail(&task)).await?;
            }
            Ok::<_, credit_store::ExecuteError>(())
        }));
    }
    for job in jobs {
        job.await
            .unwrap()
            .unwrap_or_else(|e| panic!("seed {seed}: {e:?}"));
    }
    let client = env.test.client().await;
    assert_eq!(mislinked(&client).await, 0, "seed {seed}");
    env.projector.drain().await.unwrap();
    let report = env.audit().await;
    assert!(report.ok, "seed {seed}: {:#?}", report.discrepancies);
}

#[tokio::test]
async fn an_insert_with_a_wrong_link_or_date_is_refused_and_writes_nothing() {
    let env = env().await;
    let alice = user("user-1");
    env.recharge(&alice, "r1", 1_000).await;
    let client = env.test.client().await;
    let (sequence, prev): (i64, Vec<u8>) = {
        let row = client
            .query_one(
                "SELECT sequence, hash FROM events WHERE aggregate_id = 'user-1'
                  ORDER BY sequence DESC LIMIT 1",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    let payload = adjustment("a1", 1_005);
    let next = sequence + 1;
    let link = Link {
        aggregate_type: b"CreditAccount",
        account: b"user-1",
        sequence: next,
        event_type: b"CreditsAdjusted",
        event_version: b"1.0",
        payload: payload.as_bytes(),
        metadata: b"{}",
    };
    let right = link.hash(&prev).to_vec();
    let wrong = link.hash(b"not the previous hash").to_vec();
    let insert = |hash: Vec<u8>, recorded_at: &'static str| {
        let (client, payload) = (&client, payload.as_str());
        async move {
            client
                .execute(
                    &format!(
                        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type,
                                             event_version, payload, metadata, hash, recorded_at)
                         VALUES ('CreditAccount', 'user-1', $1, 'CreditsAdjusted', '1.0',
                                 $2::text::json, '{{}}', $3, {recorded_at})"
                    ),
                    &[&next, &payload, &hash],
                )
                .await
        }
    };
    let before = dump_journal(&client).await;
    for (hash, recorded_at) in [
        (wrong.clone(), "clock_timestamp()"),
        (right.clone(), "clock_timestamp() - interval '1 hour'"),
        (right.clone(), "clock_timestamp() + interval '1 hour'"),
    ] {
        let err = insert(hash, recorded_at).await.unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::CHECK_VIOLATION), "{err:?}");
    }
    assert_eq!(
        dump_journal(&client).await,
        before,
        "a refused insert wrote something"
    );

    insert(right, "clock_timestamp()").await.unwrap();
    assert_eq!(
        count(&client, "SELECT count(*) FROM projection_outbox").await,
        count(&client, "SELECT count(*) FROM events").await
    );
    assert_eq!(mislinked(&client).await, 0);
    env.projector.drain().await.unwrap();
    let report = env.audit().await;
    assert!(report.ok, "{:#?}", report.discrepancies);
}

/// A `CreditsAdjusted` of 5 credits, as the executor would store it.
fn adjustment(adjustment_id: &str, balance_after: i64) -> String {
    serde_json::to_string(&credit_domain::CreditEvent::CreditsAdjusted {
        adjustment_id: adjustment_id.to_owned(),
        credits: 5,
        actor: "ops".to_owned(),
        reason: "by hand".to_owned(),
        balance_after,
    })
    .unwrap()
}

/// The journal and the outbox, row by row.
async fn dump_journal(client: &tokio_postgres::Client) -> (i64, i64, i64) {
    (
        count(client, "SELECT count(*) FROM events").await,
        count(client, "SELECT coalesce(max(position), 0) FROM events").await,
        count(client, "SELECT count(*) FROM projection_outbox").await,
    )
}
