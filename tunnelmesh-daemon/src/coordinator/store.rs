//! Persistent coordinator state behind [`Store`]: nodes and their addresses, enrollment tokens,
//! mesh keys, settings.
//!
//! [`SqliteStore`] is the embedded default (WAL, schema migrations by `user_version`); the trait
//! is the seam for a shared SQL server backing several coordinators later. Every mutation is one
//! transaction, so a crash or a bad request never leaves the store half-changed. Uniqueness of
//! names, keys and host numbers is enforced by the schema as well as by the caller.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the name {0:?} already belongs to another key")]
    NameTaken(String),
    #[error("the store at {0} was written by a newer TunnelMesh (schema {1}); upgrade this binary")]
    TooNew(String, i64),
}

/// A node the coordinator has admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub fingerprint: String,
    /// `ssh-ed25519 AAAA…`
    pub public_key: String,
    pub name: String,
    pub tags: Vec<String>,
    pub host: u32,
    pub created: i64,
    pub revoked: bool,
    /// Removed by the operator: not a member until it joins again (keeping its address).
    pub removed: bool,
    /// Endpoints last reported (`ip:port`, best first).
    pub endpoints: Vec<String>,
    /// What admitted it, re-checked on every connect.
    pub admitted_by: Admission,
}

/// What admitted a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Its line in `authorized_keys`: it stays a member only while the line does, with the
    /// line's tags.
    Key,
    /// An enrollment token (with the token's tags): a member until revoked or removed.
    Token,
    /// Admitted by a coordinator before this was recorded: re-checked as a key while
    /// `authorized_keys` lists it, else kept as it is.
    Unknown,
}

impl Admission {
    fn column(self) -> &'static str {
        match self {
            Admission::Key => "key",
            Admission::Token => "token",
            Admission::Unknown => "",
        }
    }

    fn from_column(s: &str) -> Self {
        match s {
            "key" => Admission::Key,
            "token" => Admission::Token,
            _ => Admission::Unknown,
        }
    }
}

/// An enrollment token (only its hash is stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub hash: String,
    pub uses_left: u32,
    pub expires: i64,
    pub tags: Vec<String>,
    /// Which names its holders may take ([`super::admission::TokenNames`] pattern).
    pub names: String,
}

/// A mesh key and when it became current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshKeyRecord {
    pub key: String,
    pub created: i64,
}

/// What the coordinator persists.
pub trait Store: Send {
    fn setting(&self, key: &str) -> Result<Option<String>, StoreError>;
    fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError>;
    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    fn node(&self, fingerprint: &str) -> Result<Option<NodeRecord>, StoreError>;
    /// Insert a new node; fails with [`StoreError::NameTaken`] if the name belongs to another key.
    fn insert_node(&self, node: &NodeRecord) -> Result<(), StoreError>;
    fn set_endpoints(&self, fingerprint: &str, endpoints: &[String]) -> Result<(), StoreError>;
    /// Record what admits the node now, and the tags that gives it.
    fn set_admission(&self, fingerprint: &str, admitted_by: Admission, tags: &[String]) -> Result<(), StoreError>;
    /// Mark the node with this name or fingerprint revoked; the record, or None if unknown.
    fn revoke(&self, name_or_fingerprint: &str) -> Result<Option<NodeRecord>, StoreError>;
    /// Set or clear the node's `removed` mark; the record as it was, or None if unknown.
    fn set_removed(&self, name_or_fingerprint: &str, removed: bool) -> Result<Option<NodeRecord>, StoreError>;
    fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError>;
    /// The token if it is valid at `now` (nothing is spent).
    fn token(&self, hash: &str, now: i64) -> Result<Option<TokenRecord>, StoreError>;
    /// Use one of the token's uses if it is valid at `now`; its record as it was, or None.
    fn consume_token(&self, hash: &str, now: i64) -> Result<Option<TokenRecord>, StoreError>;
    fn mesh_keys(&self) -> Result<Vec<MeshKeyRecord>, StoreError>;
    fn add_mesh_key(&self, key: &MeshKeyRecord) -> Result<(), StoreError>;
    /// Changes whenever another connection (the CLI) commits: the running coordinator polls it.
    fn data_version(&self) -> Result<i64, StoreError>;
}

