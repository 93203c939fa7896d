#!/usr/bin/env python3
"""Offline verifier of pg_envelope's audit trail export (no database access).

    python3 scripts/audit-verify.py EXPORT.jsonl [--log SERVER_LOG ...] [--local-root-key FILE]
        [--transit-url URL --transit-token-file F --transit-key NAME [--transit-mount transit]
         [--transit-ca FILE]]
        [--aws-endpoint URL --aws-region R --aws-key-id ID --aws-credentials-file F]
        [--json]

EXPORT.jsonl is the output of envelope.audit_export() (src/audit/export.rs), one JSON object a line:
records first, then checkpoints. Either form of export is read:

    psql -XAt -c 'SELECT line FROM envelope.audit_export(1)' -o audit.jsonl
    \\copy (SELECT line FROM envelope.audit_export(1)) TO 'audit.jsonl'

(COPY's text format doubles every backslash of the JSON; the verifier undoes that.)

What it checks, as crates/core/src/audit.rs does (the Rust code is the format's source of truth):
every record's hash is recomputed from its fields; the sequence must be gapless and each record
must link to the one before; the first break is reported in the words of Rust's `Break`. An
export starting after record 1 (a retention prune, or audit_export(from_seq)) must start right
after a checkpoint (from the export or a --log file) whose hash is the first record's prev_hash.
Every checkpoint (the export's rows, and the copies the writer logged, which survive a row deleted
in the database) must match the chain, and the chain must reach the newest one (else its tail was
truncated). The export must end with its trailer (an export cut short has none), the trailer's
head must be the last record, and when the trailer carries what the audit writer had committed
(`writer_head_seq`/`writer_head_hash`, from the server's shared memory, not the table) the export
must hold that record with that hash and no record past `writer_committed_seq` (insider review
61: a tail rewritten and re-chained while the writer was held up). Checkpoint MACs are verified with the key of the provider that made them when the
matching options are given (local root key file, OpenBao/Vault Transit, AWS KMS); the others are
reported as "MAC not checked (provider X)".

Trust notes. A checkpoint's provider, key name and kind come from the export and are not
authenticated: the verification key is always the one given on the command line, never one named
in the export. An anchor checkpoint (after a prune) whose MAC was not checked is only as good as
the export; --require-mac makes any unchecked MAC a failure. Log files may hold checkpoints of an
earlier chain (the extension dropped and created again) and checkpoints made after the export was
taken: bound them with --log-since / --log-until.

Exit status: 0 intact (every MAC that could be checked verified), 1 broken, 2 usage or input
error (unreadable or malformed files, a verification that was asked for but could not be done).
Secrets (token, key bytes, AWS credentials) are never printed.
"""

import argparse
import base64
import configparser
import datetime
import hashlib
import hmac
import ipaddress
import json
import os
import re
import ssl
import struct
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

try:  # HKDF from `cryptography` when importable; the RFC 5869 construction below otherwise.
    from cryptography.hazmat.primitives import hashes as _c_hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF as _CHKDF

    HAVE_CRYPTOGRAPHY = True
except Exception:  # pragma: no cover - depends on the environment
    HAVE_CRYPTOGRAPHY = False

CHAIN_DOMAIN = b"pg_envelope audit chain v1"
CHECKPOINT_DOMAIN = b"pg_envelope audit checkpoint v1"
FORMAT = 1
GENESIS = bytes(32)
CHECKPOINT_SALT = b"pg_envelope/v1/audit-checkpoint"
CHECKPOINT_INFO = b"hmac-sha256"

# The hashed fields in canonical order: (JSON key of audit_export, "i" for i64 / "s" for string).
FIELDS = [
    ("seq", "i"),
    ("at_us", "i"),
    ("kind", "s"),
    ("database", "s"),
    ("session_user", "s"),
    ("current_role", "s"),
    ("client_addr", "s"),
    ("application_name", "s"),
    ("backend_pid", "i"),
    ("statement_id", "i"),
    ("request_id", "s"),
    ("tenant", "s"),
    ("key_versions", "s"),
    ("operation", "s"),
    ("value_count", "i"),
    ("failure_count", "i"),
    ("outcome", "s"),
    ("duration_us", "i"),
    ("detail", "s"),
]

LOG_RE = re.compile(
    r"pg_envelope audit checkpoint: seq=(-?\d+) hash=([0-9a-fA-F]{64}) at_us=(-?\d+) provider=([A-Za-z0-9_]+) mac=([0-9a-fA-F]*)"
)

KINDS = ("local", "vault_transit", "aws_kms", "pkcs11")


class InputError(Exception):
    """A file that cannot be read or is not an audit export / key file (exit status 2)."""


# ------------------------------------------------------------------------------------------------
# The format (crates/core/src/audit.rs)


def canonical(rec: Dict) -> bytes:
    """`Record::canonical`: format byte 1, integers as i64 big-endian, strings as a u32 big-endian
    byte length and their UTF-8 bytes, in the fixed order of FIELDS."""
    out = bytearray([FORMAT])
    for name, typ in FIELDS:
        v = rec[name]
        if typ == "i":
            out += struct.pack(">q", v)
        else:
            b = v.encode("utf-8")
            out += struct.pack(">I", len(b)) + b
    return bytes(out)


def is_tamper(rec: Dict) -> bool:
    """The writer's record that the chain's head changed outside it: `tamper`, or `chain_restart`
    anywhere but at record 1 (insider review 54), as envelope.audit_verify() reads them."""
    return rec.get("kind") == "tamper" or (rec.get("kind") == "chain_restart" and rec.get("seq") != 1)


def record_hash(rec: Dict, prev: bytes) -> bytes:
    """`Record::hash`: SHA-256(domain || previous hash || canonical bytes)."""
    return hashlib.sha256(CHAIN_DOMAIN + prev + canonical(rec)).digest()


def checkpoint_message(seq: int, head_hash: bytes, at_us: int) -> bytes:
    """`checkpoint_message`: what a checkpoint's MAC covers."""
    return CHECKPOINT_DOMAIN + struct.pack(">q", seq) + head_hash + struct.pack(">q", at_us)


