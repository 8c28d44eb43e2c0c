//! Image metadata in the shared redb database.
//!
//! Two tables: `image.images` maps an image ID (config digest) to its JSON [`ImageRecord`],
//! `image.names` maps every name (`name:tag`, `name@sha256:...`) to the ID it points at.
//! A name points at exactly one image; the record's `repo_tags`/`repo_digests` list the names
//! pointing at it and are kept in step within the same write transaction.

use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::Image;
use crate::error::ImageError;

/// Image ID -> JSON `ImageRecord`.
const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("image.images");
/// Name -> image ID.
const NAMES: TableDefinition<&str, &str> = TableDefinition::new("image.names");

/// What the database holds per image: the image as reported, plus what GC needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The image.
    pub image: Image,
    /// The platform manifest's digest.
    pub manifest_digest: String,
    /// Every blob the image owns: indexes, manifest, config, layers.
    pub blobs: Vec<String>,
}

impl ImageRecord {
    fn decode(key: &str, bytes: &[u8]) -> Result<Self, ImageError> {
        serde_json::from_slice(bytes)
            .map_err(|e| ImageError::CorruptRecord { key: key.to_string(), source: Arc::new(e) })
    }

    fn encode(&self) -> Result<Vec<u8>, ImageError> {
        serde_json::to_vec(self).map_err(|e| ImageError::CorruptRecord {
            key: self.image.id.clone(),
            source: Arc::new(e),
        })
    }

    /// Adds `name` to the tags or digests (a name with `@` is a digest name).
    fn add_name(&mut self, name: &str) {
        let list = if name.contains('@') {
            &mut self.image.repo_digests
        } else {
            &mut self.image.repo_tags
        };
        if !list.iter().any(|n| n == name) {
            list.push(name.to_string());
        }
    }

    fn drop_name(&mut self, name: &str) {
        self.image.repo_tags.retain(|n| n != name);
        self.image.repo_digests.retain(|n| n != name);
    }
}

/// The image tables of the shared database.
#[derive(Clone)]
pub struct MetaStore {
    db: Arc<Database>,
}

impl MetaStore {
    /// Opens the tables, creating them in the shared database if missing.
    pub fn open(db: Arc<Database>) -> Result<Self, ImageError> {
        let txn = db.begin_write().map_err(|e| ImageError::db("begin write", e))?;
        txn.open_table(IMAGES).map_err(|e| ImageError::db("create image.images", e))?;
        txn.open_table(NAMES).map_err(|e| ImageError::db("create image.names", e))?;
        txn.commit().map_err(|e| ImageError::db("commit", e))?;
        Ok(Self { db })
    }