/// The embedded SQLite store.
pub struct SqliteStore {
    conn: Connection,
}

const SCHEMA_VERSION: i64 = 4;

const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
     CREATE TABLE nodes (
        fingerprint TEXT PRIMARY KEY,
        public_key TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL UNIQUE,
        tags TEXT NOT NULL,
        host INTEGER NOT NULL UNIQUE,
        created INTEGER NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0,
        endpoints TEXT NOT NULL DEFAULT ''
     );
     CREATE TABLE tokens (hash TEXT PRIMARY KEY, uses_left INTEGER NOT NULL, expires INTEGER NOT NULL, tags TEXT NOT NULL);
     CREATE TABLE mesh_keys (id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, created INTEGER NOT NULL);",
    // 2: nodes can be removed (not a member now, may rejoin with authorization, keeps its address).
    "ALTER TABLE nodes ADD COLUMN removed INTEGER NOT NULL DEFAULT 0;",
    // 3: what admitted each node (`key`, `token`; empty for nodes admitted before).
    "ALTER TABLE nodes ADD COLUMN admitted_by TEXT NOT NULL DEFAULT '';",
    // 4: which names a token's holders may take (tokens made before: any name policy does not
    // name and no authorized_keys line reserves).
    "ALTER TABLE tokens ADD COLUMN names TEXT NOT NULL DEFAULT '*';",
];

fn split(list: String) -> Vec<String> {
    list.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect()
}

/// Base64 of a new random mesh key (what a [`MeshKeyRecord`] holds).
pub fn new_mesh_key() -> String {
    use base64::Engine;
    use rand::RngCore;
    let mut key = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    base64::engine::general_purpose::STANDARD.encode(key)
}

impl SqliteStore {
    /// Open (creating and migrating) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: a revocation, a token use or a new node is on disk before it is acted on (NORMAL
        // in WAL mode can lose the last commits on power loss: a revoked key could rejoin).
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::TooNew(path.display().to_string(), version));
        }
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(migration)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(SqliteStore { conn })
    }

    /// An in-memory store.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn in_memory() -> Result<Self, StoreError> {
        let conn = Connection::open_in_memory()?;
        for migration in MIGRATIONS {
            conn.execute_batch(migration)?;
        }
        Ok(SqliteStore { conn })
    }

    /// An in-memory store as the hub and API tests start from: a mesh key and the token `token`
    /// (10,000 uses, 10 minutes, tag `t`).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn for_tests(token: &str) -> Self {
        let store = Self::in_memory().unwrap();
        store
            .add_mesh_key(&MeshKeyRecord {
                key: new_mesh_key(),
                created: crate::control::unix_now(),
            })
            .unwrap();
        store
            .insert_token(&TokenRecord {
                hash: super::admission::token_hash(token),
                uses_left: 10_000,
                expires: crate::control::unix_now() + 600,
                tags: vec!["t".into()],
                names: "*".into(),
            })
            .unwrap();
        store
    }

    fn row_to_node(r: &rusqlite::Row<'_>) -> rusqlite::Result<NodeRecord> {
        Ok(NodeRecord {
            fingerprint: r.get(0)?,
            public_key: r.get(1)?,
            name: r.get(2)?,
            tags: split(r.get(3)?),
            host: r.get(4)?,
            created: r.get(5)?,
            revoked: r.get::<_, i64>(6)? != 0,
            endpoints: split(r.get(7)?),
            removed: r.get::<_, i64>(8)? != 0,
            admitted_by: Admission::from_column(&r.get::<_, String>(9)?),
        })
    }
}

const NODE_COLUMNS: &str =
    "fingerprint, public_key, name, tags, host, created, revoked, endpoints, removed, admitted_by";

impl Store for SqliteStore {
    fn setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    fn set_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {NODE_COLUMNS} FROM nodes ORDER BY host"))?;
        let rows = stmt.query_map([], Self::row_to_node)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn node(&self, fingerprint: &str) -> Result<Option<NodeRecord>, StoreError> {
        let sql = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE fingerprint = ?1");
        Ok(self.conn.query_row(&sql, [fingerprint], Self::row_to_node).optional()?)
    }

