//! The global allocator: dlmalloc behind a futex lock.
//!
//! Every binary allocates through dlmalloc rather than musl's mallocng:
//! mallocng returns freed mid-size buffers (TLS records, HTTP/2 frames,
//! tunnel packets) to the kernel at once, so a busy tunnel spent a fifth of
//! its CPU in munmap and in faulting the pages back in. dlmalloc keeps
//! freed memory for reuse and trims only large free tops.
//!
//! The lock is std's futex mutex, not dlmalloc's own global one (musl's
//! pthread mutex): once that had been contended, musl issued a futex wake
//! syscall on nearly every unlock, whether anyone waited or not. The
//! webhook, 50 keep-alive connections on as many threads, made about 6.5
//! such syscalls per review (55,558 wakes against 4,944 waits in one
//! `strace -f` of 8,600 reviews). std's mutex wakes only when a thread
//! actually sleeps on it, and spins briefly first.
//!
//! Owns: the one heap. Must not: allocate, or panic, while holding the lock.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::UnsafeCell;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// dlmalloc's heap, one thread at a time.
pub struct Allocator {
    lock: Mutex<()>,
    heap: UnsafeCell<dlmalloc::Dlmalloc>,
}

// SAFETY: the heap is only touched with `lock` held.
unsafe impl Sync for Allocator {}

impl Allocator {
    pub const fn new() -> Allocator {
        Allocator {
            lock: Mutex::new(()),
            heap: UnsafeCell::new(dlmalloc::Dlmalloc::new()),
        }
    }

    fn locked(&self) -> (MutexGuard<'_, ()>, *mut dlmalloc::Dlmalloc) {
        // Poisoning needs a panic with the lock held, which the heap's
        // code never does; take the heap either way.
        let guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        (guard, self.heap.get())
    }
}

impl Default for Allocator {
    fn default() -> Self {
        Allocator::new()
    }
}

// SAFETY: each call runs dlmalloc with the lock held, so the heap has one
// user at a time; the layouts are those the caller passes, as dlmalloc's
// own GlobalAlloc does.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let (_guard, heap) = self.locked();
        // SAFETY: exclusive access under the lock.
        unsafe { (*heap).malloc(layout.size(), layout.align()) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let (_guard, heap) = self.locked();
        // SAFETY: exclusive access; ptr came from this heap with layout.
        unsafe { (*heap).free(ptr, layout.size(), layout.align()) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let (_guard, heap) = self.locked();
        // SAFETY: exclusive access under the lock.
        unsafe { (*heap).calloc(layout.size(), layout.align()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (_guard, heap) = self.locked();
        // SAFETY: exclusive access; ptr came from this heap with layout.
        unsafe { (*heap).realloc(ptr, layout.size(), layout.align(), new_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_allocate_and_free_concurrently_without_losing_blocks() {
        let heap = std::sync::Arc::new(Allocator::new());
        let workers: Vec<_> = (0..4)
            .map(|t| {
                let heap = heap.clone();
                std::thread::spawn(move || {
                    let mut live = Vec::new();
                    for i in 0..2000usize {
                        let size = 1 + (i * 37 + t * 11) % 70_000;
                        let align = [1, 8, 16, 64, 4096][i % 5];
                        let layout = Layout::from_size_align(size, align).unwrap();
                        // SAFETY: non-zero size; freed below with the same layout.
                        let p = unsafe { heap.alloc(layout) };
                        assert!(!p.is_null());
                        assert_eq!(p as usize % align, 0);
                        // SAFETY: p holds size bytes.
                        unsafe { p.write_bytes(t as u8, size) };
                        live.push((p, layout));
                        if live.len() > 50 {
                            let (q, l) = live.swap_remove(i % live.len());
                            // SAFETY: q holds l.size() bytes, all written with t.
                            unsafe {
                                assert_eq!(*q, t as u8);
                                assert_eq!(*q.add(l.size() - 1), t as u8);
                                let q = heap.realloc(q, l, l.size() / 2 + 1);
                                assert_eq!(*q, t as u8);
                                heap.dealloc(
                                    q,
                                    Layout::from_size_align(l.size() / 2 + 1, l.align()).unwrap(),
                                );
                            }
                        }
                    }
                    for (p, l) in live {
                        // SAFETY: allocated above with l.
                        unsafe { heap.dealloc(p, l) };
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        let zeroed = Layout::from_size_align(100_000, 8).unwrap();
        // SAFETY: non-zero size; freed at once.
        unsafe {
            let p = heap.alloc_zeroed(zeroed);
            assert!((0..zeroed.size()).all(|i| *p.add(i) == 0));
            heap.dealloc(p, zeroed);
        }
    }
}
