//! Named volumes, as Docker's `local` driver keeps them: a directory per volume under the
//! agent's data dir, `volumes/NAME/_data`, which tasks of this node mount (see
//! [`crate::mounts`]). Volumes are per node: nothing about them goes through the store, and a
//! task that names a missing volume makes it on the node where it runs. Each volume's labels
//! and creation time sit beside its data in `volumes/NAME/shoal-volume.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The characters Docker allows in a local volume name (and the message quotes).
const NAME_CHARS: &str = "[a-zA-Z0-9][a-zA-Z0-9_.-]";
const META_FILE: &str = "shoal-volume.json";

/// A volume as `volume ls` and `volume inspect` show it (Docker's fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub name: String,
    /// Always `local`.
    pub driver: String,
    /// The host directory tasks see: `<data dir>/volumes/NAME/_data`.
    pub mountpoint: PathBuf,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub labels: BTreeMap<String, String>,
    /// Always `local`: a volume belongs to one node.
    pub scope: String,
    /// The node that holds it.
    #[serde(default)]
    pub node: String,
}

/// What is kept beside the data.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    created_at: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// Why a volume operation failed; nothing was changed unless it is [`VolumeError::Io`].
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The name is not one Docker would accept.
    #[error("{0}")]
    InvalidName(String),
    #[error("get {0}: no such volume")]
    NotFound(String),
    /// Tasks of this node (by name) mount it.
    #[error("remove {name}: volume is in use - [{}]", by.join(", "))]
    InUse { name: String, by: Vec<String> },
    #[error("{op} {}: {source}", path.display())]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError {
    let path = path.to_path_buf();
    move |source| VolumeError::Io { op, path, source }
}

/// Docker's rule for local volume names, so a name is never a path: two or more characters,
/// the first a letter or digit, the rest letters, digits, `_`, `.` or `-` (never `..` alone).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.len() == 1 {
        return Err(
            "volume name is too short, names should be at least two alphanumeric characters".into(),
        );
    }
    let ok = name.len() <= 255
        && name.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} includes invalid characters for a local volume name, only {NAME_CHARS:?} \
             are allowed. If you intended to pass a host directory, use absolute path"
        ))
    }
}

/// The volumes of one node.
#[derive(Debug, Clone)]
pub struct Volumes {
    dir: PathBuf,
    node: String,
}

impl Volumes {
    /// The volumes under `<data_dir>/volumes` of node `node`.
    pub fn new(data_dir: &Path, node: &str) -> Volumes {
        Volumes { dir: data_dir.join("volumes"), node: node.to_owned() }
    }

    /// Where a volume's data is, whether or not it exists.
    pub fn mountpoint(&self, name: &str) -> PathBuf {
        self.dir.join(name).join("_data")
    }

    fn named(&self, name: &str) -> Result<PathBuf, VolumeError> {
        check_name(name).map_err(VolumeError::InvalidName)?;
        Ok(self.dir.join(name))
    }

    /// Creates a volume; one that exists is returned as it is (Docker's `volume create`).
    pub fn create(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Volume, VolumeError> {
        let dir = self.named(name)?;
        if !dir.join("_data").is_dir() {
            let data = dir.join("_data");
            std::fs::create_dir_all(&data).map_err(io("create", &data))?;
            let meta = Meta {
                created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                labels: labels.clone(),
            };
            let file = dir.join(META_FILE);
            let text = serde_json::to_string_pretty(&meta).unwrap_or_default();
            std::fs::write(&file, text).map_err(io("write", &file))?;
        }
        self.get(name)
    }

    /// The data directory of a volume a task mounts, made first if missing.
    pub fn ensure(&self, name: &str) -> Result<PathBuf, VolumeError> {
        Ok(self.create(name, &BTreeMap::new())?.mountpoint)
    }

    /// One volume.
    pub fn get(&self, name: &str) -> Result<Volume, VolumeError> {
        let dir = self.named(name)?;
        if !dir.join("_data").is_dir() {
            return Err(VolumeError::NotFound(name.to_owned()));
        }
        let meta: Meta = std::fs::read(dir.join(META_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Ok(Volume {
            name: name.to_owned(),
            driver: "local".into(),
            mountpoint: self.mountpoint(name),
            created_at: meta.created_at,
            labels: meta.labels,
            scope: "local".into(),
            node: self.node.clone(),
        })
    }

    /// Every volume of this node, by name (a directory without `_data` is not one).
    pub fn list(&self) -> Vec<Volume> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut names: Vec<String> =
            entries.flatten().filter_map(|e| e.file_name().into_string().ok()).collect();
        names.sort();
        names.iter().filter_map(|n| self.get(n).ok()).collect()
    }

    /// Deletes a volume and its data. The caller checks first that no task uses it.
    pub fn remove(&self, name: &str) -> Result<(), VolumeError> {
        self.get(name)?;
        let dir = self.dir.join(name);
        std::fs::remove_dir_all(&dir).map_err(io("remove", &dir))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_follow_docker_and_never_escape() {
        for good in ["myhelloworld", "a1", "v_1.2-x", "0x"] {
            check_name(good).unwrap();
        }
        for bad in ["", "a", "..", ".x", "a/b", "../etc", "-v", "a b", "é1", &"v".repeat(256)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn create_list_inspect_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let vols = Volumes::new(tmp.path(), "node1");
        let labels = BTreeMap::from([("k".to_owned(), "v".to_owned())]);
        let v = vols.create("myhelloworld", &labels).unwrap();
        assert_eq!(v.mountpoint, tmp.path().join("volumes/myhelloworld/_data"));
        assert!(v.mountpoint.is_dir());
        assert_eq!(v.labels, labels);
        std::fs::write(v.mountpoint.join("info.log"), "x\n").unwrap();
        // Creating it again keeps its data and labels.
        assert_eq!(vols.create("myhelloworld", &BTreeMap::new()).unwrap(), v);
        assert!(v.mountpoint.join("info.log").exists());
        assert_eq!(vols.ensure("other1").unwrap(), vols.mountpoint("other1"));
        let names: Vec<String> = vols.list().into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["myhelloworld", "other1"]);
        vols.remove("myhelloworld").unwrap();
        assert!(matches!(vols.get("myhelloworld"), Err(VolumeError::NotFound(_))));
        assert_eq!(
            vols.remove("myhelloworld").unwrap_err().to_string(),
            "get myhelloworld: no such volume"
        );
        assert!(matches!(vols.remove("../volumes"), Err(VolumeError::InvalidName(_))));
        assert!(tmp.path().join("volumes").is_dir());
    }
}
