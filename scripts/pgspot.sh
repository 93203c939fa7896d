#!/usr/bin/env bash
# pgspot (https://pypi.org/project/pgspot/) over pg_envelope's extension SQL (issue 16, item 5).
#
#   scripts/pgspot.sh                 # the installed scripts: pg_envelope--<default>.sql and every
#                                     # pg_envelope--*--<default>.sql upgrade script
#   scripts/pgspot.sh FILE...         # other files, e.g. the staged build and the repo's upgrade
#                                     # script before installing:
#     scripts/pgspot.sh target/release/pg_envelope-pg15/usr/share/postgresql/15/extension/pg_envelope--0.2.0.sql \
#                       sql/pg_envelope--0.1.0--0.2.0.sql
#   PGE_PGSPOT_RAW=1 scripts/pgspot.sh   # pgspot on the bare files, no context, no allowlist
#
# Exits 0 only when neither pgspot nor the body check below reports anything that is not
# justified here (and in docs/security-checklist.md, item 29). Installs pgspot (pinned) into
# $PGE_STATE/pgspot-venv on first use.
#
# Two things are added to what pgspot does by itself:
#
# 1. The extension-script context. PostgreSQL runs an extension script with
#    search_path = '<the extension's schema>, pg_temp' (pg_catalog implicitly first; pg_temp is
#    never searched for functions or operators; checked on PostgreSQL 15 with an event trigger
#    logging current_setting('search_path') during CREATE EXTENSION). pgspot does not know
#    that and flags every unqualified name in the script's top-level statements (CREATE TABLE,
#    CHECK and DEFAULT expressions, partial-index predicates, views, ALTER TABLE, REVOKE, the
#    upgrade's DELETE): PS001/PS016/PS017, about 180 findings, 6 of them "errors" (casts to
#    jsonb, text, float8, regrole, oid). Those names are resolved once, while the script runs,
#    among pg_catalog and the extension's own schema (created by CREATE EXTENSION; only its
#    owner and superusers can create objects in it: PUBLIC has USAGE only), and stored as OIDs.
#    So each file is given to pgspot after a one-line preamble that states that context
#    (CREATE SCHEMA for the extension schema, then SET search_path = pg_catalog, <it>, pg_temp),
#    which is pgspot's own notion of a secure search_path. Function and procedure *bodies*
#    are still analysed as if called with an unsafe search_path: the preamble does not cover
#    them. Precondition: the schema `envelope` must not exist before CREATE EXTENSION (if a
#    role that is not trusted created it, it owns the schema the extension lands in); see
#    docs/security-checklist.md item 29.
#
# 2. A body check (pglast, from the same venv): pgspot's PL/pgSQL walk misses expressions in
#    ELSIF branches, nested blocks and exception handlers (found with a test procedure), and it
#    ignores DECLAREd variable types. For every SQL or PL/pgSQL function or procedure without a
#    pinned search_path (SET search_path = pg_catalog[, the extension schema], pg_temp), every
#    embedded expression and query is parsed and each unqualified operator (incl. IN, BETWEEN,
#    LIKE, NULLIF, IS DISTINCT FROM, ANY/ALL, simple CASE), function call, type name (casts and
#    declarations) and relation is reported. Dynamic SQL text (EXECUTE format(...)) is not
#    analysed: blind_index_backfill is the only such body without a pinned search_path, and its
#    strings qualify every name and operator (reviewed by hand).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
. "$here/lib.sh"

PGSPOT_VERSION=0.9.4
PGSPOT_VENV="$PGE_STATE/pgspot-venv"
pge_venv "$PGSPOT_VENV" bin/pgspot "pgspot==$PGSPOT_VERSION"
if [ "$("$PGSPOT_VENV/bin/pgspot" --version | awk '{print $2}')" != "$PGSPOT_VERSION" ]; then
  "$PGSPOT_VENV/bin/pip" install -q "pgspot==$PGSPOT_VERSION"
fi

