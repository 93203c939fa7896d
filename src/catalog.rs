//! Reads and writes of the extension's key tables.
//!
//! The tables are not readable by PUBLIC. Every query here runs as the extension's owner with
//! `search_path` pinned to `pg_catalog, pg_temp` (the same two steps a SECURITY DEFINER function
//! takes), inside [`as_extension_owner`]. That happens only on a cache miss or in key
//! management, never per row, so the hot path pays nothing for it. Who may call what is decided
//! by EXECUTE grants on the SQL functions and by `envelope.tenant_grants`, checked in Rust.

use pg_envelope_core::{TenantRecord, VersionState, WrappedDek};
use pgrx::prelude::*;

use crate::error::{EnvelopeError, Result};

/// Restores the caller's user id and settings when dropped, also while unwinding from an ERROR.
struct OwnerScope {
    saved_uid: pg_sys::Oid,
    saved_ctx: i32,
    nest_level: i32,
}

impl Drop for OwnerScope {
    fn drop(&mut self) {
        unsafe {
            pg_sys::SetUserIdAndSecContext(self.saved_uid, self.saved_ctx);
            pg_sys::AtEOXact_GUC(true, self.nest_level);
        }
    }
}

/// Runs `f` as the extension owner with a pinned search_path.
pub fn as_extension_owner<R>(f: impl FnOnce() -> R) -> R {
    let mut saved_uid = pg_sys::Oid::INVALID;
    let mut saved_ctx = 0i32;
    let scope = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_uid, &mut saved_ctx);
        let nest_level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        OwnerScope { saved_uid, saved_ctx, nest_level }
    };
    let owner = extension_owner();
    unsafe {
        pg_sys::SetUserIdAndSecContext(
            owner,
            saved_ctx | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32 | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
    }
    let out = f();
    drop(scope);
    out
}

fn extension_owner() -> pg_sys::Oid {
    // Read-only SPI: `Spi::get_one` marks the transaction as writing and assigns it an xid, which
    // fails inside a parallel plan and on a hot standby (found by the revocation review).
    optional_one::<pg_sys::Oid>("SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'pg_envelope'", &[])
        .ok()
        .flatten()
        .unwrap_or_else(|| EnvelopeError::Internal("the pg_envelope extension is not installed in this database".into()).raise())
}

pub(crate) fn spi_err(e: pgrx::spi::SpiError) -> EnvelopeError {
    EnvelopeError::Internal(format!("catalog query failed: {e}"))
}

/// One argument of a catalog query run by [`select_latest`].
pub enum Arg<'a> {
    Text(&'a str),
    Int4(i32),
    Oid(pg_sys::Oid),
}

/// One result row of [`select_latest`].
pub struct Row {
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
}

impl Row {
    /// Column `col` (1-based), converted; `None` for SQL NULL.
    pub fn get<T: pgrx::FromDatum>(&self, col: usize) -> Option<T> {
        let mut isnull = false;
        // SAFETY: tuple and descriptor come from SPI_tuptable and live until SPI_finish.
        unsafe {
            let d = pg_sys::SPI_getbinval(self.tuple, self.desc, col as std::ffi::c_int, &mut isnull);
            T::from_datum(d, isnull)
        }
    }
}

/// The snapshot key and grant lookups read under: one taken **now**, never the transaction's or
/// the statement's. Under REPEATABLE READ and SERIALIZABLE the transaction snapshot predates
/// everything committed since the transaction began: reading grants or keys through it after an
/// epoch move would cache pre-revocation state under the new epoch (issue 10, item 1). The
/// caller reads the epoch *before* calling this, so what it caches is never older than the epoch
/// it records.
///
/// Taken as PostgreSQL takes a snapshot for a scan of a catalog without a syscache: a new one at
/// every call (`GetNonHistoricCatalogSnapshot` of a relation without a syscache invalidates the
/// backend's catalog snapshot and takes a fresh one). Unlike `GetLatestSnapshot()`, that is
/// allowed in a parallel query (in the leader and in workers, which look catalogs up the same
/// way). Before, a parallel query read keys under its statement's snapshot under READ COMMITTED,
/// and a revoked role kept decrypting for the key cache's TTL after one spanned the revocation
/// (insider review 36); under REPEATABLE READ and SERIALIZABLE it failed with "cannot update
/// SecondarySnapshot during a parallel operation". The returned snapshot is PostgreSQL's static
/// catalog snapshot: copy it (`RegisterSnapshot`, or `SPI_execute_snapshot`, which pushes a
/// copy before it does anything else) before anything else can replace it.
unsafe fn snapshot_for_keys() -> pg_sys::Snapshot {
    pg_sys::GetNonHistoricCatalogSnapshot(pg_sys::InvalidOid)
}


/// [`one_snapshot`]'s state: whether one is active and in which subtransaction it began, and the
/// snapshot its reads share (taken at the first read; null until then).
#[derive(Clone, Copy)]
struct Pinned {
    active: bool,
    began_in: pg_sys::SubTransactionId,
    snapshot: pg_sys::Snapshot,
}

const UNPINNED: Pinned = Pinned { active: false, began_in: 0, snapshot: std::ptr::null_mut() };

thread_local! {
    static PINNED: std::cell::Cell<Pinned> = const { std::cell::Cell::new(UNPINNED) };
}

/// Runs `f` with every [`select_latest`] in it reading under **one** snapshot, taken (as
/// [`snapshot_for_keys`] takes it) at its first read: nothing is taken when everything `f`
/// needs is cached. A reader of several key tables needs this: with a fresh snapshot per query,
/// a `rotate_tenant_key` committing between the read of the tenant row (its wrapped tenant key)
/// and the read of the data keys (rewrapped under the new tenant key) paired the old tenant key
/// with the new wrappings, and the tenant's stored keys looked damaged (found by the soak test);
/// and a grant check and a key load read at two moments let one call see a state that never
/// existed (review 36). Nested calls share the outer one.
///
/// The snapshot is registered on the **top transaction's** resource owner (a subtransaction
/// begun and ended inside `f` cannot release it: at a subtransaction's commit PostgreSQL
/// releases what is registered on its owner, review 37) and unregistered when `f` returns or
/// unwinds (a PostgreSQL error caught further up without an abort, `PgTryBuilder`, leaks
/// nothing). Should an error ever jump over these frames without unwinding them, the abort of
/// the (sub)transaction `f` began in clears the state ([`forget_pinned_at_abort`]), so no later
/// call reads under a released snapshot.
pub fn one_snapshot<R>(f: impl FnOnce() -> Result<R>) -> Result<R> {
    if PINNED.with(|p| p.get().active) {
        return f();
    }
    // SAFETY: a plain read of the transaction state.
    let began_in = unsafe { pg_sys::GetCurrentSubTransactionId() };
    PINNED.with(|p| p.set(Pinned { active: true, began_in, ..UNPINNED }));
    struct Unpin;
    impl Drop for Unpin {
        fn drop(&mut self) {
            let p = PINNED.with(|p| p.replace(UNPINNED));
            if !p.snapshot.is_null() {
                // SAFETY: registered by `key_snapshot` on the top transaction's owner, which
                // only the transaction's end releases (and an abort clears `PINNED` first).
                unsafe { pg_sys::UnregisterSnapshotFromOwner(p.snapshot, pg_sys::TopTransactionResourceOwner) };
            }
        }
    }
    let _guard = Unpin;
    f()
}

/// The snapshot a catalog read of key state uses: [`one_snapshot`]'s (taken now if this is its
/// first read), or else a new one.
unsafe fn key_snapshot() -> pg_sys::Snapshot {
    let p = PINNED.with(|p| p.get());
    if !p.active {
        return snapshot_for_keys();
    }
    if !p.snapshot.is_null() {
        return p.snapshot;
    }
    let snapshot = pg_sys::RegisterSnapshotOnOwner(snapshot_for_keys(), pg_sys::TopTransactionResourceOwner);
    PINNED.with(|c| c.set(Pinned { snapshot, ..p }));
    snapshot
}

/// From the transaction callbacks. At a top-level abort (`subxact` = `None`) the transaction's
/// owner releases the snapshot: the state is cleared. When the subtransaction in which
/// [`one_snapshot`] began aborts, its frames are gone (an error jumped over them): the snapshot
/// is unregistered here and the state cleared. Other subtransactions do not matter (the
/// snapshot belongs to the top transaction).
pub fn forget_pinned_at_abort(subxact: Option<pg_sys::SubTransactionId>) {
    PINNED.with(|c| {
        let p = c.get();
        if !p.active {
            return;
        }
        match subxact {
            None => c.set(UNPINNED),
            Some(s) if s == p.began_in => {
                c.set(UNPINNED);
                if !p.snapshot.is_null() {
                    // SAFETY: still registered on the top transaction's owner (only its end
                    // releases it).
                    unsafe { pg_sys::UnregisterSnapshotFromOwner(p.snapshot, pg_sys::TopTransactionResourceOwner) };
                }
            }
            Some(_) => {}
        }
    });
}

pub fn select_latest<R>(sql: &std::ffi::CStr, args: &[Arg<'_>], mut row: impl FnMut(&Row) -> Result<R>) -> Result<Vec<R>> {
    use pgrx::IntoDatum;
    let mut types: Vec<pg_sys::Oid> = Vec::with_capacity(args.len());
    let mut values: Vec<pg_sys::Datum> = Vec::with_capacity(args.len());
    for a in args {
        let (t, d) = match a {
            Arg::Text(s) => (pg_sys::TEXTOID, s.into_datum()),
            Arg::Int4(i) => (pg_sys::INT4OID, i.into_datum()),
            Arg::Oid(o) => (pg_sys::OIDOID, o.into_datum()),
        };
        types.push(t);
        values.push(d.expect("non-null argument"));
    }
    let nulls = vec![b' ' as std::ffi::c_char; args.len()];
    // SAFETY: SPI is connected (caller runs inside Spi::connect); arrays outlive the calls.
    unsafe {
        let plan = pg_sys::SPI_prepare(sql.as_ptr(), args.len() as std::ffi::c_int, types.as_mut_ptr());
        if plan.is_null() {
            return Err(EnvelopeError::Internal("catalog query could not be prepared".into()));
        }
        let rc = pg_sys::SPI_execute_snapshot(
            plan,
            values.as_mut_ptr(),
            nulls.as_ptr(),
            key_snapshot(),
            std::ptr::null_mut(),
            true,
            false,
            0,
        );
        if rc != pg_sys::SPI_OK_SELECT as i32 {
            pg_sys::SPI_freeplan(plan);
            return Err(EnvelopeError::Internal(format!("catalog query failed (SPI code {rc})")));
        }
        let tt = pg_sys::SPI_tuptable;
        let n = pg_sys::SPI_processed as usize;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let r = Row { tuple: *(*tt).vals.add(i), desc: (*tt).tupdesc };
            match row(&r) {
                Ok(v) => out.push(v),
                Err(e) => {
                    pg_sys::SPI_freeplan(plan);
                    return Err(e);
                }
            }
        }
        pg_sys::SPI_freeplan(plan);
        Ok(out)
    }
}

