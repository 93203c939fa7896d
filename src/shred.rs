//! Crypto-shredding, SQL glue (sql/shred.sql has the columns, the `shreds` view and
//! `shred_report`).
//!
//! Two steps with a window between them:
//! * `schedule_shred(tenant, delay)`: the tenant is suspended at commit (every backend refuses
//!   its keys at its next call; idle ones drop them at once) and its destruction is due after
//!   `delay` (at least `envelope.shred_min_delay`). `cancel_shred(tenant)` undoes both inside the
//!   window; `confirm_shred(tenant)` records a second login's confirmation, required when
//!   `envelope.shred_requires_confirmation` is on (the two-person rule).
//! * The destruction (`shred_if_due`, run by the maintenance worker and `run_maintenance()`):
//!   the wrapped tenant key, its check value and every wrapped data key are removed; the row
//!   stays as a tombstone (the tenant key id and the name are never reused); every value of the
//!   tenant then fails with 42704 "crypto-shredded". For a tenant whose provider is `dedicated`,
//!   the root key is then destroyed in the key server (`shred_destroy_root_key`, a separate
//!   transaction after the first committed, retried until it succeeds).

use pgrx::prelude::*;

use crate::backend;
use crate::catalog::{self, as_extension_owner, missing, spi_err, Refusal};
use crate::error::{shown, EnvelopeError, OrRaise, Result, OrRaiseAudited};
use crate::gucs;

fn bad(code: pgrx::PgSqlErrorCode, message: String, hint: Option<&str>) -> EnvelopeError {
    EnvelopeError::BadRequest { code, message, hint: hint.map(str::to_string) }
}

fn not_in_state(message: String, hint: Option<&str>) -> EnvelopeError {
    bad(pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, message, hint)
}

/// The authenticated login (not changed by `SET SESSION AUTHORIZATION` or `SET ROLE`) and the
/// role in effect, as recorded: `role` or `role (login x)`.
fn who() -> (pg_sys::Oid, String) {
    let login = unsafe { pg_sys::GetAuthenticatedUserId() };
    let current = crate::nothrow::current_user_id();
    let name = if login == current {
        backend::role_name(current)
    } else {
        format!("{} (login {})", backend::role_name(current), backend::role_name(login))
    };
    (login, name)
}

/// The tenant, locked, refused if it was shredded already.
fn lock_live(tenant: &str, shredded: impl FnOnce(&str) -> EnvelopeError) -> Result<catalog::LockedTenant> {
    let t = catalog::lock_tenant(tenant)?.ok_or_else(|| EnvelopeError::TenantUnknown { tenant: tenant.to_string() })?;
    if let Some(Refusal::Shredded { at }) = &t.refusal {
        return Err(shredded(at));
    }
    Ok(t)
}

/// When the tenant's destruction is scheduled (`shred_after::text`), if it is.
fn scheduled(id: u32) -> Result<Option<String>> {
    as_extension_owner(|| {
        Spi::get_one_with_args::<String>("SELECT to_char(shred_after AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC' FROM envelope.tenants WHERE id = $1", &[(id as i32).into()])
            .map_err(spi_err)
    })
}

/// Suspends the tenant at commit and schedules the destruction of its keys after `delay`.
/// Returns when the destruction becomes due. Key administrators.
#[pg_extern(volatile, parallel_unsafe)]
fn schedule_shred(tenant: &str, delay: default!(Option<pgrx::datum::Interval>, "'7 days'")) -> pgrx::datum::TimestampWithTimeZone {
    schedule_impl(tenant, delay).or_raise_audited("schedule_shred", tenant)
}

