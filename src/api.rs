//! The SQL functions. Each body converts its arguments and delegates.

use pg_envelope_core::{wrap, KeyContext, SecretKey};
use pgrx::prelude::*;
use pgrx::JsonB;

use crate::backend;
use crate::catalog;
use crate::error::{EnvelopeError, OrRaise, Result, OrRaiseAudited};
use crate::backend::OutBuf;
use crate::types::{ByteaBytes, ByteaOut, PallocVarlena, TextBytes, TextOut};

// Text arguments (data and context) are taken as bytes in the database encoding, so the
// functions work the same in UTF8, LATIN1 or SQL_ASCII databases.
type Ctx<'a> = Option<TextBytes<'a>>;

fn ctx<'a>(c: &'a Ctx<'_>) -> Option<&'a [u8]> {
    c.as_ref().map(|c| c.0)
}

/// Encrypts text for the current tenant. NULL stays NULL.
#[pg_extern(volatile, parallel_restricted)]
fn encrypt_field(data: Option<TextBytes>, context: default!(Ctx, "NULL")) -> Option<ByteaOut> {
    data.map(|d| ByteaOut(encrypt_with_user_context(d.0, ctx(&context)).or_raise()))
}

/// Encrypts bytea for the current tenant. NULL stays NULL.
#[pg_extern(volatile, parallel_restricted, name = "encrypt_field")]
fn encrypt_field_bytea_input(data: Option<ByteaBytes>, context: default!(Ctx, "NULL")) -> Option<ByteaOut> {
    data.map(|d| ByteaOut(encrypt_with_user_context(d.0, ctx(&context)).or_raise()))
}

/// The prefix of the contexts the encrypted types bind their values to.
pub const RESERVED_CONTEXT_PREFIX: &[u8] = b"pg_envelope/";

/// Callers may not encrypt under the types' contexts: `encrypt_field(x, 'pg_envelope/type/text')`
/// would otherwise make a ciphertext that passes for an `encrypted_text` value without having
/// gone through the type's encoding (for text: the database encoding; for int8: its binary form).
fn encrypt_with_user_context(data: &[u8], context: Option<&[u8]>) -> Result<PallocVarlena> {
    if context.is_some_and(|c| c.starts_with(RESERVED_CONTEXT_PREFIX)) {
        return Err(EnvelopeError::ReservedContext);
    }
    backend::encrypt_to(data, context)
}

/// Decrypts an envelope to text. NULL stays NULL; anything else that fails raises an error.
#[pg_extern(stable, parallel_restricted)]
fn decrypt_field(ciphertext: Option<ByteaBytes>, context: default!(Ctx, "NULL")) -> Option<TextOut> {
    ciphertext.map(|c| into_text(backend::decrypt_to(c.0, ctx(&context))).or_raise())
}

/// Decrypts an envelope to bytea (the twin of `decrypt_field`, named like pgcrypto's
/// `pgp_sym_decrypt_bytea`).
#[pg_extern(stable, parallel_restricted)]
fn decrypt_field_bytea(ciphertext: Option<ByteaBytes>, context: default!(Ctx, "NULL")) -> Option<ByteaOut> {
    ciphertext.map(|c| ByteaOut(backend::decrypt_to(c.0, ctx(&context)).or_raise()))
}

/// Checks in place that decrypted bytes are valid text in the database encoding (which also
/// refuses NUL bytes); wipes them if not.
fn into_text(out: Result<PallocVarlena>) -> Result<TextOut> {
    let mut out = out?;
    let bytes = out.bytes_mut();
    let encoding = crate::nothrow::database_encoding();
    let valid = if encoding == pg_sys::pg_enc::PG_UTF8 as i32 {
        // The common case, checked in Rust: the same rules as PostgreSQL's (no surrogates, no
        // code point above U+10FFFF, no NUL) without a call per value.
        pg_envelope_core::text::valid_utf8_text(bytes)
    } else {
        bytes.len() <= i32::MAX as usize
            && unsafe { pg_sys::pg_verify_mbstr(encoding, bytes.as_ptr().cast(), bytes.len() as i32, true) }
    };
    if !valid {
        zeroize::Zeroize::zeroize(bytes);
        return Err(EnvelopeError::NotText);
    }
    Ok(TextOut(out))
}

/// Creates a tenant: a fresh tenant key wrapped by the provider's root key, and DEK version 1
/// wrapped by the tenant key. A duplicate name is an error (42710), never a silent no-op, so a
/// typo cannot hide behind an existing tenant. Returns the tenant key id.
#[pg_extern(volatile, parallel_unsafe)]
fn create_tenant(tenant: &str, provider: default!(&str, "'local'")) -> i32 {
    create_tenant_impl(tenant, provider).or_raise_audited("create_tenant", tenant) as i32
}

