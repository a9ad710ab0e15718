//! Thin, safe wrappers over the few Linux calls std does not expose.
//!
//! Owns: every `unsafe` block of the crate (signal masks, signalfd, eventfd,
//! poll). Must not: hold policy; callers decide what a signal or a wake-up
//! means.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn termination_mask() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set; sigaddset with valid
    // signal numbers cannot fail.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// A signalfd for SIGTERM and SIGINT. Creating it blocks both signals in the
/// calling thread, and threads spawned afterwards inherit the mask, so the
/// signals are only ever delivered through this descriptor. Create it in
/// `main` before any thread starts.
#[derive(Debug)]
pub struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    pub fn new() -> io::Result<Self> {
        let mask = termination_mask();
        // SAFETY: mask is a valid, initialised sigset_t.
        let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &mask, std::ptr::null_mut()) };
        if ret != 0 {
            return Err(io::Error::from_raw_os_error(ret));
        }
        // SAFETY: -1 asks for a new descriptor; the mask is valid.
        let fd =
            check(unsafe { libc::signalfd(-1, &mask, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) })?;
        // SAFETY: fd was just returned by signalfd and is owned by nobody else.
        Ok(SignalFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// The next pending signal number, or `None` when none is pending.
    pub fn take(&self) -> io::Result<Option<i32>> {
        // SAFETY: zeroed is a valid bit pattern for this plain C struct.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: the buffer is exactly one siginfo long and writable.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                io::ErrorKind::Interrupted => Ok(None),
                _ => Err(err),
            };
        }
        Ok((n as usize == size).then_some(info.ssi_signo as i32))
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// An eventfd used as a level-triggered "something happened" flag that
/// `poll` can wait on beside sockets.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall with constant flags.
        let fd = check(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        // SAFETY: fd was just returned by eventfd and is owned by nobody else.
        Ok(EventFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Makes the descriptor readable (it stays readable: nobody drains it).
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes exactly 8 bytes from a valid u64. A full counter
        // (EAGAIN) still leaves the descriptor readable, which is all we need.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// An epoll(7) instance whose waiters take one ready descriptor each.
///
/// Descriptors are added one-shot: after it reports one, a descriptor stays
/// silent until [`Epoll::rearm`], so exactly one waiter takes it. Level
/// triggered descriptors ([`Epoll::add_level`]) are reported to every
/// waiter, one after the other (the kernel wakes the next waiter while a
/// ready descriptor is left), which is what a shutdown flag wants.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall with a constant flag.
        let fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: fd was just returned by epoll_create1 and is owned by nobody else.
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: token };
        // SAFETY: a valid epoll descriptor and a valid event the kernel copies.
        check(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut event) }).map(|_| ())
    }

    /// Watches `fd` for input (or hang-up) once, reported as `token`.
    pub fn add_oneshot(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let events = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32;
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    /// Watches a one-shot descriptor again, now reported as `token`.
    pub fn rearm(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let events = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32;
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    /// Watches `fd` for input for as long as it is readable.
    pub fn add_level(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32, token)
    }

    /// Stops watching `fd`.
    pub fn del(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Waits up to `timeout` (`None`: no limit) for ready descriptors;
    /// their tokens replace what `tokens` held (at most its capacity, at
    /// least one; none on timeout or EINTR).
    pub fn wait_many(&self, tokens: &mut Vec<u64>, timeout: Option<Duration>) -> io::Result<()> {
        let max = tokens.capacity().clamp(1, 256);
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 256];
        tokens.clear();
        // SAFETY: room for `max` events, at most 256.
        let ret = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                events.as_mut_ptr(),
                max as libc::c_int,
                poll_millis(timeout),
            )
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(err);
        }
        tokens.extend(events[..ret as usize].iter().map(|e| e.u64));
        Ok(())
    }

    /// Waits up to `timeout` (`None`: no limit) for one ready descriptor's
    /// token; None on timeout or EINTR.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<Option<u64>> {
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: room for exactly the one event the call may write.
        let ret =
            unsafe { libc::epoll_wait(self.fd.as_raw_fd(), &mut event, 1, poll_millis(timeout)) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(err);
        }
        Ok((ret == 1).then_some(event.u64))
    }
}

/// A timeout in poll(2)'s milliseconds: -1 for none, rounded up so that a
/// 0.4 ms remainder does not become a busy loop.
fn poll_millis(timeout: Option<Duration>) -> libc::c_int {
    match timeout {
        None => -1,
        Some(d) => d.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int,
    }
}

