"""The soak's one-minute variant (benches/soak.py; the 10-minute run is scripts/soak.sh).

32 sessions over 20 tenants insert, update and read encrypted columns for 60 s on a private
cluster (pg15-soak, 54342) and a private OpenBao (8242), while, compressed into that minute, four
tenants' data keys are rotated and the three columns re-encrypted online, a tenant is suspended
and resumed, the cluster is locked down and lifted, OpenBao is stopped and restarted, and two
sessions' backends are terminated. Nothing here touches the project's cluster or its key servers.

Asserted (the soak's own verdict, and again here): no error but the expected refusals (57000 for
the suspended tenant and during the lockdown, 58000 for OpenBao tenants while it is down and
during the backends' retry backoff, 57P01 for a terminated session), no wrong read, for every
tenant the md5 of its decrypted rows equal to the client's ledger and the same row count, no
value left under an old data key version, every re-encryption job done, no crash in the server
log. PGE_SOAK_SECONDS changes the length.
"""

import json
import os
import subprocess
import sys
import time

from conftest import ROOT

SECONDS = int(os.environ.get("PGE_SOAK_SECONDS", "60"))
OUT = ROOT / "target" / "soak-ci.json"


def test_soak_one_minute():
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, str(ROOT / "benches" / "soak.py"), "--duration", str(SECONDS), "--json", str(OUT), "--quiet"],
        capture_output=True, text=True, timeout=SECONDS + 600,
    )
    took = time.monotonic() - t0
    print(r.stdout[-6000:])
    print(r.stderr[-3000:])
    assert OUT.exists(), "the soak wrote no summary"
    s = json.loads(OUT.read_text())
    v = s["verify"]
    assert s["unexpected_error_count"] == 0, s["unexpected_errors"][:5]
    assert not s["read_mismatches"], s["read_mismatches"][:5]
    assert not s["unexpected_warnings"], s["unexpected_warnings"][:5]
    assert not (v["lost"] or v["corrupt"] or v["unexpected"] or v["digest_mismatch"]), (v["lost"][:3], v["corrupt"][:3], v["unexpected"][:3])
    assert all(t["md5"] == t["ledger_md5"] and t["rows"] == t["ledger_rows"] for t in v["tenants"].values())
    assert not v["values_not_under_active_version"], v["values_not_under_active_version"]
    assert [j["state"] for j in v["reencrypt_jobs"]] == ["done"] * 3, v["reencrypt_jobs"]
    refusals = s["expected_refusals"]
    assert refusals.get("suspend/57000") and refusals.get("lockdown/57000") and refusals.get("kms_down/58000"), refusals
    assert s["cold_reads"]["first_ok_after_restart_t"] is not None, s["cold_reads"]
    assert not s["server_log_problems"], s["server_log_problems"]
    assert s["transactions"] > 1000, s["transactions"]
    assert s["ok"] and r.returncode == 0, s["problems"]
    print(f"soak ({SECONDS} s of load): {s['transactions']} transactions, {took:.0f} s in all")
