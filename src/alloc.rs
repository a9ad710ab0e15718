//! The global allocator (dlmalloc behind a futex lock) and, in the static
//! musl builds on x86_64, `memcpy`.
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
//! musl's x86_64 `memcpy` copies with `rep movsq` and then byte by byte.
//! On CPUs with fast short `rep movsb` (the `erms` and `fsrm` flags: Intel
//! since Ice Lake, AMD since Zen 3), that is the slow way: a `perf` profile
//! of the webhook on such a machine found 16% of its cycles in memcpy, most
//! of them on `rep movsq`, for some 130 small copies per review, and a
//! gRPC tunnel spent 16% of the machine in it. The `memcpy` here is one
//! `rep movsb`, which the CPU's microcode runs at its best width for every
//! size; the static link takes it instead of musl's (the linker only pulls
//! an archive member for a symbol still undefined). It is also
//! `__memcpy_fwd`, the name musl's own `memmove` jumps to.
//!
//! Except at one distance: on AMD EPYC (Zen, `vaes`/`fsrm`), `rep movsb`
//! runs at a sixteenth of its speed when the destination lies 1 to 15
//! bytes past the source modulo 4096 (64 KiB: 3 GB/s against 50; 16 to 63
//! bytes costs it a third), a 4K-aliasing case in its microcode that
//! glibc's memcpy hits too. The proxy-agent's HTTP/2 reader copies each
//! decrypted TLS record (plaintext at offset 5) into its frame buffer (9
//! bytes of frame header) at such a distance: 30% of the agent's CPU went
//! to memcpy. For distances 1 to 63 and 64 bytes or more, the copy is a
//! loop of four 16-byte unaligned loads then four stores (SSE2, in every
//! x86_64; about 40 GB/s there), then `rep movsb` for the tail.
//!
//! Blocks of 32 KiB or more (the buffers sockets are read into and
//! written from) start on a 64-byte line: the kernel's own copies between
//! a socket and user memory hit the same microcode case (reading into a
//! buffer 16 bytes into a page, where dlmalloc puts a fresh chunk, took
//! the reader 2.5 times the CPU of reading at its start; see `LINE_FROM`).
//!
//! Owns: the one heap, and memcpy. Must not: allocate, or panic, while
//! holding the lock.

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

/// Allocations of this size or more start on a cache line ([`LINE`]):
/// the buffers sockets are read into and written from. The kernel's copy
/// between a socket and such a buffer (`rep movsb`, as `memcpy` below)
/// runs at a third of its speed on AMD Zen when the destination lies 1 to
/// 31 bytes past the source modulo 4096 (a C reader of a Unix socket:
/// 2.0-2.8 GB/s of its CPU there, 5.6-7.9 at 0, 33 to 64 or 4080), and
/// socket data sits in page fragments that mostly start a page: a buffer
/// that starts 16 bytes into a page (where dlmalloc puts a fresh chunk's
/// memory, after its header) met that at every read.
/// proxy-server read its gRPC clients' Unix sockets into a buffer at page
/// offset 16 on every read in instrumented runs, and the agent its TLS
/// link the same way. Smaller allocations (TLS records, frames, messages)
/// keep dlmalloc's 16-byte alignment.
const LINE_FROM: usize = 32 * 1024;
const LINE: usize = 64;

/// The alignment an allocation of `layout` gets.
fn align_for(layout: Layout) -> usize {
    if layout.size() >= LINE_FROM {
        layout.align().max(LINE)
    } else {
        layout.align()
    }
}

// SAFETY: each call runs dlmalloc with the lock held, so the heap has one
// user at a time; the layouts are those the caller passes (alignments
// raised, never lowered), as dlmalloc's own GlobalAlloc does. dlmalloc's
// free and realloc find a chunk from its pointer alone, whatever
// alignment it was allocated with.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let (_guard, heap) = self.locked();
        // SAFETY: exclusive access under the lock.
        unsafe { (*heap).malloc(layout.size(), align_for(layout)) }
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
        unsafe { (*heap).calloc(layout.size(), align_for(layout)) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (_guard, heap) = self.locked();
        // SAFETY: exclusive access; ptr came from this heap with layout (at
        // align_for(layout): dlmalloc's realloc and free find a chunk from
        // its pointer alone, so the caller's alignment is the one passed).
        unsafe {
            let heap = &mut *heap;
            let grown = heap.realloc(ptr, layout.size(), layout.align(), new_size);
            let line = align_for(Layout::from_size_align_unchecked(new_size, layout.align()));
            if grown.is_null() || (grown as usize) % line == 0 {
                return grown;
            }
            // A buffer that grew past LINE_FROM (a reader's doubling
            // buffer) moves to a line once, with a copy as a moving
            // realloc makes.
            let moved = heap.malloc(new_size, line);
            if moved.is_null() {
                return grown;
            }
            std::ptr::copy_nonoverlapping(grown, moved, layout.size().min(new_size));
            heap.free(grown, new_size, layout.align());
            moved
        }
    }
}

