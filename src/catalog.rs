//! Reads and writes of the extension's key tables.
//!
//! The tables are not readable by PUBLIC. Every query here runs as the extension's owner with
//! `search_path` pinned to `pg_catalog, pg_temp` (the same two steps a SECURITY DEFINER function
//! takes), inside [`as_extension_owner`]. That happens only on a cache miss or in key
//! management, never per row, so the hot path pays nothing for it. Who may call what is decided
//! by EXECUTE grants on the SQL functions and by `envelope.tenant_grants`, checked in Rust.

use pg_envelope_core::{TenantRecord, WrappedDek};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::error::{EnvelopeError, Result};

/// Restores the caller's user id and settings when dropped, also while unwinding from an ERROR.
struct OwnerScope {
    saved_uid: pg_sys::Oid,
    saved_ctx: i32,
    nest_level: i32,
}

impl Drop for OwnerScope {
    fn drop(&mut self) {
        unsafe {
            pg_sys::SetUserIdAndSecContext(self.saved_uid, self.saved_ctx);
            pg_sys::AtEOXact_GUC(true, self.nest_level);
        }
    }
}

/// Runs `f` as the extension owner with a pinned search_path.
pub fn as_extension_owner<R>(f: impl FnOnce() -> R) -> R {
    let mut saved_uid = pg_sys::Oid::INVALID;
    let mut saved_ctx = 0i32;
    let scope = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_uid, &mut saved_ctx);
        let nest_level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        OwnerScope { saved_uid, saved_ctx, nest_level }
    };
    let owner = extension_owner();
    unsafe {
        pg_sys::SetUserIdAndSecContext(
            owner,
            saved_ctx | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32 | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
    }
    let out = f();
    drop(scope);
    out
}

fn extension_owner() -> pg_sys::Oid {
    Spi::get_one::<pg_sys::Oid>("SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'pg_envelope'")
        .ok()
        .flatten()
        .unwrap_or_else(|| EnvelopeError::Internal("the pg_envelope extension is not installed in this database".into()).raise())
}

fn spi_err(e: pgrx::spi::SpiError) -> EnvelopeError {
    EnvelopeError::Internal(format!("catalog query failed: {e}"))
}

/// A tenant as the cache needs it: keys to unwrap, the provider, and the roles allowed to use it.
pub struct TenantRow {
    pub record: TenantRecord,
    pub provider: String,
    pub provider_kind: String,
    pub provider_options: String,
    pub grantees: Vec<pg_sys::Oid>,
}

/// Loads a tenant's wrapped keys and grants. `Ok(None)` when no such tenant exists.
pub fn load_tenant(tenant: &str) -> Result<Option<TenantRow>> {
    as_extension_owner(|| {
        Spi::connect(|client| {
            let head = client
                .select(
                    "SELECT t.id, t.wrapped_key, t.provider, p.kind, p.options::text, t.key_check
                       FROM envelope.tenants t JOIN envelope.key_providers p ON p.name = t.provider
                      WHERE t.name = $1",
                    Some(1),
                    &[tenant.into()],
                )
                .map_err(spi_err)?;
            if head.is_empty() {
                return Ok(None);
            }
            let row = head.first();
            let id: i32 = row.get(1).map_err(spi_err)?.ok_or_else(|| missing("id"))?;
            let wrapped: Vec<u8> = row.get(2).map_err(spi_err)?.ok_or_else(|| missing("wrapped_key"))?;
            let provider: String = row.get(3).map_err(spi_err)?.ok_or_else(|| missing("provider"))?;
            let provider_kind: String = row.get(4).map_err(spi_err)?.ok_or_else(|| missing("kind"))?;
            let provider_options: String = row.get(5).map_err(spi_err)?.ok_or_else(|| missing("options"))?;
            let key_check: Vec<u8> = row.get(6).map_err(spi_err)?.ok_or_else(|| missing("key_check"))?;
            let key_check: [u8; 32] = key_check.try_into().map_err(|_| missing("key_check"))?;

            let mut deks = Vec::new();
            let mut active = None;
            for r in client
                .select(
                    "SELECT version, wrapped_key, state = 'active' FROM envelope.data_keys
                      WHERE tenant_id = $1 AND state <> 'revoked' ORDER BY version",
                    None,
                    &[id.into()],
                )
                .map_err(spi_err)?
            {
                let version: i32 = r.get(1).map_err(spi_err)?.ok_or_else(|| missing("version"))?;
                let wrapped: Vec<u8> = r.get(2).map_err(spi_err)?.ok_or_else(|| missing("wrapped_key"))?;
                if r.get::<bool>(3).map_err(spi_err)?.unwrap_or(false) {
                    active = Some(version as u32);
                }
                deks.push(WrappedDek { version: version as u32, wrapped });
            }
            let grantees = grantees_of(&client, id)?;
            Ok(Some(TenantRow {
                record: TenantRecord {
                    tenant: tenant.to_string(),
                    tenant_key_id: id as u32,
                    wrapped_tenant_key: wrapped,
                    tenant_key_check: Some(key_check),
                    active_dek_version: active.unwrap_or(0),
                    deks,
                },
                provider,
                provider_kind,
                provider_options,
                grantees,
            }))
        })
    })
}

