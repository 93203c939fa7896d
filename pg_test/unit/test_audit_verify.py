"""scripts/audit-verify.py without a database: the format against crates/core/src/audit.rs (its
golden hash), every tampering's first break, checkpoints from the export and the server log,
local MACs (with and without the `cryptography` package), a Transit verifier against a stand-in
for urlopen. Pure Python, no database, no network.

    python3 -m pytest pg_test/unit -q
"""

import base64
import copy
import hashlib
import hmac
import importlib.util
import io
import json
import re
import struct
import sys
import urllib.error
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("audit_verify", ROOT / "scripts" / "audit-verify.py")
av = importlib.util.module_from_spec(_spec)
sys.modules["audit_verify"] = av
_spec.loader.exec_module(av)

# crates/core/src/audit.rs, `golden_hash_pins_the_format`: the hash of `rec(1)` after GENESIS.
GOLDEN_RECORD_1_HASH = "b49bb428db015329d298f985c8c737fe006c4ab190973818bb04ca2f2dbe7aac"
ROOT_KEY = bytes(range(1, 33))


def rec(i):
    """The Rust tests' `rec(i)` (note: `seq` stays 0, `..Record::default()`; Chain::append sets it)."""
    return {
        "seq": 0,
        "at_us": 1_700_000_000_000_000 + i,
        "kind": "decrypt",
        "database": "app",
        "session_user": "app",
        "current_role": "app",
        "client_addr": "127.0.0.1",
        "application_name": "psql",
        "backend_pid": 4242,
        "statement_id": i,
        "request_id": f"req-{i}",
        "tenant": "acme",
        "key_versions": "1",
        "operation": "decrypt",
        "value_count": 10_000,
        "failure_count": 0,
        "outcome": "ok",
        "duration_us": 1234,
        "detail": "",
    }


def chain(n, after=None, make=rec, first=1):
    """`Chain::append` over make(first..first+n-1)."""
    prev_seq, prev = (after.seq, after.hash) if after else (0, av.GENESIS)
    out = []
    for i in range(first, first + n):
        r = make(i)
        r["seq"] = prev_seq + 1
        h = av.record_hash(r, prev)
        out.append(av.Stored(r, prev, h))
        prev_seq, prev = r["seq"], h
    return out


def head(s):
    return av.Head(s.record["seq"], s.hash)


def brk(rows, start=None, cps=()):
    b = av.verify_chain(rows, start, list(cps)).first_break
    return str(b) if b else None


# ------------------------------------------------------------------------------------------------
# The format


def test_golden_hash_of_the_rust_test_record_is_reproduced():
    assert av.record_hash(rec(1), av.GENESIS).hex() == GOLDEN_RECORD_1_HASH


def test_golden_hash_independently_of_the_script():
    """The same value from struct.pack straight from the module documentation."""
    r = rec(1)
    s = lambda x: struct.pack(">I", len(x.encode())) + x.encode()  # noqa: E731
    q = lambda v: struct.pack(">q", v)  # noqa: E731
    c = (bytes([1]) + q(r["seq"]) + q(r["at_us"]) + b"".join(s(r[k]) for k in ("kind", "database", "session_user", "current_role", "client_addr", "application_name"))
         + q(r["backend_pid"]) + q(r["statement_id"]) + b"".join(s(r[k]) for k in ("request_id", "tenant", "key_versions", "operation"))
         + q(r["value_count"]) + q(r["failure_count"]) + s(r["outcome"]) + q(r["duration_us"]) + s(r["detail"]))
    assert c == av.canonical(r)
    assert hashlib.sha256(b"pg_envelope audit chain v1" + bytes(32) + c).hexdigest() == GOLDEN_RECORD_1_HASH


def test_every_field_and_the_previous_hash_count_and_strings_are_unambiguous():
    base = av.record_hash(rec(1), av.GENESIS)
    for name, typ in av.FIELDS:
        r = rec(1)
        r[name] = r[name] + 1 if typ == "i" else r[name] + "x"
        assert av.record_hash(r, av.GENESIS) != base, name
    r = rec(1)
    r["database"], r["session_user"] = "ap", "papp"
    assert av.record_hash(r, av.GENESIS) != base
    assert av.record_hash(rec(1), b"\x01" * 32) != base
    # Lengths are bytes, not characters.
    r = rec(1)
    r["detail"] = "ünïcode détail"
    assert struct.pack(">I", len("ünïcode détail".encode())) + "ünïcode détail".encode() in av.canonical(r)


def test_checkpoint_message_layout():
    m = av.checkpoint_message(10, b"\x03" * 32, 99)
    assert m == b"pg_envelope audit checkpoint v1" + (10).to_bytes(8, "big") + b"\x03" * 32 + (99).to_bytes(8, "big")


# ------------------------------------------------------------------------------------------------
# The chain (the Rust test `every_tampering_is_found_at_its_record`, same cases)


def test_an_intact_chain_verifies_to_its_head():
    rows = chain(50)
    v = av.verify_chain(rows, None, [])
    assert (v.first_break, v.records, v.head) == (None, 50, head(rows[49]))
    v2 = av.verify_chain(rows[20:], head(rows[19]), [])
    assert (v2.first_break, v2.head) == (None, v.head)


