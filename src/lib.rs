//! pg_envelope: envelope encryption inside PostgreSQL.
//!
//! This crate is the thin SQL layer: settings (`gucs`), the error mapping to SQLSTATEs
//! (`error`), backend state and the key cache glue (`backend`), catalog access (`catalog`) and
//! the SQL functions (`api`, `status`). The cryptography, key types, cache and providers live in
//! the pure-Rust `pg_envelope_core` crate.

use pgrx::prelude::*;

/// Server-log and client messages below ERROR (`LOG`, `WARNING`, `NOTICE`) with interrupts held
/// while PostgreSQL formats them. `errfinish` ends a non-error report with
/// `CHECK_FOR_INTERRUPTS()`, and pgrx calls it without its guard: a cancel, a
/// statement_timeout or a terminate pending at that moment raised its ERROR or FATAL by
/// `longjmp` straight over the Rust frames of the caller, skipping their `Drop`s (a `RefCell`
/// left borrowed for the rest of the session: the audit aggregate, found by insider review 27;
/// a plaintext buffer left unwiped). Held, the interrupt is serviced at the next check, in a
/// guarded call or between statements.
macro_rules! held_report {
    ($report:expr) => {{
        // SAFETY: HOLD_INTERRUPTS()/RESUME_INTERRUPTS() (miscadmin.h): a backend-global counter,
        // main thread only; an ERROR raised inside the report resets it (error recovery).
        unsafe { pgrx::pg_sys::InterruptHoldoffCount += 1 };
        $report;
        unsafe { pgrx::pg_sys::InterruptHoldoffCount -= 1 };
    }};
}
macro_rules! log {
    ($($arg:tt)*) => { held_report!(pgrx::log!($($arg)*)) };
}
macro_rules! warning {
    ($($arg:tt)*) => { held_report!(pgrx::warning!($($arg)*)) };
}
macro_rules! notice {
    ($($arg:tt)*) => { held_report!(pgrx::notice!($($arg)*)) };
}
#[allow(unused_imports)]
pub(crate) use {log, notice, warning};

mod api;
mod audit;
mod backend;
#[cfg(feature = "bench-floor")]
mod bench;
mod catalog;
mod error;
mod guards;
mod gucs;
mod lifecycle;
mod maintenance;
mod main_thread;
mod nothrow;
mod reencrypt;
mod revocation;
mod search;
mod shred;
mod stampede;
mod status;
mod tenancy;
mod types;
mod worker;

::pgrx::pg_module_magic!(name, version);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        use backend::EPOCH;
        pgrx::pg_shmem_init!(EPOCH);
        backend::PRELOADED.store(true, std::sync::atomic::Ordering::Relaxed);
        // The lockdown flag (src/revocation.rs), restored from the data directory at start.
        revocation::register();
        // The audit queue (src/audit/), drained by the worker; the hooks that record reads of the
        // audit trail and refused key-management calls.
        audit::register();
        audit::hooks::register();
        // The bound on concurrent key-provider calls (src/stampede.rs).
        stampede::register();
        // The maintenance worker (src/worker.rs): scheduled rotation, rewraps, queued jobs.
        worker::register();
    }
    // Cached keys are wiped when a backend exits: registered by the backend itself when it makes
    // its key state (backend::ensure_exit_wipe), not here, where the postmaster's registration
    // would be forgotten by every backend it forks. The nonce generator is NOT touched here
    // either: in the postmaster this runs before fork, and each backend must seed its own.
    // Role membership changes reset the grant-check memo (see backend::on_roles_changed).
    for cache in [pg_sys::SysCacheIdentifier::AUTHMEMROLEMEM, pg_sys::SysCacheIdentifier::AUTHOID] {
        unsafe {
            pg_sys::CacheRegisterSyscacheCallback(cache as std::ffi::c_int, Some(backend::on_roles_changed), pg_sys::Datum::from(0))
        };
    }
    // Privilege changes recompute the audit's refusal filter (see audit::hooks::emit_log).
    for cache in [pg_sys::SysCacheIdentifier::PROCOID, pg_sys::SysCacheIdentifier::AUTHMEMROLEMEM, pg_sys::SysCacheIdentifier::AUTHOID] {
        unsafe {
            pg_sys::CacheRegisterSyscacheCallback(cache as std::ffi::c_int, Some(audit::hooks::on_privileges_changed), pg_sys::Datum::from(0))
        };
    }
    // CREATE INDEX CONCURRENTLY over encrypted columns is refused before it starts (src/guards.rs).
    guards::install();
    backend::install_statement_hooks();
    // The end of a transaction that used keys wipes the stack (see backend::on_xact_end).
    unsafe { pg_sys::RegisterXactCallback(Some(backend::on_xact_end), std::ptr::null_mut()) };
    // PREPARE TRANSACTION is refused while the transaction holds locks on pg_envelope's tables.
    unsafe { pg_sys::RegisterXactCallback(Some(backend::refuse_prepare_holding_envelope_locks), std::ptr::null_mut()) };
    // An aborted key or grant change (also ROLLBACK TO SAVEPOINT) forgets what this backend cached.
    unsafe { pg_sys::RegisterSubXactCallback(Some(backend::on_subxact_end), std::ptr::null_mut()) };
    // So do privilege changes of envelope.grant_anchor (see catalog::LIVE_GRANTEES).
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(backend::on_relcache_changed), pg_sys::Datum::from(0)) };
}

extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);

extension_sql_file!("../sql/encrypted_types.sql", name = "encrypted_types", requires = ["bootstrap"]);

extension_sql_file!("../sql/tenancy.sql", name = "tenancy", requires = ["encrypted_types", tenancy::belongs_to]);
extension_sql_file!("../sql/plaintext_guards.sql", name = "plaintext_guards", requires = ["encrypted_types"]);
extension_sql_file!(
    "../sql/lifecycle.sql",
    name = "lifecycle",
    requires = [
        "encrypted_types",
        lifecycle::key_version,
        lifecycle::key_tenant_id,
        lifecycle::key_header,
        lifecycle::rewrap_tenants_start,
        lifecycle::rewrap_tenants_batch
    ]
);
extension_sql_file!(
    "../sql/revocation.sql",
    name = "revocation",
    requires = ["maintenance", revocation::suspend_tenant, revocation::resume_tenant, revocation::lockdown, revocation::lift_lockdown]
);
extension_sql_file!(
    "../sql/shred.sql",
    name = "shred",
    requires = [
        "revocation",
        shred::schedule_shred,
        shred::cancel_shred,
        shred::confirm_shred,
        shred::shred_if_due,
        shred::shred_destroy_root_key,
        shred::shred_compact_key_tables
    ]
);
extension_sql_file!(
    "../sql/audit.sql",
    name = "audit",
    requires = [
        "shred",
        audit::trail::audit_block_records,
        audit::trail::audit_verify,
        audit::trail::audit_prune,
        audit::trail::audit_prune_in_progress,
        audit::alerts::add_canary,
        audit::alerts::drop_canary
    ]
);
extension_sql_file!(
    "../sql/search.sql",
    name = "search",
    requires = [
        "audit",
        search::declare_blind_index,
        search::rotate_index_key,
        search::destroy_index_key,
        search::active_index_version,
        search::current_tenant_key_id,
        search::blind_index_cardinality_warning
    ]
);
extension_sql_file!(
    "../sql/maintenance.sql",
    name = "maintenance",
    requires = ["reencrypt", maintenance::default_rotation_period, maintenance::maintenance_due, maintenance::rotate_data_key_if_due, status::maintenance_status]
);
extension_sql_file!(
    "../sql/reencrypt.sql",
    name = "reencrypt",
    requires = [
        "lifecycle",
        reencrypt::reencrypt_value,
        reencrypt::needs_reencryption,
        reencrypt::reencrypt_open,
        reencrypt::reencrypt_batch,
        reencrypt::column_key_versions_of
    ]
);

