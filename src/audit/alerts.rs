//! Anomaly alerts and canaries, evaluated by the audit writer as it writes each batch.
//!
//! * `envelope.audit_hourly` keeps, per hour, role and tenant, the values decrypted and
//!   encrypted and the failures (from the per-statement records).
//! * Rules, per role and tenant and hour (settings in src/gucs.rs, all SIGHUP):
//!   `volume` (decryptions above `envelope.alert_decrypts_per_hour`), `baseline` (above
//!   `envelope.alert_baseline_factor` times the mean of the same role and tenant's hours over the
//!   past 7 days, once `envelope.alert_baseline_warmup` hours of history exist), `failures`
//!   (above `envelope.alert_failures_per_hour`), `after_hours` (decryptions in an hour outside
//!   `envelope.alert_hours`, in the server's time zone), and `canary` (a value registered with
//!   `envelope.add_canary` was decrypted).
//! * An alert is a row in `envelope.audit_alerts` (once per rule, role, tenant and hour), a
//!   `NOTIFY envelope_audit_alert` with the row as JSON (in `envelope.database`), a WARNING in the
//!   server log, and an `alert` record in the chain.

use std::collections::BTreeMap;

use pgrx::prelude::*;

use crate::catalog::spi_err;
use crate::error::{EnvelopeError, Result};
use crate::gucs;

/// The alerts channel (`LISTEN envelope_audit_alert` in envelope.database).
pub const CHANNEL: &str = "envelope_audit_alert";

#[derive(Default, Clone, Copy)]
struct Counts {
    decrypts: i64,
    encrypts: i64,
    failures: i64,
}

struct Alert {
    rule: &'static str,
    role: String,
    tenant: String,
    hour_us: i64,
    observed: i64,
    threshold: Option<f64>,
    detail: String,
    seq: i64,
}

thread_local! {
    /// The writer's prepared upsert of the hourly counts (see [`evaluate`]).
    static HOURLY_PLAN: std::cell::RefCell<Option<pgrx::spi::OwnedPreparedStatement>> = const { std::cell::RefCell::new(None) };
    /// Per hour, what the writer already read for it: each (role, tenant)'s baseline (the count
    /// and mean of its decryptions in the 7 days before the hour) and the hour's local hour of
    /// day. Both depend only on earlier hours, so they are read once per hour instead of once
    /// per batch (an unprepared query per batch was 7% of the writer's CPU under an OLTP load).
    static HOUR_MEMO: std::cell::RefCell<HourMemo> = std::cell::RefCell::new(HourMemo::default());
}

/// Forgets what [`HOUR_MEMO`] holds: after a failed batch, a new audit table and a reload of
/// the configuration (a new TimeZone changes the local hour; insider review 31).
pub(super) fn forget_hour_memo() {
    HOUR_MEMO.with(|m| *m.borrow_mut() = HourMemo::default());
}

#[derive(Default)]
struct HourMemo {
    hour_us: i64,
    local_hour: Option<i32>,
    baselines: std::collections::HashMap<(String, String), (i64, f64)>,
}

impl HourMemo {
    /// The memo of `hour_us` (a new hour, or more than 4,096 pairs: starts empty).
    fn at(&mut self, hour_us: i64) -> &mut Self {
        if self.hour_us != hour_us || self.baselines.len() >= 4096 {
            *self = HourMemo { hour_us, ..Default::default() };
        }
        self
    }
}

