//! The built `credit-ledger` binary against a fresh database: exit codes and output.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::process::Output;

use credit_domain::{CreditCommand, UserId, VideoSpec};
use credit_store::{Ledger, Projector};
use credit_testkit::db::TestDb;

const BIN: &str = env!("CARGO_BIN_EXE_credit-ledger");

async fn credit_ledger(db_url: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", db_url)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// alice: recharged 500, two videos (one failed and refunded). bob: recharged 100.
async fn ledger_with_history() -> TestDb {
    let db = TestDb::new().await;
    let ledger = Ledger::new(db.db.write.clone());
    let run = |account: &'static str, cmd: CreditCommand| {
        let ledger = &ledger;
        async move {
            ledger
                .execute(&UserId::parse(account).unwrap(), cmd, HashMap::new())
                .await
                .unwrap()
        }
    };
    for (account, fen) in [("alice", 500), ("bob", 100)] {
        let id = format!("{account}-r1");
        run(
            account,
            CreditCommand::RequestRecharge {
                recharge_id: id.clone(),
                amount_fen: fen,
                currency: "cny".into(),
                credits_per_yuan: 100,
                provider: "demo".into(),
            },
        )
        .await;
        run(
            account,
            CreditCommand::CompleteRecharge {
                recharge_id: id,
                amount_fen: fen,
                currency: "cny".into(),
                payment_id: format!("pi_{account}"),
            },
        )
        .await;
    }
    for task in ["t1", "t2"] {
        run("alice", deduct(task)).await;
    }
    run(
        "alice",
        CreditCommand::FailVideo {
            task_id: "t2".into(),
            failure_reason: "error".into(),
            error_message: "boom".into(),
        },
    )
    .await;
    let projector = Projector::new(db.db.read.clone(), ledger.appended());
    projector.drain().await.unwrap();
    db
}

fn deduct(task_id: &str) -> CreditCommand {
    CreditCommand::DeductForTask {
        task_id: task_id.into(),
        credits: 10,
        description: "Sora 2 video".into(),
        video: VideoSpec {
            model: "sora-2".into(),
            prompt: "a cat surfing".into(),
            aspect_ratio: "9:16".into(),
            duration: 10,
            size: "small".into(),
            reference_url: None,
        },
        callback_token_sha256: "00".repeat(32),
    }
}

#[tokio::test]
async fn audit_exits_zero_on_a_clean_database_and_one_after_tampering() {
    let db = ledger_with_history().await;
    let out = credit_ledger(&db.url, &["audit"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains("events checked     8"), "{text}");
    assert!(text.contains("result             OK"), "{text}");
    assert!(
        text.contains("recharged 600 - spent 20 + refunded 10 + granted 0 - reversed 0 = 590"),
        "{text}"
    );

    let client = db.client().await;
    client
        .batch_execute(
            "UPDATE users SET credits = 1000000 WHERE id = 'bob';
             DELETE FROM consumption_records WHERE id = 't1';",
        )
        .await
        .unwrap();
    let out = credit_ledger(&db.url, &["audit"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains("FAILED: 2 discrepancies"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("projected_balance_mismatch account=bob sequence=2: ")),
        "{text}"
    );
    let t1: i64 = client
        .query_one(
            "SELECT position FROM events WHERE payload->'CreditsDeducted'->>'task_id' = 't1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        text.lines().any(|l| l.starts_with(&format!(
            "missing_record account=alice position={t1}: consumption_records row t1"
        ))),
        "{text}"
    );

    let out = credit_ledger(&db.url, &["audit", "--json"]).await;
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["ok"], false);
    assert_eq!(json["events_checked"], 8);
    assert_eq!(json["discrepancies"].as_array().unwrap().len(), 2);
    assert!(json["events_per_second"].as_f64().unwrap() > 0.0);
}