def hkdf_sha256_stdlib(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF with SHA-256 (extract, then expand)."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, t, i = b"", b"", 1
    while len(okm) < length:
        t = hmac.new(prk, t + info + bytes([i]), hashlib.sha256).digest()
        okm += t
        i += 1
    return okm[:length]


def hkdf_sha256(salt: bytes, ikm: bytes, info: bytes, length: int, use_cryptography: Optional[bool] = None) -> bytes:
    if use_cryptography is None:
        use_cryptography = HAVE_CRYPTOGRAPHY
    if use_cryptography:
        return _CHKDF(algorithm=_c_hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)
    return hkdf_sha256_stdlib(salt, ikm, info, length)


def local_checkpoint_mac(root: bytes, message: bytes, use_cryptography: Optional[bool] = None) -> bytes:
    """`local_checkpoint_mac`: HMAC-SHA-256 under HKDF-SHA-256(salt, root, "hmac-sha256")."""
    key = hkdf_sha256(CHECKPOINT_SALT, root, CHECKPOINT_INFO, 32, use_cryptography)
    return hmac.new(key, message, hashlib.sha256).digest()


def parse_root_key(data: bytes) -> bytes:
    """The local provider's root key file: exactly 32 raw bytes, or 64 hex characters with an
    optional trailing newline (crates/core/src/provider/local.rs)."""
    if len(data) == 32:
        return bytes(data)
    t = data[:-1] if data.endswith(b"\n") else data
    if len(t) == 64 and re.fullmatch(rb"[0-9a-fA-F]{64}", t):
        return bytes.fromhex(t.decode("ascii"))
    raise InputError("the root key file must hold 32 raw bytes or 64 hex characters")


# ------------------------------------------------------------------------------------------------
# The chain (`verify` in crates/core/src/audit.rs)


@dataclass
class Stored:
    record: Dict
    prev_hash: bytes
    hash: bytes
    line: int = 0


@dataclass(frozen=True)
class Head:
    seq: int
    hash: bytes


@dataclass(frozen=True)
class Break:
    """A break, worded as Rust's `Break` Display (plus the verifier's own: unanchored, mac)."""

    kind: str
    seq: int = 0
    expected: int = 0
    found: int = 0
    checkpoint_seq: int = 0
    last_seq: int = 0
    provider: str = ""
    nearest: Optional[int] = None  # unanchored: the newest checkpoint before the start, if any

    def __str__(self) -> str:
        if self.kind == "gap":
            return f"record {self.expected} is missing (the next record is {self.found}): deleted"
        if self.kind == "duplicate":
            return f"record {self.seq} appears twice: inserted"
        if self.kind == "link":
            return f"record {self.seq} does not follow the record before it: reordered or replaced"
        if self.kind == "altered":
            return f"record {self.seq} does not match its hash: altered"
        if self.kind == "truncated":
            return f"the chain ends at record {self.last_seq}, before the checkpoint at record {self.checkpoint_seq}: truncated"
        if self.kind == "checkpoint_mismatch":
            return f"record {self.seq} does not have the hash its checkpoint certified: rewritten"
        if self.kind == "unanchored":
            # As envelope.audit_verify() says it: the chain walked from the newest checkpoint
            # before the first record (or from the start) misses the records in between.
            return f"record {(self.nearest or 0) + 1} is missing (the next record is {self.seq}): deleted"
        if self.kind == "unpruned":
            return (f"the records before record {self.seq} are gone and no audit_prune record covered by a checkpoint says so: "
                    f"deleted (or a prune whose checkpoint is not written yet, or was not before a restart: prune again)")
        if self.kind == "tamper_recorded":
            return (f"record {self.seq} is the writer's tamper record: the chain's head was changed outside the writer "
                    f"(records added or removed at its tail)")
        if self.kind == "unreadable":
            return f"the stored block after record {self.seq} holds bytes that are not records: altered"
        if self.kind == "no_trailer":
            return "the export has no trailer (its last line): cut short, or not an export of envelope.audit_export()"
        if self.kind == "cut":
            return (f"the export's records end at record {self.last_seq}, but its trailer says the trail ended at record "
                    f"{self.found}: cut short")
        if self.kind == "writer_head":
            return (f"record {self.seq} is not the record the audit writer had committed (its hash differs, or it is missing): "
                    f"the trail was rewritten or cut after the writer wrote it")
        if self.kind == "past_writer":
            return (f"records {self.seq}..{self.last_seq} were not written by the audit writer (it had committed up to record "
                    f"{self.seq - 1}): appended by hand")
        if self.kind == "mac":
            return f"the checkpoint at record {self.seq} has an invalid MAC (provider {self.provider}): forged or altered"
        if self.kind == "mac_missing":
            return f"the checkpoint at record {self.seq} has no verified MAC (provider {self.provider}): not checked (--require-mac)"
        return self.kind


@dataclass
class Verified:
    records: int
    head: Optional[Head]
    first_break: Optional[Break]


def verify_chain(records: List[Stored], start: Optional[Head], checkpoints: List[Head]) -> Verified:
    """Walks `records` in the order given, after `start` (None: from record 1 and the zero hash),
    checking sequence, link and hash of each; every checkpoint must match the record at its
    sequence, and the chain must reach the newest one."""
    expected, prev = (start.seq + 1, start.hash) if start else (1, GENESIS)
    by_seq: Dict[int, List[bytes]] = {}
    for c in checkpoints:
        by_seq.setdefault(c.seq, []).append(c.hash)
    newest = max((c.seq for c in checkpoints), default=None)
    head = start
    n = 0
    brk = None
    for s in records:
        seq = s.record["seq"]
        if seq != expected:
            brk = Break("duplicate", seq=seq) if head is not None and head.seq == seq else Break("gap", expected=expected, found=seq)
            break
        if s.prev_hash != prev:
            brk = Break("link", seq=seq)
            break
        if record_hash(s.record, prev) != s.hash:
            brk = Break("altered", seq=seq)
            break
        if any(h != s.hash for h in by_seq.get(seq, [])):
            brk = Break("checkpoint_mismatch", seq=seq)
            break
        prev = s.hash
        head = Head(seq, s.hash)
        expected = seq + 1
        n += 1
    if brk is None and newest is not None:
        last = head.seq if head else 0
        if last < newest:
            brk = Break("truncated", checkpoint_seq=newest, last_seq=last)
    return Verified(n, head, brk)


# ------------------------------------------------------------------------------------------------
# Reading the export and the logs


@dataclass
class Checkpoint:
    seq: int
    hash: bytes
    at_us: int
    provider: str
    mac: bytes
    key_name: Optional[str] = None
    method: Optional[str] = None
    sources: List[str] = field(default_factory=list)
    kind: str = "unknown"
    mac_status: str = ""  # verified | invalid | not checked | error
    mac_note: str = ""

    @property
    def ident(self) -> Tuple:
        return (self.seq, self.hash, self.at_us, self.provider, self.mac)

    @property
    def in_export(self) -> bool:
        return "export" in self.sources

    @property
    def message(self) -> bytes:
        return checkpoint_message(self.seq, self.hash, self.at_us)


def copy_unescape(s: str) -> str:
    """Undoes COPY TO's text-format escaping (backslash sequences)."""
    if "\\" not in s:
        return s
    out = []
    i = 0
    simple = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            d = s[i + 1]
            out.append(simple.get(d, d))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _no_duplicate_keys(pairs):
    # A key twice is read one way here and maybe another way by a SIEM: refused.
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a key twice")
    return dict(pairs)


def _loads(text: str):
    try:
        v = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except ValueError:
        return None
    return v if isinstance(v, dict) else None


def _int(obj: Dict, key: str, where: str) -> int:
    v = obj.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise InputError(f"{where}: \"{key}\" is missing or not an integer")
    if not -(2**63) <= v < 2**63:
        raise InputError(f"{where}: \"{key}\" is out of the 64-bit range")
    return v


def _str(obj: Dict, key: str, where: str) -> str:
    v = obj.get(key)
    if not isinstance(v, str):
        raise InputError(f"{where}: \"{key}\" is missing or not a string")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{where}: \"{key}\" is not valid Unicode") from None
    return v