/// After a batch was inserted (same transaction): updates the hourly counts of what it holds
/// and raises the alerts they call for. Returns the alert records to queue for the chain.
pub fn evaluate<'a>(rows: impl Iterator<Item = &'a pg_envelope_core::audit::Record>) -> Result<Vec<pg_envelope_core::audit::Record>> {
    // Keyed by the records' own strings (cloning two per record was a tenth of the writer's work).
    let mut hours: BTreeMap<(i64, &'a str, &'a str), (Counts, i64)> = BTreeMap::new();
    let mut alerts = Vec::new();
    for r in rows {
        let hour_us = r.at_us - r.at_us.rem_euclid(3_600_000_000);
        match r.kind.as_str() {
            // Search terms' failures count too (a probe through blind_index is a probe), and
            // the limit's overflow (role "*"): insider review 29.
            "decrypt" | "encrypt" | "search" | "dropped" if r.kind != "dropped" || r.operation == "failure_summary" => {
                let e = hours.entry((hour_us, r.current_role.as_str(), r.tenant.as_str())).or_insert((Counts::default(), r.seq));
                let ok = r.value_count - r.failure_count;
                if r.kind == "decrypt" {
                    e.0.decrypts += ok;
                } else if r.kind == "encrypt" {
                    e.0.encrypts += ok;
                }
                e.0.failures += r.failure_count;
                e.1 = r.seq;
            }
            "canary" => alerts.push(Alert {
                rule: "canary",
                role: r.current_role.clone(),
                tenant: r.tenant.clone(),
                hour_us,
                observed: r.value_count,
                threshold: None,
                detail: format!("canary value decrypted: {} (session user {}, client {}, application {})", r.detail, r.session_user, r.client_addr, r.application_name),
                seq: r.seq,
            }),
            _ => {}
        }
    }
    let per_hour = gucs::ALERT_DECRYPTS_PER_HOUR.get() as i64;
    let failures_per_hour = gucs::ALERT_FAILURES_PER_HOUR.get() as i64;
    let factor = gucs::ALERT_BASELINE_FACTOR.get();
    let warmup = gucs::ALERT_BASELINE_WARMUP_H.get() as i64;
    let allowed_hours = gucs::alert_hours();
    // (hour, role) of the batch's failures, with the last record's sequence (see below).
    let mut failed_roles: BTreeMap<(i64, &str), i64> = BTreeMap::new();
    for ((hour_us, role, tenant), (delta, seq)) in hours {
        if delta.failures > 0 {
            let e = failed_roles.entry((hour_us, role)).or_insert(0);
            *e = (*e).max(seq);
        }
        let total: Counts = Spi::connect_mut(|c| {
            // Prepared once per writer process (parsing and planning it for every batch was a
            // fifth of the writer's CPU at 35,000 records a second); a changed table replans it
            // (the plan cache), and any failure drops it.
            let plan = HOURLY_PLAN.with(|p| p.borrow_mut().take());
            let plan = match plan {
                Some(p) => p,
                None => c
                    .prepare_mut(
                        "INSERT INTO envelope.audit_hourly AS h (hour, role_name, tenant, decrypts, encrypts, failures)
                         VALUES (pg_catalog.to_timestamp($1::pg_catalog.float8 OPERATOR(pg_catalog./) 1e6), $2, $3, $4, $5, $6)
                         ON CONFLICT (hour, role_name, tenant) DO UPDATE SET decrypts = h.decrypts OPERATOR(pg_catalog.+) excluded.decrypts,
                             encrypts = h.encrypts OPERATOR(pg_catalog.+) excluded.encrypts, failures = h.failures OPERATOR(pg_catalog.+) excluded.failures
                         RETURNING decrypts, encrypts, failures",
                        &[
                            pgrx::PgOid::from(pg_sys::INT8OID),
                            pgrx::PgOid::from(pg_sys::TEXTOID),
                            pgrx::PgOid::from(pg_sys::TEXTOID),
                            pgrx::PgOid::from(pg_sys::INT8OID),
                            pgrx::PgOid::from(pg_sys::INT8OID),
                            pgrx::PgOid::from(pg_sys::INT8OID),
                        ],
                    )
                    .map_err(spi_err)?
                    .keep(),
            };
            let t = c
                .update(
                    &plan,
                    None,
                    &[hour_us.into(), role.into(), tenant.into(), delta.decrypts.into(), delta.encrypts.into(), delta.failures.into()],
                )
                .map_err(spi_err)?;
            let r = t.first();
            let counts = Counts {
                decrypts: r.get::<i64>(1).map_err(spi_err)?.unwrap_or(0),
                encrypts: r.get::<i64>(2).map_err(spi_err)?.unwrap_or(0),
                failures: r.get::<i64>(3).map_err(spi_err)?.unwrap_or(0),
            };
            HOURLY_PLAN.with(|p| *p.borrow_mut() = Some(plan));
            Ok::<_, EnvelopeError>(counts)
        })?;
        let alert = |rule, observed, threshold: Option<f64>, detail: String| Alert {
            rule,
            role: role.to_string(),
            tenant: tenant.to_string(),
            hour_us,
            observed,
            threshold,
            detail,
            seq,
        };
        if per_hour > 0 && total.decrypts > per_hour {
            alerts.push(alert("volume", total.decrypts, Some(per_hour as f64), format!("{} values decrypted this hour (envelope.alert_decrypts_per_hour = {per_hour})", total.decrypts)));
        }
        if failures_per_hour > 0 && total.failures > failures_per_hour {
            alerts.push(alert("failures", total.failures, Some(failures_per_hour as f64), format!("{} failed key uses this hour (envelope.alert_failures_per_hour = {failures_per_hour})", total.failures)));
        }
        if factor > 0.0 && delta.decrypts > 0 {
            let memo = HOUR_MEMO.with(|m| m.borrow_mut().at(hour_us).baselines.get(&(role.to_string(), tenant.to_string())).copied());
            let (n, mean) = match memo {
                Some(b) => b,
                None => {
                    let b: (i64, f64) = Spi::connect(|c| {
                        let t = c
                            .select(
                                "SELECT count(*), coalesce(avg(decrypts), 0)::float8 FROM envelope.audit_hourly
                                  WHERE role_name = $1 AND tenant = $2
                                    AND hour >= pg_catalog.to_timestamp($3::float8 / 1e6) - interval '7 days'
                                    AND hour < pg_catalog.to_timestamp($3::float8 / 1e6)",
                                None,
                                &[role.into(), tenant.into(), hour_us.into()],
                            )
                            .map_err(spi_err)?;
                        let r = t.first();
                        Ok::<_, EnvelopeError>((r.get::<i64>(1).map_err(spi_err)?.unwrap_or(0), r.get::<f64>(2).map_err(spi_err)?.unwrap_or(0.0)))
                    })?;
                    HOUR_MEMO.with(|m| m.borrow_mut().at(hour_us).baselines.insert((role.to_string(), tenant.to_string()), b));
                    b
                }
            };
            let limit = factor * mean.max(1.0);
            if n >= warmup && (total.decrypts as f64) > limit && total.decrypts >= gucs::ALERT_BASELINE_MIN.get() as i64 {
                alerts.push(alert(
                    "baseline",
                    total.decrypts,
                    Some(limit),
                    format!("{} values decrypted this hour, {factor} x the hourly mean of {mean:.1} over the past 7 days ({n} hours)", total.decrypts),
                ));
            }
        }
        if let Some((from, to)) = allowed_hours {
            if delta.decrypts > 0 {
                let local_hour = match HOUR_MEMO.with(|m| m.borrow_mut().at(hour_us).local_hour) {
                    Some(h) => h,
                    None => {
                        let h: i32 = Spi::get_one_with_args(
                            "SELECT extract(hour FROM pg_catalog.to_timestamp($1::float8 / 1e6))::int",
                            &[hour_us.into()],
                        )
                        .map_err(spi_err)?
                        .unwrap_or(0);
                        HOUR_MEMO.with(|m| m.borrow_mut().at(hour_us).local_hour = Some(h));
                        h
                    }
                };
                let inside = if from <= to { local_hour >= from && local_hour < to } else { local_hour >= from || local_hour < to };
                if !inside {
                    alerts.push(alert("after_hours", total.decrypts, None, format!("decryptions at {local_hour}:00, outside envelope.alert_hours ({from}-{to})")));
                }
            }
        }
    }
    // Failures across all of a role's tenants (150 failures spread over 150 names each stayed
    // under the per-tenant threshold: insider review 28): alerted as tenant `*`.
    if failures_per_hour > 0 {
        for ((hour_us, role), seq) in failed_roles {
            // The failures under tenants that did not cross the threshold themselves (those
            // have their own alert): one tenant over it must not silence the spread case for the
            // rest of the hour (insider review 30).
            let total: i64 = Spi::get_one_with_args(
                "SELECT coalesce(sum(failures) FILTER (WHERE failures OPERATOR(pg_catalog.<=) $3), 0)::int8 FROM envelope.audit_hourly
                  WHERE hour = pg_catalog.to_timestamp($1::pg_catalog.float8 OPERATOR(pg_catalog./) 1e6) AND role_name = $2",
                &[hour_us.into(), role.into(), failures_per_hour.into()],
            )
            .map_err(spi_err)?
            .unwrap_or(0);
            if total > failures_per_hour {
                alerts.push(Alert {
                    // A rule of its own: as ("failures", role, "*") it shared the once-an-hour
                    // key of the alert on the summaries of made-up names (insider review 29).
                    rule: "failures_all_tenants",
                    role: role.to_string(),
                    tenant: "*".into(),
                    hour_us,
                    observed: total,
                    threshold: Some(failures_per_hour as f64),
                    detail: format!("{total} failed key uses this hour across tenants that are each below envelope.alert_failures_per_hour = {failures_per_hour}"),
                    seq,
                });
            }
        }
    }
    let mut records = Vec::new();
    for a in alerts {
        if let Some(r) = raise(&a)? {
            records.push(r);
        }
    }
    Ok(records)
}

