"""docker/pg_envelope-entrypoint.sh, run outside a container: the official image's
docker-entrypoint.sh is replaced by a stand-in that records its arguments. There is no Docker
engine on the build machine, so this is the part of the image that can be tested here."""

import os
import pwd
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "docker/pg_envelope-entrypoint.sh"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the wrapper chowns files to postgres, as root does in the image")


def run(tmp_path, *args, **env):
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "docker-entrypoint.sh").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    (fake / "docker-entrypoint.sh").chmod(0o755)
    out = tmp_path / "args"
    full_env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", ARGS_OUT=str(out), **env)
    p = subprocess.run(["bash", str(SCRIPT), *args], env=full_env, capture_output=True, text=True, check=True)
    return out.read_text().splitlines(), p.stderr


def test_dev_key_is_generated_private_and_passed_to_postgres(tmp_path):
    key = tmp_path / "keys" / "root.key"
    args, err = run(tmp_path, "postgres", "-c", "shared_preload_libraries=pg_envelope",
                    PG_ENVELOPE_LOCAL_ROOT_KEY_FILE=str(key), PG_ENVELOPE_GENERATE_DEV_KEY="1")
    assert "DEVELOPMENT root key" in err
    st = key.stat()
    assert st.st_size == 32
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == pwd.getpwnam("postgres").pw_uid
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert args == ["postgres", "-c", "shared_preload_libraries=pg_envelope", "-c", f"envelope.local_root_key_file={key}"]
    # A second start keeps the same key (regenerating it would orphan every value).
    before = key.read_bytes()
    run(tmp_path, "postgres", PG_ENVELOPE_LOCAL_ROOT_KEY_FILE=str(key), PG_ENVELOPE_GENERATE_DEV_KEY="1")
    assert key.read_bytes() == before


def test_no_key_without_opt_in_and_loose_permissions_are_tightened(tmp_path):
    key = tmp_path / "keys" / "root.key"
    args, _ = run(tmp_path, "postgres", PG_ENVELOPE_LOCAL_ROOT_KEY_FILE=str(key))
    assert not key.exists()
    assert args == ["postgres"]  # the local provider stays unconfigured: it fails closed (55000)
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    args, _ = run(tmp_path, "postgres", PG_ENVELOPE_LOCAL_ROOT_KEY_FILE=str(key))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert args[-1] == f"envelope.local_root_key_file={key}"


def test_other_commands_pass_through_untouched(tmp_path):
    args, _ = run(tmp_path, "psql", "--version", PG_ENVELOPE_GENERATE_DEV_KEY="1",
                  PG_ENVELOPE_LOCAL_ROOT_KEY_FILE=str(tmp_path / "k"))
    assert args == ["psql", "--version"]
    assert not (tmp_path / "k").exists()