def _hex(obj: Dict, key: str, where: str, length: Optional[int] = 32) -> bytes:
    v = _str(obj, key, where)
    try:
        b = bytes.fromhex(v)
    except ValueError:
        raise InputError(f"{where}: \"{key}\" is not hexadecimal") from None
    if length is not None and len(b) != length:
        raise InputError(f"{where}: \"{key}\" is not {length} bytes")
    return b


def _record(obj: Dict, lineno: int, path: str) -> Stored:
    where = f"{path} line {lineno}"
    rec = {}
    for name, typ in FIELDS:
        rec[name] = _int(obj, name, where) if typ == "i" else _str(obj, name, where)
    return Stored(rec, _hex(obj, "prev_hash", where), _hex(obj, "hash", where), lineno)


def _export_checkpoint(obj: Dict, lineno: int, path: str) -> Checkpoint:
    where = f"{path} line {lineno}"
    return Checkpoint(
        seq=_int(obj, "seq", where),
        hash=_hex(obj, "hash", where),
        at_us=_int(obj, "at_us", where),
        provider=_str(obj, "provider", where),
        mac=_hex(obj, "mac", where, None),
        key_name=obj.get("key_name") if isinstance(obj.get("key_name"), str) else None,
        method=obj.get("method") if isinstance(obj.get("method"), str) else None,
        sources=["export"],
    )


def load_export(path: str) -> Tuple[List[Stored], List[Checkpoint], List[str], str]:
    """Records (in file order), checkpoints, warnings, and the encoding found ("json" or "copy")."""
    UNREADABLE.clear()
    EXPORT_META.clear()
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 (byte {e.start}); export with client_encoding UTF8") from None
    lines = [(i + 1, ln.rstrip("\r")) for i, ln in enumerate(text.split("\n")) if ln.strip()]
    # Two readings of each line: as it is, and with COPY's text escaping undone. A file is one or
    # the other; lines that read the same both ways (no backslash) do not tell.
    parsed = []
    raw_only = copy_only = 0
    for lineno, ln in lines:
        raw = _loads(ln)
        cpy = _loads(copy_unescape(ln)) if "\\" in ln else raw
        if raw is None and cpy is None:
            raise InputError(f"{path} line {lineno} is not a JSON object (or has a key twice)")
        if raw is not None and cpy is None:
            raw_only += 1
        elif raw is None and cpy is not None:
            copy_only += 1
        parsed.append((lineno, raw, cpy))
    if raw_only and copy_only:
        raise InputError(f"{path} mixes JSON lines and COPY-escaped lines")
    encoding = "copy" if copy_only else "json"
    records: List[Stored] = []
    checkpoints: List[Checkpoint] = []
    warnings: List[str] = []
    for lineno, raw, cpy in parsed:
        first = cpy if encoding == "copy" else raw
        other = raw if encoding == "copy" else cpy
        if first is None:
            raise InputError(f"{path} line {lineno} is not a JSON object in this file's encoding")
        t = first.get("type")
        if t == "record":
            s = _record(first, lineno, path)
            if other is not None and other != first and not copy_only and not raw_only:
                # Undecidable from the file alone (every backslash doubled, or literal double
                # backslashes): the reading that gives the stored hash is the one the writer hashed.
                try:
                    alt = _record(other, lineno, path)
                except InputError:
                    alt = None
                if alt is not None and record_hash(s.record, s.prev_hash) != s.hash and record_hash(alt.record, alt.prev_hash) == alt.hash:
                    s = alt
            records.append(s)
        elif t == "checkpoint":
            checkpoints.append(_export_checkpoint(first, lineno, path))
        elif t == "unreadable":
            # Bytes of a stored block that are not records (the database's decoder said so): the
            # trail was altered there, whatever the chain around them says.
            after = first.get("after_seq")
            UNREADABLE.append(after if isinstance(after, int) else 0)
        elif t == "export":
            # The trailer: when the export was taken. Log checkpoints made after it cover records
            # the file cannot hold (the export is itself a recorded read). The last line of every
            # export; what the writer had committed, when the trail was its own.
            EXPORT_META["trailers"] = EXPORT_META.get("trailers", 0) + 1
            EXPORT_META["trailer_last"] = lineno == parsed[-1][0]
            for k in ("head_seq", "writer_head_seq", "writer_committed_seq"):
                if isinstance(first.get(k), int) and not isinstance(first.get(k), bool):
                    EXPORT_META[k] = first[k]
            wh = first.get("writer_head_hash")
            if isinstance(wh, str):
                try:
                    EXPORT_META["writer_head_hash"] = bytes.fromhex(wh)
                except ValueError:
                    raise InputError(f"{path} line {lineno}: writer_head_hash is not hex") from None
            at = first.get("at_us")
            if isinstance(at, int):
                EXPORT_META["at_us"] = at
            if isinstance(first.get("from_seq"), int):
                EXPORT_META["from_seq"] = first["from_seq"]
        else:
            warnings.append(f"{path} line {lineno}: unknown type {t!r} ignored")
    return records, checkpoints, warnings, encoding