fn schedule_impl(tenant: &str, delay: Option<pgrx::datum::Interval>) -> Result<pgrx::datum::TimestampWithTimeZone> {
    let delay = delay.ok_or_else(|| {
        bad(pgrx::PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, "pg_envelope: the shred delay must not be NULL".into(), None)
    })?;
    let t = lock_live(tenant, |at| {
        not_in_state(format!("pg_envelope: tenant \"{}\" was already crypto-shredded on {at}", shown(tenant)), None)
    })?;
    if let Some(after) = scheduled(t.id)? {
        return Err(not_in_state(
            format!("pg_envelope: tenant \"{}\" is already scheduled for crypto-shredding after {after}", shown(tenant)),
            Some("To change the window, cancel_shred() and schedule_shred() again."),
        ));
    }
    let min_s = gucs::shred_min_delay_s();
    let (session, by) = who();
    let after = as_extension_owner(|| {
        Spi::connect_mut(|client| {
            // Compared as the deadline it gives, not as a number of seconds: interval arithmetic
            // on timestamps is calendar arithmetic ('1 year -365 days' is 0 or 1 day from now,
            // while extract(epoch) counts it as 6 hours), and the deadline is what is stored.
            let long_enough = client
                .select(
                    "SELECT now() + $1::interval >= now() + make_interval(secs => $2::float8)",
                    Some(1),
                    &[delay.into(), (min_s as f64).into()],
                )
                .map_err(spi_err)?
                .first()
                .get::<bool>(1)
                .map_err(spi_err)?
                .unwrap_or(false);
            if !long_enough {
                return Err(bad(
                    pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                    format!("pg_envelope: the shred delay must be at least envelope.shred_min_delay ({min_s} s)"),
                    Some("The window is what lets a mistaken shred be cancelled; a superuser may lower envelope.shred_min_delay."),
                ));
            }
            let r = client
                .update(
                    "UPDATE envelope.tenants
                        SET shred_after = now() + $2::interval, shred_scheduled_at = now(), shred_scheduled_by = $3,
                            shred_scheduler = $4, shred_confirmed_by = NULL, shred_resumes = (suspended_at IS NULL),
                            suspended_at = coalesce(suspended_at, now()),
                            suspended_reason = coalesce(suspended_reason, 'scheduled for crypto-shredding'),
                            suspended_by = coalesce(suspended_by, $3)
                      WHERE id = $1 RETURNING shred_after",
                    None,
                    &[(t.id as i32).into(), delay.into(), by.as_str().into(), session.into()],
                )
                .map_err(spi_err)?;
            r.first().get::<pgrx::datum::TimestampWithTimeZone>(1).map_err(spi_err)?.ok_or_else(|| missing("shred_after"))
        })
    })?;
    backend::revoke_after_commit();
    crate::audit::key_op("schedule_shred", tenant, "", false);
    crate::log!("pg_envelope: tenant \"{}\" suspended and scheduled for crypto-shredding by {} (at commit)", shown(tenant), shown(&by));
    Ok(after)
}

/// Undoes `schedule_shred` inside the window: the schedule is dropped and the suspension it
/// made lifted (a suspension that was there before stays). Returns whether a shred was
/// scheduled. Key administrators.
#[pg_extern(volatile, parallel_unsafe)]
fn cancel_shred(tenant: &str) -> bool {
    cancel_impl(tenant).or_raise_audited("cancel_shred", tenant)
}

fn cancel_impl(tenant: &str) -> Result<bool> {
    let t = lock_live(tenant, |at| {
        not_in_state(
            format!("pg_envelope: tenant \"{}\" was crypto-shredded on {at}; a shred cannot be undone", shown(tenant)),
            None,
        )
    })?;
    if scheduled(t.id)?.is_none() {
        return Ok(false);
    }
    as_extension_owner(|| {
        Spi::run_with_args(
            "UPDATE envelope.tenants
                SET suspended_at = CASE WHEN shred_resumes THEN NULL ELSE suspended_at END,
                    suspended_reason = CASE WHEN shred_resumes THEN NULL ELSE suspended_reason END,
                    suspended_by = CASE WHEN shred_resumes THEN NULL ELSE suspended_by END,
                    shred_after = NULL, shred_scheduled_at = NULL, shred_scheduled_by = NULL, shred_scheduler = NULL,
                    shred_confirmed_by = NULL, shred_resumes = NULL
              WHERE id = $1",
            &[(t.id as i32).into()],
        )
        .map_err(spi_err)
    })?;
    backend::invalidate_after_commit();
    crate::audit::key_op("cancel_shred", tenant, "", false);
    crate::log!("pg_envelope: crypto-shredding of tenant \"{}\" cancelled by {} (at commit)", shown(tenant), shown(&who().1));
    Ok(true)
}

/// The second person of the two-person rule: another login than the one that scheduled the
/// shred confirms it. Returns whether this call confirmed it (false: confirmed already).
#[pg_extern(volatile, parallel_unsafe)]
fn confirm_shred(tenant: &str) -> bool {
    confirm_impl(tenant).or_raise_audited("confirm_shred", tenant)
}

