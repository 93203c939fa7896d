//! The SQL functions. Each body converts its arguments and delegates.

use pg_envelope_core::{wrap, KeyContext, SecretKey};
use pgrx::prelude::*;
use pgrx::JsonB;

use crate::backend;
use crate::catalog;
use crate::error::{EnvelopeError, OrRaise, Result};

/// Encrypts text for the current tenant. NULL stays NULL.
#[pg_extern(volatile, parallel_restricted)]
fn encrypt_field(data: Option<&str>, context: default!(Option<&str>, "NULL")) -> Option<Vec<u8>> {
    data.map(|d| backend::encrypt(d.as_bytes(), context).or_raise())
}

/// Encrypts bytea for the current tenant. NULL stays NULL.
#[pg_extern(volatile, parallel_restricted, name = "encrypt_field")]
fn encrypt_field_bytea_input(data: Option<&[u8]>, context: default!(Option<&str>, "NULL")) -> Option<Vec<u8>> {
    data.map(|d| backend::encrypt(d, context).or_raise())
}

/// Decrypts an envelope to text. NULL stays NULL; anything else that fails raises an error.
#[pg_extern(stable, parallel_restricted)]
fn decrypt_field(ciphertext: Option<&[u8]>, context: default!(Option<&str>, "NULL")) -> Option<String> {
    ciphertext.map(|c| into_text(backend::decrypt(c, context)).or_raise())
}

/// Decrypts an envelope to bytea (the twin of `decrypt_field`, named like pgcrypto's
/// `pgp_sym_decrypt_bytea`).
#[pg_extern(stable, parallel_restricted)]
fn decrypt_field_bytea(ciphertext: Option<&[u8]>, context: default!(Option<&str>, "NULL")) -> Option<Vec<u8>> {
    ciphertext.map(|c| backend::decrypt(c, context).or_raise())
}

fn into_text(bytes: Result<Vec<u8>>) -> Result<String> {
    let bytes = bytes?;
    if bytes.contains(&0) {
        return Err(EnvelopeError::NotText);
    }
    String::from_utf8(bytes).map_err(|_| EnvelopeError::NotText)
}

/// Creates a tenant: a fresh tenant key wrapped by the provider's root key, and DEK version 1
/// wrapped by the tenant key. A duplicate name is an error (42710), never a silent no-op, so a
/// typo cannot hide behind an existing tenant. Returns the tenant key id.
#[pg_extern(volatile, parallel_unsafe)]
fn create_tenant(tenant: &str, provider: default!(&str, "'local'")) -> i32 {
    create_tenant_impl(tenant, provider).or_raise() as i32
}

fn create_tenant_impl(tenant: &str, provider_name: &str) -> Result<u32> {
    validate_tenant_name(tenant)?;
    let mut provider = backend::build_provider(provider_name)?;
    if catalog::tenant_exists(tenant)? {
        return Err(EnvelopeError::TenantExists { tenant: tenant.to_string() });
    }
    let id = catalog::next_tenant_id()?;
    let ctx = KeyContext { tenant, tenant_key_id: id };
    let fail = |error| EnvelopeError::Provider { provider: provider_name.to_string(), error };
    let rng_err = |e: getrandom::Error| EnvelopeError::Internal(format!("operating system random source failed: {e}"));

    let kek = SecretKey::generate().map_err(rng_err)?;
    let wrapped_kek = provider.wrap_tenant_key(&ctx, &kek).map_err(fail)?;
    // Prove the provider can give the key back before anything is stored under it.
    let check = provider.unwrap_tenant_key(&ctx, &wrapped_kek).map_err(fail)?;
    let dek = SecretKey::generate().map_err(rng_err)?;
    let aad = wrap::WrapAad::DataKey { tenant, tenant_key_id: id, version: 1 };
    let wrapped_dek = wrap::wrap_key(&kek, &aad, &dek).map_err(rng_err)?;
    if wrap::unwrap_key(&check, &aad, &wrapped_dek).is_err() {
        return Err(fail(pg_envelope_core::ProviderError::UnwrapFailed));
    }
    drop((kek, check, dek));
    catalog::insert_tenant(id, tenant, provider_name, &wrapped_kek, &wrapped_dek)?;
    Ok(id)
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
    set_grant(tenant, role, true).or_raise()
}

/// Takes the right back. Every backend drops its cached keys at the next use after commit.
/// Returns false when there was no such grant.
#[pg_extern(volatile, parallel_unsafe)]
fn revoke_tenant(tenant: &str, role: &str) -> bool {
    set_grant(tenant, role, false).or_raise()
}

fn set_grant(tenant: &str, role: &str, grant: bool) -> Result<bool> {
    let role_c = std::ffi::CString::new(role).map_err(|_| EnvelopeError::Internal("role name contains NUL".into()))?;
    let oid = unsafe { pg_sys::get_role_oid(role_c.as_ptr(), false) };
    let changed = catalog::set_grant(tenant, oid, grant)?;
    backend::invalidate_after_commit();
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
    ),
> {
    TableIterator::new(crate::status::cache_rows())
}