extension_sql!(
    r#"
GRANT USAGE ON SCHEMA envelope TO PUBLIC;
-- Key management: not for PUBLIC. Grant EXECUTE to a key-administrator role as needed.
REVOKE ALL ON FUNCTION create_tenant(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION grant_tenant(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION revoke_tenant(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION add_key_provider(text, text, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION verify_provider(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION rewrap_tenant(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION rotate_data_key(text) FROM PUBLIC;
-- Key lifecycle (sql/lifecycle.sql, sql/reencrypt.sql): key administrators.
REVOKE ALL ON FUNCTION rotate_tenant_key(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION disable_data_key(text, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION enable_data_key(text, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION destroy_data_key(text, integer, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION rewrap_tenants_start(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION rewrap_tenants_batch(bigint, integer) FROM PUBLIC;
REVOKE ALL ON PROCEDURE rewrap_tenants(text, integer) FROM PUBLIC;
-- reencrypt_value / needs_reencryption stay executable by PUBLIC: batches run them as the table
-- owner, and they refuse to work outside a batch a key administrator started.
REVOKE ALL ON FUNCTION reencrypt_open(oid, text, text, text, integer, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION reencrypt_batch(bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION cancel_reencrypt(bigint) FROM PUBLIC;
REVOKE ALL ON PROCEDURE reencrypt(regclass, name, text, name, integer, interval, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION column_key_versions(regclass, name) FROM PUBLIC;
REVOKE ALL ON FUNCTION column_key_versions_of(oid, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION queue_reencrypt(regclass, name, text, name, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION maintenance_due() FROM PUBLIC;
REVOKE ALL ON FUNCTION rotate_data_key_if_due(text) FROM PUBLIC;
REVOKE ALL ON PROCEDURE run_maintenance() FROM PUBLIC;
REVOKE ALL ON FUNCTION set_rotation_period(text, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION maintenance_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION maintenance_status() TO pg_monitor;
-- Revocation scopes (sql/revocation.sql): key administrators; lift_lockdown checks for a superuser.
REVOKE ALL ON FUNCTION suspend_tenant(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION resume_tenant(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION lockdown(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION lift_lockdown() FROM PUBLIC;
-- Crypto-shredding (sql/shred.sql): key administrators.
REVOKE ALL ON FUNCTION schedule_shred(text, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION cancel_shred(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION confirm_shred(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION shred_if_due(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION shred_destroy_root_key(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION shred_compact_key_tables() FROM PUBLIC;
REVOKE ALL ON FUNCTION shred_report(text) FROM PUBLIC;
-- The audit trail (sql/audit.sql): auditors (grant EXECUTE and SELECT as needed).
REVOKE ALL ON FUNCTION audit_verify(boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION audit_export(bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION audit_prune(interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION audit_prune_in_progress() FROM PUBLIC;
REVOKE ALL ON FUNCTION add_canary(bytea, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION drop_canary(text) FROM PUBLIC;
-- Blind indexes (sql/search.sql): purposes and index keys are key administration. The terms
-- themselves (blind_index, blind_index_all, the trigger) stay executable by PUBLIC: every call
-- checks the tenant grant, as decryption does.
REVOKE ALL ON FUNCTION declare_blind_index(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION rotate_index_key(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION destroy_index_key(text, integer) FROM PUBLIC;
-- Monitoring: superusers and pg_monitor.
REVOKE ALL ON FUNCTION status() FROM PUBLIC;
REVOKE ALL ON FUNCTION key_cache() FROM PUBLIC;
REVOKE ALL ON FUNCTION trust_report() FROM PUBLIC;
REVOKE ALL ON FUNCTION refuse_derived_plaintext() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION status() TO pg_monitor;
GRANT EXECUTE ON FUNCTION key_cache() TO pg_monitor;
-- encrypt_field / decrypt_field stay executable by PUBLIC: every call checks the tenant grant.
-- authorized_tenant() and belongs_to() too: RLS policies call them as the querying role.
"#,
    name = "privileges",
    finalize
);

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn setup_tenant(name: &str) {
        Spi::run(&format!(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT 1 FROM envelope.tenants WHERE name = '{name}') THEN
                 PERFORM envelope.create_tenant('{name}');
               END IF;
               PERFORM envelope.grant_tenant('{name}', current_user);
             END $$"
        ))
        .unwrap();
    }

    /// Blind-index terms made through SQL equal the core's computation with the same index
    /// key, on every PostgreSQL major the pg_test tiers run (15 and 18): the normalisation, the
    /// canonical value bytes and the SQL glue give the same term everywhere.
    #[pg_test]
    fn blind_index_terms_match_the_core_on_every_major() {
        use pg_envelope_core::search::{IndexKey, Normalization as N, Value, ValueKind as K};
        use pg_envelope_core::{wrap, KeyContext, SecretKey};
        setup_tenant("pgt_search");
        Spi::run(
            "SELECT envelope.declare_blind_index('pgt.fold', 'nfkc_casefold'), envelope.declare_blind_index('pgt.nfc', 'nfc'),
                    envelope.declare_blind_index('pgt.raw')",
        )
        .unwrap();
        // Give the tenant a known index key (version 1), wrapped under its tenant key.
        let fixed = [0x42u8; 32];
        let t = crate::catalog::lock_tenant("pgt_search").unwrap().unwrap();
        let mut provider = crate::backend::provider_for(&t.provider, &t.provider_kind, &t.provider_options).unwrap();
        let kek = provider.unwrap_tenant_key(&KeyContext { tenant: "pgt_search", tenant_key_id: t.id }, &t.wrapped_key).unwrap();
        let aad = wrap::WrapAad::IndexKey { tenant: "pgt_search", tenant_key_id: t.id, version: 1 };
        let wrapped = wrap::wrap_key(&kek, &aad, &SecretKey::from_slice(&fixed).unwrap()).unwrap();
        Spi::run_with_args(
            "UPDATE envelope.index_keys SET wrapped_key = $1 WHERE tenant_id = $2 AND version = 1",
            &[wrapped.into(), (t.id as i32).into()],
        )
        .unwrap();
        crate::backend::wipe();
        let core = |purpose: &str, n: N, kind: K, v: Value<'_>| {
            IndexKey::from_secret_key(SecretKey::from_slice(&fixed).unwrap()).term_key(purpose, n, kind).unwrap().term(1, &v).unwrap().to_text()
        };
        Spi::run("SET LOCAL app.tenant_id = 'pgt_search'").unwrap();
        let sql = |q: &str| Spi::get_one::<String>(q).unwrap().unwrap();
        assert_eq!(
            sql("SELECT envelope.blind_index('pgt.fold', 'Straße@EXAMPLE.com')::text"),
            core("pgt.fold", N::NfkcCasefold, K::Text, Value::Text("strasse@example.com"))
        );
        assert_eq!(sql("SELECT envelope.blind_index('pgt.nfc', E'e\\u0301')::text"), core("pgt.nfc", N::Nfc, K::Text, Value::Text("\u{e9}")));
        assert_eq!(sql("SELECT envelope.blind_index('pgt.raw', 42::bigint)::text"), core("pgt.raw", N::None, K::Int8, Value::Int8(42)));
        assert_eq!(sql("SELECT envelope.blind_index('pgt.raw', 1.50)::text"), core("pgt.raw", N::None, K::Numeric, Value::Numeric("1.5")));
        assert_eq!(sql("SELECT envelope.blind_index('pgt.raw', '\\x00ff'::bytea)::text"), core("pgt.raw", N::None, K::Bytea, Value::Bytea(&[0, 255])));
        // 2000-01-03 is day 2 of PostgreSQL's epoch; 2000-01-01 00:00:01 UTC is 1,000,000 µs.
        assert_eq!(sql("SELECT envelope.blind_index('pgt.raw', '2000-01-03'::date)::text"), core("pgt.raw", N::None, K::Date, Value::Date(2)));
        assert_eq!(
            sql("SELECT envelope.blind_index('pgt.raw', '2000-01-01 00:00:01+00'::timestamptz)::text"),
            core("pgt.raw", N::None, K::Timestamptz, Value::Timestamptz(1_000_000))
        );
        assert_eq!(
            sql("SELECT envelope.blind_index('pgt.raw', '2000-01-01 00:00:01'::timestamp)::text"),
            core("pgt.raw", N::None, K::Timestamp, Value::Timestamp(1_000_000))
        );
        // An encrypted value gives the term of its plaintext.
        assert_eq!(
            sql("SELECT envelope.blind_index('pgt.fold', 'STRASSE@example.com'::text::envelope.encrypted_text)::text"),
            core("pgt.fold", N::NfkcCasefold, K::Text, Value::Text("strasse@example.com"))
        );
        // The type's operators and opclasses work here too: a unique index and a lookup.
        Spi::run(
            "CREATE TABLE pgt_users (id int, email_idx envelope.blind_index UNIQUE);
             INSERT INTO pgt_users SELECT g, envelope.blind_index('pgt.fold', 'u' || g || '@x') FROM generate_series(1, 100) g;",
        )
        .unwrap();
        let id = Spi::get_one::<i32>("SELECT id FROM pgt_users WHERE email_idx = envelope.blind_index('pgt.fold', 'U42@X')").unwrap();
        assert_eq!(id, Some(42));
        let n = Spi::get_one::<i64>("SELECT count(*) FROM pgt_users WHERE email_idx = envelope.blind_index('pgt.fold', 'u7@X')").unwrap();
        assert_eq!(n, Some(1));
    }

    fn root_unwraps() -> i64 {
        Spi::get_one::<i64>("SELECT (envelope.status()->'backend'->>'root_unwraps')::bigint").unwrap().unwrap()
    }

    #[pg_test]
    fn round_trip_text_bytea_and_context() {
        setup_tenant("pgt_acme");
        Spi::run("SET LOCAL app.tenant_id = 'pgt_acme'").unwrap();
        let t = Spi::get_one::<String>("SELECT envelope.decrypt_field(envelope.encrypt_field('héllo wörld'))").unwrap();
        assert_eq!(t.as_deref(), Some("héllo wörld"));
        let b = Spi::get_one::<Vec<u8>>(
            "SELECT envelope.decrypt_field_bytea(envelope.encrypt_field('\\x00ff10'::bytea, 'users.blob'), 'users.blob')",
        )
        .unwrap();
        assert_eq!(b, Some(vec![0x00, 0xff, 0x10]));
        let empty = Spi::get_one::<String>("SELECT envelope.decrypt_field(envelope.encrypt_field(''))").unwrap();
        assert_eq!(empty.as_deref(), Some(""));
        let null = Spi::get_one::<Vec<u8>>("SELECT envelope.encrypt_field(NULL::text)").unwrap();
        assert_eq!(null, None);
        // Randomized: the same plaintext never gives the same envelope.
        let same = Spi::get_one::<bool>("SELECT envelope.encrypt_field('x') = envelope.encrypt_field('x')").unwrap();
        assert_eq!(same, Some(false));
        // 82 bytes of overhead.
        let len = Spi::get_one::<i32>("SELECT octet_length(envelope.encrypt_field('abc'))").unwrap();
        assert_eq!(len, Some(85));
    }

    #[pg_test]
    fn one_root_unwrap_per_tenant_for_a_million_rows() {
        for i in 0..100 {
            setup_tenant(&format!("pgt_bulk_{i}"));
        }
        let before = root_unwraps();
        // Each row switches the tenant (set_config runs first in the row), then encrypts.
        let n = Spi::get_one::<i64>(
            "SELECT count(envelope.encrypt_field(i::text))
               FROM generate_series(1, 1000000) AS i,
                    LATERAL (SELECT set_config('app.tenant_id', 'pgt_bulk_' || (i % 100), true)) AS s",
        )
        .unwrap();
        assert_eq!(n, Some(1_000_000));
        assert_eq!(root_unwraps() - before, 100, "exactly one root-key unwrap per tenant");
        let cached = Spi::get_one::<i64>("SELECT count(*) FROM envelope.key_cache() WHERE tenant LIKE 'pgt_bulk_%'").unwrap();
        assert_eq!(cached, Some(100));
        let hits = Spi::get_one::<i64>("SELECT sum(hits)::bigint FROM envelope.key_cache() WHERE tenant LIKE 'pgt_bulk_%'").unwrap();
        assert!(hits.unwrap() >= 1_000_000);
    }

    #[pg_test]
    fn cache_expires_after_ttl_then_costs_one_unwrap() {
        setup_tenant("pgt_ttl");
        Spi::run("SET LOCAL app.tenant_id = 'pgt_ttl'").unwrap();
        Spi::run("SET LOCAL envelope.key_cache_ttl = '1s'").unwrap();
        Spi::run("SELECT envelope.encrypt_field('warm')").unwrap();
        let before = root_unwraps();
        Spi::run("SELECT envelope.encrypt_field('hit')").unwrap();
        assert_eq!(root_unwraps(), before, "within the TTL: no unwrap");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        Spi::run("SELECT envelope.encrypt_field('after ttl')").unwrap();
        Spi::run("SELECT envelope.encrypt_field('after ttl again')").unwrap();
        assert_eq!(root_unwraps(), before + 1, "after the TTL: exactly one unwrap");
    }

    #[pg_test]
    fn wrong_tenant_and_tampering_fail() {
        setup_tenant("pgt_a");
        setup_tenant("pgt_b");
        Spi::run("SET LOCAL app.tenant_id = 'pgt_a'").unwrap();
        let env = Spi::get_one::<Vec<u8>>("SELECT envelope.encrypt_field('only for a', 'ctx')").unwrap().unwrap();
        let try_decrypt = |tenant: &str, bytes: &[u8], ctx: &str| -> bool {
            Spi::run(&format!("SET LOCAL app.tenant_id = '{tenant}'")).unwrap();
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            PgTryBuilder::new(|| {
                Spi::get_one::<String>(&format!("SELECT envelope.decrypt_field('\\x{hex}'::bytea, {ctx})")).is_ok()
            })
            .catch_others(|_| false)
            .execute()
        };
        assert!(try_decrypt("pgt_a", &env, "'ctx'"));
        assert!(!try_decrypt("pgt_b", &env, "'ctx'"));
        assert!(!try_decrypt("pgt_a", &env, "'other'"));
        assert!(!try_decrypt("pgt_a", &env, "NULL"));
        for i in [0usize, 1, 5, 9, 20, 50, 70, env.len() - 1] {
            let mut t = env.clone();
            t[i] ^= 0x40;
            assert!(!try_decrypt("pgt_a", &t, "'ctx'"), "byte {i}");
        }
        assert!(!try_decrypt("pgt_a", &env[..env.len() - 1], "'ctx'"));
    }

    #[pg_test]
    fn encrypted_types_round_trip_through_casts_and_text_form() {
        setup_tenant("pgt_types");
        Spi::run("SET LOCAL app.tenant_id = 'pgt_types'").unwrap();
        Spi::run("SET LOCAL timezone = 'UTC'").unwrap();
        Spi::run(
            "CREATE TEMP TABLE ty (t envelope.encrypted_text, b envelope.encrypted_bytea, j envelope.encrypted_jsonb,
                                   i envelope.encrypted_int8, n envelope.encrypted_numeric, d envelope.encrypted_date,
                                   ts envelope.encrypted_timestamptz)",
        )
        .unwrap();
        Spi::run(
            "INSERT INTO ty VALUES ('héllo'::text, '\\x00ff'::bytea, '{\"a\": [1, 2.5]}'::jsonb, 9007199254740993::bigint,
                                    123.456::numeric, '2024-02-29'::date, '2024-01-01 00:00:00.5+00'::timestamptz)",
        )
        .unwrap();
        let row = Spi::get_one::<String>(
            "SELECT concat_ws('|', t::text, encode(b::bytea, 'hex'), j::jsonb::text, i::int8::text, n::numeric::text,
                              d::date::text, ts::timestamptz::text) FROM ty",
        )
        .unwrap();
        assert_eq!(
            row.as_deref(),
            Some("héllo|00ff|{\"a\": [1, 2.5]}|9007199254740993|123.456|2024-02-29|2024-01-01 00:00:00.5+00")
        );
        // The text form re-enters through the input function and still decrypts.
        let back = Spi::get_one::<String>(
            "SELECT envelope.decrypt_field(envelope.encrypted_text_in(t::varchar::cstring)) FROM ty",
        )
        .unwrap();
        assert_eq!(back.as_deref(), Some("héllo"));
        // Binary I/O is the raw envelope.
        let send = Spi::get_one::<Vec<u8>>("SELECT envelope.encrypted_int8_send(i) FROM ty").unwrap().unwrap();
        assert_eq!(&send[..2], &[pg_envelope_core::envelope::CURRENT_VERSION, 1]);
    }

    /// Who holds a grant follows PostgreSQL's rule for privileges (inheriting memberships only)
    /// without its superuser shortcut; on 16+ that also excludes the implicit
    /// `INHERIT FALSE, SET FALSE` membership a CREATEROLE role gets in roles it creates.
    #[pg_test]
    fn grants_follow_the_privilege_rule_of_postgres() {
        setup_tenant("pgt_priv");
        Spi::run(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgt_holder') THEN CREATE ROLE pgt_holder NOLOGIN; END IF;
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgt_inherit') THEN CREATE ROLE pgt_inherit NOLOGIN IN ROLE pgt_holder; END IF;
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgt_noinherit') THEN CREATE ROLE pgt_noinherit NOLOGIN NOINHERIT IN ROLE pgt_holder; END IF;
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgt_creator') THEN CREATE ROLE pgt_creator NOLOGIN CREATEROLE; END IF;
             END $$",
        )
        .unwrap();
        Spi::run("SET LOCAL ROLE pgt_creator").unwrap();
        Spi::run("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgt_created') THEN CREATE ROLE pgt_created NOLOGIN; END IF; END $$").unwrap();
        Spi::run("RESET ROLE").unwrap();
        Spi::run("SELECT envelope.grant_tenant('pgt_priv', 'pgt_holder'), envelope.grant_tenant('pgt_priv', 'pgt_created')").unwrap();
        Spi::run("SET LOCAL app.tenant_id = 'pgt_priv'").unwrap();
        let can_encrypt = |role: &str| -> bool {
            Spi::run(&format!("SET LOCAL ROLE {role}")).unwrap();
            let ok = PgTryBuilder::new(|| Spi::run("SELECT envelope.encrypt_field('x')").is_ok())
                .catch_others(|_| false)
                .execute();
            Spi::run("RESET ROLE").unwrap();
            ok
        };
        assert!(can_encrypt("pgt_holder"), "the granted role");
        assert!(can_encrypt("pgt_created"), "another granted role");
        assert!(can_encrypt("pgt_inherit"), "an inheriting member");
        assert!(!can_encrypt("pgt_noinherit"), "a NOINHERIT member must SET ROLE first");
        assert!(!can_encrypt("pgt_creator"), "CREATEROLE's implicit membership (16+) does not inherit");
    }

    /// `encrypted_jsonb` stores PostgreSQL's internal form (marker, this machine's byte order,
    /// the document as a jsonb column holds it) for every document PostgreSQL makes here, and
    /// reads it back equal; a payload of the other byte order reads the same; payloads a holder
    /// of the tenant's key could forge are refused before PostgreSQL reads them (XX001); text
    /// payloads (what 0.1.0 wrote) still decrypt through `jsonb_in`.
    #[pg_test]
    fn encrypted_jsonb_stores_the_internal_form_and_refuses_a_forged_one() {
        use pg_envelope_core::jsonb::{self, model, Order};
        struct Plain(Vec<u8>);
        impl crate::backend::OutBuf for Plain {
            fn zeroed(len: usize) -> Self {
                Plain(vec![0; len])
            }
            fn bytes_mut(&mut self) -> &mut [u8] {
                &mut self.0
            }
        }
        const TAG: &[u8] = b"pg_envelope/type/jsonb";
        // A root scalar holding one numeric's bytes.
        fn raw_scalar(numeric: &[u8]) -> Vec<u8> {
            [(0x5000_0001u32).to_ne_bytes().to_vec(), (0x9000_0000u32 | numeric.len() as u32).to_ne_bytes().to_vec(), numeric.to_vec()].concat()
        }
        setup_tenant("pgt_jsonb");
        Spi::run("SET LOCAL app.tenant_id = 'pgt_jsonb'").unwrap();
        Spi::run(
            r#"CREATE TEMP TABLE docs AS SELECT row_number() OVER () AS id, d FROM (VALUES
                 ('{"b": [1, 2.50, -0.001], "a": null, "é": "ünï ✓", "": true, "bb": false}'::jsonb),
                 ('"a string"'), ('null'), ('true'), ('0'), ('-0.000'), ('1e100'), ('-1.5e-100'), ('[]'), ('{}'),
                 ('12345678901234567890123456789012345678901234567890.000000000000000000000000000000000000000000000000000000000000000000001'),
                 ((SELECT jsonb_agg(i) FROM generate_series(1, 100) i)),
                 ((SELECT jsonb_agg(repeat('x', i)) FROM generate_series(0, 70) i)),
                 ((SELECT jsonb_object_agg('k' || i, i * 1.5) FROM generate_series(1, 80) i)),
                 ((SELECT jsonb_object_agg(repeat('z', 80 - i), jsonb_build_array(i, NULL, 'v')) FROM generate_series(1, 40) i)),
                 ((repeat('[', 300) || '{"deep": 1}' || repeat(']', 300))::jsonb),
                 (to_jsonb(now()::timestamptz(0) - now()::timestamptz(0))),
                 (jsonb_build_object('n', 1.0::numeric / 3, 'm', 10::numeric ^ 200, 'x', 0.1 + 0.2)),
                 (jsonb_set('{"a": {"b": [0, 1]}}', '{a,b,1}', '"changed"'))
               ) v(d)"#,
        )
        .unwrap();
        Spi::run("ALTER TABLE docs ADD e envelope.encrypted_jsonb; UPDATE docs SET e = d").unwrap();
        let n = Spi::get_one::<i64>("SELECT count(*) FROM docs").unwrap().unwrap();
        let same = Spi::get_one::<i64>("SELECT count(*) FROM docs WHERE e::jsonb = d AND e::jsonb::text = d::text AND envelope.decrypt_field(e) = d").unwrap();
        assert_eq!(same, Some(n));
        // The stored plaintext of every one: the internal form in this machine's byte order.
        for id in 1..=n {
            let env = Spi::get_one::<Vec<u8>>(&format!("SELECT envelope.encrypted_jsonb_send(e) FROM docs WHERE id = {id}")).unwrap().unwrap();
            let plain: Plain = crate::backend::decrypt_to(&env, Some(TAG)).unwrap();
            assert_eq!(plain.0[..2], [jsonb::MARKER, Order::HOST.form_byte()], "document {id}");
            assert_eq!(jsonb::check_native(&plain.0[2..], &mut |s| std::str::from_utf8(s).is_ok()), Ok(()), "document {id}");
        }
        // Payloads made with the tenant's key, as its holder could, read through the cast.
        let read = |plain: &[u8]| -> Result<String, String> {
            let env: Plain = crate::backend::encrypt_to(plain, Some(TAG)).unwrap();
            let text = pg_envelope_core::envelope::text_form(&env.0);
            PgTryBuilder::new(|| Ok(Spi::get_one::<String>(&format!("SELECT envelope.decrypt_field('{text}'::envelope.encrypted_jsonb)::text")).unwrap().unwrap()))
                .catch_others(|e| match e {
                    pg_sys::panic::CaughtError::PostgresError(r) | pg_sys::panic::CaughtError::ErrorReport(r) => {
                        Err(format!("{:?}: {}", r.sql_error_code(), r.message()))
                    }
                    pg_sys::panic::CaughtError::RustPanic { ereport, .. } => Err(format!("{:?}: {}", ereport.sql_error_code(), ereport.message())),
                })
                .execute()
        };
        let doc = model::Value::Object(vec![
            (b"k".to_vec(), model::Value::Array(vec![model::Value::Null, model::Value::Str("s3cr3t-canary".into())])),
        ]);
        let internal = |order: Order| [vec![jsonb::MARKER, order.form_byte()], model::encode(&doc, order)].concat();
        assert_eq!(read(&internal(Order::Little)).as_deref(), Ok(r#"{"k": [null, "s3cr3t-canary"]}"#));
        assert_eq!(read(&internal(Order::Big)).as_deref(), Ok(r#"{"k": [null, "s3cr3t-canary"]}"#));
        assert_eq!(read(br#"{"old": "text form"}"#).as_deref(), Ok(r#"{"old": "text form"}"#));
        let mut past_the_end = internal(Order::HOST);
        // The value's entry (after the root header and the key's entry): a container of 256 MB.
        past_the_end[2 + 8..2 + 12].copy_from_slice(&0x5FFF_FFF0u32.to_ne_bytes());
        let mut nul = internal(Order::HOST);
        let at = nul.windows(6).position(|w| w == b"s3cr3t").unwrap();
        nul[at] = 0;
        let mut unsorted = [vec![jsonb::MARKER, Order::HOST.form_byte()], model::encode(&model::Value::Object(vec![(b"a".to_vec(), model::Value::Null), (b"b".to_vec(), model::Value::Null)]), Order::HOST)].concat();
        let l = unsorted.len();
        unsorted.swap(l - 1, l - 2);
        // Review 69's F1: 1.5 stored with display scale 0 (prints 1, compares as 1.5).
        let hidden_digit = {
            let mut n = model::numeric_bytes(&model::Numeric { negative: false, weight: 0, dscale: 1, digits: vec![1, 5000] }, Order::HOST);
            assert_eq!(read(&[vec![jsonb::MARKER, Order::HOST.form_byte()], raw_scalar(&n)].concat()).as_deref(), Ok("1.5"));
            n[4..6].copy_from_slice(&0x8000u16.to_ne_bytes()); // short form, dscale 0, weight 0
            [vec![jsonb::MARKER, Order::HOST.form_byte()], raw_scalar(&n)].concat()
        };
        // One level deeper than MAX_DEPTH: [[...[null]...]].
        let too_deep = {
            let depth = jsonb::MAX_DEPTH as usize + 1;
            let mut b = vec![jsonb::MARKER, Order::HOST.form_byte()];
            for k in 0..depth {
                b.extend_from_slice(&0x4000_0001u32.to_ne_bytes());
                let e = if k + 1 == depth { 0xC000_0000u32 } else { 0xD000_0000 | (8 * (depth - k - 1)) as u32 };
                b.extend_from_slice(&e.to_ne_bytes());
            }
            b
        };
        for (what, forged) in [
            ("a numeric whose scale hides a digit", hidden_digit),
            ("deeper than MAX_DEPTH", too_deep),
            ("invalid UTF-8 in a text-form string (review 69's F2)", b"{\"a\": \"\xf0\"}".to_vec()),
            ("a NUL in a text form", b"{\"a\": 1}\0junk".to_vec()),
            ("an unknown byte order", vec![jsonb::MARKER, 0x03, 1, 0, 0, 0x20]),
            ("an entry past the end", past_the_end),
            ("a NUL in a string", nul),
            ("unsorted keys", unsorted),
            ("a marker alone", vec![jsonb::MARKER]),
            // Review 70's I1: jsonb_in's own error quoted the token, after a recorded success.
            ("text that is not JSON", b"not json s3cr3t".to_vec()),
            ("a number numeric cannot hold", b"[1e1000000, \"s3cr3t\"]".to_vec()),
        ] {
            let r = read(&forged);
            let e = r.expect_err(what);
            assert!(e.starts_with("ERRCODE_DATA_CORRUPTED: pg_envelope: an encrypted_jsonb value does not hold"), "{what}: {e}");
            assert!(!e.contains("s3cr3t"), "{what}: {e}");
        }
        // With the one level less, the deepest document accepted reads.
        let deepest = {
            let depth = jsonb::MAX_DEPTH as usize;
            let mut b = vec![jsonb::MARKER, Order::HOST.form_byte()];
            for k in 0..depth {
                b.extend_from_slice(&0x4000_0001u32.to_ne_bytes());
                let e = if k + 1 == depth { 0xC000_0000u32 } else { 0xD000_0000 | (8 * (depth - k - 1)) as u32 };
                b.extend_from_slice(&e.to_ne_bytes());
            }
            b
        };
        let text = read(&deepest).expect("MAX_DEPTH levels read");
        assert!(text.starts_with("[[[") && text.contains("[null]") && text.len() == 2 * jsonb::MAX_DEPTH as usize + 4, "{}...{}", &text[..10.min(text.len())], &text[text.len().saturating_sub(10)..]);
    }

    #[pg_test]
    fn nonce_generator_is_seeded_in_the_backend_not_the_postmaster() {
        setup_tenant("pgt_seed");
        Spi::run("SET LOCAL app.tenant_id = 'pgt_seed'").unwrap();
        Spi::run("SELECT envelope.encrypt_field('x')").unwrap();
        let seeds = Spi::get_one::<i64>("SELECT (envelope.status()->'backend'->>'nonce_rng_seeds')::bigint").unwrap();
        assert_eq!(seeds, Some(1));
        let preloaded = Spi::get_one::<bool>("SELECT (envelope.status()->>'preloaded')::bool").unwrap();
        assert_eq!(preloaded, Some(true));
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        // scripts/test.sh creates this key (32 random bytes, mode 0600, owned by postgres).
        let key = std::env::var("PGE_TEST_ROOT_KEY").unwrap_or_else(|_| "/var/lib/pg_envelope-dev/keys/pgrx-test-root.key".into());
        vec![
            "shared_preload_libraries = 'pg_envelope'",
            Box::leak(format!("envelope.local_root_key_file = '{key}'").into_boxed_str()),
        ]
    }
}