fn grantees_of(client: &SpiClient<'_>, tenant_id: i32) -> Result<Vec<pg_sys::Oid>> {
    let mut out = Vec::new();
    for r in client
        .select("SELECT grantee::oid FROM envelope.tenant_grants WHERE tenant_id = $1", None, &[tenant_id.into()])
        .map_err(spi_err)?
    {
        if let Some(oid) = r.get::<pg_sys::Oid>(1).map_err(spi_err)? {
            out.push(oid);
        }
    }
    Ok(out)
}

fn missing(col: &str) -> EnvelopeError {
    EnvelopeError::Internal(format!("unexpected NULL in key table column {col}"))
}

/// A provider's kind and options (JSON text), or `None` if it does not exist.
pub fn provider_row(name: &str) -> Result<Option<(String, String)>> {
    as_extension_owner(|| {
        Spi::connect(|client| {
            let t = client
                .select("SELECT kind, options::text FROM envelope.key_providers WHERE name = $1", Some(1), &[name.into()])
                .map_err(spi_err)?;
            if t.is_empty() {
                return Ok(None);
            }
            let r = t.first();
            Ok(Some((
                r.get::<String>(1).map_err(spi_err)?.ok_or_else(|| missing("kind"))?,
                r.get::<String>(2).map_err(spi_err)?.ok_or_else(|| missing("options"))?,
            )))
        })
    })
}

/// Every provider as (name, kind, options JSON text), by name.
pub fn provider_rows() -> Result<Vec<(String, String, String)>> {
    as_extension_owner(|| {
        Spi::connect(|client| {
            let t = client
                .select("SELECT name, kind, options::text FROM envelope.key_providers ORDER BY name", None, &[])
                .map_err(spi_err)?;
            t.into_iter()
                .map(|r| {
                    Ok((
                        r.get::<String>(1).map_err(spi_err)?.ok_or_else(|| missing("name"))?,
                        r.get::<String>(2).map_err(spi_err)?.ok_or_else(|| missing("kind"))?,
                        r.get::<String>(3).map_err(spi_err)?.ok_or_else(|| missing("options"))?,
                    ))
                })
                .collect()
        })
    })
}

/// Registers a provider. The options were validated by the caller.
pub fn insert_provider(name: &str, kind: &str, options_json: &str) -> Result<()> {
    as_extension_owner(|| {
        Spi::connect_mut(|client| {
            client
                .update(
                    "INSERT INTO envelope.key_providers (name, kind, options) VALUES ($1, $2, $3::jsonb)",
                    None,
                    &[name.into(), kind.into(), options_json.into()],
                )
                .map_err(spi_err)?;
            Ok(())
        })
    })
}

