//! Blind indexes: equality search on encrypted columns (sql/search.sql; the terms, keys and
//! normalisation in crates/core/src/search.rs).
//!
//! * The type `envelope.blind_index`: 21 bytes (format, index key version, 128-bit tag), text
//!   form `bi1:v<version>:<hex>`, binary form the bytes; byte comparisons (LEAKPROOF) and hashes
//!   for the default B-tree and hash operator classes.
//! * `envelope.blind_index(purpose, value)`: the term of a value under the session tenant's
//!   active index key, after the same tenant and grant checks as decryption;
//!   `blind_index_all(...)`: the terms under every live index key version (a re-index).
//! * Key administration: `declare_blind_index` (a purpose and its normalisation),
//!   `rotate_index_key`, `retire_index_key`, `destroy_index_key`, and `blind_index_backfill`.

use std::ffi::CStr;

use pg_envelope_core::search::{Normalization, Term, Value, TERM_LEN};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

use crate::backend;
use crate::catalog;
use crate::error::{EnvelopeError, OrRaise, OrRaiseAudited, Result};
use crate::types::v1_function;

fn bad(code: PgSqlErrorCode, message: String, hint: Option<String>) -> EnvelopeError {
    EnvelopeError::BadRequest { code, message, hint }
}

fn search_error(e: pg_envelope_core::search::SearchError) -> EnvelopeError {
    // The core's messages never contain the value.
    bad(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("pg_envelope: {e}"), None)
}

// ---- the type ------------------------------------------------------------------------------

/// The 21 bytes of a `blind_index` argument (a fixed-length, pass-by-reference type).
unsafe fn arg_term<'a>(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> &'a [u8; TERM_LEN] {
    unsafe { &*(pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, n).cast_mut_ptr::<[u8; TERM_LEN]>()) }
}

fn palloc_term(t: &Term) -> pg_sys::Datum {
    unsafe {
        // Without pgrx's guard (see nothrow::palloc0: no error path).
        let p = crate::nothrow::palloc0(TERM_LEN) as *mut u8;
        std::ptr::copy_nonoverlapping(t.to_bytes().as_ptr(), p, TERM_LEN);
        pg_sys::Datum::from(p)
    }
}

fn invalid_term() -> EnvelopeError {
    bad(
        PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
        "pg_envelope: input is not a blind-index term".into(),
        Some("Terms are made by envelope.blind_index(purpose, value); their text form is bi1:v<version>:<32 hex digits>. The input is not shown: it may be a plaintext.".into()),
    )
}

v1_function!(pg_finfo_pge_blind_index_in, pge_blind_index_in, term_in);
unsafe fn term_in(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let s = unsafe { CStr::from_ptr(pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, 0).cast_mut_ptr::<std::ffi::c_char>()) };
    let t = s.to_str().ok().and_then(|s| Term::from_text(s).ok()).ok_or_else(invalid_term).or_raise();
    palloc_term(&t)
}

v1_function!(pg_finfo_pge_blind_index_out, pge_blind_index_out, term_out);
unsafe fn term_out(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let t = Term::from_bytes(unsafe { arg_term(fcinfo, 0) }).map_err(|_| invalid_term()).or_raise();
    let s = std::ffi::CString::new(t.to_text()).expect("no NUL in a term's text");
    unsafe { pg_sys::Datum::from(pg_sys::pstrdup(s.as_ptr())) }
}

v1_function!(pg_finfo_pge_blind_index_recv, pge_blind_index_recv, term_recv);
unsafe fn term_recv(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    unsafe {
        let buf = pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, 0).cast_mut_ptr::<pg_sys::StringInfoData>();
        let left = ((*buf).len - (*buf).cursor) as usize;
        let bytes = std::slice::from_raw_parts(((*buf).data as *const u8).add((*buf).cursor as usize), left);
        let t = Term::from_bytes(bytes).map_err(|_| invalid_term()).or_raise();
        (*buf).cursor = (*buf).len;
        palloc_term(&t)
    }
}

