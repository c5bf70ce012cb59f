//! Checkpoints: what the journal looked like at one audit, kept by auditors outside the
//! database. A later audit proves the journal still holds every recorded head (same sequence,
//! same position, same hash) and extends it, so a deleted last event, a truncated account or a
//! history rewritten with recomputed hashes cannot pass, even after `projections rebuild`.
//!
//! The format is small text, specified in docs/AUDITING.md (and checked independently by
//! tools/verify_export.py):
//!
//! ```text
//! credit-ledger checkpoint 1
//! created 2026-12-01T21:00:00.000000Z
//! position 1234
//! events 1200
//! accounts 2
//! head alice 6 1200 <sha-256 hex of alice's event 6>
//! head bob 2 1100 <hash hex>
//! root <sha-256 hex of every byte above this line>
//! signature ed25519 <public key hex> <signature hex of every byte above this line>
//! ```
//!
//! Heads are sorted by account id (bytes); an id byte outside `A-Z a-z 0-9 - _ . : @` is
//! written `%XX`. The signature line is present only when the checkpoint was signed.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use ed25519_dalek::{Signer, Verifier};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::audit::Discrepancy;

const MAGIC: &str = "credit-ledger checkpoint 1";

/// The last event of one account at the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub sequence: i64,
    pub position: i64,
    pub hash: Vec<u8>,
}

/// The journal's heads at one snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    pub created: DateTime<Utc>,
    /// The highest global position in the snapshot (0 for an empty journal).
    pub position: i64,
    pub events: u64,
    pub heads: BTreeMap<String, Head>,
}

/// Why a checkpoint file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("line {line}: {message}")]
    Malformed { line: usize, message: String },
    #[error("the root hash does not match the checkpoint's contents: the file was edited")]
    RootMismatch,
    #[error("the Ed25519 signature does not verify: the file was edited or signed by another key")]
    BadSignature,
    #[error("the checkpoint is signed by {found}, not by the expected key {expected}")]
    WrongKey { found: String, expected: String },
    #[error("the checkpoint is not signed, but a key to check it against is set")]
    Unsigned,
    #[error("{0}")]
    Key(String),
}

/// A checkpoint read back from its text, with who signed it.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub checkpoint: Checkpoint,
    pub root: [u8; 32],
    pub signed_by: Option<VerifyingKey>,
}

impl Checkpoint {
    /// Every line the root hash covers.
    fn body(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{MAGIC}");
        let _ = writeln!(
            out,
            "created {}",
            self.created.to_rfc3339_opts(SecondsFormat::Micros, true)
        );
        let _ = writeln!(out, "position {}", self.position);
        let _ = writeln!(out, "events {}", self.events);
        let _ = writeln!(out, "accounts {}", self.heads.len());
        for (account, head) in &self.heads {
            let _ = writeln!(
                out,
                "head {} {} {} {}",
                encode_id(account),
                head.sequence,
                head.position,
                hex::encode(&head.hash)
            );
        }
        out
    }

    /// SHA-256 over the body: one hash that stands for every head.
    pub fn root(&self) -> [u8; 32] {
        Sha256::digest(self.body().as_bytes()).into()
    }

    /// The file's text, signed when a key is given.
    pub fn to_text(&self, key: Option<&SigningKey>) -> String {
        let mut text = self.body();
        let _ = writeln!(text, "root {}", hex::encode(self.root()));
        if let Some(key) = key {
            let signature = key.sign(text.as_bytes());
            let _ = writeln!(
                text,
                "signature ed25519 {} {}",
                hex::encode(key.verifying_key().as_bytes()),
                hex::encode(signature.to_bytes())
            );
        }
        text
    }

