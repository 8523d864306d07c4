//! What a poll source has seen, kept in its own redb file: per repository whether it is
//! tracked, and per tag the digest that was last handed over as an event (or recorded as the
//! starting point). A restart diffs against this instead of converting everything again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};

use crate::oci::Digest;

/// `repository \x1f tag` → manifest digest.
const SEEN: TableDefinition<&str, &str> = TableDefinition::new("seen");
/// Repository → [`RepoState`] byte.
const REPOS: TableDefinition<&str, u8> = TableDefinition::new("repos");
/// `registry` (the host the state is about), `started` (the first round listed the registry).
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

const SEP: char = '\u{1f}';

/// How the next listing of a repository is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoState {
    /// It existed when the source first listed the registry: the `initial` setting decides
    /// whether its present tags are converted.
    Pending,
    /// Listed before: what differs from the recorded tags is new.
    Tracked,
}

impl RepoState {
    fn byte(self) -> u8 {
        match self {
            RepoState::Pending => 0,
            RepoState::Tracked => 1,
        }
    }

    fn from_byte(b: u8) -> RepoState {
        if b == 0 {
            RepoState::Pending
        } else {
            RepoState::Tracked
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StateError {
    #[error("poll state {path} is in use by another process (is another acceld running with the same state_path?)")]
    InUse { path: PathBuf },
    #[error("poll state {path}: {why}")]
    Open { path: PathBuf, why: String },
    #[error("poll state {path}: {why}")]
    Db { path: PathBuf, why: String },
}

/// Changes to one repository's record, written in one transaction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RepoUpdate {
    pub repository: String,
    /// Tags now recorded at these digests.
    pub seen: Vec<(String, Digest)>,
    /// Tags no longer there (or no longer watched).
    pub forget: Vec<String>,
    /// Mark the repository tracked.
    pub tracked: bool,
    /// The repository is gone: drop it and all its tags.
    pub forget_repository: bool,
}

/// Handle to the state file. Cheap to clone; calls block (use them off the executor).
#[derive(Clone)]
pub struct SeenStore {
    db: Arc<Database>,
    path: PathBuf,
}

impl std::fmt::Debug for SeenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeenStore").field("path", &self.path).finish()
    }
}

impl SeenStore {
    /// Opens (creating when missing) the state of a source polling `registry`. State recorded
    /// for another registry host is dropped: it says nothing about this one.
    pub fn open(path: &Path, registry: &str) -> Result<SeenStore, StateError> {
        let open_err = |why: String| StateError::Open { path: path.to_path_buf(), why };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| open_err(format!("cannot create directory {}: {e}", dir.display())))?;
        }
        let db = match Database::create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(StateError::InUse { path: path.to_path_buf() }),
            Err(e) => return Err(open_err(e.to_string())),
        };
        let store = SeenStore { db: Arc::new(db), path: path.to_path_buf() };
        store.tx(|txn| {
            let meta = txn.open_table(META)?;
            let recorded = meta.get("registry")?.map(|v| v.value().to_string());
            let other = recorded.as_deref().is_some_and(|r| r != registry);
            drop(meta);
            if other {
                tracing::warn!(
                    path = %path.display(),
                    "the poll state was recorded for registry {}, not {registry}; starting afresh",
                    recorded.unwrap_or_default()
                );
                txn.delete_table(SEEN)?;
                txn.delete_table(REPOS)?;
                txn.delete_table(META)?;
            }
            txn.open_table(SEEN)?;
            txn.open_table(REPOS)?;
            txn.open_table(META)?.insert("registry", registry)?;
            Ok(())
        })?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the source has listed its registry once.
    pub fn started(&self) -> Result<bool, StateError> {
        self.read(|txn| Ok(txn.open_table(META)?.get("started")?.is_some()))
    }

    /// Records the first listing: `present` are the repositories that exist now, whose present
    /// tags the `initial` setting governs.
    pub fn start(&self, present: &[String]) -> Result<(), StateError> {
        self.tx(|txn| {
            let mut repos = txn.open_table(REPOS)?;
            for r in present {
                if repos.get(r.as_str())?.is_none() {
                    repos.insert(r.as_str(), RepoState::Pending.byte())?;
                }
            }
            txn.open_table(META)?.insert("started", "1")?;
            Ok(())
        })
    }

    /// The repository's state; `None` when it was never listed.
    pub fn repository(&self, repository: &str) -> Result<Option<RepoState>, StateError> {
        self.read(|txn| Ok(txn.open_table(REPOS)?.get(repository)?.map(|v| RepoState::from_byte(v.value()))))
    }

    /// Every repository with a record.
    pub fn repositories(&self) -> Result<Vec<String>, StateError> {
        self.read(|txn| {
            let t = txn.open_table(REPOS)?;
            let mut out = Vec::new();
            for row in t.iter()? {
                out.push(row?.0.value().to_string());
            }
            Ok(out)
        })
    }

    /// Tags recorded for a repository, with their digests.
    pub fn tags(&self, repository: &str) -> Result<BTreeMap<String, Digest>, StateError> {
        let path = self.path.clone();
        self.read(move |txn| {
            let t = txn.open_table(SEEN)?;
            let (lo, hi) = bounds(repository);
            let mut out = BTreeMap::new();
            for row in t.range(lo.as_str()..hi.as_str())? {
                let (k, v) = row?;
                let tag = k.value().split_once(SEP).map(|(_, t)| t.to_string()).unwrap_or_default();
                let digest: Digest = v.value().parse().map_err(|e| DbError(format!(
                    "{}: the digest recorded for {repository}:{tag} cannot be read: {e}",
                    path.display()
                )))?;
                out.insert(tag, digest);
            }
            Ok(out)
        })
    }

    /// Applies the updates in one durable transaction.
    pub fn apply(&self, updates: &[RepoUpdate]) -> Result<(), StateError> {
        self.tx(|txn| {
            let mut seen = txn.open_table(SEEN)?;
            let mut repos = txn.open_table(REPOS)?;
            for u in updates {
                let repo = u.repository.as_str();
                if u.forget_repository {
                    let (lo, hi) = bounds(repo);
                    seen.retain_in(lo.as_str()..hi.as_str(), |_, _| false)?;
                    repos.remove(repo)?;
                    continue;
                }
                for tag in &u.forget {
                    seen.remove(key(repo, tag).as_str())?;
                }
                for (tag, digest) in &u.seen {
                    seen.insert(key(repo, tag).as_str(), digest.to_string().as_str())?;
                }
                if u.tracked {
                    repos.insert(repo, RepoState::Tracked.byte())?;
                }
            }
            Ok(())
        })
    }

    fn read<T>(&self, f: impl FnOnce(&redb::ReadTransaction) -> Result<T, DbError>) -> Result<T, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        f(&txn).map_err(|e| StateError::Db { path: self.path.clone(), why: e.0 })
    }

    fn tx<T>(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<T, DbError>) -> Result<T, StateError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let out = f(&txn).map_err(|e| StateError::Db { path: self.path.clone(), why: e.0 })?;
        txn.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    fn err(&self, e: impl Into<redb::Error>) -> StateError {
        StateError::Db { path: self.path.clone(), why: e.into().to_string() }
    }
}