/// Reads as a blocking read with the socket's receive timeout would, but
/// sleeps in poll(POLLIN) when nothing is there. A thread blocked in a
/// socket read sleeps on the socket's one wait queue and is woken by every
/// wake-up on it, also those for room to write (a Unix socket's writer
/// wakes it each time its peer reads, a TCP socket's each time it frees
/// room that a writer ran out of); poll only wakes it for what it waits
/// for. `read_timeout` is asked only before a sleep.
pub fn read_polled(
    fd: RawFd,
    buf: &mut [u8],
    read_timeout: impl Fn() -> io::Result<Option<Duration>>,
) -> io::Result<usize> {
    // SAFETY: the kernel writes at most buf.len() bytes at buf.
    unsafe { recv_polled(fd, buf.as_mut_ptr(), buf.len(), read_timeout) }
}

/// [`read_polled`] of at most `max` bytes onto the end of `buf`, into its
/// spare capacity (not zeroed first).
pub fn read_polled_append(
    fd: RawFd,
    buf: &mut Vec<u8>,
    max: usize,
    read_timeout: impl Fn() -> io::Result<Option<Duration>>,
) -> io::Result<usize> {
    buf.reserve(max);
    let spare = buf.spare_capacity_mut();
    let max = max.min(spare.len());
    // SAFETY: the kernel writes at most `max` bytes into the spare
    // capacity, and only the bytes it reports written are then counted
    // as initialized.
    unsafe {
        let n = recv_polled(fd, spare.as_mut_ptr().cast(), max, read_timeout)?;
        buf.set_len(buf.len() + n);
        Ok(n)
    }
}

/// # Safety
/// `ptr` must be valid for writes of `len` bytes.
unsafe fn recv_polled(
    fd: RawFd,
    ptr: *mut u8,
    len: usize,
    read_timeout: impl Fn() -> io::Result<Option<Duration>>,
) -> io::Result<usize> {
    loop {
        // SAFETY: the caller's promise: ptr is writable for len bytes.
        let n = unsafe { libc::recv(fd, ptr.cast(), len, libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => {}
            _ => return Err(err),
        }
        let millis = poll_millis(read_timeout()?);
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ret = unsafe { libc::poll(&mut pollfd, 1, millis) };
        if ret == 0 {
            // As a blocking read reports its receive timeout.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

/// Reads what a socket has without waiting: Some(0) at its end, None when
/// nothing is there.
pub fn recv_now(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: writes at most buf.len() bytes into buf.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(err),
        }
    }
}

/// Waits until one of `fds` is readable or `timeout` passes (`None`: no
/// limit). Returns one flag per descriptor; all false on timeout. EINTR is
/// reported as a timeout so callers simply loop.
pub fn poll_readable(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let millis = poll_millis(timeout);
    // SAFETY: pollfds is a valid array of the given length.
    let ret = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, millis) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(err);
    }
    Ok(pollfds
        .iter()
        .map(|p| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0)
        .collect())
}

/// Whether the peer of a connected socket has closed its sending side (or
/// the whole connection): POLLRDHUP, POLLHUP or POLLERR, without waiting
/// and without consuming anything queued to read.
pub fn peer_hung_up(fd: RawFd) -> bool {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let ret = unsafe { libc::poll(&mut pollfd, 1, 0) };
    ret > 0 && pollfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Gives the kernel back the pages of the calling thread's stack below the
/// caller's frame. A thread that ran something deep once (a TLS handshake:
/// about 20 KiB of stack) and then waits for a long time keeps every page
/// it touched resident; after this it keeps only the pages its frames use,
/// and faults in zeroed pages if it goes deep again.
///
/// Nothing below the stack pointer is live (the x86-64 red zone is 128
/// bytes, and only a leaf function uses it), so only dead frames are
/// dropped. Costs one madvise(2) over the stack's untouched range.
#[inline(never)]
pub fn trim_stack() {
    // Bytes kept below this frame, for the calls made from here on.
    const KEEP_BELOW: usize = 512;
    let mut stack: *mut libc::c_void = std::ptr::null_mut();
    let mut size: libc::size_t = 0;
    // SAFETY: attr is filled in by pthread_getattr_np before it is read,
    // and destroyed once; the out-pointers are valid locals.
    let ok = unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return;
        }
        let ok = libc::pthread_attr_getstack(&attr, &mut stack, &mut size) == 0;
        libc::pthread_attr_destroy(&mut attr);
        ok
    };
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as usize,
        _ => return,
    };
    let marker = 0u8;
    let here = std::hint::black_box(&marker) as *const u8 as usize;
    let low = (stack as usize).next_multiple_of(page);
    let high = here.saturating_sub(KEEP_BELOW) & !(page - 1);
    if !ok || here > stack as usize + size || high <= low {
        return;
    }
    // SAFETY: [low, high) is page-aligned and lies inside this thread's
    // stack, wholly below the live frames (this one included, and the
    // margin for the madvise call itself); MADV_DONTNEED on private
    // anonymous memory only makes it read back as zeroes.
    unsafe { libc::madvise(low as *mut libc::c_void, high - low, libc::MADV_DONTNEED) };
}

