//! The SQL layer's one error type, mapped to SQLSTATEs at the boundary.
//!
//! Messages never contain plaintext, key bytes, wrapped keys, tokens or query text. Decryption
//! failures are opaque: a wrong tenant, a wrong context, a tampered or truncated value and a
//! different key all produce the same message and SQLSTATE.

use pg_envelope_core::{LoadError, ProviderError};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug)]
pub enum EnvelopeError {
    /// The tenant setting is unset or empty.
    TenantUnset { setting: String },
    /// No tenant of that name exists.
    TenantUnknown { tenant: String },
    /// The current role is not allowed to use the tenant's keys.
    TenantDenied { tenant: String, role: String },
    /// `create_tenant` for a name that exists.
    TenantExists { tenant: String },
    /// An invalid tenant name (empty, too long, control characters).
    InvalidTenantName,
    /// A caller-supplied context in the namespace the encrypted types use.
    ReservedContext,
    /// Any decryption failure. Deliberately says nothing more.
    DecryptFailed,
    /// The decrypted bytes are not valid text in the database encoding (decrypt_field on a
    /// value that was encrypted from bytea).
    NotText,
    /// An `encrypted_jsonb` plaintext that authenticated but is not a document pg_envelope
    /// writes (made outside it by a holder of the tenant's key): refused before PostgreSQL's
    /// jsonb code reads it (`pg_envelope_core::jsonb`).
    MalformedJsonb,
    /// PostgreSQL raised an error in the middle of a key use (the stack depth, out of memory,
    /// an encoding conversion, while `jsonb_in` parsed a text-form plaintext; `jsonb_in` checks
    /// no interrupts, so a cancel is raised after the cast, its value recorded as used):
    /// recorded in the audit trail with its SQLSTATE; the client sees PostgreSQL's own error,
    /// rethrown as it was.
    Raised { code: PgSqlErrorCode },
    /// The plaintext is larger than `envelope.max_value_size`.
    TooLarge { size: usize, limit: usize },
    /// The named key provider does not exist.
    ProviderUnknown { provider: String },
    /// A key provider failed.
    Provider { provider: String, error: ProviderError },
    /// The provider returned a different tenant key than the one stored (check value mismatch).
    KeyCheckMismatch { tenant: String, provider: String },
    /// Invalid provider registration (name, kind).
    InvalidProvider(String),
    /// A stored DEK does not unwrap under its tenant key.
    CorruptKeys { tenant: String, detail: String },
    /// The library was not loaded through shared_preload_libraries.
    NotPreloaded,
    /// PREPARE TRANSACTION after a change of tenants, keys or grants (2PC would commit it
    /// without announcing it to other backends).
    PrepareAfterKeyChange,
    /// A value given to a header-only function is not a pg_envelope value.
    NotAnEnvelope,
    /// Key use inside a security-restricted operation (ANALYZE, index build, REFRESH ...).
    RestrictedOperation,
    /// Registering a provider is for superusers.
    ProviderRegistrationDenied,
    /// A provider option names a file or module outside what postgresql.conf allows.
    ProviderOptionNotAllowed { provider: String, option: String, setting: &'static str },
    /// A value under a data key version that a key administrator disabled.
    DataKeyDisabled { tenant: String, version: u32 },
    /// A value under a data key version that was destroyed.
    DataKeyDestroyed { tenant: String, version: u32 },
    /// The tenant has no blind-index key (one made before 0.2.0, or all destroyed).
    NoIndexKey { tenant: String },
    /// `envelope.blind_index` with a purpose nobody declared.
    PurposeUnknown { purpose: String },
    /// An envelope header names a tenant key id that no tenant has.
    TenantKeyIdUnknown { tenant_key_id: u32 },
    /// A lifecycle call names a data key version the tenant does not have.
    DataKeyUnknown { tenant: String, version: u32 },
    /// The active version can be neither disabled nor destroyed.
    DataKeyActive { tenant: String, version: u32 },
    /// A lifecycle step that needs a version in another state (e.g. destroy before disable).
    DataKeyState { tenant: String, version: u32, state: String, wanted: &'static str },
    /// Destroy refused: a column still holds values under the version.
    DataKeyInUse { tenant: String, version: u32, location: String },
    /// The tenant is suspended (`suspend_tenant`): every use of its keys is refused.
    TenantSuspended { tenant: String, reason: String, shred_after: Option<String> },
    /// The tenant was crypto-shredded: its keys are gone for good.
    TenantShredded { tenant: String, at: String },
    /// The cluster is locked down (`lockdown`): all key use is refused.
    Lockdown { reason: String },
    /// Auditing is on and events cannot be recorded (queue full, writer gone).
    AuditUnavailable { reason: String },
    /// `audit_prune` by a role that is not a superuser.
    AuditRetentionDenied,
    /// Retention refused: the chain does not match its checkpoint at `seq`.
    AuditChainBroken { seq: i64 },
    /// `audit_export` cannot export the whole trail: a table is not the extension's (42P01 /
    /// 55000), or row-level security would hide rows from the caller (42501).
    AuditExportRefused { reason: String, rls: bool },
    /// `envelope.max_decrypts_per_statement` reached.
    DecryptCapReached { limit: i64 },
    /// A decryption in a parallel worker while `envelope.max_decrypts_per_statement` is set: the
    /// count is per process, so workers would multiply the limit.
    DecryptCapInParallelWorker { limit: i64 },
    /// A request with a bad argument (re-encryption target, job), with its SQLSTATE.
    BadRequest { code: PgSqlErrorCode, message: String, hint: Option<String> },
    /// A catalog query failed in a way that is not the user's fault.
    Internal(String),
}

/// A tenant (or role) name as shown in a message: control characters escaped, at most 128
/// characters. Names come from callers and settings; a message must not carry a megabyte of one
/// or let it forge log lines.
pub(crate) fn shown(name: &str) -> String {
    let mut out: String = name.chars().take(128).flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] }).collect();
    if name.chars().count() > 128 {
        out.push('…');
    }
    out
}