/// Why a tenant's keys may not be used: suspended (perhaps scheduled for shredding) or shredded.
#[derive(Debug, Clone)]
pub enum Refusal {
    Suspended { reason: String, shred_after: Option<String> },
    Shredded { at: String },
}

impl Refusal {
    /// From the columns `suspended_reason`, `shred_after::text`, `shredded_at::text`.
    pub fn from_columns(reason: Option<String>, shred_after: Option<String>, shredded_at: Option<String>) -> Option<Refusal> {
        match (shredded_at, reason) {
            (Some(at), _) => Some(Refusal::Shredded { at }),
            (None, Some(reason)) => Some(Refusal::Suspended { reason, shred_after }),
            (None, None) => None,
        }
    }

    pub fn error(&self, tenant: &str) -> EnvelopeError {
        match self.clone() {
            Refusal::Suspended { reason, shred_after } => EnvelopeError::TenantSuspended { tenant: tenant.to_string(), reason, shred_after },
            Refusal::Shredded { at } => EnvelopeError::TenantShredded { tenant: tenant.to_string(), at },
        }
    }
}

/// The SQL columns [`Refusal::from_columns`] reads, for a query on `envelope.tenants t`.
/// A tenant as the cache needs it: keys to unwrap and the provider.
pub struct TenantRow {
    pub record: TenantRecord,
    pub provider: String,
    pub provider_kind: String,
    pub provider_options: String,
}

/// Loads a tenant's wrapped keys (under a fresh snapshot). `Ok(None)` when no such tenant exists.
pub fn load_tenant(tenant: &str) -> Result<Option<TenantRow>> {
    as_extension_owner(|| {
        // The tenant row, its data keys and its index keys from one snapshot: they are
        // rewrapped together by one transaction.
        Spi::connect(|_client| one_snapshot(|| {
            let head = select_latest(
                c"SELECT t.id, t.wrapped_key, t.provider, p.kind, p.options::text, t.key_check,
                         t.suspended_reason, to_char(t.shred_after AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC', to_char(t.shredded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC'
                    FROM envelope.tenants t JOIN envelope.key_providers p ON p.name = t.provider
                   WHERE t.name = $1",
                &[Arg::Text(tenant)],
                |r| {
                    let refusal = Refusal::from_columns(r.get::<String>(7), r.get::<String>(8), r.get::<String>(9));
                    if let Some(refusal) = refusal {
                        // A suspended or shredded tenant's keys are never loaded (every path
                        // that uses keys comes here); a shredded one has none to load.
                        return Err(refusal.error(tenant));
                    }
                    Ok((
                        r.get::<i32>(1).ok_or_else(|| missing("id"))?,
                        r.get::<Vec<u8>>(2).ok_or_else(|| missing("wrapped_key"))?,
                        r.get::<String>(3).ok_or_else(|| missing("provider"))?,
                        r.get::<String>(4).ok_or_else(|| missing("kind"))?,
                        r.get::<String>(5).ok_or_else(|| missing("options"))?,
                        r.get::<Vec<u8>>(6).ok_or_else(|| missing("key_check"))?,
                    ))
                },
            )?;
            let Some((id, wrapped, provider, provider_kind, provider_options, key_check)) = head.into_iter().next() else {
                return Ok(None);
            };
            let key_check: [u8; 32] = key_check.try_into().map_err(|_| missing("key_check"))?;
            let mut active = None;
            let mut unusable = Vec::new();
            // Versions this (uncommitted) transaction created: it rotated the tenant itself.
            let mut mine: Vec<u32> = Vec::new();
            let deks = select_latest(
                c"SELECT version, wrapped_key, state, xmin::text, created_at = now() FROM envelope.data_keys WHERE tenant_id = $1 ORDER BY version",
                &[Arg::Int4(id)],
                |r| {
                    let version: i32 = r.get(1).ok_or_else(|| missing("version"))?;
                    let state: String = r.get(3).ok_or_else(|| missing("state"))?;
                    // Inserted (not merely retired) by this transaction: our xid and our start time.
                    let xmin: u32 = r.get::<String>(4).and_then(|x| x.parse().ok()).unwrap_or(0);
                    let created_now = r.get::<bool>(5).unwrap_or(false);
                    // SAFETY: a plain check of the current transaction's xids.
                    if created_now && xmin != 0 && unsafe { pg_sys::TransactionIdIsCurrentTransactionId(xmin.into()) } {
                        mine.push(version as u32);
                    }
                    // Disabled (and 0.1.0's never-used 'revoked') and destroyed versions: no key
                    // is loaded, only the reason, for a clear error.
                    match state.as_str() {
                        "active" | "retired" => {}
                        "destroyed" => {
                            unusable.push((version as u32, VersionState::Destroyed));
                            return Ok(None);
                        }
                        _ => {
                            unusable.push((version as u32, VersionState::Disabled));
                            return Ok(None);
                        }
                    }
                    let wrapped: Vec<u8> = r.get(2).ok_or_else(|| missing("wrapped_key"))?;
                    if state == "active" {
                        if active.is_some() {
                            // The key tables were altered (the one-active index dropped): fail
                            // closed rather than pick one.
                            return Err(EnvelopeError::CorruptKeys {
                                tenant: tenant.to_string(),
                                detail: "more than one data key version is active".into(),
                            });
                        }
                        active = Some(version as u32);
                    }
                    Ok(Some(WrappedDek { version: version as u32, wrapped }))
                },
            )?;
            let deks: Vec<WrappedDek> = deks.into_iter().flatten().collect();
            // A version made by this still-uncommitted transaction is not written with until it
            // commits: if the transaction rolled back after a value escaped (to the client,
            // through dblink), the number would be made again with another key and the value
            // lost. New values keep the newest version that another transaction committed (a
            // tenant created in this transaction has none: its version 1 is used, and its tenant
            // key id is never reused).
            if let Some(a) = active {
                if mine.contains(&a) {
                    if let Some(prev) = deks.iter().map(|d| d.version).filter(|v| !mine.contains(v)).max() {
                        active = Some(prev);
                    }
                }
            }
            // Blind-index keys (sql/search.sql): the live versions, wrapped under the tenant key.
            let mut active_index_version = 0;
            let index_keys = select_latest(
                c"SELECT version, wrapped_key, state FROM envelope.index_keys
                   WHERE tenant_id = $1 AND state <> 'destroyed' ORDER BY version",
                &[Arg::Int4(id)],
                |r| {
                    let version = r.get::<i32>(1).ok_or_else(|| missing("version"))? as u32;
                    if r.get::<String>(3).as_deref() == Some("active") {
                        active_index_version = version;
                    }
                    Ok(WrappedDek { version, wrapped: r.get::<Vec<u8>>(2).ok_or_else(|| missing("wrapped_key"))? })
                },
            )?;
            Ok(Some(TenantRow {
                record: TenantRecord {
                    tenant: tenant.to_string(),
                    tenant_key_id: id as u32,
                    wrapped_tenant_key: wrapped,
                    tenant_key_check: Some(key_check),
                    active_dek_version: active.unwrap_or(0),
                    deks,
                    unusable,
                    index_keys,
                    active_index_version,
                },
                provider,
                provider_kind,
                provider_options,
            }))
        }))
    })
}

/// What the grant check and the header checks need of a tenant: its key id and the roles
/// granted it. Read under a fresh snapshot; no key is touched.
pub struct TenantDirEntry {
    pub id: u32,
    pub grantees: Vec<pg_sys::Oid>,
    /// Why the tenant's keys may not be used, if they may not.
    pub refusal: Option<Refusal>,
}

/// A grant counts only while its role still holds the anchor privilege (SELECT on
/// `envelope.grant_anchor`), which `grant_tenant` gives and the last `revoke_tenant` takes. The
/// privilege is a shared dependency: `DROP ROLE` refuses while the role has grants, and once
/// `DROP OWNED BY` removed it, leftover rows never count again (nor after a dump and restore,
/// where a bare OID could name another role).
const LIVE_GRANTEES: &std::ffi::CStr = c"SELECT g.grantee::oid FROM envelope.tenant_grants g
  WHERE g.tenant_id = $1
    AND EXISTS (SELECT 1 FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
                 WHERE c.oid = 'envelope.grant_anchor'::pg_catalog.regclass
                   AND a.grantee = g.grantee::oid AND a.privilege_type = 'SELECT')";

/// The tenant's key id and live grantees, or `None` if no such tenant exists.
pub fn tenant_directory(tenant: &str) -> Result<Option<TenantDirEntry>> {
    as_extension_owner(|| {
        // The tenant's state and its grants as of one moment.
        Spi::connect(|_client| one_snapshot(|| {
            let ids = select_latest(
                c"SELECT t.id, 'envelope.grant_anchor'::pg_catalog.regclass::oid, t.suspended_reason, to_char(t.shred_after AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC', to_char(t.shredded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC'
                    FROM envelope.tenants t WHERE t.name = $1",
                &[Arg::Text(tenant)],
                |r| {
                    Ok((
                        r.get::<i32>(1).ok_or_else(|| missing("id"))?,
                        r.get::<pg_sys::Oid>(2).ok_or_else(|| missing("anchor"))?,
                        Refusal::from_columns(r.get::<String>(3), r.get::<String>(4), r.get::<String>(5)),
                    ))
                },
            )?;
            let Some((id, anchor, refusal)) = ids.into_iter().next() else { return Ok(None) };
            crate::backend::note_anchor_oid(anchor);
            let grantees = select_latest(LIVE_GRANTEES, &[Arg::Int4(id)], |r| r.get::<pg_sys::Oid>(1).ok_or_else(|| missing("grantee")))?;
            Ok(Some(TenantDirEntry { id: id as u32, grantees, refusal }))
        }))
    })
}

/// The OID of `envelope.tenants` (looked up once per backend).
pub fn tenants_oid() -> Result<pg_sys::Oid> {
    static OID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let known = OID.load(std::sync::atomic::Ordering::Relaxed);
    if known != 0 {
        // Still the same table? (DROP and CREATE EXTENSION in this session give it a new oid.)
        let name = unsafe { pg_sys::get_rel_name(pg_sys::Oid::from(known)) };
        if !name.is_null() && unsafe { std::ffi::CStr::from_ptr(name) }.to_bytes() == b"tenants" {
            return Ok(pg_sys::Oid::from(known));
        }
    }
    let oid = as_extension_owner(|| {
        optional_one::<pg_sys::Oid>("SELECT 'envelope.tenants'::pg_catalog.regclass::oid", &[])?.ok_or_else(|| missing("oid"))
    })?;
    OID.store(oid.to_u32(), std::sync::atomic::Ordering::Relaxed);
    Ok(oid)
}

/// Whether `role` may read `envelope.tenants` (superusers and roles the DBA granted SELECT):
/// such roles may learn which tenants exist; others get the same answer for a tenant that does
/// not exist as for one they hold no grant for.
pub fn can_list_tenants(role: pg_sys::Oid) -> Result<bool> {
    let oid = tenants_oid()?;
    // SAFETY: a plain catalog privilege check on the backend's main thread.
    Ok(unsafe { pg_sys::pg_class_aclcheck(oid, role, pg_sys::ACL_SELECT as pg_sys::AclMode) } == pg_sys::AclResult::ACLCHECK_OK)
}

/// The roles whose privileges `role` has, by PostgreSQL's own rule for privileges
/// (`has_privs_of_role` / `roles_is_member_of(ROLERECURSE_PRIVS)`) but **without** its
/// superuser shortcut: the role itself, then memberships that inherit. On PostgreSQL 15 a
/// membership inherits when the member role has INHERIT; from 16 on, when the membership was
/// granted WITH INHERIT TRUE (so the implicit `INHERIT FALSE, SET FALSE` grant a CREATEROLE user
/// gets on roles it creates does not count).
pub fn roles_with_privs_of(role: pg_sys::Oid) -> Result<Vec<pg_sys::Oid>> {
    #[cfg(any(feature = "pg13", feature = "pg14", feature = "pg15"))]
    const Q: &std::ffi::CStr = c"WITH RECURSIVE r(oid) AS (
            SELECT $1
            UNION
            SELECT m.roleid FROM r JOIN pg_catalog.pg_auth_members m ON m.member = r.oid
              JOIN pg_catalog.pg_roles x ON x.oid = r.oid
             WHERE x.rolinherit)
        SELECT oid FROM r";
    #[cfg(not(any(feature = "pg13", feature = "pg14", feature = "pg15")))]
    const Q: &std::ffi::CStr = c"WITH RECURSIVE r(oid) AS (
            SELECT $1
            UNION
            SELECT m.roleid FROM r JOIN pg_catalog.pg_auth_members m ON m.member = r.oid
             WHERE m.inherit_option)
        SELECT oid FROM r";
    as_extension_owner(|| Spi::connect(|_client| select_latest(Q, &[Arg::Oid(role)], |r| r.get::<pg_sys::Oid>(1).ok_or_else(|| missing("oid")))))
}