/// Sends what the socket takes now, without waiting (MSG_DONTWAIT, and
/// MSG_NOSIGNAL: a closed peer is an error, not SIGPIPE). `Ok(0)` when
/// nothing fits right now.
pub fn send_now(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: reads at most buf.len() bytes from buf.
        let n = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(0),
            _ => return Err(err),
        }
    }
}

/// Bytes at the end of a page: a socket write whose data starts there is
/// sent from a copy (see [`send_now_realigned`]).
const ALIAS_BAND: usize = 64;
/// The most a write sends from one such copy.
const REALIGN_MAX: usize = 64 * 1024;

/// Whether the kernel's copy of a write of `buf` into a socket is likely
/// to run at a fraction of its speed: on AMD Zen (`fsrm`), `rep movsb`
/// slows down several times when the destination lies a few bytes (up to
/// 31 to 63, depending on the copy) past the source modulo 4096 (the case
/// the user-space `memcpy` in `crate::alloc` avoids). The kernel copies a
/// TCP or Unix write into page fragments that usually start a page afresh
/// (a fragment's offset goes back to 0 once the data before it was read),
/// so data that starts in the last 64 bytes of a page meets that distance,
/// at every write from a buffer the allocator hands out at the same place
/// each time: the agent's writes to its destination (packet data at page
/// offset 4081) moved 1.0 to 1.25 GB/s, and 1.9 to 2.9 from a copy,
/// the copy's own time included.
fn copy_aliases(buf: &[u8]) -> bool {
    buf.len() >= 4096 && (buf.as_ptr() as usize) % 4096 > 4096 - ALIAS_BAND
}

/// Runs `send` on the first bytes of `buf` (at most [`REALIGN_MAX`]),
/// copied to a start on a cache line, when the kernel's copy from `buf`
/// itself would alias ([`copy_aliases`]); else on `buf`.
fn realigned<T>(buf: &[u8], send: impl FnOnce(&[u8]) -> T) -> T {
    if !copy_aliases(buf) {
        return send(buf);
    }
    let n = buf.len().min(REALIGN_MAX);
    let mut copy: Vec<u8> = Vec::with_capacity(n + ALIAS_BAND);
    let pad = copy.as_ptr().align_offset(ALIAS_BAND).min(ALIAS_BAND);
    copy.resize(pad, 0);
    copy.extend_from_slice(&buf[..n]);
    send(&copy[pad..])
}

/// [`send_now`], from a copy when the kernel's copy from `buf` would be
/// slow ([`copy_aliases`]); the copy costs a user-space `memcpy`, a
/// fraction of what the slow kernel copy loses. It may send less than
/// [`send_now`] would (at most 64 KiB), never more.
pub fn send_now_realigned(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    realigned(buf, |b| send_now(fd, b))
}

