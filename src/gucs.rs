//! Every setting pg_envelope reads, with typed accessors and deliberate contexts.
//!
//! | setting                       | context  | default          | who can change it            |
//! |-------------------------------|----------|------------------|------------------------------|
//! | envelope.tenant_setting       | SUSET    | app.tenant_id    | superusers                   |
//! | envelope.key_cache_ttl        | SUSET    | 1h               | superusers                   |
//! | envelope.max_value_size       | SUSET    | 256MB            | superusers                   |
//! | envelope.local_root_key_file  | SIGHUP   | (unset)          | postgresql.conf only         |
//! | envelope.kms_timeout          | SUSET    | 5s               | superusers                   |
//! | envelope.max_concurrent_provider_calls | SIGHUP | 16 (0: no bound) | postgresql.conf only  |
//! | envelope.max_key_age          | SUSET    | 7d               | superusers                   |
//! | envelope.credential_dirs      | SIGHUP   | (unset: none)    | postgresql.conf only         |
//! | envelope.pkcs11_modules       | SIGHUP   | (unset: none)    | postgresql.conf only         |
//! | envelope.database             | POSTMASTER | postgres       | postgresql.conf, restart     |
//! | envelope.maintenance_naptime  | SIGHUP   | 1min             | postgresql.conf only         |
//! | envelope.data_key_rotation_period | SIGHUP | 90d (0: never) | postgresql.conf only         |
//! | envelope.shred_min_delay      | SUSET    | 1h               | superusers                   |
//! | envelope.audit                | SIGHUP   | off              | postgresql.conf only         |
//! | envelope.audit_fail_closed    | SIGHUP   | on               | postgresql.conf only         |
//! | envelope.audit_max_delay      | SIGHUP   | 10s              | postgresql.conf only         |
//! | envelope.audit_checkpoint_interval | SIGHUP | 5min          | postgresql.conf only         |
//! | envelope.audit_queue_size     | POSTMASTER | 16384          | postgresql.conf, restart     |
//! | envelope.request_id           | USERSET  | (unset)          | anyone (recorded, not trusted) |
//! | envelope.shred_requires_confirmation | SIGHUP | off         | postgresql.conf only         |
//!
//! None of them holds a secret: the root key file's *path* is configuration; its content is
//! read by the `local` provider and never stored in a setting. The path is still hidden from
//! non-superusers (`GUC_SUPERUSER_ONLY`).

use std::ffi::{CStr, CString};
use std::time::Duration;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

pub static TENANT_SETTING: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"app.tenant_id"));
pub static KEY_CACHE_TTL_S: GucSetting<i32> = GucSetting::<i32>::new(3600);
pub static MAX_VALUE_SIZE_KB: GucSetting<i32> = GucSetting::<i32>::new(256 * 1024);
pub static LOCAL_ROOT_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static KMS_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5000);
pub static MAX_CONCURRENT_PROVIDER_CALLS: GucSetting<i32> = GucSetting::<i32>::new(16);
pub static CREDENTIAL_DIRS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static PKCS11_MODULES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static MAX_KEY_AGE_S: GucSetting<i32> = GucSetting::<i32>::new(7 * 24 * 3600);
pub static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
pub static MAINTENANCE_NAPTIME_S: GucSetting<i32> = GucSetting::<i32>::new(60);
pub static DATA_KEY_ROTATION_PERIOD_S: GucSetting<i32> = GucSetting::<i32>::new(90 * 24 * 3600);
pub static AUDIT: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static AUDIT_FAIL_CLOSED: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static AUDIT_MAX_DELAY_S: GucSetting<i32> = GucSetting::<i32>::new(10);
pub static AUDIT_CHECKPOINT_INTERVAL_S: GucSetting<i32> = GucSetting::<i32>::new(300);
/// Records the audit queue holds (1,208 bytes of shared memory each). See [`audit_queue_size`].
pub static AUDIT_QUEUE_SIZE: GucSetting<i32> = GucSetting::<i32>::new(16384);
pub static AUDIT_CHECKPOINT_PROVIDER: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"local"));
pub static ALERT_DECRYPTS_PER_HOUR: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static ALERT_FAILURES_PER_HOUR: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static ALERT_BASELINE_FACTOR: GucSetting<f64> = GucSetting::<f64>::new(10.0);
pub static ALERT_BASELINE_WARMUP_H: GucSetting<i32> = GucSetting::<i32>::new(24);
pub static ALERT_BASELINE_MIN: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static ALERT_HOURS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static MAX_DECRYPTS_PER_STATEMENT: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static REQUEST_ID: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static SHRED_MIN_DELAY_S: GucSetting<i32> = GucSetting::<i32>::new(3600);
pub static SHRED_REQUIRES_CONFIRMATION: GucSetting<bool> = GucSetting::<bool>::new(false);

