//! Key lifecycle, SQL glue: rotation at every level of the key hierarchy, version states, and
//! header-only inspection of stored values.
//!
//! * `rotate_data_key(tenant)`: a new DEK version, active for new writes in every backend at its
//!   next call (the shared epoch); earlier versions stay readable (`retired`).
//! * `rotate_tenant_key(tenant)`: a new tenant key (KEK); every DEK re-wrapped under it, in the
//!   caller's transaction. No stored value changes: DEKs, versions and the header's tenant key id
//!   stay; `tenants.key_check` and `key_generation` change.
//! * `rewrap_tenants_start/_batch(provider)`: the steps of `CALL envelope.rewrap_tenants(provider)`
//!   (sql/lifecycle.sql), which re-wraps every tenant of a provider under the root key's newest
//!   version, through the KMS's re-encrypt primitive where it has one, one committed batch at a
//!   time, resumable.
//! * `disable_data_key` / `enable_data_key` / `destroy_data_key`: the version scope of revocation.
//!
//! Every key change locks the tenant's row (`FOR UPDATE`), so changes of one tenant serialize,
//! reads what it changes under a fresh snapshot, and announces itself at commit (the epoch).
//! Tenant keys are unwrapped on the key-provider thread and never leave it.

use pg_envelope_core::lifecycle::LifecycleError;
use pg_envelope_core::{Envelope, KeyContext, ProviderError};
use pgrx::prelude::*;

use crate::backend;
use crate::catalog;
use crate::error::{EnvelopeError, OrRaiseAudited, Result};

/// The data key version a stored value was encrypted with, read from its header: no key, no
/// grant, nothing decrypted. An input that is not a pg_envelope value is an error (22P02).
#[pg_extern(immutable, parallel_safe, strict)]
fn key_version(value: &[u8]) -> i32 {
    match Envelope::parse(value) {
        // Versions are 1..=i32::MAX (envelope.data_keys); anything else was never written by us.
        Ok(env) if env.dek_version >= 1 && env.dek_version <= i32::MAX as u32 => env.dek_version as i32,
        _ => EnvelopeError::NotAnEnvelope.raise(),
    }
}

/// The tenant key id in a stored value's header (`envelope.tenants.id`): no key, no grant.
#[pg_extern(immutable, parallel_safe, strict)]
fn key_tenant_id(value: &[u8]) -> i32 {
    match Envelope::parse(value) {
        Ok(env) if env.tenant_key_id >= 1 && env.tenant_key_id <= i32::MAX as u32 => env.tenant_key_id as i32,
        _ => EnvelopeError::NotAnEnvelope.raise(),
    }
}

/// Tenant key id and data key version of a stored value in one number (`id << 32 | version`),
/// or -1 for bytes that are not a pg_envelope value: for scans that must not stop at a foreign
/// value (`column_key_versions`, the destroy check). No key, no grant.
#[pg_extern(immutable, parallel_safe, strict)]
fn key_header(value: &[u8]) -> i64 {
    match Envelope::parse(value) {
        Ok(env) if env.tenant_key_id >= 1 && env.tenant_key_id <= i32::MAX as u32 && env.dek_version >= 1 && env.dek_version <= i32::MAX as u32 => {
            ((env.tenant_key_id as i64) << 32) | env.dek_version as i64
        }
        _ => -1,
    }
}

/// Makes a new data key version for `tenant` and returns it. Key administrators only.
#[pg_extern(volatile, parallel_unsafe)]
fn rotate_data_key(tenant: &str) -> i32 {
    rotate_data_key_impl(tenant).or_raise_audited("rotate_data_key", tenant) as i32
}

enum Failure {
    Provider(ProviderError),
    Lifecycle(LifecycleError),
}

fn failure<'a>(tenant: &str, provider: &'a str) -> impl Fn(Failure) -> EnvelopeError + 'a {
    let tenant = tenant.to_string();
    move |f| match f {
        Failure::Provider(error) => EnvelopeError::Provider { provider: provider.to_string(), error },
        Failure::Lifecycle(LifecycleError::KeyCheckMismatch) => {
            EnvelopeError::KeyCheckMismatch { tenant: tenant.clone(), provider: provider.to_string() }
        }
        Failure::Lifecycle(LifecycleError::CorruptDataKey { version }) => EnvelopeError::CorruptKeys {
            tenant: tenant.clone(),
            detail: format!("data key version {version} does not unwrap under its tenant key"),
        },
        Failure::Lifecycle(e) => EnvelopeError::Internal(e.to_string()),
    }
}