pub(crate) fn missing(col: &str) -> EnvelopeError {
    EnvelopeError::Internal(format!("unexpected NULL in key table column {col}"))
}

/// A provider's kind and options (JSON text), or `None` if it does not exist.
pub fn provider_row(name: &str) -> Result<Option<(String, String)>> {
    as_extension_owner(|| {
        Spi::connect(|client| {
            let t = client
                .select("SELECT kind, options::text FROM envelope.key_providers WHERE name = $1", Some(1), &[name.into()])
                .map_err(spi_err)?;
            if t.is_empty() {
                return Ok(None);
            }
            let r = t.first();
            Ok(Some((
                r.get::<String>(1).map_err(spi_err)?.ok_or_else(|| missing("kind"))?,
                r.get::<String>(2).map_err(spi_err)?.ok_or_else(|| missing("options"))?,
            )))
        })
    })
}

/// Every provider as (name, kind, options JSON text), by name.
pub fn provider_rows() -> Result<Vec<(String, String, String)>> {
    as_extension_owner(|| {
        Spi::connect(|client| {
            let t = client
                .select("SELECT name, kind, options::text FROM envelope.key_providers ORDER BY name", None, &[])
                .map_err(spi_err)?;
            t.into_iter()
                .map(|r| {
                    Ok((
                        r.get::<String>(1).map_err(spi_err)?.ok_or_else(|| missing("name"))?,
                        r.get::<String>(2).map_err(spi_err)?.ok_or_else(|| missing("kind"))?,
                        r.get::<String>(3).map_err(spi_err)?.ok_or_else(|| missing("options"))?,
                    ))
                })
                .collect()
        })
    })
}

/// Registers a provider. The options were validated by the caller.
pub fn insert_provider(name: &str, kind: &str, options_json: &str) -> Result<()> {
    as_extension_owner(|| {
        Spi::connect_mut(|client| {
            client
                .update(
                    "INSERT INTO envelope.key_providers (name, kind, options) VALUES ($1, $2, $3::jsonb)",
                    None,
                    &[name.into(), kind.into(), options_json.into()],
                )
                .map_err(spi_err)?;
            Ok(())
        })
    })
}

/// Points a tenant at another provider (or a new root key version) with its re-wrapped key.
pub fn update_tenant_wrapping(tenant: &str, provider: &str, wrapped: &[u8], root_version: Option<&str>) -> Result<()> {
    as_extension_owner(|| {
        Spi::connect_mut(|client| {
            client
                .update(
                    "UPDATE envelope.tenants SET provider = $2, wrapped_key = $3, root_version = $4, wrapped_at = now() WHERE name = $1",
                    None,
                    &[tenant.into(), provider.into(), wrapped.into(), root_version.into()],
                )
                .map_err(spi_err)?;
            Ok(())
        })
    })
}

pub fn tenant_exists(name: &str) -> Result<bool> {
    as_extension_owner(|| {
        optional_one::<bool>("SELECT EXISTS (SELECT 1 FROM envelope.tenants WHERE name = $1)", &[name.into()]).map(|v| v.unwrap_or(false))
    })
}

pub fn next_tenant_id() -> Result<u32> {
    as_extension_owner(|| {
        Spi::get_one::<i64>("SELECT nextval('envelope.tenant_id_seq')")
            .map_err(spi_err)?
            .map(|v| v as u32)
            .ok_or_else(|| missing("nextval"))
    })
}

/// Inserts a new tenant with its first DEK and its first blind-index key (version 1, active).
pub fn insert_tenant(
    id: u32,
    name: &str,
    provider: &str,
    wrapped_kek: &[u8],
    key_check: &[u8],
    wrapped_dek: &[u8],
    wrapped_index_key: &[u8],
    root_version: Option<&str>,
) -> Result<()> {
    as_extension_owner(|| {
        Spi::connect_mut(|client| {
            client
                .update(
                    "INSERT INTO envelope.tenants (id, name, provider, wrapped_key, key_check, root_version, wrapped_at)
                     VALUES ($1, $2, $3, $4, $5, $6, now())",
                    None,
                    &[(id as i32).into(), name.into(), provider.into(), wrapped_kek.into(), key_check.into(), root_version.into()],
                )
                .map_err(spi_err)?;
            client
                .update(
                    "INSERT INTO envelope.data_keys (tenant_id, version, wrapped_key, state) VALUES ($1, 1, $2, 'active')",
                    None,
                    &[(id as i32).into(), wrapped_dek.into()],
                )
                .map_err(spi_err)?;
            client
                .update(
                    "INSERT INTO envelope.index_keys (tenant_id, version, wrapped_key, state) VALUES ($1, 1, $2, 'active')",
                    None,
                    &[(id as i32).into(), wrapped_index_key.into()],
                )
                .map_err(spi_err)?;
            Ok(())
        })
    })
}

/// Adds or removes a grant, keeping the role's anchor privilege in step (see [`LIVE_GRANTEES`]),
/// and drops rows that no longer count (their role lost the anchor privilege through
/// `DROP OWNED BY`, or was dropped since). Returns whether the grant changed.
pub fn set_grant(tenant: &str, role: pg_sys::Oid, grant: bool) -> Result<bool> {
    let quoted = unsafe {
        let name = pg_sys::GetUserNameFromId(role, false);
        std::ffi::CStr::from_ptr(pg_sys::quote_identifier(name)).to_string_lossy().into_owned()
    };
    as_extension_owner(|| {
        Spi::connect_mut(|client| {
            // Grant changes serialize (readers are not blocked). Under REPEATABLE READ and
            // SERIALIZABLE the statements below see the transaction's snapshot: a grant of this
            // role committed after it would be invisible, so a revocation deleted nothing,
            // returned false and left the role its access (review 37). Such a transaction is
            // refused with 40001 when what it sees of the role's grants is not what is there.
            client.update("LOCK TABLE envelope.tenant_grants IN SHARE ROW EXCLUSIVE MODE", None, &[]).map_err(spi_err)?;
            if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
                let seen: Vec<i32> = client
                    .select("SELECT tenant_id FROM envelope.tenant_grants WHERE grantee = $1::oid::regrole ORDER BY 1", None, &[role.into()])
                    .map_err(spi_err)?
                    .map(|r| r.get::<i32>(1).ok().flatten().unwrap_or(0))
                    .collect();
                let now = select_latest(
                    c"SELECT tenant_id FROM envelope.tenant_grants WHERE grantee = $1::pg_catalog.regrole ORDER BY 1",
                    &[Arg::Oid(role)],
                    |r| r.get::<i32>(1).ok_or_else(|| missing("tenant_id")),
                )?;
                if seen != now {
                    return Err(EnvelopeError::BadRequest {
                        code: PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                        message: "pg_envelope: the role's tenant grants changed after this transaction's snapshot was taken".into(),
                        hint: Some("Retry the transaction (or grant and revoke under READ COMMITTED).".into()),
                    });
                }
            }
            client
                .update(
                    "DELETE FROM envelope.tenant_grants g
                      WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
                                         WHERE c.oid = 'envelope.grant_anchor'::pg_catalog.regclass
                                           AND a.grantee = g.grantee::oid AND a.privilege_type = 'SELECT')",
                    None,
                    &[],
                )
                .map_err(spi_err)?;
            let id: Option<i32> = client
                .select("SELECT id FROM envelope.tenants WHERE name = $1", Some(1), &[tenant.into()])
                .map_err(spi_err)?
                .first()
                .get(1)
                .unwrap_or(None);
            let Some(id) = id else {
                return Err(EnvelopeError::TenantUnknown { tenant: tenant.to_string() });
            };
            let changed = if grant {
                let t = client
                    .update(
                        "INSERT INTO envelope.tenant_grants (tenant_id, grantee) VALUES ($1, $2::oid::regrole) ON CONFLICT DO NOTHING",
                        None,
                        &[id.into(), role.into()],
                    )
                    .map_err(spi_err)?;
                client.update(&format!("GRANT SELECT ON envelope.grant_anchor TO {quoted}"), None, &[]).map_err(spi_err)?;
                t.len() > 0
            } else {
                let t = client
                    .update(
                        "DELETE FROM envelope.tenant_grants WHERE tenant_id = $1 AND grantee = $2::oid::regrole",
                        None,
                        &[id.into(), role.into()],
                    )
                    .map_err(spi_err)?;
                let left: i64 = client
                    .select("SELECT count(*) FROM envelope.tenant_grants WHERE grantee = $1::oid::regrole", None, &[role.into()])
                    .map_err(spi_err)?
                    .first()
                    .get(1)
                    .map_err(spi_err)?
                    .unwrap_or(0);
                if left == 0 {
                    client.update(&format!("REVOKE SELECT ON envelope.grant_anchor FROM {quoted}"), None, &[]).map_err(spi_err)?;
                }
                t.len() > 0
            };
            Ok(changed)
        })
    })
}

