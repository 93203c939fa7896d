"""Search text and bytes for secrets in every encoding a log line, a view or a file could carry.

Used by test_logging_leaks.py (security checklist items 19 and 22). A `Secret` is a label, a kind
("key", "credential", "canary", "control", ...) and its bytes. `needles(secret)` gives every form
searched for:

* the bytes themselves (for text secrets: the UTF-8 text; for keys: the 32 raw bytes);
* hex, lower and upper case (and PostgreSQL's bytea output `\\x<hex>`, which the lower form covers);
* base64, standard and URL-safe alphabets, with and without padding, and for keys also every
  substring-aligned form: a key embedded at offset 0, 1 or 2 (mod 3) of a longer base64 string
  encodes to different characters, so the stable middle part of each of the three alignments is
  searched too (at least 36 of the key's 32 bytes -> 40+ characters, too long to match by chance);
* for text secrets also the form PostgreSQL's CSV and JSON logs would give them (quotes doubled,
  JSON escapes): the canaries and tokens here are [A-Za-z0-9-_.], so those are the same bytes.

`scan(blobs, secrets)` returns every hit as (secret label, form, source name, offset). Sources
are (name, bytes) pairs: log files, query results joined into text, files under pgsql_tmp.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass


@dataclass(frozen=True)
class Secret:
    label: str
    kind: str
    data: bytes


def _b64_forms(data: bytes) -> set[bytes]:
    out = set()
    for enc in (base64.b64encode, base64.urlsafe_b64encode):
        e = enc(data)
        out.add(e)
        out.add(e.rstrip(b"="))
    return out


def _b64_aligned(data: bytes) -> set[bytes]:
    """The characters that encode `data` wherever it sits in a longer base64 string: for each
    of the three alignments (0, 1 or 2 bytes before it, mod 3), encode it behind that many zero
    bytes and keep the characters that depend on `data` only (drop the first partial group and
    the last, padding-affected group)."""
    out = set()
    for pad in range(3):
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            e = enc(bytes(pad) + data + bytes(3))
            # Characters 0..ceil(pad*8/6) touch the zero prefix; the last 4+ touch the suffix.
            start = (pad * 8 + 5) // 6
            end = ((pad + len(data)) * 8) // 6
            part = e[start:end]
            if len(part) >= 32:
                out.add(part)
    return out


def needles(secret: Secret) -> list[tuple[str, bytes]]:
    d = secret.data
    forms: dict[bytes, str] = {}

    def add(form, value):
        if value and value not in forms:
            forms[value] = form

    add("raw", d)
    add("hex", d.hex().encode())
    add("HEX", d.hex().upper().encode())
    for v in sorted(_b64_forms(d)):
        add("base64", v)
    if secret.kind == "key":
        for v in sorted(_b64_aligned(d)):
            add("base64-substring", v)
    return [(form, value) for value, form in forms.items()]


@dataclass
class Hit:
    secret: str
    kind: str
    form: str
    source: str
    offset: int
    excerpt: str

    def __str__(self):
        return f"{self.kind} {self.secret!r} as {self.form} in {self.source} at {self.offset}: …{self.excerpt}…"


def scan(sources, secrets, context: int = 60) -> list[Hit]:
    """Every occurrence of every needle of every secret in every (name, bytes) source. The
    excerpt masks the matched bytes (a report must not print the secret)."""
    hits = []
    table = [(s, form, n) for s in secrets for form, n in needles(s)]
    for name, blob in sources:
        if not blob:
            continue
        for s, form, n in table:
            start = 0
            while True:
                i = blob.find(n, start)
                if i < 0:
                    break
                before = blob[max(0, i - context):i]
                after = blob[i + len(n):i + len(n) + context]
                excerpt = (before + b"<" + form.encode() + b">" + after).decode("utf-8", "replace")
                hits.append(Hit(s.label, s.kind, form, name, i, excerpt.replace("\n", "\\n")))
                start = i + 1
    return hits


def needle_count(secrets) -> int:
    return sum(len(needles(s)) for s in secrets)


def _is_text(n: bytes) -> bool:
    return all(32 <= b < 127 for b in n)


def scan_grep(sources, secrets, workdir, context: int = 60) -> tuple[list[Hit], int]:
    """`scan` for many needles over many bytes: the printable needles go to one `grep -F`
    (Aho-Corasick) over every source written to `workdir`; the others (raw key bytes) are
    searched with bytes.find. Returns (hits, bytes scanned)."""
    import os
    import subprocess

    os.makedirs(workdir, exist_ok=True)
    text_needles: dict[bytes, tuple[Secret, str]] = {}
    raw = []
    for s in secrets:
        for form, n in needles(s):
            if _is_text(n) and len(n) >= 8:
                text_needles.setdefault(n, (s, form))
            else:
                raw.append((s, form, n))
    paths = {}
    total = 0
    for i, (name, blob) in enumerate(sources):
        path = os.path.join(workdir, f"src{i:04d}")
        with open(path, "wb") as f:
            f.write(blob)
        paths[path] = (name, blob)
        total += len(blob)
    hits = []
    pat = os.path.join(workdir, "patterns")
    with open(pat, "wb") as f:
        f.write(b"\n".join(text_needles) + b"\n")
    if text_needles and paths:
        out = subprocess.run(["grep", "-F", "-a", "-o", "-b", "-H", "-f", pat, "--", *paths],
                             capture_output=True, env={"LC_ALL": "C", "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        if out.returncode not in (0, 1):
            raise RuntimeError(f"grep failed: {out.stderr.decode(errors='replace')}")
        for line in out.stdout.splitlines():
            path, off, match = line.split(b":", 2)
            name, blob = paths[path.decode()]
            off = int(off)
            # the match is one needle, or (for overlapping needles) the longest at that place
            s, form = text_needles.get(match) or next(v for n, v in text_needles.items() if n in match)
            before = blob[max(0, off - context):off]
            after = blob[off + len(match):off + len(match) + context]
            excerpt = (before + b"<" + form.encode() + b">" + after).decode("utf-8", "replace")
            hits.append(Hit(s.label, s.kind, form, name, off, excerpt.replace("\n", "\\n")))
    if raw:
        for name, blob in paths.values():
            for s, form, n in raw:
                i = blob.find(n)
                while i >= 0:
                    hits.append(Hit(s.label, s.kind, form, name, i, "(binary)"))
                    i = blob.find(n, i + 1)
    return hits, total