def test_every_tampering_is_found_at_its_record():
    rows = chain(10)
    t = copy.deepcopy(rows)
    t[4].record["value_count"] = 1
    assert brk(t) == "record 5 does not match its hash: altered"
    t = copy.deepcopy(rows)
    t[4].record["tenant"] = "globex"
    t[4].hash = av.record_hash(t[4].record, t[4].prev_hash)
    assert brk(t) == "record 6 does not follow the record before it: reordered or replaced"
    t = copy.deepcopy(rows)
    del t[3]
    assert brk(t) == "record 4 is missing (the next record is 5): deleted"
    t = copy.deepcopy(rows)
    t.insert(3, copy.deepcopy(rows[2]))
    assert brk(t) == "record 3 appears twice: inserted"
    t = copy.deepcopy(rows)
    t[5], t[6] = t[6], t[5]
    t[5].record["seq"], t[6].record["seq"] = 6, 7
    assert brk(t) == "record 6 does not follow the record before it: reordered or replaced"
    cp = [head(rows[9])]
    assert brk(rows[:7], None, cp) == "the chain ends at record 7, before the checkpoint at record 10: truncated"
    # A tail rewritten from record 9 on: a valid chain, caught by the checkpoint.
    forged9 = rec(9)
    forged9["value_count"] = 1
    t = rows[:8] + chain(2, head(rows[7]), lambda i: forged9 if i == 9 else rec(i), 9)
    assert brk(t) is None
    assert brk(t, None, cp) == "record 10 does not have the hash its checkpoint certified: rewritten"
    assert brk(rows, None, cp) is None
    # An older checkpoint the rewritten tail no longer matches.
    older = [head(rows[9]), head(rows[4])]
    forged5 = rec(5)
    forged5["value_count"] = 99
    t = rows[:4] + chain(1, head(rows[3]), lambda i: forged5, 5)
    assert brk(t, None, older[1:]) == "record 5 does not have the hash its checkpoint certified: rewritten"
    # After a retention.
    anchor = head(rows[4])
    assert brk(rows[5:], anchor, older) is None
    assert brk(rows[6:], anchor, older) == "record 6 is missing (the next record is 7): deleted"


# ------------------------------------------------------------------------------------------------
# Files: the export as envelope.audit_export() writes it, the server log's lines


def export_line(obj):
    # json_build_object's spacing; raw UTF-8.
    return json.dumps(obj, separators=(", ", " : "), ensure_ascii=False)


def record_obj(s):
    r = s.record
    o = {"type": "record", "seq": r["seq"], "at": "2023-11-14T22:13:20.000001+00:00"}
    for k, _ in av.FIELDS[1:]:
        o[k] = r[k]
    o["prev_hash"], o["hash"] = s.prev_hash.hex(), s.hash.hex()
    return o


def checkpoint_obj(seq, h, at_us, mac, provider="local", key_name="local /k/root.key (development only)"):
    return {"type": "checkpoint", "seq": seq, "hash": h.hex(), "at": "x", "at_us": at_us, "method": "hmac-sha256",
            "provider": provider, "key_name": key_name, "mac": mac.hex()}


def local_cp(s, at_us=None, key=ROOT_KEY):
    at_us = at_us if at_us is not None else s.record["at_us"] + 500_000
    mac = av.local_checkpoint_mac(key, av.checkpoint_message(s.record["seq"], s.hash, at_us))
    return checkpoint_obj(s.record["seq"], s.hash, at_us, mac)


def log_line(cp):
    return (f"2026-12-02 05:00:00.000 UTC [123] LOG:  pg_envelope audit checkpoint: seq={cp['seq']} hash={cp['hash']} "
            f"at_us={cp['at_us']} provider={cp['provider']} mac={cp['mac']}")


def write(tmp_path, name, objs_or_lines, trailer=True):
    """An export file. Every real export ends with its trailer: one is added (head only: no
    from_seq or time, which other checks read) unless the objects carry one, or `trailer` is off."""
    objs_or_lines = list(objs_or_lines)
    if trailer and all(isinstance(o, dict) for o in objs_or_lines) and not any(o.get("type") == "export" for o in objs_or_lines):
        seqs = [o["seq"] for o in objs_or_lines if o.get("type") == "record" and isinstance(o.get("seq"), int)]
        objs_or_lines.append({"type": "export", "head_seq": seqs[-1] if seqs else None})
    p = tmp_path / name
    p.write_text("".join((o if isinstance(o, str) else export_line(o)) + "\n" for o in objs_or_lines), encoding="utf-8")
    return str(p)


@pytest.fixture
def key_file(tmp_path):
    p = tmp_path / "root.key"
    p.write_text(ROOT_KEY.hex() + "\n")
    return str(p)


def run(capsys, *argv):
    code = av.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def run_json(capsys, *argv):
    code = av.main([str(a) for a in argv] + ["--json"])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def trail():
    """20 records, checkpoints at 10 and 20 (local provider)."""
    rows = chain(20)
    return rows, [local_cp(rows[9]), local_cp(rows[19])]