fn key(repository: &str, tag: &str) -> String {
    format!("{repository}{SEP}{tag}")
}

/// Key range holding exactly the tags of `repository`: `\x1f` sorts before every character a
/// tag may hold, and `\x20` right after the separator.
fn bounds(repository: &str) -> (String, String) {
    (format!("{repository}{SEP}"), format!("{repository}\u{20}"))
}

/// A failure inside a transaction, as text (redb's error types differ per call).
struct DbError(String);

impl<E: Into<redb::Error>> From<E> for DbError {
    fn from(e: E) -> Self {
        DbError(e.into().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::of(&[n])
    }

    #[test]
    fn records_survive_reopening_and_stay_per_repository() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("poll.redb");
        {
            let s = SeenStore::open(&path, "h:5000").unwrap();
            assert!(!s.started().unwrap());
            s.start(&["a".into(), "a/b".into()]).unwrap();
            assert_eq!(s.repository("a").unwrap(), Some(RepoState::Pending));
            assert_eq!(s.repository("c").unwrap(), None);
            s.apply(&[
                RepoUpdate { repository: "a".into(), seen: vec![("1".into(), d(1)), ("2".into(), d(2))], tracked: true, ..Default::default() },
                RepoUpdate { repository: "a/b".into(), seen: vec![("1".into(), d(3))], ..Default::default() },
                // A repository whose name extends another's must not show up in its range.
                RepoUpdate { repository: "a-x".into(), seen: vec![("9".into(), d(9))], ..Default::default() },
            ])
            .unwrap();
        }
        let s = SeenStore::open(&path, "h:5000").unwrap();
        assert!(s.started().unwrap());
        assert_eq!(s.repository("a").unwrap(), Some(RepoState::Tracked));
        assert_eq!(s.repository("a/b").unwrap(), Some(RepoState::Pending));
        assert_eq!(s.tags("a").unwrap(), BTreeMap::from([("1".into(), d(1)), ("2".into(), d(2))]));
        assert_eq!(s.tags("a/b").unwrap(), BTreeMap::from([("1".into(), d(3))]));

        s.apply(&[
            RepoUpdate { repository: "a".into(), seen: vec![("2".into(), d(5))], forget: vec!["1".into()], ..Default::default() },
            RepoUpdate { repository: "a/b".into(), forget_repository: true, ..Default::default() },
        ])
        .unwrap();
        assert_eq!(s.tags("a").unwrap(), BTreeMap::from([("2".into(), d(5))]));
        assert!(s.tags("a/b").unwrap().is_empty());
        assert_eq!(s.repository("a/b").unwrap(), None);
        assert_eq!(s.repositories().unwrap(), vec!["a".to_string()]);
        assert_eq!(s.tags("a-x").unwrap().len(), 1);
    }

    #[test]
    fn another_registry_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("poll.redb");
        {
            let s = SeenStore::open(&path, "old:5000").unwrap();
            s.start(&["a".into()]).unwrap();
            s.apply(&[RepoUpdate { repository: "a".into(), seen: vec![("1".into(), d(1))], ..Default::default() }]).unwrap();
        }
        let s = SeenStore::open(&path, "new:5000").unwrap();
        assert!(!s.started().unwrap());
        assert!(s.tags("a").unwrap().is_empty());
        assert!(s.repositories().unwrap().is_empty());
    }

    #[test]
    fn a_second_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("poll.redb");
        let _first = SeenStore::open(&path, "h").unwrap();
        assert!(matches!(SeenStore::open(&path, "h"), Err(StateError::InUse { .. })));
    }
}