#[tokio::test]
async fn audit_balance_prints_the_balance_at_an_instant() {
    let db = ledger_with_history().await;
    let client = db.client().await;
    // Right after alice's first deduction (sequence 3): 500 - 10.
    let at: chrono::DateTime<chrono::Utc> = client
        .query_one(
            "SELECT recorded_at FROM events WHERE aggregate_id = 'alice' AND sequence = 3",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let at = at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let out = credit_ledger(
        &db.url,
        &["audit", "balance", "--user", "alice", "--at", &at],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!("balance of alice at {at}: 490 credits (3 events)")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("CreditsDeducted") && l.contains("-10") && l.contains("490")),
        "{text}"
    );

    let out = credit_ledger(
        &db.url,
        &[
            "audit",
            "balance",
            "--user",
            "alice",
            "--at",
            "2999-01-01T00:00:00Z",
            "--json",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["credits"], 490);
    assert_eq!(json["events"].as_array().unwrap().len(), 6);

    let out = credit_ledger(
        &db.url,
        &[
            "audit",
            "balance",
            "--user",
            "alice",
            "--at",
            "last tuesday",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "a bad instant is a usage error");
}

#[tokio::test]
async fn projections_rebuild_repairs_the_read_tables() {
    let db = ledger_with_history().await;
    let client = db.client().await;
    client
        .batch_execute(
            "UPDATE users SET credits = 0;
             DELETE FROM recharge_records;",
        )
        .await
        .unwrap();
    assert_eq!(
        credit_ledger(&db.url, &["audit"]).await.status.code(),
        Some(1)
    );
    let out = credit_ledger(&db.url, &["projections", "rebuild"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out).starts_with("projections rebuilt: 8 events applied"),
        "{}",
        stdout(&out)
    );
    let out = credit_ledger(&db.url, &["audit"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let credits: i64 = client
        .query_one("SELECT credits FROM users WHERE id = 'alice'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(credits, 490);
}

#[tokio::test]
async fn migrate_creates_the_database_and_is_idempotent() {
    let server = credit_testkit::db::server_url();
    let (server, _) = server.rsplit_once('/').unwrap();
    let name = format!("credit_ledger_cli_{}", std::process::id());
    let url = format!("{server}/{name}");
    let first = credit_ledger(&url, &["migrate"]).await;
    let second = credit_ledger(&url, &["migrate"]).await;
    let audit = credit_ledger(&url, &["audit"]).await;
    credit_store::db::drop_database(&url).await.unwrap();
    assert_eq!(first.status.code(), Some(0));
    let all = credit_store::db::MIGRATIONS;
    let applied: String = all.iter().map(|(v, _)| format!("applied {v}\n")).collect();
    assert_eq!(
        stdout(&first),
        format!("{applied}migrations: {} applied now\n", all.len())
    );
    assert_eq!(
        stdout(&second),
        format!("migrations: up to date ({} applied before)\n", all.len())
    );
    assert_eq!(audit.status.code(), Some(0));
}

#[tokio::test]
async fn tools_refuse_an_unmigrated_database() {
    let db = TestDb::new().await;
    db.client()
        .await
        .batch_execute("DROP TABLE schema_migrations")
        .await
        .unwrap();
    let out = credit_ledger(&db.url, &["audit"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("credit-ledger migrate"));
}

/// `serve` with `args`, the environment cleared of every credential and `env` added.
fn serve_command(args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args).env("RUST_LOG", "warn").kill_on_drop(true);
    for var in [
        "AUTH_JWT_SECRET",
        "AUTH_JWKS_URL",
        "STRIPE_SECRET_KEY",
        "STRIPE_WEBHOOK_SECRET",
        "GRSAI_API_KEY",
        "ADMIN_TOKEN",
        "DATABASE_URL",
        "LISTEN_ADDR",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

#[tokio::test]
async fn serve_refuses_a_partial_configuration_naming_each_missing_variable() {
    let out = serve_command(
        &["serve"],
        &[
            ("STRIPE_SECRET_KEY", "sk_test_x"),
            ("LISTEN_ADDR", "127.0.0.1:0"),
        ],
    )
    .output()
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for missing in [
        "AUTH_JWT_SECRET or AUTH_JWKS_URL",
        "STRIPE_WEBHOOK_SECRET",
        "GRSAI_API_KEY",
        "ADMIN_TOKEN",
    ] {
        assert!(err.contains(missing), "{missing} not named: {err}");
    }
}

#[tokio::test]
async fn serve_honours_the_global_database_url() {
    let db = TestDb::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    // DATABASE_URL names something unusable: only the flag can make this start.
    let mut child = serve_command(
        &["--database-url", &db.url, "serve"],
        &[
            ("DATABASE_URL", "mysql://nowhere"),
            ("LISTEN_ADDR", &listen),
            ("LOG_FORMAT", "json"),
            ("RUST_LOG", "info"),
        ],
    )
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let started = std::time::Instant::now();
    // Serving, not only bound: the listener is bound before the "listening" line is logged,
    // and /healthz answers only after it.
    let healthz = format!("http://{listen}/healthz");
    loop {
        if let Ok(r) = reqwest::get(&healthz).await {
            if r.status().is_success() {
                break;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("serve exited with {status} instead of using --database-url");
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "serve never listened"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    child.start_kill().unwrap();
    let out = child.wait_with_output().await.unwrap();
    // LOG_FORMAT=json: every line is one JSON object.
    let log = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        lines.iter().any(|l| l.contains("credit-ledger listening")),
        "{log}"
    );
    for line in lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
}

#[tokio::test]
async fn an_unknown_log_format_stops_the_start() {
    let out = serve_command(&["serve"], &[("LOG_FORMAT", "yaml")])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("LOG_FORMAT"));
}

#[tokio::test]
async fn sigterm_makes_readiness_fail_first_then_drains_and_exits() {
    let db = TestDb::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let base = format!("http://{listen}");
    let mut child = serve_command(
        &["--database-url", &db.url, "serve"],
        &[("LISTEN_ADDR", &listen), ("SHUTDOWN_DELAY", "2s")],
    )
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let http = reqwest::Client::new();
    let status = |path: &'static str| {
        let http = http.clone();
        let url = format!("{base}{path}");
        async move { http.get(url).send().await.ok().map(|r| r.status().as_u16()) }
    };
    let started = std::time::Instant::now();
    while status("/readyz").await != Some(200) {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "never ready"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let pid = child.id().unwrap().to_string();
    let kill = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(kill.success());
    // During SHUTDOWN_DELAY: not ready, still alive and serving.
    let started = std::time::Instant::now();
    while status("/readyz").await != Some(503) {
        assert!(
            started.elapsed() < std::time::Duration::from_millis(1500),
            "readiness did not turn 503 after SIGTERM"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(status("/healthz").await, Some(200));
    // Then it drains and exits cleanly.
    let exit = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait())
        .await
        .expect("serve did not exit after SIGTERM")
        .unwrap();
    assert!(exit.success(), "{exit}");
}

/// `reconcile` against the fake Stripe: a paid session the ledger never credited, and a
/// refund the ledger never heard of, are listed (exit 1); agreeing recharges are not.
#[tokio::test]
async fn reconcile_lists_every_difference_with_stripe() {
    use credit_domain::ports::{CheckoutRequest, PaymentProvider};
    use credit_testkit::fake_stripe::FakeStripe;

    let db = TestDb::new().await;
    let fake = FakeStripe::start().await;
    let stripe = credit_stripe::StripeCheckout::new(
        credit_stripe::StripeConfig::new("sk_test_reconcile".to_owned().into())
            .with_api_base(fake.base_url()),
    )
    .unwrap();
    let ledger = Ledger::new(db.db.write.clone());
    let carol = UserId::parse("carol").unwrap();
    let run = |cmd: CreditCommand| {
        let ledger = &ledger;
        let carol = &carol;
        async move { ledger.execute(carol, cmd, HashMap::new()).await.unwrap() }
    };
    let mut sessions = Vec::new();
    for n in 1..=4 {
        let recharge_id = format!("rch_{n}");
        run(CreditCommand::RequestRecharge {
            recharge_id: recharge_id.clone(),
            amount_fen: 1000,
            currency: "cny".into(),
            credits_per_yuan: 100,
            provider: "stripe".into(),
        })
        .await;
        let session = stripe
            .create_checkout(&CheckoutRequest {
                user_id: "carol".into(),
                recharge_id: recharge_id.clone(),
                amount_fen: 1000,
                currency: "cny".into(),
                credits: 1000,
                success_url: "https://example.com/ok".into(),
                cancel_url: "https://example.com/cancel".into(),
            })
            .await
            .unwrap();
        run(CreditCommand::AttachCheckout {
            recharge_id,
            checkout_session_id: session.session_id.clone(),
            checkout_url: session.url,
        })
        .await;
        sessions.push(session.session_id);
    }
    // rch_1: paid at Stripe, never credited here (the webhook was lost).
    fake.pay_session(&sessions[0], "pi_1");
    // rch_2: paid and credited: agrees.
    fake.pay_session(&sessions[1], "pi_2");
    // rch_3: paid, credited, then refunded at Stripe without us hearing of it.
    fake.pay_session(&sessions[2], "pi_3");
    fake.update_session(&sessions[2], |s| {
        s["payment_intent"]["latest_charge"]["amount_refunded"] = serde_json::json!(400);
    });
    for (n, pi) in [(2, "pi_2"), (3, "pi_3")] {
        run(CreditCommand::CompleteRecharge {
            recharge_id: format!("rch_{n}"),
            amount_fen: 1000,
            currency: "cny".into(),
            payment_id: pi.into(),
        })
        .await;
    }
    // rch_4: still open at Stripe and pending here: agrees.
    let projector = Projector::new(db.db.read.clone(), ledger.appended());
    projector.drain().await.unwrap();

    let out = tokio::process::Command::new(BIN)
        .args(["reconcile", "--json"])
        .env("DATABASE_URL", &db.url)
        .env("STRIPE_SECRET_KEY", "sk_test_reconcile")
        .env("STRIPE_API_BASE", fake.base_url())
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["recharges_checked"], 4);
    let found: Vec<(String, String)> = report["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["recharge_id"].as_str().unwrap().to_owned(),
                d["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        found,
        vec![
            ("rch_1".to_owned(), "paid_not_credited".to_owned()),
            ("rch_3".to_owned(), "refunded_not_reversed".to_owned()),
        ]
    );

    // Once the ledger has heard of both, they agree.
    run(CreditCommand::CompleteRecharge {
        recharge_id: "rch_1".into(),
        amount_fen: 1000,
        currency: "cny".into(),
        payment_id: "pi_1".into(),
    })
    .await;
    run(CreditCommand::RecordRefund {
        recharge_id: "rch_3".into(),
        refunded_fen: 400,
        reference: "ch_pi_3".into(),
    })
    .await;
    let out = tokio::process::Command::new(BIN)
        .args(["reconcile", "--since", "2020-01-01"])
        .env("DATABASE_URL", &db.url)
        .env("STRIPE_SECRET_KEY", "sk_test_reconcile")
        .env("STRIPE_API_BASE", fake.base_url())
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).contains("OK: the ledger and Stripe agree"));
}

const SEED: &str = "0707070707070707070707070707070707070707070707070707070707070707";

async fn credit_ledger_env(db_url: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    tokio::process::Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", db_url)
        .env("RUST_LOG", "warn")
        .env_remove("AUDIT_SIGNING_KEY")
        .env_remove("AUDIT_PUBLIC_KEY")
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap()
}

/// A path for a checkpoint file that does not exist yet, removed when dropped.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "credit-ledger-{name}-{}-{}",
            std::process::id(),
            uuid_like()
        ));
        let _ = std::fs::remove_file(&path);
        Self(path)
    }

    fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn uuid_like() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[tokio::test]
async fn audit_writes_a_signed_checkpoint_then_verifies_the_journal_extends_it() {
    let db = ledger_with_history().await;
    let file = TempFile::new("extends");
    let key = credit_store::checkpoint::signing_key_from_hex(SEED).unwrap();
    let public = hex::encode(key.verifying_key().as_bytes());

    let out = credit_ledger_env(
        &db.url,
        &["audit", "--checkpoint", file.arg()],
        &[("AUDIT_SIGNING_KEY", SEED)],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(
        stdout(&out).contains(&format!("checkpoint         written to {}", file.arg())),
        "{}",
        stdout(&out)
    );
    let text = std::fs::read_to_string(&file.0).unwrap();
    assert!(text.starts_with("credit-ledger checkpoint 1\n"), "{text}");
    assert!(text.contains("\naccounts 2\nhead alice 6 "), "{text}");
    assert!(text.contains("\nhead bob 2 "), "{text}");
    assert!(
        text.contains(&format!("\nsignature ed25519 {public} ")),
        "{text}"
    );

    // The journal grows (a new event for alice, a new account): it extends the checkpoint.
    let ledger = Ledger::new(db.db.write.clone());
    for account in ["alice", "carol"] {
        ledger
            .execute(
                &UserId::parse(account).unwrap(),
                CreditCommand::Adjust {
                    adjustment_id: format!("adj-{account}"),
                    credits: 5,
                    actor: "test".into(),
                    reason: "goodwill".into(),
                },
                HashMap::new(),
            )
            .await
            .unwrap();
    }
    Projector::new(db.db.read.clone(), ledger.appended())
        .drain()
        .await
        .unwrap();
    // Verified with the public key alone (an auditor need not hold the secret).
    let out = credit_ledger_env(
        &db.url,
        &["audit", "--checkpoint", file.arg(), "--json"],
        &[("AUDIT_PUBLIC_KEY", &public)],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["checkpoint_file"]["action"], "verified");
    assert_eq!(json["checkpoint_file"]["signed_by"], public.as_str());
    assert_eq!(json["checkpoint"]["accounts"], 2);

    // Another key, or an edited file, is refused outright: the checkpoint cannot be trusted.
    let other = "08".repeat(32);
    let out = credit_ledger_env(
        &db.url,
        &["audit", "--checkpoint", file.arg()],
        &[("AUDIT_SIGNING_KEY", &other)],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not by the expected key"));
    std::fs::write(&file.0, text.replace("\nhead bob 2 ", "\nhead bob 1 ")).unwrap();
    let out = credit_ledger_env(&db.url, &["audit", "--checkpoint", file.arg()], &[]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("root hash does not match"));

    // No checkpoint is written over a journal the audit finds fault with.
    let fresh = TempFile::new("refused");
    db.client()
        .await
        .batch_execute("UPDATE users SET credits = 1 WHERE id = 'bob'")
        .await
        .unwrap();
    let out = credit_ledger_env(&db.url, &["audit", "--checkpoint", fresh.arg()], &[]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("checkpoint         not written"));
    assert!(!fresh.0.exists());
}

/// What the hash chain alone cannot see, once `projections rebuild` has erased every trace
/// from the read tables: a deleted last event (bob), a truncated account (alice), and a
/// history rewritten with recomputed hashes (carol). The checkpoint sees all three.
#[tokio::test]
async fn a_checkpoint_catches_deleted_heads_truncation_and_recomputed_rewrites() {
    let db = ledger_with_history().await;
    let ledger = Ledger::new(db.db.write.clone());
    let carol = UserId::parse("carol").unwrap();
    ledger
        .execute(
            &carol,
            CreditCommand::Adjust {
                adjustment_id: "adj-carol".into(),
                credits: 100,
                actor: "test".into(),
                reason: "welcome".into(),
            },
            HashMap::new(),
        )
        .await
        .unwrap();
    ledger
        .execute(&carol, deduct("carol-t1"), HashMap::new())
        .await
        .unwrap();
    Projector::new(db.db.read.clone(), ledger.appended())
        .drain()
        .await
        .unwrap();
    let file = TempFile::new("tamper");
    let out = credit_ledger(&db.url, &["audit", "--checkpoint", file.arg()]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));

    db.tamper("DELETE FROM events WHERE aggregate_id = 'bob' AND sequence = 2")
        .await;
    db.tamper("DELETE FROM events WHERE aggregate_id = 'alice' AND sequence >= 4")
        .await;
    // Rewrite carol's deduction (a non-money field) and recompute every hash after it, exactly
    // as the insert trigger would have.
    db.tamper(
        "UPDATE events SET payload = jsonb_set(payload::jsonb, '{CreditsDeducted,description}', '\"rewritten\"')
          WHERE aggregate_id = 'carol' AND sequence = 2",
    )
    .await;
    db.tamper(
        "DO $$
         DECLARE e events; prev bytea := '\\x';
         BEGIN
           FOR e IN SELECT * FROM events WHERE aggregate_id = 'carol' ORDER BY sequence LOOP
             e.hash := sha256(prev || convert_to(event_canonical(e), 'UTF8'));
             UPDATE events SET hash = e.hash
              WHERE aggregate_type = e.aggregate_type AND aggregate_id = e.aggregate_id
                AND sequence = e.sequence;
             prev := e.hash;
           END LOOP;
         END $$",
    )
    .await;
    let out = credit_ledger(&db.url, &["projections", "rebuild"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));

    // Without the checkpoint, nothing is left to see.
    let out = credit_ledger(&db.url, &["audit"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));

    let out = credit_ledger(&db.url, &["audit", "--checkpoint", file.arg()]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains("FAILED: 3 discrepancies"), "{text}");
    for (kind, account, detail) in [
        (
            "checkpoint_head_missing",
            "alice",
            "recorded sequence 6 (hash ",
        ),
        (
            "checkpoint_head_missing",
            "bob",
            "recorded sequence 2 (hash ",
        ),
        ("checkpoint_head_changed", "carol", "was rewritten"),
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{kind} account={account} "))
                && l.contains(detail)),
            "{kind} {account}: {text}"
        );
    }
    assert!(text.contains("the journal ends at sequence 3"), "{text}");
    assert!(text.contains("the journal ends at sequence 1"), "{text}");
    assert!(text.contains("NOT held"), "{text}");
}

const VERIFIER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tools/verify_export.py");

async fn verify_export(export: &str, extra: &[&str]) -> Output {
    tokio::process::Command::new("python3")
        .arg(VERIFIER)
        .arg(export)
        .args(extra)
        .output()
        .await
        .expect("python3 must be installed to run the independent verifier")
}

fn edit_lines(path: &std::path::Path, edit: impl Fn(&mut serde_json::Value) -> bool) {
    let text = std::fs::read_to_string(path).unwrap();
    let out: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            edit(&mut v).then(|| v.to_string())
        })
        .collect();
    std::fs::write(path, out.join("\n") + "\n").unwrap();
}

/// The Python verifier (standard library only) recomputes every chain and balance from an
/// export the binary wrote, checks the signed checkpoint, and catches tampering with the
/// export itself and with the journal before the checkpoint.
#[tokio::test]
async fn an_export_is_verified_independently_against_a_signed_checkpoint() {
    let db = ledger_with_history().await;
    let key = credit_store::checkpoint::signing_key_from_hex(SEED).unwrap();
    let public = hex::encode(key.verifying_key().as_bytes());
    let checkpoint = TempFile::new("py-checkpoint");
    let out = credit_ledger_env(
        &db.url,
        &["audit", "--checkpoint", checkpoint.arg()],
        &[("AUDIT_SIGNING_KEY", SEED)],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    // The journal moves on after the checkpoint.
    let ledger = Ledger::new(db.db.write.clone());
    ledger
        .execute(
            &UserId::parse("bob").unwrap(),
            CreditCommand::Adjust {
                adjustment_id: "adj-bob".into(),
                credits: 5,
                actor: "test".into(),
                reason: "goodwill".into(),
            },
            HashMap::new(),
        )
        .await
        .unwrap();

    let export = TempFile::new("export");
    let out = credit_ledger(&db.url, &["export", "--output", export.arg()]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let ck = ["--checkpoint", checkpoint.arg(), "--public-key", &public];
    let out = verify_export(export.arg(), &ck).await;
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("events verified    9 (2 accounts)"), "{text}");
    assert!(
        text.contains("recharged 600 - spent 20 + refunded 10 + granted 5 - reversed 0"),
        "{text}"
    );
    assert!(text.contains("balances           595"), "{text}");
    assert!(text.contains("2 of 2 heads found"), "{text}");
    assert!(text.contains(&format!("signed by {public}")), "{text}");

    // One account, and a position range: chains checked from their first exported event.
    let alice = credit_ledger(&db.url, &["export", "--account", "alice"]).await;
    assert_eq!(alice.status.code(), Some(0));
    assert_eq!(
        stdout(&alice).lines().count(),
        6 + 2,
        "header, 6 events, end"
    );
    let range = TempFile::new("range");
    let out = credit_ledger(
        &db.url,
        &["export", "--from", "4", "--to", "7", "-o", range.arg()],
    )
    .await;
    assert_eq!(out.status.code(), Some(0));
    let out = verify_export(range.arg(), &ck).await;
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(stdout(&out).contains("partial export"), "{}", stdout(&out));

    // Tampering with the export: an edited amount breaks the hash and the balance.
    let edited = TempFile::new("edited");
    std::fs::copy(&export.0, &edited.0).unwrap();
    edit_lines(&edited.0, |v| {
        if v["event_type"] == "CreditsDeducted" && v["sequence"] == 3 {
            let p = v["payload"]
                .as_str()
                .unwrap()
                .replace("\"credits\":10", "\"credits\":1");
            v["payload"] = p.into();
        }
        true
    });
    let out = verify_export(edited.arg(), &[]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(
        text.lines()
            .any(|l| l.contains("(account alice, sequence 3, ")
                && l.ends_with("hash mismatch (content or chain edited)")),
        "{text}"
    );
    assert!(
        text.contains("balance_after is 490, but 500 -1 = 499"),
        "{text}"
    );

    // A dropped event (the end count fixed up to hide it): the chain breaks.
    let dropped = TempFile::new("dropped");
    std::fs::copy(&export.0, &dropped.0).unwrap();
    edit_lines(&dropped.0, |v| {
        if v["end"] == true {
            v["events"] = 8.into();
        }
        !(v["aggregate_id"] == "alice" && v["sequence"] == 4)
    });
    let out = verify_export(dropped.arg(), &[]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("expected sequence 4"),
        "{}",
        stdout(&out)
    );

    // The journal rewritten before the checkpoint with recomputed hashes: the export alone
    // is consistent, the checkpoint is not held.
    db.tamper(
        "UPDATE events SET payload = jsonb_set(payload::jsonb, '{RechargeRequested,provider}', '\"x\"')
          WHERE aggregate_id = 'bob' AND sequence = 1",
    )
    .await;
    db.tamper(
        "DO $$
         DECLARE e events; prev bytea := '\\x';
         BEGIN
           FOR e IN SELECT * FROM events WHERE aggregate_id = 'bob' ORDER BY sequence LOOP
             e.hash := sha256(prev || convert_to(event_canonical(e), 'UTF8'));
             UPDATE events SET hash = e.hash
              WHERE aggregate_type = e.aggregate_type AND aggregate_id = e.aggregate_id
                AND sequence = e.sequence;
             prev := e.hash;
           END LOOP;
         END $$",
    )
    .await;
    let rewritten = TempFile::new("rewritten");
    let out = credit_ledger(&db.url, &["export", "-o", rewritten.arg()]).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        verify_export(rewritten.arg(), &[]).await.status.code(),
        Some(0)
    );
    let out = verify_export(rewritten.arg(), &ck).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("checkpoint: account bob sequence 2 was rewritten"),
        "{}",
        stdout(&out)
    );

    // A checkpoint edited by hand, or checked against another key, is refused outright.
    let wrong_key = hex::encode(
        credit_store::checkpoint::signing_key_from_hex(&"08".repeat(32))
            .unwrap()
            .verifying_key()
            .as_bytes(),
    );
    let out = verify_export(
        export.arg(),
        &["--checkpoint", checkpoint.arg(), "--public-key", &wrong_key],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    let cp = std::fs::read_to_string(&checkpoint.0).unwrap();
    std::fs::write(&checkpoint.0, cp.replace("\nevents 8\n", "\nevents 7\n")).unwrap();
    let out = verify_export(export.arg(), &ck).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("root hash does not match"));
}