fn confirm_impl(tenant: &str) -> Result<bool> {
    let t = lock_live(tenant, |at| not_in_state(format!("pg_envelope: tenant \"{}\" was already crypto-shredded on {at}", shown(tenant)), None))?;
    let (scheduler, confirmed) = as_extension_owner(|| {
        Spi::connect(|client| {
            let r = client
                .select("SELECT shred_scheduler, shred_confirmed_by FROM envelope.tenants WHERE id = $1", Some(1), &[(t.id as i32).into()])
                .map_err(spi_err)?;
            let r = r.first();
            Ok::<_, EnvelopeError>((r.get::<pg_sys::Oid>(1).map_err(spi_err)?, r.get::<String>(2).map_err(spi_err)?))
        })
    })?;
    let Some(scheduler) = scheduler else {
        return Err(not_in_state(format!("pg_envelope: tenant \"{}\" is not scheduled for crypto-shredding", shown(tenant)), None));
    };
    let (session, by) = who();
    if session == scheduler {
        return Err(bad(
            pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "pg_envelope: the login that scheduled a shred cannot confirm it".into(),
            Some("The two-person rule: another key administrator, authenticated as someone else, runs envelope.confirm_shred()."),
        ));
    }
    if confirmed.is_some() {
        return Ok(false);
    }
    as_extension_owner(|| {
        Spi::run_with_args("UPDATE envelope.tenants SET shred_confirmed_by = $2 WHERE id = $1", &[(t.id as i32).into(), by.as_str().into()])
            .map_err(spi_err)
    })?;
    crate::audit::key_op("confirm_shred", tenant, "", false);
    crate::log!("pg_envelope: crypto-shredding of tenant \"{}\" confirmed by {}", shown(tenant), shown(&by));
    Ok(true)
}

/// Maintenance: destroys the tenant's keys if its shred is due (window elapsed, confirmed when
/// the two-person rule is on). Re-checked after locking, so the worker and a concurrent
/// `run_maintenance` shred once. Returns whether it shredded.
#[pg_extern(volatile, parallel_unsafe)]
fn shred_if_due(tenant: &str) -> bool {
    shred_if_due_impl(tenant).or_raise()
}

pub fn shred_if_due_impl(tenant: &str) -> Result<bool> {
    let Some(t) = catalog::lock_tenant(tenant)? else { return Ok(false) };
    if matches!(t.refusal, Some(Refusal::Shredded { .. })) {
        return Ok(false);
    }
    let dedicated = backend::common_options(&t.provider_options).dedicated;
    let (_, by) = who();
    let shredded = as_extension_owner(|| {
        Spi::connect_mut(|client| {
            let r = client
                .update(
                    "UPDATE envelope.tenants
                        SET wrapped_key = NULL, key_check = NULL, shredded_at = now(), shredded_by = $3,
                            kms_destruction = CASE WHEN $4 THEN 'pending' END,
                            shredded_xid = pg_catalog.pg_current_xact_id()::text::bigint
                      WHERE id = $1 AND shredded_at IS NULL AND shred_after <= now()
                        AND (NOT $2 OR shred_confirmed_by IS NOT NULL)
                      RETURNING 1",
                    None,
                    &[(t.id as i32).into(), gucs::shred_requires_confirmation().into(), by.as_str().into(), dedicated.into()],
                )
                .map_err(spi_err)?;
            if r.is_empty() {
                return Ok(false);
            }
            client
                .update(
                    "UPDATE envelope.data_keys SET state = 'destroyed', wrapped_key = NULL, destroyed_at = coalesce(destroyed_at, now())
                      WHERE tenant_id = $1 AND state <> 'destroyed'",
                    None,
                    &[(t.id as i32).into()],
                )
                .map_err(spi_err)?;
            client
                .update(
                    "UPDATE envelope.index_keys SET state = 'destroyed', wrapped_key = NULL WHERE tenant_id = $1 AND state <> 'destroyed'",
                    None,
                    &[(t.id as i32).into()],
                )
                .map_err(spi_err)?;
            client.update("DELETE FROM envelope.rotation_policy WHERE tenant_id = $1", None, &[(t.id as i32).into()]).map_err(spi_err)?;
            Ok::<_, EnvelopeError>(true)
        })
    })?;
    if shredded {
        backend::revoke_after_commit();
        crate::audit::key_op("shred", tenant, if dedicated { "dedicated root key: destroyed next" } else { "shared root key" }, false);
        crate::log!(
            "pg_envelope: tenant \"{}\" crypto-shredded by {} (at commit): its wrapped keys are removed{}",
            shown(tenant),
            shown(&by),
            if dedicated { "; its dedicated root key is destroyed next" } else { "; its root key is shared and stays (see envelope.shred_report)" }
        );
    }
    Ok(shredded)
}

