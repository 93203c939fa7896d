-- The audit trail's SQL surface (issue 13), with envelope.audit off in this cluster (the writer
-- and the chain are exercised by pg_test/integration/test_audit.py): who may call what, the
-- append-only tables, bad input, the per-statement cap.
SET client_min_messages = warning;
SELECT envelope.create_tenant('au_a') > 0 AS a;
SELECT envelope.grant_tenant('au_a', current_user);
CREATE TABLE au (id int, v envelope.encrypted_text);
SET app.tenant_id = 'au_a';
INSERT INTO au SELECT g, ('value ' || g)::text FROM generate_series(1, 20) g;

-- Nothing of the trail is open to PUBLIC: reading, verifying, exporting, pruning, canaries.
SET ROLE regress_other;
SELECT sqlstate_of($$SELECT * FROM envelope.audit_log$$) AS log_public,
       sqlstate_of($$SELECT * FROM envelope.audit_blocks$$) AS blocks_public,
       sqlstate_of($$SELECT * FROM envelope.audit_checkpoints$$) AS checkpoints_public,
       sqlstate_of($$SELECT * FROM envelope.audit_alerts$$) AS alerts_public,
       sqlstate_of($$SELECT * FROM envelope.audit_hourly$$) AS hourly_public,
       sqlstate_of($$SELECT * FROM envelope.audit_canaries$$) AS canaries_public,
       sqlstate_of($$SELECT * FROM envelope.audit_events$$) AS events_public,
       sqlstate_of($$SELECT * FROM envelope.audit_verify()$$) AS verify_public,
       sqlstate_of($$SELECT * FROM envelope.audit_export(1)$$) AS export_public,
       sqlstate_of($$SELECT envelope.audit_prune('1 day')$$) AS prune_public,
       sqlstate_of($$SELECT envelope.add_canary('\x00', 'x')$$) AS canary_public,
       sqlstate_of($$SELECT envelope.drop_canary('x')$$) AS drop_canary_public,
       sqlstate_of($$SET envelope.max_decrypts_per_statement = 0$$) AS cap_not_settable;
RESET ROLE;

-- Append-only: UPDATE, DELETE and TRUNCATE refused to everyone, the superuser included (a block
-- made up by hand, in a transaction rolled back; audit_verify reports it: it is not in the chain,
-- and the view shows its bytes as unreadable).
BEGIN;
INSERT INTO envelope.audit_blocks VALUES (1, 1, now(), now(), '\x00'::bytea, '\x0000'::bytea, 0, 0);
SELECT ok, first_break FROM envelope.audit_verify() AS made_up_block;
SELECT seq, kind, outcome FROM envelope.audit_log AS shown_unreadable;
SELECT sqlstate_of($$UPDATE envelope.audit_log SET detail = 'x'$$) AS update_log,
       sqlstate_of($$DELETE FROM envelope.audit_log$$) AS delete_log,
       sqlstate_of($$INSERT INTO envelope.audit_log (seq) VALUES (2)$$) AS insert_log,
       sqlstate_of($$UPDATE envelope.audit_blocks SET last_seq = 2$$) AS update_blocks,
       sqlstate_of($$DELETE FROM envelope.audit_blocks$$) AS delete_blocks;
ROLLBACK;
SELECT sqlstate_of($$UPDATE envelope.audit_blocks SET last_seq = 2$$) AS update_blocks,
       sqlstate_of($$DELETE FROM envelope.audit_blocks$$) AS delete_blocks,
       sqlstate_of($$TRUNCATE envelope.audit_blocks$$) AS truncate_blocks,
       sqlstate_of($$TRUNCATE envelope.audit_log$$) AS truncate_log_a_view,
       sqlstate_of($$TRUNCATE envelope.audit_checkpoints$$) AS truncate_checkpoints,
       sqlstate_of($$TRUNCATE envelope.audit_alerts$$) AS truncate_alerts;
-- session_replication_role = replica does not switch the append-only triggers off (ALWAYS).
BEGIN;
SET LOCAL session_replication_role = replica;
SELECT sqlstate_of($$TRUNCATE envelope.audit_blocks$$) AS truncate_as_replica,
       sqlstate_of($$TRUNCATE envelope.audit_checkpoints$$) AS truncate_checkpoints_as_replica;
