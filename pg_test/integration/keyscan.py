"""Search a running PostgreSQL backend's memory (and a gcore dump of it) for pg_envelope key material.

What is searched, and why
-------------------------
pg_envelope keeps unwrapped keys in backend memory (README, "Threat model"). This module
reconstructs, from the catalog and the `local` provider's root key file, every key a backend may
have held for one tenant, and looks for it in the backend's address space:

* the root key (the `local` provider's file), the tenant key (envelope.tenants.wrapped_key, wrapped
  under the root key) and every data key (envelope.data_keys.wrapped_key, wrapped under the tenant
  key), unwrapped exactly as crates/core/src/wrap.rs does (AES-256-GCM, format byte 0x01, 12-byte
  nonce, the `WrapAad::encode` associated data);
* the XAES-256-GCM per-nonce-prefix keys derived from each data key (C2SP XAES-256-GCM, as in
  crates/core/src/datakey.rs `DataKey::derive`), for nonce prefixes taken from envelopes (bytes
  42..54 of an envelope: the first 12 bytes of its 24-byte nonce);
* the XAES subkey K1 = dbl(AES-256_DEK(0^128)) that every cached `DataKey` keeps (16 bytes).

A key is rarely in memory as its 32 raw bytes only: the `aes` crate keeps AES-256 keys as expanded
round-key schedules (15 round keys of 16 bytes; with AES-NI they are stored as plain FIPS-197
words), and any two adjacent AES-256 round keys give back the key (run the key expansion
backwards, `aes256_invert_schedule`). So for every key K the patterns are:

* ``raw``: K itself. The first 32 bytes of K's schedule are K too, so a raw hit followed by
  schedule bytes 32..64 is reported as form ``schedule[0:32]`` (part of a live schedule), and
  form ``raw`` is left for stand-alone copies (a `SecretKey`, a buffer, a stack slot).
* ``schedule[32:64]``: round keys 2 and 3, the form an AES-NI key schedule leaves in memory;
* ``schedule[176:208]``: round keys 11 and 12, a second window of the same schedule (a partly
  overwritten schedule still shows);
* ``schedule-x2[2:4]`` / ``schedule-x4[2:4]``: round keys 2 and 3 each repeated 2 (4) times, the
  form the `aes` crate's VAES backends (`broadcast_keys`, 256-bit / 512-bit registers) spill to
  the stack for multi-block operations;
* ``K1`` (data keys only): the 16-byte XAES subkey;
* ``hex-text`` (root key only, when the file holds hex): the file's text.

Scanners
--------
``scan_proc_mem(pid, patterns)`` reads /proc/PID/maps and /proc/PID/smaps (the ``dd`` VmFlag means
MADV_DONTDUMP) and reads every mapping through /proc/PID/mem in chunks (with an overlap so a
pattern straddling two chunks is found), skipping [vvar]/[vsyscall] and I/O mappings, and
skipping unreadable pages gracefully. As root, /proc/PID/mem also reads PROT_NONE mappings
(FOLL_FORCE), so those are searched too when they hold any resident page. Hits carry the address,
the mapping (pathname, [heap], [stack] or anon), whether the mapping is ``dd``, and a region class
(heap, stack, thread-stack, anon, shm, file).

``scan_core(pid, patterns)`` runs ``gcore`` (gdb honours MADV_DONTDUMP, as the kernel does for a
crash dump) and searches the core file, then deletes it: what a crash dump or a debugger's dump
would carry away.

Keys are never printed: reports name keys by label, and the CLI shows a short fingerprint.

CLI
---
    python keyscan.py --selftest
    python keyscan.py --pid N --root-key-file F --dsn DSN --tenant T [--prefix HEX ...]
                      [--envelope HEX ...] [--gcore] [--no-proc]
    python keyscan.py --bench-mb 200          # time a scan of a 200 MB process
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import hmac
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, namedtuple
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_LEN = 32
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# ---------------------------------------------------------------------------------------------
# AES-256 key expansion (FIPS-197 section 5.2), pure Python
# ---------------------------------------------------------------------------------------------


def _xtime(a: int) -> int:
    a <<= 1
    return (a ^ 0x11B) if a & 0x100 else a


def _build_sbox() -> list[int]:
    # Multiplicative inverse in GF(2^8) through log/antilog tables (generator 0x03), then the
    # affine transformation of FIPS-197 section 5.1.1.
    exp, log = [0] * 255, [0] * 256
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x ^= _xtime(x)
    sbox = []
    for a in range(256):
        inv = 0 if a == 0 else exp[(255 - log[a]) % 255]
        s = r = inv
        for _ in range(4):
            r = ((r << 1) | (r >> 7)) & 0xFF
            s ^= r
        sbox.append(s ^ 0x63)
    return sbox


SBOX = _build_sbox()
RCON = [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x1B, 0x36]
AES256_NK, AES256_WORDS = 8, 60  # 8 key words, 4 * (14 + 1) schedule words = 240 bytes


def _g(i: int, word: list[int]) -> list[int]:
    """The transformation applied to w[i-1] before it is XORed into w[i-8] (Nk = 8)."""
    if i % AES256_NK == 0:
        t = [SBOX[b] for b in word[1:] + word[:1]]  # SubWord(RotWord(w))
        t[0] ^= RCON[i // AES256_NK]
        return t
    if i % AES256_NK == 4:
        return [SBOX[b] for b in word]  # SubWord(w), AES-256 only
    return word


def aes256_expand_key(key: bytes) -> bytes:
    """The 240-byte AES-256 encryption key schedule (60 words, round keys 0..14)."""
    if len(key) != KEY_LEN:
        raise ValueError("AES-256 key must be 32 bytes")
    w = [list(key[4 * i:4 * i + 4]) for i in range(AES256_NK)]
    for i in range(AES256_NK, AES256_WORDS):
        t = _g(i, w[i - 1])
        w.append([a ^ b for a, b in zip(w[i - AES256_NK], t)])
    return bytes(b for word in w for b in word)


def aes256_invert_schedule(window: bytes, first_word: int) -> bytes:
    """The AES-256 key from 8 consecutive schedule words starting at word `first_word` (32 bytes:
    two adjacent round keys when `first_word` is a multiple of 4). This is why a schedule window
    in memory is as bad as the raw key."""
    if len(window) != 32 or not 0 <= first_word <= AES256_WORDS - 8:
        raise ValueError("need 32 bytes of schedule starting at a word index in 0..52")
    w: dict[int, list[int]] = {first_word + j: list(window[4 * j:4 * j + 4]) for j in range(8)}
    for i in range(first_word + 7, AES256_NK - 1, -1):
        if i - AES256_NK in w:
            continue
        # w[i] = w[i-8] ^ g(i, w[i-1])  =>  w[i-8] = w[i] ^ g(i, w[i-1])
        w[i - AES256_NK] = [a ^ b for a, b in zip(w[i], _g(i, w[i - 1]))]
    return bytes(b for j in range(AES256_NK) for b in w[j])


# ---------------------------------------------------------------------------------------------
# Key wrapping (crates/core/src/wrap.rs) and XAES-256-GCM (crates/core/src/datakey.rs)
# ---------------------------------------------------------------------------------------------

WRAP_VERSION_1 = 0x01
WRAPPED_LEN = 1 + 12 + KEY_LEN + 16  # 61


class UnwrapError(Exception):
    pass


def wrap_aad_tenant_key(tenant: str, tenant_key_id: int) -> bytes:
    """`WrapAad::TenantKey { tenant, tenant_key_id }.encode()`:
    0x01 || b"pg_envelope/v1/tenant-key\\0" || u32be(tenant_key_id) || u32be(len(tenant)) || tenant."""
    t = tenant.encode("utf-8")
    return (bytes([WRAP_VERSION_1]) + b"pg_envelope/v1/tenant-key\x00"
            + struct.pack(">I", tenant_key_id) + struct.pack(">I", len(t)) + t)


def wrap_aad_data_key(tenant: str, tenant_key_id: int, version: int) -> bytes:
    """`WrapAad::DataKey { tenant, tenant_key_id, version }.encode()`:
    0x01 || b"pg_envelope/v1/data-key\\0" || u32be(tenant_key_id) || u32be(version)
         || u32be(len(tenant)) || tenant."""
    t = tenant.encode("utf-8")
    return (bytes([WRAP_VERSION_1]) + b"pg_envelope/v1/data-key\x00"
            + struct.pack(">I", tenant_key_id) + struct.pack(">I", version)
            + struct.pack(">I", len(t)) + t)


def unwrap_key(wrapping_key: bytes, aad: bytes, wrapped: bytes) -> bytes:
    """`wrap::unwrap_key`: 0x01 || nonce (12) || AES-256-GCM ciphertext (32) || tag (16)."""
    wrapped = bytes(wrapped)
    if len(wrapped) != WRAPPED_LEN or wrapped[0] != WRAP_VERSION_1:
        raise UnwrapError("not a v1 wrapped key (61 bytes, first byte 0x01)")
    try:
        key = AESGCM(wrapping_key).decrypt(wrapped[1:13], wrapped[13:], aad)
    except Exception as e:  # cryptography.exceptions.InvalidTag
        raise UnwrapError("key unwrap failed (wrong key, tenant, key id or version)") from e
    if len(key) != KEY_LEN:
        raise UnwrapError("unwrapped key is not 32 bytes")
    return key


def wrap_key(wrapping_key: bytes, aad: bytes, key: bytes, nonce: bytes | None = None) -> bytes:
    """`wrap::wrap_key` (for self-tests)."""
    nonce = os.urandom(12) if nonce is None else nonce
    return bytes([WRAP_VERSION_1]) + nonce + AESGCM(wrapping_key).encrypt(nonce, key, aad)


def aes_block(key: bytes, block: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return enc.update(block) + enc.finalize()


def xaes_k1(key: bytes) -> bytes:
    """K1 = dbl(AES-256_K(0^128)) (XAES-256-GCM step 1, CMAC subkey generation)."""
    l = int.from_bytes(aes_block(key, bytes(16)), "big")
    k1 = (l << 1) & ((1 << 128) - 1)
    if l >> 127:
        k1 ^= 0x87
    return k1.to_bytes(16, "big")


def xaes_derive(key: bytes, prefix: bytes, k1: bytes | None = None) -> bytes:
    """The per-nonce AES-256 key for nonce prefix N[0..12] (XAES-256-GCM steps 2-3):
    AES_K(K1 ^ (0x00 0x01 'X' 0x00 || N[0..12])) || AES_K(K1 ^ (0x00 0x02 'X' 0x00 || N[0..12]))."""
    if len(prefix) != 12:
        raise ValueError("nonce prefix must be 12 bytes")
    k1 = xaes_k1(key) if k1 is None else k1
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    m1 = bytes(a ^ b for a, b in zip(b"\x00\x01X\x00" + prefix, k1))
    m2 = bytes(a ^ b for a, b in zip(b"\x00\x02X\x00" + prefix, k1))
    return enc.update(m1 + m2) + enc.finalize()


ENVELOPE_HEADER_LEN, ENVELOPE_NONCE_LEN, ENVELOPE_TAG_LEN = 42, 24, 16
NONCE_PREFIX = slice(42, 54)  # an envelope's nonce prefix N[0..12]
COMMITMENT_LABEL = b"pg_envelope/v1/key-commitment"


def envelope_prefix(envelope: bytes) -> bytes:
    """The 12-byte nonce prefix of an envelope (docs/envelope-format.md: nonce at offset 42)."""
    envelope = bytes(envelope)
    if len(envelope) < ENVELOPE_HEADER_LEN + ENVELOPE_NONCE_LEN + ENVELOPE_TAG_LEN:
        raise ValueError("too short for an envelope")
    return envelope[NONCE_PREFIX]


def envelope_dek_version(envelope: bytes) -> int:
    return struct.unpack(">I", bytes(envelope)[6:10])[0]


# v3 binds the encrypted types' contexts as one byte (docs/envelope-format.md).
TYPE_CONTEXT_PREFIX = b"pg_envelope/type/"
TYPE_CODES = {b"text": 1, b"bytea": 2, b"jsonb": 3, b"int8": 4, b"numeric": 5, b"date": 6, b"timestamptz": 7}


def decrypt_envelope(dek: bytes, tenant: str, context: bytes | None, envelope: bytes) -> bytes:
    """Opens an envelope (v1, v2 or v3) with its DEK, as `DataKey::decrypt` does (for
    self-tests; written from docs/envelope-format.md, not from the Rust code)."""
    env = bytes(envelope)
    header, nonce, body = env[:42], env[42:66], env[66:]
    if env[0] not in (1, 2, 3) or env[1] != 1:
        raise ValueError("unknown envelope version/algorithm")
    if not hmac.compare_digest(hmac.new(dek, COMMITMENT_LABEL, hashlib.sha256).digest(), header[10:42]):
        raise ValueError("key commitment mismatch")
    t = tenant.encode("utf-8")
    aad = (header if env[0] == 1 else header[:10]) + struct.pack(">I", len(t)) + t
    if context is None:
        aad += b"\x00"
    elif env[0] == 3 and context.startswith(TYPE_CONTEXT_PREFIX) and context[len(TYPE_CONTEXT_PREFIX):] in TYPE_CODES:
        aad += b"\x02" + bytes([TYPE_CODES[context[len(TYPE_CONTEXT_PREFIX):]]])
    else:
        aad += b"\x01" + struct.pack(">I", len(context)) + context
    return AESGCM(xaes_derive(dek, nonce[:12])).decrypt(nonce[12:], body, aad)


def encrypt_envelope(dek: bytes, tenant: str, context: bytes | None, header: bytes, plaintext: bytes) -> bytes:
    """Seals `plaintext` as a v3 envelope under `header` (a genuine envelope's first 42 bytes:
    version, algorithm, key id, DEK version, commitment) with a fresh nonce: what a holder of
    the tenant's keys can make (for tests of what the extension does with forged plaintexts)."""
    header = bytes(header)
    if len(header) != 42 or header[0] != 3:
        raise ValueError("a v3 header of 42 bytes")
    nonce = os.urandom(24)
    t = tenant.encode("utf-8")
    aad = header[:10] + struct.pack(">I", len(t)) + t
    if context is None:
        aad += b"\x00"
    elif context.startswith(TYPE_CONTEXT_PREFIX) and context[len(TYPE_CONTEXT_PREFIX):] in TYPE_CODES:
        aad += b"\x02" + bytes([TYPE_CODES[context[len(TYPE_CONTEXT_PREFIX):]]])
    else:
        aad += b"\x01" + struct.pack(">I", len(context)) + context
    return header + nonce + AESGCM(xaes_derive(dek, nonce[:12])).encrypt(nonce[12:], plaintext, aad)