/// Maintenance: destroys the root key of a shredded tenant whose provider is `dedicated`, in
/// the key server. Runs after the shred committed; a failure is recorded (`kms_last_error`,
/// `shred_report`) and retried at the next maintenance run, never raised, so the record stays.
/// Returns what happened, or NULL when nothing was pending.
#[pg_extern(volatile, parallel_unsafe)]
fn shred_destroy_root_key(tenant: &str) -> Option<String> {
    destroy_root_key_impl(tenant).or_raise()
}

pub fn destroy_root_key_impl(tenant: &str) -> Result<Option<String>> {
    let Some(t) = catalog::lock_tenant(tenant)? else { return Ok(None) };
    let pending = as_extension_owner(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT shredded_at IS NOT NULL AND kms_destruction = 'pending' FROM envelope.tenants WHERE id = $1",
            &[(t.id as i32).into()],
        )
        .map_err(spi_err)
    })?;
    if pending != Some(true) {
        return Ok(None);
    }
    let shared = shares_root_key(&t.provider, &t.provider_kind, &t.provider_options, false)?;
    let result = match shared {
        Some(other) => Err(bad(
            pgrx::PgSqlErrorCode::ERRCODE_OBJECT_IN_USE,
            format!("refused: provider \"{other}\" uses the same root key (unregister it or move its tenants first)"),
            None,
        )),
        None => Ok(()),
    }
    .and_then(|_| backend::provider_for(&t.provider, &t.provider_kind, &t.provider_options))
    .and_then(|mut p| {
        crate::stampede::provider_call(&t.provider, move || p.destroy_root_key())
            .and_then(|r| r)
            .map_err(|error| EnvelopeError::Provider { provider: t.provider.clone(), error })
    });
    let (outcome, error) = match &result {
        Ok(done) => (done.clone(), None),
        Err(e) => (format!("pending: {}", e.message()), Some(e.message())),
    };
    as_extension_owner(|| {
        Spi::run_with_args(
            "UPDATE envelope.tenants
                SET kms_destruction = CASE WHEN $2::text IS NULL THEN $3 ELSE kms_destruction END,
                    kms_destroyed_at = CASE WHEN $2::text IS NULL THEN now() ELSE kms_destroyed_at END,
                    kms_last_error = $2
              WHERE id = $1",
            &[(t.id as i32).into(), error.clone().into(), outcome.as_str().into()],
        )
        .map_err(spi_err)
    })?;
    crate::audit::key_op("destroy_root_key", tenant, &outcome, false);
    match error {
        None => crate::log!("pg_envelope: the dedicated root key of shredded tenant \"{}\": {outcome}", shown(tenant)),
        Some(e) => crate::warning!(
            "pg_envelope: the dedicated root key of shredded tenant \"{}\" could not be destroyed (retried at the next maintenance run): {e}",
            shown(tenant)
        ),
    }
    Ok(Some(outcome))
}

/// Maintenance: rewrites `envelope.tenants` and `envelope.data_keys` (CLUSTER) once every
/// transaction older than a shred has ended, so the old row versions that still held the
/// shredded tenant's wrapped keys leave the data files (an UPDATE leaves them in the heap, and
/// VACUUM frees their space without overwriting it). Returns how many shreds it completed (0:
/// none could be yet).
#[pg_extern(volatile, parallel_unsafe)]
fn shred_compact_key_tables() -> i32 {
    compact_impl().or_raise()
}

