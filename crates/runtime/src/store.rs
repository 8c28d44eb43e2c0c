//! Persistence of runtime records in the shared redb database. Four tables: metadata and
//! status for sandboxes and containers, values are JSON. Every change is one write
//! transaction; readers use the in-memory index (see `index.rs`), never the database.

use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Result, RuntimeError};
use crate::records::{ContainerMeta, ContainerStatus, SandboxMeta, SandboxStatus};

const SANDBOXES: Table = TableDefinition::new("runtime.sandboxes");
const SANDBOX_STATUS: Table = TableDefinition::new("runtime.sandbox_status");
const CONTAINERS: Table = TableDefinition::new("runtime.containers");
const CONTAINER_STATUS: Table = TableDefinition::new("runtime.container_status");

/// A table of the runtime: id → JSON.
type Table = TableDefinition<'static, &'static str, &'static [u8]>;

/// The runtime's tables (cheap to clone: blocking work takes a copy along).
#[derive(Clone)]
pub(crate) struct Store {
    db: Arc<Database>,
}

fn db_err<E: Into<redb::Error>>(action: &'static str) -> impl FnOnce(E) -> RuntimeError {
    move |e| RuntimeError::store(action)(e.into())
}

fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|source| RuntimeError::Serialize { what, source })
}

impl Store {
    /// Opens (creating) the tables.
    pub(crate) fn open(db: Arc<Database>) -> Result<Self> {
        let tx = db.begin_write().map_err(db_err("begin write"))?;
        for table in [SANDBOXES, SANDBOX_STATUS, CONTAINERS, CONTAINER_STATUS] {
            tx.open_table(table).map_err(db_err("open table"))?;
        }
        tx.commit().map_err(db_err("commit"))?;
        Ok(Self { db })
    }

    fn load<M: DeserializeOwned, S: DeserializeOwned>(
        &self,
        meta: Table,
        status: Table,
    ) -> Result<Vec<(M, Option<S>)>> {
        let tx = self.db.begin_read().map_err(db_err("begin read"))?;
        let metas = tx.open_table(meta).map_err(db_err("open table"))?;
        let statuses = tx.open_table(status).map_err(db_err("open table"))?;
        let mut out = Vec::new();
        for row in metas.iter().map_err(db_err("read"))? {
            let (key, value) = row.map_err(db_err("read"))?;
            let id = key.value().to_owned();
            let m: M = serde_json::from_slice(value.value())
                .map_err(|source| RuntimeError::CorruptRecord { id: id.clone(), source })?;
            let s = match statuses.get(id.as_str()).map_err(db_err("read"))? {
                Some(v) => Some(
                    serde_json::from_slice(v.value())
                        .map_err(|source| RuntimeError::CorruptRecord { id: id.clone(), source })?,
                ),
                None => None,
            };
            out.push((m, s));
        }
        Ok(out)
    }

    /// Every sandbox with its status.
    pub(crate) fn load_sandboxes(&self) -> Result<Vec<(SandboxMeta, Option<SandboxStatus>)>> {
        self.load(SANDBOXES, SANDBOX_STATUS)
    }

    /// Every container with its status.
    pub(crate) fn load_containers(&self) -> Result<Vec<(ContainerMeta, Option<ContainerStatus>)>> {
        self.load(CONTAINERS, CONTAINER_STATUS)
    }

    fn put(&self, rows: &[(Table, &str, Vec<u8>)]) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err("begin write"))?;
        for (table, id, value) in rows {
            let mut t = tx.open_table(*table).map_err(db_err("open table"))?;
            t.insert(*id, value.as_slice()).map_err(db_err("insert"))?;
        }
        tx.commit().map_err(db_err("commit"))
    }

    fn delete(&self, tables: &[Table], id: &str) -> Result<()> {
        let tx = self.db.begin_write().map_err(db_err("begin write"))?;
        for table in tables {
            let mut t = tx.open_table(*table).map_err(db_err("open table"))?;
            t.remove(id).map_err(db_err("remove"))?;
        }
        tx.commit().map_err(db_err("commit"))
    }

    /// Records a new sandbox (metadata and status in one transaction).
    pub(crate) fn create_sandbox(&self, meta: &SandboxMeta, status: &SandboxStatus) -> Result<()> {
        self.put(&[
            (SANDBOXES, &meta.id, encode("sandbox", meta)?),
            (SANDBOX_STATUS, &meta.id, encode("sandbox status", status)?),
        ])
    }

    /// Replaces a sandbox's status.
    pub(crate) fn put_sandbox_status(&self, id: &str, status: &SandboxStatus) -> Result<()> {
        self.put(&[(SANDBOX_STATUS, id, encode("sandbox status", status)?)])
    }

    /// Forgets a sandbox.
    pub(crate) fn delete_sandbox(&self, id: &str) -> Result<()> {
        self.delete(&[SANDBOXES, SANDBOX_STATUS], id)
    }

    /// Records a new container.
    pub(crate) fn create_container(
        &self,
        meta: &ContainerMeta,
        status: &ContainerStatus,
    ) -> Result<()> {
        self.put(&[
            (CONTAINERS, &meta.id, encode("container", meta)?),
            (CONTAINER_STATUS, &meta.id, encode("container status", status)?),
        ])
    }

    /// Replaces a container's status.
    pub(crate) fn put_container_status(&self, id: &str, status: &ContainerStatus) -> Result<()> {
        self.put(&[(CONTAINER_STATUS, id, encode("container status", status)?)])
    }

    /// Forgets a container.
    pub(crate) fn delete_container(&self, id: &str) -> Result<()> {
        self.delete(&[CONTAINERS, CONTAINER_STATUS], id)
    }
}
