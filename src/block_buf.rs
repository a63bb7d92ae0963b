//! `BlockBuf`: a block's bytes in a buffer that goes back to a small process-wide pool when
//! dropped, so the next block can reuse it.
//!
//! Why: large blocks (1 MiB is common) come and go at a steady rate: one fetched, one evicted;
//! one written, one written back. Left to malloc, each would either be a fresh `mmap` (a page
//! fault and a page clear for every 4 KiB written, then an `munmap`: about 60 % of nbds3's CPU
//! on a cold 1M sequential read, CPU that the S3 server, often on the same machine, then lacks)
//! or sit in one of glibc's per-thread arenas, where a freed block serves only that thread
//! (measured: RSS then outgrew `cache-size` + `max-dirty` by a third during a long sequential
//! write). So a large block is a mapping of its own, mapped with all its pages at once, recycled
//! through the pool and unmapped past the pool's cap: block memory goes back to the system as
//! soon as the cache lets go of it, and malloc keeps its own policy for everything else (such
//! as the HTTP client's read buffers, which it then recycles without faults).

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Mutex;

use crate::lock;

/// Buffers smaller than this come from malloc, whose free lists recycle them already.
const MIN_MAPPED: usize = 64 * 1024;

/// Free mappings kept, in bytes; past it the oldest are unmapped (so sizes no longer used age
/// out).
const POOL_BYTES: usize = 8 << 20;

/// Free mappings, oldest first.
static POOL: Mutex<Vec<Mapping>> = Mutex::new(Vec::new());

/// One block's bytes. Dereferences to the slice; dropping it returns a mapping to the pool.
pub struct BlockBuf(Memory);

enum Memory {
    Heap(Vec<u8>),
    Mapped(Mapping),
}

impl BlockBuf {
    /// A buffer of `len` bytes whose content is left from an earlier block: for callers that
    /// overwrite all of it.
    pub fn recycled(len: usize) -> Self {
        Self::pooled(len).unwrap_or_else(|| Self::fresh(len))
    }

    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        match Self::pooled(len) {
            Some(mut buf) => {
                buf.fill(0);
                buf
            }
            None => Self::fresh(len),
        }
    }

    /// A free mapping of `len` bytes from the pool, the one freed last.
    fn pooled(len: usize) -> Option<Self> {
        if len < MIN_MAPPED {
            return None;
        }
        let mut pool = lock(&POOL);
        let i = pool.iter().rposition(|m| m.len == len)?;
        // `remove`, not `swap_remove`: the pool stays oldest first.
        Some(BlockBuf(Memory::Mapped(pool.remove(i))))
    }

    /// New memory of `len` bytes, all zero.
    fn fresh(len: usize) -> Self {
        if len < MIN_MAPPED {
            BlockBuf(Memory::Heap(vec![0; len]))
        } else {
            BlockBuf(Memory::Mapped(Mapping::new(len)))
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_of(data: &[u8]) -> Self {
        let mut buf = Self::recycled(data.len());
        buf.copy_from_slice(data);
        buf
    }
}

/// Anonymous memory of `len` bytes, mapped for this buffer alone.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a `Mapping` is plain memory owned by one `BlockBuf` (or the pool) at a time; access
// to its bytes goes through `&`/`&mut BlockBuf`, so the usual borrow rules guard it.
unsafe impl Send for Mapping {}
// SAFETY: as above: `&Mapping` only hands out shared slices.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` (> 0) zero bytes with every page present (`MAP_POPULATE`): one system call
    /// instead of a page fault per 4 KiB as the block is first written. Aborts like a failed
    /// allocation if the system has no memory left.
    fn new(len: usize) -> Self {
        // SAFETY: an anonymous private mapping touches no existing memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        match NonNull::new(ptr.cast::<u8>()).filter(|_| ptr != libc::MAP_FAILED) {
            Some(ptr) => Mapping { ptr, len },
            None => {
                let layout = std::alloc::Layout::array::<u8>(len).unwrap_or_else(|_| std::alloc::Layout::new::<u8>());
                std::alloc::handle_alloc_error(layout)
            }
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `len` are exactly what `mmap` returned and nothing refers to the
        // memory any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl Drop for BlockBuf {
    fn drop(&mut self) {
        // An empty `Vec` allocates nothing: this only moves the mapping out.
        let Memory::Mapped(mapping) = std::mem::replace(&mut self.0, Memory::Heap(Vec::new())) else { return };
        if mapping.len > POOL_BYTES {
            return;
        }
        let mut pool = lock(&POOL);
        let mut held: usize = pool.iter().map(|m| m.len).sum();
        while held + mapping.len > POOL_BYTES && !pool.is_empty() {
            held -= pool.remove(0).len;
        }
        pool.push(mapping);
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
        match &self.0 {
            Memory::Heap(v) => v,
            // SAFETY: the mapping is `len` bytes, initialised (zero at first) and owned by this
            // buffer, which `&self` borrows.
            Memory::Mapped(m) => unsafe { std::slice::from_raw_parts(m.ptr.as_ptr(), m.len) },
        }
    }
}

impl DerefMut for BlockBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.0 {
            Memory::Heap(v) => v,
            // SAFETY: as in `deref`, and `&mut self` makes this the only reference.
            Memory::Mapped(m) => unsafe { std::slice::from_raw_parts_mut(m.ptr.as_ptr(), m.len) },
        }
    }
}

impl AsRef<[u8]> for BlockBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl fmt::Debug for BlockBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockBuf({} bytes)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_buffer_is_reused_and_the_pool_stays_within_its_cap() {
        // A size no other test uses, so tests running in parallel do not take these buffers.
        let len = MIN_MAPPED + 4096 * 7;
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
        let held: usize = lock(&POOL).iter().map(|m| m.len).sum();
        assert!(held <= POOL_BYTES, "the pool holds {held} bytes");
    }

    #[test]
    fn a_fresh_buffer_is_zero_and_one_larger_than_the_pool_is_unmapped() {
        let len = MIN_MAPPED + 4096 * 5;
        assert!(BlockBuf::recycled(len).iter().all(|&b| b == 0), "a fresh mapping is zero");
        let huge = POOL_BYTES + 4096;
        let mut buf = BlockBuf::recycled(huge);
        buf[huge - 1] = 1;
        drop(buf);
        assert!(lock(&POOL).iter().all(|m| m.len != huge), "not kept past the pool's cap");
    }

    #[test]
    fn small_buffers_are_left_to_malloc() {
        let buf = BlockBuf::copy_of(&[1, 2, 3]);
        assert_eq!(&*buf, &[1, 2, 3]);
        drop(buf);
        assert!(lock(&POOL).iter().all(|m| m.len >= MIN_MAPPED));
    }
}