v1_function!(pg_finfo_pge_blind_index_send, pge_blind_index_send, term_send);
unsafe fn term_send(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    unsafe {
        let b = arg_term(fcinfo, 0);
        let p = pg_sys::palloc(TERM_LEN + pg_sys::VARHDRSZ) as *mut pg_sys::varlena;
        pgrx::set_varsize_4b(p, (TERM_LEN + pg_sys::VARHDRSZ) as i32);
        std::ptr::copy_nonoverlapping(b.as_ptr(), pgrx::vardata_4b(p) as *mut u8, TERM_LEN);
        pg_sys::Datum::from(p)
    }
}

macro_rules! term_compare {
    ($finfo:ident, $name:ident, $imp:ident, $op:expr) => {
        v1_function!($finfo, $name, $imp);
        unsafe fn $imp(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
            let (a, b) = unsafe { (arg_term(fcinfo, 0), arg_term(fcinfo, 1)) };
            let f: fn(std::cmp::Ordering) -> bool = $op;
            pg_sys::Datum::from(f(a.cmp(b)))
        }
    };
}
term_compare!(pg_finfo_pge_blind_index_eq, pge_blind_index_eq, term_eq, |o| o.is_eq());
term_compare!(pg_finfo_pge_blind_index_ne, pge_blind_index_ne, term_ne, |o| o.is_ne());
term_compare!(pg_finfo_pge_blind_index_lt, pge_blind_index_lt, term_lt, |o| o.is_lt());
term_compare!(pg_finfo_pge_blind_index_le, pge_blind_index_le, term_le, |o| o.is_le());
term_compare!(pg_finfo_pge_blind_index_gt, pge_blind_index_gt, term_gt, |o| o.is_gt());
term_compare!(pg_finfo_pge_blind_index_ge, pge_blind_index_ge, term_ge, |o| o.is_ge());

v1_function!(pg_finfo_pge_blind_index_cmp, pge_blind_index_cmp, term_cmp);
unsafe fn term_cmp(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let (a, b) = unsafe { (arg_term(fcinfo, 0), arg_term(fcinfo, 1)) };
    pg_sys::Datum::from(a.cmp(b) as i32)
}

/// Hash of a term for hash indexes, hash joins and hash aggregation. The tag is already a
/// uniformly distributed MAC output, so its first 8 bytes serve as the hash (no other hash is
/// needed); a non-zero seed (hash partitioning) is mixed in with splitmix64's finaliser. With seed
/// 0 the extended hash's low 32 bits are the standard hash, as PostgreSQL requires.
fn term_hash64(t: &[u8; TERM_LEN], seed: u64) -> u64 {
    let h = u64::from_le_bytes(t[5..13].try_into().expect("8 bytes"));
    if seed == 0 {
        return h;
    }
    let mut z = h ^ seed;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

v1_function!(pg_finfo_pge_blind_index_hash, pge_blind_index_hash, term_hash);
unsafe fn term_hash(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let a = unsafe { arg_term(fcinfo, 0) };
    pg_sys::Datum::from(term_hash64(a, 0) as u32 as i32)
}

v1_function!(pg_finfo_pge_blind_index_hash_extended, pge_blind_index_hash_extended, term_hash_extended);
unsafe fn term_hash_extended(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let a = unsafe { arg_term(fcinfo, 0) };
    let seed = unsafe { pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, 1) }.value() as u64;
    pg_sys::Datum::from(term_hash64(a, seed) as i64)
}

// ---- terms ---------------------------------------------------------------------------------

/// A purpose's normalisation, remembered for the call site (fn_extra): purposes cannot be
/// redefined, so a statement never needs to read it twice.
#[repr(C)]
struct PurposeCache {
    len: usize,
    normalization: Normalization,
    /// The value argument's type at this call site (`get_fn_expr_argtype`: fixed per call site).
    value_type: pg_sys::Oid,
    name: [u8; 200],
}