    /// Reads a checkpoint, checking its grammar, root and signature. With `trusted`, the
    /// checkpoint must be signed by that key.
    pub fn parse(text: &str, trusted: Option<&VerifyingKey>) -> Result<Parsed, CheckpointError> {
        // Each line with its number and the offset where it starts.
        let mut lines = Vec::new();
        let mut offset = 0;
        for (i, line) in text.split_inclusive('\n').enumerate() {
            let Some(content) = line.strip_suffix('\n') else {
                return Err(malformed(i + 1, "every line must end with a newline"));
            };
            lines.push(Line {
                number: i + 1,
                start: offset,
                parts: content.split(' ').collect(),
            });
            offset += line.len();
        }
        let mut lines = lines.into_iter().peekable();
        let mut next = |want: &str| {
            lines.next().ok_or_else(|| CheckpointError::Malformed {
                line: 0,
                message: format!("ends before its `{want}` line"),
            })
        };
        let magic = next("header")?;
        if magic.parts.join(" ") != MAGIC {
            return Err(malformed(magic.number, format!("not a `{MAGIC}` file")));
        }
        let (n, created) = next("created")?.field("created")?;
        let created = DateTime::parse_from_rfc3339(created)
            .map_err(|e| malformed(n, format!("created: {e}")))?
            .with_timezone(&Utc);
        let position = number(next("position")?.field("position")?)?;
        let events = number(next("events")?.field("events")?)?;
        let accounts = number(next("accounts")?.field("accounts")?)?;
        let mut heads = BTreeMap::new();
        let mut last: Option<String> = None;
        for _ in 0..accounts {
            let line = next("head")?;
            let n = line.number;
            let ["head", id, sequence, position, hash] = line.parts[..] else {
                return Err(malformed(
                    n,
                    "a head is `head ACCOUNT SEQUENCE POSITION HASH`",
                ));
            };
            let id = decode_id(id).ok_or_else(|| malformed(n, "bad account id encoding"))?;
            if last.as_ref().is_some_and(|l| l.as_bytes() >= id.as_bytes()) {
                return Err(malformed(n, "heads must be sorted by account, each once"));
            }
            let head = Head {
                sequence: number((n, sequence))?,
                position: number((n, position))?,
                hash: hex32(n, hash)?.to_vec(),
            };
            last = Some(id.clone());
            heads.insert(id, head);
        }
        let checkpoint = Checkpoint {
            created,
            position,
            events: events as u64,
            heads,
        };
        let (n, root) = next("root")?.field("root")?;
        let root = hex32(n, root)?;
        if root != checkpoint.root() {
            return Err(CheckpointError::RootMismatch);
        }
        let signed_by = match next("signature") {
            Err(_) => None,
            Ok(line) => {
                let n = line.number;
                let ["signature", "ed25519", key, signature] = line.parts[..] else {
                    return Err(malformed(
                        n,
                        "a signature is `signature ed25519 PUBLIC_KEY SIGNATURE`",
                    ));
                };
                let key = VerifyingKey::from_bytes(&hex32(n, key)?)
                    .map_err(|e| malformed(n, format!("public key: {e}")))?;
                let signature = hex::decode(signature)
                    .ok()
                    .and_then(|s| <[u8; 64]>::try_from(s).ok())
                    .ok_or_else(|| malformed(n, "a signature is 64 bytes in hex"))?;
                key.verify(
                    &text.as_bytes()[..line.start],
                    &ed25519_dalek::Signature::from_bytes(&signature),
                )
                .map_err(|_| CheckpointError::BadSignature)?;
                if next("end").is_ok() {
                    return Err(malformed(n + 1, "nothing may follow the signature"));
                }
                Some(key)
            }
        };
        if let Some(trusted) = trusted {
            match &signed_by {
                None => return Err(CheckpointError::Unsigned),
                Some(found) if found != trusted => {
                    return Err(CheckpointError::WrongKey {
                        found: hex::encode(found.as_bytes()),
                        expected: hex::encode(trusted.as_bytes()),
                    })
                }
                Some(_) => {}
            }
        }
        Ok(Parsed {
            checkpoint,
            root,
            signed_by,
        })
    }
}

/// One line of a checkpoint file, split at spaces.
struct Line<'a> {
    number: usize,
    /// Offset of the line's first byte in the file.
    start: usize,
    parts: Vec<&'a str>,
}