def test_an_intact_export_verifies_with_its_macs(tmp_path, capsys, trail, key_file):
    rows, cps = trail
    exp = write(tmp_path, "a.jsonl", [record_obj(s) for s in rows] + cps)
    code, out = run(capsys, exp, "--local-root-key", key_file)
    assert code == 0, out
    assert "INTACT" in out and "2 checkpoints of provider local (local): MAC verified" in out
    assert ROOT_KEY.hex() not in out
    code, j = run_json(capsys, exp, "--local-root-key", key_file)
    assert (code, j["ok"], j["status"], j["head_seq"], j["checkpoint_seq"], j["first_break"]) == (0, True, "intact", 20, 20, None)
    assert j["mac_counts"] == {"verified": 2, "invalid": 0, "not checked": 0, "error": 0}
    # Without the key: intact, the MACs reported as not checked.
    code, out = run(capsys, exp)
    assert code == 0 and "MAC not checked (provider local)" in out, out


@pytest.mark.parametrize(
    "name, tamper, expected",
    [
        ("edit", lambda L: L[12].update(value_count=7), "record 13 does not match its hash: altered"),
        ("delete", lambda L: L.pop(12), "record 13 is missing (the next record is 14): deleted"),
        ("insert", lambda L: L.insert(12, dict(L[11])), "record 12 appears twice: inserted"),
        ("reorder", lambda L: (L.__setitem__(slice(12, 14), [dict(L[13], seq=13), dict(L[12], seq=14)])),
         "record 13 does not follow the record before it: reordered or replaced"),
        ("truncate-tail", lambda L: L.__delitem__(slice(15, 20)), "the chain ends at record 15, before the checkpoint at record 20: truncated"),
    ],
)
def test_each_tampering_of_the_export_is_its_first_break(tmp_path, capsys, trail, key_file, name, tamper, expected):
    rows, cps = trail
    lines = [record_obj(s) for s in rows]
    tamper(lines)
    exp = write(tmp_path, f"{name}.jsonl", lines + cps)
    code, j = run_json(capsys, exp, "--local-root-key", key_file)
    assert (code, j["status"], j["first_break"]) == (1, "broken", expected), j
    code, out = run(capsys, exp, "--local-root-key", key_file)
    assert code == 1 and f"BROKEN: {expected}" in out


def test_a_tail_dropped_with_its_checkpoint_rows_is_caught_by_the_log(tmp_path, capsys, trail, key_file):
    rows, cps = trail
    log = write(tmp_path, "server.log", ["2026-12-02 LOG:  something else"] + [log_line(c) for c in cps])
    exp = write(tmp_path, "cut.jsonl", [record_obj(s) for s in rows[:15]] + cps[:1])
    assert run(capsys, exp, "--local-root-key", key_file)[0] == 0, "without the log the cut is invisible"
    code, j = run_json(capsys, exp, "--local-root-key", key_file, "--log", log)
    assert j["first_break"] == "the chain ends at record 15, before the checkpoint at record 20: truncated", j
    assert code == 1 and "only in the server log" in j["hint"]
    # A log copy and an export row of the same checkpoint are one checkpoint.
    exp = write(tmp_path, "full.jsonl", [record_obj(s) for s in rows] + cps)
    code, j = run_json(capsys, exp, "--local-root-key", key_file, "--log", log)
    assert code == 0 and len(j["checkpoints"]) == 2 and all(c["in_export"] and c["in_log"] for c in j["checkpoints"]), j
    # A log bounded at the export's time ignores the checkpoints made after it.
    code, j = run_json(capsys, str(tmp_path / "cut.jsonl"), "--log", log, "--log-until", cps[0]["at_us"] + 1)
    assert code == 0 and j["ignored_log_checkpoints"] == 1, j


def test_a_rewritten_tail_with_its_checkpoint_rows_deleted(tmp_path, capsys, trail, key_file):
    rows, cps = trail
    forged = rec(16)
    forged["value_count"] = 1
    t = rows[:15] + chain(5, head(rows[14]), lambda i: forged if i == 16 else rec(i), 16)
    log = write(tmp_path, "server.log", [log_line(c) for c in cps])
    exp = write(tmp_path, "rw.jsonl", [record_obj(s) for s in t] + cps[:1])
    code, j = run_json(capsys, exp, "--local-root-key", key_file, "--log", log)
    assert (code, j["first_break"]) == (1, "record 20 does not have the hash its checkpoint certified: rewritten"), j


def test_a_log_line_with_an_invalid_mac_is_a_warning_not_a_break(tmp_path, capsys, trail, key_file):
    """Insider review 61b: any role can RAISE LOG a line that looks like a checkpoint; with an
    invalid MAC it made an intact export BROKEN. Only the export's own checkpoints and verified
    log lines are evidence."""
    rows, cps = trail
    fake = dict(cps[0], seq=14, hash="ab" * 32, mac="cd" * 32)
    log = write(tmp_path, "server.log", [log_line(c) for c in cps] + [log_line(fake)], trailer=False)
    exp = write(tmp_path, "intact.jsonl", [record_obj(s) for s in rows] + cps)
    code, j = run_json(capsys, exp, "--local-root-key", key_file, "--log", log)
    assert code == 0 and j["first_break"] is None, j
    assert any("server log at record 14 has an invalid MAC" in w for w in j["warnings"]), j


