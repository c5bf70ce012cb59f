/// Why the ledger refused a command. Each variant carries what a caller needs to explain it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("insufficient credits: {required} required, {available} available")]
    InsufficientCredits { required: i64, available: i64 },
    #[error("amount must be positive")]
    NonPositiveAmount,
    #[error("adjustment must not be zero")]
    ZeroAdjustment,
    #[error("the amount would overflow the ledger")]
    Overflow,
    #[error("invalid identifier: {0}")]
    InvalidId(#[from] crate::ids::IdError),
    #[error("text field {field} is empty or too long")]
    InvalidText { field: &'static str },
    #[error("recharge {recharge_id} already exists")]
    RechargeExists { recharge_id: String },
    #[error("recharge {recharge_id} does not exist")]
    UnknownRecharge { recharge_id: String },
    #[error("recharge {recharge_id} is already completed")]
    RechargeAlreadyCompleted { recharge_id: String },
    #[error("recharge {recharge_id} is {status}, not pending")]
    RechargeNotPending {
        recharge_id: String,
        status: &'static str,
    },
    #[error("recharge {recharge_id}: this refund or dispute stage is already recorded")]
    AlreadyRecorded { recharge_id: String },
    #[error("text field {field} contains control characters")]
    ControlCharacters { field: &'static str },
    #[error("amount mismatch: recharge is {expected} fen, payment is {actual} fen")]
    AmountMismatch { expected: i64, actual: i64 },
    #[error("currency mismatch: recharge is {expected}, payment is {actual}")]
    CurrencyMismatch { expected: String, actual: String },
    #[error("task {task_id} is already charged")]
    TaskAlreadyCharged { task_id: String },
    #[error("task {task_id} was never charged")]
    UnknownTask { task_id: String },
    #[error("task {task_id} is already settled")]
    TaskAlreadySettled { task_id: String },
    #[error("task {task_id}: progress did not move forward")]
    StaleProgress { task_id: String },
    #[error("task {task_id} is already submitted")]
    TaskAlreadySubmitted { task_id: String },
    #[error("adjustment {adjustment_id} already exists")]
    AdjustmentExists { adjustment_id: String },
    #[error("adjustment would take the balance to {would_be}, below zero")]
    AdjustmentBelowZero { would_be: i64 },
}

impl LedgerError {
    /// A stable snake_case code for APIs and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InsufficientCredits { .. } => "insufficient_credits",
            Self::NonPositiveAmount => "non_positive_amount",
            Self::ZeroAdjustment => "zero_adjustment",
            Self::Overflow => "amount_overflow",
            Self::InvalidId(_) => "invalid_id",
            Self::InvalidText { .. } => "invalid_text",
            Self::RechargeExists { .. } => "recharge_exists",
            Self::UnknownRecharge { .. } => "unknown_recharge",
            Self::RechargeAlreadyCompleted { .. } => "recharge_already_completed",
            Self::RechargeNotPending { .. } => "recharge_not_pending",
            Self::AlreadyRecorded { .. } => "already_recorded",
            Self::ControlCharacters { .. } => "control_characters",
            Self::AmountMismatch { .. } => "amount_mismatch",
            Self::CurrencyMismatch { .. } => "currency_mismatch",
            Self::TaskAlreadyCharged { .. } => "task_already_charged",
            Self::UnknownTask { .. } => "unknown_task",
            Self::TaskAlreadySettled { .. } => "task_already_settled",
            Self::StaleProgress { .. } => "stale_progress",
            Self::TaskAlreadySubmitted { .. } => "task_already_submitted",
            Self::AdjustmentExists { .. } => "adjustment_exists",
            Self::AdjustmentBelowZero { .. } => "adjustment_below_zero",
        }
    }
}
