#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;

use credit_domain::{CreditCommand, UserId, VideoSpec};
use credit_store::{Committed, ExecuteError, Ledger, Projector};
use credit_testkit::db::TestDb;

pub struct Env {
    pub test: TestDb,
    pub ledger: std::sync::Arc<Ledger>,
    pub projector: Projector,
}

pub async fn env() -> Env {
    let test = TestDb::new().await;
    let ledger = std::sync::Arc::new(Ledger::new(test.db.write.clone()));
    let projector = Projector::new(test.db.read.clone(), ledger.appended());
    Env {
        test,
        ledger,
        projector,
    }
}

pub fn user(id: &str) -> UserId {
    UserId::parse(id).unwrap()
}

impl Env {
    pub async fn run(&self, account: &UserId, cmd: CreditCommand) -> Result<Committed, ExecuteError> {
        self.ledger.execute(account, cmd, HashMap::new()).await
    }

    /// Recharges `yuan` through the full request → complete path.
    pub async fn recharge(&self, account: &UserId, recharge_id: &str, amount_fen: i64) {
        self.run(account, request(recharge_id, amount_fen)).await.unwrap();
        self.run(
            account,
            CreditCommand::CompleteRecharge {
                recharge_id: recharge_id.into(),
                amount_fen,
                currency: "cny".into(),
                payment_id: format!("pi_{recharge_id}"),
            },
        )
        .await
        .unwrap();
    }

    pub async fn audit(&self) -> credit_store::audit::AuditReport {
        let client = self.test.client().await;
        credit_store::audit::run(&client, None).await.unwrap()
    }
}

pub fn request(recharge_id: &str, amount_fen: i64) -> CreditCommand {
    CreditCommand::RequestRecharge {
        recharge_id: recharge_id.into(),
        amount_fen,
        currency: "cny".into(),
        credits_per_yuan: 100,
        provider: "demo".into(),
    }
}

pub fn deduct(task_id: &str) -> CreditCommand {
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

pub fn fail(task_id: &str) -> CreditCommand {
    CreditCommand::FailVideo {
        task_id: task_id.into(),
        failure_reason: "error".into(),
        error_message: "boom".into(),
    }
}
