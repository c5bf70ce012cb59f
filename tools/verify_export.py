#!/usr/bin/env python3
"""Independent verifier for a credit-ledger journal export (docs/AUDITING.md).

Recomputes every account's hash chain and balance from `credit-ledger export` output and,
given a checkpoint, proves the export holds and extends every head it recorded. Uses only
the Python standard library (Ed25519 signatures are checked with the RFC 8032 reference
arithmetic below), so an auditor need not trust the ledger's own binary.

    python3 tools/verify_export.py EXPORT.jsonl [--checkpoint FILE] [--public-key HEX]

Exit codes: 0 everything verified; 1 the export or the journal it shows is inconsistent,
or does not hold the checkpoint; 2 the files cannot be read (bad format, bad checkpoint
root or signature, wrong key).
"""

import argparse
import hashlib
import json
import sys

EXPORT_FORMAT = "credit-ledger export"
CHECKPOINT_MAGIC = "credit-ledger checkpoint 1"

# How each money event changes the balance: (sign, field with the amount). A money event is
# one whose payload has `balance_after`; one of a type missing here is reported, never
# guessed (add it here when the ledger adds it to docs/EVENTS.md).
DELTAS = {
    "RechargeCompleted": (+1, "credits"),
    "RechargeReversed": (-1, "credits"),
    "RechargeReinstated": (+1, "credits"),
    "CreditsDeducted": (-1, "credits"),
    "CreditsRefunded": (+1, "credits"),
    "CreditsAdjusted": (+1, "credits"),
}
TOTALS = {
    "RechargeCompleted": "recharged",
    "RechargeReversed": "reversed",
    "RechargeReinstated": "reinstated",
    "CreditsDeducted": "spent",
    "CreditsRefunded": "refunded",
    "CreditsAdjusted": "granted",
}


class Unreadable(Exception):
    """The input cannot be used at all (exit 2)."""


# --- Ed25519 verification (RFC 8032, section 6: reference arithmetic) ---------------------

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _recover_x(y, sign):
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P)
    if x2 % _P == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P != 0:
        return None
    if (x & 1) != sign:
        x = _P - x
    return x


def _add(p, q):
    a = (p[1] - p[0]) * (q[1] - q[0]) % _P
    b = (p[1] + p[0]) * (q[1] + q[0]) % _P
    c = 2 * p[3] * q[3] * _D % _P
    d = 2 * p[2] * q[2] % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f, g * h, f * g, e * h)


def _mul(s, p):
    q = (0, 1, 1, 0)
    while s > 0:
        if s & 1:
            q = _add(q, p)
        p = _add(p, p)
        s >>= 1
    return q


def _equal(p, q):
    return (p[0] * q[2] - q[0] * p[2]) % _P == 0 and (p[1] * q[2] - q[1] * p[2]) % _P == 0


_GY = 4 * pow(5, _P - 2, _P) % _P
_GX = _recover_x(_GY, 0)
_G = (_GX, _GY, 1, _GX * _GY % _P)


