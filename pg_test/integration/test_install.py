"""Installing a new build never rewrites a file a running backend has mapped.

`cargo pgrx install` copies pg_envelope.so over the installed file in place; a backend that has
the old one mapped then executes rewritten pages and crashes (seen during a test run). The
project's scripts install by writing a new file and renaming it over the old one
(`pge_install_tree` in scripts/lib.sh, used by `scripts/cluster.sh install`), and give the
installed .so a new inode before tools that copy in place (`pge_rehome_installed_so`, before `cargo pgrx
test`). Both are checked here with a process that maps the old file, as a backend does.
"""

import subprocess
import sys

from conftest import ROOT, sh

MAPPER = (
    "import mmap, sys\n"
    "f = open(sys.argv[1], 'rb')\n"
    "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
    "print('ready', flush=True)\n"
    "sys.stdin.readline()\n"
    "print(m[:3].decode(), flush=True)\n"
)


def mapped_reader(path):
    p = subprocess.Popen([sys.executable, "-c", MAPPER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def read_mapping(p):
    p.stdin.write("\n")
    p.stdin.flush()
    out = p.stdout.readline().strip()
    p.wait(timeout=10)
    return out


def test_install_tree_renames_and_a_live_mapping_keeps_the_old_file(tmp_path):
    stage, root = tmp_path / "stage", tmp_path / "root"
    new = stage / "usr/lib/postgresql/15/lib/pg_envelope.so"
    new.parent.mkdir(parents=True)
    new.write_bytes(b"NEW" * 4096)
    dest = root / "usr/lib/postgresql/15/lib/pg_envelope.so"
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"OLD" * 4096)
    inode = dest.stat().st_ino
    backend = mapped_reader(dest)
    sh("bash", "-c", f'. "{ROOT}/scripts/lib.sh" && PGE_INSTALL_ROOT="{root}" pge_install_tree "{stage}"')
    assert dest.read_bytes() == b"NEW" * 4096
    assert dest.stat().st_ino != inode, "installed in place: a running backend would execute the new bytes"
    assert oct(dest.stat().st_mode & 0o777) == oct(0o755)
    assert read_mapping(backend) == "OLD", "the running process's mapping changed under it"
    assert not list(dest.parent.glob("*.pge-new"))


def test_rehome_before_an_in_place_copy_keeps_a_live_mapping_and_the_path(tmp_path):
    libdir = tmp_path / "lib"
    libdir.mkdir()
    so = libdir / "pg_envelope.so"
    so.write_bytes(b"OLD" * 4096)
    fake_pg_config = tmp_path / "pg_config"
    fake_pg_config.write_text(f"#!/bin/sh\necho {libdir}\n")
    fake_pg_config.chmod(0o755)
    backend = mapped_reader(so)
    inode = so.stat().st_ino
    sh("bash", "-c", f'. "{ROOT}/scripts/lib.sh" && pge_rehome_installed_so "{fake_pg_config}"')
    # The path never went away (PostgreSQL checks it on every function lookup) ...
    assert so.read_bytes() == b"OLD" * 4096 and so.stat().st_ino != inode
    # ... and what `cargo pgrx test/install` does next, an in-place copy (O_TRUNC, write), does
    # not reach the live mapping.
    with open(so, "wb") as f:
        f.write(b"NEW" * 4096)
    assert read_mapping(backend) == "OLD"


def test_cluster_install_uses_the_renaming_installer():
    script = (ROOT / "scripts/cluster.sh").read_text()
    body = script[script.index("install_ext() {"):script.index("}", script.index("install_ext() {"))]
    assert "pge_install_tree" in body and "cargo pgrx install" not in body
    assert "pge_rehome_installed_so" in (ROOT / "scripts/test.sh").read_text()