/// A tenant's row, locked for a key change (`FOR UPDATE`: concurrent changes of one tenant
/// serialize), with its provider.
pub struct LockedTenant {
    pub id: u32,
    /// Why the tenant's keys may not be used (suspended, shredded), if they may not.
    pub refusal: Option<Refusal>,
    pub provider: String,
    pub provider_kind: String,
    pub provider_options: String,
    pub wrapped_key: Vec<u8>,
    pub key_check: Vec<u8>,
}

pub fn lock_tenant(tenant: &str) -> Result<Option<LockedTenant>> {
    // A prepared transaction would keep the lock (and block every key change of the tenant,
    // revocations included, and the maintenance worker) past its session and a restart.
    crate::backend::refuse_prepare();
    as_extension_owner(|| {
        Spi::connect_mut(|client| {
            // The tenant's row alone: joined with its provider's row, a wait for a transaction
            // that moved the tenant to another provider (rewrap_tenant) re-checked the join
            // against the old provider row and lost the tenant: a suspension raced with a
            // move failed with "tenant does not exist" (review 41). The provider is read after
            // the lock, under a new snapshot in READ COMMITTED.
            let t = client
                .update(
                    "SELECT t.id, t.provider, t.wrapped_key, t.key_check,
                            t.suspended_reason, to_char(t.shred_after AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC', to_char(t.shredded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC'
                       FROM envelope.tenants t
                      WHERE t.name = $1 FOR UPDATE",
                    Some(1),
                    &[tenant.into()],
                )
                .map_err(spi_err)?;
            if t.is_empty() {
                return Ok(None);
            }
            let r = t.first();
            let id = r.get::<i32>(1).map_err(spi_err)?.ok_or_else(|| missing("id"))?;
            let provider = r.get::<String>(2).map_err(spi_err)?.ok_or_else(|| missing("provider"))?;
            let p = client
                .select("SELECT kind, options::text FROM envelope.key_providers WHERE name = $1", Some(1), &[provider.as_str().into()])
                .map_err(spi_err)?;
            if p.is_empty() {
                return Err(EnvelopeError::ProviderUnknown { provider });
            }
            let p = p.first();
            let provider_kind = p.get::<String>(1).map_err(spi_err)?.ok_or_else(|| missing("kind"))?;
            let provider_options = p.get::<String>(2).map_err(spi_err)?.ok_or_else(|| missing("options"))?;
            // Under REPEATABLE READ and SERIALIZABLE what follows the lock reads and writes the
            // tenant's key rows under the transaction's snapshot. Every change of those rows
            // happens under this lock, so once it is held nothing changes them until this
            // transaction ends; but a change committed after the snapshot was taken (and before
            // the lock was granted) would be invisible: an UPDATE of a version made since would
            // match nothing and a key function would report success having done nothing
            // (review 38: disable_data_key and destroy_data_key returned true and changed
            // nothing). Such a transaction fails with 40001 here instead.
            if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
                const KEY_ROWS: &std::ffi::CStr = c"SELECT coalesce((SELECT string_agg(version || ':' || state || ':' || xmin::text, ',' ORDER BY version)
                                                  FROM envelope.data_keys WHERE tenant_id = $1), '')
                                       || '|' || coalesce((SELECT string_agg(version || ':' || state || ':' || xmin::text, ',' ORDER BY version)
                                                  FROM envelope.index_keys WHERE tenant_id = $1), '')";
                let as_seen = KEY_ROWS.to_str().expect("ASCII");
                let seen: Option<String> = client.select(as_seen, Some(1), &[id.into()]).map_err(spi_err)?.first().get(1).map_err(spi_err)?;
                let now = select_latest(KEY_ROWS, &[Arg::Int4(id)], |r| Ok(r.get::<String>(1)))?;
                if now.into_iter().next().flatten() != seen {
                    return Err(EnvelopeError::BadRequest {
                        code: PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                        message: format!(
                            "pg_envelope: the keys of tenant \"{}\" changed after this transaction's snapshot was taken",
                            crate::error::shown(tenant)
                        ),
                        hint: Some("Retry the transaction (or run key administration under READ COMMITTED).".into()),
                    });
                }
            }
            Ok(Some(LockedTenant {
                id: id as u32,
                provider,
                provider_kind,
                provider_options,
                // Empty for a shredded tenant (its refusal says so; nothing may use them).
                wrapped_key: r.get::<Vec<u8>>(3).map_err(spi_err)?.unwrap_or_default(),
                key_check: r.get::<Vec<u8>>(4).map_err(spi_err)?.unwrap_or_default(),
                refusal: Refusal::from_columns(
                    r.get::<String>(5).map_err(spi_err)?,
                    r.get::<String>(6).map_err(spi_err)?,
                    r.get::<String>(7).map_err(spi_err)?,
                ),
            }))
        })
    })
}

/// The next data key version of a tenant, read under a fresh snapshot (after the caller locked
/// the tenant, so a rotation that committed while it waited is seen even under REPEATABLE READ).
pub fn next_data_key_version(tenant_id: u32) -> Result<u32> {
    as_extension_owner(|| {
        Spi::connect(|_client| {
            let v = select_latest(
                c"SELECT coalesce(max(version), 0) + 1 FROM envelope.data_keys WHERE tenant_id = $1",
                &[Arg::Int4(tenant_id as i32)],
                |r| r.get::<i32>(1).ok_or_else(|| missing("version")),
            )?;
            Ok(v.into_iter().next().unwrap_or(1) as u32)
        })
    })
}

/// Retires the active data key of a tenant and stores `version` as the new active one.
pub fn activate_data_key(tenant_id: u32, version: u32, wrapped: &[u8]) -> Result<()> {
    as_extension_owner(|| {
        Spi::connect_mut(|client| {
            client
                .update(
                    "UPDATE envelope.data_keys SET state = 'retired' WHERE tenant_id = $1 AND state = 'active'",
                    None,
                    &[(tenant_id as i32).into()],
                )
                .map_err(spi_err)?;
            client
                .update(
                    "INSERT INTO envelope.data_keys (tenant_id, version, wrapped_key, state) VALUES ($1, $2, $3, 'active')",
                    None,
                    &[(tenant_id as i32).into(), (version as i32).into(), wrapped.into()],
                )
                .map_err(spi_err)?;
            Ok(())
        })
    })
}

/// The name of the tenant with this tenant key id (under a fresh snapshot), or `None`.
pub fn tenant_name_by_id(tenant_key_id: u32) -> Result<Option<String>> {
    as_extension_owner(|| {
        Spi::connect(|_client| {
            let n = select_latest(
                c"SELECT name FROM envelope.tenants WHERE id = $1",
                &[Arg::Int4(tenant_key_id as i32)],
                |r| r.get::<String>(1).ok_or_else(|| missing("name")),
            )?;
            Ok(n.into_iter().next())
        })
    })
}

/// A data key version's state (under a fresh snapshot, after the caller locked the tenant).
pub fn data_key_state(tenant_id: u32, version: u32) -> Result<Option<String>> {
    as_extension_owner(|| {
        Spi::connect(|_client| {
            let n = select_latest(
                c"SELECT state FROM envelope.data_keys WHERE tenant_id = $1 AND version = $2",
                &[Arg::Int4(tenant_id as i32), Arg::Int4(version as i32)],
                |r| r.get::<String>(1).ok_or_else(|| missing("state")),
            )?;
            Ok(n.into_iter().next())
        })
    })
}

/// Moves a data key version to a new state: `disabled` (from retired), `retired` (from
/// disabled: enable), `destroyed` (from disabled: the wrapped key is removed, the row stays as a
/// tombstone so the version number is never reused).
pub fn set_data_key_state(tenant_id: u32, version: u32, state: &str) -> Result<()> {
    let sql = match state {
        "disabled" => "UPDATE envelope.data_keys SET state = 'disabled', disabled_at = now() WHERE tenant_id = $1 AND version = $2",
        "retired" => "UPDATE envelope.data_keys SET state = 'retired', disabled_at = NULL WHERE tenant_id = $1 AND version = $2",
        "destroyed" => {
            "UPDATE envelope.data_keys SET state = 'destroyed', wrapped_key = NULL, destroyed_at = now() WHERE tenant_id = $1 AND version = $2"
        }
        other => return Err(EnvelopeError::Internal(format!("unknown data key state {other}"))),
    };
    as_extension_owner(|| {
        Spi::connect_mut(|client| {
            let n = client.update(sql, None, &[(tenant_id as i32).into(), (version as i32).into()]).map_err(spi_err)?.len();
            if n != 1 {
                // The version's row is not visible to this transaction (lock_tenant refuses the
                // stale snapshots that cause this; a second line of defence).
                return Err(EnvelopeError::BadRequest {
                    code: PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                    message: format!("pg_envelope: data key version {version} changed after this transaction's snapshot was taken"),
                    hint: Some("Retry the transaction.".into()),
                });
            }
            Ok(())
        })
    })
}

/// The first tracked column (every column of an encrypted type, and every column a
/// re-encryption job named) that holds a value under this tenant's data key version, or `None`.
/// Runs `envelope.data_key_in_use` (sql/lifecycle.sql), which reads headers only.
///
/// Runs under a fresh snapshot, not the transaction's (under REPEATABLE READ rows committed
/// after the snapshot are invisible to it), after the caller waited for the transactions that
/// may still write values under the version ([`wait_for_running_transactions`]).
pub fn data_key_in_use(tenant_id: u32, version: u32) -> Result<Option<String>> {
    as_extension_owner(|| {
        Spi::connect(|_client| {
            let r = select_latest(
                c"SELECT envelope.data_key_in_use($1, $2)",
                &[Arg::Int4(tenant_id as i32), Arg::Int4(version as i32)],
                |r| Ok(r.get::<String>(1)),
            )?;
            Ok(r.into_iter().next().flatten())
        })
    })
}

/// The prepared transactions (`PREPARE TRANSACTION`) of this database waiting for their COMMIT
/// or ROLLBACK PREPARED, as "'gid' (owner role)" (empty: none). Their writes are visible to no
/// snapshot until then, and `wait_for_running_transactions` waits for them as for any
/// transaction that was running (as `CREATE INDEX CONCURRENTLY` does): a forgotten one would
/// hold `destroy_data_key` until its lock_timeout, so the destroy refuses at once while there
/// are any, naming them. (Even one that wrote nothing is waited for: PREPARE gives it an xid.
/// Any role that can connect can leave one behind; its owner or a superuser ends it.)
pub fn prepared_transactions_here() -> Result<Vec<String>> {
    Spi::connect(|c| {
        let t = c
            .select(
                "SELECT pg_catalog.quote_literal(gid) || ' (owner ' || owner || ')' FROM pg_catalog.pg_prepared_xacts
                  WHERE database OPERATOR(pg_catalog.=) pg_catalog.current_database() ORDER BY prepared LIMIT 10",
                None,
                &[],
            )
            .map_err(spi_err)?;
        let mut out = Vec::new();
        for r in t {
            out.push(r.get::<String>(1).map_err(spi_err)?.unwrap_or_default());
        }
        Ok(out)
    })
}

