//! Work over many items on a few scoped threads: listing key ranges, loading and writing back
//! blocks, streaming a diff. One helper for every layer, so each bounds its requests in flight the
//! same way and a worker's panic keeps its own message.

use std::sync::Mutex;

use crate::{lock, Error, Result};

/// Runs `work` on every item, `concurrency` at a time, returning the first error.
pub(crate) fn parallel<T: Send>(
    items: Vec<T>,
    concurrency: usize,
    work: impl Fn(T) -> Result<()> + Sync,
) -> Result<()> {
    parallel_while(items, concurrency, &|| true, work)
}

/// As [`parallel`], but no worker takes a new item once `keep_going` returns false.
pub(crate) fn parallel_while<T: Send>(
    items: Vec<T>,
    concurrency: usize,
    keep_going: &(dyn Fn() -> bool + Sync),
    work: impl Fn(T) -> Result<()> + Sync,
) -> Result<()> {
    let workers = concurrency.clamp(1, items.len().max(1));
    let queue = Mutex::new(items.into_iter());
    let next = || if keep_going() { lock(&queue).next() } else { None };
    if workers == 1 {
        return std::iter::from_fn(next).try_for_each(work);
    }
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    while let Some(item) = next() {
                        if let Err(e) = work(item) {
                            lock(&first_error).get_or_insert(e);
                        }
                    }
                })
            })
            .collect();
        // A worker's panic goes on in this thread with its own message, which the scope's own
        // join would replace with "a scoped thread panicked".
        let mut first_panic = None;
        for handle in handles {
            if let Err(panic) = handle.join() {
                first_panic.get_or_insert(panic);
            }
        }
        if let Some(panic) = first_panic {
            std::panic::resume_unwind(panic);
        }
    });
    let first_error = lock(&first_error).take();
    first_error.map_or(Ok(()), Err)
}
