//! The agent's local store: the desired view it last applied, and the
//! outbox of reports not yet acknowledged by the cloud. It is what lets a
//! node run on its own after a reboot while the cloud is unreachable.
//!
//! On-disk format (redb, `DIR/state.redb`):
//! - `desired`: `"<Kind>/<name>"` → JSON of the object;
//! - `outbox`: seq (u64) → JSON of the report;
//! - `meta`: `"applied"` → revision, `"next_seq"` → next outbox sequence.
//!
//! Each protocol action is one write transaction, so a snapshot or delta
//! and its revision are applied atomically, and nothing is acknowledged
//! before its transaction committed.
//!
//! The simulator uses the in-memory variant (no file) with the same API.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use redb::{Database, ReadableTable, TableDefinition};
use yunbian_api::Kind;
use yunbian_sync::{Change, DesiredObject, Report};

const DESIRED: TableDefinition<&str, &[u8]> = TableDefinition::new("desired");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Local store failures.
#[derive(Debug, thiserror::Error)]
pub enum LocalStoreError {
    /// redb failed (disk full, corruption, permissions).
    #[error("local store: {0}")]
    Db(String),
    /// The file is not a readable store (truncated, overwritten, bad checksums).
    #[error("local store file is damaged: {0}")]
    Damaged(String),
    /// A stored record does not decode.
    #[error("local store record {key}: {detail}")]
    Corrupt {
        /// Which record.
        key: String,
        /// Why.
        detail: String,
    },
}

impl LocalStoreError {
    /// Whether the file itself is damaged (as opposed to the disk being
    /// full or unwritable, where the file is fine and must be kept).
    pub fn is_corruption(&self) -> bool {
        match self {
            LocalStoreError::Corrupt { .. } => true,
            LocalStoreError::Db(_) => false,
            LocalStoreError::Damaged(_) => true,
        }
    }
}

fn db_err<E: std::fmt::Display>(e: E) -> LocalStoreError {
    LocalStoreError::Db(e.to_string())
}

/// Classifies an error while reading the store back, like [`open_err`].
fn read_err<E: Into<redb::Error>>(e: E) -> LocalStoreError {
    let e: redb::Error = e.into();
    match &e {
        redb::Error::Io(io) if disk_trouble(io.kind()) => LocalStoreError::Db(e.to_string()),
        _ => LocalStoreError::Damaged(e.to_string()),
    }
}

fn disk_trouble(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind::*;
    matches!(kind, StorageFull | PermissionDenied | ReadOnlyFilesystem | QuotaExceeded | OutOfMemory)
}

/// Classifies a redb error: I/O failures of the disk (full, read-only,
/// permissions) are `Db`; anything else while opening means the file's
/// contents are not a valid store.
fn open_err(e: redb::DatabaseError) -> LocalStoreError {
    if let redb::DatabaseError::Storage(redb::StorageError::Io(io)) = &e {
        if disk_trouble(io.kind()) {
            return LocalStoreError::Db(e.to_string());
        }
    }
    LocalStoreError::Damaged(e.to_string())
}

/// What the agent restores at start.
#[derive(Debug, Default, Clone)]
pub struct Restored {
    /// Applied revision.
    pub applied: u64,
    /// Desired objects.
    pub desired: Vec<DesiredObject>,
    /// Unacknowledged reports.
    pub outbox: Vec<(u64, Report)>,
    /// Next outbox sequence.
    pub next_seq: u64,
}

#[derive(Default)]
struct Memory {
    applied: u64,
    desired: BTreeMap<String, DesiredObject>,
    outbox: BTreeMap<u64, Report>,
    next_seq: u64,
}

/// The store.
pub struct LocalStore {
    /// The file and its open database (`None` for the in-memory variant).
    file: Option<(std::path::PathBuf, std::sync::RwLock<Database>)>,
    mem: Mutex<Memory>,
}

fn key(kind: Kind, name: &str) -> String {
    format!("{}/{name}", kind.as_str())
}

/// Opens the database file, creating and initialising it when absent.
fn open_database(path: &Path) -> Result<Database, LocalStoreError> {
    let fresh = !path.exists();
    // redb asserts (panics) on some truncated files instead of returning an
    // error; either way the file is not a usable store.
    let opened = std::panic::catch_unwind(|| {
        // The view and outbox are small; redb's default cache (up to 1 GiB)
        // would only grow the agent's resident memory.
        Database::builder().set_cache_size(1 << 20).create(path)
    });
    let database = match opened {
        Ok(r) => r.map_err(open_err)?,
        Err(_) => return Err(LocalStoreError::Damaged("the store file is truncated or malformed".into())),
    };
    if !fresh {
        // An existing store is only read here: re-opening must work on a
        // full disk.
        let r = database.begin_read().map_err(read_err)?;
        let complete = r.open_table(DESIRED).is_ok() && r.open_table(OUTBOX).is_ok() && r.open_table(META).is_ok();
        drop(r);
        if complete {
            return Ok(database);
        }
    }
    let w = database.begin_write().map_err(db_err)?;
    {
        w.open_table(DESIRED).map_err(|e| LocalStoreError::Damaged(e.to_string()))?;
        w.open_table(OUTBOX).map_err(|e| LocalStoreError::Damaged(e.to_string()))?;
        let mut meta = w.open_table(META).map_err(|e| LocalStoreError::Damaged(e.to_string()))?;
        if fresh {
            // A new store's report sequence starts at the current time in
            // microseconds: a store rebuilt after corruption (or a node whose
            // data directory was wiped) never reuses a sequence the cloud has
            // already seen and would ignore as stale.
            let floor =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64);
            meta.insert("next_seq", floor).map_err(db_err)?;
        }
    }
    w.commit().map_err(db_err)?;
    Ok(database)
}