/// Largest accepted `envelope.max_value_size`: 1 GiB (PostgreSQL's varlena limit) minus room for
/// the 82-byte envelope overhead and the varlena header, rounded down to whole kB.
pub const MAX_VALUE_SIZE_LIMIT_KB: i32 = 1024 * 1024 - 1;

pub fn init() {
    GucRegistry::define_bool_guc(
        c"envelope.audit",
        c"Record every key operation and every encryption and decryption (per statement) in envelope.audit_log.",
        c"The maintenance worker writes the records in envelope.database; see docs/design-decisions.md.",
        &AUDIT,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"envelope.audit_fail_closed",
        c"Refuse key use when it cannot be audited (on), or warn and continue (off).",
        c"Records that cannot be queued are counted in status()->'audit'->'dropped' either way.",
        &AUDIT_FAIL_CLOSED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"envelope.audit_max_delay",
        c"How long queued audit records may wait for the writer before key use is refused.",
        c"",
        &AUDIT_MAX_DELAY_S,
        1,
        3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"envelope.audit_checkpoint_interval",
        c"How often the audit writer signs the head of the audit chain.",
        c"",
        &AUDIT_CHECKPOINT_INTERVAL_S,
        1,
        24 * 3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"envelope.audit_queue_size",
        c"How many audit records the shared-memory queue holds for the audit writer.",
        c"About 1.2 kB of shared memory each; at least 4 per process the server may run, rounded down to a multiple of 4. Size it for the peak record rate times the longest stall of the writer to absorb; key use waits, then fails closed, when it is full.",
        &AUDIT_QUEUE_SIZE,
        1024,
        262_144,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"envelope.audit_checkpoint_provider",
        c"The registered key provider whose key MACs the audit chain's checkpoints.",
        c"A KMS or HSM key (Transit hmac_key, AWS mac_key_id, PKCS#11 mac_key_label) keeps checkpoints unforgeable from inside the database; 'local' is for development only.",
        &AUDIT_CHECKPOINT_PROVIDER,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"envelope.alert_decrypts_per_hour",
        c"Alert when one role decrypts more values of one tenant in an hour (0: off).",
        c"Alerts are rows in envelope.audit_alerts, NOTIFY envelope_audit_alert and a WARNING in the server log.",
        &ALERT_DECRYPTS_PER_HOUR,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"envelope.alert_failures_per_hour",
        c"Alert when one role's key uses for one tenant fail more often in an hour (0: off).",
        c"",
        &ALERT_FAILURES_PER_HOUR,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"envelope.alert_baseline_factor",
        c"Alert when an hour's decryptions exceed this multiple of the role and tenant's hourly mean over the past 7 days (0: off).",
        c"Only once envelope.alert_baseline_warmup hours of history exist, and from envelope.alert_baseline_min values on.",
        &ALERT_BASELINE_FACTOR,
        0.0,
        1e9,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"envelope.alert_baseline_warmup",
        c"Hours of history (per role and tenant, within 7 days) before the baseline rule applies.",
        c"",
        &ALERT_BASELINE_WARMUP_H,
        1,
        168,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"envelope.alert_baseline_min",
        c"The fewest decryptions in an hour that the baseline rule alerts on.",
        c"",
        &ALERT_BASELINE_MIN,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"envelope.alert_hours",
        c"Hours in which decryption is expected, e.g. '8-19' (from 08:00 to 18:59, server time zone); empty: off.",
        c"Decryptions in any other hour alert (rule after_hours). '22-6' spans midnight.",
        &ALERT_HOURS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"envelope.max_decrypts_per_statement",
        c"The most values one statement may decrypt (0: no limit); the statement fails past it.",
        c"A bound on what one query can exfiltrate; set per role with ALTER ROLE ... SET (superusers).",
        &MAX_DECRYPTS_PER_STATEMENT,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"envelope.request_id",
        c"An id of the application's request, recorded with audit events.",
        c"Set it per transaction (SET LOCAL) to tie audit records to a request; never a secret.",
        &REQUEST_ID,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"envelope.shred_min_delay",
        c"The shortest window schedule_shred accepts before a tenant's keys are destroyed.",
        c"A key administrator cannot schedule a destruction sooner than this; superusers may lower it.",
        &SHRED_MIN_DELAY_S,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"envelope.shred_requires_confirmation",
        c"Two-person rule for crypto-shredding.",
        c"On: a scheduled shred runs only after another role confirmed it with envelope.confirm_shred().",
        &SHRED_REQUIRES_CONFIRMATION,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"envelope.database",
        c"The database the pg_envelope maintenance worker connects to.",
        c"The worker rotates data keys, re-wraps tenants and runs queued re-encryption jobs there. Empty: no worker.",
        &DATABASE,
        GucContext::Postmaster,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_int_guc(
        c"envelope.maintenance_naptime",
        c"How often the maintenance worker looks for due work.",
        c"Due data key rotations, root key versions to re-wrap under, queued re-encryption jobs.",
        &MAINTENANCE_NAPTIME_S,
        1,
        24 * 3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"envelope.data_key_rotation_period",
        c"Age at which the maintenance worker (or run_maintenance) rotates a tenant's active data key.",
        c"0: never automatically; shorter than 1h counts as 1h. A tenant's row in envelope.rotation_policy overrides it.",
        &DATA_KEY_ROTATION_PERIOD_S,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_string_guc(
        c"envelope.credential_dirs",
        c"Directories (comma-separated, absolute) under which key-provider options may name files.",
        c"Token, AppRole, credentials, PIN and CA files of every provider must resolve (symlinks followed) under one of these. Unset: no provider may name a file.",
        &CREDENTIAL_DIRS,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"envelope.pkcs11_modules",
        c"PKCS#11 module libraries (comma-separated, absolute paths) that pkcs11 providers may load.",
        c"Unset: no pkcs11 provider can be used.",
        &PKCS11_MODULES,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_int_guc(
        c"envelope.max_key_age",
        c"How long cached keys may keep serving past their TTL while the key provider is unreachable.",
        c"Counted from the last successful root-key unwrap. Past it the tenant fails closed until the provider answers.",
        &MAX_KEY_AGE_S,
        1,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"envelope.kms_timeout",
        c"Longest a single key-provider call (connect + request) may take.",
        c"A call that takes longer fails with 58000. Cancellation (pg_cancel_backend, statement_timeout) ends a call sooner.",
        &KMS_TIMEOUT_MS,
        100,
        120_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"envelope.max_concurrent_provider_calls",
        c"Most calls to one key provider in flight at once across the whole server (stampede control).",
        c"A call that finds every slot taken waits, first come first served, up to envelope.kms_timeout. 0: no bound. Needs shared_preload_libraries.",
        &MAX_CONCURRENT_PROVIDER_CALLS,
        0,
        pg_envelope_core::stampede::MAX_SLOTS as i32,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"envelope.tenant_setting",
        c"Name of the setting that holds the current tenant (the one RLS policies read).",
        c"encrypt_field, decrypt_field and the encrypted types read the tenant from this setting. Unset or empty fails closed.",
        &TENANT_SETTING,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"envelope.key_cache_ttl",
        c"How long a backend keeps a tenant's unwrapped keys, counted from the root-key unwrap.",
        c"After it expires the next use unwraps the tenant key again (one key-provider call).",
        &KEY_CACHE_TTL_S,
        1,
        7 * 24 * 3600,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"envelope.max_value_size",
        c"Largest plaintext pg_envelope encrypts.",
        c"Larger values are refused with SQLSTATE 54000. The hard ceiling is PostgreSQL's 1 GB value limit.",
        &MAX_VALUE_SIZE_KB,
        1,
        MAX_VALUE_SIZE_LIMIT_KB,
        GucContext::Suset,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_string_guc(
        c"envelope.local_root_key_file",
        c"Absolute path of the local provider's root key file (32 bytes, mode 0600). Development only.",
        c"The file must be owned by the server's OS user, with no group or other permissions, outside the data directory.",
        &LOCAL_ROOT_KEY_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
}

/// The name of the tenant setting, borrowed from the GUC without allocating.
pub fn tenant_setting_name() -> &'static CStr {
    let p = unsafe { *TENANT_SETTING.as_ptr() };
    if p.is_null() {
        c"app.tenant_id"
    } else {
        // SAFETY: the GUC machinery keeps the string alive until the setting changes, which
        // cannot happen while a function reads it.
        unsafe { CStr::from_ptr(p) }
    }
}

pub fn key_cache_ttl() -> Duration {
    Duration::from_secs(KEY_CACHE_TTL_S.get().max(1) as u64)
}

pub fn max_key_age() -> Duration {
    Duration::from_secs(MAX_KEY_AGE_S.get().max(1) as u64)
}

pub fn kms_timeout() -> Duration {
    Duration::from_millis(KMS_TIMEOUT_MS.get().max(100) as u64)
}

/// The bound on key-provider calls in flight across the server; 0: none.
pub fn max_concurrent_provider_calls() -> u32 {
    MAX_CONCURRENT_PROVIDER_CALLS.get().max(0) as u32
}

pub fn max_value_size() -> usize {
    MAX_VALUE_SIZE_KB.get().max(1) as usize * 1024
}

pub fn local_root_key_file() -> Option<String> {
    LOCAL_ROOT_KEY_FILE.get().and_then(|c| c.into_string().ok()).filter(|s| !s.is_empty())
}

fn path_list(g: &GucSetting<Option<CString>>) -> Vec<std::path::PathBuf> {
    g.get()
        .and_then(|c| c.into_string().ok())
        .map(|s| pg_envelope_core::provider::policy::parse_path_list(&s))
        .unwrap_or_default()
}

/// `envelope.credential_dirs` as absolute paths.
pub fn credential_dirs() -> Vec<std::path::PathBuf> {
    path_list(&CREDENTIAL_DIRS)
}

/// `envelope.pkcs11_modules` as absolute paths.
pub fn pkcs11_modules() -> Vec<std::path::PathBuf> {
    path_list(&PKCS11_MODULES)
}

/// `envelope.database`, or `None` when empty (no worker).
pub fn database() -> Option<String> {
    DATABASE.get().and_then(|c| c.into_string().ok()).filter(|s| !s.is_empty())
}

pub fn maintenance_naptime() -> Duration {
    Duration::from_secs(MAINTENANCE_NAPTIME_S.get().max(1) as u64)
}

/// `envelope.data_key_rotation_period` in seconds (0: never; anything shorter than an hour
/// counts as an hour: every rotation makes every backend reload the tenant's keys).
pub fn data_key_rotation_period_s() -> i64 {
    match DATA_KEY_ROTATION_PERIOD_S.get() {
        v if v <= 0 => 0,
        v => (v as i64).max(3600),
    }
}

/// `envelope.shred_min_delay` in seconds.
pub fn shred_min_delay_s() -> i64 {
    SHRED_MIN_DELAY_S.get().max(0) as i64
}

/// `envelope.shred_requires_confirmation`.
pub fn shred_requires_confirmation() -> bool {
    SHRED_REQUIRES_CONFIRMATION.get()
}

/// `envelope.audit_max_delay` in seconds.
pub fn audit_max_delay_s() -> i64 {
    AUDIT_MAX_DELAY_S.get().max(1) as i64
}

/// `envelope.alert_hours` as `(from, to)` hours of the day; `None`: off (or unparsable, which
/// the worker logs).
pub fn alert_hours() -> Option<(i32, i32)> {
    let s = ALERT_HOURS.get().and_then(|c| c.into_string().ok())?;
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let (a, b) = s.split_once('-')?;
    let (a, b) = (a.trim().parse::<i32>().ok()?, b.trim().parse::<i32>().ok()?);
    ((0..=24).contains(&a) && (0..=24).contains(&b) && a != b).then_some((a % 24, b % 24))
}

/// `envelope.audit_checkpoint_provider` (a provider name; `local` by default).
pub fn audit_checkpoint_provider() -> String {
    AUDIT_CHECKPOINT_PROVIDER.get().and_then(|c| c.into_string().ok()).filter(|s| !s.is_empty()).unwrap_or_else(|| "local".into())
}

/// `envelope.audit_queue_size`: the audit queue's slots, fixed when the server starts (the
/// queue is shared memory sized by the postmaster). 16,384 by default: under an 8-client OLTP
/// load on 2 cores (~50,000 records a second) the writer sometimes stalls for 150-300 ms in the
/// operating system (extending its table: a page written for the first time on a VM), and 8,192
/// slots (the size until 2026-12-06) filled up in about a third of the 5-second rounds' worth
/// of such stalls: every backend then waited for room (issue 13; docs/benchmarks.md).
pub fn audit_queue_size() -> usize {
    AUDIT_QUEUE_SIZE.get().clamp(1024, 262_144) as usize
}

/// `envelope.audit_checkpoint_interval` in seconds.
pub fn audit_checkpoint_interval_s() -> i64 {
    AUDIT_CHECKPOINT_INTERVAL_S.get().max(1) as i64
}