/// The wrapped tenant key, its id and check value, for re-wrapping.
pub fn tenant_wrapping(tenant: &str) -> Result<Option<(u32, String, Vec<u8>, Vec<u8>)>> {
    as_extension_owner(|| {
        Spi::connect(|client| {
            let t = client
                .select("SELECT id, provider, wrapped_key, key_check FROM envelope.tenants WHERE name = $1", Some(1), &[tenant.into()])
                .map_err(spi_err)?;
            if t.is_empty() {
                return Ok(None);
            }
            let r = t.first();
            Ok(Some((
                r.get::<i32>(1).map_err(spi_err)?.ok_or_else(|| missing("id"))? as u32,
                r.get::<String>(2).map_err(spi_err)?.ok_or_else(|| missing("provider"))?,
                r.get::<Vec<u8>>(3).map_err(spi_err)?.ok_or_else(|| missing("wrapped_key"))?,
                r.get::<Vec<u8>>(4).map_err(spi_err)?.ok_or_else(|| missing("key_check"))?,
            )))
        })
    })
}

/// Points a tenant at another provider (or a new root key version) with its re-wrapped key.
pub fn update_tenant_wrapping(tenant: &str, provider: &str, wrapped: &[u8]) -> Result<()> {
    as_extension_owner(|| {
        Spi::connect_mut(|client| {
            client
                .update(
                    "UPDATE envelope.tenants SET provider = $2, wrapped_key = $3 WHERE name = $1",
                    None,
                    &[tenant.into(), provider.into(), wrapped.into()],
                )
                .map_err(spi_err)?;
            Ok(())
        })
    })
}

pub fn tenant_exists(name: &str) -> Result<bool> {
    as_extension_owner(|| {
        Spi::get_one_with_args::<bool>("SELECT EXISTS (SELECT 1 FROM envelope.tenants WHERE name = $1)", &[name.into()])
            .map(|v| v.unwrap_or(false))
            .map_err(spi_err)
    })
}

pub fn next_tenant_id() -> Result<u32> {
    as_extension_owner(|| {
        Spi::get_one::<i64>("SELECT nextval('envelope.tenant_id_seq')")
            .map_err(spi_err)?
            .map(|v| v as u32)
            .ok_or_else(|| missing("nextval"))
    })
}

/// Inserts a new tenant with its first DEK (version 1, active).
pub fn insert_tenant(id: u32, name: &str, provider: &str, wrapped_kek: &[u8], key_check: &[u8], wrapped_dek: &[u8]) -> Result<()> {
    as_extension_owner(|| {
        Spi::connect_mut(|client| {
            client
                .update(
                    "INSERT INTO envelope.tenants (id, name, provider, wrapped_key, key_check) VALUES ($1, $2, $3, $4, $5)",
                    None,
                    &[(id as i32).into(), name.into(), provider.into(), wrapped_kek.into(), key_check.into()],
                )
                .map_err(spi_err)?;
            client
                .update(
                    "INSERT INTO envelope.data_keys (tenant_id, version, wrapped_key, state) VALUES ($1, 1, $2, 'active')",
                    None,
                    &[(id as i32).into(), wrapped_dek.into()],
                )
                .map_err(spi_err)?;
            Ok(())
        })
    })
}

/// Adds or removes a grant. Returns whether anything changed.
pub fn set_grant(tenant: &str, role: pg_sys::Oid, grant: bool) -> Result<bool> {
    as_extension_owner(|| {
        Spi::connect_mut(|client| {
            let id: Option<i32> = client
                .select("SELECT id FROM envelope.tenants WHERE name = $1", Some(1), &[tenant.into()])
                .map_err(spi_err)?
                .first()
                .get(1)
                .unwrap_or(None);
            let Some(id) = id else {
                return Err(EnvelopeError::TenantUnknown { tenant: tenant.to_string() });
            };
            let sql = if grant {
                "INSERT INTO envelope.tenant_grants (tenant_id, grantee) VALUES ($1, $2::oid::regrole) ON CONFLICT DO NOTHING"
            } else {
                "DELETE FROM envelope.tenant_grants WHERE tenant_id = $1 AND grantee = $2::oid::regrole"
            };
            let t = client.update(sql, None, &[id.into(), role.into()]).map_err(spi_err)?;
            Ok(t.len() > 0)
        })
    })
}
