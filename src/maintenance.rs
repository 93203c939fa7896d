//! Scheduled key maintenance: what is due, and doing one item of it. Shared by the background
//! worker (src/worker.rs) and `CALL envelope.run_maintenance()` (sql/maintenance.sql), so
//! pg_cron users get exactly what the worker does.
//!
//! Due work, in order:
//! 0. `shred`: tenants whose crypto-shredding window elapsed (and, under the two-person rule, was
//!    confirmed); then `destroy_root_key`: shredded tenants whose dedicated root key is still to
//!    be destroyed in the key server (retried every run until it succeeds); then
//!    `compact_key_tables`: the key tables rewritten once no transaction older than a shred runs;
//! 1. `rotate`: tenants whose active data key is older than their rotation period
//!    (`envelope.rotation_policy`, else `envelope.data_key_rotation_period`; 0 = never);
//! 2. `rewrap`: providers with an open rewrap job, or whose root key reports a newer version than
//!    some of their tenants are wrapped under (one KMS call per provider and run);
//! 3. `reencrypt`: re-encryption jobs queued for the worker (`envelope.queue_reencrypt`).

use pgrx::prelude::*;

use crate::catalog;
use crate::error::{EnvelopeError, OrRaise, Result};
use crate::{backend, gucs};

/// `envelope.data_key_rotation_period` as an interval (for the views).
#[pg_extern(stable, parallel_safe)]
fn default_rotation_period() -> pgrx::datum::Interval {
    pgrx::datum::Interval::new(0, 0, gucs::data_key_rotation_period_s() * 1_000_000).unwrap_or_else(|_| {
        EnvelopeError::Internal("envelope.data_key_rotation_period out of range".into()).raise()
    })
}

/// One item of due work.
pub enum Work {
    Shred(String),
    DestroyRootKey(String),
    CompactKeyTables,
    Rotate(String),
    Rewrap(String),
    Reencrypt { job: i64, role: pg_sys::Oid },
}

impl Work {
    fn row(&self) -> (String, String) {
        match self {
            Work::Shred(t) => ("shred".into(), t.clone()),
            Work::DestroyRootKey(t) => ("destroy_root_key".into(), t.clone()),
            Work::CompactKeyTables => ("compact_key_tables".into(), "envelope.tenants, envelope.data_keys".into()),
            Work::Rotate(t) => ("rotate".into(), t.clone()),
            Work::Rewrap(p) => ("rewrap".into(), p.clone()),
            Work::Reencrypt { job, .. } => ("reencrypt".into(), job.to_string()),
        }
    }
}

/// The due work now. A provider that cannot be asked for its root version is skipped (and
/// reported through `warnings`), never fatal: rotations and jobs still run.
pub fn due_work(warnings: &mut Vec<String>) -> Result<Vec<Work>> {
    let mut out: Vec<Work> = crate::shred::shreds_due()?.into_iter().map(Work::Shred).collect();
    out.extend(crate::shred::root_keys_to_destroy()?.into_iter().map(Work::DestroyRootKey));
    if crate::shred::compaction_pending()? {
        out.push(Work::CompactKeyTables);
    }
    out.extend(catalog::tenants_due_for_rotation(gucs::data_key_rotation_period_s())?.into_iter().map(Work::Rotate));
    for (provider, kind, options, open_job, versions) in catalog::providers_with_tenants()? {
        if open_job {
            out.push(Work::Rewrap(provider));
            continue;
        }
        let mut p = match backend::provider_for(&provider, &kind, &options) {
            Ok(p) => p,
            Err(e) => {
                warnings.push(format!("provider \"{provider}\": {}", e.message()));
                continue;
            }
        };
        match crate::stampede::provider_call(&provider, move || p.current_root_version()).and_then(|r| r) {
            Ok(Some(current)) => {
                if versions.iter().any(|v| v.as_deref() != Some(current.as_str())) {
                    out.push(Work::Rewrap(provider));
                }
            }
            Ok(None) => {}
            Err(e) => warnings.push(format!("provider \"{provider}\": {e}")),
        }
    }
    for (job, role) in catalog::queued_reencrypt_jobs()? {
        out.push(Work::Reencrypt { job, role });
    }
    Ok(out)
}

/// `envelope.maintenance_due()`: what `run_maintenance` (and the worker) would do now.
#[pg_extern(volatile, parallel_unsafe)]
fn maintenance_due() -> TableIterator<'static, (name!(action, String), name!(target, String))> {
    let mut warnings = Vec::new();
    let work = due_work(&mut warnings).or_raise();
    for w in warnings {
        crate::warning!("pg_envelope: maintenance: {w}");
    }
    // Re-encryption jobs run as the role that queued them: a caller sees its own (superusers all).
    let me = crate::nothrow::current_user_id();
    let superuser = unsafe { pg_sys::superuser() };
    let mine = |w: &&Work| match w {
        Work::Reencrypt { role, .. } => superuser || *role == me,
        _ => true,
    };
    TableIterator::new(work.iter().filter(mine).map(Work::row).collect::<Vec<_>>())
}

/// Rotates a tenant's data key if it is still due (re-checked after locking the tenant, so the
/// worker and a `run_maintenance` running at once rotate once). Returns the new version, or
/// NULL when it was no longer due.
#[pg_extern(volatile, parallel_unsafe)]
fn rotate_data_key_if_due(tenant: &str) -> Option<i32> {
    rotate_if_due(tenant).or_raise().map(|v| v as i32)
}

pub fn rotate_if_due(tenant: &str) -> Result<Option<u32>> {
    if catalog::lock_tenant(tenant)?.is_none() {
        return Ok(None);
    }
    if !catalog::tenant_rotation_due(tenant, gucs::data_key_rotation_period_s())? {
        return Ok(None);
    }
    crate::lifecycle::rotate_data_key_impl(tenant).map(Some)
}
