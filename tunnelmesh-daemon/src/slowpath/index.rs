//! Peers' keys and the session index table: the slow path is their only writer (the workers
//! read both as snapshots), and this file is the only place in it that writes them.
//!
//! A key is installed together with its index entry, and the shield learns the index first.
//! An entry lives while its peer is still in the table (the same `Peer` object) and still holds
//! that key as `current`, `previous` or `next`; otherwise it is pruned and the shield forgets
//! it. A peer that left the table also loses its keys, so nothing can send on them.

use std::{collections::HashMap, sync::Arc};

use rand::Rng;
use tunnelmesh_common::steer::{MAX_WORKERS, index_for, worker_of};

use super::{Output, SlowPath, key_of};
use crate::{
    device::{IndexEntry, KeySet, Peer},
    protocol::session::Keypair,
};

impl SlowPath {
    /// Replace `peer`'s key set with `update(old, keypair)` and index the new key.
    pub(super) fn install(
        &mut self,
        peer: &Arc<Peer>,
        keypair: Arc<Keypair>,
        update: impl Fn(&KeySet, Arc<Keypair>) -> KeySet,
    ) {
        let index = keypair.local_index;
        self.out.push(Output::ShieldIndex { index, live: true });
        peer.keys.store(Arc::new(update(&peer.keys.load(), keypair.clone())));
        let mut table: HashMap<u32, Arc<IndexEntry>> = (**self.dev.sessions.load()).clone();
        table.insert(
            index,
            Arc::new(IndexEntry {
                peer: peer.clone(),
                keypair,
            }),
        );
        self.dev.sessions.store(Arc::new(table));
        self.prune_indices();
    }

    /// Erase every key of `peer` (its sessions end now).
    pub(super) fn erase_keys(&mut self, peer: &Peer) {
        peer.keys.store(Arc::new(KeySet::default()));
        self.prune_indices();
    }

    /// Drop index-table entries whose key their peer no longer holds, or whose peer left.
    pub(super) fn prune_indices(&mut self) {
        let peers = self.dev.peers.load();
        let in_table = |entry: &IndexEntry| {
            peers
                .get(&key_of(&entry.peer))
                .is_some_and(|p| Arc::ptr_eq(p, &entry.peer))
        };
        let live = |entry: &IndexEntry| {
            let keys = entry.peer.keys.load();
            in_table(entry)
                && [&keys.current, &keys.previous, &keys.next]
                    .into_iter()
                    .flatten()
                    .any(|k| Arc::ptr_eq(k, &entry.keypair))
        };
        let table = self.dev.sessions.load();
        if table.values().all(|e| live(e)) {
            return;
        }
        for entry in table.values().filter(|e| !in_table(e)) {
            entry.peer.keys.store(Arc::new(KeySet::default()));
        }
        let mut pruned = HashMap::with_capacity(table.len());
        for (index, entry) in table.iter() {
            if live(entry) {
                pruned.insert(*index, entry.clone());
            } else {
                self.out.push(Output::ShieldIndex {
                    index: *index,
                    live: false,
                });
            }
        }
        self.dev.sessions.store(Arc::new(pruned));
    }

    /// Whether `index` names a session or a handshake in progress.
    fn index_taken(&self, index: u32) -> bool {
        self.dev.sessions.load().contains_key(&index)
            || self
                .peers
                .values()
                .any(|s| s.pending.as_ref().is_some_and(|h| h.local_index() == index))
    }

    /// A fresh random index not in use, naming the worker that owns the fewest sessions (the
    /// steering program delivers the session's data to it; without steering it is only a
    /// number).
    pub(super) fn new_index(&self) -> u32 {
        let pending = self
            .peers
            .values()
            .filter_map(|s| s.pending.as_ref().map(|h| h.local_index()));
        let mut load = [0usize; MAX_WORKERS as usize];
        for index in self.dev.sessions.load().keys().copied().chain(pending) {
            load[worker_of(index) as usize] += 1;
        }
        let worker = (0..self.workers).min_by_key(|&w| load[w as usize]).unwrap_or(0);
        let mut rng = rand::thread_rng();
        loop {
            let index = index_for(worker, rng.r#gen());
            if !self.index_taken(index) {
                return index;
            }
        }
    }
}