/// The call's purpose and its normalisation if this call site resolved it before (fn_extra).
unsafe fn purpose_cached<'a>(fcinfo: pg_sys::FunctionCallInfo) -> Option<(&'a str, Normalization, pg_sys::Oid)> {
    unsafe {
        let cache = (*(*fcinfo).flinfo).fn_extra as *const PurposeCache;
        let c = cache.as_ref()?;
        let bytes = crate::types::arg_bytes(fcinfo, 0);
        if !pg_envelope_core::text::short_eq(&c.name[..c.len], bytes) {
            return None;
        }
        // SAFETY: the same bytes as the cached name, which was checked to be UTF-8.
        Some((std::str::from_utf8_unchecked(bytes), c.normalization, c.value_type))
    }
}

unsafe fn purpose_of<'a>(fcinfo: pg_sys::FunctionCallInfo) -> Result<(&'a str, Normalization, pg_sys::Oid)> {
    unsafe {
        let bytes = crate::types::arg_bytes(fcinfo, 0);
        let purpose = std::str::from_utf8(bytes)
            .map_err(|_| bad(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "pg_envelope: a purpose is UTF-8 text".into(), None))?;
        let flinfo = (*fcinfo).flinfo;
        let cache = (*flinfo).fn_extra as *mut PurposeCache;
        if let Some(c) = cache.as_ref() {
            if c.name[..c.len] == *bytes {
                return Ok((purpose, c.normalization, c.value_type));
            }
        }
        let value_type = pg_sys::get_fn_expr_argtype(flinfo, 1);
        let n = catalog::purpose_normalization(purpose)?.ok_or_else(|| EnvelopeError::PurposeUnknown { purpose: purpose.to_string() })?;
        let n = Normalization::parse(&n).map_err(search_error)?;
        if bytes.len() <= 200 {
            let c = if cache.is_null() {
                let c = pg_sys::MemoryContextAllocZero((*flinfo).fn_mcxt, std::mem::size_of::<PurposeCache>()) as *mut PurposeCache;
                (*flinfo).fn_extra = c.cast();
                c
            } else {
                cache
            };
            let c = &mut *c;
            c.len = bytes.len();
            c.name[..bytes.len()].copy_from_slice(bytes);
            c.normalization = n;
            c.value_type = value_type;
        }
        Ok((purpose, n, value_type))
    }
}

/// Runs `f` with the second argument as a [`Value`] (by its SQL type).
unsafe fn with_value<R>(fcinfo: pg_sys::FunctionCallInfo, ty: pg_sys::Oid, f: impl FnOnce(&Value<'_>) -> Result<R>) -> Result<R> {
    unsafe {
        let d = pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, 1);
        match ty {
            pg_sys::TEXTOID => {
                let bytes = crate::types::arg_bytes(fcinfo, 1);
                // Terms are of the UTF-8 text, whatever the database encoding. pg_server_to_any
                // returns its input (not NUL-terminated: the varlena's bytes) when nothing needs
                // converting (an empty string, SQL_ASCII, UTF8), else a NUL-terminated palloc'd
                // copy. Found by the adversarial review: reading the input as a C string ran past
                // the value into whatever followed it in memory.
                // SQL_ASCII stores bytes unchecked: they are taken as UTF-8 and checked here
                // (PostgreSQL's own check would quote the offending bytes, which may be
                // plaintext, in its error: found by the adversarial review). Other encodings are
                // converted; a conversion that fails is reported without its bytes too.
                let enc = crate::nothrow::database_encoding();
                let not_text = || bad(PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE, "pg_envelope: the value is not valid text".into(), None);
                let utf8: &[u8] = if bytes.is_empty() || enc == pg_sys::pg_enc::PG_UTF8 as i32 || enc == pg_sys::pg_enc::PG_SQL_ASCII as i32 {
                    bytes
                } else {
                    let (ptr, len) = (bytes.as_ptr(), bytes.len() as i32);
                    let p = pgrx::PgTryBuilder::new(|| Some(pg_sys::pg_server_to_any(ptr.cast(), len, pg_sys::pg_enc::PG_UTF8 as i32)))
                        .catch_others(|_| None)
                        .execute()
                        .ok_or_else(not_text)?;
                    if std::ptr::eq(p.cast::<u8>(), bytes.as_ptr()) {
                        bytes
                    } else {
                        CStr::from_ptr(p).to_bytes()
                    }
                };
                let s = pg_envelope_core::text::utf8_str(utf8).map_err(|_| not_text())?;
                f(&Value::Text(s))
            }
            pg_sys::BYTEAOID => f(&Value::Bytea(crate::types::arg_bytes(fcinfo, 1))),
            pg_sys::INT8OID => f(&Value::Int8(d.value() as i64)),
            pg_sys::DATEOID => f(&Value::Date(d.value() as i32)),
            pg_sys::TIMESTAMPTZOID => f(&Value::Timestamptz(d.value() as i64)),
            pg_sys::TIMESTAMPOID => f(&Value::Timestamp(d.value() as i64)),
            pg_sys::NUMERICOID => {
                let p = pg_sys::OidOutputFunctionCall(pg_sys::Oid::from(1702u32), d);
                f(&Value::Numeric(CStr::from_ptr(p).to_str().unwrap_or("")))
            }
            other => Err(bad(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("pg_envelope: no blind index for values of type oid {}", other.to_u32()),
                None,
            )),
        }
    }
}

