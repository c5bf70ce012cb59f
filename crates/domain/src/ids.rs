use serde::{Deserialize, Serialize};

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("identifier is empty")]
    Empty,
    #[error("identifier is longer than {max} characters")]
    TooLong { max: usize },
    #[error("identifier may contain only letters, digits and - _ . : @")]
    BadCharacter,
}

const MAX_ID_LEN: usize = 128;

/// Checks the shape shared by every identifier the ledger stores (user, recharge, task, ...).
pub fn check_id(raw: &str) -> Result<(), IdError> {
    if raw.is_empty() {
        return Err(IdError::Empty);
    }
    if raw.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { max: MAX_ID_LEN });
    }
    if !raw
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@'))
    {
        return Err(IdError::BadCharacter);
    }
    Ok(())
}

/// A user's id, which is also the id of their `CreditAccount` aggregate. For a Supabase
/// token this is the `sub` claim (a UUID).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(String);

impl UserId {
    pub fn parse(raw: &str) -> Result<Self, IdError> {
        check_id(raw)?;
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UserId {
    type Error = IdError;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        check_id(&raw)?;
        Ok(Self(raw))
    }
}

impl From<UserId> for String {
    fn from(id: UserId) -> Self {
        id.0
    }
}

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_checked() {
        assert!(UserId::parse("0b6c6a9e-3f2d-4c55-9d1e-7f0e8d2c1a11").is_ok());
        assert_eq!(UserId::parse(""), Err(IdError::Empty));
        assert_eq!(UserId::parse("a b"), Err(IdError::BadCharacter));
        assert_eq!(UserId::parse("x'--"), Err(IdError::BadCharacter));
        assert!(matches!(
            UserId::parse(&"a".repeat(129)),
            Err(IdError::TooLong { .. })
        ));
    }
}