if [ $# -gt 0 ]; then
  files=("$@")
else
  extdir="$("$PGE_PG15_CONFIG" --sharedir)/extension"
  version="$(sed -n "s/^default_version *= *'\(.*\)'/\1/p" "$extdir/pg_envelope.control")"
  files=("$extdir/pg_envelope--$version.sql")
  for f in "$extdir"/pg_envelope--*--"$version".sql; do [ -e "$f" ] && files+=("$f"); done
fi

if [ "${PGE_PGSPOT_RAW:-0}" = 1 ]; then
  exec "$PGSPOT_VENV/bin/pgspot" "${files[@]}"
fi

# Functions and procedures allowed to run without a pinned search_path (PS005), in pgspot's
# spelling. Their bodies are still checked by pgspot and by the body check: every name, type
# and operator in them must be schema-qualified.
allow=(
  # Procedures that COMMIT between batches. PostgreSQL refuses transaction control in a
  # procedure that has a SET clause ("invalid transaction termination"), so they cannot pin
  # search_path; every name, type and operator in them is qualified instead. Not SECURITY
  # DEFINER (they run with the caller's rights); EXECUTE is revoked from PUBLIC except for
  # blind_index_backfill, which only touches the caller's own table with the caller's rights.
  "rewrap_tenants(provider text,batch_size integer)"
  "reencrypt(tbl regclass,col name,context text,context_column name,batch_rows integer,pause interval,time_limit interval)"
  "run_maintenance()"
  "blind_index_backfill(tbl regclass,source name,term name,purpose text,tenant_column name,batch_size integer)"
  # One-line SQL wrappers around the extension's C functions, schema-qualified. A SET clause
  # would stop the planner from inlining them (and add a GUC save/restore to every call: they
  # run per row in triggers, backfills and index lookups), and there is nothing left in them
  # for a search_path to resolve.
  "blind_index(purpose text,value integer)"
  "blind_index_all(purpose text,value integer)"
  "blind_index(purpose text,value encrypted_text)"
  "blind_index(purpose text,value encrypted_bytea)"
  "blind_index(purpose text,value encrypted_jsonb)"
  "blind_index(purpose text,value encrypted_int8)"
  "blind_index(purpose text,value encrypted_numeric)"
  "blind_index(purpose text,value encrypted_date)"
  "blind_index(purpose text,value encrypted_timestamptz)"
  # Key-administrator wrappers (EXECUTE revoked from PUBLIC), one qualified call each.
  "column_key_versions(tbl regclass,col name,tenant text,tenant_key_id integer,version integer,state text,values bigint)"
  "queue_reencrypt(tbl regclass,col name,context text,context_column name,batch_rows integer)"
)
args=()
for a in "${allow[@]}"; do args+=(--proc-without-search-path "$a"); done

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# The preamble is one line: reported line numbers are shifted back by one below.
preamble='CREATE SCHEMA extschema; CREATE SCHEMA envelope; SET search_path = pg_catalog, extschema, pg_temp; -- added by scripts/pgspot.sh: the extension-script context'

status=0
for f in "${files[@]}"; do
  echo "==> pgspot $PGSPOT_VERSION: $f"
  { echo "$preamble"; cat "$f"; } > "$tmp/in.sql"
  if ! "$PGSPOT_VENV/bin/pgspot" "${args[@]}" "$tmp/in.sql" > "$tmp/out.txt" 2>&1; then
    status=1
  fi
  perl -pe 's/ at line (\d+)$/" at line " . ($1 > 1 ? $1 - 1 : 1)/e' "$tmp/out.txt"
  echo "==> body check: $f"
  if ! "$PGSPOT_VENV/bin/python" - "$f" <<'PY'; then status=1; fi
import re
import sys

from pglast import parse_plpgsql, parse_sql
from pglast.parser import ParseError
from pglast.stream import RawStream
from pglast.visitors import Visitor

EXT_SCHEMAS = {"extschema", "envelope"}
path = sys.argv[1]
sql = open(path, encoding="utf-8").read().replace("@extschema@", "extschema")
sql = re.sub(r"^\\", "-- \\\\", sql, flags=re.M)
findings = []


def text(nodes):
    return ".".join(getattr(n, "sval", "?") for n in nodes)


class Unqualified(Visitor):
    def __init__(self, where, ctes):
        super().__init__()
        self.where, self.ctes = where, ctes

    def report(self, what):
        findings.append(f"{self.where}: unqualified {what}")

    def visit_A_Expr(self, ancestors, node):
        if len(node.name) != 2:
            self.report(f"operator {text(node.name)!r} in {RawStream()(node)[:80]}")

    def visit_SubLink(self, ancestors, node):
        if node.operName and len(node.operName) != 2:
            self.report(f"operator {text(node.operName)!r} (ANY/ALL)")

    def visit_CaseExpr(self, ancestors, node):
        if node.arg is not None:
            self.report("simple CASE (an implicit '=')")

    def visit_FuncCall(self, ancestors, node):
        if len(node.funcname) != 2:
            self.report(f"function {text(node.funcname)}()")

    def visit_TypeName(self, ancestors, node):
        if node.names and len(node.names) != 2:
            self.report(f"type {text(node.names)}")

    def visit_RangeVar(self, ancestors, node):
        if not node.schemaname and node.relname not in self.ctes:
            self.report(f"relation {node.relname}")


def check_sql(query, where):
    try:
        stmts = parse_sql(query)
    except ParseError as exc:
        findings.append(f"{where}: could not parse {query[:60]!r}: {exc}")
        return
    ctes = set(re.findall(r"(\w+)\s+AS\s+(?:NOT\s+)?(?:MATERIALIZED\s+)?\(", query, flags=re.I))
    for s in stmts:
        Unqualified(where, ctes)(s)


def walk_plpgsql(tree, where):
    if isinstance(tree, list):
        for item in tree:
            walk_plpgsql(item, where)
    elif isinstance(tree, dict):
        for key, value in tree.items():
            if key == "PLpgSQL_expr":
                q, mode = value["query"], value.get("parseMode", 0)
                if mode == 0:
                    check_sql(q, where)
                elif mode == 2:
                    check_sql("SELECT " + q, where)
                else:  # assignment: target := expression
                    rhs = q.split(":=", 1)[1] if ":=" in q else q.split("=", 1)[1]
                    check_sql("SELECT " + rhs, where)
            elif key == "PLpgSQL_var" and "lineno" not in value:
                continue  # a parameter (typed by the signature, resolved at CREATE) or FOUND
            elif key == "PLpgSQL_type":
                t = value["typname"]
                if t.lower() not in ("record",):
                    check_sql(f"SELECT NULL::{t}", where + f" (declared type {t})")
            else:
                walk_plpgsql(value, where)


def pinned(node):
    for o in node.options or ():
        if o.defname == "set" and o.arg.name == "search_path":
            path = [RawStream()(a).strip("'\"") for a in o.arg.args]
            return path[0] == "pg_catalog" and path[-1] == "pg_temp" and set(path[1:-1]) <= EXT_SCHEMAS
    return False


checked = 0
for raw in parse_sql(sql):
    node = raw.stmt
    if type(node).__name__ != "CreateFunctionStmt":
        continue
    opts = {o.defname: o.arg for o in node.options or ()}
    lang = getattr(opts.get("language"), "sval", None)
    if lang not in ("sql", "plpgsql") or pinned(node) or node.sql_body is not None:
        continue
    args = ", ".join(RawStream()(p.argType) for p in node.parameters or () if p.mode.name != "FUNC_PARAM_TABLE")
    line = 1 + sql.count("\n", 0, raw.stmt_location + 1)
    where = f"{text(node.funcname)}({args}) [statement at line {line}]"
    checked += 1
    if lang == "sql":
        check_sql(opts["as"][0].sval, where)
    else:
        walk_plpgsql(parse_plpgsql(RawStream()(node)), where)

for f in findings:
    print(f)
print(f"   {checked} function bodies without a pinned search_path checked, {len(findings)} findings")
sys.exit(1 if findings else 0)
PY
done
if [ "$status" = 0 ]; then
  echo "pgspot: no finding outside the justified ones"
else
  echo "pgspot: unjustified findings (see above)" >&2
fi
exit "$status"