fn create_tenant_impl(tenant: &str, provider_name: &str) -> Result<u32> {
    validate_tenant_name(tenant)?;
    let mut provider = backend::build_provider(provider_name)?;
    crate::shred::check_dedicated_free(provider_name)?;
    if catalog::tenant_exists(tenant)? {
        return Err(EnvelopeError::TenantExists { tenant: tenant.to_string() });
    }
    let id = catalog::next_tenant_id()?;
    let fail = |error| EnvelopeError::Provider { provider: provider_name.to_string(), error };
    let rng_err = |e: getrandom::Error| EnvelopeError::Internal(format!("operating system random source failed: {e}"));

    let kek = SecretKey::generate().map_err(rng_err)?;
    let key_check = wrap::tenant_key_check(&kek);
    // Wrap, then prove the provider gives the same key back, before anything is stored under it.
    let name = tenant.to_string();
    let (kek, wrapped_kek, root_version) = crate::stampede::provider_call(provider_name, move || {
        let ctx = KeyContext { tenant: &name, tenant_key_id: id };
        let wrapped = provider.wrap_tenant_key(&ctx, &kek)?;
        let back = provider.unwrap_tenant_key(&ctx, &wrapped)?;
        if wrap::tenant_key_check(&back) != wrap::tenant_key_check(&kek) {
            return Err(pg_envelope_core::ProviderError::UnwrapFailed);
        }
        let root_version = provider.root_version_of(&wrapped);
        Ok((kek, wrapped, root_version))
    })
    .and_then(|r| r)
    .map_err(fail)?;
    let dek = SecretKey::generate().map_err(rng_err)?;
    let aad = wrap::WrapAad::DataKey { tenant, tenant_key_id: id, version: 1 };
    let wrapped_dek = wrap::wrap_key(&kek, &aad, &dek).map_err(rng_err)?;
    // The first blind-index key (sql/search.sql), in its own wrapping domain.
    let index_key = SecretKey::generate().map_err(rng_err)?;
    let aad = wrap::WrapAad::IndexKey { tenant, tenant_key_id: id, version: 1 };
    let wrapped_index_key = wrap::wrap_key(&kek, &aad, &index_key).map_err(rng_err)?;
    drop((kek, dek, index_key));
    catalog::insert_tenant(id, tenant, provider_name, &wrapped_kek, &key_check, &wrapped_dek, &wrapped_index_key, root_version.as_deref())?;
    crate::audit::key_op("create_tenant", tenant, &format!("provider {provider_name}"), false);
    // Backends may remember that the name did not exist: tell them at commit.
    backend::invalidate_after_commit();
    Ok(id)
}

/// Registers a key provider. `options` name files for credentials, never secrets themselves:
/// inline tokens, secret ids and PINs are refused. Only key administrators may call it.
#[pg_extern(volatile, parallel_unsafe)]
fn add_key_provider(name: &str, kind: &str, options: default!(pgrx::JsonB, "'{}'")) -> bool {
    add_key_provider_impl(name, kind, &options.0).or_raise_audited("add_key_provider", "");
    true
}

fn add_key_provider_impl(name: &str, kind: &str, options: &serde_json::Value) -> Result<()> {
    let original = options;
    // Registering a provider decides which files the server reads, which hosts it contacts and
    // which library it loads: superusers only, whatever EXECUTE grants say.
    if !unsafe { pg_sys::superuser() } {
        return Err(EnvelopeError::ProviderRegistrationDenied);
    }
    let valid_name = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid_name {
        return Err(EnvelopeError::InvalidProvider(format!("invalid provider name \"{name}\"")));
    }
    // The options every kind shares (key_cache_ttl, max_key_age, dedicated), then the kind's own.
    let (common, own) = pg_envelope_core::provider::common::CommonOptions::split(options)
        .map_err(|error| EnvelopeError::Provider { provider: name.to_string(), error })?;
    let options = &own;
    match kind {
        "vault_transit" => {
            pg_envelope_core::provider::vault::VaultTransitOptions::from_json(options)
                .map_err(|error| EnvelopeError::Provider { provider: name.to_string(), error })?;
        }
        "aws_kms" => {
            pg_envelope_core::provider::aws::AwsKmsOptions::from_json(options)
                .map_err(|error| EnvelopeError::Provider { provider: name.to_string(), error })?;
        }
        "pkcs11" => {
            pg_envelope_core::provider::pkcs11::Pkcs11Options::from_json(options)
                .map_err(|error| EnvelopeError::Provider { provider: name.to_string(), error })?;
        }
        "local" => {
            if options.as_object().map(|o| !o.is_empty()).unwrap_or(true) {
                return Err(EnvelopeError::InvalidProvider(
                    "the local provider takes no options but key_cache_ttl and max_key_age (its key file is envelope.local_root_key_file)".into(),
                ));
            }
            if common.dedicated {
                return Err(EnvelopeError::InvalidProvider(
                    "a local provider cannot be dedicated: its root key file is shared by every local provider and cannot be destroyed by a shred".into(),
                ));
            }
        }
        other => return Err(EnvelopeError::InvalidProvider(format!("unknown provider kind \"{other}\""))),
    }
    backend::check_provider_options(name, options)?;
    crate::shred::check_new_provider(name, kind, &original.to_string())?;
    if catalog::provider_row(name)?.is_some() {
        return Err(EnvelopeError::InvalidProvider(format!("key provider \"{name}\" already exists")));
    }
    crate::audit::key_op("add_key_provider", "", &format!("provider {name} ({kind})"), false);
    catalog::insert_provider(name, kind, &original.to_string())
}

