#!/usr/bin/env bash
# Real key servers for the integration tests, on 127.0.0.1, started and stopped by PID.
#
#   scripts/kms.sh start-openbao   # OpenBao dev server with TLS on 127.0.0.1:8200, Transit key pg-root
#   scripts/kms.sh stop-openbao
#
# Writes, readable by the postgres user:
#   $PGE_STATE/openbao/token        a token limited to transit encrypt/decrypt and key metadata
#                                   read on pg-root* (0600)
#   $PGE_STATE/openbao/role-id, secret-id   AppRole credentials with the same policy (0600)
#   $PGE_STATE/openbao/ca.pem      the dev server's CA
#   $PGE_STATE/openbao/env          BAO_ADDR, BAO_CACERT, BAO_TOKEN_FILE, BAO_ROOT_TOKEN_FILE
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/lib.sh"

BAO_VENV="$PGE_BAO_VENV"
BAO_DIR="$PGE_STATE/openbao"
BAO_PORT="${PGE_BAO_PORT:-8200}"
BAO_ADDR="https://127.0.0.1:$BAO_PORT"

install_bao() { pge_ensure_bao; }

# The pg-envelope ACL policy, as the JSON body of PUT sys/policies/acl/pg-envelope, for the
# Transit key name (or glob) $1: wrap (encrypt), unwrap (decrypt), and read the key's metadata
# (latest_version, for root-key rotation; no key material). Nothing else: no rotate, config,
# export, backup or delete; no rewrap either (the provider rewraps with decrypt + encrypt,
# since Transit's rewrap cannot open ciphertexts bound with associated_data).
bao_policy_json() {
  python3 -c 'import json, sys
k = sys.argv[1]
rules = [(f"encrypt/{k}", "update"), (f"decrypt/{k}", "update"), (f"keys/{k}", "read"),
         # Audit checkpoints: HMAC and verify with the Transit key "pg-audit" (envelope.audit_checkpoint_provider).
         ("hmac/pg-audit/*", "update"), ("verify/pg-audit/*", "update")]
print(json.dumps({"policy": "\n".join(f"path \"transit/{p}\" {{ capabilities = [\"{c}\"] }}" for p, c in rules)}))' "$1"
}

api() { # method path [json]
  local root; root="$(cat "$BAO_DIR/root-token")"
  curl -sS --fail-with-body --cacert "$BAO_DIR/tls/vault-ca.pem" -H "X-Vault-Token: $root" \
    -X "$1" "$BAO_ADDR/v1/$2" ${3:+-d "$3"}
}

start_openbao() {
  install_bao
  as_root install -d -m 0755 "$BAO_DIR"
  stop_openbao
  rm -rf "$BAO_DIR/tls"; mkdir -p "$BAO_DIR/tls"
  local root; root="root-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  (umask 077; printf '%s' "$root" > "$BAO_DIR/root-token")
  # The server's own audit log (a file audit device; OpenBao declares them in configuration):
  # what the KMS witnessed, e.g. every checkpoint MAC of the audit trail.
  rm -f "$BAO_DIR/audit.log"
  cat > "$BAO_DIR/audit.hcl" <<HCL
audit "file" "pg-envelope" {
  options {
    file_path = "$BAO_DIR/audit.log"
  }
}
HCL
  nohup "$BAO_VENV/bin/bao" server -dev -dev-tls -dev-tls-cert-dir="$BAO_DIR/tls" -config="$BAO_DIR/audit.hcl" \
    -dev-root-token-id="$root" -dev-listen-address="127.0.0.1:$BAO_PORT" -dev-no-store-token \
    > "$BAO_DIR/server.log" 2>&1 &
  echo $! > "$BAO_DIR/pid"
  for _ in $(seq 1 100); do
    [ -s "$BAO_DIR/tls/vault-ca.pem" ] && curl -sf --cacert "$BAO_DIR/tls/vault-ca.pem" "$BAO_ADDR/v1/sys/health" >/dev/null 2>&1 && break
    sleep 0.1
  done
  api POST sys/mounts/transit '{"type":"transit"}' >/dev/null
  api POST transit/keys/pg-root '{"type":"aes256-gcm96"}' >/dev/null
  api POST transit/keys/pg-root-2 '{"type":"aes256-gcm96"}' >/dev/null
  api POST transit/keys/pg-audit '{"type":"hmac","key_size":32}' >/dev/null
  api PUT sys/policies/acl/pg-envelope "$(bao_policy_json 'pg-root*')" >/dev/null
  local token
  token="$(api POST auth/token/create '{"policies":["pg-envelope"],"ttl":"24h","no_default_policy":true}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["auth"]["client_token"])')"
  (umask 077; printf '%s\n' "$token" > "$BAO_DIR/token")
  # AppRole: a role with the same policy; its role id and a secret id in files.
  api POST sys/auth/approle '{"type":"approle"}' >/dev/null
  api POST auth/approle/role/pg-envelope '{"token_policies":["pg-envelope"],"token_ttl":"5m","token_max_ttl":"10m"}' >/dev/null
  (umask 077
   api GET auth/approle/role/pg-envelope/role-id | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"]["role_id"])' > "$BAO_DIR/role-id"
   api POST auth/approle/role/pg-envelope/secret-id '{}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"]["secret_id"])' > "$BAO_DIR/secret-id")
  as_root chown postgres:postgres "$BAO_DIR/token" "$BAO_DIR/role-id" "$BAO_DIR/secret-id"
  # bao -dev-tls deletes its certificate directory when it exits: keep a copy of the CA.
  cp "$BAO_DIR/tls/vault-ca.pem" "$BAO_DIR/ca.pem"
  as_root chmod 0644 "$BAO_DIR/ca.pem"
  cat > "$BAO_DIR/env" <<ENV
export BAO_ADDR=$BAO_ADDR
export BAO_CACERT=$BAO_DIR/ca.pem
export BAO_TOKEN_FILE=$BAO_DIR/token
export BAO_ROOT_TOKEN_FILE=$BAO_DIR/root-token
ENV
  echo "OpenBao running at $BAO_ADDR (pid $(cat "$BAO_DIR/pid")); env: $BAO_DIR/env"
}

