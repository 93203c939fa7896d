//! Key lifecycle, SQL glue: data key rotation and header-only inspection of stored values.
//!
//! `envelope.rotate_data_key(tenant)` makes a new DEK version, active for new writes in every
//! backend at its next call (the shared epoch); earlier versions stay readable (`retired`).
//! Concurrent rotations of one tenant serialize on the tenant's row (`FOR UPDATE`), and the next
//! version number is read under a fresh snapshot after the lock, so each makes its own version and
//! exactly one stays active. The tenant key is unwrapped on the key-provider thread and never
//! leaves it; what comes back is the new wrapped DEK.

use pg_envelope_core::{Envelope, KeyContext};
use pgrx::prelude::*;

use crate::backend;
use crate::catalog;
use crate::error::{EnvelopeError, OrRaise, Result};

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

/// Makes a new data key version for `tenant` and returns it. Key administrators only.
#[pg_extern(volatile, parallel_unsafe)]
fn rotate_data_key(tenant: &str) -> i32 {
    rotate_data_key_impl(tenant).or_raise() as i32
}

fn rotate_data_key_impl(tenant: &str) -> Result<u32> {
    let t = catalog::lock_tenant(tenant)?.ok_or_else(|| EnvelopeError::TenantUnknown { tenant: tenant.to_string() })?;
    let version = catalog::next_data_key_version(t.id)?;
    let mut provider = backend::provider_for(&t.provider, &t.provider_kind, &t.provider_options)?;
    let name = tenant.to_string();
    let (id, wrapped_kek, key_check) = (t.id, t.wrapped_key, t.key_check);
    enum Failure {
        Provider(pg_envelope_core::ProviderError),
        Lifecycle(pg_envelope_core::lifecycle::LifecycleError),
    }
    let wrapped = backend::interruptible(move || {
        let ctx = KeyContext { tenant: &name, tenant_key_id: id };
        let kek = provider.unwrap_tenant_key(&ctx, &wrapped_kek).map_err(Failure::Provider)?;
        pg_envelope_core::lifecycle::new_wrapped_data_key(&kek, &key_check, &name, id, version).map_err(Failure::Lifecycle)
    })
    .map_err(|f| match f {
        Failure::Provider(error) => EnvelopeError::Provider { provider: t.provider.clone(), error },
        Failure::Lifecycle(pg_envelope_core::lifecycle::LifecycleError::KeyCheckMismatch) => {
            EnvelopeError::KeyCheckMismatch { tenant: tenant.to_string(), provider: t.provider.clone() }
        }
        Failure::Lifecycle(e) => EnvelopeError::Internal(e.to_string()),
    })?;
    catalog::activate_data_key(id, version, &wrapped)?;
    backend::invalidate_after_commit();
    Ok(version)
}