/// Inserts the alert (once per rule, role, tenant and hour), notifies, logs; the record for
/// the chain when it is new.
fn raise(a: &Alert) -> Result<Option<pg_envelope_core::audit::Record>> {
    let json: Option<String> = Spi::connect_mut(|c| {
        let t = c
            .update(
                "WITH a AS (
                   INSERT INTO envelope.audit_alerts (rule, role_name, tenant, hour, observed, threshold, detail, audit_seq)
                   VALUES ($1, $2, $3, pg_catalog.to_timestamp($4::float8 / 1e6), $5, $6, $7, $8)
                   ON CONFLICT (rule, role_name, tenant, hour) DO NOTHING RETURNING *)
                 SELECT pg_catalog.row_to_json(a)::text FROM a",
                None,
                &[a.rule.into(), a.role.as_str().into(), a.tenant.as_str().into(), a.hour_us.into(), a.observed.into(), a.threshold.into(), a.detail.as_str().into(), a.seq.into()],
            )
            .map_err(spi_err)?;
        if t.is_empty() {
            return Ok::<_, EnvelopeError>(None);
        }
        t.first().get::<String>(1).map_err(spi_err)
    })?;
    let Some(json) = json else { return Ok(None) };
    Spi::run_with_args("SELECT pg_catalog.pg_notify($1, $2)", &[CHANNEL.into(), json.as_str().into()]).map_err(spi_err)?;
    crate::warning!("pg_envelope audit alert: {} (role {}, tenant {}): {}", a.rule, a.role, a.tenant, a.detail);
    let mut r = super::base_record("alert", a.role.clone());
    r.operation = a.rule.to_string();
    r.tenant = a.tenant.clone();
    r.value_count = a.observed;
    r.outcome = "alert".into();
    r.detail = a.detail.clone();
    Ok(Some(r))
}