/// Where [`terms`] writes: the one term of `blind_index` (by reference: moving a 20-byte term
/// back through the nested `Result`s cost store-forwarding stalls per value), or every live
/// version's term for `blind_index_all`.
enum Terms {
    One(Term),
    Many(Vec<Term>),
}

/// The terms of the call's value for its purpose under the current tenant's active index key
/// (`Terms::Many`: every live version, active first), written into `out`. In order: the tenant
/// setting and the grant (so a role without the grant learns nothing, not even which purposes
/// exist), the purpose, the value, then the keys (suspension, lockdown, TTL) as for decryption.
/// Audited per statement (kind `search`), refusals included.
unsafe fn terms(fcinfo: pg_sys::FunctionCallInfo, out: &mut Terms) -> Result<()> {
    let audited = crate::audit::enabled();
    // Armed: this statement's check passed and a like value was noted (src/audit/mod.rs).
    let armed = audited && crate::audit::begin(crate::audit::Op::Search)?;
    let mut version = 0;
    let current = backend::current_tenant();
    let tenant = current.as_ref().ok().copied();
    let r = current.and_then(|tenant| {
        // A purpose this call site already resolved (after a grant check) needs no lookup; a new
        // one is looked up only after the grant check. The keys' own grant check follows anyway.
        let (purpose, n, ty) = match unsafe { purpose_cached(fcinfo) } {
            Some(p) => p,
            None => {
                backend::with_backend(|b| b.check_grant(tenant, crate::nothrow::current_user_id()))?;
                unsafe { purpose_of(fcinfo) }?
            }
        };
        unsafe {
            with_value(fcinfo, ty, |value| {
                backend::with_backend(|b| {
                    b.with_tenant_keys(tenant, |keys| {
                        let no_key = || EnvelopeError::NoIndexKey { tenant: tenant.to_string() };
                        let term_error = |e| match e {
                            pg_envelope_core::cache::TermError::NoIndexKey { .. } => no_key(),
                            pg_envelope_core::cache::TermError::Search(e) => search_error(e),
                        };
                        match out {
                            // The common case: one term, no allocation.
                            Terms::One(t) => {
                                version = keys.active_index_version();
                                if version == 0 {
                                    return Err(no_key());
                                }
                                keys.term_into(version, purpose, n, value, t).map_err(term_error)
                            }
                            Terms::Many(ts) => {
                                let versions = keys.index_versions();
                                version = versions.first().copied().unwrap_or(0);
                                if version == 0 {
                                    return Err(no_key());
                                }
                                for v in versions {
                                    ts.push(keys.term(v, purpose, n, value).map_err(term_error)?);
                                }
                                Ok(())
                            }
                        }
                    })
                })
            })
        }
    });
    if audited && !crate::audit::finish(crate::audit::Op::Search, armed, tenant, version, r.as_ref().err()) {
        return Err(crate::audit::no_room());
    }
    r
}