/// A suspended tenant's keys are not used for rotations either.
fn refuse_suspended(tenant: &str, t: &catalog::LockedTenant) -> Result<()> {
    match &t.refusal {
        Some(refusal) => Err(refusal.error(tenant)),
        None => Ok(()),
    }
}

pub fn rotate_data_key_impl(tenant: &str) -> Result<u32> {
    new_key_version(tenant, NewKey::Data)
}

/// A new blind-index key version for `tenant` (sql/search.sql), wrapped under the tenant key:
/// active for new terms; the previous active version is retired (still matched by
/// `blind_index_all` until destroyed). One root-key unwrap, in the caller's transaction.
pub fn rotate_index_key_impl(tenant: &str) -> Result<u32> {
    new_key_version(tenant, NewKey::Index)
}

#[derive(Clone, Copy)]
enum NewKey {
    Data,
    Index,
}

/// A new active version of a tenant's data key or blind-index key: one root-key unwrap of the
/// tenant key, a fresh key wrapped under it, stored at commit; recorded in the audit trail.
fn new_key_version(tenant: &str, kind: NewKey) -> Result<u32> {
    let t = catalog::lock_tenant(tenant)?.ok_or_else(|| EnvelopeError::TenantUnknown { tenant: tenant.to_string() })?;
    refuse_suspended(tenant, &t)?;
    let version = match kind {
        NewKey::Data => catalog::next_data_key_version(t.id)?,
        NewKey::Index => catalog::next_index_key_version(t.id)?,
    };
    let mut provider = backend::provider_for(&t.provider, &t.provider_kind, &t.provider_options)?;
    let name = tenant.to_string();
    let (id, wrapped_kek, key_check) = (t.id, t.wrapped_key, t.key_check);
    let wrapped = crate::stampede::provider_call(&t.provider, move || {
        let ctx = KeyContext { tenant: &name, tenant_key_id: id };
        let kek = provider.unwrap_tenant_key(&ctx, &wrapped_kek).map_err(Failure::Provider)?;
        let new = match kind {
            NewKey::Data => pg_envelope_core::lifecycle::new_wrapped_data_key,
            NewKey::Index => pg_envelope_core::lifecycle::new_wrapped_index_key,
        };
        new(&kek, &key_check, &name, id, version).map_err(Failure::Lifecycle)
    })
    .unwrap_or_else(|e| Err(Failure::Provider(e)))
    .map_err(failure(tenant, &t.provider))?;
    let operation = match kind {
        NewKey::Data => {
            catalog::activate_data_key(id, version, &wrapped)?;
            "rotate_data_key"
        }
        NewKey::Index => {
            catalog::activate_index_key(id, version, &wrapped)?;
            "rotate_index_key"
        }
    };
    crate::audit::key_op(operation, tenant, &format!("version {version}"), false);
    backend::invalidate_after_commit();
    Ok(version)
}

/// Makes a new tenant key (KEK) for `tenant` and re-wraps every data key under it, in the
/// caller's transaction: a provider failure or a crash before commit leaves the old keys in
/// place. Returns the tenant key's new generation. Key administrators only.
#[pg_extern(volatile, parallel_unsafe)]
fn rotate_tenant_key(tenant: &str) -> i32 {
    rotate_tenant_key_impl(tenant).or_raise_audited("rotate_tenant_key", tenant)
}

