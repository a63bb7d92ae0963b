//! `BlockBuf`: a block's bytes in a buffer that goes back to a small process-wide pool when
//! dropped, so the next block can reuse it.
//!
//! Why: glibc serves every allocation of 128 KiB or more with a fresh `mmap` (the threshold
//! `plugin::load` fixes, so that freed blocks go back to the kernel and RSS stays bounded). A
//! fresh buffer costs a page fault and a page clear for each 4 KiB it is written, and freeing it
//! an `munmap`: with 1 MiB blocks that was about 60 % of nbds3's CPU on a cold sequential read,
//! CPU that the S3 server, often on the same machine, then lacks. Blocks come and go at a steady
//! rate (one fetched, one evicted; one written, one written back), so a few recycled buffers make
//! that churn free, and the pool's cap keeps the memory it holds small.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

use crate::lock;

/// Buffers smaller than this come from malloc's free lists, which recycle them already.
const MIN_POOLED: usize = 64 * 1024;

/// Free buffers kept, in bytes; past it the oldest are freed (so sizes no longer used age out).
const POOL_BYTES: usize = 8 << 20;

/// Free buffers, oldest first.
static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// One block's bytes. Dereferences to the slice; dropping it returns the buffer to the pool.
pub struct BlockBuf(Vec<u8>);

impl BlockBuf {
    /// A buffer of `len` bytes whose content is left from an earlier block: for callers that
    /// overwrite all of it.
    pub fn recycled(len: usize) -> Self {
        if len >= MIN_POOLED {
            let mut pool = lock(&POOL);
            if let Some(i) = pool.iter().rposition(|b| b.len() == len) {
                return BlockBuf(pool.swap_remove(i));
            }
        }
        let buf = vec![0; len];
        if len >= MIN_POOLED {
            prefault(&buf);
        }
        BlockBuf(buf)
    }

    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        let mut buf = Self::recycled(len);
        buf.0.fill(0);
        buf
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_of(data: &[u8]) -> Self {
        let mut buf = Self::recycled(data.len());
        buf.0.copy_from_slice(data);
        buf
    }
}

/// Maps all of a fresh buffer's pages at once. A fresh large buffer is a new mapping that would
/// otherwise take one page fault per 4 KiB as it is first written; one `madvise` does that work
/// without the faults (measured on a cold 1M sequential read: about a tenth less CPU in the
/// threads that fill blocks). Best effort: kernels before 5.14 refuse it, and then the pages
/// fault in as before.
fn prefault(buf: &[u8]) {
    const PAGE: usize = 4096;
    let start = (buf.as_ptr() as usize).next_multiple_of(PAGE);
    let end = (buf.as_ptr() as usize + buf.len()) & !(PAGE - 1);
    if end > start {
        // SAFETY: [start, end) lies inside `buf`'s allocation, which this process owns and
        // which is still zero; populating writable pages does not change their content.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_POPULATE_WRITE) };
    }
}

impl Drop for BlockBuf {
    fn drop(&mut self) {
        let len = self.0.len();
        if !(MIN_POOLED..=POOL_BYTES).contains(&len) {
            return;
        }
        let buf = std::mem::take(&mut self.0);
        let mut pool = lock(&POOL);
        let mut held: usize = pool.iter().map(Vec::len).sum();
        while held + len > POOL_BYTES && !pool.is_empty() {
            held -= pool.remove(0).len();
        }
        pool.push(buf);
    }
}

impl Clone for BlockBuf {
    fn clone(&self) -> Self {
        Self::copy_of(self)
    }
}

impl Deref for BlockBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl DerefMut for BlockBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl AsRef<[u8]> for BlockBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for BlockBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockBuf({} bytes)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_buffer_is_reused_and_the_pool_stays_within_its_cap() {
        // A size no other test uses, so tests running in parallel do not take these buffers.
        let len = MIN_POOLED + 4096 * 7;
        let first = BlockBuf::copy_of(&vec![7u8; len]);
        let addr = first.as_ptr();
        drop(first);
        let again = BlockBuf::recycled(len);
        assert_eq!(again.as_ptr(), addr, "the freed buffer is handed out again");
        assert!(again.iter().all(|&b| b == 7), "recycled keeps the old bytes");
        drop(again);
        assert!(BlockBuf::zeroed(len).iter().all(|&b| b == 0));

        let many: Vec<BlockBuf> = (0..POOL_BYTES / len + 4).map(|_| BlockBuf::recycled(len)).collect();
        drop(many);
        let held: usize = lock(&POOL).iter().map(Vec::len).sum();
        assert!(held <= POOL_BYTES, "the pool holds {held} bytes");
    }

    #[test]
    fn small_buffers_are_left_to_malloc() {
        let buf = BlockBuf::copy_of(&[1, 2, 3]);
        assert_eq!(&*buf, &[1, 2, 3]);
        drop(buf);
        assert!(lock(&POOL).iter().all(|b| b.len() >= MIN_POOLED));
    }
}
