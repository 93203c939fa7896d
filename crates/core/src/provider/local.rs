//! The `local` provider: the root key is a file on the database server.
//!
//! For demos, development and tests. NOT for production: anyone who can read the file (root,
//! the postgres OS user, a backup of the server's disk) holds every tenant's keys. Use a KMS or
//! HSM provider in production.
//!
//! The file holds exactly 32 random bytes, or 64 hexadecimal characters (an optional trailing
//! newline is allowed). It must be a regular file owned by the server's OS user with no group or
//! other permissions (mode 0600 or 0400), and should live outside the data directory so that
//! base backups do not carry it. It is read on every wrap and unwrap and never kept in memory.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroize;

use super::{KeyContext, KeyProvider, ProviderError};
use crate::secret::{SecretKey, KEY_LEN};
use crate::wrap::{self, WrapAad};

pub struct LocalProvider {
    path: PathBuf,
}

impl LocalProvider {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        LocalProvider { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads and validates the root key file.
    pub fn load_root_key(&self) -> Result<SecretKey, ProviderError> {
        let shown = self.path.display();
        if !self.path.is_absolute() {
            return Err(ProviderError::Misconfigured(format!("root key file \"{shown}\" must be an absolute path")));
        }
        let mut file = File::open(&self.path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ProviderError::NotConfigured(format!("root key file \"{shown}\" does not exist")),
            std::io::ErrorKind::PermissionDenied => {
                ProviderError::Misconfigured(format!("root key file \"{shown}\" is not readable by the server's OS user"))
            }
            _ => ProviderError::Unavailable(format!("cannot open root key file \"{shown}\": {e}")),
        })?;
        let meta = file
            .metadata()
            .map_err(|e| ProviderError::Unavailable(format!("cannot stat root key file \"{shown}\": {e}")))?;
        if !meta.is_file() {
            return Err(ProviderError::Misconfigured(format!("root key file \"{shown}\" is not a regular file")));
        }
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(ProviderError::Misconfigured(format!(
                "root key file \"{shown}\" has mode {mode:04o}; it must not be accessible to group or others (chmod 0600)"
            )));
        }
        let euid = unsafe { libc::geteuid() };
        if meta.uid() != euid {
            return Err(ProviderError::Misconfigured(format!(
                "root key file \"{shown}\" must be owned by the server's OS user (uid {euid}), not uid {}",
                meta.uid()
            )));
        }
        if meta.len() > 256 {
            return Err(ProviderError::Misconfigured(format!(
                "root key file \"{shown}\" must hold 32 raw bytes or 64 hex characters"
            )));
        }
        let mut buf = Vec::with_capacity(80);
        let read = file.read_to_end(&mut buf);
        let parsed = match read {
            Ok(_) => parse_key_material(&buf),
            Err(e) => Err(ProviderError::Unavailable(format!("cannot read root key file \"{shown}\": {e}"))),
        };
        buf.zeroize();
        parsed.map_err(|e| match e {
            ProviderError::Misconfigured(_) => ProviderError::Misconfigured(format!(
                "root key file \"{shown}\" must hold 32 raw bytes or 64 hex characters"
            )),
            other => other,
        })
    }
}

/// [`parse_key_material`] for the fuzz targets (crate::fuzzing).
pub fn parse_key_material_for_fuzzing(buf: &[u8]) -> bool {
    parse_key_material(buf).is_ok()
}