impl<'a> Line<'a> {
    /// `NAME VALUE`.
    fn field(&self, name: &str) -> Result<(usize, &'a str), CheckpointError> {
        match self.parts[..] {
            [tag, value] if tag == name => Ok((self.number, value)),
            _ => Err(malformed(self.number, format!("expected `{name} VALUE`"))),
        }
    }
}

/// `AUDIT_SIGNING_KEY`: the 32-byte Ed25519 secret seed (RFC 8032), as 64 hex digits.
pub fn signing_key_from_hex(raw: &str) -> Result<SigningKey, CheckpointError> {
    let seed = hex::decode(raw.trim())
        .ok()
        .and_then(|s| <[u8; 32]>::try_from(s).ok())
        .ok_or_else(|| {
            CheckpointError::Key(
                "AUDIT_SIGNING_KEY must be an Ed25519 seed: 32 bytes as 64 hex digits".into(),
            )
        })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// `AUDIT_PUBLIC_KEY`: an Ed25519 public key, as 64 hex digits.
pub fn verifying_key_from_hex(raw: &str) -> Result<VerifyingKey, CheckpointError> {
    hex::decode(raw.trim())
        .ok()
        .and_then(|s| <[u8; 32]>::try_from(s).ok())
        .and_then(|k| VerifyingKey::from_bytes(&k).ok())
        .ok_or_else(|| {
            CheckpointError::Key(
                "AUDIT_PUBLIC_KEY must be an Ed25519 public key: 32 bytes as 64 hex digits".into(),
            )
        })
}

fn malformed(line: usize, message: impl Into<String>) -> CheckpointError {
    CheckpointError::Malformed {
        line,
        message: message.into(),
    }
}

fn number((n, raw): (usize, &str)) -> Result<i64, CheckpointError> {
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed(n, format!("`{raw}` is not a number")));
    }
    raw.parse()
        .map_err(|_| malformed(n, format!("`{raw}` is out of range")))
}

fn hex32(n: usize, raw: &str) -> Result<[u8; 32], CheckpointError> {
    hex::decode(raw)
        .ok()
        .filter(|_| raw.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| malformed(n, "expected 32 bytes as 64 lowercase hex digits"))
}

fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'@')
}

fn encode_id(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if plain(b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn decode_id(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = raw.get(i + 1..i + 3)?;
                let b = u8::from_str_radix(hex, 16).ok()?;
                if plain(b) || hex.bytes().any(|h| h.is_ascii_lowercase()) {
                    return None; // one encoding per id, so one text per checkpoint
                }
                out.push(b);
                i += 3;
            }
            b if plain(b) => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    if out.is_empty() {
        return None;
    }
    String::from_utf8(out).ok()
}

/// Follows the replay and compares it with a checkpoint's heads.
pub(crate) struct HeadCheck<'a> {
    checkpoint: &'a Checkpoint,
    /// Accounts whose recorded head was found, whatever it held.
    reached: HashSet<&'a str>,
}

impl<'a> HeadCheck<'a> {
    pub(crate) fn new(checkpoint: &'a Checkpoint) -> Self {
        Self {
            checkpoint,
            reached: HashSet::new(),
        }
    }

    /// One journal event, in any order.
    pub(crate) fn observe(
        &mut self,
        account: &str,
        sequence: i64,
        position: i64,
        hash: &[u8],
    ) -> Option<Discrepancy> {
        let (id, head) = self.checkpoint.heads.get_key_value(account)?;
        if head.sequence != sequence {
            return None;
        }
        self.reached.insert(id.as_str());
        if head.hash == hash && head.position == position {
            return None;
        }
        Some(Discrepancy {
            kind: "checkpoint_head_changed",
            account: Some(account.to_owned()),
            position: Some(position),
            sequence: Some(sequence),
            detail: format!(
                "the checkpoint recorded hash {} at position {}; the journal now holds hash {} at position {position}: history before the checkpoint was rewritten",
                hex::encode(&head.hash),
                head.position,
                hex::encode(hash)
            ),
        })
    }