def test_a_forged_checkpoint_mac_is_a_break(tmp_path, capsys, trail, key_file):
    rows, cps = trail
    bad = dict(cps[1], mac=hashlib.sha256(bytes.fromhex(cps[1]["mac"])).hexdigest())
    exp = write(tmp_path, "forged.jsonl", [record_obj(s) for s in rows] + [cps[0], bad])
    code, j = run_json(capsys, exp, "--local-root-key", key_file)
    assert (code, j["first_break"]) == (1, "the checkpoint at record 20 has an invalid MAC (provider local): forged or altered"), j
    assert j["mac_counts"]["invalid"] == 1 and j["chain_break"] is None
    # A checkpoint MACed with another root key (someone with another key file) fails too.
    other = local_cp(rows[19], key=b"\x08" * 32)
    exp = write(tmp_path, "other.jsonl", [record_obj(s) for s in rows] + [other])
    assert run(capsys, exp, "--local-root-key", key_file)[0] == 1
    # Without the key the forgery goes unnoticed but is marked, and --require-mac refuses it.
    code, out = run(capsys, exp)
    assert code == 0 and "MAC not checked (provider local)" in out
    code, j = run_json(capsys, exp, "--require-mac")
    assert code == 1 and "no verified MAC" in j["first_break"], j


def test_local_mac_stdlib_and_cryptography_agree_and_rfc5869_vector():
    # RFC 5869, test case 1.
    okm = av.hkdf_sha256_stdlib(bytes(range(13)), b"\x0b" * 22, bytes(range(0xF0, 0xFA)), 42)
    assert okm.hex() == "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    m = av.checkpoint_message(10, b"\x03" * 32, 99)
    stdlib = av.local_checkpoint_mac(b"\x07" * 32, m, use_cryptography=False)
    if av.HAVE_CRYPTOGRAPHY:
        assert av.local_checkpoint_mac(b"\x07" * 32, m, use_cryptography=True) == stdlib
    assert stdlib != av.local_checkpoint_mac(b"\x08" * 32, m, use_cryptography=False)
    assert stdlib != av.local_checkpoint_mac(b"\x07" * 32, av.checkpoint_message(11, b"\x03" * 32, 99), use_cryptography=False)
    assert stdlib != av.local_checkpoint_mac(b"\x07" * 32, av.checkpoint_message(10, b"\x03" * 32, 100), use_cryptography=False)
    # The MAC key is derived, not the root key itself.
    assert stdlib != hmac.new(b"\x07" * 32, m, hashlib.sha256).digest()


def test_the_stdlib_path_verifies_when_cryptography_is_absent(tmp_path, capsys, trail, key_file, monkeypatch):
    monkeypatch.setattr(av, "HAVE_CRYPTOGRAPHY", False)
    rows, cps = trail
    exp = write(tmp_path, "a.jsonl", [record_obj(s) for s in rows] + cps)
    code, j = run_json(capsys, exp, "--local-root-key", key_file)
    assert code == 0 and j["mac_counts"]["verified"] == 2


def test_root_key_file_forms(tmp_path):
    assert av.parse_root_key(ROOT_KEY) == ROOT_KEY
    assert av.parse_root_key(ROOT_KEY.hex().encode()) == ROOT_KEY
    assert av.parse_root_key(ROOT_KEY.hex().upper().encode() + b"\n") == ROOT_KEY
    for bad in (b"", ROOT_KEY[:31], ROOT_KEY.hex().encode() + b"\n\n", b"zz" * 32):
        with pytest.raises(av.InputError) as e:
            av.parse_root_key(bad)
        assert "32 raw bytes or 64 hex" in str(e.value)