impl EnvelopeError {
    pub fn from_load(tenant: &str, provider: &str, e: LoadError) -> Self {
        match e {
            LoadError::Provider(error) => EnvelopeError::Provider { provider: provider.to_string(), error },
            LoadError::KeyCheckMismatch => {
                EnvelopeError::KeyCheckMismatch { tenant: tenant.to_string(), provider: provider.to_string() }
            }
            other => EnvelopeError::CorruptKeys { tenant: tenant.to_string(), detail: other.to_string() },
        }
    }

    fn parts(&self) -> (PgSqlErrorCode, String, Option<String>, Option<String>) {
        use PgSqlErrorCode::*;
        match self {
            EnvelopeError::TenantUnset { setting } => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("pg_envelope: no tenant is set ({setting} is unset or empty)"),
                Some("Nothing was encrypted or decrypted; pg_envelope never stores plaintext in place of a ciphertext.".into()),
                Some(format!("SET LOCAL {setting} = '<tenant>' in the transaction (the same setting your RLS policies read).")),
            ),
            EnvelopeError::TenantUnknown { tenant } => (
                ERRCODE_UNDEFINED_OBJECT,
                format!("pg_envelope: tenant \"{}\" does not exist", shown(tenant)),
                None,
                Some("A key administrator creates it with SELECT envelope.create_tenant('<tenant>').".into()),
            ),
            EnvelopeError::TenantDenied { tenant, role } => (
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("pg_envelope: role \"{}\" may not use the keys of tenant \"{}\"", shown(role), shown(tenant)),
                Some("Setting the tenant is not proof of identity: the role must be granted the tenant. Superusers are not exempt.".into()),
                Some(format!("A key administrator runs SELECT envelope.grant_tenant('{}', '<role>').", shown(tenant))),
            ),
            EnvelopeError::TenantExists { tenant } => (
                ERRCODE_DUPLICATE_OBJECT,
                format!("pg_envelope: tenant \"{}\" already exists", shown(tenant)),
                None,
                Some("create_tenant never replaces keys; pick another name, or rotate the existing tenant's keys.".into()),
            ),
            EnvelopeError::ReservedContext => (
                ERRCODE_INVALID_PARAMETER_VALUE,
                "pg_envelope: contexts starting with \"pg_envelope/\" are reserved".into(),
                Some("The encrypted column types bind their values to such contexts; a value encrypted under one could be passed off as a typed value.".into()),
                Some("Use a context of your own, for example table.column.".into()),
            ),
            EnvelopeError::InvalidTenantName => (
                ERRCODE_INVALID_PARAMETER_VALUE,
                "pg_envelope: invalid tenant name".into(),
                Some("A tenant name is 1 to 255 bytes of UTF-8 with no control characters (ASCII in a database whose encoding is not UTF8).".into()),
                None,
            ),
            EnvelopeError::DecryptFailed => (
                ERRCODE_DATA_EXCEPTION,
                "pg_envelope: decryption failed".into(),
                Some("The value is not a ciphertext of the current tenant and context, or it was altered.".into()),
                Some("Check the tenant setting and the context argument.".into()),
            ),
            EnvelopeError::MalformedJsonb => (
                ERRCODE_DATA_CORRUPTED,
                "pg_envelope: an encrypted_jsonb value does not hold a well-formed jsonb document".into(),
                Some("The value decrypted under the tenant's key, but its plaintext is not a jsonb document as pg_envelope writes it; it is refused before PostgreSQL reads it, and not shown.".into()),
                Some("A value like this is made outside pg_envelope by a holder of the tenant's key: check who holds it (docs/threat-model.md). The refusal is in the audit trail.".into()),
            ),
            EnvelopeError::Raised { code } => (*code, "pg_envelope: PostgreSQL raised an error during a key use".into(), None, None),
            EnvelopeError::NotText => (
                ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
                "pg_envelope: the decrypted value is not valid text in the database encoding".into(),
                None,
                Some("It was probably encrypted from bytea: use envelope.decrypt_field_bytea().".into()),
            ),
            EnvelopeError::TooLarge { size, limit } => (
                ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                format!("pg_envelope: value of {size} bytes exceeds envelope.max_value_size ({limit} bytes)"),
                None,
                Some("A superuser can raise envelope.max_value_size, up to about 1 GB.".into()),
            ),
            EnvelopeError::ProviderUnknown { provider } => (
                ERRCODE_UNDEFINED_OBJECT,
                format!("pg_envelope: key provider \"{provider}\" does not exist"),
                None,
                Some("See SELECT * FROM envelope.key_providers.".into()),
            ),
            EnvelopeError::Provider { provider, error } => {
                let (code, hint) = match error {
                    ProviderError::NotConfigured(_) => (
                        ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                        Some(if provider == "local" {
                            "Set envelope.local_root_key_file in postgresql.conf to a 32-byte key file (mode 0600) and reload.".to_string()
                        } else {
                            "Check the provider's configuration in envelope.key_providers.".to_string()
                        }),
                    ),
                    ProviderError::Misconfigured(_) => (ERRCODE_CONFIG_FILE_ERROR, None),
                    ProviderError::Unavailable(_) => (ERRCODE_SYSTEM_ERROR, Some("Retry when the key provider is reachable.".into())),
                    ProviderError::Busy(_) => (
                        ERRCODE_SYSTEM_ERROR,
                        Some("Retry; if it recurs, raise envelope.max_concurrent_provider_calls or envelope.kms_timeout, or find what keeps this provider's calls slow.".into()),
                    ),
                    ProviderError::Denied(_) => (ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION, None),
                    ProviderError::UnwrapFailed => (
                        ERRCODE_DATA_EXCEPTION,
                        Some("The provider holds a different root key than the one this tenant was created with.".into()),
                    ),
                };
                (code, format!("pg_envelope: key provider \"{provider}\": {error}"), None, hint)
            }
            EnvelopeError::KeyCheckMismatch { tenant, provider } => (
                ERRCODE_DATA_EXCEPTION,
                format!("pg_envelope: key provider \"{provider}\" returned a different key for tenant \"{}\"", shown(tenant)),
                Some("The tenant key's check value does not match: the root key behind the provider's key name was replaced. Nothing was decrypted.".into()),
                Some("Point the provider back at the original key (or key version), then retry.".into()),
            ),
            EnvelopeError::InvalidProvider(m) => (
                ERRCODE_INVALID_PARAMETER_VALUE,
                format!("pg_envelope: {m}"),
                None,
                Some("Provider names are lower-case identifiers; kinds: local, vault_transit, aws_kms, pkcs11.".into()),
            ),
            EnvelopeError::CorruptKeys { tenant, detail } => (
                ERRCODE_DATA_CORRUPTED,
                format!("pg_envelope: the stored keys of tenant \"{}\" are damaged: {detail}", shown(tenant)),
                None,
                Some("Restore envelope.tenants and envelope.data_keys from a backup.".into()),
            ),
            EnvelopeError::NotPreloaded => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "pg_envelope must be loaded at server start".into(),
                None,
                Some("Add pg_envelope to shared_preload_libraries in postgresql.conf and restart the server.".into()),
            ),
            EnvelopeError::PrepareAfterKeyChange => (
                ERRCODE_FEATURE_NOT_SUPPORTED,
                "pg_envelope: a transaction that changed or locked tenants, keys, grants or key jobs cannot be prepared".into(),
                None,
                Some("Commit it directly: other sessions learn of key and grant changes when it commits.".into()),
            ),
            EnvelopeError::NotAnEnvelope => (
                ERRCODE_INVALID_TEXT_REPRESENTATION,
                "pg_envelope: the value is not a pg_envelope ciphertext".into(),
                Some("Its header could not be read; the value is not shown.".into()),
                None,
            ),
            EnvelopeError::RestrictedOperation => (
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                "pg_envelope: keys cannot be used within a security-restricted operation".into(),
                Some("ANALYZE, CREATE INDEX, REINDEX, CLUSTER, CREATE/REFRESH MATERIALIZED VIEW and similar maintenance run as the table owner; pg_envelope never encrypts or decrypts there, so no decrypted value can reach statistics, an index or a stored view.".into()),
                Some("Remove the decrypting expression (statistics object, index expression, materialized view query).".into()),
            ),
            EnvelopeError::ProviderRegistrationDenied => (
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                "pg_envelope: only superusers may register key providers".into(),
                Some("A key provider decides which files the server reads and which hosts it contacts; that is the DBA's decision.".into()),
                None,
            ),
            EnvelopeError::ProviderOptionNotAllowed { provider, option, setting } => (
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("pg_envelope: key provider \"{provider}\": option \"{option}\" is not allowed by {setting}"),
                None,
                Some(format!("The DBA lists what providers may use in postgresql.conf ({setting}).")),
            ),
            EnvelopeError::DataKeyDisabled { tenant, version } => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("pg_envelope: data key version {version} of tenant \"{}\" is disabled", shown(tenant)),
                Some("A key administrator disabled this version; values under it cannot be decrypted until it is enabled again.".into()),
                Some(format!("SELECT envelope.enable_data_key('{}', {version}) restores it; CALL envelope.reencrypt(...) moves values to the active version.", shown(tenant))),
            ),
            EnvelopeError::DataKeyDestroyed { tenant, version } => (
                ERRCODE_UNDEFINED_OBJECT,
                format!("pg_envelope: data key version {version} of tenant \"{}\" was destroyed", shown(tenant)),
                Some("Values under a destroyed data key can never be decrypted again.".into()),
                None,
            ),
            EnvelopeError::NoIndexKey { tenant } => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("pg_envelope: tenant \"{}\" has no blind-index key", shown(tenant)),
                Some("Tenants created by pg_envelope 0.2.0 get one; older tenants need one made.".into()),
                Some(format!("A key administrator runs SELECT envelope.rotate_index_key('{}').", shown(tenant))),
            ),
            EnvelopeError::PurposeUnknown { purpose } => (
                ERRCODE_UNDEFINED_OBJECT,
                format!("pg_envelope: blind-index purpose \"{}\" is not declared", shown(purpose)),
                None,
                Some("A key administrator declares it once: SELECT envelope.declare_blind_index('<purpose>', '<none|nfc|nfkc_casefold|digits>').".into()),
            ),
            EnvelopeError::TenantKeyIdUnknown { tenant_key_id } => (
                ERRCODE_UNDEFINED_OBJECT,
                format!("pg_envelope: no tenant has tenant key id {tenant_key_id} (named in the value's header)"),
                None,
                None,
            ),
            EnvelopeError::DataKeyUnknown { tenant, version } => (
                ERRCODE_UNDEFINED_OBJECT,
                format!("pg_envelope: tenant \"{}\" has no data key version {version}", shown(tenant)),
                None,
                Some("SELECT * FROM envelope.key_versions lists the versions.".into()),
            ),
            EnvelopeError::DataKeyActive { tenant, version } => (
                ERRCODE_OBJECT_IN_USE,
                format!("pg_envelope: data key version {version} is the active version of tenant \"{}\"", shown(tenant)),
                Some("New values are encrypted with the active version; it can be neither disabled nor destroyed.".into()),
                Some(format!("Rotate first: SELECT envelope.rotate_data_key('{}').", shown(tenant))),
            ),
            EnvelopeError::DataKeyState { tenant, version, state, wanted } => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("pg_envelope: data key version {version} of tenant \"{}\" is {state}, not {wanted}", shown(tenant)),
                None,
                Some("A version is destroyed only after it was disabled: SELECT envelope.disable_data_key(tenant, version).".into()),
            ),
            EnvelopeError::DataKeyInUse { tenant, version, location } => (
                ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
                format!("pg_envelope: data key version {version} of tenant \"{}\" is still used by {location}", shown(tenant)),
                Some("Destroying it would make those values unreadable for good.".into()),
                Some("Re-encrypt first (CALL envelope.reencrypt(table, column)), or pass force => true to destroy anyway.".into()),
            ),
            EnvelopeError::TenantSuspended { tenant, reason, shred_after: None } => (
                ERRCODE_OPERATOR_INTERVENTION,
                format!("pg_envelope: tenant \"{}\" is suspended", shown(tenant)),
                Some(format!("Every use of this tenant's keys is refused: {}", shown(reason))),
                Some(format!("A key administrator lifts it with SELECT envelope.resume_tenant('{}').", shown(tenant))),
            ),
            EnvelopeError::TenantSuspended { tenant, reason, shred_after: Some(after) } => (
                ERRCODE_OPERATOR_INTERVENTION,
                format!("pg_envelope: tenant \"{}\" is suspended and scheduled for crypto-shredding", shown(tenant)),
                Some(format!("Every use of this tenant's keys is refused ({}); its keys are destroyed after {after}.", shown(reason))),
                Some(format!("Until then a key administrator can undo it with SELECT envelope.cancel_shred('{}').", shown(tenant))),
            ),
            EnvelopeError::TenantShredded { tenant, at } => (
                ERRCODE_UNDEFINED_OBJECT,
                format!("pg_envelope: tenant \"{}\" was crypto-shredded", shown(tenant)),
                Some(format!("Its keys were destroyed on {at}; values encrypted for it can never be decrypted again.")),
                None,
            ),
            EnvelopeError::Lockdown { reason } => (
                ERRCODE_OPERATOR_INTERVENTION,
                "pg_envelope: the server is in lockdown; no key may be used".into(),
                Some(format!("Lockdown: {}", shown(reason))),
                Some("A superuser lifts it with SELECT envelope.lift_lockdown().".into()),
            ),
            EnvelopeError::AuditUnavailable { reason } => (
                ERRCODE_CANNOT_CONNECT_NOW,
                "pg_envelope: key use refused: it cannot be audited now".into(),
                Some(reason.clone()),
                Some("The maintenance worker (in envelope.database) records audit events; check that it runs and that pg_envelope is installed there. envelope.audit_fail_closed = off warns instead.".into()),
            ),
            EnvelopeError::AuditRetentionDenied => (
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                "pg_envelope: only a superuser may prune the audit trail".into(),
                None,
                None,
            ),
            EnvelopeError::AuditChainBroken { seq } => (
                ERRCODE_DATA_CORRUPTED,
                format!("pg_envelope: the audit chain does not match its checkpoint at record {seq}; nothing was pruned"),
                None,
                Some("Run SELECT * FROM envelope.audit_verify(true) and investigate before pruning.".into()),
            ),
            EnvelopeError::AuditExportRefused { reason, rls } => (
                if *rls { ERRCODE_INSUFFICIENT_PRIVILEGE } else { ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE },
                format!("pg_envelope: the audit trail cannot be exported: {reason}"),
                None,
                Some(if *rls {
                    "An export holds every record or none: export as a role row-level security does not apply to (the tables' owner, or BYPASSRLS), or drop the policies.".into()
                } else {
                    "Run SELECT * FROM envelope.audit_verify() for the reason; the stored trail is what it checks.".into()
                }),
            ),
            EnvelopeError::DecryptCapReached { limit } => (
                ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                format!("pg_envelope: this statement reached envelope.max_decrypts_per_statement ({limit} values)"),
                None,
                Some("Decrypt fewer rows per statement, or ask a superuser to raise the limit for this role (ALTER ROLE ... SET).".into()),
            ),
            EnvelopeError::DecryptCapInParallelWorker { limit } => (
                ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("pg_envelope: decryption in a parallel worker is refused while envelope.max_decrypts_per_statement is set ({limit} values): the limit is counted per process"),
                None,
                Some("Mark functions that decrypt PARALLEL RESTRICTED (as pg_envelope's own are), or SET max_parallel_workers_per_gather = 0.".into()),
            ),
            EnvelopeError::BadRequest { code, message, hint } => (*code, message.clone(), None, hint.clone()),
            EnvelopeError::Internal(m) => (ERRCODE_INTERNAL_ERROR, format!("pg_envelope: {m}"), None, None),
        }
    }

    /// The SQLSTATE.
    pub fn code(&self) -> PgSqlErrorCode {
        self.parts().0
    }

    /// The message alone (for logs and status, e.g. the maintenance worker's last error).
    pub fn message(&self) -> String {
        self.parts().1
    }

    /// Raises the error as a PostgreSQL ERROR. Does not return.
    pub fn raise(self) -> ! {
        let (code, message, detail, hint) = self.parts();
        let mut report = ErrorReport::new(code, message, "pg_envelope");
        if let Some(d) = detail {
            report = report.set_detail(d);
        }
        if let Some(h) = hint {
            report = report.set_hint(h);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}

pub type Result<T> = std::result::Result<T, EnvelopeError>;

/// Unwraps a result or raises its error.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => e.raise(),
        }
    }
}

/// For key-management functions: a failure is recorded in the audit trail (operation, tenant,
/// SQLSTATE) before it is raised.
pub trait OrRaiseAudited<T> {
    fn or_raise_audited(self, operation: &str, tenant: &str) -> T;
}

impl<T> OrRaiseAudited<T> for Result<T> {
    fn or_raise_audited(self, operation: &str, tenant: &str) -> T {
        match self {
            Ok(v) => v,
            Err(e) => {
                crate::audit::refused(operation, tenant, &e);
                e.raise()
            }
        }
    }
}
