//! Locking that survives a panicked holder: the data behind our mutexes stays consistent at
//! every unlock (no invariant spans a panic point), so a poisoned lock is taken as it is rather
//! than turning one thread's panic into every thread's.

use std::sync::{Mutex, MutexGuard};

/// Lock `mutex`, ignoring poison.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