    fn insert_node(&self, n: &NodeRecord) -> Result<(), StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let owner: Option<String> = tx
            .query_row("SELECT fingerprint FROM nodes WHERE name = ?1", [&n.name], |r| r.get(0))
            .optional()?;
        if owner.is_some_and(|f| f != n.fingerprint) {
            return Err(StoreError::NameTaken(n.name.clone()));
        }
        tx.execute(
            &format!("INSERT INTO nodes ({NODE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"),
            params![
                n.fingerprint,
                n.public_key,
                n.name,
                n.tags.join(","),
                n.host,
                n.created,
                n.revoked as i64,
                n.endpoints.join(","),
                n.removed as i64,
                n.admitted_by.column()
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn set_endpoints(&self, fingerprint: &str, endpoints: &[String]) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE nodes SET endpoints = ?2 WHERE fingerprint = ?1",
            params![fingerprint, endpoints.join(",")],
        )?;
        Ok(())
    }

    fn set_admission(&self, fingerprint: &str, admitted_by: Admission, tags: &[String]) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE nodes SET admitted_by = ?2, tags = ?3 WHERE fingerprint = ?1",
            params![fingerprint, admitted_by.column(), tags.join(",")],
        )?;
        Ok(())
    }

    fn revoke(&self, who: &str) -> Result<Option<NodeRecord>, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let sql = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE name = ?1 OR fingerprint = ?1");
        let node = tx.query_row(&sql, [who], Self::row_to_node).optional()?;
        if let Some(n) = node.as_ref().filter(|n| !n.revoked) {
            tx.execute("UPDATE nodes SET revoked = 1 WHERE fingerprint = ?1", [&n.fingerprint])?;
            // The revoked node knows the mesh key: a new one, in the same transaction (peers
            // still accept the old one through the overlap, so no tunnel drops).
            tx.execute(
                "INSERT INTO mesh_keys (key, created) VALUES (?1, ?2)",
                params![new_mesh_key(), crate::control::unix_now()],
            )?;
        }
        tx.commit()?;
        Ok(node)
    }

    fn set_removed(&self, who: &str, removed: bool) -> Result<Option<NodeRecord>, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let sql = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE name = ?1 OR fingerprint = ?1");
        let node = tx.query_row(&sql, [who], Self::row_to_node).optional()?;
        if let Some(n) = &node {
            tx.execute(
                "UPDATE nodes SET removed = ?2 WHERE fingerprint = ?1",
                params![n.fingerprint, removed as i64],
            )?;
        }
        tx.commit()?;
        Ok(node)
    }

    fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO tokens (hash, uses_left, expires, tags, names) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![t.hash, t.uses_left, t.expires, t.tags.join(","), t.names],
        )?;
        Ok(())
    }

    fn token(&self, hash: &str, now: i64) -> Result<Option<TokenRecord>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT hash, uses_left, expires, tags, names FROM tokens WHERE hash = ?1 AND uses_left > 0 AND expires > ?2",
                params![hash, now],
                |r| {
                    Ok(TokenRecord {
                        hash: r.get(0)?,
                        uses_left: r.get(1)?,
                        expires: r.get(2)?,
                        tags: split(r.get(3)?),
                        names: r.get(4)?,
                    })
                },
            )
            .optional()?)
    }

    fn consume_token(&self, hash: &str, now: i64) -> Result<Option<TokenRecord>, StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        let token = self.token(hash, now)?;
        if token.is_some() {
            tx.execute("UPDATE tokens SET uses_left = uses_left - 1 WHERE hash = ?1", [hash])?;
        }
        tx.commit()?;
        Ok(token)
    }

    fn mesh_keys(&self) -> Result<Vec<MeshKeyRecord>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT key, created FROM mesh_keys ORDER BY id DESC")?;
        let rows = stmt.query_map([], |r| {
            Ok(MeshKeyRecord {
                key: r.get(0)?,
                created: r.get(1)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn add_mesh_key(&self, k: &MeshKeyRecord) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO mesh_keys (key, created) VALUES (?1, ?2)",
            params![k.key, k.created],
        )?;
        Ok(())
    }

    fn data_version(&self) -> Result<i64, StoreError> {
        Ok(self.conn.pragma_query_value(None, "data_version", |r| r.get(0))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_commits_durably() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("c.db")).unwrap();
        let level: i64 = store
            .conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(level, 2, "synchronous = FULL");
    }

    /// Security item 22: a revoked node kept the mesh key for good.
    #[test]
    fn revoking_a_node_issues_a_new_mesh_key_with_the_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("c.db")).unwrap();
        store.insert_node(&node("SHA256:a", "a", 1)).unwrap();
        let before = store.mesh_keys().unwrap();
        assert!(store.revoke("a").unwrap().is_some());
        let after = store.mesh_keys().unwrap();
        assert_eq!(after.len(), before.len() + 1);
        assert!(!before.iter().any(|k| k.key == after[0].key), "the newest key is new");
        // Revoking it again changes nothing.
        store.revoke("a").unwrap();
        assert_eq!(store.mesh_keys().unwrap().len(), after.len());
    }

    fn node(fp: &str, name: &str, host: u32) -> NodeRecord {
        NodeRecord {
            fingerprint: fp.into(),
            public_key: format!("ssh-ed25519 {fp}"),
            name: name.into(),
            tags: vec!["web".into(), "prod".into()],
            host,
            created: 1,
            revoked: false,
            removed: false,
            endpoints: vec!["198.18.0.1:51820".into()],
            admitted_by: Admission::Token,
        }
    }

    #[test]
    fn nodes_round_trip_and_names_bind_to_keys() {
        let s = SqliteStore::in_memory().unwrap();
        s.insert_node(&node("SHA256:a", "web", 1)).unwrap();
        assert_eq!(s.node("SHA256:a").unwrap(), Some(node("SHA256:a", "web", 1)));
        let err = s.insert_node(&node("SHA256:b", "web", 2)).unwrap_err();
        assert!(matches!(err, StoreError::NameTaken(ref n) if n == "web"), "{err}");
        // A duplicate host number is refused by the schema, and nothing is half-written.
        assert!(s.insert_node(&node("SHA256:c", "db", 1)).is_err());
        assert_eq!(s.nodes().unwrap().len(), 1);
    }

    #[test]
    fn revocation_keeps_the_record_and_tokens_run_out() {
        let s = SqliteStore::in_memory().unwrap();
        s.insert_node(&node("SHA256:a", "web", 1)).unwrap();
        assert_eq!(s.revoke("web").unwrap().map(|n| n.fingerprint), Some("SHA256:a".into()));
        assert!(s.node("SHA256:a").unwrap().unwrap().revoked);
        assert_eq!(s.revoke("nobody").unwrap(), None);
        s.insert_token(&TokenRecord {
            hash: "h".into(),
            uses_left: 2,
            expires: 100,
            tags: vec![],
            names: "*".into(),
        })
        .unwrap();
        assert!(s.consume_token("h", 50).unwrap().is_some());
        assert!(s.consume_token("h", 50).unwrap().is_some());
        assert!(s.consume_token("h", 50).unwrap().is_none(), "used up");
        s.insert_token(&TokenRecord {
            hash: "old".into(),
            uses_left: 5,
            expires: 10,
            tags: vec![],
            names: "*".into(),
        })
        .unwrap();
        assert!(s.consume_token("old", 50).unwrap().is_none(), "expired");
    }

    #[test]
    fn a_file_store_survives_reopening_and_reports_foreign_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        let s = SqliteStore::open(&path).unwrap();
        s.add_mesh_key(&MeshKeyRecord {
            key: "k1".into(),
            created: 1,
        })
        .unwrap();
        let v = s.data_version().unwrap();
        let other = SqliteStore::open(&path).unwrap();
        other
            .add_mesh_key(&MeshKeyRecord {
                key: "k2".into(),
                created: 2,
            })
            .unwrap();
        assert_ne!(
            s.data_version().unwrap(),
            v,
            "the CLI's commit is visible to the running coordinator"
        );
        assert_eq!(
            s.mesh_keys()
                .unwrap()
                .iter()
                .map(|k| k.key.as_str())
                .collect::<Vec<_>>(),
            ["k2", "k1"]
        );
    }
}