pub fn compact_impl() -> Result<i32> {
    backend::refuse_prepare();
    // SAFETY: the most conservative horizon (a NULL relation: shared catalogs' rules).
    let horizon = unsafe { pg_sys::GetOldestNonRemovableTransactionId(std::ptr::null_mut()) };
    let pending: Vec<(i32, i64)> = as_extension_owner(|| {
        Spi::connect(|client| {
            let t = client
                .select(
                    "SELECT id, shredded_xid FROM envelope.tenants WHERE shredded_at IS NOT NULL AND keys_compacted_at IS NULL",
                    None,
                    &[],
                )
                .map_err(spi_err)?;
            let mut out = Vec::new();
            for r in t {
                out.push((r.get::<i32>(1).map_err(spi_err)?.unwrap_or(0), r.get::<i64>(2).map_err(spi_err)?.unwrap_or(0)));
            }
            Ok::<_, EnvelopeError>(out)
        })
    })?;
    // Removable once the shredding transaction precedes the horizon (older snapshots could
    // still see the old versions, and CLUSTER keeps what they can see).
    let ready: Vec<i32> = pending
        .into_iter()
        .filter(|(_, xid)| {
            let x = pg_sys::TransactionId::from((*xid as u64 & 0xffff_ffff) as u32);
            *xid != 0 && unsafe { pg_sys::TransactionIdPrecedes(x, horizon) }
        })
        .map(|(id, _)| id)
        .collect();
    if ready.is_empty() {
        return Ok(0);
    }
    as_extension_owner(|| {
        Spi::connect_mut(|client| {
            // The exclusive lock is asked for briefly: a request waiting in the lock queue makes
            // every later key load of the database wait behind it (review 41: a session that
            // kept a read lock on envelope.tenants, a prepared transaction, made cold key loads
            // wait 5 s at every maintenance run). Not granted within 200 ms: the rewrite is
            // tried again at the next run.
            client.update("SET LOCAL lock_timeout = '200ms'", None, &[]).map_err(spi_err)?;
            client.update("LOCK TABLE envelope.tenants, envelope.data_keys IN ACCESS EXCLUSIVE MODE", None, &[]).map_err(spi_err)?;
            client.update("CLUSTER envelope.tenants USING tenants_pkey", None, &[]).map_err(spi_err)?;
            client.update("CLUSTER envelope.data_keys USING data_keys_pkey", None, &[]).map_err(spi_err)?;
            client
                .update("UPDATE envelope.tenants SET keys_compacted_at = now() WHERE id = ANY($1)", None, &[ready.clone().into()])
                .map_err(spi_err)?;
            Ok::<_, EnvelopeError>(())
        })
    })?;
    crate::log!("pg_envelope: the key tables were rewritten: no old row version of {} shredded tenant(s) is left in them", ready.len());
    Ok(ready.len() as i32)
}

/// Whether a shredded tenant's key tables still wait for their rewrite.
pub fn compaction_pending() -> Result<bool> {
    as_extension_owner(|| {
        Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM envelope.tenants WHERE shredded_at IS NOT NULL AND keys_compacted_at IS NULL)")
            .map_err(spi_err)
            .map(|b| b.unwrap_or(false))
    })
}

/// Tenants whose shred is due now (window elapsed; confirmed when the two-person rule is on).
pub fn shreds_due() -> Result<Vec<String>> {
    names(
        "SELECT name FROM envelope.tenants
          WHERE shredded_at IS NULL AND shred_after <= now() AND (NOT $1 OR shred_confirmed_by IS NOT NULL) ORDER BY id",
        gucs::shred_requires_confirmation(),
    )
}

/// Shredded tenants whose dedicated root key is not destroyed yet.
pub fn root_keys_to_destroy() -> Result<Vec<String>> {
    names("SELECT name FROM envelope.tenants WHERE shredded_at IS NOT NULL AND kms_destruction = 'pending' AND $1 ORDER BY id", true)
}

fn names(sql: &str, arg: bool) -> Result<Vec<String>> {
    as_extension_owner(|| {
        Spi::connect(|client| {
            let t = client.select(sql, None, &[arg.into()]).map_err(spi_err)?;
            let mut out = Vec::new();
            for r in t {
                out.push(r.get::<String>(1).map_err(spi_err)?.ok_or_else(|| missing("name"))?);
            }
            Ok(out)
        })
    })
}

/// A `dedicated` provider serves one tenant: refused when it already has one (shredded tenants
/// count: their tombstone names the provider, and its key is destroyed). Locks the provider row
/// so two concurrent creations cannot both pass.
pub fn check_dedicated_free(provider: &str) -> Result<()> {
    let taken = as_extension_owner(|| {
        Spi::connect_mut(|client| {
            let p = client
                .update("SELECT options::text FROM envelope.key_providers WHERE name = $1 FOR UPDATE", Some(1), &[provider.into()])
                .map_err(spi_err)?;
            if p.is_empty() {
                return Ok(None);
            }
            let options = p.first().get::<String>(1).map_err(spi_err)?.unwrap_or_default();
            if !backend::common_options(&options).dedicated {
                return Ok(None);
            }
            // Under a fresh snapshot, after the provider's lock: under REPEATABLE READ a tenant
            // put on the provider after this transaction's snapshot was taken was invisible,
            // and two tenants ended up on one dedicated provider (review 38), so that shredding
            // one would destroy the other's root key.
            let t = crate::catalog::select_latest(
                c"SELECT name FROM envelope.tenants WHERE provider = $1 ORDER BY id LIMIT 1",
                &[crate::catalog::Arg::Text(provider)],
                |r| Ok(r.get::<String>(1)),
            )?;
            Ok(t.into_iter().next().flatten())
        })
    })?;
    match taken {
        None => Ok(()),
        Some(other) => Err(not_in_state(
            format!("pg_envelope: key provider \"{provider}\" is dedicated to tenant \"{}\"", shown(&other)),
            Some("A dedicated provider's root key belongs to one tenant (shredding it destroys the key): register another provider for this tenant."),
        )),
    }
}

