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
    loop {
        if tokio::net::TcpStream::connect(&listen).await.is_ok() {
            break;
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