def parse_log(path: str) -> List[Checkpoint]:
    """The writer's LOG copies of its checkpoints, in whatever log line format carries them."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    out = []
    for i, ln in enumerate(data.decode("utf-8", errors="replace").split("\n")):
        m = LOG_RE.search(ln)
        if not m:
            continue
        seq, h, at_us, provider, mac = m.groups()
        if len(mac) % 2:
            continue
        out.append(Checkpoint(int(seq), bytes.fromhex(h), int(at_us), provider, bytes.fromhex(mac), sources=[f"log {path}:{i + 1}"]))
    return out


def merge_checkpoints(export_cps: List[Checkpoint], log_cps: List[Checkpoint]) -> List[Checkpoint]:
    """The same checkpoint (sequence, hash, time, provider, MAC) from several places is one."""
    merged: Dict[Tuple, Checkpoint] = {}
    for c in export_cps + log_cps:
        m = merged.get(c.ident)
        if m is None:
            merged[c.ident] = Checkpoint(**{**c.__dict__, "sources": list(c.sources)})
        else:
            m.sources.extend(c.sources)
            if m.key_name is None:
                m.key_name, m.method = c.key_name, c.method
    return sorted(merged.values(), key=lambda c: (c.seq, c.at_us))


def parse_time_us(value: str) -> int:
    """Microseconds since the Unix epoch, or an ISO 8601 time (UTC when it has no offset)."""
    v = value.strip()
    if re.fullmatch(r"-?\d+", v):
        return int(v)
    try:
        t = datetime.datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a time (microseconds since the epoch, or ISO 8601): {value!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=datetime.timezone.utc)
    delta = t - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def fmt_us(us: int) -> str:
    try:
        t = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(microseconds=us)
        return t.strftime("%Y-%m-%d %H:%M:%S.%f UTC")
    except OverflowError:
        return str(us)


# ------------------------------------------------------------------------------------------------
# MAC verification


def infer_kind(c: Checkpoint, by_provider: Dict[str, str], pinned: Dict[str, str]) -> str:
    """Which kind of provider made a checkpoint: from --provider-kind, else from its key name
    (local, aws-kms and pkcs11 name themselves; Transit's MAC is its `vault:v<n>:` text), else
    from another checkpoint of the same provider, else `local` for the built-in provider name."""
    if c.provider in pinned:
        return pinned[c.provider]
    if c.key_name is not None:
        if c.key_name.startswith("local "):
            return "local"
        if c.key_name.startswith("aws-kms "):
            return "aws_kms"
        if c.key_name.startswith("pkcs11 "):
            return "pkcs11"
    if c.mac.startswith(b"vault:v"):
        return "vault_transit"
    if c.provider in by_provider:
        return by_provider[c.provider]
    if c.provider == "local":
        return "local"
    return "unknown"


class VerifierError(Exception):
    """A verification that was asked for and could not be done (exit status 2)."""


class LocalVerifier:
    kind = "local"

    def __init__(self, root: bytes):
        self._root = root

    def __repr__(self):  # never the key
        return "LocalVerifier(<root key>)"

    def verify(self, c: Checkpoint) -> bool:
        good = local_checkpoint_mac(self._root, c.message)
        return hmac.compare_digest(good, c.mac)


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TransitVerifier:
    kind = "vault_transit"

    def __init__(self, url: str, token_file: str, key: str, mount: str = "transit", ca: Optional[str] = None,
                 namespace: Optional[str] = None, timeout: float = 10.0):
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise InputError(f"--transit-url must be an http(s) URL, not {url!r}")
        if u.scheme == "http" and not _is_loopback(u.hostname):
            raise InputError("--transit-url: plain http is refused except to a loopback address (the token would travel in clear)")
        for name, v in (("--transit-key", key), ("--transit-mount", mount)):
            if not re.fullmatch(r"[A-Za-z0-9_.\-/]+", v) or ".." in v:
                raise InputError(f"{name} has characters a path segment cannot")
        self.base = url.rstrip("/")
        self.key, self.mount, self.namespace, self.timeout = key, mount.strip("/"), namespace, timeout
        try:
            with open(token_file, "r", encoding="utf-8") as f:
                self._token = f.read().strip()
        except OSError as e:
            raise InputError(f"cannot read the token file {token_file}: {e.strerror or e}") from None
        if not self._token:
            raise InputError(f"the token file {token_file} is empty")
        self._ctx = None
        if u.scheme == "https":
            try:
                self._ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
            except (OSError, ssl.SSLError) as e:
                raise InputError(f"cannot use --transit-ca {ca}: {e}") from None

    def __repr__(self):
        return f"TransitVerifier({self.base}, {self.mount}/{self.key})"

    def verify(self, c: Checkpoint) -> bool:
        try:
            mac_text = c.mac.decode("ascii")
        except UnicodeDecodeError:
            return False
        if not mac_text.startswith("vault:v"):
            return False
        where = f"{self.base} {self.mount}/verify/{self.key}"
        body = json.dumps({"input": base64.b64encode(c.message).decode("ascii"), "hmac": mac_text}).encode()
        req = urllib.request.Request(f"{self.base}/v1/{self.mount}/verify/{self.key}/sha2-256", data=body, method="POST")
        req.add_header("X-Vault-Token", self._token)
        req.add_header("Content-Type", "application/json")
        if self.namespace:
            req.add_header("X-Vault-Namespace", self.namespace)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ctx) as r:
                answer = json.loads(r.read().decode("utf-8") or "{}")
        except urllib.error.HTTPError as e:
            try:
                errors = json.loads(e.read().decode("utf-8") or "{}").get("errors") or []
            except ValueError:
                errors = []
            first = str(errors[0]) if errors else ""
            # As the Rust provider: a malformed MAC (or one of a key version that no longer
            # exists) is a 400 that is an answer; a missing key or a refusal is not.
            if e.code == 400 and "not found" not in first:
                return False
            raise VerifierError(f"{where}: HTTP {e.code} {first[:200]}".rstrip()) from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise VerifierError(f"{where}: {getattr(e, 'reason', e)}") from None
        valid = (answer.get("data") or {}).get("valid")
        if not isinstance(valid, bool):
            raise VerifierError(f"{where}: no \"valid\" in the answer")
        return valid


def _aws_credentials(path: str, profile: str) -> Dict[str, str]:
    cp = configparser.RawConfigParser()
    try:
        with open(path, "r", encoding="utf-8") as f:
            cp.read_file(f)
    except (OSError, configparser.Error) as e:
        raise InputError(f"cannot read the AWS credentials file {path}: {getattr(e, 'strerror', None) or type(e).__name__}") from None
    if not cp.has_section(profile):
        raise InputError(f"the AWS credentials file {path} has no profile [{profile}]")
    sec = cp[profile]
    if not sec.get("aws_access_key_id") or not sec.get("aws_secret_access_key"):
        raise InputError(f"the AWS credentials file {path} has no aws_access_key_id/aws_secret_access_key in [{profile}]")
    out = {"aws_access_key_id": sec["aws_access_key_id"].strip(), "aws_secret_access_key": sec["aws_secret_access_key"].strip()}
    if sec.get("aws_session_token"):
        out["aws_session_token"] = sec["aws_session_token"].strip()
    return out


class AwsVerifier:
    kind = "aws_kms"

    def __init__(self, key_id: str, region: Optional[str], endpoint: Optional[str], credentials_file: Optional[str],
                 profile: str = "default", ca: Optional[str] = None):
        self.key_id = key_id
        self.unavailable = None
        try:
            import boto3  # noqa: F401
            import botocore.exceptions  # noqa: F401
        except ImportError:
            self.unavailable = "boto3 is not installed: AWS KMS MACs cannot be verified by this Python"
            return
        creds = _aws_credentials(credentials_file, profile) if credentials_file else {}
        import boto3

        kw = dict(region_name=region, **creds)
        if endpoint:
            kw["endpoint_url"] = endpoint
        if ca:
            kw["verify"] = ca
        self._client = boto3.client("kms", **kw)

    def __repr__(self):
        return f"AwsVerifier({self.key_id})"

    def verify(self, c: Checkpoint) -> bool:
        if self.unavailable:
            raise VerifierError(self.unavailable)
        import botocore.exceptions

        try:
            r = self._client.verify_mac(Message=c.message, KeyId=self.key_id, MacAlgorithm="HMAC_SHA_256", Mac=c.mac)
        except botocore.exceptions.ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code == "KMSInvalidMacException":
                return False
            if code == "ValidationException" and not c.mac:
                return False
            raise VerifierError(f"AWS KMS VerifyMac: {code or 'error'}") from None
        except botocore.exceptions.BotoCoreError as e:
            raise VerifierError(f"AWS KMS VerifyMac: {type(e).__name__}") from None
        return r.get("MacValid") is True


def check_macs(cps: List[Checkpoint], verifiers: Dict[str, object]) -> None:
    """Sets each checkpoint's mac_status: verified, invalid, not checked, or error."""
    done: Dict[Tuple, Tuple[str, str]] = {}
    failed: Dict[str, str] = {}  # a verifier that failed once is not asked again (a KMS that is down)
    for c in cps:
        v = verifiers.get(c.kind)
        if v is None:
            c.mac_status, c.mac_note = "not checked", f"MAC not checked (provider {c.provider})"
            continue
        memo = (c.kind, c.message, c.mac)
        if memo not in done:
            if c.kind in failed:
                done[memo] = ("error", failed[c.kind])
            else:
                try:
                    done[memo] = ("verified", "MAC verified") if v.verify(c) else ("invalid", "MAC invalid")
                except VerifierError as e:
                    failed[c.kind] = f"MAC could not be checked: {e}"
                    done[memo] = ("error", failed[c.kind])
        c.mac_status, c.mac_note = done[memo]


# ------------------------------------------------------------------------------------------------
# The verdict


@dataclass
class Report:
    export: str
    encoding: str = "json"
    records_in_export: int = 0
    records_checked: int = 0
    first_seq: Optional[int] = None
    head: Optional[Head] = None
    anchor: Optional[Checkpoint] = None
    checkpoints: List[Checkpoint] = field(default_factory=list)
    ignored_log_checkpoints: int = 0
    first_break: Optional[Break] = None
    chain_break: Optional[Break] = None
    hint: str = ""
    warnings: List[str] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)

    @property
    def newest(self) -> Optional[int]:
        return max((c.seq for c in self.checkpoints if c.mac_status != "invalid"), default=None)

    @property
    def exit_code(self) -> int:
        if self.first_break is not None:
            return 1
        if self.errors:
            return 2
        return 0