// `apx_memcpy` exists on every x86_64 build (so the host's unit tests can
// call it); only the musl builds, which link libc statically, also name it
// memcpy: a dynamic glibc build keeps glibc's.
#[cfg(target_arch = "x86_64")]
macro_rules! memcpy_asm {
    ($($alias:literal),*) => {
        std::arch::global_asm!(
            $(concat!(".globl ", $alias), concat!(".hidden ", $alias), concat!($alias, ":"),)*
            ".globl apx_memcpy",
            ".hidden apx_memcpy",
            ".type apx_memcpy,@function",
            ".p2align 4",
            "apx_memcpy:",
            // Unwind info for profilers (it never touches the stack).
            ".cfi_startproc",
            // void *memcpy(void *dst (rdi), const void *src (rsi), size_t n (rdx)):
            // returns dst; the ABI guarantees the direction flag is clear.
            "mov rax, rdi",
            "mov rcx, rdx",
            // (dst - src) mod 4096 in [1, 63], and 64 bytes or more: the
            // 16-byte loop below (see the module's docs).
            "mov r8, rdi",
            "sub r8, rsi",
            "and r8d, 4095",
            "dec r8",
            "cmp r8, 63",
            "jb 3f",
            "2:",
            "rep movsb",
            "ret",
            "3:",
            "cmp rcx, 64",
            "jb 2b",
            // Four loads, then four stores: forward and safe for memmove's
            // forward case (musl jumps here only when dst < src or apart).
            "4:",
            "movdqu xmm0, [rsi]",
            "movdqu xmm1, [rsi + 16]",
            "movdqu xmm2, [rsi + 32]",
            "movdqu xmm3, [rsi + 48]",
            "movdqu [rdi], xmm0",
            "movdqu [rdi + 16], xmm1",
            "movdqu [rdi + 32], xmm2",
            "movdqu [rdi + 48], xmm3",
            "add rsi, 64",
            "add rdi, 64",
            "sub rcx, 64",
            "cmp rcx, 64",
            "jae 4b",
            "jmp 2b",
            ".cfi_endproc",
            ".size apx_memcpy, .-apx_memcpy",
        );
    };
}
#[cfg(all(target_arch = "x86_64", target_env = "musl"))]
memcpy_asm!("memcpy", "__memcpy_fwd");
#[cfg(all(target_arch = "x86_64", not(target_env = "musl")))]
memcpy_asm!();

#[cfg(target_arch = "x86_64")]
unsafe extern "C" {
    /// See the module's docs: one `rep movsb`.
    pub fn apx_memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_start_on_a_line_also_after_growing_into_one() {
        // The crate's global allocator is this one in the test binary too.
        let mut small = Vec::with_capacity(LINE_FROM - 1);
        small.extend((0..LINE_FROM - 1).map(|i| (i % 251) as u8));
        for size in [LINE_FROM, LINE_FROM + 5, 128 * 1024, 1 << 20] {
            let block: Vec<u8> = Vec::with_capacity(size);
            assert_eq!(block.as_ptr() as usize % LINE, 0, "{size}");
            let zeroed = vec![0u8; size];
            assert_eq!(zeroed.as_ptr() as usize % LINE, 0, "{size} zeroed");
            assert!(zeroed.iter().all(|&b| b == 0));
        }
        // A buffer doubling past LINE_FROM (realloc) moves onto a line and
        // keeps its bytes.
        small.reserve_exact(LINE_FROM);
        assert_eq!(small.as_ptr() as usize % LINE, 0);
        assert!(small.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        // Below LINE_FROM nothing changes: dlmalloc's own 16 bytes.
        let odd: Vec<Vec<u8>> = (0..64).map(|_| Vec::with_capacity(100)).collect();
        assert!(odd.iter().all(|v| v.as_ptr() as usize % 16 == 0));
        assert!(odd.iter().any(|v| v.as_ptr() as usize % LINE != 0));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn memcpy_copies_every_size_and_alignment_and_nothing_beyond() {
        // Source and destination in one buffer, 8 KiB apart, so that the
        // offsets set their distance modulo 4096: d_off - s_off in 1..=63
        // takes the 16-byte loop ((0, 3), (5, 7), (0, 63), (1, 64)); the
        // others, and (63, 64), (1, 65), (8, 1), take `rep movsb`.
        const DST: usize = 8192;
        let pattern: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 3) as u8).collect();
        for n in (0..300).chain([511, 512, 513, 4095, 4096, 4097, 4900]) {
            for (s_off, d_off) in [
                (0, 0),
                (1, 0),
                (0, 3),
                (5, 7),
                (8, 1),
                (63, 64),
                (0, 63),
                (1, 64),
                (1, 65),
            ] {
                let mut buf = vec![0xAAu8; DST + 5100];
                buf[..5000].copy_from_slice(&pattern);
                let base = buf.as_mut_ptr();
                // SAFETY: both ranges are in bounds (n + offset <= 5000 and
                // DST + 5000 < DST + 5100) and apart (source below 5063).
                let ret = unsafe { apx_memcpy(base.add(DST + d_off), base.add(s_off), n) };
                assert_eq!(ret, base.wrapping_add(DST + d_off), "returns dst");
                let dst = &buf[DST..];
                assert_eq!(&dst[d_off..d_off + n], &pattern[s_off..s_off + n], "n={n}");
                assert!(dst[..d_off].iter().all(|&b| b == 0xAA), "before, n={n}");
                assert!(dst[d_off + n..].iter().all(|&b| b == 0xAA), "after, n={n}");
            }
        }
    }

    /// musl's memmove jumps to `__memcpy_fwd` (this) for an overlapping
    /// move down; at a distance that takes the 16-byte loop, too.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn memcpy_moves_down_over_itself_like_memmove() {
        let pattern: Vec<u8> = (0..9000u32).map(|i| (i * 13 + 5) as u8).collect();
        // 4090 down: (dst - src) mod 4096 = 6, the loop; 4096 down: rep movsb.
        for down in [4090usize, 4096, 4033, 4000] {
            for n in [64usize, 100, 4095, 4500, 9000 - down] {
                let mut buf = pattern.clone();
                let base = buf.as_mut_ptr();
                // SAFETY: src = base + down, dst = base; both n bytes in bounds.
                unsafe { apx_memcpy(base, base.add(down), n) };
                assert_eq!(&buf[..n], &pattern[down..down + n], "down={down} n={n}");
                assert_eq!(&buf[n..], &pattern[n..], "beyond, down={down} n={n}");
            }
        }
    }

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
