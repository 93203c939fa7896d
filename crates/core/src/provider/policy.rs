//! What provider options may point at: the DBA's allowlists from postgresql.conf.
//!
//! A provider's options name files the server reads (tokens, AppRole ids, credentials, PINs, CA
//! bundles) and, for PKCS#11, a library the backend loads. Whoever could choose those could make
//! the server read any file it can read and send it to a host of their choice, or load any
//! library. So every option that names a file (`*_file`) must resolve — symlinks followed — to a
//! path under one of `envelope.credential_dirs`, and a PKCS#11 `module` must be one of
//! `envelope.pkcs11_modules`. Both settings live in postgresql.conf (SIGHUP) and are checked at
//! registration *and* every time a provider is built from its row, so a row restored from a
//! dump or edited by hand gains nothing.

use std::path::{Path, PathBuf};

/// Why an option was refused: the option's name and the setting that would have to allow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotAllowed {
    pub option: String,
    pub setting: &'static str,
}

/// Splits a comma-separated list of absolute paths (relative entries are ignored).
pub fn parse_path_list(s: &str) -> Vec<PathBuf> {
    s.split(',').map(str::trim).filter(|p| p.starts_with('/')).map(PathBuf::from).collect()
}

fn canonical(p: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(p).ok()
}

/// Checks every file-naming option (`*_file`) and `module` among a provider's string options,
/// given as (name, value) pairs.
pub fn check_options<'a>(
    options: impl IntoIterator<Item = (&'a str, &'a str)>,
    credential_dirs: &[PathBuf],
    pkcs11_modules: &[PathBuf],
) -> Result<(), NotAllowed> {
    let dirs: Vec<PathBuf> = credential_dirs.iter().filter_map(|d| canonical(d)).collect();
    let modules: Vec<PathBuf> = pkcs11_modules.iter().filter_map(|m| canonical(m)).collect();
    for (k, path) in options {
        if k.ends_with("_file") {
            let ok = canonical(Path::new(path)).is_some_and(|c| dirs.iter().any(|d| c.starts_with(d)));
            if !ok {
                return Err(NotAllowed { option: k.to_string(), setting: "envelope.credential_dirs" });
            }
        } else if k == "module" {
            let ok = canonical(Path::new(path)).is_some_and(|c| modules.contains(&c));
            if !ok {
                return Err(NotAllowed { option: k.to_string(), setting: "envelope.pkcs11_modules" });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one<'a>(k: &'a str, v: &'a Path) -> [(&'a str, &'a str); 1] {
        [(k, v.to_str().unwrap())]
    }

    #[test]
    fn files_must_resolve_under_a_credential_dir() {
        let d = tempfile::tempdir().unwrap();
        let allowed = d.path().join("creds");
        let other = d.path().join("other");
        std::fs::create_dir_all(&allowed).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(allowed.join("token"), "t").unwrap();
        std::fs::write(other.join("secret"), "s").unwrap();
        let dirs = vec![allowed.clone()];
        let token = allowed.join("token");
        let ok = [("url", "https://x"), ("token_file", token.to_str().unwrap())];
        assert_eq!(check_options(ok, &dirs, &[]), Ok(()));
        // Outside, through "..", through a symlink planted inside, missing, or no dirs configured.
        for bad in [
            other.join("secret"),
            allowed.join("../other/secret"),
            {
                std::os::unix::fs::symlink(other.join("secret"), allowed.join("link")).unwrap();
                allowed.join("link")
            },
            allowed.join("missing"),
        ] {
            let e = check_options(one("token_file", &bad), &dirs, &[]).unwrap_err();
            assert_eq!(e, NotAllowed { option: "token_file".into(), setting: "envelope.credential_dirs" }, "{bad:?}");
        }
        assert!(check_options(ok, &[], &[]).is_err());
        // A sibling directory whose name merely starts with the allowed one is outside.
        let sib = d.path().join("creds-evil");
        std::fs::create_dir_all(&sib).unwrap();
        std::fs::write(sib.join("x"), "x").unwrap();
        assert!(check_options(one("ca_file", &sib.join("x")), &dirs, &[]).is_err());
    }

    #[test]
    fn modules_must_be_listed() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("libgood.so");
        let n = d.path().join("libevil.so");
        std::fs::write(&m, "").unwrap();
        std::fs::write(&n, "").unwrap();
        assert_eq!(check_options(one("module", &m), &[], &[m.clone()]), Ok(()));
        let e = check_options(one("module", &n), &[], &[m.clone()]).unwrap_err();
        assert_eq!(e.setting, "envelope.pkcs11_modules");
        assert!(check_options(one("module", &m), &[], &[]).is_err());
    }

    #[test]
    fn lists_parse() {
        assert_eq!(parse_path_list(" /a, /b/c ,rel,, "), vec![PathBuf::from("/a"), PathBuf::from("/b/c")]);
    }
}