/// Checks a provider end to end: wraps a fresh random key, unwraps it, and compares check
/// values. Returns what it measured; raises the provider's error when it fails.
#[pg_extern(volatile, parallel_unsafe)]
fn verify_provider(name: &str) -> pgrx::JsonB {
    let mut provider = backend::build_provider(name).or_raise();
    let kind = provider.kind();
    let started = std::time::Instant::now();
    let result = crate::stampede::provider_call(name, move || {
        let key = SecretKey::generate().map_err(|e| pg_envelope_core::ProviderError::Unavailable(e.to_string()))?;
        let ctx = KeyContext { tenant: "pg_envelope/verify_provider", tenant_key_id: 0 };
        let wrapped = provider.wrap_tenant_key(&ctx, &key)?;
        let back = provider.unwrap_tenant_key(&ctx, &wrapped)?;
        let other = KeyContext { tenant: "pg_envelope/verify_provider/other", tenant_key_id: 0 };
        let bound = provider.unwrap_tenant_key(&other, &wrapped).is_err();
        Ok::<_, pg_envelope_core::ProviderError>((wrap::tenant_key_check(&back) == wrap::tenant_key_check(&key), bound))
    })
    .and_then(|r| r);
    let (same, bound) = result.map_err(|error| EnvelopeError::Provider { provider: name.to_string(), error }).or_raise();
    if !same {
        EnvelopeError::Provider { provider: name.to_string(), error: pg_envelope_core::ProviderError::UnwrapFailed }.raise();
    }
    pgrx::JsonB(serde_json::json!({
        "provider": name, "kind": kind, "round_trip": true, "key_check": "match",
        "bound_to_tenant": bound, "milliseconds": started.elapsed().as_secs_f64() * 1000.0,
    }))
}

/// Moves a tenant to another provider (or re-wraps under the same provider's current root key
/// version) without touching its DEKs or any data: unwrap with the old provider, check the key,
/// wrap with the new one. Every backend drops its cache at commit.
#[pg_extern(volatile, parallel_unsafe)]
fn rewrap_tenant(tenant: &str, provider: &str) -> bool {
    rewrap_tenant_impl(tenant, provider).or_raise_audited("rewrap_tenant", tenant);
    true
}