/// The root keys a provider's options name, as comparable strings (`None`: the options do not
/// parse). Transit: server, namespace, mount and key; AWS KMS: region and key id (from an ARN or a
/// bare id; an alias stays an alias) for `key_id` and every `previous_key_ids`; PKCS#11: module,
/// token and key labels; local: the one server-wide key file.
pub fn root_key_identities(kind: &str, options_json: &str) -> Option<Vec<String>> {
    use pg_envelope_core::provider::{aws::AwsKmsOptions, common::CommonOptions, pkcs11::Pkcs11Options, vault::VaultTransitOptions};
    let v: serde_json::Value = serde_json::from_str(options_json).ok()?;
    let (_, own) = CommonOptions::split(&v).ok()?;
    let aws_id = |k: &str| -> String {
        match k.split_once(":key/") {
            Some((_, id)) if k.starts_with("arn:") => id.to_ascii_lowercase(),
            _ => k.to_ascii_lowercase(),
        }
    };
    Some(match kind {
        "local" => vec!["local".to_string()],
        "vault_transit" => {
            let o = VaultTransitOptions::from_json(&own).ok()?;
            vec![format!("vault_transit {} {} {}/{}", o.url.to_ascii_lowercase(), o.namespace.unwrap_or_default(), o.mount, o.key)]
        }
        "aws_kms" => {
            let o = AwsKmsOptions::from_json(&own).ok()?;
            std::iter::once(&o.key_id).chain(o.previous_key_ids.iter()).map(|k| format!("aws_kms {} {}", o.region, aws_id(k))).collect()
        }
        "pkcs11" => {
            let o = Pkcs11Options::from_json(&own).ok()?;
            vec![format!("pkcs11 {} {} {}", o.module.display(), o.token_label, o.key_label)]
        }
        _ => return None,
    })
}

/// A dedicated provider must be the only provider naming its root key (in this database): a
/// shred destroys the key, which must not take another provider's tenants with it. Checked when
/// a provider is registered (either side dedicated) and again before a destruction. Returns the
/// other provider's name, if one shares a root key with `name`.
pub fn shares_root_key(name: &str, kind: &str, options_json: &str, only_if_dedicated: bool) -> Result<Option<String>> {
    let mine = root_key_identities(kind, options_json).unwrap_or_default();
    let dedicated = backend::common_options(options_json).dedicated;
    for (other, other_kind, other_options) in catalog::provider_rows()? {
        if other == name {
            continue;
        }
        if only_if_dedicated && !dedicated && !backend::common_options(&other_options).dedicated {
            continue;
        }
        let theirs = root_key_identities(&other_kind, &other_options).unwrap_or_default();
        if mine.iter().any(|k| theirs.contains(k)) {
            return Ok(Some(other));
        }
    }
    Ok(None)
}

/// Refuses to register a provider that shares a root key with another when either is dedicated,
/// and a dedicated AWS provider that names its key by an alias (an alias can be repointed, so
/// the key it names at a shred is not the key it named before).
pub fn check_new_provider(name: &str, kind: &str, options_json: &str) -> Result<()> {
    let common = backend::common_options(options_json);
    if common.dedicated && kind == "aws_kms" {
        if let Some(ids) = root_key_identities(kind, options_json) {
            if ids.iter().any(|k| k.contains(" alias/")) {
                return Err(bad(
                    pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                    format!("pg_envelope: key provider \"{name}\": a dedicated provider names its KMS keys by key id or ARN, not by alias"),
                    Some("An alias can be pointed at another key: the key a shred would schedule for deletion must be the one that wrapped the tenant."),
                ));
            }
        }
    }
    if let Some(other) = shares_root_key(name, kind, options_json, true)? {
        return Err(bad(
            pgrx::PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!("pg_envelope: key provider \"{name}\" would share its root key with provider \"{other}\", and one of them is dedicated"),
            Some("A dedicated provider's root key is destroyed when its tenant is shredded: no other provider may use it."),
        ));
    }
    Ok(())
}