def verify_export(records: List[Stored], checkpoints: List[Checkpoint], verifiers: Dict[str, object],
                  require_mac: bool = False, export_mtime_us: Optional[int] = None) -> Report:
    """The whole verdict over loaded records and merged checkpoints (kinds already set)."""
    rep = Report(export="")
    rep.records_in_export = len(records)
    rep.checkpoints = checkpoints
    rep.first_seq = records[0].record["seq"] if records else None
    check_macs(checkpoints, verifiers)
    errs: Dict[str, List[int]] = {}
    for c in checkpoints:
        if c.mac_status == "error":
            errs.setdefault(c.mac_note, []).append(c.seq)
    for note, seqs in errs.items():
        rep.errors.append(f"{len(seqs)} checkpoint(s) (first at record {seqs[0]}): {note}")
    # A checkpoint with an invalid MAC is a break when the export holds it (the table's row); a
    # line found only in the server log is not evidence of anything: any role can write a log
    # line that looks like one (RAISE LOG; insider review 61b raised false alarms that way).
    for c in checkpoints:
        if c.mac_status == "invalid" and not c.in_export:
            rep.warnings.append(f"a checkpoint line in the server log at record {c.seq} has an invalid MAC (provider {c.provider}): "
                                f"ignored (any role can write a log line; only verified ones count)")
    bad = [c for c in checkpoints if c.mac_status == "invalid" and c.in_export]
    mac_break = Break("mac", seq=bad[0].seq, provider=bad[0].provider) if bad else None
    # Only checkpoints whose MAC did not fail are evidence about the chain.
    good = [c for c in checkpoints if c.mac_status != "invalid"]
    start: Optional[Head] = None
    unanchored = None
    unpruned = None
    if records and records[0].record["seq"] > 1:
        first = records[0]
        at = [c for c in good if c.seq == first.record["seq"] - 1]
        if not at:
            nearest = max((c.seq for c in good if c.seq < first.record["seq"] - 1), default=None)
            unanchored = Break("unanchored", seq=first.record["seq"], nearest=nearest)
        else:
            # The checkpoint the kept records start after; one certifying this prev_hash if any,
            # else any (the first record then does not follow it: a Link break, as in Rust).
            pick = next((c for c in at if c.hash == first.prev_hash), at[0])
            rep.anchor = pick
            start = Head(pick.seq, pick.hash)
            # An export of the whole trail (from record 1) that starts later: the records before
            # were removed, which only audit_prune does, and its record names this anchor.
            if EXPORT_META.get("from_seq") == 1:
                needle = f"the kept chain starts after checkpoint {pick.seq} (hash {pick.hash.hex()})"
                # Only a record covered by a checkpoint whose MAC was verified here (review 52), with
                # no writer_start record in between (a writer that started on an unwitnessed tail
                # checkpoints it: reviews 51 and 52), as envelope.audit_verify() requires.
                starts = [r.record["seq"] for r in records if r.record.get("kind") == "writer_start" or is_tamper(r.record)]

                def covered(p: int) -> bool:
                    after = [c.seq for c in good if c.seq >= p and c.mac_status == "verified"]
                    return bool(after) and not any(p < s <= min(after) for s in starts)
                if not any(r.record.get("operation") == "audit_prune" and r.record.get("outcome") == "ok"
                           and needle in r.record.get("detail", "") and covered(r.record["seq"]) for r in records):
                    unpruned = Break("unpruned", seq=first.record["seq"])
    if unanchored is not None:
        rep.chain_break = unanchored
        rep.hint = (
            f"the export starts at record {unanchored.seq} and no checkpoint at record {unanchored.seq - 1} anchors it: "
            f"the start is not anchored (the records before it deleted, or exported with a from_seq no checkpoint precedes)"
        )
    else:
        heads = [Head(c.seq, c.hash) for c in good if start is None or c.seq >= start.seq]
        v = verify_chain(records, start, heads)
        rep.records_checked, rep.head, rep.chain_break = v.records, v.head, v.first_break
        rep.hint = _hint(rep, records, good, start, export_mtime_us)
    if UNREADABLE and (rep.chain_break is None or min(UNREADABLE) < (rep.head.seq if rep.head else 0)):
        rep.chain_break = Break("unreadable", seq=min(UNREADABLE))
    if unpruned is not None:
        rep.chain_break = unpruned  # (at the start of what the export holds: before any other break)
    if rep.chain_break is None:
        rep.chain_break = export_bounds_break(records)
    if rep.chain_break is None:
        # The writer's own tamper record in an otherwise whole chain (insider review 53).
        tampered = next((r.record["seq"] for r in records if is_tamper(r.record)), None)
        if tampered is not None:
            rep.chain_break = Break("tamper_recorded", seq=tampered)
    rep.first_break = mac_break or rep.chain_break
    if rep.first_break is None and require_mac:
        relied = [c for c in good if c.mac_status != "verified" and (start is None or c.seq >= start.seq)]
        if relied:
            rep.first_break = Break("mac_missing", seq=relied[0].seq, provider=relied[0].provider)
    return rep