// ---------------------------------------------------------------------------------------------
// Canaries: values whose decryption always alerts.

thread_local! {
    /// This backend's canary nonces (loaded at first use; reloaded after add/drop_canary).
    static CANARIES: std::cell::RefCell<Option<std::collections::HashMap<[u8; 24], String>>> = const { std::cell::RefCell::new(None) };
    static CANARY_RELID: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Whether this backend's canaries are loaded and none exist (the common case, checked per
/// decrypted value with one load instead of a thread-local borrow). Kept in step with CANARIES.
static NO_CANARIES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

thread_local! {
    /// Set while the canaries load: the load's own queries start executors, whose hooks would
    /// otherwise load them again (and again).
    static LOADING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Loads the canaries if they are not loaded (and no load is under way in this backend).
fn ensure_canaries() {
    if LOADING.with(|l| l.get()) || !CANARIES.with(|c| c.try_borrow().is_ok_and(|c| c.is_none())) {
        return;
    }
    struct Done;
    impl Drop for Done {
        fn drop(&mut self) {
            LOADING.with(|l| l.set(false));
        }
    }
    LOADING.with(|l| l.set(true));
    let _done = Done;
    let m = load_canaries();
    set_canaries(Some(m));
}

fn set_canaries(m: Option<std::collections::HashMap<[u8; 24], String>>) {
    let none = m.as_ref().is_some_and(|m| m.is_empty());
    let stored = CANARIES.with(|c| c.try_borrow_mut().map(|mut c| *c = m).is_ok());
    NO_CANARIES.store(none && stored, std::sync::atomic::Ordering::Relaxed);
}

/// From the relcache callback: the canary table changed (add_canary / drop_canary committed).
pub fn on_relcache_changed(relid: pg_sys::Oid) {
    let ours = CANARY_RELID.with(|c| c.get());
    if relid == pg_sys::InvalidOid || (ours != 0 && relid.to_u32() == ours) {
        NO_CANARIES.store(false, std::sync::atomic::Ordering::Relaxed);
        CANARIES.with(|c| {
            if let Ok(mut c) = c.try_borrow_mut() {
                *c = None;
            }
        });
    }
}

fn load_canaries() -> std::collections::HashMap<[u8; 24], String> {
    let mut m = std::collections::HashMap::new();
    let r: Result<()> = crate::catalog::as_extension_owner(|| {
        super::hooks::without_read_records(|| {
            Spi::connect(|c| {
                // to_regclass: a database whose extension is not updated yet has no such table.
                let relid: Option<pg_sys::Oid> = c
                    .select("SELECT pg_catalog.to_regclass('envelope.audit_canaries')::oid", None, &[])
                    .map_err(spi_err)?
                    .first()
                    .get(1)
                    .map_err(spi_err)?;
                CANARY_RELID.with(|x| x.set(relid.map_or(0, |o| o.to_u32())));
                if relid.is_none() {
                    return Ok(());
                }
                for row in c.select("SELECT nonce, label FROM envelope.audit_canaries", None, &[]).map_err(spi_err)? {
                    let nonce: Vec<u8> = row.get(1).map_err(spi_err)?.unwrap_or_default();
                    if let Ok(n) = <[u8; 24]>::try_from(nonce.as_slice()) {
                        m.insert(n, row.get::<String>(2).map_err(spi_err)?.unwrap_or_default());
                    }
                }
                Ok(())
            })
        })
    });
    if let Err(e) = r {
        crate::log!("pg_envelope: canaries not loaded: {}", e.message());
    }
    m
}

/// After a successful decryption with auditing on: a canary's nonce pushes a `canary` record
/// (the writer raises the alert) and logs a line (server log only: the client sees nothing).
#[inline(always)]
pub fn check_canary(envelope: &[u8], tenant: Option<&str>) {
    // The common case, no canary in this database: one load per value, inline.
    if !NO_CANARIES.load(std::sync::atomic::Ordering::Relaxed) {
        check_canary_loaded(envelope, tenant);
    }
}

#[inline(never)]
fn check_canary_loaded(envelope: &[u8], tenant: Option<&str>) {
    let state = CANARIES.with(|c| c.try_borrow().map(|m| m.as_ref().map(|m| m.is_empty())).unwrap_or(Some(true)));
    match state {
        Some(true) => {}
        Some(false) => check_canary_slow(envelope, tenant),
        // Not loaded yet: loaded here outside parallel mode (a query cannot run there); the
        // executor hook loads it before a parallel plan starts (see preload_canaries).
        None if !crate::nothrow::is_in_parallel_mode() => check_canary_slow(envelope, tenant),
        None => {}
    }
}

/// From the executor hook, before a plan runs (never in parallel mode): loads this backend's
/// canaries if they are not loaded, so parallel workers' leader and serial plans check them.
pub fn preload_canaries() {
    if crate::nothrow::is_in_parallel_mode() || !crate::nothrow::is_transaction_state() {
        return;
    }
    ensure_canaries();
}

#[cold]
fn check_canary_slow(envelope: &[u8], tenant: Option<&str>) {
    let Ok(env) = pg_envelope_core::Envelope::parse(envelope) else { return };
    ensure_canaries();
    let label = CANARIES.with(|c| c.try_borrow().ok().and_then(|c| c.as_ref().and_then(|m| m.get(env.nonce).cloned())));
    let Some(label) = label else { return };
    super::prime_session();
    let mut r = super::base_record("canary", crate::backend::role_name(crate::nothrow::current_user_id()));
    r.operation = "decrypt".into();
    r.tenant = tenant.unwrap_or("").to_string();
    r.key_versions = env.dek_version.to_string();
    r.value_count = 1;
    r.outcome = "ok".into();
    r.detail = label.clone();
    held_report!(pgrx::ereport!(
        pgrx::PgLogLevel::LOG,
        pgrx::PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
        format!("pg_envelope: canary \"{label}\" decrypted by role {}", r.current_role)
    ));
    super::push(r);
}

/// `envelope.add_canary(value, label)`: registers an encrypted value (a decoy row planted where
/// only an intruder would read it) whose every decryption alerts. The value stays decryptable;
/// only its nonce is recorded. Key administrators.
#[pg_extern(volatile, parallel_unsafe)]
fn add_canary(value: &[u8], label: &str) -> bool {
    use crate::error::OrRaiseAudited;
    add_canary_impl(value, label).or_raise_audited("add_canary", "")
}

fn add_canary_impl(value: &[u8], label: &str) -> Result<bool> {
    let env = pg_envelope_core::Envelope::parse(value).map_err(|_| EnvelopeError::DecryptFailed)?;
    let n = Spi::connect_mut(|c| {
        c.update(
            "INSERT INTO envelope.audit_canaries (nonce, tenant_key_id, label) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            None,
            &[env.nonce.to_vec().into(), (env.tenant_key_id as i64).into(), label.into()],
        )
        .map(|t| t.len())
        .map_err(spi_err)
    })?;
    invalidate_canaries()?;
    super::key_op("add_canary", "", &format!("canary {label}"), false);
    Ok(n > 0)
}

/// `envelope.drop_canary(label)`: forgets a canary. Returns how many were dropped.
#[pg_extern(volatile, parallel_unsafe)]
fn drop_canary(label: &str) -> i64 {
    use crate::error::OrRaiseAudited;
    drop_canary_impl(label).or_raise_audited("drop_canary", "")
}

fn drop_canary_impl(label: &str) -> Result<i64> {
    let n = Spi::connect_mut(|c| {
        c.update("DELETE FROM envelope.audit_canaries WHERE label = $1", None, &[label.into()]).map(|t| t.len() as i64).map_err(spi_err)
    })?;
    invalidate_canaries()?;
    super::key_op("drop_canary", "", &format!("canary {label}"), false);
    Ok(n)
}

/// Every backend reloads its canaries after this transaction commits.
fn invalidate_canaries() -> Result<()> {
    let relid: Option<pg_sys::Oid> = Spi::get_one("SELECT 'envelope.audit_canaries'::regclass::oid").map_err(spi_err)?;
    if let Some(r) = relid {
        unsafe { pg_sys::CacheInvalidateRelcacheByRelid(r) };
    }
    Ok(())
}