    /// Every record.
    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        let txn = self.db.begin_read().map_err(|e| ImageError::db("begin read", e))?;
        let table = txn.open_table(IMAGES).map_err(|e| ImageError::db("open image.images", e))?;
        let mut records = Vec::new();
        for entry in table.iter().map_err(|e| ImageError::db("list images", e))? {
            let (key, value) = entry.map_err(|e| ImageError::db("list images", e))?;
            records.push(ImageRecord::decode(key.value(), value.value())?);
        }
        Ok(records)
    }

    /// The record of image `id`.
    pub fn get(&self, id: &str) -> Result<Option<ImageRecord>, ImageError> {
        let txn = self.db.begin_read().map_err(|e| ImageError::db("begin read", e))?;
        let table = txn.open_table(IMAGES).map_err(|e| ImageError::db("open image.images", e))?;
        let value = table.get(id).map_err(|e| ImageError::db("get image", e))?;
        value.map(|v| ImageRecord::decode(id, v.value())).transpose()
    }

    /// The IDs of the images whose ID starts with `prefix` (`sha256:` and some hex), at
    /// most `limit` of them: one range scan of the ID-ordered table.
    pub fn ids_with_prefix(&self, prefix: &str, limit: usize) -> Result<Vec<String>, ImageError> {
        let txn = self.db.begin_read().map_err(|e| ImageError::db("begin read", e))?;
        let table = txn.open_table(IMAGES).map_err(|e| ImageError::db("open image.images", e))?;
        let mut ids = Vec::new();
        for entry in table.range(prefix..).map_err(|e| ImageError::db("scan images", e))? {
            let (key, _) = entry.map_err(|e| ImageError::db("scan images", e))?;
            let id = key.value();
            if !id.starts_with(prefix) || ids.len() == limit {
                break;
            }
            ids.push(id.to_string());
        }
        Ok(ids)
    }

    /// The image ID `name` points at.
    pub fn resolve(&self, name: &str) -> Result<Option<String>, ImageError> {
        let txn = self.db.begin_read().map_err(|e| ImageError::db("begin read", e))?;
        let table = txn.open_table(NAMES).map_err(|e| ImageError::db("open image.names", e))?;
        let value = table.get(name).map_err(|e| ImageError::db("get name", e))?;
        Ok(value.map(|v| v.value().to_string()))
    }

    /// Records a pulled image under `names` in one transaction: merges with an existing
    /// record of the same ID (names and blobs add up, `pinned` stays), and moves each name
    /// off the image it pointed at before. Returns the stored record.
    pub fn record_pull(
        &self,
        pulled: ImageRecord,
        names: &[String],
    ) -> Result<ImageRecord, ImageError> {
        let id = pulled.image.id.clone();
        let txn = self.db.begin_write().map_err(|e| ImageError::db("begin write", e))?;
        let record = {
            let mut images =
                txn.open_table(IMAGES).map_err(|e| ImageError::db("open image.images", e))?;
            let mut name_table =
                txn.open_table(NAMES).map_err(|e| ImageError::db("open image.names", e))?;
            let existing = images
                .get(id.as_str())
                .map_err(|e| ImageError::db("get image", e))?
                .map(|v| ImageRecord::decode(&id, v.value()))
                .transpose()?;
            let mut record = match existing {
                Some(mut old) => {
                    for blob in pulled.blobs {
                        if !old.blobs.contains(&blob) {
                            old.blobs.push(blob);
                        }
                    }
                    old.manifest_digest = pulled.manifest_digest;
                    old
                }
                None => pulled,
            };
            for name in names {
                let previous = name_table
                    .insert(name.as_str(), id.as_str())
                    .map_err(|e| ImageError::db("set name", e))?
                    .map(|v| v.value().to_string());
                if let Some(previous) = previous.filter(|p| *p != id) {
                    // The name moves: the old image loses it (and stays, like a dangling image).
                    let old = images
                        .get(previous.as_str())
                        .map_err(|e| ImageError::db("get image", e))?
                        .map(|v| ImageRecord::decode(&previous, v.value()))
                        .transpose()?;
                    if let Some(mut old) = old {
                        old.drop_name(name);
                        images
                            .insert(previous.as_str(), old.encode()?.as_slice())
                            .map_err(|e| ImageError::db("update image", e))?;
                    }
                }
                record.add_name(name);
            }
            images
                .insert(id.as_str(), record.encode()?.as_slice())
                .map_err(|e| ImageError::db("put image", e))?;
            record
        };
        txn.commit().map_err(|e| ImageError::db("commit", e))?;
        Ok(record)
    }

    /// Deletes image `id` and every name pointing at it, in one transaction.
    pub fn remove(&self, id: &str) -> Result<Option<ImageRecord>, ImageError> {
        let txn = self.db.begin_write().map_err(|e| ImageError::db("begin write", e))?;
        let removed = {
            let mut images =
                txn.open_table(IMAGES).map_err(|e| ImageError::db("open image.images", e))?;
            let mut name_table =
                txn.open_table(NAMES).map_err(|e| ImageError::db("open image.names", e))?;
            let removed = images
                .remove(id)
                .map_err(|e| ImageError::db("remove image", e))?
                .map(|v| ImageRecord::decode(id, v.value()))
                .transpose()?;
            name_table
                .retain(|_, target| target != id)
                .map_err(|e| ImageError::db("remove names", e))?;
            removed
        };
        txn.commit().map_err(|e| ImageError::db("commit", e))?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, blobs: &[&str]) -> ImageRecord {
        ImageRecord {
            image: Image {
                id: id.into(),
                repo_tags: vec![],
                repo_digests: vec![],
                size: 42,
                config_json: "{}".into(),
                diff_ids: vec!["sha256:d".into()],
                chain_id: "sha256:d".into(),
                user: Some("1000".into()),
                pinned: false,
            },
            manifest_digest: "sha256:m".into(),
            blobs: blobs.iter().map(|b| b.to_string()).collect(),
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn ids_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("meta.redb")).unwrap());
        let meta = MetaStore::open(db).unwrap();
        for id in ["sha256:ab01", "sha256:ab02", "sha256:b000"] {
            meta.record_pull(record(id, &[]), &[]).unwrap();
        }
        assert_eq!(
            meta.ids_with_prefix("sha256:ab0", 2).unwrap(),
            names(&["sha256:ab01", "sha256:ab02"])
        );
        assert_eq!(meta.ids_with_prefix("sha256:ab", 1).unwrap(), names(&["sha256:ab01"]));
        assert_eq!(meta.ids_with_prefix("sha256:b", 2).unwrap(), names(&["sha256:b000"]));
        assert!(meta.ids_with_prefix("sha256:c", 2).unwrap().is_empty());
        // The scan stops at the first key past the prefix.
        assert!(meta.ids_with_prefix("sha256:ab03", 2).unwrap().is_empty());
    }

    #[test]
    fn roundtrip_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        {
            let db = Arc::new(Database::create(&path).unwrap());
            let meta = MetaStore::open(db).unwrap();
            let stored = meta
                .record_pull(
                    record("sha256:a", &["sha256:m", "sha256:c"]),
                    &names(&["r/x:1", "r/x@sha256:m"]),
                )
                .unwrap();
            assert_eq!(stored.image.repo_tags, vec!["r/x:1"]);
            assert_eq!(stored.image.repo_digests, vec!["r/x@sha256:m"]);
        }
        let db = Arc::new(Database::create(&path).unwrap());
        let meta = MetaStore::open(db).unwrap();
        let all = meta.list().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].image.repo_tags, vec!["r/x:1"]);
        assert_eq!(all[0].blobs, vec!["sha256:m", "sha256:c"]);
        assert_eq!(meta.resolve("r/x:1").unwrap().as_deref(), Some("sha256:a"));
        assert_eq!(meta.get("sha256:a").unwrap(), Some(all[0].clone()));
        assert_eq!(meta.get("sha256:b").unwrap(), None);
    }

    #[test]
    fn names_add_up_and_move() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("m.redb")).unwrap());
        let meta = MetaStore::open(db).unwrap();
        meta.record_pull(record("sha256:a", &["sha256:1"]), &names(&["r/x:1", "r/x@sha256:1"]))
            .unwrap();
        // Same image under another name: names and blobs add up.
        let a = meta
            .record_pull(record("sha256:a", &["sha256:2"]), &names(&["r/y:1", "r/y@sha256:1"]))
            .unwrap();
        assert_eq!(a.image.repo_tags, vec!["r/x:1", "r/y:1"]);
        assert_eq!(a.image.repo_digests, vec!["r/x@sha256:1", "r/y@sha256:1"]);
        assert_eq!(a.blobs, vec!["sha256:1", "sha256:2"]);
        // A new image under r/x:1 takes the tag; the old one keeps its other names.
        meta.record_pull(record("sha256:b", &["sha256:3"]), &names(&["r/x:1", "r/x@sha256:3"]))
            .unwrap();
        let a = meta.get("sha256:a").unwrap().unwrap();
        assert_eq!(a.image.repo_tags, vec!["r/y:1"]);
        assert_eq!(meta.resolve("r/x:1").unwrap().as_deref(), Some("sha256:b"));
        // Removing deletes the record and every name pointing at it.
        let removed = meta.remove("sha256:a").unwrap().unwrap();
        assert_eq!(removed.image.id, "sha256:a");
        assert_eq!(meta.resolve("r/y:1").unwrap(), None);
        assert_eq!(meta.resolve("r/x@sha256:1").unwrap(), None);
        assert_eq!(meta.resolve("r/x@sha256:3").unwrap().as_deref(), Some("sha256:b"));
        assert_eq!(meta.remove("sha256:a").unwrap(), None);
        assert_eq!(meta.list().unwrap().len(), 1);
    }
}