def export_bounds_break(records: List[Stored]) -> Optional[Break]:
    """The export's own bounds: its trailer (the last line, exactly one), the trailer's head as
    the last record, and what the audit writer had committed (review 61)."""
    if EXPORT_META.get("trailers", 0) != 1 or not EXPORT_META.get("trailer_last"):
        return Break("no_trailer")
    last = records[-1].record["seq"] if records else None
    head = EXPORT_META.get("head_seq")
    if last is not None and head is not None and head != last:
        return Break("cut", last_seq=last, found=head)
    wseq, whash = EXPORT_META.get("writer_head_seq"), EXPORT_META.get("writer_head_hash")
    first = records[0].record["seq"] if records else None
    if wseq is not None and whash is not None and first is not None and wseq >= first:
        at = next((r for r in records if r.record["seq"] == wseq), None)
        if at is None or at.hash != whash:
            return Break("writer_head", seq=wseq)
    committed = EXPORT_META.get("writer_committed_seq")
    if committed is not None and last is not None and last > committed:
        return Break("past_writer", seq=committed + 1, last_seq=last)
    return None


def _hint(rep: Report, records: List[Stored], good: List[Checkpoint], start: Optional[Head], export_mtime_us: Optional[int]) -> str:
    """When a break comes only from checkpoints of the server log: the likely benign causes."""
    b = rep.chain_break
    if b is None or b.kind not in ("truncated", "checkpoint_mismatch"):
        return ""
    seq = b.checkpoint_seq if b.kind == "truncated" else b.seq
    culprits = [c for c in good if c.seq == seq]
    if b.kind == "checkpoint_mismatch":
        rec = next((s for s in records if s.record["seq"] == seq), None)
        culprits = [c for c in culprits if rec is None or c.hash != rec.hash]
    if not culprits or any(c.in_export for c in culprits):
        return ""
    c = culprits[0]
    note = f"the checkpoint at record {seq} is only in the server log (made {fmt_us(c.at_us)})"
    if start is None and records and c.at_us < records[0].record["at_us"]:
        return note + " and predates record 1: a log of an earlier chain (the extension dropped and created again)? see --log-since"
    if b.kind == "truncated":
        if export_mtime_us is not None and c.at_us > export_mtime_us:
            t = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(microseconds=export_mtime_us)
            return note + (f", after the export file was last written: if the export was taken before then, pass "
                           f"--log-until {t.strftime('%Y-%m-%dT%H:%M:%S.%fZ')} (an export is itself a recorded read, checkpointed after it)")
        return note + ": if the export was taken before then, bound the log with --log-until"
    return note