fn parse_key_material(buf: &[u8]) -> Result<SecretKey, ProviderError> {
    if buf.len() == KEY_LEN {
        return SecretKey::from_slice(buf).ok_or(ProviderError::Misconfigured(String::new()));
    }
    let trimmed = buf.strip_suffix(b"\n").unwrap_or(buf);
    if trimmed.len() == 2 * KEY_LEN {
        let mut raw = [0u8; KEY_LEN];
        let mut ok = true;
        for i in 0..KEY_LEN {
            match (hex_val(trimmed[2 * i]), hex_val(trimmed[2 * i + 1])) {
                (Some(h), Some(l)) => raw[i] = (h << 4) | l,
                _ => ok = false,
            }
        }
        if ok {
            return Ok(SecretKey::from_bytes(&mut raw));
        }
        raw.zeroize();
    }
    Err(ProviderError::Misconfigured(String::new()))
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl KeyProvider for LocalProvider {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn describe(&self) -> Vec<(&'static str, String)> {
        vec![
            ("root_key_file", self.path.display().to_string()),
            ("security", "root key is a file on this server: for development and tests only".into()),
        ]
    }

    fn wrap_tenant_key(&mut self, ctx: &KeyContext<'_>, key: &SecretKey) -> Result<Vec<u8>, ProviderError> {
        let root = self.load_root_key()?;
        let aad = WrapAad::TenantKey { tenant: ctx.tenant, tenant_key_id: ctx.tenant_key_id };
        wrap::wrap_key(&root, &aad, key)
            .map_err(|e| ProviderError::Unavailable(format!("operating system random source failed: {e}")))
    }

    fn unwrap_tenant_key(&mut self, ctx: &KeyContext<'_>, wrapped: &[u8]) -> Result<SecretKey, ProviderError> {
        let root = self.load_root_key()?;
        let aad = WrapAad::TenantKey { tenant: ctx.tenant, tenant_key_id: ctx.tenant_key_id };
        wrap::unwrap_key(&root, &aad, wrapped).map_err(|_| ProviderError::UnwrapFailed)
    }

    /// HMAC-SHA-256 with an HKDF subkey of the root key file. **Development only**: whoever
    /// reads the file can forge checkpoints, and no KMS log witnesses them.
    fn checkpoint_mac(&mut self, message: &[u8]) -> Result<super::CheckpointMac, ProviderError> {
        let root = self.load_root_key()?;
        let mac = crate::audit::local_checkpoint_mac(&root, message);
        Ok(super::CheckpointMac { key: format!("local {} (development only)", self.path.display()), mac: mac.to_vec() })
    }

    fn verify_checkpoint_mac(&mut self, message: &[u8], mac: &[u8]) -> Result<bool, ProviderError> {
        let root = self.load_root_key()?;
        let good = crate::audit::local_checkpoint_mac(&root, message);
        Ok(mac.len() == good.len() && subtle::ConstantTimeEq::ct_eq(mac, &good[..]).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    fn key_file(dir: &Path, name: &str, content: &[u8], mode: u32) -> PathBuf {
        let p = dir.join(name);
        let mut f = File::create(&p).unwrap();
        f.write_all(content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn accepts_raw_and_hex_files() {
        let d = tempfile::tempdir().unwrap();
        let raw = key_file(d.path(), "raw", &[9u8; 32], 0o600);
        let hex = key_file(d.path(), "hex", format!("{}\n", "09".repeat(32)).as_bytes(), 0o400);
        let a = LocalProvider::new(raw).load_root_key().unwrap();
        let b = LocalProvider::new(hex).load_root_key().unwrap();
        assert_eq!(a.expose(), b.expose());
    }

    #[test]
    fn refuses_group_or_world_readable_files() {
        let d = tempfile::tempdir().unwrap();
        let p = key_file(d.path(), "k", &[1u8; 32], 0o640);
        let err = LocalProvider::new(&p).load_root_key().err().unwrap();
        assert!(matches!(err, ProviderError::Misconfigured(ref m) if m.contains("0640")), "{err}");
    }

    #[test]
    fn refuses_wrong_lengths_and_garbage_without_echoing_content() {
        let d = tempfile::tempdir().unwrap();
        for (name, content) in [("short", &b"abc"[..]), ("hexbad", &[b'z'; 64][..]), ("long", &[1u8; 33][..])] {
            let p = key_file(d.path(), name, content, 0o600);
            let err = LocalProvider::new(&p).load_root_key().err().unwrap();
            let msg = err.to_string();
            assert!(matches!(err, ProviderError::Misconfigured(_)), "{msg}");
            assert!(!msg.contains("zzzz"), "error echoes file content: {msg}");
        }
    }

    #[test]
    fn passes_the_provider_contract() {
        let d = tempfile::tempdir().unwrap();
        let a = key_file(d.path(), "a", &[3u8; 32], 0o600);
        let b = key_file(d.path(), "b", &[4u8; 32], 0o600);
        crate::provider::testing::provider_contract(&mut LocalProvider::new(&a), &mut LocalProvider::new(&b));
        crate::provider::testing::checkpoint_contract(&mut LocalProvider::new(&a), &mut LocalProvider::new(&b));
    }

    #[test]
    fn missing_file_and_relative_path() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            LocalProvider::new(d.path().join("nope")).load_root_key(),
            Err(ProviderError::NotConfigured(_))
        ));
        assert!(matches!(LocalProvider::new("relative.key").load_root_key(), Err(ProviderError::Misconfigured(_))));
    }
}