# ---------------------------------------------------------------------------------------------
# Key material and search patterns
# ---------------------------------------------------------------------------------------------

Pattern = namedtuple("Pattern", "label data key form")
# label   e.g. "dek v1 schedule[32:64]"; data: the bytes searched for;
# key     which key ("root", "tenant key", "dek v1", "dek v1 derived <prefix hex>", "control");
# form    "raw", "schedule[32:64]", "schedule[176:208]", "schedule-x2[2:4]", "schedule-x4[2:4]",
#         "K1", "hex-text" (and "schedule[0:32]" for a raw hit inside a schedule, set by the scan).

RAW_IN_SCHEDULE = "schedule[0:32]"


def fingerprint(key: bytes) -> str:
    """A short, non-reversible name for a key, safe to print."""
    return hashlib.sha256(b"keyscan fingerprint\0" + key).hexdigest()[:12]


def key_patterns(name: str, key: bytes, k1: bytes | None = None) -> list[Pattern]:
    """Every form of `key` searched for (see the module docstring)."""
    s = aes256_expand_key(key)
    rk2, rk3 = s[32:48], s[48:64]
    pats = [
        Pattern(f"{name} raw", key, name, "raw"),
        Pattern(f"{name} schedule[32:64]", s[32:64], name, "schedule[32:64]"),
        Pattern(f"{name} schedule[176:208]", s[176:208], name, "schedule[176:208]"),
        Pattern(f"{name} schedule-x2[2:4]", rk2 * 2 + rk3 * 2, name, "schedule-x2[2:4]"),
        Pattern(f"{name} schedule-x4[2:4]", rk2 * 4 + rk3 * 4, name, "schedule-x4[2:4]"),
    ]
    if k1 is not None:
        pats.append(Pattern(f"{name} K1", k1, name, "K1"))
    return pats