fn rewrap_tenant_impl(tenant: &str, new_provider: &str) -> Result<()> {
    // Locked like every key change of a tenant: a concurrent rotation waits for it.
    let t = catalog::lock_tenant(tenant)?.ok_or_else(|| EnvelopeError::TenantUnknown { tenant: tenant.to_string() })?;
    if let Some(refusal) = &t.refusal {
        return Err(refusal.error(tenant));
    }
    if new_provider != t.provider {
        crate::shred::check_dedicated_free(new_provider)?;
    }
    let (id, old_name, wrapped, key_check) = (t.id, t.provider.clone(), t.wrapped_key, t.key_check);
    let mut old = backend::provider_for(&t.provider, &t.provider_kind, &t.provider_options)?;
    let mut new = backend::build_provider(new_provider)?;
    let name = tenant.to_string();
    enum Failure {
        Old(pg_envelope_core::ProviderError),
        New(pg_envelope_core::ProviderError),
        OldKeyMismatch,
    }
    let fail = |f: Failure| match f {
        Failure::Old(error) => EnvelopeError::Provider { provider: old_name.clone(), error },
        Failure::New(error) => EnvelopeError::Provider { provider: new_provider.to_string(), error },
        Failure::OldKeyMismatch => EnvelopeError::KeyCheckMismatch { tenant: tenant.to_string(), provider: old_name.clone() },
    };
    // The unwrap in a slot of the source provider, the wrap in a slot of the target: a target
    // that hangs holds only its own slots (an insider review exhausted the `local` provider's
    // slots with rewraps to a hung key server while they shared one).
    let source_name = name.clone();
    let kek = crate::stampede::provider_call(&t.provider, move || -> std::result::Result<_, Failure> {
        let ctx = KeyContext { tenant: &source_name, tenant_key_id: id };
        let kek = old.unwrap_tenant_key(&ctx, &wrapped).map_err(Failure::Old)?;
        if wrap::tenant_key_check(&kek).as_slice() != key_check.as_slice() {
            return Err(Failure::OldKeyMismatch);
        }
        Ok(kek)
    })
    .unwrap_or_else(|e| Err(Failure::Old(e)))
    .map_err(fail)?;
    let result = crate::stampede::provider_call(new_provider, move || -> std::result::Result<(Vec<u8>, Option<String>), Failure> {
        let ctx = KeyContext { tenant: &name, tenant_key_id: id };
        let rewrapped = new.wrap_tenant_key(&ctx, &kek).map_err(Failure::New)?;
        let back = new.unwrap_tenant_key(&ctx, &rewrapped).map_err(Failure::New)?;
        if wrap::tenant_key_check(&back) != wrap::tenant_key_check(&kek) {
            return Err(Failure::New(pg_envelope_core::ProviderError::UnwrapFailed));
        }
        let root_version = new.root_version_of(&rewrapped);
        Ok((rewrapped, root_version))
    })
    .unwrap_or_else(|e| Err(Failure::New(e)));
    let (rewrapped, root_version) = result.map_err(fail)?;
    catalog::update_tenant_wrapping(tenant, new_provider, &rewrapped, root_version.as_deref())?;
    crate::audit::key_op("rewrap_tenant", tenant, &format!("to provider {new_provider}"), false);
    backend::invalidate_after_commit();
    Ok(())
}

fn validate_tenant_name(tenant: &str) -> Result<()> {
    if tenant.is_empty() || tenant.len() > 255 || tenant.chars().any(char::is_control) {
        return Err(EnvelopeError::InvalidTenantName);
    }
    Ok(())
}

/// Allows `role` (and every role that is a member of it) to use the tenant's keys.
/// Returns false when the grant already existed.
#[pg_extern(volatile, parallel_unsafe)]
fn grant_tenant(tenant: &str, role: &str) -> bool {
    set_grant(tenant, role, true).or_raise_audited("grant_tenant", tenant)
}

/// Takes the right back. Every backend drops its cached keys at the next use after commit.
/// Returns false when there was no such grant.
#[pg_extern(volatile, parallel_unsafe)]
fn revoke_tenant(tenant: &str, role: &str) -> bool {
    set_grant(tenant, role, false).or_raise_audited("revoke_tenant", tenant)
}

fn set_grant(tenant: &str, role: &str, grant: bool) -> Result<bool> {
    let role_c = std::ffi::CString::new(role).map_err(|_| EnvelopeError::Internal("role name contains NUL".into()))?;
    let oid = unsafe { pg_sys::get_role_oid(role_c.as_ptr(), false) };
    if grant {
        if let Some(t) = catalog::lock_tenant(tenant)? {
            if let Some(r @ catalog::Refusal::Shredded { .. }) = &t.refusal {
                return Err(r.error(tenant));
            }
        }
    }
    let changed = catalog::set_grant(tenant, oid, grant)?;
    crate::audit::key_op(if grant { "grant_tenant" } else { "revoke_tenant" }, tenant, &format!("role {role}"), false);
    if grant {
        backend::invalidate_after_commit();
    } else {
        backend::revoke_after_commit();
    }
    Ok(changed)
}

/// This backend's view of pg_envelope: provider, cache contents (ids, versions, ages, hits;
/// never key bytes) and the number of root-key unwraps it has made.
#[pg_extern(volatile, parallel_restricted)]
fn status() -> JsonB {
    JsonB(crate::status::status_json().or_raise())
}

/// The tenants cached in this backend, one row each. Never key bytes.
#[pg_extern(volatile, parallel_restricted)]
fn key_cache() -> TableIterator<
    'static,
    (
        name!(tenant, String),
        name!(tenant_key_id, i64),
        name!(provider, String),
        name!(active_dek_version, i64),
        name!(dek_versions, Vec<i64>),
        name!(age_seconds, f64),
        name!(expires_in_seconds, f64),
        name!(hits, i64),
        name!(degraded_by, Option<String>),
    ),
> {
    TableIterator::new(crate::status::cache_rows())
}