    /// After the replay: each recorded head that is gone. `last_sequence` is an account's
    /// last sequence in the journal now, if it has events.
    pub(crate) fn finish(self, last_sequence: impl Fn(&str) -> Option<i64>) -> Vec<Discrepancy> {
        let mut found = Vec::new();
        for (account, head) in &self.checkpoint.heads {
            if self.reached.contains(account.as_str()) {
                continue;
            }
            let now = match last_sequence(account) {
                Some(last) => format!("the journal ends at sequence {last}"),
                None => "the journal has no event of this account".to_owned(),
            };
            found.push(Discrepancy {
                kind: "checkpoint_head_missing",
                account: Some(account.clone()),
                position: Some(head.position),
                sequence: Some(head.sequence),
                detail: format!(
                    "the checkpoint recorded sequence {} (hash {}), but {now}: events were deleted",
                    head.sequence,
                    hex::encode(&head.hash)
                ),
            });
        }
        found
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample() -> Checkpoint {
        let mut heads = BTreeMap::new();
        for (id, seq) in [("alice", 6), ("bob", 2), ("we ird%", 1)] {
            heads.insert(
                id.to_owned(),
                Head {
                    sequence: seq,
                    position: seq * 10,
                    hash: vec![seq as u8; 32],
                },
            );
        }
        Checkpoint {
            created: DateTime::parse_from_rfc3339("2026-12-01T21:00:00Z")
                .unwrap()
                .with_timezone(&Utc),
            position: 60,
            events: 9,
            heads,
        }
    }

    #[test]
    fn text_round_trips_signed_and_unsigned() {
        let cp = sample();
        let text = cp.to_text(None);
        assert!(text.contains("\nhead we%20ird%25 1 10 "), "{text}");
        let parsed = Checkpoint::parse(&text, None).unwrap();
        assert_eq!(parsed.checkpoint, cp);
        assert!(parsed.signed_by.is_none());

        let key = signing_key_from_hex(&"07".repeat(32)).unwrap();
        let signed = cp.to_text(Some(&key));
        let parsed = Checkpoint::parse(&signed, Some(&key.verifying_key())).unwrap();
        assert_eq!(parsed.checkpoint, cp);
        assert_eq!(parsed.signed_by, Some(key.verifying_key()));
    }

    #[test]
    fn edits_and_wrong_keys_are_refused() {
        let cp = sample();
        let key = signing_key_from_hex(&"07".repeat(32)).unwrap();
        let other = signing_key_from_hex(&"08".repeat(32)).unwrap();
        let signed = cp.to_text(Some(&key));
        let edited = signed.replace("head bob 2 20", "head bob 1 20");
        assert!(matches!(
            Checkpoint::parse(&edited, None),
            Err(CheckpointError::RootMismatch)
        ));
        let resigned = cp.to_text(Some(&other));
        assert!(matches!(
            Checkpoint::parse(&resigned, Some(&key.verifying_key())),
            Err(CheckpointError::WrongKey { .. })
        ));
        assert!(matches!(
            Checkpoint::parse(&cp.to_text(None), Some(&key.verifying_key())),
            Err(CheckpointError::Unsigned)
        ));
        // A valid root and a signature over something else.
        let mut forged = cp.to_text(None);
        let sig_line = resigned.lines().last().unwrap().replace(
            &hex::encode(other.verifying_key().as_bytes()),
            &hex::encode(key.verifying_key().as_bytes()),
        );
        forged.push_str(&sig_line);
        forged.push('\n');
        assert!(matches!(
            Checkpoint::parse(&forged, None),
            Err(CheckpointError::BadSignature)
        ));
        assert!(matches!(
            Checkpoint::parse("credit-ledger checkpoint 2\n", None),
            Err(CheckpointError::Malformed { line: 1, .. })
        ));
    }
}
