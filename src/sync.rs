//! The one way herald takes a plain (std) lock.
//!
//! Everything herald keeps behind a std mutex is a map, a set, a queue or a
//! few numbers that each change in one step, so a panic in another thread
//! cannot leave them half-changed: a poisoned lock is taken as it is
//! rather than spreading the panic to every later caller.

use std::sync::{Mutex, MutexGuard};

pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
