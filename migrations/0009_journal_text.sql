-- The journal keeps each event's payload and metadata as the exact text its hash covers.
--
-- Until now both columns were jsonb, and every read of an event (the audit, the export, the
-- executor's loads, the projector) had the server print jsonb back to text: the largest
-- single cost of reading the journal (over half of the server's time in a full audit, see
-- docs/BENCHMARKS.md). As json, the stored text is sent as it is.
--
-- Nothing about the hash changes. The text stored is jsonb's canonical text: existing rows
-- are converted from `payload::text`, which is what their hashes cover, and every append
-- still goes through jsonb (`executor.rs`, APPEND: `e.payload::jsonb::json`), which checks
-- the JSON, refuses what jsonb refuses (`\u0000`) and prints it canonically. The trigger
-- still hashes `payload::text`, which for json is the stored text itself, so the audit reads
-- the very bytes the trigger hashed.
--
-- The indexes on payload fields (migrations 0004 and 0008) are rebuilt on the same
-- expressions, now json's operators. The table is rewritten under an exclusive lock: about
-- 8 s per million events on a 2-core machine (docs/OPERATIONS.md).
ALTER TABLE events
    ALTER COLUMN payload TYPE json USING payload::text::json,
    ALTER COLUMN metadata TYPE json USING metadata::text::json;
