//! Read-your-writes across processes: two service processes on one database; every command
//! goes to one and the read of its effect to the other, a thousand times per endpoint, with
//! no sleep and no retry. A read that finds its account's projection behind the journal
//! brings that account up to date first (`credit_store::projector::catch_up`).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::{json, Value};

const ROUNDS: usize = 1000;

async fn get(app: &TestApp, url: String, token: &str) -> Value {
    let r = app.http.get(url).bearer_auth(token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test]
async fn after_an_answer_the_next_read_on_another_process_shows_it() {
    let app = TestApp::spawn().await;
    let other = app.spawn_sibling().await;
    let u = user("rywy");
    let token = app.token(&u);
    app.adjust(&u, (ROUNDS as i64) * 10, "videos to generate")
        .await
        .expect(201);

    let mut stale = Vec::new();
    for round in 0..ROUNDS {
        // Alternate which process takes the command and which answers the read.
        let (write_base, read_base) = if round % 2 == 0 {
            (app.base.clone(), other.base.clone())
        } else {
            (other.base.clone(), app.base.clone())
        };
        let r = app
            .http
            .post(format!("{write_base}/api/video/generate"))
            .bearer_auth(&token)
            .json(&json!({ "prompt": format!("round {round}") }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let generated: Value = r.json().await.unwrap();
        let task_id = generated["task_id"].as_str().unwrap().to_owned();
        let balance = generated["credits"].as_i64().unwrap();

        // The task itself.
        let r = app
            .http
            .get(format!("{read_base}/api/video/tasks/{task_id}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        if r.status() != 200 {
            stale.push(format!("round {round}: task {} ", r.status()));
        }
        // The balance.
        let stats = get(&app, format!("{read_base}/api/stats"), &token).await;
        if stats["credits"].as_i64() != Some(balance) {
            stale.push(format!(
                "round {round}: stats {} != {balance}",
                stats["credits"]
            ));
        }
        // The task list and the consumption records, newest first.
        let tasks = get(&app, format!("{read_base}/api/video/tasks?limit=1"), &token).await;
        if tasks["records"][0]["task_id"] != task_id.as_str() {
            stale.push(format!("round {round}: task list"));
        }
        let spent = get(&app, format!("{read_base}/api/consumption?limit=1"), &token).await;
        if spent["records"][0]["video_task_id"] != task_id.as_str() {
            stale.push(format!("round {round}: consumption"));
        }
        // A recharge on the reading process, read back on the writing one.
        let r = app
            .http
            .post(format!("{read_base}/api/recharge"))
            .bearer_auth(&token)
            .json(&json!({ "amount": 10 }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let recharge: Value = r.json().await.unwrap();
        let records = get(&app, format!("{write_base}/api/recharge?limit=1"), &token).await;
        if records["records"][0]["recharge_id"] != recharge["recharge_id"] {
            stale.push(format!("round {round}: recharge records"));
        }
    }
    assert!(
        stale.is_empty(),
        "{} stale reads: {:?}",
        stale.len(),
        &stale[..stale.len().min(10)]
    );
    other.stop().await;
}