/// `write_all` on a blocking socket, each write realigned as in
/// [`send_now_realigned`].
pub fn write_all_realigned(mut sock: impl io::Write, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match realigned(buf, |b| sock.write(b)) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A TCP connection started with [`connect_start`].
pub enum Connecting {
    /// Established already (a local destination: the kernel completes a
    /// loopback handshake inside connect(2)); the socket blocks as usual.
    Connected(std::net::TcpStream),
    /// Under way; finish it with [`connect_finish`]. The socket does not
    /// block until then.
    Pending(std::net::TcpStream),
}

/// Starts a TCP connection to `addr` without waiting for it.
pub fn connect_start(addr: &std::net::SocketAddr) -> io::Result<Connecting> {
    use std::net::SocketAddr;
    // SAFETY: plain-data socket address structures, zeroed then filled.
    let (family, storage, len) = unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        match addr {
            SocketAddr::V4(a) => {
                let sin =
                    &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = a.port().to_be();
                sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
                (
                    libc::AF_INET,
                    storage,
                    std::mem::size_of::<libc::sockaddr_in>(),
                )
            }
            SocketAddr::V6(a) => {
                let sin6 = &mut *(&mut storage as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in6>();
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_addr.s6_addr = a.ip().octets();
                sin6.sin6_flowinfo = a.flowinfo();
                sin6.sin6_scope_id = a.scope_id();
                (
                    libc::AF_INET6,
                    storage,
                    std::mem::size_of::<libc::sockaddr_in6>(),
                )
            }
        }
    };
    // SAFETY: socket(2) with constant arguments; the descriptor is owned below.
    let fd = check(unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: fd is a new descriptor nobody else owns.
    let socket = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    loop {
        // SAFETY: storage holds a socket address of `len` bytes.
        let ret = unsafe {
            libc::connect(
                fd,
                (&storage as *const libc::sockaddr_storage).cast(),
                len as libc::socklen_t,
            )
        };
        if ret == 0 {
            socket.set_nonblocking(false)?;
            return Ok(Connecting::Connected(socket));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EINPROGRESS) => break,
            _ => return Err(err),
        }
    }
    // A loopback handshake is usually complete by now.
    if connect_finish(&socket, Duration::ZERO)? {
        Ok(Connecting::Connected(socket))
    } else {
        Ok(Connecting::Pending(socket))
    }
}

/// Waits up to `timeout` for a connection from [`connect_start`] to
/// complete: `Ok(true)` once it is (the socket then blocks as usual),
/// `Ok(false)` while it is still under way, the error if it failed.
pub fn connect_finish(socket: &std::net::TcpStream, timeout: Duration) -> io::Result<bool> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut pollfd = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let millis = left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd.
        let ret = unsafe { libc::poll(&mut pollfd, 1, millis) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if ret == 0 {
            if left.is_zero() {
                return Ok(false);
            }
            continue;
        }
        if let Some(err) = socket.take_error()? {
            return Err(err);
        }
        socket.set_nonblocking(false)?;
        return Ok(true);
    }
}

/// Names the calling thread as the kernel shows it (`/proc/*/task/*/comm`,
/// `top -H`; at most 15 bytes): a pooled thread takes the name of each job
/// it runs. Best effort: a name with a NUL byte, or a failure, leaves it.
pub fn set_thread_name(name: &str) {
    let mut buf = [0u8; 16];
    let len = name.len().min(15);
    if name.as_bytes()[..len].contains(&0) {
        return;
    }
    buf[..len].copy_from_slice(&name.as_bytes()[..len]);
    // SAFETY: buf is NUL-terminated and outlives the call; PR_SET_NAME
    // copies at most 16 bytes from it.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

/// Fills `buf` from the kernel's random source (getrandom(2): no /dev
/// needed, so it works in an empty root).
pub fn random_bytes(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: writes at most rest.len() bytes into rest.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += n as usize;
    }
    Ok(())
}

/// A random u64 (dial ids, ids, jitter).
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // getrandom only fails on kernels older than 3.17 (ENOSYS); fall back
    // to the clock, which is enough for jitter and ids that must differ.
    if random_bytes(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return nanos ^ (std::process::id() as u64).rotate_left(32);
    }
    u64::from_ne_bytes(bytes)
}