# Stops the process whose pid is in $1 (waits up to 10 s) and removes the pid file.
stop_pidfile() {
  if [ -f "$1" ]; then
    kill "$(cat "$1")" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$(cat "$1")" 2>/dev/null || break; sleep 0.1; done
    rm -f "$1"
  fi
}

stop_openbao() { stop_pidfile "$BAO_DIR/pid"; }

# A persistent OpenBao (raft storage, plain http on loopback) for restart tests: keys survive a
# stop/start; after a start the server is unsealed with the stored unseal key.
BAOP_DIR="$PGE_STATE/openbao-persistent"
BAOP_ADDR="http://127.0.0.1:8210"
baop_api() { # method path [json] -- with the root token once it exists
  local root=""
  [ -f "$BAOP_DIR/root-token" ] && root="$(cat "$BAOP_DIR/root-token")"
  curl -sS --fail-with-body ${root:+-H "X-Vault-Token: $root"} -X "$1" "$BAOP_ADDR/v1/$2" ${3:+-d "$3"}
}
wait_baop() { # until the given health status code answers
  for _ in $(seq 1 200); do
    code="$(curl -s -o /dev/null -w '%{http_code}' "$BAOP_ADDR/v1/sys/health" || true)"
    [ "$code" = "$1" ] && return 0
    sleep 0.1
  done
  echo "OpenBao (persistent) did not reach health $1 (last $code)" >&2; return 1
}
start_openbao_persistent() {
  install_bao
  as_root install -d -m 0755 "$BAOP_DIR"
  mkdir -p "$BAOP_DIR/data"
  cat > "$BAOP_DIR/config.hcl" <<HCL
storage "raft" {
  path    = "$BAOP_DIR/data"
  node_id = "pg-envelope-test"
}
listener "tcp" {
  address     = "127.0.0.1:8210"
  tls_disable = true
}
api_addr      = "$BAOP_ADDR"
cluster_addr  = "http://127.0.0.1:8211"
disable_mlock = true
HCL
  stop_openbao_persistent
  nohup "$BAO_VENV/bin/bao" server -config="$BAOP_DIR/config.hcl" > "$BAOP_DIR/server.log" 2>&1 &
  echo $! > "$BAOP_DIR/pid"
  if [ ! -f "$BAOP_DIR/unseal-key" ]; then
    wait_baop 501   # not initialised
    local init
    init="$(curl -sS --fail-with-body -X PUT "$BAOP_ADDR/v1/sys/init" -d '{"secret_shares":1,"secret_threshold":1}')"
    (umask 077
     printf '%s' "$init" | python3 -c 'import json,sys; print(json.load(sys.stdin)["keys"][0])' > "$BAOP_DIR/unseal-key"
     printf '%s' "$init" | python3 -c 'import json,sys; print(json.load(sys.stdin)["root_token"], end="")' > "$BAOP_DIR/root-token")
    wait_baop 503
    curl -sS --fail-with-body -X PUT "$BAOP_ADDR/v1/sys/unseal" -d "{\"key\":\"$(cat "$BAOP_DIR/unseal-key")\"}" >/dev/null
    wait_baop 200
    baop_api POST sys/mounts/transit '{"type":"transit"}' >/dev/null
    baop_api POST transit/keys/pg-root '{"type":"aes256-gcm96"}' >/dev/null
    baop_api POST transit/keys/pg-audit '{"type":"hmac","key_size":32}' >/dev/null
    baop_api PUT sys/policies/acl/pg-envelope "$(bao_policy_json 'pg-root')" >/dev/null
    (umask 077; baop_api POST auth/token/create '{"policies":["pg-envelope"],"ttl":"768h","no_default_policy":true}' |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["auth"]["client_token"])' > "$BAOP_DIR/token")
    as_root chown postgres:postgres "$BAOP_DIR/token"
  else
    wait_baop 503
    curl -sS --fail-with-body -X PUT "$BAOP_ADDR/v1/sys/unseal" -d "{\"key\":\"$(cat "$BAOP_DIR/unseal-key")\"}" >/dev/null
    wait_baop 200
    # Written again on every start (a PUT replaces it): a server initialised by an older
    # version of this script gets the current policy and keys; its token, which names it, follows.
    baop_api GET transit/keys/pg-audit >/dev/null 2>&1 ||
      baop_api POST transit/keys/pg-audit '{"type":"hmac","key_size":32}' >/dev/null
    baop_api PUT sys/policies/acl/pg-envelope "$(bao_policy_json 'pg-root')" >/dev/null
  fi
  echo "OpenBao (persistent, raft) at $BAOP_ADDR"
}
stop_openbao_persistent() { stop_pidfile "$BAOP_DIR/pid"; }

