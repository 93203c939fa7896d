#!/usr/bin/env bash
# Wraps the official image's docker-entrypoint.sh: prepares the `local` provider's root key file
# (development only) and hands over. Settings:
#   PG_ENVELOPE_LOCAL_ROOT_KEY_FILE   path of the root key file (default /var/lib/pg_envelope/root.key)
#   PG_ENVELOPE_GENERATE_DEV_KEY=1    create a random key there if the file does not exist
# Without a key file the server still starts; tenants on the `local` provider then fail closed
# (SQLSTATE 55000) and KMS/HSM providers work as configured with envelope.add_key_provider.
set -euo pipefail

key="${PG_ENVELOPE_LOCAL_ROOT_KEY_FILE:-/var/lib/pg_envelope/root.key}"

if [ "$(id -u)" = 0 ] && [ "${1:-}" = postgres ]; then
  dir="$(dirname "$key")"
  mkdir -p "$dir"
  chown postgres:postgres "$dir"
  chmod 0700 "$dir"
  if [ ! -e "$key" ] && [ "${PG_ENVELOPE_GENERATE_DEV_KEY:-0}" = 1 ]; then
    echo "pg_envelope: generating a DEVELOPMENT root key at $key (the local provider is not for production)" >&2
    ( umask 077; head -c 32 /dev/urandom > "$key" )
  fi
  if [ -e "$key" ]; then
    # The local provider refuses a key file with group/other bits or another owner.
    chown postgres:postgres "$key"
    chmod 0600 "$key"
  fi
fi

if [ "${1:-}" = postgres ] && [ -e "$key" ]; then
  set -- "$@" -c "envelope.local_root_key_file=$key"
fi

exec docker-entrypoint.sh "$@"
