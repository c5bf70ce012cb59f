//! The journal's hash chain: each event's hash is SHA-256 over the previous event's hash (of
//! the same account; empty before the first) and the event's canonical text,
//! `aggregate_type|aggregate_id|sequence|event_type|event_version|payload|metadata`, with
//! `payload` and `metadata` the exact text stored (docs/AUDITING.md).
//!
//! The executor links the events it appends here; the journal checks every appended event's
//! link in the inserting statement (migrations/0012_chain_linked_by_the_appender.sql); the
//! audit recomputes every link from the stored columns.

use std::io::Write;

use sha2::{Digest, Sha256};

/// One event's canonical content, as the hash covers it.
pub struct Link<'a> {
    pub aggregate_type: &'a [u8],
    pub account: &'a [u8],
    pub sequence: i64,
    pub event_type: &'a [u8],
    pub event_version: &'a [u8],
    pub payload: &'a [u8],
    pub metadata: &'a [u8],
}

impl Link<'_> {
    /// SHA-256(prev || canonical), hashed part by part without building the text (as
    /// `event_canonical` in migrations/0001_journal.sql builds it).
    pub fn hash(&self, prev: &[u8]) -> [u8; 32] {
        let mut digits = [0u8; 20];
        let sequence = decimal(self.sequence, &mut digits);
        let mut hasher = Sha256::new();
        hasher.update(prev);
        let parts = [
            self.aggregate_type,
            self.account,
            sequence,
            self.event_type,
            self.event_version,
            self.payload,
            self.metadata,
        ];
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                hasher.update(b"|");
            }
            hasher.update(part);
        }
        hasher.finalize().into()
    }
}

/// `n` in base 10, as PostgreSQL's `bigint::text` writes it, without allocating.
fn decimal(n: i64, buffer: &mut [u8; 20]) -> &[u8] {
    let mut rest = &mut buffer[..];
    // 20 bytes hold every i64 ("-9223372036854775808"), so this cannot fail.
    let _ = write!(rest, "{n}");
    let written = 20 - rest.len();
    &buffer[..written]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_are_written_as_postgres_writes_bigints() {
        let mut buffer = [0u8; 20];
        assert_eq!(decimal(1, &mut buffer), b"1");
        assert_eq!(
            decimal(-9_223_372_036_854_775_808, &mut buffer),
            b"-9223372036854775808"
        );
        assert_eq!(
            decimal(9_223_372_036_854_775_807, &mut buffer),
            b"9223372036854775807"
        );
    }

    #[test]
    fn the_hash_covers_the_previous_hash_and_every_part() {
        let link = Link {
            aggregate_type: b"CreditAccount",
            account: b"u1",
            sequence: 2,
            event_type: b"CreditsDeducted",
            event_version: b"1.0",
            payload: b"{}",
            metadata: b"{}",
        };
        let expected: [u8; 32] =
            Sha256::digest(b"prevCreditAccount|u1|2|CreditsDeducted|1.0|{}|{}").into();
        assert_eq!(link.hash(b"prev"), expected);
        assert_ne!(link.hash(b"other"), expected);
    }
}