fn rotate_tenant_key_impl(tenant: &str) -> Result<i32> {
    let t = catalog::lock_tenant(tenant)?.ok_or_else(|| EnvelopeError::TenantUnknown { tenant: tenant.to_string() })?;
    refuse_suspended(tenant, &t)?;
    let deks = catalog::wrapped_data_keys(t.id)?;
    let index_keys = catalog::wrapped_index_keys(t.id)?;
    let mut provider = backend::provider_for(&t.provider, &t.provider_kind, &t.provider_options)?;
    let name = tenant.to_string();
    let (id, wrapped_kek, key_check) = (t.id, t.wrapped_key, t.key_check);
    let (wrapped_new, check, rewrapped, rewrapped_index, root_version) = crate::stampede::provider_call(&t.provider, move || {
        let ctx = KeyContext { tenant: &name, tenant_key_id: id };
        let kek = provider.unwrap_tenant_key(&ctx, &wrapped_kek).map_err(Failure::Provider)?;
        let r = pg_envelope_core::lifecycle::rotate_tenant_key(&kek, &key_check, &name, id, &deks).map_err(Failure::Lifecycle)?;
        // The blind-index keys too: the same keys under the new tenant key (terms still match).
        let index = pg_envelope_core::lifecycle::rewrap_index_keys(&kek, &r.new_kek, &name, id, &index_keys).map_err(Failure::Lifecycle)?;
        drop(kek);
        // Wrap the new tenant key, and prove the provider gives it back, before storing anything.
        let wrapped = provider.wrap_tenant_key(&ctx, &r.new_kek).map_err(Failure::Provider)?;
        let back = provider.unwrap_tenant_key(&ctx, &wrapped).map_err(Failure::Provider)?;
        if pg_envelope_core::wrap::tenant_key_check(&back) != r.key_check {
            return Err(Failure::Provider(ProviderError::UnwrapFailed));
        }
        let root_version = provider.root_version_of(&wrapped);
        Ok((wrapped, r.key_check, r.deks, index, root_version))
    })
    .unwrap_or_else(|e| Err(Failure::Provider(e)))
    .map_err(failure(tenant, &t.provider))?;
    let generation = catalog::store_rotated_tenant_key(id, &wrapped_new, &check, root_version.as_deref(), &rewrapped, &rewrapped_index)?;
    crate::audit::key_op("rotate_tenant_key", tenant, &format!("generation {generation}"), false);
    backend::invalidate_after_commit();
    Ok(generation)
}

/// Refuses decryption with one data key version of `tenant`, in every backend at its next call
/// (a distinct error, 55000). Reversible with `enable_data_key`. The active version cannot be
/// disabled. Returns whether the state changed.
#[pg_extern(volatile, parallel_unsafe)]
fn disable_data_key(tenant: &str, version: i32) -> bool {
    change_version_state(tenant, version, VersionChange::Disable, false).or_raise_audited("disable_data_key", tenant)
}

/// Makes a disabled data key version usable again (`retired`). Returns whether it changed.
#[pg_extern(volatile, parallel_unsafe)]
fn enable_data_key(tenant: &str, version: i32) -> bool {
    change_version_state(tenant, version, VersionChange::Enable, false).or_raise_audited("enable_data_key", tenant)
}

