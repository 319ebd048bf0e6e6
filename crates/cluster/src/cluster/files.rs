//! The node's own files in `<data_dir>/swarm` (keys, certificates, the node file with the
//! keyring): written atomically, readable by root alone.

use std::path::Path;

use crate::Error;

/// The swarm directory under the data dir, and its files.
pub(super) const SWARM_DIR: &str = "swarm";
pub(super) const NODE_FILE: &str = "node.json";
pub(super) const KEY_FILE: &str = "node-key.pem";
pub(super) const CERT_FILE: &str = "node-cert.pem";
pub(super) const CA_FILE: &str = "ca.pem";
pub(super) const RAFT_FILE: &str = "raft.redb";

/// Maps an I/O error to [`Error::Io`], saying what was being done.
pub(super) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Writes a file of the swarm directory atomically. Every one of them is the node's own
/// (keys, certificates, the keyring in the node file), so all are 0600, in a 0700 directory.
pub(super) fn write_file(path: &Path, data: &str) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(format!("writing {}", tmp.display())))?;
        f.write_all(data.as_bytes()).map_err(io_err(format!("writing {}", tmp.display())))?;
        f.sync_all().map_err(io_err(format!("syncing {}", tmp.display())))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(format!("renaming {}", path.display())))
}

/// Creates the swarm directory (and the data dir above it) readable by root alone, and makes
/// an existing one so.
pub(super) fn create_private_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(format!("creating {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err(format!("chmod 0700 {}", dir.display())))
}

/// Reads a file of the swarm directory.
pub(super) fn read_file(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(io_err(format!("reading {}", path.display())))
}
