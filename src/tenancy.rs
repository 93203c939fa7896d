//! What RLS policies and constraints can trust: the authorized tenant, and whether a stored
//! value belongs to a row's tenant (read from the envelope header; nothing is decrypted).
//!
//! A bare `current_setting('app.tenant_id')` in a policy lets any role that can SET it (every
//! role) name any tenant: a role granted `acme` could read, insert, update and delete `globex`'s
//! rows (ciphertext and plaintext metadata), and plant well-formed envelopes of its own there.
//! `envelope.authorized_tenant()` is the setting only when the current role holds that tenant's
//! grant, else NULL, so a policy `USING (tenant = envelope.authorized_tenant())` shows nothing
//! and accepts nothing for a tenant the role was not granted. `envelope.belongs_to(value,
//! tenant)` checks the value's header (its tenant key id) against the tenant, for `WITH CHECK`
//! or a CHECK constraint: a ciphertext of another tenant cannot be stored in this tenant's rows.

use pg_envelope_core::Envelope;
use pgrx::prelude::*;

use crate::backend;
use crate::error::{EnvelopeError, OrRaise};

/// The tenant setting, when the current role may use that tenant's keys; NULL when the setting
/// is unset or empty, names no tenant, or names one the role holds no grant for. Reads no key.
#[pg_extern(stable, parallel_restricted)]
fn authorized_tenant() -> Option<&'static str> {
    if !backend::PRELOADED.load(std::sync::atomic::Ordering::Relaxed) {
        EnvelopeError::NotPreloaded.raise();
    }
    let tenant = match backend::current_tenant() {
        Ok(t) => t,
        Err(EnvelopeError::TenantUnset { .. } | EnvelopeError::InvalidTenantName) => return None,
        Err(e) => e.raise(),
    };
    let role = crate::nothrow::current_user_id();
    match backend::with_backend(|b| b.check_grant(tenant, role)) {
        Ok(_) => Some(tenant),
        Err(EnvelopeError::TenantUnknown { .. } | EnvelopeError::TenantDenied { .. }) => None,
        Err(e) => e.raise(),
    }
}

/// Whether a stored value (an envelope) was encrypted under `tenant`'s keys, read from its
/// header alone: no key is used. NULL values belong to every tenant (there is nothing stored);
/// anything that is not an envelope, or a tenant that does not exist, is false. A role that
/// neither holds the tenant's grant nor may read `envelope.tenants` always gets false, so the
/// function is no oracle for which tenants exist or which key id they have.
#[pg_extern(stable, parallel_restricted)]
fn belongs_to(value: Option<&[u8]>, tenant: Option<&str>) -> bool {
    let Some(value) = value else { return true };
    let Some(tenant) = tenant else { return false };
    let Ok(env) = Envelope::parse(value) else { return false };
    let role = crate::nothrow::current_user_id();
    match backend::with_backend(|b| b.visible_tenant_key_id(tenant, role)).or_raise() {
        Some(id) => env.tenant_key_id == id,
        None => false,
    }
}