/// Removes a disabled data key version for good: its wrapped key is deleted, the row stays as a
/// tombstone (the version number is never reused; values under it fail with "destroyed").
/// Refused while a tracked column still holds values under it, unless `force`.
#[pg_extern(volatile, parallel_unsafe)]
fn destroy_data_key(tenant: &str, version: i32, force: default!(bool, false)) -> bool {
    change_version_state(tenant, version, VersionChange::Destroy, force).or_raise_audited("destroy_data_key", tenant)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum VersionChange {
    Disable,
    Enable,
    Destroy,
}

fn change_version_state(tenant: &str, version: i32, change: VersionChange, force: bool) -> Result<bool> {
    // A destroy checks that no tracked column holds values under the version. Writers that
    // began before the version was retired may still hold such values uncommitted: wait for
    // every transaction running now, before taking any lock of ours (the transactions waited
    // for may be waiting for the tenant's lock, a rotation, and would deadlock with a destroyer
    // holding it: review 39). That covers them only if the version was already retired when
    // the wait began: checked again under the lock below.
    let retired_before_wait = if change == VersionChange::Destroy && !force && version >= 1 {
        let before = catalog::data_key_state_of(tenant, version as u32)?;
        let retired = matches!(before.as_deref(), Some("retired" | "disabled" | "revoked" | "destroyed"));
        if retired {
            // A prepared transaction (two-phase commit) is one of them, and may wait days for
            // its COMMIT PREPARED: refused at once instead of waiting for it (a transaction
            // that prepares while this one waits is waited for, bounded by lock_timeout).
            let prepared = catalog::prepared_transactions_here()?;
            if !prepared.is_empty() {
                return Err(EnvelopeError::BadRequest {
                    code: pgrx::PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
                    message: format!(
                        "pg_envelope: data key version {version} of tenant \"{}\" cannot be checked for values while this database has prepared transactions: {}",
                        crate::error::shown(tenant),
                        crate::error::shown(&prepared.join(", "))
                    ),
                    hint: Some("Their writes are seen only after COMMIT PREPARED: their owner or a superuser finishes them (COMMIT PREPARED or ROLLBACK PREPARED), or pass force => true to destroy anyway.".into()),
                });
            }
            catalog::wait_for_running_transactions();
        }
        retired
    } else {
        true
    };
    let t = catalog::lock_tenant(tenant)?.ok_or_else(|| EnvelopeError::TenantUnknown { tenant: tenant.to_string() })?;
    if let Some(r @ catalog::Refusal::Shredded { .. }) = &t.refusal {
        return Err(r.error(tenant));
    }
    let unknown = || EnvelopeError::DataKeyUnknown { tenant: tenant.to_string(), version: version.max(0) as u32 };
    if version < 1 {
        return Err(unknown());
    }
    let v = version as u32;
    // Until a rotation commits, its transaction writes with the version before it (see
    // catalog::load_tenant); disabling that one in the same transaction would leave only the
    // uncommitted version to write with.
    if change != VersionChange::Enable && catalog::rotated_in_this_transaction(t.id)? {
        return Err(EnvelopeError::BadRequest {
            code: pgrx::PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            message: format!("pg_envelope: tenant \"{}\" was rotated in this transaction", crate::error::shown(tenant)),
            hint: Some("Commit the rotation, then disable or destroy older versions.".into()),
        });
    }
    let state = catalog::data_key_state(t.id, v)?.ok_or_else(unknown)?;
    let wrong = |wanted| EnvelopeError::DataKeyState { tenant: tenant.to_string(), version: v, state: state.clone(), wanted };
    if state == "active" && change != VersionChange::Enable {
        return Err(EnvelopeError::DataKeyActive { tenant: tenant.to_string(), version: v });
    }
    let new_state = match (change, state.as_str()) {
        (VersionChange::Disable, "disabled" | "revoked") => return Ok(false),
        (VersionChange::Disable, "retired") => "disabled",
        (VersionChange::Disable, _) => return Err(wrong("retired")),
        (VersionChange::Enable, "active" | "retired") => return Ok(false),
        (VersionChange::Enable, "disabled" | "revoked") => "retired",
        (VersionChange::Enable, _) => return Err(wrong("disabled")),
        (VersionChange::Destroy, "destroyed") => return Ok(false),
        (VersionChange::Destroy, "disabled" | "revoked") => "destroyed",
        (VersionChange::Destroy, _) => return Err(wrong("disabled")),
    };
    if change == VersionChange::Destroy && !force {
        if !retired_before_wait {
            return Err(EnvelopeError::BadRequest {
                code: pgrx::PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                message: format!("pg_envelope: data key version {v} of tenant \"{}\" was retired while the destroy waited", crate::error::shown(tenant)),
                hint: Some("Retry the destroy.".into()),
            });
        }
        if let Some(location) = catalog::data_key_in_use(t.id, v)? {
            return Err(EnvelopeError::DataKeyInUse { tenant: tenant.to_string(), version: v, location });
        }
    }
    catalog::set_data_key_state(t.id, v, new_state)?;
    crate::audit::key_op(
        match change {
            VersionChange::Disable => "disable_data_key",
            VersionChange::Enable => "enable_data_key",
            VersionChange::Destroy => "destroy_data_key",
        },
        tenant,
        &format!("version {v}{}", if force { " (force)" } else { "" }),
        false,
    );
    if change == VersionChange::Enable {
        backend::invalidate_after_commit();
    } else {
        backend::revoke_after_commit();
    }
    Ok(true)
}

/// Starts (or resumes) re-wrapping every tenant of `provider` under its root key's newest
/// version; returns the job id. The first step of `CALL envelope.rewrap_tenants(provider)`.
#[pg_extern(volatile, parallel_unsafe)]
fn rewrap_tenants_start(provider: &str) -> i64 {
    rewrap_start_impl(provider).or_raise_audited("rewrap_tenants_start", "")
}

pub fn rewrap_start_impl(provider: &str) -> Result<i64> {
    if let Some(job) = catalog::open_rewrap_job(provider)? {
        return Ok(job);
    }
    let (kind, options) = catalog::provider_row(provider)?.ok_or_else(|| EnvelopeError::ProviderUnknown { provider: provider.to_string() })?;
    let mut p = backend::provider_for(provider, &kind, &options)?;
    let target = crate::stampede::provider_call(provider, move || p.current_root_version())
        .and_then(|r| r)
        .map_err(|error| EnvelopeError::Provider { provider: provider.to_string(), error })?;
    // Transit ciphertexts name their root key version: tenants already under the newest one are
    // skipped. Other providers' blobs do not say, so every tenant is re-wrapped once per job.
    let only_outdated = kind == "vault_transit" && target.is_some();
    catalog::insert_rewrap_job(provider, target.as_deref(), only_outdated)
}

/// Re-wraps the next `batch` tenants of a rewrap job, in the caller's transaction; returns how
/// many (0: the job is done). The second step of `CALL envelope.rewrap_tenants(provider)`.
#[pg_extern(volatile, parallel_unsafe)]
fn rewrap_tenants_batch(job: i64, batch: default!(i32, 100)) -> i32 {
    rewrap_batch_impl(job, batch).or_raise_audited("rewrap_tenants_batch", "")
}

pub fn rewrap_batch_impl(job: i64, batch: i32) -> Result<i32> {
    let j = catalog::lock_rewrap_job(job)?.ok_or_else(|| EnvelopeError::BadRequest {
        code: pgrx::PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        message: format!("pg_envelope: no rewrap job {job}"),
        hint: Some("CALL envelope.rewrap_tenants(provider) opens or resumes the provider's job.".into()),
    })?;
    if j.state != "running" {
        return Ok(0);
    }
    let due = catalog::lock_tenants_due_for_rewrap(&j, batch.clamp(1, 10_000))?;
    if due.is_empty() {
        catalog::finish_rewrap_job(job)?;
        return Ok(0);
    }
    let (kind, options) =
        catalog::provider_row(&j.provider)?.ok_or_else(|| EnvelopeError::ProviderUnknown { provider: j.provider.clone() })?;
    let mut p = backend::provider_for(&j.provider, &kind, &options)?;
    let target = j.target_version.clone();
    let inputs: Vec<(u32, String, Vec<u8>, Vec<u8>)> =
        due.iter().map(|t| (t.id, t.name.clone(), t.wrapped_key.clone(), t.key_check.clone())).collect();
    // One slot for the whole batch: its calls are made one after another.
    let results = crate::stampede::provider_call(&j.provider, move || {
        let mut out = Vec::with_capacity(inputs.len());
        // Providers that re-wrap in this process hold the key anyway: prove the new wrapping
        // opens to the same key (its check value) before it replaces the old one. Inside a KMS
        // (AWS ReEncrypt) the key never comes out; the KMS vouches for it, and the next load
        // checks it against key_check.
        let verify = !p.rewraps_inside_kms();
        let lockdown = crate::revocation::lockdown_flag();
        for (id, name, wrapped, check) in &inputs {
            // A lockdown stops the loop between two tenants (nothing of the batch is stored).
            if lockdown.is_some_and(|f| f.load(std::sync::atomic::Ordering::Acquire) != 0) {
                break;
            }
            let ctx = KeyContext { tenant: name, tenant_key_id: *id };
            let w = p.rewrap_tenant_key(&ctx, wrapped).map_err(|e| (name.clone(), e))?;
            if verify {
                let back = p.unwrap_tenant_key(&ctx, &w).map_err(|e| (name.clone(), e))?;
                if pg_envelope_core::wrap::tenant_key_check(&back).as_slice() != check.as_slice() {
                    return Err((name.clone(), ProviderError::UnwrapFailed));
                }
            }
            let v = p.root_version_of(&w).or_else(|| target.clone());
            out.push((*id, w, v));
        }
        Ok::<_, (String, ProviderError)>(out)
    })
    .unwrap_or_else(|e| Err((String::new(), e)));
    let results = match results {
        Ok(r) => r,
        Err((tenant, error)) => {
            // Nothing of this batch is stored (the caller's transaction aborts); the job stays
            // open and a rerun continues where the last committed batch ended.
            return Err(EnvelopeError::Provider {
                provider: j.provider.clone(),
                error: match error {
                    ProviderError::UnwrapFailed => ProviderError::Misconfigured(format!(
                        "the tenant key of \"{}\" does not re-wrap (the KMS does not open it with this tenant's binding)",
                        crate::error::shown(&tenant)
                    )),
                    e => e,
                },
            });
        }
    };
    crate::revocation::refuse_if_locked()?;
    for ((id, wrapped, version), t) in results.iter().zip(&due) {
        catalog::store_rewrapped_tenant_key(*id, wrapped, version.as_deref())?;
        // One record per tenant key re-wrapped (review 41: a root-key rotation of every
        // tenant left nothing in the trail but its failures).
        crate::audit::key_op(
            "rewrap_tenants",
            &t.name,
            &format!("job {job}, provider {}, root version {}", j.provider, version.as_deref().unwrap_or("(not reported)")),
            false,
        );
    }
    catalog::advance_rewrap_job(job, results.len() as i32)?;
    // No invalidation: the tenant keys themselves did not change, so cached keys stay right;
    // backends pick up the new wrapping at their next reload (TTL).
    Ok(results.len() as i32)
}