def read_root_key_file(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    """The root key, parsed as `LocalProvider::load_root_key` does: exactly 32 bytes are the raw
    key; otherwise one trailing newline is dropped and 64 hex characters are the key. Returns
    (key, hex text or None)."""
    buf = Path(path).read_bytes()
    if len(buf) == KEY_LEN:
        return buf, None
    text = buf[:-1] if buf.endswith(b"\n") else buf
    if len(text) == 2 * KEY_LEN and re.fullmatch(rb"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text.decode()), text
    raise ValueError(f"root key file {path} must hold 32 raw bytes or 64 hex characters")


class KeyMaterial:
    """Every key of one tenant, unwrapped from its catalog rows."""

    def __init__(self, root: bytes, tenant: str, tenant_key_id: int, wrapped_tenant_key: bytes,
                 wrapped_deks: dict[int, bytes], root_hex_text: bytes | None = None):
        self.root = root
        self.root_hex_text = root_hex_text
        self.tenant = tenant
        self.tenant_key_id = tenant_key_id
        self.tenant_key = unwrap_key(root, wrap_aad_tenant_key(tenant, tenant_key_id), wrapped_tenant_key)
        self.deks = {
            v: unwrap_key(self.tenant_key, wrap_aad_data_key(tenant, tenant_key_id, v), w)
            for v, w in sorted(wrapped_deks.items())
        }

    @classmethod
    def from_catalog(cls, conn, root_key_file: str, tenant: str) -> "KeyMaterial":
        """Reads the tenant's wrapped keys through a psycopg connection (superuser: the key
        tables are not readable by PUBLIC) and unwraps them with the root key file."""
        root, hex_text = read_root_key_file(root_key_file)
        row = conn.execute("SELECT id, wrapped_key FROM envelope.tenants WHERE name = %s", (tenant,)).fetchone()
        if row is None:
            raise LookupError(f"no tenant {tenant!r} in envelope.tenants")
        tid, wrapped = row
        deks = {
            v: bytes(w)
            for v, w in conn.execute(
                "SELECT version, wrapped_key FROM envelope.data_keys WHERE tenant_id = %s ORDER BY version", (tid,)
            ).fetchall()
        }
        return cls(root, tenant, tid, bytes(wrapped), deks, hex_text)

    def derived(self, prefixes) -> dict[tuple[int, bytes], bytes]:
        """XAES derived keys for every DEK version and every 12-byte prefix."""
        return {(v, p): xaes_derive(k, p) for v, k in self.deks.items() for p in prefixes}

    def patterns(self, prefixes=(), include_root=True) -> list[Pattern]:
        prefixes = sorted({bytes(p) for p in prefixes})
        pats: list[Pattern] = []
        if include_root:
            pats += key_patterns("root", self.root)
            if self.root_hex_text:
                for text in {self.root_hex_text, self.root_hex_text.lower(), self.root_hex_text.upper()}:
                    pats.append(Pattern("root hex-text", text, "root", "hex-text"))
        pats += key_patterns("tenant key", self.tenant_key)
        for v, k in self.deks.items():
            pats += key_patterns(f"dek v{v}", k, k1=xaes_k1(k))
        for (v, p), k in self.derived(prefixes).items():
            pats += key_patterns(f"dek v{v} derived {p.hex()}", k)
        return pats

    def describe(self) -> str:
        lines = [f"tenant {self.tenant!r} (tenant key id {self.tenant_key_id})",
                 f"  root key        fp {fingerprint(self.root)}",
                 f"  tenant key      fp {fingerprint(self.tenant_key)}"]
        lines += [f"  dek v{v:<10} fp {fingerprint(k)}" for v, k in self.deks.items()]
        return "\n".join(lines)


def control_pattern(data: bytes, label: str = "control canary") -> Pattern:
    """A known byte string planted in the target, to prove a scan can find things there."""
    return Pattern(label, data, "control", "canary")


# ---------------------------------------------------------------------------------------------
# /proc/PID maps, smaps, threads
# ---------------------------------------------------------------------------------------------

Mapping = namedtuple("Mapping", "start end perms offset dev inode path flags rss swap region")
Hit = namedtuple("Hit", "label address mapping dd region perms key form source")
# label, address, mapping (pathname, [heap], [stack] or anon), dd (MADV_DONTDUMP),
# region (heap, stack, thread-stack ..., anon, shm, file, or the [name]), perms (rwxp), key, form,
# source ("mem" or "core+0x<offset>").

_MAP_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) (\S+) (\d+)\s*(.*)$")
_SKIP_NAMES = ("[vvar", "[vsyscall")


def _is_anon(path: str) -> bool:
    return path == "" or path.startswith("[anon")


def read_threads(pid: int) -> list[tuple[int, str, int | None]]:
    """(tid, comm, stack pointer or None) for every thread of `pid`. The stack pointer comes from
    /proc/PID/task/TID/syscall (needs ptrace access: root)."""
    out = []
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return out
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        try:
            comm = Path(base, "comm").read_text().strip()
        except OSError:
            continue
        sp = None
        try:
            fields = Path(base, "syscall").read_text().split()
            if len(fields) >= 3 and fields[0] != "running":
                sp = int(fields[-2], 16)
        except (OSError, ValueError):
            pass
        out.append((tid, comm, sp))
    return out


def read_mappings(pid: int) -> list[Mapping]:
    """The mappings of /proc/PID/maps, with VmFlags, Rss and Swap from /proc/PID/smaps and a
    region class. Thread stacks: a live thread's stack pointer falls in it, or (for the cached
    stack of an exited thread, which glibc keeps mapped) an anonymous rw mapping directly above
    a PROT_NONE guard mapping; the latter is a heuristic and is labelled `thread-stack?`."""
    maps = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        m = _MAP_LINE.match(line)
        if m:
            maps.append(m.groups())
    smaps: dict[tuple[int, int], dict] = {}
    cur = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = _MAP_LINE.match(line)
        if m:
            cur = {"flags": set(), "rss": 0, "swap": 0}
            smaps[(int(m.group(1), 16), int(m.group(2), 16))] = cur
        elif cur is not None:
            key, _, value = line.partition(":")
            if key == "VmFlags":
                cur["flags"] = set(value.split())
            elif key in ("Rss", "Swap"):
                cur[key.lower()] = int(value.split()[0]) * 1024
    live = [(tid, comm, sp) for tid, comm, sp in read_threads(pid) if sp is not None]
    main_tid = pid
    out: list[Mapping] = []
    prev = None
    for start_s, end_s, perms, off, dev, inode, path in maps:
        start, end = int(start_s, 16), int(end_s, 16)
        info = smaps.get((start, end))
        flags = info["flags"] if info else set()
        rss = info["rss"] if info else end - start
        swap = info["swap"] if info else 0
        if path == "[heap]":
            region = "heap"
        elif path.startswith("[stack"):
            region = "stack"
        else:
            region = None
            for tid, comm, sp in live:
                if start <= sp < end and tid != main_tid:
                    region = f"thread-stack tid={tid} ({comm})"
                    break
            if region is None:
                if (_is_anon(path) and perms.startswith("rw") and prev is not None and prev.end == start
                        and prev.perms.startswith("---") and _is_anon(prev.path)):
                    region = "thread-stack?"
                elif perms[3] == "s":
                    region = "shm"
                elif _is_anon(path):
                    region = "anon"
                elif path.startswith("["):
                    region = path
                else:
                    region = "file"
        mp = Mapping(start, end, perms, int(off, 16), dev, int(inode), path, flags, rss, swap, region)
        out.append(mp)
        prev = mp
    return out


def _mapping_name(m: Mapping) -> str:
    return m.path if m.path else "anon"


# ---------------------------------------------------------------------------------------------
# Searching
# ---------------------------------------------------------------------------------------------

CHUNK = 8 << 20


def _check_patterns(patterns) -> tuple[list[tuple[bytes, list[Pattern]]], int]:
    """Groups patterns by their first 16 bytes (the schedule forms of one key all start with
    round key 2): each group is searched once, for the group's common prefix, and each member
    is then checked where that prefix occurs. Returns (groups, overlap needed between chunks)."""
    patterns = list(patterns)
    if not patterns:
        raise ValueError("no patterns")
    groups: dict[bytes, list[Pattern]] = {}
    for p in patterns:
        if len(p.data) < 16:
            raise ValueError(f"pattern {p.label!r} is shorter than 16 bytes")
        groups.setdefault(bytes(p.data[:16]), []).append(p)
    out = []
    for members in groups.values():
        needle = os.path.commonprefix([m.data for m in members])
        out.append((needle, members))
    return out, max(len(p.data) for p in patterns) - 1


def _find_in(buf: bytes, limit: int, groups, emit) -> None:
    """Every occurrence of every pattern starting before `limit` in `buf`."""
    for needle, members in groups:
        i = buf.find(needle)
        while 0 <= i < limit:
            for p in members:
                if len(members) == 1 or buf.startswith(p.data, i):
                    emit(p, i)
            i = buf.find(needle, i + 1)


def _read_runs(fd: int, addr: int, size: int, stats: dict) -> list[tuple[int, bytes]]:
    """Reads [addr, addr+size) through `fd`, skipping unreadable pages: a failed read is split in
    halves down to single pages. Returns contiguous readable runs in address order."""
    runs: list[list] = []  # [start address, end address, [pieces]]
    todo = [(addr, size)]
    while todo:
        a, s = todo.pop()
        try:
            data = os.pread(fd, s, a)
        except OSError:
            if s <= PAGE:
                stats["unreadable_bytes"] = stats.get("unreadable_bytes", 0) + s
                continue
            half = max(PAGE, (s // 2) // PAGE * PAGE)
            todo.append((a + half, s - half))
            todo.append((a, half))
            continue
        if data:
            if runs and runs[-1][1] == a:
                runs[-1][1] += len(data)
                runs[-1][2].append(data)
            else:
                runs.append([a, a + len(data), [data]])
        if len(data) < s:
            if data:
                todo.append((a + len(data), s - len(data)))
            else:  # nothing at this page: skip it
                stats["unreadable_bytes"] = stats.get("unreadable_bytes", 0) + min(s, PAGE)
                if s > PAGE:
                    todo.append((a + PAGE, s - PAGE))
    return [(a, b"".join(pieces)) for a, _end, pieces in runs]


def _mark_schedule_context(hits: list[Hit]) -> list[Hit]:
    """A raw hit followed, 32 bytes later, by the same key's schedule[32:64] is the start of a
    live key schedule: report it as form schedule[0:32] rather than a stand-alone raw copy."""
    sched = {(h.key, h.address) for h in hits if h.form == "schedule[32:64]" and h.address is not None}
    out = []
    for h in hits:
        if h.form == "raw" and h.address is not None and (h.key, h.address + 32) in sched:
            h = h._replace(form=RAW_IN_SCHEDULE, label=f"{h.key} {RAW_IN_SCHEDULE} (raw key at the start of its schedule)")
        out.append(h)
    return out


def scan_proc_mem(pid: int, patterns, stats: dict | None = None, chunk: int = CHUNK,
                  include_noaccess: bool = True) -> list[Hit]:
    """Searches every mapping of process `pid` through /proc/PID/mem. Returns the hits sorted by
    address. `stats` (a dict), when given, receives what was read and how long it took."""
    groups, overlap = _check_patterns(patterns)
    stats = {} if stats is None else stats
    t0 = time.monotonic()
    maps = read_mappings(pid)
    hits: dict[tuple[str, int], Hit] = {}
    stats.update(mappings=len(maps), scanned_mappings=0, bytes=0, unreadable_bytes=0, skipped=[])

    def emitter(base, m, name, dd):
        def emit(p, i):
            addr = base + i
            hits.setdefault((p.label, addr), Hit(p.label, addr, name, dd, m.region, m.perms, p.key, p.form, "mem"))
        return emit

    # The last bytes of the previous mapping, when they were read up to its end: a pattern
    # straddling two adjacent mappings (e.g. a MADV_DONTDUMP range split off its neighbour) is
    # found in this seam and attributed to the mapping it starts in.
    tail = None  # (end address, bytes, emit of the previous mapping)
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        for m in maps:
            name = _mapping_name(m)
            if m.path.startswith(_SKIP_NAMES) or {"io", "pf"} & m.flags:
                stats["skipped"].append(f"{m.start:#x} {name} (special)")
                tail = None
                continue
            # Rss counts only pages mapped in this process: meaningful for private mappings.
            untouched = m.perms[3] == "p" and m.rss + m.swap == 0
            if ("r" not in m.perms and (not include_noaccess or untouched)) or (_is_anon(m.path) and untouched):
                # PROT_NONE with no resident page (guard pages, reserved arena space), or private
                # anonymous memory never touched (zeros).
                tail = None
                continue
            stats["scanned_mappings"] += 1
            dd = "dd" in m.flags
            pos = m.start
            while pos < m.end:
                n = min(chunk, m.end - pos)
                want = min(n + overlap, m.end - pos)
                for run_addr, data in _read_runs(fd, pos, want, stats):
                    stats["bytes"] += min(len(data), max(0, pos + n - run_addr))
                    if tail is not None and run_addr == m.start and tail[0] == m.start and overlap:
                        seam = tail[1] + data[:overlap]
                        _find_in(seam, len(tail[1]), groups, lambda p, i, t=tail: t[2](p, i - len(t[1])))
                    tail = None
                    emit = emitter(run_addr, m, name, dd)
                    _find_in(data, pos + n - run_addr, groups, emit)
                    if overlap and run_addr + len(data) == m.end:
                        tail = (m.end, data[-overlap:], emitter(m.end, m, name, dd))
                pos += n
    finally:
        os.close(fd)
    stats["seconds"] = time.monotonic() - t0
    return sorted(_mark_schedule_context(list(hits.values())), key=lambda h: (h.address, h.label))


# ---- core files -------------------------------------------------------------------------------


def _core_segments(path: str) -> list[tuple[int, int, int]]:
    """(file offset, file size, virtual address) of every PT_LOAD segment of an ELF64 core."""
    with open(path, "rb") as f:
        eh = f.read(64)
        if eh[:4] != b"\x7fELF" or eh[4] != 2 or eh[5] != 1:
            raise ValueError(f"{path} is not a little-endian ELF64 file")
        phoff, shoff = struct.unpack_from("<QQ", eh, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", eh, 0x36)
        if phnum == 0xFFFF:  # PN_XNUM: the count is in section header 0's sh_info
            f.seek(shoff)
            phnum = struct.unpack_from("<I", f.read(64), 44)[0]
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    segs = []
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
        if p_type == 1 and p_filesz:
            segs.append((p_offset, p_filesz, p_vaddr))
    return sorted(segs)


def scan_file(path: str, patterns, chunk: int = CHUNK) -> list[tuple[Pattern, int]]:
    """(pattern, file offset) for every occurrence in a file."""
    groups, overlap = _check_patterns(patterns)
    found = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            n = min(chunk, size - pos)
            data = os.pread(fd, min(n + overlap, size - pos), pos)
            _find_in(data, n, groups, lambda p, i, base=pos: found.append((p, base + i)))
            pos += n
    finally:
        os.close(fd)
    return found


def scan_core(pid: int, patterns, stats: dict | None = None, keep_core: str | None = None,
              timeout: float = 600) -> list[Hit]:
    """Dumps `pid` with `gcore -o /tmp/keyscan-core-*/core PID` (gdb leaves out MADV_DONTDUMP
    mappings, as the kernel does), searches the core file and deletes it. Hits carry the virtual
    address (from the core's PT_LOAD segments) and the live mapping at that address."""
    patterns = list(patterns)
    _check_patterns(patterns)
    stats = {} if stats is None else stats
    gcore = shutil.which("gcore")
    if gcore is None:
        raise FileNotFoundError("gcore (gdb) is not installed")
    t0 = time.monotonic()
    maps = read_mappings(pid)
    starts = [m.start for m in maps]
    tmp = tempfile.mkdtemp(prefix="keyscan-core-", dir="/tmp")
    prefix = os.path.join(tmp, "core")
    core = f"{prefix}.{pid}"
    env = {k: v for k, v in os.environ.items() if k != "DEBUGINFOD_URLS"}
    try:
        r = subprocess.run([gcore, "-o", prefix, str(pid)], capture_output=True, text=True,
                           timeout=timeout, env=env, stdin=subprocess.DEVNULL)
        if not os.path.exists(core):
            raise RuntimeError(f"gcore failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        stats["gcore_seconds"] = time.monotonic() - t0
        stats["core_bytes"] = os.path.getsize(core)
        segs = _core_segments(core)
        offs = [s[0] for s in segs]
        stats["core_segments"] = len(segs)
        hits = []
        for p, off in scan_file(core, patterns):
            addr = None
            k = bisect.bisect_right(offs, off) - 1
            if k >= 0 and off < segs[k][0] + segs[k][1]:
                addr = segs[k][2] + (off - segs[k][0])
            name, dd, region, perms = "core (notes/headers)", False, "core-notes", "----"
            if addr is not None:
                j = bisect.bisect_right(starts, addr) - 1
                if j >= 0 and addr < maps[j].end:
                    m = maps[j]
                    name, dd, region, perms = _mapping_name(m), "dd" in m.flags, m.region, m.perms
                else:
                    name, region = "core (no live mapping)", "unknown"
            hits.append(Hit(p.label, addr, name, dd, region, perms, p.key, p.form, f"core+{off:#x}"))
        if keep_core:
            shutil.move(core, keep_core)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stats["seconds"] = time.monotonic() - t0
    return sorted(_mark_schedule_context(hits), key=lambda h: (h.address or -1, h.label))


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def format_hits(hits, title: str = "hits", stats: dict | None = None, max_hits: int = 200) -> str:
    """A readable report: a summary by pattern, mapping, region and dd flag, then every hit
    (at most `max_hits` of them)."""
    lines = [f"== {title}: {len(hits)} hit(s)"]
    if stats:
        parts = []
        if "bytes" in stats:
            parts.append(f"{stats['bytes'] / 1e6:.1f} MB in {stats.get('scanned_mappings', '?')}/"
                         f"{stats.get('mappings', '?')} mappings")
        if stats.get("unreadable_bytes"):
            parts.append(f"{stats['unreadable_bytes'] / 1e6:.1f} MB unreadable")
        if "core_bytes" in stats:
            parts.append(f"core {stats['core_bytes'] / 1e6:.1f} MB, gcore {stats.get('gcore_seconds', 0):.1f} s")
        if "seconds" in stats:
            parts.append(f"{stats['seconds']:.2f} s")
        lines.append("   " + ", ".join(parts))
    if not hits:
        return "\n".join(lines)
    summary = Counter((h.label, h.mapping, h.region, h.dd) for h in hits)
    lines.append("   summary (pattern | mapping | region | dd: count):")
    for (label, mapping, region, dd), n in sorted(summary.items()):
        lines.append(f"     {label:<52} | {mapping:<28} | {region:<24} | dd={'yes' if dd else 'NO '}: {n}")
    lines.append("   every hit:" if len(hits) <= max_hits else f"   the first {max_hits} hits:")
    for h in hits[:max_hits]:
        addr = f"{h.address:#018x}" if h.address is not None else "-" * 18
        lines.append(f"     {addr} {h.perms} dd={'yes' if h.dd else 'NO '} {h.region:<24} {h.mapping:<28} "
                     f"{h.label}  [{h.source}]")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Self-test
# ---------------------------------------------------------------------------------------------

# FIPS-197 Appendix A.3: expansion of a 256-bit cipher key, w[0] .. w[59].
FIPS197_A3_KEY = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
FIPS197_A3_WORDS = (
    "603deb10 15ca71be 2b73aef0 857d7781 1f352c07 3b6108d7 2d9810a3 0914dff4 "
    "9ba35411 8e6925af a51a8b5f 2067fcde a8b09c1a 93d194cd be49846e b75d5b9a "
    "d59aecb8 5bf3c917 fee94248 de8ebe96 b5a9328a 2678a647 98312229 2f6c79b3 "
    "812c81ad dadf48ba 24360af2 fab8b464 98c5bfc9 bebd198e 268c3ba7 09e04214 "
    "68007bac b2df3316 96e939e4 6c518d80 c814e204 76a9fb8a 5025c02d 59c58239 "
    "de136967 6ccc5a71 fa256395 9674ee15 5886ca5d 2e2f31d7 7e0af1fa 27cf73c3 "
    "749c47ab 18501dda e2757e4f 7401905a cafaaae3 e4d59b34 9adf6ace bd10190d "
    "fe4890d1 e6188d0b 046df344 706c631e"
).split()

# C2SP XAES-256-GCM test vectors (https://c2sp.org/XAES-256-GCM), also in crates/core/tests/vectors.rs.
XAES_VECTORS = [
    (bytes([1]) * 32, b"", "ce546ef63c9cc60765923609b33a9a1974e96e52daf2fcf7075e2271"),
    (bytes([3]) * 32, b"c2sp.org/XAES-256-GCM", "986ec1832593df5443a179437fd083bf3fdb41abd740a21f71eb769d"),
]

# One chain of crates/core/tests/golden/v2.txt (written by the Rust code): root key -> wrapped
# tenant key -> wrapped DEK -> envelope with a context.
GOLDEN_V2 = (
    "chain root=1111111111111111111111111111111111111111111111111111111111111111 tenant=acme tenant_key_id=7 "
    "dek_version=1 wrapped_kek=01e3e443eaa71c775a9d9c7ffe0cbe73ef69f9f355033d3884671d62a600b1d06e3be6558776c0b75"
    "f678c6b0322f99e7ceff4820885e14bedac059955 wrapped_dek=015f9dd1927e9d849e3139d3aee9b48ed3416d13a4c27d84898cc3"
    "8bfc6b71b84dba53258143a4dcc88dc6617612077d4be988cc0ecd13e1c3be7d8eb5 context=75736572732e656d61696c "
    "plaintext=616c696365406578616d706c652e636f6d envelope=02010000000700000001d36f2882351a22515e209b0ec4d401494"
    "7c9403c9f10471c4a34a927fdb1cf442c8b5d19ca94c8e550f9f806430f34d7de133d7be558a28968d86c8a940417d879eb47fd98"
    "1ac9d87e626b0aee37528e27497706b2161aec1b"
)
_HERE = Path(__file__).resolve()
GOLDEN_DIR = _HERE.parents[2] / "crates/core/tests/golden" if len(_HERE.parents) > 2 else None  # in the repo


def _check_golden_line(line: str) -> None:
    f = dict(kv.split("=", 1) for kv in line.split()[1:])
    root, tenant, tid, ver = bytes.fromhex(f["root"]), f["tenant"], int(f["tenant_key_id"]), int(f["dek_version"])
    kek = unwrap_key(root, wrap_aad_tenant_key(tenant, tid), bytes.fromhex(f["wrapped_kek"]))
    dek = unwrap_key(kek, wrap_aad_data_key(tenant, tid, ver), bytes.fromhex(f["wrapped_dek"]))
    ctx = None if f["context"] == "-" else bytes.fromhex(f["context"])
    env = bytes.fromhex(f["envelope"])
    assert decrypt_envelope(dek, tenant, ctx, env) == bytes.fromhex(f["plaintext"]), line[:80]
    assert envelope_dek_version(env) == ver


def _selftest_scanner(verbose: bool) -> None:
    """Scans this very process: a pattern in an ordinary mapping, one in a MADV_DONTDUMP mapping,
    and one straddling a chunk boundary (small chunk size) must all be found at their addresses."""
    import ctypes
    import mmap

    size = 4 * PAGE
    private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    plain = mmap.mmap(-1, size, flags=private)
    hidden = mmap.mmap(-1, size, flags=private)
    hidden.madvise(mmap.MADV_DONTDUMP)
    split = mmap.mmap(-1, 2 * PAGE, flags=private)
    split.madvise(mmap.MADV_DONTDUMP, PAGE, PAGE)  # two adjacent mappings: plain, then dd
    try:
        a_plain = ctypes.addressof(ctypes.c_char.from_buffer(plain))
        a_hidden = ctypes.addressof(ctypes.c_char.from_buffer(hidden))
        a_split = ctypes.addressof(ctypes.c_char.from_buffer(split))
        p1 = control_pattern(os.urandom(32), "selftest plain")
        p2 = control_pattern(os.urandom(32), "selftest dontdump")
        p3 = control_pattern(os.urandom(48), "selftest straddle")
        p4 = control_pattern(os.urandom(64), "selftest seam")
        plain[100:132] = p1.data
        hidden[200:232] = p2.data
        plain[2 * PAGE - 20:2 * PAGE + 28] = p3.data  # straddles a 2-page chunk boundary
        split[PAGE - 24:PAGE + 40] = p4.data  # straddles the two mappings
        for chunk in (CHUNK, 2 * PAGE):
            stats: dict = {}
            hits = scan_proc_mem(os.getpid(), [p1, p2, p3, p4], stats=stats, chunk=chunk)
            at = {(h.label, h.address): h for h in hits}
            h1 = at.get((p1.label, a_plain + 100))
            h2 = at.get((p2.label, a_hidden + 200))
            h3 = at.get((p3.label, a_plain + 2 * PAGE - 20))
            h4 = at.get((p4.label, a_split + PAGE - 24))
            assert h1 is not None and h1.dd is False, f"plain pattern not found at its address (chunk {chunk})"
            assert h2 is not None and h2.dd is True, f"MADV_DONTDUMP pattern not found or not flagged dd (chunk {chunk})"
            assert h3 is not None, f"pattern straddling a chunk boundary not found (chunk {chunk})"
            assert h4 is not None and h4.dd is False, f"pattern straddling two mappings not found (chunk {chunk})"
            if verbose:
                print(f"   self-scan (chunk {chunk} B): {len(hits)} hits, {stats['bytes'] / 1e6:.1f} MB "
                      f"in {stats['seconds']:.2f} s (the patterns' own Python objects are hits too)")
    finally:
        plain.close()
        hidden.close()
        split.close()


def selftest(verbose: bool = True) -> None:
    if not __debug__:
        raise RuntimeError("the self-test uses assert: run it without python -O")

    def ok(msg):
        if verbose:
            print(f"ok  {msg}")

    assert SBOX[0x00] == 0x63 and SBOX[0x01] == 0x7C and SBOX[0x53] == 0xED and SBOX[0xFF] == 0x16
    sched = aes256_expand_key(FIPS197_A3_KEY)
    got = [sched[4 * i:4 * i + 4].hex() for i in range(60)]
    assert got == FIPS197_A3_WORDS, next(f"w[{i}] = {g}, expected {e}" for i, (g, e) in enumerate(zip(got, FIPS197_A3_WORDS)) if g != e)
    ok("AES-256 key expansion matches FIPS-197 Appendix A.3 (w[0]..w[59])")

    for key in [FIPS197_A3_KEY] + [os.urandom(32) for _ in range(20)]:
        s = aes256_expand_key(key)
        for first in range(0, 53):
            assert aes256_invert_schedule(s[4 * first:4 * first + 32], first) == key
    ok("two adjacent round keys (any 8 consecutive words) invert to the key: schedule[32:64] and [176:208] included")

    nonce = b"ABCDEFGHIJKLMNOPQRSTUVWX"
    for key, aad, ct in XAES_VECTORS:
        derived = xaes_derive(key, nonce[:12])
        assert AESGCM(derived).encrypt(nonce[12:], b"XAES-256-GCM", aad).hex() == ct
    ok("XAES-256-GCM: K1 and the derived key reproduce the C2SP vectors")

    _check_golden_line(GOLDEN_V2)
    n = 1
    for name in ("v1.txt", "v2.txt", "v3.txt"):
        p = GOLDEN_DIR / name if GOLDEN_DIR else None
        if p is not None and p.exists():
            for line in p.read_text().splitlines():
                if line.startswith("chain "):
                    _check_golden_line(line)
                    n += 1
    ok(f"golden chains written by the Rust code unwrap and decrypt ({n} chains: root -> tenant key -> DEK -> envelope)")

    root, kek, dek = os.urandom(32), os.urandom(32), os.urandom(32)
    for tenant in ("acme", "ünïcødé tenant", "x" * 255):
        a_t = wrap_aad_tenant_key(tenant, 7)
        a_d = wrap_aad_data_key(tenant, 7, 3)
        w_t, w_d = wrap_key(root, a_t, kek), wrap_key(kek, a_d, dek)
        assert len(w_t) == len(w_d) == WRAPPED_LEN and w_t[0] == 1
        assert unwrap_key(root, a_t, w_t) == kek and unwrap_key(kek, a_d, w_d) == dek
        km = KeyMaterial(root, tenant, 7, w_t, {3: w_d})
        assert km.tenant_key == kek and km.deks == {3: dek}
        for bad_key, bad_aad, w in [
            (root, wrap_aad_tenant_key(tenant + "x", 7), w_t),
            (root, wrap_aad_tenant_key(tenant, 8), w_t),
            (root, wrap_aad_data_key(tenant, 7, 1), w_t),
            (kek, wrap_aad_data_key(tenant, 7, 4), w_d),
            (kek, wrap_aad_tenant_key(tenant, 7), w_d),
            (os.urandom(32), a_t, w_t),
        ]:
            try:
                unwrap_key(bad_key, bad_aad, w)
                raise AssertionError("unwrap accepted a wrong key or context")
            except UnwrapError:
                pass
        for i in range(len(w_t)):
            t = bytearray(w_t)
            t[i] ^= 0x01
            try:
                unwrap_key(root, a_t, bytes(t))
                raise AssertionError(f"unwrap accepted a flipped byte {i}")
            except UnwrapError:
                pass
    aad = wrap_aad_data_key("acme", 0x01020304, 0x0A0B0C0D)
    assert aad == b"\x01pg_envelope/v1/data-key\x00\x01\x02\x03\x04\x0a\x0b\x0c\x0d\x00\x00\x00\x04acme"
    assert wrap_aad_tenant_key("acme", 7) == b"\x01pg_envelope/v1/tenant-key\x00\x00\x00\x00\x07\x00\x00\x00\x04acme"
    ok("wrap/unwrap round-trips with the WrapAad encoding; other tenant, id, version, purpose, key or any flipped byte fail")

    with tempfile.TemporaryDirectory() as d:
        k = os.urandom(32)
        for content, hexed in [(k, False), (k.hex().encode() + b"\n", True), (k.hex().upper().encode(), True)]:
            p = Path(d, "root.key")
            p.write_bytes(content)
            got_k, text = read_root_key_file(p)
            assert got_k == k and (text is not None) == hexed
        for bad in (b"abc", b"z" * 64, bytes(33), k.hex().encode() + b"\n\n"):
            Path(d, "root.key").write_bytes(bad)
            try:
                read_root_key_file(Path(d, "root.key"))
                raise AssertionError("bad root key file accepted")
            except ValueError:
                pass
    ok("root key file: 32 raw bytes or 64 hex characters with an optional newline, as LocalProvider parses it")

    km = KeyMaterial(root, "acme", 7, wrap_key(root, wrap_aad_tenant_key("acme", 7), kek),
                     {1: wrap_key(kek, wrap_aad_data_key("acme", 7, 1), dek)})
    pats = km.patterns([bytes(12), b"\xff" * 12])
    labels = [p.label for p in pats]
    assert len(labels) == len(set(labels)) == 5 + 5 + 6 + 2 * 5, labels
    s = aes256_expand_key(dek)
    sample = b"\x00" * 7 + s + b"\x00" * 9 + dek + b"\x00" * 5
    found = [(p.form, i) for p in pats for i in [sample.find(p.data)] if i >= 0]
    assert ("raw", 7) in found and ("schedule[32:64]", 39) in found and ("schedule[176:208]", 183) in found
    # The grouped search (scan_file / scan_proc_mem) finds every form, including the VAES
    # broadcast forms that share their first 16 bytes with schedule[32:64].
    x2 = s[32:48] * 2 + s[48:64] * 2
    x4 = s[32:48] * 4 + s[48:64] * 4
    blob = sample + b"\x11" * 3 + x2 + b"\x22" * 5 + x4 + os.urandom(100) + xaes_k1(dek)
    with tempfile.NamedTemporaryFile() as f:
        f.write(blob)
        f.flush()
        got = {(p.key, p.form, off) for p, off in scan_file(f.name, pats, chunk=64)}
    base = len(sample) + 3
    want = {("dek v1", "raw", 7), ("dek v1", "schedule[32:64]", 39), ("dek v1", "schedule[176:208]", 183),
            ("dek v1", "raw", 7 + 240 + 9), ("dek v1", "schedule-x2[2:4]", base),
            ("dek v1", "schedule-x4[2:4]", base + 64 + 5), ("dek v1", "K1", len(blob) - 16),
            # the forms nest: rk2 rk3 sits inside rk2 rk2 rk3 rk3, which sits inside the x4 form
            ("dek v1", "schedule[32:64]", base + 16), ("dek v1", "schedule[32:64]", base + 64 + 5 + 48),
            ("dek v1", "schedule-x2[2:4]", base + 64 + 5 + 32)}
    assert got == want, (got ^ want)
    ok(f"{len(pats)} labelled patterns per tenant with 1 DEK and 2 prefixes; windows sit at the expected offsets")

    _selftest_scanner(verbose)
    ok("scan_proc_mem finds known bytes in this process at the right addresses, flags MADV_DONTDUMP, "
       "finds patterns across chunk and mapping boundaries")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _bench(mb: int) -> None:
    """Starts a Python process holding `mb` MB (random, zeros, text) and times scan_proc_mem on it
    with the patterns of a tenant with one DEK and two prefixes."""
    code = (
        "import os, sys, time\n"
        f"n = {mb} << 20\n"
        "a = os.urandom(n // 2)\n"
        "b = bytearray(n // 4)\n"
        "b[::4096] = b'x' * len(b[::4096])\n"
        "c = (b'SELECT * FROM users WHERE id = 1;' * (n // 4 // 33 + 1))[: n // 4]\n"
        "sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child.stdout.readline()
        root, kek, dek = os.urandom(32), os.urandom(32), os.urandom(32)
        km = KeyMaterial(root, "acme", 7, wrap_key(root, wrap_aad_tenant_key("acme", 7), kek),
                         {1: wrap_key(kek, wrap_aad_data_key("acme", 7, 1), dek)}, root.hex().encode())
        pats = km.patterns([os.urandom(12), os.urandom(12)])
        stats: dict = {}
        hits = scan_proc_mem(child.pid, pats, stats=stats)
        print(format_hits(hits, f"bench: pid {child.pid}, {len(pats)} patterns", stats))
    finally:
        child.kill()
        child.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--selftest", action="store_true", help="run the self-tests and exit")
    ap.add_argument("--bench-mb", type=int, help="time a scan of a helper process of this many MB")
    ap.add_argument("--pid", type=int, help="backend process id (SELECT pg_backend_pid())")
    ap.add_argument("--root-key-file", help="the local provider's root key file (SHOW envelope.local_root_key_file)")
    ap.add_argument("--dsn", help="libpq connection string of a superuser, to read the wrapped keys")
    ap.add_argument("--tenant", help="tenant name")
    ap.add_argument("--prefix", action="append", default=[], help="12-byte nonce prefix, hex (repeatable)")
    ap.add_argument("--envelope", action="append", default=[], help="an envelope, hex: its nonce prefix is used (repeatable)")
    ap.add_argument("--gcore", action="store_true", help="also dump the process with gcore and scan the dump")
    ap.add_argument("--no-proc", action="store_true", help="skip the /proc/PID/mem scan")
    args = ap.parse_args(argv)

    if args.selftest:
        selftest()
        print("selftest passed")
        return 0
    if args.bench_mb:
        _bench(args.bench_mb)
        return 0
    missing = [o for o in ("pid", "root_key_file", "dsn", "tenant") if getattr(args, o) is None]
    if missing:
        ap.error("missing " + ", ".join("--" + m.replace("_", "-") for m in missing))

    import psycopg

    prefixes = [bytes.fromhex(p) for p in args.prefix]
    for e in args.envelope:
        prefixes.append(envelope_prefix(bytes.fromhex(e[2:] if e.startswith("\\x") else e)))
    if any(len(p) != 12 for p in prefixes):
        ap.error("a nonce prefix is 12 bytes (24 hex characters)")
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        km = KeyMaterial.from_catalog(conn, args.root_key_file, args.tenant)
    pats = km.patterns(prefixes)
    print(km.describe())
    print(f"{len(pats)} patterns, {len(prefixes)} nonce prefix(es); threads of {args.pid}: "
          + ", ".join(f"{tid}:{comm}" for tid, comm, _ in read_threads(args.pid)))
    total = 0
    if not args.no_proc:
        stats: dict = {}
        hits = scan_proc_mem(args.pid, pats, stats=stats)
        print(format_hits(hits, f"/proc/{args.pid}/mem", stats))
        total += len(hits)
    if args.gcore:
        stats = {}
        hits = scan_core(args.pid, pats, stats=stats)
        print(format_hits(hits, f"gcore {args.pid}", stats))
        total += len(hits)
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