/// A random version-4 UUID in its text form (upstream's default ids).
pub fn random_uuid() -> String {
    let mut b = [0u8; 16];
    let hi = random_u64().to_be_bytes();
    let lo = random_u64().to_be_bytes();
    b[..8].copy_from_slice(&hi);
    b[8..].copy_from_slice(&lo);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `len` bytes of a pattern, starting `before` bytes ahead of a page
    /// boundary, inside `store`.
    fn at_page_end(store: &mut Vec<u8>, before: usize, len: usize) -> std::ops::Range<usize> {
        store.clear();
        store.resize(len + 3 * 4096, 0);
        let start = store.as_ptr().align_offset(4096) + 4096 - before;
        for (i, b) in store[start..start + len].iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        start..start + len
    }

    #[test]
    fn data_in_a_pages_last_64_bytes_is_sent_from_a_copy_on_a_cache_line() {
        let mut store = Vec::new();
        for (before, len, copied) in [
            (15, 32768, true),
            (64 - 1, 32768, true),
            (64, 32768, false),
            (4096, 32768, false),
            (15, 4095, false), // too small to matter
        ] {
            let range = at_page_end(&mut store, before, len);
            let buf = &store[range];
            let (ptr, sent) = realigned(buf, |b| (b.as_ptr() as usize, b.to_vec()));
            assert_eq!(
                ptr != buf.as_ptr() as usize,
                copied,
                "{before} before the page"
            );
            assert!(sent == buf, "{before}: other bytes");
            if copied {
                assert_eq!(ptr % ALIAS_BAND, 0);
            }
        }
        // At most REALIGN_MAX from one copy.
        let range = at_page_end(&mut store, 15, REALIGN_MAX + 1000);
        let len = realigned(&store[range], |b| b.len());
        assert_eq!(len, REALIGN_MAX);
    }

    #[test]
    fn realigned_writes_deliver_every_byte_in_order() {
        use std::io::Read;
        let mut store = Vec::new();
        let range = at_page_end(&mut store, 15, 300_000);
        let data = store[range].to_vec();
        use std::os::fd::AsRawFd;
        use std::os::unix::net::UnixStream;
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        theirs
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let reading = std::thread::spawn(move || {
            let mut got = vec![0; 2 * 300_000];
            theirs.read_exact(&mut got).map(|()| got)
        });
        // Without waiting: what the socket takes now, from a copy.
        let mut sent = 0;
        while sent < data.len() {
            let rest = &data[sent..];
            let range = at_page_end(&mut store, 15, rest.len());
            store[range.clone()].copy_from_slice(rest);
            match send_now_realigned(ours.as_raw_fd(), &store[range]).unwrap() {
                0 => std::thread::yield_now(),
                n => {
                    assert!(n <= REALIGN_MAX);
                    sent += n;
                }
            }
        }
        // Blocking, across partial writes.
        let range = at_page_end(&mut store, 15, data.len());
        store[range.clone()].copy_from_slice(&data);
        write_all_realigned(&ours, &store[range]).unwrap();
        let got = reading.join().unwrap().unwrap();
        assert!(got[..data.len()] == data[..] && got[data.len()..] == data[..]);
    }

    /// The voluntary context switches of the calling thread so far.
    fn my_switches() -> u64 {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("voluntary_ctxt_switches:"))
            .unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// How often a thread reading an idle Unix socket (with `read`) went
    /// to sleep while the same socket's writer sent 64 MiB that its peer
    /// read; then one byte ends its wait.
    fn switches_while_blocked(read: fn(&UnixStream, &mut [u8]) -> io::Result<usize>) -> u64 {
        use std::io::{Read, Write};
        use std::os::unix::net::UnixStream;
        let (ours, theirs) = UnixStream::pair().unwrap();
        let ours = std::sync::Arc::new(ours);
        let reader_side = ours.clone();
        let reader = std::thread::spawn(move || {
            let before = my_switches();
            let mut buf = [0u8; 16];
            let n = read(&reader_side, &mut buf).unwrap();
            assert_eq!(&buf[..n], b"x");
            my_switches() - before
        });
        let mut peer = theirs.try_clone().unwrap();
        let drain = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut left = 64usize << 20;
            while left > 0 {
                left -= peer.read(&mut buf).unwrap();
            }
            peer
        });
        let chunk = vec![7u8; 16 * 1024];
        for _ in 0..(64 << 20) / chunk.len() {
            (&*ours).write_all(&chunk).unwrap();
        }
        let mut peer = drain.join().unwrap();
        peer.write_all(b"x").unwrap();
        reader.join().unwrap()
    }

    use std::os::unix::net::UnixStream;

    #[test]
    fn a_polled_read_sleeps_through_room_to_write_and_reads_what_comes() {
        fn polled(s: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
            read_polled(s.as_raw_fd(), buf, || s.read_timeout())
        }
        fn blocking(s: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
            std::io::Read::read(&mut &*s, buf)
        }
        let polled_switches = switches_while_blocked(polled);
        let blocking_switches = switches_while_blocked(blocking);
        eprintln!("asleep in a read: {blocking_switches} wake-ups; in poll: {polled_switches}");
        assert!(
            polled_switches < 20,
            "woken {polled_switches} times (a blocking read: {blocking_switches})"
        );

        // Data, the end of the stream, and the receive timeout, as a
        // blocking read reports them.
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut theirs, b"abc").unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(polled(&ours, &mut buf).unwrap(), 3);
        ours.set_read_timeout(Some(Duration::from_millis(30)))
            .unwrap();
        let started = std::time::Instant::now();
        let err = polled(&ours, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
        assert!(started.elapsed() >= Duration::from_millis(30));
        // Appending: onto what is there, at most `max`, into capacity that
        // was never zeroed.
        std::io::Write::write_all(&mut theirs, b"defgh").unwrap();
        let mut got = Vec::with_capacity(2);
        got.extend_from_slice(b"ab");
        let n = read_polled_append(ours.as_raw_fd(), &mut got, 3, || ours.read_timeout()).unwrap();
        assert_eq!((n, &got[..]), (3, &b"abdef"[..]));
        let n = read_polled_append(ours.as_raw_fd(), &mut got, 10, || ours.read_timeout()).unwrap();
        assert_eq!((n, &got[..]), (2, &b"abdefgh"[..]));
        drop(theirs);
        assert_eq!(polled(&ours, &mut buf).unwrap(), 0, "end of stream");
        let n = read_polled_append(ours.as_raw_fd(), &mut got, 10, || ours.read_timeout()).unwrap();
        assert_eq!((n, got.len()), (0, 7), "end of stream");
    }

    #[test]
    fn uuids_look_like_uuids_and_differ() {
        let (a, b) = (random_uuid(), random_uuid());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }

    #[test]
    fn connections_start_without_waiting_and_finish_within_a_timeout() {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Loopback: established inside connect(2), and the socket blocks.
        let Connecting::Connected(mut a) = connect_start(&addr).unwrap() else {
            panic!("a loopback connection was left under way");
        };
        let (mut served, _) = listener.accept().unwrap();
        a.write_all(b"hi").unwrap();
        let mut got = [0; 2];
        served.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        served.write_all(b"!").unwrap();
        let mut one = [0; 1];
        assert_eq!(
            a.read(&mut one).unwrap(),
            1,
            "a blocking read waits for the byte"
        );
        // Nothing listening: refused, at once or when finished.
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        match connect_start(&gone) {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused),
            Ok(Connecting::Pending(s)) => {
                let e = connect_finish(&s, Duration::from_secs(10)).unwrap_err();
                assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
            }
            Ok(Connecting::Connected(_)) => panic!("connected to a closed port"),
        }
        // A listener whose accept queue is full drops the SYN: the
        // connection stays under way, and finishing it times out.
        let full = TcpListener::bind("127.0.0.1:0").unwrap();
        // SAFETY: listen(2) on a listening socket only changes its backlog.
        assert_eq!(unsafe { libc::listen(full.as_raw_fd(), 0) }, 0);
        let addr = full.local_addr().unwrap();
        let _queued = TcpStream::connect(addr).unwrap();
        match connect_start(&addr).unwrap() {
            Connecting::Pending(s) => {
                assert!(!connect_finish(&s, Duration::from_millis(50)).unwrap());
            }
            Connecting::Connected(_) => panic!("a full accept queue took the connection"),
        }
    }

    /// Whether the page holding `addr` is resident (mincore(2)).
    fn resident(addr: usize) -> bool {
        let page = 4096;
        let mut vec = 0u8;
        // SAFETY: one page, one result byte.
        let ret = unsafe { libc::mincore((addr & !(page - 1)) as *mut libc::c_void, 1, &mut vec) };
        assert_eq!(ret, 0, "mincore: {}", io::Error::last_os_error());
        vec & 1 == 1
    }

    #[test]
    fn trim_stack_drops_dead_frames_and_keeps_live_ones() {
        #[inline(never)]
        fn deep() -> usize {
            let mut frame = [1u8; 64 * 1024];
            std::hint::black_box(&mut frame);
            frame.as_ptr() as usize + 1024
        }
        std::thread::Builder::new()
            .stack_size(1 << 20)
            .spawn(|| {
                let live = std::hint::black_box([7u8; 3000]);
                let dead = deep();
                assert!(resident(dead), "the deep frame was touched");
                trim_stack();
                assert!(!resident(dead), "the dead frame's page is gone");
                assert!(resident(live.as_ptr() as usize), "the live frame stays");
                assert!(live.iter().all(|&b| b == 7), "live data is intact");
                // Going deep again works, on fresh pages.
                assert!(resident(deep()));
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn eventfd_wakes_poll() {
        let event = EventFd::new().unwrap();
        let ready = poll_readable(&[event.as_raw_fd()], Some(Duration::ZERO)).unwrap();
        assert_eq!(ready, vec![false]);
        event.signal();
        let ready = poll_readable(&[event.as_raw_fd()], Some(Duration::from_secs(5))).unwrap();
        assert_eq!(ready, vec![true]);
    }
}