# ------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="audit-verify.py",
        description="Verify a pg_envelope audit export (envelope.audit_export) offline: the hash chain, its checkpoints and their MACs.",
        epilog="Exit status: 0 intact, 1 broken, 2 usage or input error (or a MAC check asked for that could not be done).",
    )
    p.add_argument("export", help="the export: JSON lines from envelope.audit_export()")
    p.add_argument("--log", action="append", default=[], metavar="SERVER_LOG", help="a server log with the writer's checkpoint lines (repeatable)")
    p.add_argument("--log-since", type=parse_time_us, metavar="TIME",
                   help="ignore log checkpoints made before TIME (ISO 8601 or µs since the epoch): an earlier chain's")
    p.add_argument("--log-until", type=parse_time_us, metavar="TIME",
                   help="ignore log checkpoints made after TIME (when the export was taken)")
    p.add_argument("--local-root-key", metavar="FILE", help="the local provider's root key file (32 raw bytes or 64 hex characters)")
    p.add_argument("--transit-url", metavar="URL", help="OpenBao/Vault address for Transit checkpoint MACs")
    p.add_argument("--transit-token-file", metavar="FILE", help="a file holding the token (never printed)")
    p.add_argument("--transit-key", metavar="NAME", help="the Transit key that MACs checkpoints (the provider's hmac_key, default its key)")
    p.add_argument("--transit-mount", default="transit", metavar="MOUNT")
    p.add_argument("--transit-ca", metavar="FILE", help="PEM CA bundle for the server certificate")
    p.add_argument("--transit-namespace", metavar="NS", help="X-Vault-Namespace")
    p.add_argument("--aws-endpoint", metavar="URL", help="AWS KMS endpoint (default: the region's)")
    p.add_argument("--aws-region", metavar="REGION")
    p.add_argument("--aws-key-id", metavar="ID", help="the HMAC key (the provider's mac_key_id)")
    p.add_argument("--aws-credentials-file", metavar="FILE", help="AWS shared credentials file (default: boto3's own chain)")
    p.add_argument("--aws-profile", default="default", metavar="NAME")
    p.add_argument("--aws-ca", metavar="FILE", help="PEM CA bundle for the endpoint")
    p.add_argument("--provider-kind", action="append", default=[], metavar="NAME=KIND",
                   help=f"the kind of a checkpoint provider name ({', '.join(KINDS)}), instead of inferring it")
    p.add_argument("--require-mac", action="store_true", help="a checkpoint the chain relies on whose MAC was not verified is a failure")
    p.add_argument("--from-seq", type=int, metavar="N",
                   help="the from_seq the export was asked with (audit_export(N)), instead of what its trailer says: "
                        "with 1, records missing before the first exported one must be explained by a checkpointed audit_prune record "
                        "(a replaced audit_export could write another from_seq in its trailer: insider review 52)")
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    return p


def build_verifiers(args, parser) -> Dict[str, object]:
    verifiers: Dict[str, object] = {}
    if args.local_root_key:
        try:
            with open(args.local_root_key, "rb") as f:
                data = f.read(257)
        except OSError as e:
            raise InputError(f"cannot read the root key file {args.local_root_key}: {e.strerror or e}") from None
        if len(data) > 256:
            raise InputError("the root key file must hold 32 raw bytes or 64 hex characters")
        verifiers["local"] = LocalVerifier(parse_root_key(data))
    transit = [args.transit_url, args.transit_token_file, args.transit_key]
    if any(transit):
        if not all(transit):
            parser.error("--transit-url, --transit-token-file and --transit-key go together")
        verifiers["vault_transit"] = TransitVerifier(args.transit_url, args.transit_token_file, args.transit_key, args.transit_mount,
                                                     args.transit_ca, args.transit_namespace)
    if args.aws_key_id or args.aws_endpoint or args.aws_credentials_file:
        if not args.aws_key_id or not (args.aws_region or args.aws_endpoint):
            parser.error("AWS KMS verification needs --aws-key-id and --aws-region (or --aws-endpoint)")
        verifiers["aws_kms"] = AwsVerifier(args.aws_key_id, args.aws_region, args.aws_endpoint, args.aws_credentials_file,
                                           args.aws_profile, args.aws_ca)
    return verifiers


EXPORT_META = {}
# `after_seq` of every "unreadable" line of the export (see load_export).
UNREADABLE: List[int] = []


def run(args, parser) -> Report:
    pinned = {}
    for pk in args.provider_kind:
        name, _, kind = pk.partition("=")
        if not name or kind not in KINDS:
            parser.error(f"--provider-kind {pk!r}: NAME=KIND with KIND one of {', '.join(KINDS)}")
        pinned[name] = kind
    verifiers = build_verifiers(args, parser)
    records, export_cps, warnings, encoding = load_export(args.export)
    if args.from_seq is not None:
        EXPORT_META["from_seq"] = args.from_seq
    if args.log_until is None and "at_us" in EXPORT_META:
        args.log_until = EXPORT_META["at_us"]
    log_cps: List[Checkpoint] = []
    ignored = 0
    for path in args.log:
        for c in parse_log(path):
            if (args.log_since is not None and c.at_us < args.log_since) or (args.log_until is not None and c.at_us > args.log_until):
                ignored += 1
            else:
                log_cps.append(c)
    if args.log and not log_cps and not ignored:
        warnings.append("no checkpoint line in the --log file(s)")
    cps = merge_checkpoints(export_cps, log_cps)
    by_provider = {}
    for c in cps:
        if c.key_name is not None:
            k = infer_kind(c, {}, pinned)
            if k != "unknown":
                by_provider.setdefault(c.provider, k)
    for c in cps:
        c.kind = infer_kind(c, by_provider, pinned)
    for c in cps:
        if c.method not in (None, "hmac-sha256"):
            warnings.append(f"checkpoint at record {c.seq}: method {c.method!r} (expected hmac-sha256)")
    if not records:
        warnings.append("the export holds no record")
    try:
        mtime_us = os.stat(args.export).st_mtime_ns // 1000
    except OSError:
        mtime_us = None
    rep = verify_export(records, cps, verifiers, args.require_mac, mtime_us)
    rep.export, rep.encoding, rep.ignored_log_checkpoints = args.export, encoding, ignored
    rep.warnings = warnings + rep.warnings
    return rep


