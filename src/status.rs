//! `envelope.status()` and `envelope.key_cache()`: what this backend holds, never key bytes.


use pgrx::prelude::*;
use serde_json::{json, Value};

use crate::backend::{self, PRELOADED};
use crate::catalog;
use crate::error::Result;
use crate::gucs;

type CacheRow = (String, i64, String, i64, Vec<i64>, f64, f64, i64, Option<String>);

pub fn cache_rows() -> Vec<CacheRow> {
    backend::with_backend(|b| {
        let now = backend::cache_now();
        let cache_ttl = b.cache.ttl();
        let mut rows: Vec<CacheRow> = b
            .cache
            .iter()
            .map(|(tenant, e)| {
                let age = now.saturating_duration_since(e.keys.loaded_at()).as_secs_f64();
                let ttl = e.ttl(cache_ttl).as_secs_f64();
                (
                    tenant.to_string(),
                    e.keys.tenant_key_id() as i64,
                    e.meta.provider.clone(),
                    e.keys.active_version() as i64,
                    e.keys.versions().into_iter().map(i64::from).collect(),
                    age,
                    (ttl - age).max(0.0),
                    e.keys.hits() as i64,
                    e.degraded.as_ref().map(|d| d.last_error.clone()),
                )
            })
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows
    })
}

fn providers() -> Result<Vec<Value>> {
    let is_superuser = unsafe { pg_sys::superuser() };
    let rows = catalog::provider_rows()?;
    Ok(rows
        .into_iter()
        .map(|(name, kind, options)| {
            let mut v = json!({ "name": name, "kind": kind });
            // Each provider describes itself (paths, URLs, labels: configuration, never secrets).
            // (In a lockdown no provider is built: shown as such, not as unconfigured.)
            // Like envelope.local_root_key_file, those details are shown to superusers only.
            match backend::provider_for(&name, &kind, &options) {
                Ok(p) => {
                    v["configured"] = json!(true);
                    if is_superuser {
                        for (k, d) in p.describe() {
                            v[k] = json!(d);
                        }
                    }
                }
                Err(crate::error::EnvelopeError::Lockdown { .. }) => v["lockdown"] = json!(true),
                Err(_) => v["configured"] = json!(false),
            }
            if kind == "local" {
                v["security"] = json!("root key is a file on the database server: development and tests only");
            }
            v
        })
        .collect())
}

