//! Places for connections, bounded per source address and in all, so that one address (or
//! many) cannot hold every descriptor of a server: the coordinator bounds its connections not
//! yet admitted with them, the SSH transport its connections not yet authenticated. A place is
//! given back when its [`Slot`] drops.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

/// The places taken, by source address.
pub struct Slots {
    per_source: usize,
    total: usize,
    by_source: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place.
pub struct Slot {
    slots: Arc<Slots>,
    source: IpAddr,
}

impl Slots {
    /// At most `per_source` places per address and `total` in all.
    pub fn new(per_source: usize, total: usize) -> Arc<Self> {
        Arc::new(Slots {
            per_source,
            total,
            by_source: Mutex::default(),
        })
    }

    /// A place for a connection from `source`, unless a limit is reached.
    pub fn take(self: &Arc<Self>, source: IpAddr) -> Option<Slot> {
        let mut by_source = crate::sync::lock(&self.by_source);
        let total: usize = by_source.values().sum();
        let here = by_source.entry(source).or_default();
        if *here >= self.per_source || total >= self.total {
            return None;
        }
        *here += 1;
        Some(Slot {
            slots: self.clone(),
            source,
        })
    }

    /// Places taken in all.
    pub fn count(&self) -> usize {
        crate::sync::lock(&self.by_source).values().sum()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut by_source = crate::sync::lock(&self.slots.by_source);
        if let Some(n) = by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_per_source_and_in_all_and_come_back_when_dropped() {
        let slots = Slots::new(2, 3);
        let (a, b): (IpAddr, IpAddr) = ("198.18.0.1".parse().unwrap(), "198.18.0.2".parse().unwrap());
        let a1 = slots.take(a).unwrap();
        let _a2 = slots.take(a).unwrap();
        assert!(slots.take(a).is_none(), "per source");
        let _b1 = slots.take(b).unwrap();
        assert!(slots.take(b).is_none(), "in all");
        drop(a1);
        assert_eq!(slots.count(), 2);
        assert!(slots.take(b).is_some());
    }
}