def _mac_summary(cps: List[Checkpoint]) -> List[str]:
    out = []
    counts: Dict[Tuple[str, str, str], int] = {}
    for c in cps:
        k = (c.mac_status, c.provider, c.kind)
        counts[k] = counts.get(k, 0) + 1
    for (status, provider, kind), n in sorted(counts.items()):
        s = "" if n == 1 else "s"
        if status == "verified":
            out.append(f"{n} checkpoint{s} of provider {provider} ({kind}): MAC verified")
        elif status == "invalid":
            out.append(f"{n} checkpoint{s} of provider {provider} ({kind}): MAC INVALID")
        elif status == "error":
            out.append(f"{n} checkpoint{s} of provider {provider} ({kind}): MAC could not be checked")
        else:
            out.append(f"{n} checkpoint{s}: MAC not checked (provider {provider})")
    return out


def to_json(rep: Report) -> Dict:
    status = "broken" if rep.first_break else ("error" if rep.errors else "intact")
    return {
        "ok": rep.exit_code == 0,
        "status": status,
        "exit_code": rep.exit_code,
        "export": rep.export,
        "encoding": rep.encoding,
        "records": rep.records_in_export,
        "records_checked": rep.records_checked,
        "first_seq": rep.first_seq,
        "head_seq": rep.head.seq if rep.head else None,
        "head_hash": rep.head.hash.hex() if rep.head else None,
        "anchor_seq": rep.anchor.seq if rep.anchor else None,
        "anchored": None if not rep.first_seq or rep.first_seq <= 1 else rep.anchor is not None,
        "checkpoint_seq": rep.newest,
        "first_break": str(rep.first_break) if rep.first_break else None,
        "break_kind": rep.first_break.kind if rep.first_break else None,
        "chain_break": str(rep.chain_break) if rep.chain_break else None,
        "hint": rep.hint or None,
        "mac_counts": {s: sum(1 for c in rep.checkpoints if c.mac_status == s) for s in ("verified", "invalid", "not checked", "error")},
        "checkpoints": [
            {
                "seq": c.seq,
                "hash": c.hash.hex(),
                "at_us": c.at_us,
                "provider": c.provider,
                "kind": c.kind,
                "key_name": c.key_name,
                "in_export": c.in_export,
                "in_log": any(s.startswith("log ") for s in c.sources),
                "mac": c.mac_status,
                "note": c.mac_note,
            }
            for c in rep.checkpoints
        ],
        "ignored_log_checkpoints": rep.ignored_log_checkpoints,
        "warnings": rep.warnings,
        "errors": rep.errors,
    }


def to_text(rep: Report) -> str:
    lines = [f"pg_envelope audit export {rep.export}" + (" (COPY text format)" if rep.encoding == "copy" else "")]
    if rep.records_in_export:
        last = rep.head.seq if rep.head else None
        lines.append(f"  records:     {rep.records_in_export} in the export, from record {rep.first_seq}; {rep.records_checked} verified"
                     + (f" up to record {last}" if last is not None and rep.records_checked else ""))
    else:
        lines.append("  records:     none")
    if rep.anchor is not None:
        lines.append(f"  start:       after the checkpoint at record {rep.anchor.seq} ({rep.anchor.mac_note or 'MAC not checked'})")
    n_exp = sum(1 for c in rep.checkpoints if c.in_export)
    n_log = sum(1 for c in rep.checkpoints if any(s.startswith("log ") for s in c.sources))
    cp = f"  checkpoints: {len(rep.checkpoints)} ({n_exp} in the export, {n_log} in the server log"
    if rep.ignored_log_checkpoints:
        cp += f", {rep.ignored_log_checkpoints} log lines outside --log-since/--log-until"
    cp += ")" + (f"; newest at record {rep.newest}" if rep.newest is not None else "")
    lines.append(cp)
    for m in _mac_summary(rep.checkpoints):
        lines.append(f"  MACs:        {m}")
    for w in rep.warnings:
        lines.append(f"  warning:     {w}")
    for e in rep.errors:
        lines.append(f"  error:       {e}")
    if rep.first_break is not None:
        lines.append(f"BROKEN: {rep.first_break}")
        if rep.chain_break is not None and rep.chain_break != rep.first_break:
            lines.append(f"  also:        {rep.chain_break}")
        if rep.hint:
            lines.append(f"  note:        {rep.hint}")
    elif rep.errors:
        lines.append("NOT VERIFIED: a MAC check that was asked for could not be done (see the errors above)")
    else:
        head = rep.head.seq if rep.head else 0
        tail = f"; it reaches its newest checkpoint (record {rep.newest})" if rep.newest is not None else "; no checkpoint covers it"
        unchecked = sum(1 for c in rep.checkpoints if c.mac_status == "not checked")
        lines.append(f"INTACT: the chain verifies from record {rep.first_seq if rep.first_seq is not None else '-'} to record {head}{tail}"
                     + (f" ({unchecked} MAC(s) not checked)" if unchecked else ""))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rep = run(args, parser)
    except InputError as e:
        if args.json:
            print(json.dumps({"ok": False, "status": "error", "exit_code": 2, "errors": [str(e)]}, indent=2))
        else:
            print(f"audit-verify: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(to_json(rep), indent=2))
    else:
        print(to_text(rep))
    return rep.exit_code


if __name__ == "__main__":
    sys.exit(main())