v1_function!(pg_finfo_pge_blind_index, pge_blind_index, blind_index_impl);
unsafe fn blind_index_impl(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let mut out = Terms::One(Term { version: 0, tag: [0; pg_envelope_core::search::TAG_LEN] });
    unsafe { terms(fcinfo, &mut out) }.or_raise();
    match &out {
        // Version 0 is no term: only a success that wrote nothing could leave it (none does).
        Terms::One(t) if t.version != 0 => palloc_term(t),
        _ => Err::<pg_sys::Datum, _>(EnvelopeError::Internal("blind_index: no term was computed".into())).or_raise(),
    }
}

v1_function!(pg_finfo_pge_blind_index_all, pge_blind_index_all, blind_index_all_impl);
unsafe fn blind_index_all_impl(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    unsafe {
        let mut out = Terms::Many(Vec::new());
        terms(fcinfo, &mut out).or_raise();
        let ts = match out {
            Terms::One(t) => vec![t],
            Terms::Many(ts) => ts,
        };
        let elem = pg_sys::get_func_rettype((*(*fcinfo).flinfo).fn_oid);
        let elem = pg_sys::get_element_type(elem);
        let mut datums: Vec<pg_sys::Datum> = ts.iter().map(palloc_term).collect();
        let a = pg_sys::construct_array(datums.as_mut_ptr(), datums.len() as i32, elem, TERM_LEN as i32, false, pg_sys::TYPALIGN_CHAR as std::ffi::c_char);
        pg_sys::Datum::from(a)
    }
}

// ---- key administration --------------------------------------------------------------------

/// Declares a purpose (what a term column indexes) and its normalisation: `none`, `nfc`,
/// `nfkc_casefold` (emails, user names) or `digits` (phone numbers, national ids). A purpose
/// cannot be redefined: its terms would stop matching. Key administrators only.
#[pg_extern(volatile, parallel_unsafe)]
fn declare_blind_index(purpose: &str, normalization: default!(&str, "'none'")) {
    declare_impl(purpose, normalization).or_raise_audited("declare_blind_index", "")
}

fn declare_impl(purpose: &str, normalization: &str) -> Result<()> {
    let n = Normalization::parse(normalization).map_err(search_error)?;
    // The purpose's rules (non-empty, at most 200 bytes, no NUL) are the core's.
    pg_envelope_core::search::term_key_info(purpose, n, pg_envelope_core::search::ValueKind::Text).map_err(search_error)?;
    match catalog::purpose_normalization(purpose)? {
        Some(existing) if existing == n.name() => Ok(()),
        Some(existing) => Err(bad(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!("pg_envelope: blind-index purpose \"{purpose}\" is already declared with normalization {existing}"),
            Some("A purpose cannot be redefined (its terms would stop matching): declare a new purpose and re-index with envelope.blind_index_backfill.".into()),
        )),
        None => {
            catalog::insert_purpose(purpose, n.name())?;
            crate::audit::key_op("declare_blind_index", "", &format!("purpose {purpose} normalization {}", n.name()), false);
            Ok(())
        }
    }
}

/// A new index key version for `tenant`, active for new terms at commit; the previous one is
/// retired (still matched by `blind_index_all` until `destroy_index_key`). Returns the version.
/// Key administrators only.
#[pg_extern(volatile, parallel_unsafe)]
fn rotate_index_key(tenant: &str) -> i32 {
    crate::lifecycle::rotate_index_key_impl(tenant).or_raise_audited("rotate_index_key", tenant) as i32
}

/// Destroys a retired index key version (its wrapped key is erased): terms of that version match
/// nothing any more. The active version cannot be destroyed. Key administrators only.
#[pg_extern(volatile, parallel_unsafe)]
fn destroy_index_key(tenant: &str, version: i32) {
    destroy_impl(tenant, version).or_raise_audited("destroy_index_key", tenant)
}