def test_retention_and_from_seq_need_an_anchor(tmp_path, capsys, trail, key_file):
    rows, cps = trail
    # Kept records 11..20 after a prune up to checkpoint 10: anchored by it.
    exp = write(tmp_path, "pruned.jsonl", [record_obj(s) for s in rows[10:]] + cps)
    code, j = run_json(capsys, exp, "--local-root-key", key_file)
    assert (code, j["anchor_seq"], j["anchored"], j["first_seq"], j["head_seq"]) == (0, 10, True, 11, 20), j
    # The anchor from the log only (its row gone with the export's from_seq).
    log = write(tmp_path, "server.log", [log_line(c) for c in cps])
    exp = write(tmp_path, "from11.jsonl", [record_obj(s) for s in rows[10:]] + cps[1:])
    assert run(capsys, exp, "--local-root-key", key_file, "--log", log)[0] == 0
    # Records 11 and up without a checkpoint at 10: not anchored.
    code, j = run_json(capsys, exp, "--local-root-key", key_file)
    assert (code, j["first_break"], j["break_kind"], j["anchored"]) == (1, "record 1 is missing (the next record is 11): deleted", "unanchored", False), j
    assert j["hint"].startswith("the export starts at record 11 and no checkpoint at record 10 anchors it: the start is not anchored"), j
    code, out = run(capsys, exp, "--local-root-key", key_file)
    assert code == 1 and "the start is not anchored" in out, out
    # Records 12 and up: record 11 deleted, not anchored either.
    exp = write(tmp_path, "from12.jsonl", [record_obj(s) for s in rows[11:]] + cps)
    code, j = run_json(capsys, exp, "--local-root-key", key_file)
    # (envelope.audit_verify() words it the same: from the nearest checkpoint before it.)
    assert (code, j["first_break"]) == (1, "record 11 is missing (the next record is 12): deleted"), j
    assert "no checkpoint at record 11 anchors it: the start is not anchored" in j["hint"], j
    # An anchor whose hash is not the first record's prev_hash: the first record does not follow.
    fake = local_cp(rows[9])
    fake = checkpoint_obj(10, b"\x05" * 32, fake["at_us"], av.local_checkpoint_mac(ROOT_KEY, av.checkpoint_message(10, b"\x05" * 32, fake["at_us"])))
    exp = write(tmp_path, "badanchor.jsonl", [record_obj(s) for s in rows[10:]] + [fake, cps[1]])
    code, j = run_json(capsys, exp, "--local-root-key", key_file)
    assert (code, j["first_break"]) == (1, "record 11 does not follow the record before it: reordered or replaced"), j
    # Older checkpoints in the log (of pruned records) do not count against the kept chain.
    exp = write(tmp_path, "pruned2.jsonl", [record_obj(s) for s in rows[10:]] + cps[1:])
    old = local_cp(rows[2])
    log2 = write(tmp_path, "server2.log", [log_line(old)] + [log_line(c) for c in cps])
    assert run(capsys, exp, "--local-root-key", key_file, "--log", log2)[0] == 0


def test_a_whole_trail_export_that_starts_later_needs_the_prune_record(tmp_path, capsys, key_file):
    """An export from record 1 (its trailer says so) whose records start after a checkpoint: the
    records before were removed, and only audit_prune does that, recording the anchor. Without
    that record they were deleted by hand (envelope.audit_verify() says the same)."""
    first = chain(10)
    needle = f"the kept chain starts after checkpoint 10 (hash {first[9].hash.hex()})"
    pruned = lambda i: dict(rec(i), operation="audit_prune", kind="key_op", detail=f"removed records 1..10 older than 1 day; {needle}") if i == 13 else rec(i)
    kept = chain(10, after=head(first[9]), make=pruned, first=11)
    cps = [local_cp(first[9]), local_cp(kept[9])]
    trailer = {"type": "export", "from_seq": 1, "head_seq": 20, "at_us": kept[9].record["at_us"] + 10_000_000, "database": "app"}
    exp = write(tmp_path, "pruned.jsonl", [record_obj(s) for s in kept] + cps + [trailer])
    code, j = run_json(capsys, exp, "--local-root-key", key_file)
    assert code == 0 and j["first_break"] is None, j
    bare = chain(10, after=head(first[9]), first=11)
    exp = write(tmp_path, "deleted.jsonl", [record_obj(s) for s in bare] + [local_cp(first[9]), local_cp(bare[9]), trailer])
    code, j = run_json(capsys, exp, "--local-root-key", key_file)
    assert (code, j["first_break"]) == (1, "the records before record 11 are gone and no audit_prune record covered by a checkpoint says so: "
                                           "deleted (or a prune whose checkpoint is not written yet, or was not before a restart: prune again)"), j
    # A prune record no checkpoint covers (after the newest one: the part of the trail a
    # superuser can rewrite) does not count (insider review 51).
    exp = write(tmp_path, "uncovered.jsonl", [record_obj(s) for s in kept] + [local_cp(first[9]), local_cp(kept[1]), trailer])
    code, j = run_json(capsys, exp, "--local-root-key", key_file)
    assert code == 1 and "no audit_prune record covered by a checkpoint" in j["first_break"], j
    # A writer_start record between the prune record and the checkpoint covering it: the writer
    # started on an unwitnessed tail and checkpointed it, a made-up prune record included
    # (insider review 52).
    started = lambda i: dict(pruned(i), kind="writer_start", operation="writer", detail="writer_start: ...") if i == 15 else pruned(i)
    restarted = chain(10, after=head(first[9]), make=started, first=11)
    exp = write(tmp_path, "restarted.jsonl", [record_obj(s) for s in restarted] + [local_cp(first[9]), local_cp(restarted[9]), trailer])
    code, j = run_json(capsys, exp, "--local-root-key", key_file)
    assert code == 1 and "no audit_prune record covered by a checkpoint" in j["first_break"], j
    # The covering checkpoint's MAC must have been verified here (review 52 F5): one made with
    # an HSM key this run cannot check does not cover the prune record.
    hsm = dict(local_cp(kept[9]), provider="hsm", key_name="pkcs11 x")
    exp = write(tmp_path, "hsmcover.jsonl", [record_obj(s) for s in kept] + [local_cp(first[9]), hsm, trailer])
    code, j = run_json(capsys, exp, "--local-root-key", key_file)
    assert code == 1 and "no audit_prune record covered by a checkpoint" in j["first_break"], j
    # A trailer that says the export was asked from record 11 (a replaced audit_export can write
    # one): --from-seq 1 says what was asked (review 52 F3).
    exp = write(tmp_path, "liar.jsonl", [record_obj(s) for s in bare] + [local_cp(first[9]), local_cp(bare[9]), dict(trailer, from_seq=11)])
    assert run(capsys, exp, "--local-root-key", key_file)[0] == 0
    code, j = run_json(capsys, exp, "--local-root-key", key_file, "--from-seq", "1")
    assert code == 1 and "no audit_prune record covered by a checkpoint" in j["first_break"], j
    # The writer's own tamper record in an otherwise whole chain is a break (insider review 53:
    # a made-up prune record, then the writer found the head changed and said so).
    tampered = lambda i: dict(pruned(i), kind="tamper", operation="writer", outcome="alert", detail="the chain's head changed") if i == 15 else pruned(i)
    t_chain = chain(10, after=head(first[9]), make=tampered, first=11)
    exp = write(tmp_path, "tampered.jsonl", [record_obj(s) for s in t_chain] + [local_cp(first[9]), local_cp(t_chain[9]), trailer])
    code, j = run_json(capsys, exp, "--local-root-key", key_file)
    assert code == 1 and "no audit_prune record covered by a checkpoint" in j["first_break"], j
    exp = write(tmp_path, "tampered11.jsonl", [record_obj(s) for s in t_chain] + [local_cp(first[9]), local_cp(t_chain[9]), dict(trailer, from_seq=11)])
    code, j = run_json(capsys, exp, "--local-root-key", key_file)
    assert code == 1 and j["first_break"].startswith("record 15 is the writer's tamper record"), j
    # A chain_restart record in the middle of a chain reads the same (review 54: a replaced
    # table that already held records).
    restarted_mid = lambda i: dict(tampered(i), kind="chain_restart") if i == 15 else tampered(i)
    r_chain = chain(10, after=head(first[9]), make=restarted_mid, first=11)
    exp = write(tmp_path, "restart_mid.jsonl", [record_obj(s) for s in r_chain] + [local_cp(first[9]), local_cp(r_chain[9]), dict(trailer, from_seq=11)])
    code, j = run_json(capsys, exp, "--local-root-key", key_file)
    assert code == 1 and j["first_break"].startswith("record 15 is the writer's tamper record"), j
    # An export asked from a later record starts after a checkpoint without any prune: fine.
    exp = write(tmp_path, "from11.jsonl", [record_obj(s) for s in bare] + [local_cp(first[9]), local_cp(bare[9]), dict(trailer, from_seq=11)])
    assert run(capsys, exp, "--local-root-key", key_file)[0] == 0