# SoftHSM2: a PKCS#11 token in a private folder, owned by postgres (backends open it), with a
# non-extractable AES-256 key "pg-kek" (and "pg-kek-2") and the user PIN in a 0600 file.
HSM_DIR="$PGE_STATE/softhsm"
HSM_MODULE=/usr/lib/softhsm/libsofthsm2.so
start_softhsm() {
  export SOFTHSM2_CONF="$HSM_DIR/softhsm2.conf"
  if [ ! -f "$HSM_DIR/pin" ] || ! softhsm2-util --show-slots 2>/dev/null | grep -q "pg-envelope"; then
    as_root rm -rf "$HSM_DIR"
    as_root install -d -o root -g root -m 0755 "$HSM_DIR"
    mkdir -p "$HSM_DIR/tokens"
    cat > "$SOFTHSM2_CONF" <<CONF
directories.tokendir = $HSM_DIR/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
library.reset_on_fork = true
CONF
    local pin so
    pin="$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    so="$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    softhsm2-util --init-token --free --label pg-envelope --so-pin "$so" --pin "$pin" >/dev/null
    for label in pg-kek pg-kek-2; do
      pkcs11-tool --module "$HSM_MODULE" --token-label pg-envelope --login --pin "$pin" --keygen \
        --key-type AES:32 --label "$label" --sensitive --private \
        --usage-decrypt --usage-wrap >/dev/null 2>&1
    done
    (umask 077; printf '%s\n' "$pin" > "$HSM_DIR/pin")
    as_root chown -R postgres:postgres "$HSM_DIR/tokens" "$HSM_DIR/pin"
    chmod 0644 "$SOFTHSM2_CONF"
  fi
  # The HMAC key for audit checkpoints (CKM_SHA256_HMAC), also on tokens made by older versions
  # of this script.
  local p; p="$(cat "$HSM_DIR/pin")"
  if ! pkcs11-tool --module "$HSM_MODULE" --token-label pg-envelope --login --pin "$p" --list-objects --type secrkey 2>/dev/null |
      grep -q "label: *pg-audit$"; then
    pkcs11-tool --module "$HSM_MODULE" --token-label pg-envelope --login --pin "$p" --keygen \
      --key-type GENERIC:32 --label pg-audit --sensitive --private --usage-sign >/dev/null 2>&1
    as_root chown -R postgres:postgres "$HSM_DIR/tokens"
  fi
  cat > "$HSM_DIR/env" <<ENV
export SOFTHSM2_CONF=$HSM_DIR/softhsm2.conf
export PGE_PKCS11_MODULE=$HSM_MODULE
export PGE_PKCS11_PIN_FILE=$HSM_DIR/pin
ENV
  echo "SoftHSM2 token pg-envelope ready (conf $SOFTHSM2_CONF)"
}