/// A data key version's state by tenant name, under a fresh snapshot (no lock taken).
pub fn data_key_state_of(tenant: &str, version: u32) -> Result<Option<String>> {
    as_extension_owner(|| {
        Spi::connect(|_client| {
            let n = select_latest(
                c"SELECT k.state FROM envelope.data_keys k JOIN envelope.tenants t ON t.id = k.tenant_id WHERE t.name = $1 AND k.version = $2",
                &[Arg::Text(tenant), Arg::Int4(version as i32)],
                |r| r.get::<String>(1).ok_or_else(|| missing("state")),
            )?;
            Ok(n.into_iter().next())
        })
    })
}

/// Waits for every transaction of this database that is running now (other than this one and
/// VACUUM), as `CREATE INDEX CONCURRENTLY` waits for older transactions: `GetCurrentVirtualXIDs`
/// from the process array, then `VirtualXactLock` on each (cancellable, bounded by
/// `lock_timeout`, seen by the deadlock detector). `destroy_data_key` calls it before it takes
/// any lock: a transaction that began before the version was retired may hold values under it
/// that it has not inserted yet (computed for a sort, in PL/pgSQL variables: it may not even
/// have an xid) and commit them later; transactions that begin after the retirement can only
/// write under a newer version. (Review 38 saw rows committed after the destroyer's check;
/// review 39 saw the first version of this wait, over `pg_stat_activity.backend_xid`, miss
/// writers without an xid and read a list that the transaction had cached.)
pub fn wait_for_running_transactions() {
    // SAFETY: the process array is read under its lock by PostgreSQL; the array returned is
    // palloc'd in the current memory context; each wait goes through pgrx's guard.
    unsafe {
        let mut n: std::ffi::c_int = 0;
        let vxids = pg_sys::GetCurrentVirtualXIDs(
            pg_sys::InvalidTransactionId,
            false,
            false,
            (pg_sys::PROC_IN_VACUUM | pg_sys::PROC_IS_AUTOVACUUM) as std::ffi::c_int,
            &mut n,
        );
        for i in 0..n.max(0) as usize {
            pg_sys::VirtualXactLock(*vxids.add(i), true);
        }
        if !vxids.is_null() {
            pg_sys::pfree(vxids.cast());
        }
    }
}

/// Every data key version of a tenant that has a key (active, retired, disabled), for a tenant
/// key rotation, read under a fresh snapshot after the caller locked the tenant.
pub fn wrapped_data_keys(tenant_id: u32) -> Result<Vec<WrappedDek>> {
    wrapped_keys(c"SELECT version, wrapped_key FROM envelope.data_keys WHERE tenant_id = $1 AND wrapped_key IS NOT NULL ORDER BY version", tenant_id)
}

/// The (version, wrapped key) rows `sql` selects for `tenant_id`.
fn wrapped_keys(sql: &std::ffi::CStr, tenant_id: u32) -> Result<Vec<WrappedDek>> {
    as_extension_owner(|| {
        Spi::connect(|_client| {
            select_latest(sql, &[Arg::Int4(tenant_id as i32)], |r| {
                Ok(WrappedDek {
                    version: r.get::<i32>(1).ok_or_else(|| missing("version"))? as u32,
                    wrapped: r.get::<Vec<u8>>(2).ok_or_else(|| missing("wrapped_key"))?,
                })
            })
        })
    })
}

/// Stores a rotated tenant key: the new wrapped tenant key and check value, the next key
/// generation, and every data key re-wrapped under it. One transaction with the caller's.
pub fn store_rotated_tenant_key(
    tenant_id: u32,
    wrapped_kek: &[u8],
    key_check: &[u8],
    root_version: Option<&str>,
    deks: &[WrappedDek],
    index_keys: &[WrappedDek],
) -> Result<i32> {
    as_extension_owner(|| {
        Spi::connect_mut(|client| {
            let g = client
                .update(
                    "UPDATE envelope.tenants SET wrapped_key = $2, key_check = $3, key_generation = key_generation + 1,
                            key_rotated_at = now(), root_version = $4, wrapped_at = now()
                      WHERE id = $1 RETURNING key_generation",
                    None,
                    &[(tenant_id as i32).into(), wrapped_kek.into(), key_check.into(), root_version.into()],
                )
                .map_err(spi_err)?;
            let generation = g.first().get::<i32>(1).map_err(spi_err)?.ok_or_else(|| missing("key_generation"))?;
            // Every key re-wrapped must be stored, or the tenant key's rotation would strand it
            // under the old tenant key. The keys were read under a fresh snapshot (after the
            // tenant's lock); these UPDATEs run under the transaction's. Under REPEATABLE READ
            // or SERIALIZABLE a key committed after the transaction began (a first blind-index
            // key, typically) is read but invisible here: the UPDATE matches no row, and the
            // rotation stops with a serialization failure instead (review 36 saw such a tenant
            // left unreadable: "blind-index key version 1 does not unwrap").
            let stranded = || EnvelopeError::BadRequest {
                code: PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                message: "pg_envelope: the tenant's keys changed after this transaction's snapshot was taken; its tenant key was not rotated".into(),
                hint: Some("Retry the transaction (or rotate under READ COMMITTED).".into()),
            };
            for d in deks {
                let n = client
                    .update(
                        "UPDATE envelope.data_keys SET wrapped_key = $3 WHERE tenant_id = $1 AND version = $2",
                        None,
                        &[(tenant_id as i32).into(), (d.version as i32).into(), d.wrapped.as_slice().into()],
                    )
                    .map_err(spi_err)?
                    .len();
                if n != 1 {
                    return Err(stranded());
                }
            }
            for k in index_keys {
                let n = client
                    .update(
                        "UPDATE envelope.index_keys SET wrapped_key = $3 WHERE tenant_id = $1 AND version = $2",
                        None,
                        &[(tenant_id as i32).into(), (k.version as i32).into(), k.wrapped.as_slice().into()],
                    )
                    .map_err(spi_err)?
                    .len();
                if n != 1 {
                    return Err(stranded());
                }
            }
            Ok(generation)
        })
    })
}

/// Stores a tenant key re-wrapped under a newer root key version (the tenant key itself, and so
/// its check value, is unchanged).
pub fn store_rewrapped_tenant_key(tenant_id: u32, wrapped_kek: &[u8], root_version: Option<&str>) -> Result<()> {
    as_extension_owner(|| {
        Spi::connect_mut(|client| {
            client
                .update(
                    "UPDATE envelope.tenants SET wrapped_key = $2, root_version = $3, wrapped_at = clock_timestamp() WHERE id = $1",
                    None,
                    &[(tenant_id as i32).into(), wrapped_kek.into(), root_version.into()],
                )
                .map_err(spi_err)?;
            Ok(())
        })
    })
}

/// An open (running) rewrap job of a provider, if any.
pub fn open_rewrap_job(provider: &str) -> Result<Option<i64>> {
    as_extension_owner(|| {
        optional_one::<i64>("SELECT id FROM envelope.rewrap_jobs WHERE provider = $1 AND state = 'running'", &[provider.into()])
    })
}

/// Opens a rewrap job: the provider's newest root version (when it reports one) and how many
/// tenants are due. Two callers starting a job of one provider at once get the same job: the
/// second one's insert waits for the first (the unique index `rewrap_jobs_one_open`), then
/// takes the job the first one opened. Under REPEATABLE READ / SERIALIZABLE a job committed
/// after the caller's snapshot is a serialization failure (40001), as PostgreSQL reports for
/// `ON CONFLICT` then.
pub fn insert_rewrap_job(provider: &str, target: Option<&str>, only_outdated: bool) -> Result<i64> {
    // A job that finished between the conflict and the re-read: open a new one (bounded).
    for _ in 0..3 {
        let inserted = as_extension_owner(|| {
            inserted_id(
                "INSERT INTO envelope.rewrap_jobs (provider, target_version, only_outdated, state, tenants_total, started_at)
                 SELECT $1, $2, $3, 'running', count(*), clock_timestamp() FROM envelope.tenants t
                  WHERE t.provider = $1 AND t.shredded_at IS NULL AND (NOT $3 OR t.root_version IS DISTINCT FROM $2)
                 ON CONFLICT (provider) WHERE state = 'running' DO NOTHING
                 RETURNING id",
                &[provider.into(), target.into(), only_outdated.into()],
            )
        })?;
        if let Some(job) = inserted {
            return Ok(job);
        }
        if let Some(job) = open_rewrap_job(provider)? {
            return Ok(job);
        }
    }
    Err(EnvelopeError::BadRequest {
        code: PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
        message: "pg_envelope: rewrap jobs of this provider were opened and finished concurrently".into(),
        hint: Some("Run CALL envelope.rewrap_tenants again.".into()),
    })
}

/// A rewrap job, locked for one batch.
pub struct RewrapJob {
    pub provider: String,
    pub target_version: Option<String>,
    pub state: String,
    job: i64,
}

pub fn lock_rewrap_job(job: i64) -> Result<Option<RewrapJob>> {
    as_extension_owner(|| {
        Spi::connect_mut(|client| {
            let t = client
                .update(
                    "SELECT provider, target_version, only_outdated, state FROM envelope.rewrap_jobs WHERE id = $1 FOR UPDATE",
                    Some(1),
                    &[job.into()],
                )
                .map_err(spi_err)?;
            if t.is_empty() {
                return Ok(None);
            }
            let r = t.first();
            Ok(Some(RewrapJob {
                provider: r.get::<String>(1).map_err(spi_err)?.ok_or_else(|| missing("provider"))?,
                target_version: r.get::<String>(2).map_err(spi_err)?,
                state: r.get::<String>(4).map_err(spi_err)?.ok_or_else(|| missing("state"))?,
                job,
            }))
        })
    })
}

/// A tenant due for a rewrap, locked (`FOR UPDATE`: a concurrent rotation of it waits).
pub struct DueTenant {
    pub id: u32,
    pub name: String,
    pub wrapped_key: Vec<u8>,
    pub key_check: Vec<u8>,
}

/// The next tenants of the job's provider not re-wrapped since the job started (and, for
/// providers that tell root versions apart, not already under the target version).
pub fn lock_tenants_due_for_rewrap(j: &RewrapJob, batch: i32) -> Result<Vec<DueTenant>> {
    as_extension_owner(|| {
        Spi::connect_mut(|client| {
            let t = client
                .update(
                    "SELECT t.id, t.name, t.wrapped_key, t.key_check FROM envelope.tenants t, envelope.rewrap_jobs j
                      WHERE j.id = $1 AND t.provider = j.provider AND t.shredded_at IS NULL
                        AND coalesce(t.wrapped_at, '-infinity') < j.started_at
                        AND (NOT j.only_outdated OR t.root_version IS DISTINCT FROM j.target_version)
                      ORDER BY t.id LIMIT $2 FOR UPDATE OF t",
                    None,
                    &[j.job.into(), batch.into()],
                )
                .map_err(spi_err)?;
            let mut out = Vec::new();
            for r in t {
                out.push(DueTenant {
                    id: r.get::<i32>(1).map_err(spi_err)?.ok_or_else(|| missing("id"))? as u32,
                    name: r.get::<String>(2).map_err(spi_err)?.ok_or_else(|| missing("name"))?,
                    wrapped_key: r.get::<Vec<u8>>(3).map_err(spi_err)?.ok_or_else(|| missing("wrapped_key"))?,
                    key_check: r.get::<Vec<u8>>(4).map_err(spi_err)?.ok_or_else(|| missing("key_check"))?,
                });
            }
            Ok(out)
        })
    })
}