fn destroy_impl(tenant: &str, version: i32) -> Result<()> {
    let t = catalog::lock_tenant(tenant)?.ok_or_else(|| EnvelopeError::TenantUnknown { tenant: tenant.to_string() })?;
    match catalog::index_key_state(t.id, version)?.as_deref() {
        None => Err(bad(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("pg_envelope: tenant \"{tenant}\" has no index key version {version}"),
            None,
        )),
        Some("active") => Err(bad(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("pg_envelope: index key version {version} of tenant \"{tenant}\" is active"),
            Some(format!("Rotate first (SELECT envelope.rotate_index_key('{tenant}')), re-index with envelope.blind_index_backfill, then destroy the old version.")),
        )),
        Some("destroyed") => Ok(()),
        Some(_) => {
            catalog::destroy_index_key(t.id, version)?;
            crate::audit::key_op("destroy_index_key", tenant, &format!("version {version}"), false);
            backend::invalidate_after_commit();
            Ok(())
        }
    }
}

// The version of the index key a term was made with (public: it is in the term's text form).
v1_function!(pg_finfo_pge_blind_index_version, pge_blind_index_version, term_version);
unsafe fn term_version(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let b = unsafe { arg_term(fcinfo, 0) };
    pg_sys::Datum::from(u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as i32)
}

/// The session tenant's active index key version, for a role holding the tenant's grant (the
/// backfill compares terms with it).
#[pg_extern(stable, parallel_restricted)]
fn active_index_version() -> i32 {
    active_index_version_impl().or_raise() as i32
}

fn active_index_version_impl() -> Result<u32> {
    let tenant = backend::current_tenant()?;
    let v = backend::with_backend(|b| b.with_tenant_keys(tenant, |keys| Ok(keys.active_index_version())))?;
    if v == 0 {
        return Err(EnvelopeError::NoIndexKey { tenant: tenant.to_string() });
    }
    Ok(v)
}

/// The session tenant's key id (the `tenant key id` in its values' headers), for a role
/// holding the tenant's grant: which rows of a shared table are the tenant's.
#[pg_extern(stable, parallel_restricted)]
fn current_tenant_key_id() -> i32 {
    let tenant = backend::current_tenant().or_raise();
    backend::with_backend(|b| b.check_grant(tenant, crate::nothrow::current_user_id())).or_raise() as i32
}

/// The warning for a term column whose terms reveal too much by their frequencies (few
/// distinct terms over many rows), or NULL.
#[pg_extern(immutable, parallel_safe, strict)]
fn blind_index_cardinality_warning(distinct_terms: i64, rows: i64) -> Option<String> {
    pg_envelope_core::search::low_cardinality_warning(distinct_terms.max(0) as u64, rows.max(0) as u64)
}

// ---- the trigger ---------------------------------------------------------------------------

fn trigger_misuse(rel: &str, a: &str, b: &str) -> EnvelopeError {
    bad(
        PgSqlErrorCode::ERRCODE_INVALID_OBJECT_DEFINITION,
        format!("pg_envelope: blind_index_trigger on {rel}: needs a stored source column {a}, a term column {b} of type envelope.blind_index, and a trigger without a column list or WHEN clause"),
        None,
    )
}

thread_local! {
    /// Prepared `SELECT envelope.blind_index($1, $2::<source type>)` per source type: the
    /// parser picks the overload (and any implicit cast: varchar, domains, integer) once.
    static TERM_PLANS: std::cell::RefCell<std::collections::HashMap<u32, pg_sys::SPIPlanPtr>> = std::cell::RefCell::new(std::collections::HashMap::new());
}

// `envelope.blind_index_trigger(source, term column, purpose)`: a BEFORE INSERT OR UPDATE row
// trigger that sets the term column to the term of the source column (NULL for NULL), whatever
// the client sent. Refuses (42P17) a term column that is not a `blind_index`, a generated or
// missing source, and a trigger with a column list or WHEN clause. The term is made by
// `envelope.blind_index` itself (same grant, audit and errors), through a plan prepared once
// per source type; the checks read the trigger and the relation from the trigger call, not the
// catalog. (The first version was PL/pgSQL with a dynamic statement and a catalog query per
// row: about 35 µs per row.)
/// Whether two datums of one column are the same bytes as stored (a varlena compared in its
/// stored form, so an unchanged TOAST pointer is equal to itself; no detoasting).
unsafe fn raw_equal(a: pg_sys::Datum, b: pg_sys::Datum, byval: bool, len: i16) -> bool {
    unsafe {
        if byval {
            return a == b;
        }
        let (pa, pb) = (a.cast_mut_ptr::<u8>(), b.cast_mut_ptr::<u8>());
        let n = match len {
            -1 => {
                let (na, nb) = (pgrx::varsize_any(pa.cast()), pgrx::varsize_any(pb.cast()));
                if na != nb {
                    return false;
                }
                na
            }
            -2 => std::ffi::CStr::from_ptr(pa.cast()).to_bytes().len() + 1,
            n => n as usize,
        };
        std::slice::from_raw_parts(pa, n) == std::slice::from_raw_parts(pb, n)
    }
}