# moto (AWS KMS emulator) with SigV4 signatures checked: the first few actions (creating an IAM
# user with a kms:* policy and one allowed only kms:Encrypt, their access keys, and the first
# KMS key) run unauthenticated; every
# request after that must be signed with the user's key, and a wrong secret gets 403.
MOTO_VENV="$PGE_MOTO_VENV"
MOTO_DIR="$PGE_STATE/moto"
MOTO_PORT="${PGE_MOTO_PORT:-5055}"
start_moto() {
  pge_ensure_moto
  as_root install -d -m 0755 "$MOTO_DIR"
  stop_moto
  INITIAL_NO_AUTH_ACTION_COUNT=7 nohup "$MOTO_VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" > "$MOTO_DIR/server.log" 2>&1 &
  echo $! > "$MOTO_DIR/pid"
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$MOTO_PORT/moto-api/" >/dev/null 2>&1 && break; sleep 0.1; done
  "$MOTO_VENV/bin/python" - "$MOTO_PORT" "$MOTO_DIR" <<'PY'
import json, os, sys, boto3
port, d = sys.argv[1], sys.argv[2]
url = f"http://127.0.0.1:{port}"
anon = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
iam = boto3.client("iam", **anon)
iam.create_user(UserName="pg-envelope")                                                     # 1
iam.put_user_policy(UserName="pg-envelope", PolicyName="kms", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}))  # 2
key = iam.create_access_key(UserName="pg-envelope")["AccessKey"]                            # 3
# A user allowed to Encrypt but not Decrypt: a real policy denial, not a bad ciphertext.
iam.create_user(UserName="pg-envelope-encrypt-only")                                        # 4
iam.put_user_policy(UserName="pg-envelope-encrypt-only", PolicyName="kms", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:Encrypt", "Resource": "*"}]}))  # 5
enc_key = iam.create_access_key(UserName="pg-envelope-encrypt-only")["AccessKey"]           # 6
kms_anon = boto3.client("kms", **anon)
k1 = kms_anon.create_key(Description="pg-root")["KeyMetadata"]["KeyId"]                     # 7
signed = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
k2 = boto3.client("kms", **signed).create_key(Description="pg-root-2")["KeyMetadata"]["KeyId"]   # signed from here on
# The HMAC key for audit checkpoints (GenerateMac / VerifyMac).
k3 = boto3.client("kms", **signed).create_key(Description="pg-audit", KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]["KeyId"]
old = os.umask(0o077)
with open(f"{d}/credentials", "w") as f:
    f.write(f"[default]\naws_access_key_id = {key['AccessKeyId']}\naws_secret_access_key = {key['SecretAccessKey']}\n")
with open(f"{d}/encrypt-only-credentials", "w") as f:
    f.write(f"[default]\naws_access_key_id = {enc_key['AccessKeyId']}\naws_secret_access_key = {enc_key['SecretAccessKey']}\n")
with open(f"{d}/bad-credentials", "w") as f:
    f.write(f"[default]\naws_access_key_id = {key['AccessKeyId']}\naws_secret_access_key = wrong-{key['SecretAccessKey'][:8]}\n")
os.umask(old)
with open(f"{d}/env", "w") as f:
    f.write(f"export MOTO_ENDPOINT={url}\nexport MOTO_KEY_ID={k1}\nexport MOTO_KEY_ID_2={k2}\nexport MOTO_MAC_KEY_ID={k3}\nexport MOTO_CREDENTIALS={d}/credentials\n")
PY
  as_root chown postgres:postgres "$MOTO_DIR/credentials" "$MOTO_DIR/bad-credentials" "$MOTO_DIR/encrypt-only-credentials"
  echo "moto (KMS, signatures checked) at http://127.0.0.1:$MOTO_PORT; env: $MOTO_DIR/env"
}

stop_moto() { stop_pidfile "$MOTO_DIR/pid"; }

case "${1:-}" in
  start-moto) start_moto ;;
  stop-moto) stop_moto ;;
  start-openbao) start_openbao ;;
  start-openbao-persistent) start_openbao_persistent ;;
  stop-openbao-persistent) stop_openbao_persistent ;;
  stop-openbao) stop_openbao ;;
  start-softhsm) start_softhsm ;;
  *) echo "usage: $0 start-openbao|stop-openbao|start-openbao-persistent|stop-openbao-persistent|start-softhsm|start-moto|stop-moto" >&2; exit 2 ;;
esac