impl LocalStore {
    /// Opens (or creates) the store file.
    pub fn open(path: &Path) -> Result<LocalStore, LocalStoreError> {
        let database = open_database(path)?;
        Ok(LocalStore {
            file: Some((path.to_path_buf(), std::sync::RwLock::new(database))),
            mem: Mutex::new(Memory { next_seq: 1, ..Default::default() }),
        })
    }

    /// Closes and re-opens the file. After an I/O error (a full disk) redb
    /// refuses every later transaction until the database is re-opened; the
    /// file itself is intact (the failed transaction never committed).
    pub fn reopen(&self) -> Result<(), LocalStoreError> {
        let Some((path, db)) = &self.file else { return Ok(()) };
        let mut guard = db.write().map_err(|_| LocalStoreError::Db("local store lock poisoned".into()))?;
        // redb holds an exclusive lock on the file: the old handle must be
        // closed before the new one opens. A throwaway in-memory database
        // stands in meanwhile.
        let placeholder =
            Database::builder().create_with_backend(redb::backends::InMemoryBackend::new()).map_err(db_err)?;
        drop(std::mem::replace(&mut *guard, placeholder));
        *guard = open_database(path)?;
        Ok(())
    }

    /// A store that lives in memory only (simulated nodes).
    pub fn in_memory() -> LocalStore {
        LocalStore { file: None, mem: Mutex::new(Memory { next_seq: 1, ..Default::default() }) }
    }

    /// Reads everything back.
    pub fn restore(&self) -> Result<Restored, LocalStoreError> {
        // A poisoned lock still guards a consistent database: redb rolls
        // back whatever transaction a panic interrupted.
        let guard = self.file.as_ref().map(|(_, db)| db.read().unwrap_or_else(|e| e.into_inner()));
        let Some(d) = guard.as_deref() else {
            let m = self.mem.lock().expect("local store lock");
            return Ok(Restored {
                applied: m.applied,
                desired: m.desired.values().cloned().collect(),
                outbox: m.outbox.iter().map(|(s, r)| (*s, r.clone())).collect(),
                next_seq: m.next_seq,
            });
        };
        let r = d.begin_read().map_err(read_err)?;
        let meta = r.open_table(META).map_err(read_err)?;
        let applied = meta.get("applied").map_err(read_err)?.map(|v| v.value()).unwrap_or(0);
        let next_seq = meta.get("next_seq").map_err(read_err)?.map(|v| v.value()).unwrap_or(1);
        let mut desired = Vec::new();
        for e in r.open_table(DESIRED).map_err(read_err)?.iter().map_err(read_err)? {
            let (k, v) = e.map_err(read_err)?;
            let o: DesiredObject = serde_json::from_slice(v.value())
                .map_err(|e| LocalStoreError::Corrupt { key: k.value().to_string(), detail: e.to_string() })?;
            desired.push(o);
        }
        let mut outbox = Vec::new();
        for e in r.open_table(OUTBOX).map_err(read_err)?.iter().map_err(read_err)? {
            let (k, v) = e.map_err(read_err)?;
            let rep: Report = serde_json::from_slice(v.value()).map_err(|e| LocalStoreError::Corrupt {
                key: format!("outbox/{}", k.value()),
                detail: e.to_string(),
            })?;
            outbox.push((k.value(), rep));
        }
        Ok(Restored { applied, desired, outbox, next_seq })
    }

    /// Replaces the desired view.
    pub fn apply_snapshot(&self, revision: u64, objects: &[DesiredObject]) -> Result<(), LocalStoreError> {
        // A poisoned lock still guards a consistent database: redb rolls
        // back whatever transaction a panic interrupted.
        let guard = self.file.as_ref().map(|(_, db)| db.read().unwrap_or_else(|e| e.into_inner()));
        let Some(d) = guard.as_deref() else {
            let mut m = self.mem.lock().expect("local store lock");
            m.desired = objects.iter().map(|o| (key(o.kind, &o.name), o.clone())).collect();
            m.applied = revision;
            return Ok(());
        };
        let w = d.begin_write().map_err(db_err)?;
        {
            let mut t = w.open_table(DESIRED).map_err(db_err)?;
            t.retain(|_, _| false).map_err(db_err)?;
            for o in objects {
                t.insert(key(o.kind, &o.name).as_str(), serde_json::to_vec(o).map_err(db_err)?.as_slice())
                    .map_err(db_err)?;
            }
            w.open_table(META).map_err(db_err)?.insert("applied", revision).map_err(db_err)?;
        }
        w.commit().map_err(db_err)
    }