pub fn advance_rewrap_job(job: i64, n: i32) -> Result<()> {
    as_extension_owner(|| {
        Spi::run_with_args(
            "UPDATE envelope.rewrap_jobs SET tenants_done = tenants_done + $2, updated_at = clock_timestamp() WHERE id = $1",
            &[job.into(), n.into()],
        )
        .map_err(spi_err)
    })
}

pub fn finish_rewrap_job(job: i64) -> Result<()> {
    as_extension_owner(|| {
        Spi::run_with_args(
            "UPDATE envelope.rewrap_jobs SET state = 'done', finished_at = clock_timestamp(), updated_at = clock_timestamp() WHERE id = $1",
            &[job.into()],
        )
        .map_err(spi_err)
    })
}

/// What `reencrypt_open` needs to know of its target, read as the caller.
pub struct ReencryptTarget {
    /// Schema-qualified, quoted.
    pub table: String,
    pub relkind: char,
    /// `Some("bytea")`, `Some("encrypted")` (an encrypted type or a domain over one), another
    /// type's name, or `None` when the column does not exist.
    pub column_kind: Option<String>,
    pub context_column_exists: bool,
    pub can_update: bool,
    pub can_select: bool,
    pub has_children: bool,
    pub rows_per_block: f64,
}

pub fn reencrypt_target(tbl: pg_sys::Oid, col: &str, context_column: Option<&str>) -> Result<Option<ReencryptTarget>> {
    Spi::connect(|client| {
        let t = client
            .select(
                "SELECT format('%I.%I', n.nspname, c.relname), c.relkind::text,
                        (SELECT a.atttypid FROM pg_catalog.pg_attribute a
                          WHERE a.attrelid = c.oid AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped),
                        $3::text IS NOT NULL AND EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                          WHERE a.attrelid = c.oid AND a.attname = $3 AND a.attnum > 0 AND NOT a.attisdropped),
                        CASE WHEN c.relpages > 0 AND c.reltuples > 0 THEN c.reltuples / c.relpages ELSE 100 END::float8,
                        EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i WHERE i.inhparent = c.oid)
                   FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.oid = $1",
                Some(1),
                &[tbl.into(), col.into(), context_column.into()],
            )
            .map_err(spi_err)?;
        if t.is_empty() {
            return Ok(None);
        }
        let r = t.first();
        let table = r.get::<String>(1).map_err(spi_err)?.ok_or_else(|| missing("table"))?;
        let relkind = r.get::<String>(2).map_err(spi_err)?.and_then(|k| k.chars().next()).unwrap_or('?');
        let atttypid = r.get::<pg_sys::Oid>(3).map_err(spi_err)?;
        let context_column_exists = r.get::<bool>(4).map_err(spi_err)?.unwrap_or(false);
        let rows_per_block = r.get::<f64>(5).map_err(spi_err)?.unwrap_or(100.0);
        let has_children = r.get::<bool>(6).map_err(spi_err)?.unwrap_or(false);
        let (column_kind, can_update, can_select) = match atttypid {
            None => (None, false, false),
            Some(typ) => {
                // SAFETY: a type OID from pg_attribute; getBaseType follows domains.
                let base = unsafe { pg_sys::getBaseType(typ) };
                let kind = if base == pg_sys::BYTEAOID {
                    "bytea".to_string()
                } else {
                    let ours = client
                        .select(
                            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_type t
                                 JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_type'::pg_catalog.regclass
                                  AND d.objid = t.oid AND d.deptype = 'e'
                                 JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid AND e.extname = 'pg_envelope'
                                WHERE t.oid = $1 AND t.typname LIKE 'encrypted\\_%'),
                                    pg_catalog.format_type($2, NULL)",
                            Some(1),
                            &[base.into(), typ.into()],
                        )
                        .map_err(spi_err)?;
                    let row = ours.first();
                    if row.get::<bool>(1).map_err(spi_err)?.unwrap_or(false) {
                        "encrypted".to_string()
                    } else {
                        row.get::<String>(2).map_err(spi_err)?.unwrap_or_default()
                    }
                };
                let privs = client
                    .select(
                        "SELECT pg_catalog.has_column_privilege($1, $2, 'UPDATE'), pg_catalog.has_column_privilege($1, $2, 'SELECT')",
                        Some(1),
                        &[tbl.into(), col.into()],
                    )
                    .map_err(spi_err)?;
                let row = privs.first();
                let can_update = row.get::<bool>(1).map_err(spi_err)?.unwrap_or(false);
                let can_select = row.get::<bool>(2).map_err(spi_err)?.unwrap_or(false);
                (Some(kind), can_update, can_select)
            }
        };
        Ok(Some(ReencryptTarget { table, relkind, column_kind, context_column_exists, can_update, can_select, has_children, rows_per_block }))
    })
}

/// An open (queued or running) job of a column.
pub struct OpenJob {
    pub id: i64,
    pub context: Option<String>,
    pub context_column: Option<String>,
    pub next_block: i64,
}

pub fn open_reencrypt_job(tbl: pg_sys::Oid, col: &str) -> Result<Option<OpenJob>> {
    as_extension_owner(|| {
        Spi::connect(|client| {
            let t = client
                .select(
                    "SELECT id, context, context_column::text, next_block FROM envelope.reencrypt_jobs
                      WHERE relid = $1 AND column_name = $2 AND state IN ('queued', 'running')",
                    Some(1),
                    &[tbl.into(), col.into()],
                )
                .map_err(spi_err)?;
            if t.is_empty() {
                return Ok(None);
            }
            let r = t.first();
            Ok(Some(OpenJob {
                id: r.get::<i64>(1).map_err(spi_err)?.ok_or_else(|| missing("id"))?,
                context: r.get::<String>(2).map_err(spi_err)?,
                context_column: r.get::<String>(3).map_err(spi_err)?,
                next_block: r.get::<i64>(4).map_err(spi_err)?.unwrap_or(0),
            }))
        })
    })
}

pub fn set_reencrypt_job_running(job: i64) -> Result<()> {
    as_extension_owner(|| {
        Spi::run_with_args("UPDATE envelope.reencrypt_jobs SET state = 'running' WHERE id = $1 AND state = 'queued'", &[job.into()])
            .map_err(spi_err)
    })
}

pub fn insert_reencrypt_job(
    tbl: pg_sys::Oid,
    table: &str,
    col: &str,
    context: Option<&str>,
    context_column: Option<&str>,
    batch_blocks: i32,
    queued: bool,
) -> Result<Option<i64>> {
    let caller = crate::nothrow::current_user_id();
    // `None`: a job of this column was opened concurrently (the insert waited for it on
    // `reencrypt_jobs_one_open`); the caller takes that one (review 41: 23505 before).
    as_extension_owner(|| {
        inserted_id(
            "INSERT INTO envelope.reencrypt_jobs (relid, table_name, column_name, attnum, context, context_column, state, by_worker, requested_by,
                                                          batch_blocks, blocks_total, started_at)
                     VALUES ($1, $2, $3, (SELECT a.attnum FROM pg_catalog.pg_attribute a WHERE a.attrelid = $1 AND a.attname = $3),
                             $4, $5, CASE WHEN $6 THEN 'queued' ELSE 'running' END, $6, $7, $8,
                             pg_catalog.pg_relation_size($1) / pg_catalog.current_setting('block_size')::bigint, clock_timestamp())
                     ON CONFLICT (relid, column_name) WHERE state IN ('queued', 'running') DO NOTHING
                     RETURNING id",
            &[
                        tbl.into(),
                        table.into(),
                        col.into(),
                        context.into(),
                        context_column.into(),
                        queued.into(),
                        caller.into(),
                        batch_blocks.into(),
                    ],
        )
    })
}

/// A re-encryption job, locked for one batch (`FOR UPDATE`: two sessions running one job take
/// turns, each batch starting where the last committed one ended).
pub struct ReencryptJob {
    pub relid: pg_sys::Oid,
    pub column: String,
    pub context: Option<String>,
    pub context_column: Option<String>,
    pub state: String,
    pub requested_by: pg_sys::Oid,
    pub batch_blocks: i32,
    pub next_block: i64,
    pub values_done: i64,
    pub pass: i32,
    /// The table's size in blocks when the pass started: where the pass ends.
    pub pass_blocks: Option<i64>,
}

pub fn lock_reencrypt_job(job: i64) -> Result<Option<ReencryptJob>> {
    as_extension_owner(|| {
        Spi::connect_mut(|client| {
            let t = client
                .update(
                    "SELECT relid, column_name::text, context, context_column::text, state, requested_by, batch_blocks, next_block, values_done, pass,
                            blocks_total
                       FROM envelope.reencrypt_jobs WHERE id = $1 FOR UPDATE",
                    Some(1),
                    &[job.into()],
                )
                .map_err(spi_err)?;
            if t.is_empty() {
                return Ok(None);
            }
            let r = t.first();
            Ok(Some(ReencryptJob {
                relid: r.get::<pg_sys::Oid>(1).map_err(spi_err)?.ok_or_else(|| missing("relid"))?,
                column: r.get::<String>(2).map_err(spi_err)?.ok_or_else(|| missing("column_name"))?,
                context: r.get::<String>(3).map_err(spi_err)?,
                context_column: r.get::<String>(4).map_err(spi_err)?,
                state: r.get::<String>(5).map_err(spi_err)?.ok_or_else(|| missing("state"))?,
                requested_by: r.get::<pg_sys::Oid>(6).map_err(spi_err)?.ok_or_else(|| missing("requested_by"))?,
                batch_blocks: r.get::<i32>(7).map_err(spi_err)?.unwrap_or(1),
                next_block: r.get::<i64>(8).map_err(spi_err)?.unwrap_or(0),
                values_done: r.get::<i64>(9).map_err(spi_err)?.unwrap_or(0),
                pass: r.get::<i32>(10).map_err(spi_err)?.unwrap_or(1),
                pass_blocks: r.get::<i64>(11).map_err(spi_err)?,
            }))
        })
    })
}

/// The table's schema-qualified, quoted name, or `None` if it was dropped.
pub fn qualified_table(relid: pg_sys::Oid) -> Result<Option<String>> {
    optional_one::<String>(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_catalog.pg_class c
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1 AND c.relkind = 'r'",
        &[relid.into()],
    )
}