ROLLBACK;
-- The decoder behind the view: executable by anyone (it reads nothing), bounded, never an error:
-- NULLs and bytes that are not records are one `unreadable` row; input larger than any block the
-- writer makes is not decoded.
SET ROLE regress_other;
SELECT seq, kind FROM envelope.audit_block_records(NULL, NULL) AS null_block;
SELECT seq, kind FROM envelope.audit_block_records('\x00', '\xffffffff00') AS huge_length;
SELECT count(*) AS rows, bool_and(kind = 'unreadable') AS unreadable
  FROM envelope.audit_block_records('\x00', convert_to(repeat('x', 300000), 'UTF8')) AS oversized;
-- Compact blocks (format 2): a record of empty fields whose tag is not its hash's (shown, with
-- the tag in its hash: audit_verify reports it altered), a varint longer than 64 bits, and a
-- forged block whose entries repeat a 60 kB string: decoding stops at 1 MB of records.
SELECT seq, kind, octet_length(hash) AS hash_bytes, substr(hash, 1, 8) = '\x0000000000000000'::bytea AS tag_kept
  FROM envelope.audit_block_records('\x00', '\x0200020000000000000000000000000000') AS compact_one;
SELECT seq, kind FROM envelope.audit_block_records('\x00', '\x02ffffffffffffffffff7f') AS compact_overflow;
SELECT count(*) AS rows, count(seq) AS records, bool_or(kind = 'unreadable') AS unreadable
  FROM envelope.audit_block_records('\x00', '\x02'::bytea || decode('4002000000000000e0d403', 'hex')
       || convert_to(repeat('x', 60000), 'UTF8') || decode(repeat('00', 8) || repeat('0002000000000000' || repeat('00', 8), 12000), 'hex')) AS compact_bomb;
RESET ROLE;
-- The one deletion path is audit_prune; an empty trail has nothing to prune.
SELECT envelope.audit_prune('0 seconds') AS pruned_nothing;
SELECT ok, records_checked, first_break FROM envelope.audit_verify() AS empty_chain_verifies;
SELECT count(*) = 1 AS export_has_its_trailer,
       bool_and(line::jsonb ->> 'type' = 'export') AS only_the_trailer
  FROM envelope.audit_export(1);
-- A NULL start is an error, not an empty export.
SELECT sqlstate_of($$SELECT * FROM envelope.audit_export(NULL)$$) AS export_from_null;

-- Canaries: a value that is not an envelope is refused; a real one is registered once.
SELECT sqlstate_of($$SELECT envelope.add_canary('\x0001', 'bad')$$) AS canary_not_an_envelope;
CREATE TABLE au_decoy AS SELECT envelope.encrypt_field('decoy value') AS c;
SELECT envelope.add_canary((SELECT c FROM au_decoy), 'decoy 7') AS added;
SELECT envelope.add_canary((SELECT c FROM au_decoy), 'decoy 7 again') AS added_again;
SELECT envelope.decrypt_field(c) AS canary_still_decrypts FROM au_decoy;
SELECT envelope.drop_canary('decoy 7') AS dropped, envelope.drop_canary('decoy 7') AS dropped_again;
DROP TABLE au_decoy;

-- The per-statement cap (0: off): the statement that passes it fails with 54000.
SET envelope.max_decrypts_per_statement = 10;
SELECT count(v::text) AS ten_allowed FROM au WHERE id <= 10;
SELECT sqlstate_of($$SELECT count(v::text) FROM au$$) AS eleven_refused;
SELECT count(v::text) AS next_statement_counts_again FROM au WHERE id <= 10;
RESET envelope.max_decrypts_per_statement;
SELECT count(v::text) AS uncapped FROM au;

-- Settings a session cannot change: auditing, fail-closed, the checkpoint provider, alerts.
SELECT sqlstate_of($$SET envelope.audit = off$$) AS audit_not_per_session,
       sqlstate_of($$SET envelope.audit_fail_closed = off$$) AS fail_closed_not_per_session,
       sqlstate_of($$SET envelope.audit_checkpoint_provider = 'x'$$) AS provider_not_per_session,
       sqlstate_of($$SET envelope.alert_hours = '8-19'$$) AS alert_hours_not_per_session;
RESET app.tenant_id;
DROP TABLE au;
RESET client_min_messages;