    /// Applies a delta.
    pub fn apply_delta(&self, revision: u64, changes: &[Change]) -> Result<(), LocalStoreError> {
        // A poisoned lock still guards a consistent database: redb rolls
        // back whatever transaction a panic interrupted.
        let guard = self.file.as_ref().map(|(_, db)| db.read().unwrap_or_else(|e| e.into_inner()));
        let Some(d) = guard.as_deref() else {
            let mut m = self.mem.lock().expect("local store lock");
            for c in changes {
                match c {
                    Change::Upsert { object } => {
                        m.desired.insert(key(object.kind, &object.name), object.clone());
                    }
                    Change::Remove { kind, name } => {
                        m.desired.remove(&key(*kind, name));
                    }
                }
            }
            m.applied = revision;
            return Ok(());
        };
        let w = d.begin_write().map_err(db_err)?;
        {
            let mut t = w.open_table(DESIRED).map_err(db_err)?;
            for c in changes {
                match c {
                    Change::Upsert { object } => {
                        let v = serde_json::to_vec(object).map_err(db_err)?;
                        t.insert(key(object.kind, &object.name).as_str(), v.as_slice()).map_err(db_err)?;
                    }
                    Change::Remove { kind, name } => {
                        t.remove(key(*kind, name).as_str()).map_err(db_err)?;
                    }
                }
            }
            w.open_table(META).map_err(db_err)?.insert("applied", revision).map_err(db_err)?;
        }
        w.commit().map_err(db_err)
    }

    /// Appends a report.
    pub fn push_report(&self, seq: u64, report: &Report) -> Result<(), LocalStoreError> {
        // A poisoned lock still guards a consistent database: redb rolls
        // back whatever transaction a panic interrupted.
        let guard = self.file.as_ref().map(|(_, db)| db.read().unwrap_or_else(|e| e.into_inner()));
        let Some(d) = guard.as_deref() else {
            let mut m = self.mem.lock().expect("local store lock");
            m.outbox.insert(seq, report.clone());
            m.next_seq = seq + 1;
            return Ok(());
        };
        let w = d.begin_write().map_err(db_err)?;
        {
            let v = serde_json::to_vec(report).map_err(db_err)?;
            w.open_table(OUTBOX).map_err(db_err)?.insert(seq, v.as_slice()).map_err(db_err)?;
            w.open_table(META).map_err(db_err)?.insert("next_seq", seq + 1).map_err(db_err)?;
        }
        w.commit().map_err(db_err)
    }

    /// Drops acknowledged reports.
    pub fn trim_outbox(&self, upto: u64) -> Result<(), LocalStoreError> {
        // A poisoned lock still guards a consistent database: redb rolls
        // back whatever transaction a panic interrupted.
        let guard = self.file.as_ref().map(|(_, db)| db.read().unwrap_or_else(|e| e.into_inner()));
        let Some(d) = guard.as_deref() else {
            let mut m = self.mem.lock().expect("local store lock");
            m.outbox = m.outbox.split_off(&(upto + 1));
            return Ok(());
        };
        let w = d.begin_write().map_err(db_err)?;
        {
            let mut t = w.open_table(OUTBOX).map_err(db_err)?;
            t.retain(|k, _| k > upto).map_err(db_err)?;
        }
        w.commit().map_err(db_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yunbian_api::AppInstanceStatus;

    fn obj(name: &str) -> DesiredObject {
        DesiredObject {
            kind: Kind::AppInstance,
            name: name.into(),
            revision: 1,
            value: serde_json::json!({ "n": name }),
        }
    }

    #[test]
    fn persists_across_reopen() {
        let dir = std::env::temp_dir().join(format!("yb-local-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("state.redb");
        {
            let s = LocalStore::open(&path).expect("open");
            s.apply_snapshot(5, &[obj("a"), obj("b")]).expect("snap");
            s.apply_delta(7, &[Change::Remove { kind: Kind::AppInstance, name: "a".into() }]).expect("delta");
            let r = Report::InstanceStatus { instance: "b".into(), status: AppInstanceStatus::default() };
            s.push_report(1, &r).expect("push");
            s.push_report(2, &r).expect("push");
            s.trim_outbox(1).expect("trim");
        }
        let s = LocalStore::open(&path).expect("reopen");
        let r = s.restore().expect("restore");
        assert_eq!(r.applied, 7);
        assert_eq!(r.desired.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), vec!["b"]);
        assert_eq!(r.outbox.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![2]);
        assert_eq!(r.next_seq, 3);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