def test_a_log_of_an_earlier_chain(tmp_path, capsys, key_file):
    """The extension dropped and created again: the log holds the old chain's checkpoints."""
    old = chain(30, make=lambda i: dict(rec(i), at_us=1_600_000_000_000_000 + i))
    new = chain(12)
    log = write(tmp_path, "server.log", [log_line(local_cp(old[29])), log_line(local_cp(new[11]))])
    exp = write(tmp_path, "a.jsonl", [record_obj(s) for s in new] + [local_cp(new[11])])
    code, j = run_json(capsys, exp, "--local-root-key", key_file, "--log", log)
    assert code == 1 and "truncated" in j["first_break"] and "earlier chain" in j["hint"], j
    code, j = run_json(capsys, exp, "--local-root-key", key_file, "--log", log, "--log-since", "2023-11-14T00:00:00Z")
    assert code == 0 and j["ignored_log_checkpoints"] == 1, j


def test_copy_text_format_export_with_backslashes_and_quotes(tmp_path, capsys, key_file):
    weird = {3: 'say "hi"', 4: "C:\\dir\\file", 5: "tab\there", 6: "ünïcode\\\"", 7: "\\\\"}
    rows = chain(8, make=lambda i: dict(rec(i), detail=weird.get(i, ""), application_name='a"b' if i == 2 else "psql"))
    cps = [local_cp(rows[7])]
    lines = [export_line(o) for o in [record_obj(s) for s in rows] + cps + [{"type": "export", "head_seq": 8}]]
    copied = [ln.replace("\\", "\\\\") for ln in lines]  # what COPY TO (text format) does to them
    for name, content in (("raw.jsonl", lines), ("copy.jsonl", copied)):
        exp = write(tmp_path, name, content)
        code, j = run_json(capsys, exp, "--local-root-key", key_file)
        assert (code, j["head_seq"], j["encoding"]) == (0, 8, "copy" if name == "copy.jsonl" else "json"), (name, j)
    # Only literal backslashes: undecidable from the text, the stored hash decides.
    rows = chain(3, make=lambda i: dict(rec(i), detail="\\\\" if i == 2 else ""))
    lines = [export_line(record_obj(s)) for s in rows] + [export_line({"type": "export", "head_seq": 3})]
    for content in (lines, [ln.replace("\\", "\\\\") for ln in lines]):
        exp = write(tmp_path, "amb.jsonl", content)
        assert run_json(capsys, exp)[0] == 0


