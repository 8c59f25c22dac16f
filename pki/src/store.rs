//! A party's key, certificate and CA on disk: `<dir>/node.key`, `node.crt`, `ca.crt`, every
//! file 0600 in a 0700 directory, each written to a temporary file and renamed (a renewal
//! interrupted half way leaves the previous pair).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::PkiError;
use crate::ca::NodeMaterial;

const FILES: [&str; 3] = ["node.key", "node.crt", "ca.crt"];

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `text` to `path` with mode 0600 (atomically).
pub fn write_private(path: &Path, text: &str) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    // An existing file keeps its mode on open: set it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Creates `dir` (0700) if needed.
pub fn private_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))
}

pub fn save(dir: &Path, m: &NodeMaterial) -> Result<(), PkiError> {
    private_dir(dir)?;
    for (name, text) in FILES.iter().zip([&m.key_pem, &m.cert_pem, &m.ca_pem]) {
        write_private(&dir.join(name), text)?;
    }
    Ok(())
}

/// The stored material; `None` when `dir` holds none.
pub fn load(dir: &Path) -> Result<Option<NodeMaterial>, PkiError> {
    let mut texts = Vec::new();
    for name in FILES {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(t) => texts.push(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path)(e)),
        }
    }
    let ca_pem = texts.pop().expect("3");
    let cert_pem = texts.pop().expect("2");
    let key_pem = texts.pop().expect("1");
    Ok(Some(NodeMaterial {
        key_pem,
        cert_pem,
        ca_pem,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Role;
    use crate::ca::RootCa;

    #[test]
    fn saved_material_is_private_and_loads_back() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tls");
        assert!(load(&dir).unwrap().is_none());
        let ca = RootCa::generate("t").unwrap();
        let m = ca
            .issue_local("n1", Role::Worker, crate::ca::DEFAULT_NODE_LIFETIME)
            .unwrap();
        save(&dir, &m).unwrap();
        save(&dir, &m).unwrap();
        assert_eq!(load(&dir).unwrap().unwrap(), m);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for f in FILES {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
    }
}