def _decompress(raw):
    if len(raw) != 32:
        return None
    y = int.from_bytes(raw, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    if x is None:
        return None
    return (x, y, 1, x * y % _P)


def ed25519_verify(public, message, signature):
    if len(public) != 32 or len(signature) != 64:
        return False
    a = _decompress(public)
    r = _decompress(signature[:32])
    if a is None or r is None:
        return False
    s = int.from_bytes(signature[32:], "little")
    if s >= _L:
        return False
    h = int.from_bytes(hashlib.sha512(signature[:32] + public + message).digest(), "little") % _L
    return _equal(_mul(s, _G), _add(r, _mul(h, a)))


# --- checkpoint -------------------------------------------------------------------------

_PLAIN = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:@")


def _decode_id(raw):
    out = bytearray()
    i = 0
    data = raw.encode("ascii")
    while i < len(data):
        if data[i] == ord("%"):
            out.append(int(data[i + 1 : i + 3], 16))
            i += 3
        elif data[i] in _PLAIN:
            out.append(data[i])
            i += 1
        else:
            raise Unreadable("checkpoint: bad account id %r" % raw)
    return out.decode("utf-8")


def _hex32(raw, what):
    if len(raw) != 64 or any(c not in "0123456789abcdef" for c in raw):
        raise Unreadable("checkpoint: %s is not 32 bytes of lowercase hex" % what)
    return raw


def read_checkpoint(path, public_key):
    """Returns {"position", "events", "heads": {account: (sequence, position, hash_hex)}}."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.endswith(b"\n"):
        raise Unreadable("checkpoint: every line must end with a newline")
    lines = data.split(b"\n")[:-1]
    text = [line.decode("utf-8") for line in lines]
    if not text or text[0] != CHECKPOINT_MAGIC:
        raise Unreadable("checkpoint: not a %r file" % CHECKPOINT_MAGIC)

    def field(i, name):
        parts = text[i].split(" ") if i < len(text) else []
        if len(parts) != 2 or parts[0] != name:
            raise Unreadable("checkpoint line %d: expected `%s VALUE`" % (i + 1, name))
        return parts[1]

    position = int(field(2, "position"))
    events = int(field(3, "events"))
    accounts = int(field(4, "accounts"))
    field(1, "created")
    heads = {}
    previous = None
    for i in range(5, 5 + accounts):
        parts = text[i].split(" ") if i < len(text) else []
        if len(parts) != 5 or parts[0] != "head":
            raise Unreadable("checkpoint line %d: expected a head" % (i + 1))
        account = _decode_id(parts[1])
        if previous is not None and previous.encode() >= account.encode():
            raise Unreadable("checkpoint line %d: heads out of order" % (i + 1))
        previous = account
        heads[account] = (int(parts[2]), int(parts[3]), _hex32(parts[4], "a head hash"))
    root_index = 5 + accounts
    body = b"".join(line + b"\n" for line in lines[:root_index])
    root = _hex32(field(root_index, "root"), "the root")
    if hashlib.sha256(body).hexdigest() != root:
        raise Unreadable("checkpoint: the root hash does not match its contents (edited)")
    signed_by = None
    if len(text) > root_index + 1:
        parts = text[root_index + 1].split(" ")
        if len(parts) != 4 or parts[:2] != ["signature", "ed25519"] or len(text) > root_index + 2:
            raise Unreadable("checkpoint: expected one `signature ed25519 KEY SIGNATURE` line")
        key = bytes.fromhex(_hex32(parts[2], "the public key"))
        signature = bytes.fromhex(parts[3])
        signed = b"".join(line + b"\n" for line in lines[: root_index + 1])
        if not ed25519_verify(key, signed, signature):
            raise Unreadable("checkpoint: the Ed25519 signature does not verify")
        signed_by = key.hex()
    if public_key is not None:
        if signed_by is None:
            raise Unreadable("checkpoint: not signed, but --public-key was given")
        if signed_by != public_key.lower():
            raise Unreadable("checkpoint: signed by %s, not by %s" % (signed_by, public_key))
    return {"position": position, "events": events, "heads": heads, "root": root, "signed_by": signed_by}


# --- export -----------------------------------------------------------------------------


def canonical(e):
    """The exact bytes the hash covers after the previous hash (docs/AUDITING.md)."""
    return "|".join(
        [
            e["aggregate_type"],
            e["aggregate_id"],
            str(e["sequence"]),
            e["event_type"],
            e["event_version"],
            e["payload"],
            e["metadata"],
        ]
    ).encode("utf-8")


def verify(export_path, checkpoint):
    problems = []
    accounts = {}  # id -> {"sequence", "hash", "balance", "anchored"}
    totals = {name: 0 for name in set(TOTALS.values())}
    with open(export_path, "rb") as f:
        raw_lines = f.read().split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()
    if not raw_lines:
        raise Unreadable("export: empty file")
    try:
        header = json.loads(raw_lines[0])
    except ValueError as e:
        raise Unreadable("export line 1: %s" % e)
    if header.get("format") != EXPORT_FORMAT or header.get("version") != 1:
        raise Unreadable("export: not a %r version 1 file" % EXPORT_FORMAT)
    complete = header.get("account") is None and header.get("from") is None and header.get("to") is None
    end = None
    last_position = 0
    events = 0
    for number, raw in enumerate(raw_lines[1:], start=2):
        try:
            e = json.loads(raw)
        except ValueError as err:
            raise Unreadable("export line %d: %s" % (number, err))
        if end is not None:
            raise Unreadable("export line %d: data after the end line" % number)
        if "end" in e:
            end = e
            continue
        events += 1
        where = "line %d (account %s, sequence %s, position %s)" % (
            number, e.get("aggregate_id"), e.get("sequence"), e.get("position"))
        if e["position"] <= last_position:
            problems.append("%s: positions are not increasing" % where)
        last_position = e["position"]

        account = e["aggregate_id"]
        state = accounts.get(account)
        if state is None:
            state = {"sequence": e["sequence"] - 1, "hash": e["prev_hash"], "balance": 0, "anchored": False}
            if e["sequence"] != 1:
                if complete:
                    problems.append("%s: the account's history does not start at sequence 1" % where)
                state["anchored"] = True
                state["balance"] = None
            accounts[account] = state
        if e["sequence"] != state["sequence"] + 1:
            problems.append("%s: expected sequence %d" % (where, state["sequence"] + 1))
        if e["prev_hash"] != state["hash"]:
            problems.append("%s: prev_hash does not chain from the previous event" % where)
        computed = hashlib.sha256(bytes.fromhex(state["hash"]) + canonical(e)).hexdigest()
        if computed != e["hash"]:
            problems.append("%s: hash mismatch (content or chain edited)" % where)
        state["sequence"] = e["sequence"]
        state["hash"] = e["hash"]

        try:
            payload = json.loads(e["payload"])
        except ValueError as err:
            problems.append("%s: payload is not JSON: %s" % (where, err))
            continue
        body = payload.get(e["event_type"]) if isinstance(payload, dict) and len(payload) == 1 else None
        if not isinstance(body, dict):
            problems.append("%s: payload is not {\"%s\": {...}}" % (where, e["event_type"]))
            continue
        if "balance_after" not in body:
            continue
        if e["event_type"] not in DELTAS:
            problems.append("%s: money event type %s unknown to this verifier" % (where, e["event_type"]))
            continue
        sign, amount_field = DELTAS[e["event_type"]]
        amount = body[amount_field]
        after = body["balance_after"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (amount, after)):
            problems.append("%s: amounts must be integers" % where)
            continue
        totals[TOTALS[e["event_type"]]] += amount
        if state["balance"] is not None and state["balance"] + sign * amount != after:
            problems.append(
                "%s: balance_after is %d, but %d %+d = %d"
                % (where, after, state["balance"], sign * amount, state["balance"] + sign * amount)
            )
        state["balance"] = after

    if end is None:
        problems.append("export: no end line (the file is cut off)")
    elif end.get("events") != events:
        problems.append("export: the end line counts %s events, the file holds %d" % (end.get("events"), events))

    covered = 0
    if checkpoint is not None:
        heads = checkpoint["heads"]
        # Re-read only what the heads need: each account's event at the recorded sequence.
        at_head = {}
        for raw in raw_lines[1:]:
            e = json.loads(raw)
            head = heads.get(e.get("aggregate_id"))
            if head is not None and e["sequence"] == head[0]:
                at_head[e["aggregate_id"]] = (e["position"], e["hash"])
        for account, (sequence, position, digest) in sorted(heads.items()):
            found = at_head.get(account)
            if found is not None:
                covered += 1
                if found != (position, digest):
                    problems.append(
                        "checkpoint: account %s sequence %d was rewritten (recorded hash %s at position %d, export has %s at %d)"
                        % (account, sequence, digest, position, found[1], found[0])
                    )
            elif complete:
                now = accounts.get(account)
                ends = "ends at sequence %d" % now["sequence"] if now else "has no event"
                problems.append(
                    "checkpoint: account %s recorded sequence %d, but the journal %s (events deleted)"
                    % (account, sequence, ends)
                )

    balances = sum(s["balance"] for s in accounts.values() if s["balance"] is not None)
    return problems, {
        "events": events,
        "accounts": len(accounts),
        "complete": complete,
        "anchored_accounts": sum(1 for s in accounts.values() if s["anchored"]),
        "totals": totals,
        "balances": balances,
        "checkpoint_heads_checked": covered,
    }


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="JSON Lines file written by `credit-ledger export`")
    parser.add_argument("--checkpoint", help="checkpoint file written by `credit-ledger audit --checkpoint`")
    parser.add_argument("--public-key", help="Ed25519 public key (hex) that must have signed the checkpoint")
    args = parser.parse_args(argv)
    try:
        checkpoint = read_checkpoint(args.checkpoint, args.public_key) if args.checkpoint else None
        problems, summary = verify(args.export, checkpoint)
    except (Unreadable, OSError, KeyError, TypeError, ValueError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    t = summary["totals"]
    print("events verified    %d (%d accounts%s)" % (
        summary["events"], summary["accounts"],
        "" if summary["complete"] else ", partial export: %d anchored on their first exported event" % summary["anchored_accounts"]))
    print("credits            recharged %d - spent %d + refunded %d + granted %d - reversed %d + reinstated %d" % (
        t["recharged"], t["spent"], t["refunded"], t["granted"], t["reversed"], t["reinstated"]))
    print("balances           %d" % summary["balances"])
    if summary["complete"]:
        flow = t["recharged"] - t["spent"] + t["refunded"] + t["granted"] - t["reversed"] + t["reinstated"]
        if flow != summary["balances"]:
            problems.append("totals: the credits add up to %d, the balances to %d" % (flow, summary["balances"]))
    if checkpoint is not None:
        print("checkpoint         %d of %d heads found in the export, root %s, %s" % (
            summary["checkpoint_heads_checked"], len(checkpoint["heads"]), checkpoint["root"],
            "signed by " + checkpoint["signed_by"] if checkpoint["signed_by"] else "unsigned"))
    if problems:
        print("result             FAILED: %d problems" % len(problems))
        for p in problems:
            print(p)
        return 1
    print("result             OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
