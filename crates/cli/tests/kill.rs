//! Ten `kill -9` cycles of the real binary under load (issue 11). Each cycle starts
//! `credit-ledger serve` (demo providers, loopback), loads it with keyed adjustments and video
//! generations from several clients, and kills it with SIGKILL mid-load. Afterwards: every
//! acknowledged command is in the journal, none is there twice, a retry of each unanswered
//! request with its Idempotency-Key finds it done or does it once, and the audit is clean.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use credit_testkit::db::TestDb;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_credit-ledger");
struct Server {
    child: tokio::process::Child,
    base: String,
    /// Demo mode's per-process admin token (printed in its log).
    admin: String,
}

async fn serve(db_url: &str) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Demo mode (nothing configured) makes its admin token per process and logs it.
    let log = std::env::temp_dir().join(format!(
        "credit-ledger-kill-{}-{port}.log",
        std::process::id()
    ));
    let child = tokio::process::Command::new(BIN)
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", db_url)
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("DEMO_VIDEO_DELAY", "50ms")
        .env("RUST_LOG", "error,credit_http::app=warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let started = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "serve never became ready"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    let admin = text
        .split("DEMO MODE: admin token ")
        .nth(1)
        .and_then(|rest| rest.get(..64))
        .unwrap_or_else(|| panic!("no demo admin token in the log: {text}"))
        .to_owned();
    Server { child, base, admin }
}

/// What a client sent, and what it knows of the outcome.
#[derive(Debug)]
enum Sent {
    /// An adjustment under this Idempotency-Key; `Some(id)` if it was acknowledged.
    Adjust {
        user: String,
        key: String,
        id: Option<String>,
    },
    /// A generation; acknowledged with its task id.
    Generated { task: String },
}

async fn adjust(
    http: &reqwest::Client,
    base: &str,
    admin: &str,
    user: &str,
    key: &str,
) -> Option<Value> {
    let r = http
        .post(format!("{base}/api/admin/accounts/{user}/adjustments"))
        .bearer_auth(admin)
        .header("idempotency-key", key)
        .json(&json!({ "credits": 10, "reason": "load" }))
        .send()
        .await
        .ok()?;
    let status = r.status().as_u16();
    let body: Value = r.json().await.ok()?;
    assert!(status < 500 || status == 503, "{status}: {body}");
    matches!(status, 200 | 201).then_some(body)
}

async fn load(
    base: String,
    admin: String,
    cycle: usize,
    worker: usize,
    until: Instant,
) -> Vec<Sent> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let user = format!("killed-{}", worker % 3);
    let mut sent = Vec::new();
    let mut token = None;
    let mut n = 0;
    while Instant::now() < until {
        n += 1;
        if worker == 3 {
            // Generations, each charged 10 (the adjustments keep the accounts funded).
            if token.is_none() {
                let r = http
                    .post(format!("{base}/api/dev/token"))
                    .json(&json!({ "user_id": user }))
                    .send()
                    .await;
                token = match r {
                    Ok(r) => r
                        .json::<Value>()
                        .await
                        .ok()
                        .and_then(|b| b["token"].as_str().map(str::to_owned)),
                    Err(_) => break,
                };
            }
            let Some(t) = &token else { break };
            let r = http
                .post(format!("{base}/api/video/generate"))
                .bearer_auth(t)
                .json(&json!({ "prompt": format!("cycle {cycle} video {n}") }))
                .send()
                .await;
            let Ok(r) = r else { break };
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or_default();
            assert!(status < 500 || status == 503, "{status}: {body}");
            if status == 202 {
                sent.push(Sent::Generated {
                    task: body["task_id"].as_str().unwrap().to_owned(),
                });
            }
        } else {
            let key = format!("c{cycle}-w{worker}-n{n}");
            let id = adjust(&http, &base, &admin, &user, &key)
                .await
                .map(|b| b["adjustment_id"].as_str().unwrap().to_owned());
            let killed = id.is_none();
            sent.push(Sent::Adjust {
                user: user.clone(),
                key,
                id,
            });
            if killed {
                break;
            }
        }
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_kill_9_cycles_under_load_lose_nothing_acknowledged_and_apply_nothing_twice() {
    let db = TestDb::new().await;
    let mut all = Vec::new();
    for cycle in 0..10 {
        let mut server = serve(&db.url).await;
        let until = Instant::now() + Duration::from_millis(250 + 37 * cycle as u64);
        let workers: Vec<_> = (0..4)
            .map(|w| {
                tokio::spawn(load(
                    server.base.clone(),
                    server.admin.clone(),
                    cycle,
                    w,
                    until + Duration::from_secs(5),
                ))
            })
            .collect();
        tokio::time::sleep_until(until.into()).await;
        server.child.start_kill().unwrap(); // SIGKILL
        server.child.wait().await.unwrap();
        for w in workers {
            all.extend(w.await.unwrap());
        }
    }

    // After the last kill: a fresh process; retry what was never answered, with its key.
    let server = serve(&db.url).await;
    let http = reqwest::Client::new();
    let mut acknowledged = HashSet::new();
    let mut generated = HashSet::new();
    let mut retried = 0;
    for sent in &all {
        match sent {
            Sent::Adjust { id: Some(id), .. } => {
                acknowledged.insert(id.clone());
            }
            Sent::Adjust {
                user,
                key,
                id: None,
            } => {
                let body = adjust(&http, &server.base, &server.admin, user, key)
                    .await
                    .unwrap();
                acknowledged.insert(body["adjustment_id"].as_str().unwrap().to_owned());
                retried += 1;
            }
            Sent::Generated { task } => {
                generated.insert(task.clone());
            }
        }
    }
    assert!(
        acknowledged.len() > 50,
        "too little load: {}",
        acknowledged.len()
    );
    assert!(retried >= 1, "no request was cut by a kill");

    let client = db.client().await;
    let mut in_journal: HashMap<String, i64> = HashMap::new();
    for row in client
        .query(
            "SELECT coalesce(payload->'CreditsAdjusted'->>'adjustment_id',
                             payload->'CreditsDeducted'->>'task_id') AS id, count(*) AS n
               FROM events WHERE event_type IN ('CreditsAdjusted', 'CreditsDeducted')
              GROUP BY 1",
            &[],
        )
        .await
        .unwrap()
    {
        in_journal.insert(row.get("id"), row.get("n"));
    }
    for id in acknowledged.iter().chain(&generated) {
        assert_eq!(
            in_journal.get(id),
            Some(&1),
            "{id} acknowledged, in the journal {:?} times",
            in_journal.get(id)
        );
    }
    assert!(
        in_journal.values().all(|&n| n == 1),
        "a command was applied twice"
    );

    // The projector of the last process catches up; then the audit is clean.
    let started = Instant::now();
    loop {
        let pending: i64 = client
            .query_one("SELECT count(*) FROM projection_outbox", &[])
            .await
            .unwrap()
            .get(0);
        if pending == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "projection never caught up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let audit = tokio::process::Command::new(BIN)
        .arg("audit")
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    assert_eq!(
        audit.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&audit.stdout)
    );
    drop(server);
}