/// The first column of the first row, or `None` when there is no row (or it is NULL).
fn optional_one<T: pgrx::FromDatum + pgrx::IntoDatum>(sql: &str, args: &[pgrx::datum::DatumWithOid<'_>]) -> Result<Option<T>> {
    Spi::connect(|client| {
        let t = client.select(sql, Some(1), args).map_err(spi_err)?;
        if t.is_empty() {
            return Ok(None);
        }
        t.first().get::<T>(1).map_err(spi_err)
    })
}

/// The id an `INSERT ... ON CONFLICT DO NOTHING RETURNING id` gave, or `None` when it inserted
/// nothing (the conflicting row was there, or committed while the insert waited for it).
fn inserted_id(sql: &str, args: &[pgrx::datum::DatumWithOid<'_>]) -> Result<Option<i64>> {
    Spi::connect_mut(|client| {
        let t = client.update(sql, Some(1), args).map_err(spi_err)?;
        if t.is_empty() {
            return Ok(None);
        }
        t.first().get::<i64>(1).map_err(spi_err)
    })
}

/// The table's size in blocks now.
pub fn relation_blocks(relid: pg_sys::Oid) -> Result<i64> {
    Spi::get_one_with_args::<i64>(
        "SELECT pg_catalog.pg_relation_size($1) / pg_catalog.current_setting('block_size')::bigint",
        &[relid.into()],
    )
    .map_err(spi_err)
    .map(|n| n.unwrap_or(0))
}

/// Runs `f` as the table's owner inside a security-restricted operation, in a GUC nest level
/// whose settings (search_path pinned to `pg_catalog, pg_temp`, `row_security` off) are undone
/// afterwards, as VACUUM and REINDEX run code of a table: triggers, index expressions,
/// constraints and casts of the table run as its owner, can neither change the session's
/// identity or settings beyond this call nor use tenant keys (the key-administration path that
/// `reencrypt_value` uses never returns plaintext). On an error the aborting transaction
/// restores identity and settings.
pub fn as_table_owner<R>(relid: pg_sys::Oid, f: impl FnOnce() -> Result<R>) -> Result<R> {
    let owner = optional_one::<pg_sys::Oid>("SELECT relowner FROM pg_catalog.pg_class WHERE oid = $1", &[relid.into()])?
        .ok_or_else(|| missing("relowner"))?;
    // SAFETY: plain backend calls; the previous identity is restored below or by abort.
    let (old_user, old_ctx, nest) = unsafe {
        let mut u = pg_sys::InvalidOid;
        let mut c = 0;
        pg_sys::GetUserIdAndSecContext(&mut u, &mut c);
        pg_sys::SetUserIdAndSecContext(
            owner,
            c | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32 | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
        (u, c, pg_sys::NewGUCNestLevel())
    };
    let r = (|| {
        Spi::connect_mut(|client| {
            client
                .update(
                    "SELECT pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true), pg_catalog.set_config('row_security', 'off', true)",
                    None,
                    &[],
                )
                .map_err(spi_err)
                .map(|_| ())
        })?;
        f()
    })();
    unsafe {
        pg_sys::AtEOXact_GUC(false, nest);
        pg_sys::SetUserIdAndSecContext(old_user, old_ctx);
    }
    r
}

/// Runs one batch's UPDATE (see [`as_table_owner`]; with row security off, a table whose
/// policies bind its owner (FORCE ROW LEVEL SECURITY) gets an error, not a partial job). Returns
/// the number of rows updated.
pub fn run_reencrypt_update(relid: pg_sys::Oid, sql: &str, token: i64, context: Option<&str>) -> Result<i64> {
    as_table_owner(relid, || {
        Spi::connect_mut(|client| {
            let t = match context {
                Some(c) => client.update(sql, None, &[token.into(), c.into()]),
                None => client.update(sql, None, &[token.into()]),
            };
            t.map(|t| t.len() as i64).map_err(spi_err)
        })
    })
}

/// Counts what a job has left (headers only), like [`run_reencrypt_update`].
pub fn run_reencrypt_count(relid: pg_sys::Oid, sql: &str, token: i64) -> Result<i64> {
    as_table_owner(relid, || {
        Spi::connect_mut(|client| {
            let t = client.update(sql, Some(1), &[token.into()]).map_err(spi_err)?;
            Ok(t.first().get::<i64>(1).map_err(spi_err)?.unwrap_or(0))
        })
    })
}

/// (header, count) rows of `column_key_versions`' scan (`envelope.key_header`: tenant key id
/// << 32 | version, -1 for a value that is not an envelope).
pub fn header_counts(sql: &str) -> Result<Vec<(i64, i64)>> {
    Spi::connect_mut(|client| {
        let t = client.update(sql, None, &[]).map_err(spi_err)?;
        let mut out = Vec::new();
        for r in t {
            out.push((r.get::<i64>(1).map_err(spi_err)?.unwrap_or(-1), r.get::<i64>(2).map_err(spi_err)?.unwrap_or(0)));
        }
        Ok(out)
    })
}

/// Names and states for `column_key_versions`' counts.
pub fn name_versions(counts: Vec<(i64, i64)>) -> Result<Vec<(Option<String>, Option<i32>, Option<i32>, Option<String>, i64)>> {
    as_extension_owner(|| {
        let mut out = Vec::with_capacity(counts.len());
        for (h, n) in counts {
            if h < 0 {
                out.push((None, None, None, Some("not an envelope".to_string()), n));
                continue;
            }
            let (tid, ver) = ((h >> 32) as i32, (h & 0xffff_ffff) as i32);
            let row = Spi::connect(|client| {
                let t = client
                    .select(
                        "SELECT t.name, d.state FROM envelope.tenants t
                           LEFT JOIN envelope.data_keys d ON d.tenant_id = t.id AND d.version = $2 WHERE t.id = $1",
                        Some(1),
                        &[tid.into(), ver.into()],
                    )
                    .map_err(spi_err)?;
                if t.is_empty() {
                    return Ok::<_, EnvelopeError>((None, None));
                }
                let r = t.first();
                Ok((r.get::<String>(1).map_err(spi_err)?, r.get::<String>(2).map_err(spi_err)?))
            })?;
            out.push((row.0, Some(tid), Some(ver), row.1, n));
        }
        Ok(out)
    })
}

/// Records a committed batch (in the batch's own transaction) and returns the rate so far
/// (values/s) and an estimate of the seconds left.
pub fn advance_reencrypt_job(job: i64, next_block: i64, blocks_total: i64, n: i64) -> Result<(f64, Option<f64>)> {
    as_extension_owner(|| {
        Spi::connect_mut(|client| {
            let t = client
                .update(
                    "UPDATE envelope.reencrypt_jobs
                        SET next_block = $2, blocks_total = $3, values_done = values_done + $4, batches = batches + 1,
                            updated_at = clock_timestamp(), state = 'running'
                      WHERE id = $1
                  RETURNING values_done / greatest(extract(epoch FROM clock_timestamp() - started_at), 0.001)::float8,
                            CASE WHEN next_block > 0 THEN extract(epoch FROM clock_timestamp() - started_at)::float8
                                                          * (blocks_total - next_block) / next_block END",
                    None,
                    &[job.into(), next_block.into(), blocks_total.into(), n.into()],
                )
                .map_err(spi_err)?;
            let r = t.first();
            Ok((r.get::<f64>(1).map_err(spi_err)?.unwrap_or(0.0), r.get::<f64>(2).map_err(spi_err)?))
        })
    })
}

pub fn finish_reencrypt_job(job: i64, blocks_total: i64, remaining: i64) -> Result<()> {
    as_extension_owner(|| {
        Spi::run_with_args(
            "UPDATE envelope.reencrypt_jobs SET state = 'done', next_block = $2, blocks_total = $2, values_remaining = $3,
                    finished_at = clock_timestamp(), updated_at = clock_timestamp()
              WHERE id = $1",
            &[job.into(), blocks_total.into(), remaining.into()],
        )
        .map_err(spi_err)
    })
}

/// Starts another pass over the table (values moved behind the cursor by concurrent updates).
pub fn restart_reencrypt_pass(job: i64, blocks_total: i64) -> Result<()> {
    as_extension_owner(|| {
        Spi::run_with_args(
            "UPDATE envelope.reencrypt_jobs SET next_block = 0, pass = pass + 1, blocks_total = $2, updated_at = clock_timestamp() WHERE id = $1",
            &[job.into(), blocks_total.into()],
        )
        .map_err(spi_err)
    })
}

pub fn fail_reencrypt_job(job: i64, why: &str) -> Result<()> {
    as_extension_owner(|| {
        Spi::run_with_args(
            "UPDATE envelope.reencrypt_jobs SET state = 'failed', last_error = $2, finished_at = clock_timestamp(), updated_at = clock_timestamp() WHERE id = $1",
            &[job.into(), why.into()],
        )
        .map_err(spi_err)
    })
}

/// Marks an open job cancelled. Only its owner or a superuser may (like running it).
pub fn cancel_reencrypt_job(job: i64) -> Result<bool> {
    let caller = crate::nothrow::current_user_id();
    let superuser = unsafe { pg_sys::superuser() };
    as_extension_owner(|| {
        Spi::get_one_with_args::<bool>(
            "WITH c AS (UPDATE envelope.reencrypt_jobs SET state = 'cancelled', finished_at = clock_timestamp(), updated_at = clock_timestamp()
                         WHERE id = $1 AND state IN ('queued', 'running') AND (requested_by = $2 OR $3) RETURNING 1)
             SELECT EXISTS (SELECT 1 FROM c)",
            &[job.into(), caller.into(), superuser.into()],
        )
        .map_err(spi_err)
        .map(|b| b.unwrap_or(false))
    })
}

/// The due condition of data key rotation: the active version is at least as old as the
/// tenant's period (its policy row, else the setting, `$1` seconds); a period of 0 never rotates.
fn rotation_due_sql(default_s: i64, one_tenant: bool) -> std::ffi::CString {
    let sql = format!(
        "SELECT t.name FROM envelope.tenants t
           JOIN envelope.data_keys d ON d.tenant_id = t.id AND d.state = 'active'
           LEFT JOIN envelope.rotation_policy p ON p.tenant_id = t.id
          CROSS JOIN LATERAL (SELECT coalesce(p.data_key_rotation_period, make_interval(secs => {default_s})) AS period) x
          WHERE x.period > interval '0' AND now() - d.created_at >= x.period AND t.suspended_at IS NULL {} ORDER BY t.id",
        if one_tenant { "AND t.name = $1" } else { "" }
    );
    std::ffi::CString::new(sql).expect("no NUL in SQL")
}

/// Tenants whose data key rotation is due.
pub fn tenants_due_for_rotation(default_s: i64) -> Result<Vec<String>> {
    let sql = rotation_due_sql(default_s, false);
    as_extension_owner(|| Spi::connect(|_c| select_latest(&sql, &[], |r| r.get::<String>(1).ok_or_else(|| missing("name")))))
}

/// Whether one tenant's rotation is due (under a fresh snapshot).
pub fn tenant_rotation_due(tenant: &str, default_s: i64) -> Result<bool> {
    let sql = rotation_due_sql(default_s, true);
    as_extension_owner(|| {
        Spi::connect(|_c| Ok(!select_latest(&sql, &[Arg::Text(tenant)], |r| r.get::<String>(1).ok_or_else(|| missing("name")))?.is_empty()))
    })
}

/// Providers that wrap at least one tenant: (name, kind, options, has an open rewrap job, the
/// distinct root versions their tenants are wrapped under).
pub type ProviderTenants = (String, String, String, bool, Vec<Option<String>>);

pub fn providers_with_tenants() -> Result<Vec<ProviderTenants>> {
    as_extension_owner(|| {
        Spi::connect(|_c| {
            let rows = select_latest(
                c"SELECT p.name, p.kind, p.options::text,
                         EXISTS (SELECT 1 FROM envelope.rewrap_jobs j WHERE j.provider = p.name AND j.state = 'running'),
                         (SELECT array_agg(DISTINCT coalesce(t.root_version, '')) FROM envelope.tenants t WHERE t.provider = p.name AND t.shredded_at IS NULL)
                    FROM envelope.key_providers p
                   WHERE EXISTS (SELECT 1 FROM envelope.tenants t WHERE t.provider = p.name AND t.shredded_at IS NULL) ORDER BY p.name",
                &[],
                |r| {
                    let versions: Vec<Option<String>> = r.get::<Vec<Option<String>>>(5).unwrap_or_default();
                    Ok((
                        r.get::<String>(1).ok_or_else(|| missing("name"))?,
                        r.get::<String>(2).ok_or_else(|| missing("kind"))?,
                        r.get::<String>(3).ok_or_else(|| missing("options"))?,
                        r.get::<bool>(4).unwrap_or(false),
                        versions.into_iter().map(|v| v.filter(|s| !s.is_empty())).collect(),
                    ))
                },
            )?;
            Ok(rows)
        })
    })
}

/// Re-encryption jobs queued for the worker that are still open: (job, the role it runs as).
pub fn queued_reencrypt_jobs() -> Result<Vec<(i64, pg_sys::Oid)>> {
    as_extension_owner(|| {
        Spi::connect(|_c| {
            select_latest(
                c"SELECT id, requested_by FROM envelope.reencrypt_jobs WHERE by_worker AND state IN ('queued', 'running') ORDER BY id",
                &[],
                |r| Ok((r.get::<i64>(1).ok_or_else(|| missing("id"))?, r.get::<pg_sys::Oid>(2).ok_or_else(|| missing("requested_by"))?)),
            )
        })
    })
}

/// Whether pg_envelope is installed in this database (the worker's database may lack it).
pub fn extension_installed() -> bool {
    // SAFETY: a catalog lookup by name in a transaction; missing_ok, so no error.
    unsafe { pg_sys::get_extension_oid(c"pg_envelope".as_ptr(), true) != pg_sys::InvalidOid }
}

/// Whether `role` may still run a job on the column: UPDATE on it and EXECUTE on
/// `envelope.reencrypt_batch` (the key-administrator privilege). A dropped role may not.
pub fn role_may_run_job(role: pg_sys::Oid, relid: pg_sys::Oid, col: &str) -> Result<bool> {
    Ok(optional_one::<bool>(
        "SELECT pg_catalog.has_column_privilege($1, $2, $3, 'UPDATE')
            AND pg_catalog.has_function_privilege($1, 'envelope.reencrypt_batch(bigint)', 'EXECUTE')
           FROM pg_catalog.pg_roles WHERE oid = $1",
        &[role.into(), relid.into(), col.into()],
    )?
    .unwrap_or(false))
}

/// Whether this still-uncommitted transaction created a data key version of the tenant (it
/// rotated the tenant and has not committed yet).
pub fn rotated_in_this_transaction(tenant_id: u32) -> Result<bool> {
    as_extension_owner(|| {
        Spi::connect(|_c| {
            let rows = select_latest(
                c"SELECT xmin::text FROM envelope.data_keys WHERE tenant_id = $1 AND created_at = now()",
                &[Arg::Int4(tenant_id as i32)],
                |r| Ok(r.get::<String>(1).and_then(|x| x.parse::<u32>().ok()).unwrap_or(0)),
            )?;
            // SAFETY: a plain check of the current transaction's xids.
            Ok(rows.into_iter().any(|x| x != 0 && unsafe { pg_sys::TransactionIdIsCurrentTransactionId(x.into()) }))
        })
    })
}

/// Suspends (`Some(reason)`) or resumes (`None`) a tenant. Returns whether its state changed.
pub fn set_suspension(tenant_id: u32, reason: Option<&str>) -> Result<bool> {
    let who = current_role_name();
    as_extension_owner(|| {
        Spi::connect_mut(|client| {
            let t = match reason {
                Some(r) => client.update(
                    // A suspension that schedule_shred made is taken over (recorded, with its reason),
                    // so that cancel_shred does not lift it: it is no longer the shred's own.
                    "UPDATE envelope.tenants SET suspended_at = now(), suspended_reason = $2, suspended_by = $3,
                            shred_resumes = CASE WHEN shred_after IS NOT NULL THEN false END
                      WHERE id = $1 AND shredded_at IS NULL
                        AND (suspended_at IS NULL OR (shred_after IS NOT NULL AND shred_resumes)) RETURNING 1",
                    None,
                    &[(tenant_id as i32).into(), r.into(), who.as_str().into()],
                ),
                None => client.update(
                    "UPDATE envelope.tenants SET suspended_at = NULL, suspended_reason = NULL, suspended_by = NULL
                      WHERE id = $1 AND suspended_at IS NOT NULL RETURNING 1",
                    None,
                    &[(tenant_id as i32).into()],
                ),
            }
            .map_err(spi_err)?;
            Ok(!t.is_empty())
        })
    })
}

/// The current role's name (for records of who did what).
pub fn current_role_name() -> String {
    crate::backend::role_name(crate::nothrow::current_user_id())
}

/// Suspended tenants: (name, since, reason), for status().
pub fn suspended_tenants() -> Result<Vec<(String, String, String)>> {
    as_extension_owner(|| {
        Spi::connect(|client| {
            let t = client
                .select(
                    "SELECT name, suspended_at::text, suspended_reason FROM envelope.tenants
                      WHERE suspended_at IS NOT NULL AND shredded_at IS NULL ORDER BY name",
                    None,
                    &[],
                )
                .map_err(spi_err)?;
            let mut out = Vec::new();
            for r in t {
                out.push((
                    r.get::<String>(1).map_err(spi_err)?.unwrap_or_default(),
                    r.get::<String>(2).map_err(spi_err)?.unwrap_or_default(),
                    r.get::<String>(3).map_err(spi_err)?.unwrap_or_default(),
                ));
            }
            Ok(out)
        })
    })
}

/// Scheduled and done shreds: (name, state, destroy after, root key destruction), for status().
pub fn shred_states() -> Result<Vec<(String, String, String, Option<String>)>> {
    as_extension_owner(|| {
        Spi::connect(|client| {
            let t = client
                .select(
                    "SELECT name, CASE WHEN shredded_at IS NULL THEN 'scheduled' ELSE 'shredded' END, shred_after::text,
                            CASE WHEN kms_destruction = 'pending' THEN 'pending: ' || coalesce(kms_last_error, 'not tried yet') ELSE kms_destruction END
                       FROM envelope.tenants WHERE shred_after IS NOT NULL ORDER BY name",
                    None,
                    &[],
                )
                .map_err(spi_err)?;
            let mut out = Vec::new();
            for r in t {
                out.push((
                    r.get::<String>(1).map_err(spi_err)?.unwrap_or_default(),
                    r.get::<String>(2).map_err(spi_err)?.unwrap_or_default(),
                    r.get::<String>(3).map_err(spi_err)?.unwrap_or_default(),
                    r.get::<String>(4).map_err(spi_err)?,
                ));
            }
            Ok(out)
        })
    })
}

/// The live (not destroyed) blind-index keys of a tenant, wrapped (a tenant key rotation
/// re-wraps them).
pub fn wrapped_index_keys(tenant_id: u32) -> Result<Vec<WrappedDek>> {
    wrapped_keys(c"SELECT version, wrapped_key FROM envelope.index_keys WHERE tenant_id = $1 AND wrapped_key IS NOT NULL ORDER BY version", tenant_id)
}

/// The next blind-index key version of a tenant (1 for a tenant without any).
pub fn next_index_key_version(tenant_id: u32) -> Result<u32> {
    as_extension_owner(|| {
        optional_one::<i32>("SELECT coalesce(max(version), 0) + 1 FROM envelope.index_keys WHERE tenant_id = $1", &[(tenant_id as i32).into()])
            .map(|v| v.unwrap_or(1) as u32)
    })
}

/// Stores a new active blind-index key version; the active one becomes retired.
pub fn activate_index_key(tenant_id: u32, version: u32, wrapped: &[u8]) -> Result<()> {
    as_extension_owner(|| {
        Spi::connect_mut(|client| {
            client
                .update("UPDATE envelope.index_keys SET state = 'retired' WHERE tenant_id = $1 AND state = 'active'", None, &[(tenant_id as i32).into()])
                .map_err(spi_err)?;
            client
                .update(
                    "INSERT INTO envelope.index_keys (tenant_id, version, wrapped_key, state) VALUES ($1, $2, $3, 'active')",
                    None,
                    &[(tenant_id as i32).into(), (version as i32).into(), wrapped.into()],
                )
                .map_err(spi_err)?;
            Ok(())
        })
    })
}

/// The state of a blind-index key version (`None`: no such version).
pub fn index_key_state(tenant_id: u32, version: i32) -> Result<Option<String>> {
    as_extension_owner(|| {
        optional_one::<String>(
            "SELECT state FROM envelope.index_keys WHERE tenant_id = $1 AND version = $2",
            &[(tenant_id as i32).into(), version.into()],
        )
    })
}

/// Erases a blind-index key version (state `destroyed`, wrapped key NULL).
pub fn destroy_index_key(tenant_id: u32, version: i32) -> Result<()> {
    as_extension_owner(|| {
        Spi::run_with_args(
            "UPDATE envelope.index_keys SET state = 'destroyed', wrapped_key = NULL WHERE tenant_id = $1 AND version = $2",
            &[(tenant_id as i32).into(), version.into()],
        )
        .map_err(spi_err)
    })
}

/// A declared purpose's normalisation (`None`: not declared).
pub fn purpose_normalization(purpose: &str) -> Result<Option<String>> {
    as_extension_owner(|| optional_one::<String>("SELECT normalization FROM envelope.blind_index_purposes WHERE name = $1", &[purpose.into()]))
}

pub fn insert_purpose(purpose: &str, normalization: &str) -> Result<()> {
    as_extension_owner(|| {
        Spi::run_with_args(
            "INSERT INTO envelope.blind_index_purposes (name, normalization) VALUES ($1, $2)",
            &[purpose.into(), normalization.into()],
        )
        .map_err(spi_err)
    })
}