v1_function!(pg_finfo_pge_blind_index_trigger, pge_blind_index_trigger, trigger_impl);
unsafe fn trigger_impl(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    unsafe {
        let ctx = (*fcinfo).context;
        if ctx.is_null() || (*ctx).type_ != pg_sys::NodeTag::T_TriggerData {
            bad(PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED, "pg_envelope: blind_index_trigger must be called as a trigger".into(), None).raise();
        }
        let td = ctx as *mut pg_sys::TriggerData;
        let ev = (*td).tg_event;
        let op = ev & pg_sys::TRIGGER_EVENT_OPMASK;
        let trigger = (*td).tg_trigger;
        if ev & pg_sys::TRIGGER_EVENT_TIMINGMASK != pg_sys::TRIGGER_EVENT_BEFORE
            || ev & pg_sys::TRIGGER_EVENT_ROW == 0
            || (op != pg_sys::TRIGGER_EVENT_INSERT && op != pg_sys::TRIGGER_EVENT_UPDATE)
            || (*trigger).tgnargs != 3
        {
            bad(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                "pg_envelope: blind_index_trigger(source column, term column, purpose) must be a BEFORE INSERT OR UPDATE ... FOR EACH ROW trigger".into(),
                None,
            )
            .raise();
        }
        let arg = |i: usize| CStr::from_ptr(*(*trigger).tgargs.add(i));
        let (source, term_col, purpose) = (arg(0), arg(1), arg(2));
        let rel = (*td).tg_relation;
        let desc = (*rel).rd_att;
        let rel_name = || {
            CStr::from_ptr(pg_sys::quote_qualified_identifier(
                pg_sys::get_namespace_name((*(*rel).rd_rel).relnamespace),
                (*(*rel).rd_rel).relname.data.as_ptr(),
            ))
            .to_string_lossy()
            .into_owned()
        };
        let misuse = || trigger_misuse(&rel_name(), &source.to_string_lossy(), &term_col.to_string_lossy()).raise();
        let attrs = pgrx::PgTupleDesc::from_pg_unchecked(desc);
        let src_no = pg_sys::SPI_fnumber(desc, source.as_ptr());
        let term_no = pg_sys::SPI_fnumber(desc, term_col.as_ptr());
        if src_no <= 0 || term_no <= 0 || (*trigger).tgnattr != 0 || !(*trigger).tgqual.is_null() {
            misuse();
        }
        let src = attrs.get(src_no as usize - 1).unwrap_or_else(|| misuse());
        let term = attrs.get(term_no as usize - 1).unwrap_or_else(|| misuse());
        let nsp = pg_sys::get_namespace_oid(c"envelope".as_ptr(), true);
        let term_type = pg_sys::GetSysCacheOid(
            pg_sys::SysCacheIdentifier::TYPENAMENSP as i32,
            pg_sys::Anum_pg_type_oid as pg_sys::AttrNumber,
            pg_sys::Datum::from(c"blind_index".as_ptr()),
            pg_sys::Datum::from(nsp),
            pg_sys::Datum::from(0),
            pg_sys::Datum::from(0),
        );
        if src.attisdropped || src.attgenerated != 0 || term.attisdropped || term.atttypid != term_type || term_type == pg_sys::InvalidOid {
            misuse();
        }
        let tuple = if op == pg_sys::TRIGGER_EVENT_UPDATE { (*td).tg_newtuple } else { (*td).tg_trigtuple };
        // A re-encryption batch's UPDATE of this table changes ciphertext, never plaintext: keep
        // the row's term (the batch has no tenant to compute one with). Only when the source is
        // the column being re-encrypted, or is byte for byte what it was.
        if op == pg_sys::TRIGGER_EVENT_UPDATE {
            if let Some((relid, column)) = crate::reencrypt::batch_target() {
                let old = (*td).tg_trigtuple;
                let unchanged = || {
                    let (mut on, mut nn) = (false, false);
                    let o = pg_sys::heap_getattr(old, src_no, desc, &mut on);
                    let n = pg_sys::heap_getattr(tuple, src_no, desc, &mut nn);
                    on == nn && (on || raw_equal(o, n, src.attbyval, src.attlen))
                };
                if relid == (*rel).rd_id && (source.to_bytes() == column.as_bytes() || unchanged()) {
                    let mut old_null = false;
                    let old_term = pg_sys::heap_getattr(old, term_no, desc, &mut old_null);
                    let mut cols = [term_no];
                    let mut repl = [old_term];
                    let mut repl_null = [old_null];
                    return pg_sys::Datum::from(pg_sys::heap_modify_tuple_by_cols(
                        tuple,
                        desc,
                        1,
                        cols.as_mut_ptr(),
                        repl.as_mut_ptr(),
                        repl_null.as_mut_ptr(),
                    ));
                }
            }
        }
        let mut isnull = false;
        let value = pg_sys::heap_getattr(tuple, src_no, desc, &mut isnull);
        let mut out = [0u8; TERM_LEN];
        let mut term_null = isnull;
        if !isnull {
            // The term, by envelope.blind_index(purpose, value) through SPI.
            let src_type = src.atttypid;
            let purpose_datum = pg_sys::Datum::from(pg_sys::cstring_to_text(purpose.as_ptr()));
            if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
                EnvelopeError::Internal("SPI_connect failed".into()).raise();
            }
            let plan = TERM_PLANS.with(|p| {
                let mut p = p.borrow_mut();
                if let Some(plan) = p.get(&src_type.to_u32()) {
                    return *plan;
                }
                let mut types = [pg_sys::TEXTOID, src_type];
                let plan = pg_sys::SPI_prepare(c"SELECT envelope.blind_index($1, $2)".as_ptr(), 2, types.as_mut_ptr());
                if plan.is_null() {
                    EnvelopeError::Internal("could not prepare the term query".into()).raise();
                }
                pg_sys::SPI_keepplan(plan);
                if p.len() >= 64 {
                    for (_, old) in p.drain() {
                        pg_sys::SPI_freeplan(old);
                    }
                }
                p.insert(src_type.to_u32(), plan);
                plan
            });
            let mut values = [purpose_datum, value];
            let nulls = [b' ' as std::ffi::c_char, b' ' as std::ffi::c_char];
            let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), true, 1);
            if rc != pg_sys::SPI_OK_SELECT as i32 || pg_sys::SPI_processed != 1 {
                EnvelopeError::Internal("the term query returned no row".into()).raise();
            }
            let tt = pg_sys::SPI_tuptable;
            let mut rnull = false;
            let d = pg_sys::SPI_getbinval(*(*tt).vals, (*tt).tupdesc, 1, &mut rnull);
            term_null = rnull;
            if !rnull {
                out.copy_from_slice(std::slice::from_raw_parts(d.cast_mut_ptr::<u8>(), TERM_LEN));
            }
            pg_sys::SPI_finish();
        }
        let mut cols = [term_no];
        let mut repl = [if term_null {
            pg_sys::Datum::from(0)
        } else {
            let p = pg_sys::palloc(TERM_LEN) as *mut u8;
            std::ptr::copy_nonoverlapping(out.as_ptr(), p, TERM_LEN);
            pg_sys::Datum::from(p)
        }];
        let mut repl_null = [term_null];
        let new = pg_sys::heap_modify_tuple_by_cols(tuple, desc, 1, cols.as_mut_ptr(), repl.as_mut_ptr(), repl_null.as_mut_ptr());
        pg_sys::Datum::from(new)
    }
}