def test_unchecked_providers_and_require_mac(tmp_path, capsys, trail, key_file):
    rows, cps = trail
    aws = checkpoint_obj(20, rows[19].hash, cps[1]["at_us"], b"\x01" * 32, provider="kms", key_name="aws-kms arn:aws:kms:x")
    hsm = checkpoint_obj(20, rows[19].hash, cps[1]["at_us"] + 1, b"\x02" * 32, provider="hsm", key_name="pkcs11 tok/mac")
    exp = write(tmp_path, "a.jsonl", [record_obj(s) for s in rows] + [cps[0], aws, hsm])
    code, j = run_json(capsys, exp, "--local-root-key", key_file)
    assert code == 0, j
    notes = {c["provider"]: (c["kind"], c["note"]) for c in j["checkpoints"]}
    assert notes["kms"] == ("aws_kms", "MAC not checked (provider kms)")
    assert notes["hsm"] == ("pkcs11", "MAC not checked (provider hsm)")
    assert notes["local"] == ("local", "MAC verified")
    code, j = run_json(capsys, exp, "--local-root-key", key_file, "--require-mac")
    assert code == 1 and j["first_break"] == "the checkpoint at record 20 has no verified MAC (provider kms): not checked (--require-mac)"


def test_aws_verification_without_boto3_says_it_cannot(tmp_path, capsys, trail, monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 -> ImportError
    rows, cps = trail
    aws = checkpoint_obj(20, rows[19].hash, cps[1]["at_us"], b"\x01" * 32, provider="kms", key_name="aws-kms k")
    exp = write(tmp_path, "a.jsonl", [record_obj(s) for s in rows] + [aws])
    code, out = run(capsys, exp, "--aws-key-id", "k", "--aws-region", "us-east-1")
    assert code == 2 and "boto3 is not installed" in out, out


class FakeTransit:
    """Stands in for urllib.request.urlopen: a Transit verify endpoint with one HMAC key."""

    def __init__(self, token, key=b"transit-hmac-key"):
        self.token, self.key, self.calls = token, key, []

    def mac(self, message):
        return "vault:v1:" + base64.b64encode(hmac.new(self.key, message, hashlib.sha256).digest()).decode()

    def __call__(self, req, timeout=None, context=None):
        self.calls.append(req.full_url)
        assert req.get_method() == "POST" and req.get_header("X-vault-token") == self.token
        m = re.fullmatch(r"http://127\.0\.0\.1:8200/v1/transit/verify/([^/]+)/sha2-256", req.full_url)
        body = json.loads(req.data)
        if not m or m.group(1) != "pg-audit":
            raise urllib.error.HTTPError(req.full_url, 400, "bad", {}, io.BytesIO(b'{"errors":["encryption key not found"]}'))
        valid = hmac.compare_digest(self.mac(base64.b64decode(body["input"])), body["hmac"])
        return io.BytesIO(json.dumps({"data": {"valid": valid}}).encode())


def test_transit_macs_are_verified_by_transit_and_the_token_is_never_printed(tmp_path, capsys, trail, monkeypatch):
    rows, cps = trail
    token = "s.SECRET-TOKEN-VALUE"
    fake = FakeTransit(token)
    monkeypatch.setattr(av.urllib.request, "urlopen", fake)
    tok = tmp_path / "token"
    tok.write_text(token + "\n")

    def transit_cp(s, at_us, mac=None):
        msg = av.checkpoint_message(s.record["seq"], s.hash, at_us)
        text = mac or fake.mac(msg)
        return checkpoint_obj(s.record["seq"], s.hash, at_us, text.encode(), provider="bao", key_name="transit/pg-audit")

    good = [transit_cp(rows[9], 1), transit_cp(rows[19], 2)]
    opts = ["--transit-url", "http://127.0.0.1:8200", "--transit-token-file", tok, "--transit-key", "pg-audit"]
    exp = write(tmp_path, "a.jsonl", [record_obj(s) for s in rows] + good)
    code, out = run(capsys, exp, *opts)
    assert code == 0 and "2 checkpoints of provider bao (vault_transit): MAC verified" in out, out
    assert token not in out and len(fake.calls) == 2
    # A log-only Transit checkpoint (no key name) is recognised by its vault:v1: MAC.
    log = write(tmp_path, "server.log", [log_line(good[1])])
    exp = write(tmp_path, "b.jsonl", [record_obj(s) for s in rows] + good[:1])
    code, j = run_json(capsys, exp, *opts, "--log", log)
    assert code == 0 and [c["kind"] for c in j["checkpoints"]] == ["vault_transit", "vault_transit"], j
    # Another MAC text: invalid.
    forged = transit_cp(rows[19], 2, mac="vault:v1:" + base64.b64encode(b"\x00" * 32).decode())
    exp = write(tmp_path, "c.jsonl", [record_obj(s) for s in rows] + [good[0], forged])
    code, j = run_json(capsys, exp, *opts)
    assert code == 1 and "invalid MAC (provider bao)" in j["first_break"], j
    # A key Transit does not know: an error (exit 2), not a verdict, and still no token.
    code, out = run(capsys, str(tmp_path / "a.jsonl"), *opts[:-1], "other-key")
    assert code == 2 and "could not be checked" in out and token not in out, out
    # Plain http to a non-loopback address is refused (the token would travel in clear).
    code, out = run(capsys, str(tmp_path / "a.jsonl"), "--transit-url", "http://10.1.2.3:8200", *opts[2:])
    assert code == 2 and "plain http" in out


def test_input_errors_exit_2(tmp_path, capsys, trail):
    rows, cps = trail
    assert run(capsys, tmp_path / "missing.jsonl")[0] == 2
    assert run(capsys, write(tmp_path, "x.jsonl", ["not json"]))[0] == 2
    o = record_obj(rows[0])
    del o["tenant"]
    code, out = run(capsys, write(tmp_path, "y.jsonl", [o]))
    assert code == 2 and '"tenant" is missing' in out
    o = dict(record_obj(rows[0]), value_count=True)
    assert run(capsys, write(tmp_path, "z.jsonl", [o]))[0] == 2
    o = dict(record_obj(rows[0]), hash="ab")
    assert run(capsys, write(tmp_path, "h.jsonl", [o]))[0] == 2
    dup = export_line(record_obj(rows[0]))[:-1] + ', "value_count" : 1}'
    code, out = run(capsys, write(tmp_path, "d.jsonl", [dup]))
    assert code == 2 and "a key twice" in out
    bad_key = tmp_path / "k"
    bad_key.write_bytes(b"short")
    code, out = run(capsys, write(tmp_path, "ok.jsonl", [record_obj(s) for s in rows]), "--local-root-key", bad_key)
    assert code == 2 and "32 raw bytes or 64 hex" in out
    with pytest.raises(SystemExit) as e:
        av.main([str(tmp_path / "ok.jsonl"), "--transit-url", "http://127.0.0.1:1"])
    assert e.value.code == 2
    capsys.readouterr()


def test_an_export_is_held_to_its_trailer_and_to_what_the_writer_committed(tmp_path, capsys, trail):
    """Insider review 61: an export cut after a record line (no checkpoints, no trailer) verified
    intact; a tail rewritten and re-chained while the writer was held up exported and verified
    intact. Every export ends with its trailer, whose head is its last record; the trailer
    carries the head the writer had committed (shared memory), which the export must hold."""
    rows, cps = trail
    recs = [record_obj(s) for s in rows]
    # Cut short: no trailer, or records after it, or a trailer whose head is further on.
    code, j = run_json(capsys, write(tmp_path, "cut.jsonl", recs[:8], trailer=False))
    assert (code, j["first_break"]) == (1, "the export has no trailer (its last line): cut short, or not an export of envelope.audit_export()"), j
    code, j = run_json(capsys, write(tmp_path, "after.jsonl", recs[:8] + [{"type": "export", "head_seq": 8}] + recs[8:], trailer=False))
    assert code == 1 and "no trailer" in j["first_break"], j
    code, j = run_json(capsys, write(tmp_path, "short.jsonl", recs[:8] + [{"type": "export", "head_seq": 20}]))
    assert (code, j["first_break"]) == (1, "the export's records end at record 8, but its trailer says the trail ended at record 20: cut short"), j
    # Held to the writer's committed head.
    ok = {"type": "export", "head_seq": 20, "writer_head_seq": 19, "writer_head_hash": rows[18].hash.hex(), "writer_committed_seq": 20}
    code, j = run_json(capsys, write(tmp_path, "ok.jsonl", recs + cps + [ok]))
    assert code == 0 and j["first_break"] is None, j
    # The tail from record 12 rewritten and re-chained: a valid chain the writer never wrote.
    forged12 = rec(12)
    forged12["current_role"] = "postgres"
    t = rows[:11] + chain(9, head(rows[10]), lambda i: forged12 if i == 12 else rec(i), 12)
    code, j = run_json(capsys, write(tmp_path, "rewritten.jsonl", [record_obj(s) for s in t] + cps[:1] + [ok]))
    assert (code, j["first_break"]) == (1, "record 19 is not the record the audit writer had committed (its hash differs, or it is missing): the trail was rewritten or cut after the writer wrote it"), j
    # Records past what the writer had committed.
    code, j = run_json(capsys, write(tmp_path, "past.jsonl", recs + cps + [dict(ok, writer_committed_seq=18)]))
    assert (code, j["first_break"]) == (1, "records 19..20 were not written by the audit writer (it had committed up to record 18): appended by hand"), j
    # Fields absent or null (a trail the writer has not committed to in this server run): not checked.
    code, j = run_json(capsys, write(tmp_path, "nulls.jsonl", recs + cps + [dict(ok, writer_head_seq=None, writer_head_hash=None, writer_committed_seq=None)]))
    assert code == 0, j


def test_an_empty_export(tmp_path, capsys, trail):
    rows, cps = trail
    code, j = run_json(capsys, write(tmp_path, "e.jsonl", []))
    assert code == 0 and j["records"] == 0
    code, j = run_json(capsys, write(tmp_path, "e2.jsonl", cps))
    assert (code, j["first_break"]) == (1, "the chain ends at record 0, before the checkpoint at record 20: truncated")