pub fn status_json() -> Result<Value> {
    let providers = providers()?;
    let cache: Vec<Value> = cache_rows()
        .into_iter()
        .map(|(tenant, id, provider, active, versions, age, expires, hits, degraded)| {
            json!({
                "tenant": tenant, "tenant_key_id": id, "provider": provider,
                "active_dek_version": active, "dek_versions": versions,
                "age_seconds": age, "expires_in_seconds": expires, "hits": hits,
                "degraded": degraded.is_some(), "provider_error": degraded,
            })
        })
        .collect();
    let tenant = backend::current_tenant().ok();
    let lockdown = match crate::revocation::lockdown_state() {
        Some((since, reason, persisted)) => json!({ "active": true, "since_unix": since, "reason": reason, "persisted": persisted }),
        None => json!({ "active": false }),
    };
    // Tenant names only for roles that may list tenants (pg_monitor members get a count).
    let all_suspended = catalog::suspended_tenants()?;
    let all_shreds = catalog::shred_states()?;
    let can_list = catalog::can_list_tenants(crate::nothrow::current_user_id())?;
    let suspended = if can_list {
        json!(all_suspended.into_iter().map(|(name, since, reason)| json!({ "tenant": name, "since": since, "reason": reason })).collect::<Vec<_>>())
    } else {
        json!({ "count": all_suspended.len() })
    };
    let shreds = if can_list {
        json!(all_shreds
            .into_iter()
            .map(|(name, state, after, kms)| json!({ "tenant": name, "state": state, "destroy_after": after, "root_key_destruction": kms }))
            .collect::<Vec<_>>())
    } else {
        json!({
            "scheduled": all_shreds.iter().filter(|s| s.1 == "scheduled").count(),
            "shredded": all_shreds.iter().filter(|s| s.1 == "shredded").count(),
        })
    };
    let w = worker_status();
    let worker = json!({
        "database": gucs::database(),
        "running": w.pid != 0,
        "pid": (w.pid != 0).then_some(w.pid),
        "runs": w.runs,
        "seconds_since_last_run": (w.last_run_at != 0).then(|| (unsafe { pg_sys::GetCurrentTimestamp() } - w.last_run_at) as f64 / 1e6),
        "rotations": w.rotations,
        "tenants_rewrapped": w.rewrapped,
        "values_reencrypted": w.reencrypted,
        "last_error": w.last_error(),
        "data_key_rotation_period_seconds": gucs::data_key_rotation_period_s(),
    });
    Ok(backend::with_backend(|b| {
        let s = b.cache.stats();
        let pool = pg_envelope_core::secure::pool_stats();
        json!({
            "extension_version": env!("CARGO_PKG_VERSION"),
            "preloaded": PRELOADED.load(std::sync::atomic::Ordering::Relaxed),
            "tenant_setting": gucs::tenant_setting_name().to_string_lossy(),
            "current_tenant": tenant,
            "key_cache_ttl_seconds": gucs::key_cache_ttl().as_secs(),
            "max_key_age_seconds": gucs::max_key_age().as_secs(),
            // Stampede control (src/stampede.rs): slots for key-provider calls across the server.
            "provider_call_slots": crate::stampede::stats().map(|s| json!({
                "max": gucs::max_concurrent_provider_calls(),
                "in_use": s.in_use,
                "peak": s.peak,
                "calls": s.acquired,
                "waited": s.waited,
                "timed_out": s.timed_out,
                "reclaimed": s.reclaimed,
            })),
            "degraded": b.cache.degraded_count() > 0,
            "providers": providers,
            "lockdown": lockdown,
            "suspended_tenants": suspended,
            "shreds": shreds,
            "audit": crate::audit::status_json(),
            "shred_requires_confirmation": gucs::shred_requires_confirmation(),
            "maintenance_worker": worker,
            "backend": {
                "pid": std::process::id(),
                "root_unwraps": s.root_unwraps,
                "provider_calls": b.provider_calls,
                "cache_hits": s.hits,
                "cache_misses": s.misses,
                "cache_expirations": s.expirations,
                "cached_tenants": b.cache.len(),
                "degraded_tenants": b.cache.degraded_count(),
                "nonce_rng_seeds": backend::rng_seed_count(),
                "key_pool": {
                    // Key material lives in these pages: never in a core dump; locked in RAM
                    // where RLIMIT_MEMLOCK allows (locked < mapped means part may be swapped).
                    "mapped_bytes": pool.mapped_bytes,
                    "locked_bytes": pool.locked_bytes,
                    "live_values": pool.live_values,
                },
            },
            "cache": cache,
        })
    }))
}

/// The maintenance worker as it reports itself (shared memory): one row.
#[pg_extern(volatile, parallel_safe)]
fn maintenance_status() -> TableIterator<
    'static,
    (
        name!(worker_pid, Option<i32>),
        name!(started_at, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(last_run_at, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(runs, i64),
        name!(rotations, i64),
        name!(tenants_rewrapped, i64),
        name!(values_reencrypted, i64),
        name!(last_error_at, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(last_error, Option<String>),
    ),
> {
    let s = worker_status();
    let ts = |t: i64| if t == 0 { None } else { pgrx::datum::TimestampWithTimeZone::try_from(t).ok() };
    TableIterator::once((
        (s.pid != 0).then_some(s.pid),
        ts(s.started_at),
        ts(s.last_run_at),
        s.runs as i64,
        s.rotations as i64,
        s.rewrapped as i64,
        s.reencrypted as i64,
        ts(s.last_error_at),
        s.last_error(),
    ))
}

pub fn worker_status() -> crate::worker::WorkerStatus {
    if PRELOADED.load(std::sync::atomic::Ordering::Relaxed) {
        *crate::worker::STATUS.share()
    } else {
        crate::worker::WorkerStatus::default()
    }
}
