//! A worker's event loop: one thread, one epoll instance (edge triggered), a run queue of tasks and
//! a few timers. It replaces a tokio current-thread runtime with a `LocalSet`, whose general
//! machinery (task state transitions, the I/O driver's readiness slabs, the time driver reading the
//! clock on every park, thread-local context lookups) was about a quarter of the worker's user CPU
//! per short transaction; what a session needs from a runtime is much less:
//!
//! - `spawn` of `!Send` futures onto this thread;
//! - readiness of sockets (`Registered`): read interest always, write interest only while a
//!   session waits for room (`writable`), since an armed EPOLLOUT turns every ACK into a wake-up;
//! - `sleep` and `timeout` for the few deadlines a session has (grace periods, audit flushes);
//! - `LocalNotify`, a wake-up between tasks of the same worker;
//! - `Remote`, through which other threads wake the loop (an eventfd) and hand it work.
//!
//! Wakers are `Arc`-based and may be woken from any thread: a wake-up pushes the task onto the
//! `Remote` queue and writes the eventfd only when the loop is (about to be) asleep, so the wakes
//! the loop makes itself (I/O readiness, timers, mailboxes) cost no system call.
//!
//! Fairness: a task gets `BUDGET` ready results from `poll_read_ready` per poll; after that it is
//! rescheduled behind the other woken tasks, and the loop looks at epoll (without waiting) before
//! it runs them again, so one session streaming a large result cannot starve the others.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

/// The epoll token of the loop's own eventfd.
const REMOTE_TOKEN: u64 = u64::MAX;
/// Ready results a task gets from `poll_read_ready` per poll before it must yield.
const BUDGET: u32 = 128;
const READ: u8 = 1;
const WRITE: u8 = 2;
/// epoll reported the peer's hang-up (EPOLLRDHUP: FIN), a reset or an error (EPOLLHUP,
/// EPOLLERR). Kept until a read proves the descriptor empty; see `clear_read_ready_after_short_read`.
const HUP: u8 = 4;

/// A non-blocking eventfd: one thread says "look" (`notify`), another waits for it to be readable
/// and clears it (`clear`) before it looks. Many notifications before a `clear` are one wake-up.
pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked below.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: a fresh descriptor we own and close exactly once through OwnedFd.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a valid u64 to our own eventfd. A failed write (counter
        // overflow) needs no handling: the eventfd is readable then anyway.
        unsafe {
            libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8);
        }
    }

    pub fn clear(&self) {
        let mut counter = [0u8; 8];
        // SAFETY: reading 8 bytes into a local buffer from our own non-blocking eventfd; EAGAIN
        // (nothing to clear) is fine.
        unsafe {
            libc::read(self.0.as_raw_fd(), counter.as_mut_ptr().cast(), 8);
        }
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// The part of a loop other threads reach: its eventfd and the tasks woken for it.
pub struct Remote {
    eventfd: EventFd,
    woken: Mutex<Vec<usize>>,
    /// The loop is blocked in epoll_wait, or about to be: a wake-up must write the eventfd.
    sleeping: AtomicBool,
}

impl Remote {
    pub fn new() -> io::Result<Arc<Self>> {
        Ok(Arc::new(Remote {
            eventfd: EventFd::new()?,
            woken: Mutex::new(Vec::new()),
            sleeping: AtomicBool::new(false),
        }))
    }

    /// Wakes the loop (from any thread); its `on_remote` callback runs soon after.
    pub fn notify(&self) {
        self.eventfd.notify();
    }

    fn wake_task(&self, idx: usize) {
        self.woken.lock().expect("run queue lock").push(idx);
        if self.sleeping.load(Ordering::SeqCst) {
            self.notify();
        }
    }
}

/// A task's waker: queues the task once until it is polled again.
struct TaskWaker {
    idx: usize,
    queued: AtomicBool,
    remote: Arc<Remote>,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.remote.wake_task(self.idx);
        }
    }
}

type Task = Pin<Box<dyn Future<Output = ()>>>;

struct TaskSlot {
    /// Taken out while the task is polled (it may spawn, which borrows the slab).
    future: Option<(Task, Waker)>,
    handle: Arc<TaskWaker>,
}

/// Readiness of one registered descriptor, as epoll last reported it.
struct IoState {
    fd: RawFd,
    token: u64,
    ready: Cell<u8>,
    /// EPOLLOUT is part of the registration (only while someone waits for room).
    write_armed: Cell<bool>,
    read_waker: RefCell<Option<Waker>>,
    write_waker: RefCell<Option<Waker>>,
}

/// One worker's event loop. Hold it in an `Rc`; everything that registers with it keeps a clone.
pub struct Runtime {
    epfd: OwnedFd,
    remote: Arc<Remote>,
    tasks: RefCell<Vec<Option<TaskSlot>>>,
    free_tasks: RefCell<Vec<usize>>,
    io: RefCell<Vec<Option<Rc<IoState>>>>,
    free_io: RefCell<Vec<usize>>,
    /// Generation of io slots, so a reused slot never takes an event meant for its predecessor.
    io_generation: Cell<u32>,
    timers: RefCell<BTreeMap<(Instant, u64), Waker>>,
    timer_seq: Cell<u64>,
    budget: Cell<u32>,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Runtime {
    pub fn new(remote: Arc<Remote>) -> io::Result<Rc<Self>> {
        // SAFETY: epoll_create1 has no memory-safety preconditions; the result is checked.
        let fd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: a fresh descriptor we own and close exactly once through OwnedFd.
        let epfd = unsafe { OwnedFd::from_raw_fd(fd) };
        let rt = Runtime {
            epfd,
            remote,
            tasks: RefCell::new(Vec::new()),
            free_tasks: RefCell::new(Vec::new()),
            io: RefCell::new(Vec::new()),
            free_io: RefCell::new(Vec::new()),
            io_generation: Cell::new(0),
            timers: RefCell::new(BTreeMap::new()),
            timer_seq: Cell::new(0),
            budget: Cell::new(BUDGET),
        };
        rt.ctl(
            libc::EPOLL_CTL_ADD,
            rt.remote.eventfd.as_raw_fd(),
            (libc::EPOLLIN | libc::EPOLLET) as u32,
            REMOTE_TOKEN,
        )?;
        Ok(Rc::new(rt))
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event for the duration of the call; epfd is ours.
        cvt(unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), op, fd, &mut ev) }).map(|_| ())
    }

    /// Runs `future` as a task of this loop.
    pub fn spawn(&self, future: impl Future<Output = ()> + 'static) {
        let idx = free_slot(&self.tasks, &self.free_tasks);
        let handle = Arc::new(TaskWaker {
            idx,
            queued: AtomicBool::new(false),
            remote: self.remote.clone(),
        });
        let waker = Waker::from(handle.clone());
        self.tasks.borrow_mut()[idx] = Some(TaskSlot {
            future: Some((Box::pin(future), waker.clone())),
            handle,
        });
        waker.wake();
    }

    /// A future that is ready once `d` has passed.
    pub fn sleep(self: &Rc<Self>, d: Duration) -> Sleep {
        Sleep {
            rt: self.clone(),
            at: Instant::now() + d,
            key: None,
        }
    }

    /// Runs until `on_remote`, called whenever the eventfd was written (work handed over by
    /// another thread, or a wake-up from one), returns false. Tasks still alive then are dropped.
    pub fn run(&self, mut on_remote: impl FnMut() -> bool) {
        let mut events: Vec<libc::epoll_event> = Vec::with_capacity(256);
        let mut batch: Vec<usize> = Vec::new();
        'outer: loop {
            std::mem::swap(
                &mut batch,
                &mut self.remote.woken.lock().expect("run queue lock"),
            );
            for &idx in &batch {
                self.poll_task(idx);
            }
            batch.clear();
            // Sleep only if nothing was woken meanwhile (`sleeping` is set before that check, so
            // a waker on another thread either is seen here or writes the eventfd).
            self.remote.sleeping.store(true, Ordering::SeqCst);
            let timeout = if self.has_woken() {
                0
            } else {
                self.timeout_ms()
            };
            events.clear();
            // SAFETY: `events` has room for `capacity()` entries; the kernel writes at most that
            // many and returns how many, which is then set as the length.
            let n = unsafe {
                libc::epoll_wait(
                    self.epfd.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.capacity() as libc::c_int,
                    timeout,
                )
            };
            self.remote.sleeping.store(false, Ordering::SeqCst);
            if n > 0 {
                // SAFETY: the kernel initialised the first `n` entries.
                unsafe { events.set_len(n as usize) };
            }
            let mut remote = false;
            for ev in &events {
                let token = ev.u64;
                if token == REMOTE_TOKEN {
                    remote = true;
                    continue;
                }
                self.on_io_event(token, ev.events);
            }
            if remote {
                self.remote.eventfd.clear();
                if !on_remote() {
                    break 'outer;
                }
            }
            if !self.timers.borrow().is_empty() {
                self.fire_timers();
            }
        }
        // Futures may hold this runtime (an Rc cycle): drop them now, outside any borrow.
        let tasks = std::mem::take(&mut *self.tasks.borrow_mut());
        drop(tasks);
        self.timers.borrow_mut().clear();
    }

    fn has_woken(&self) -> bool {
        !self.remote.woken.lock().expect("run queue lock").is_empty()
    }

    /// Polls the task in slot `idx`. A slot freed and reused since the wake-up gets a spurious
    /// poll, which futures allow; a freed one is skipped.
    fn poll_task(&self, idx: usize) {
        let (mut future, waker) = {
            let mut tasks = self.tasks.borrow_mut();
            let Some(slot) = tasks.get_mut(idx).and_then(Option::as_mut) else {
                return;
            };
            slot.handle.queued.store(false, Ordering::Release);
            let Some(task) = slot.future.take() else {
                return;
            };
            task
        };
        self.budget.set(BUDGET);
        // A task that panics (a bug) ends alone, as under tokio: its future is dropped, so its
        // guards report the session's end and its sockets close; the worker's other sessions go on.
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            future.as_mut().poll(&mut Context::from_waker(&waker))
        }));
        if !matches!(polled, Ok(Poll::Pending)) {
            drop(future);
            self.tasks.borrow_mut()[idx] = None;
            self.free_tasks.borrow_mut().push(idx);
        } else if let Some(slot) = self.tasks.borrow_mut()[idx].as_mut() {
            slot.future = Some((future, waker));
        }
    }

    fn on_io_event(&self, token: u64, flags: u32) {
        let idx = (token & 0xffff_ffff) as usize;
        let state = match self.io.borrow().get(idx) {
            Some(Some(s)) if s.token == token => s.clone(),
            _ => return,
        };
        let err = flags & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0;
        let mut ready = state.ready.get();
        if err || flags & libc::EPOLLRDHUP as u32 != 0 {
            ready |= HUP;
        }
        if err || flags & (libc::EPOLLIN | libc::EPOLLRDHUP) as u32 != 0 {
            ready |= READ;
            if let Some(w) = state.read_waker.borrow_mut().take() {
                w.wake();
            }
        }
        if err || flags & libc::EPOLLOUT as u32 != 0 {
            ready |= WRITE;
            if let Some(w) = state.write_waker.borrow_mut().take() {
                w.wake();
            }
        }
        state.ready.set(ready);
    }

    /// Milliseconds until the next timer (rounded up), or -1 (none).
    fn timeout_ms(&self) -> libc::c_int {
        let timers = self.timers.borrow();
        let Some(((at, _), _)) = timers.first_key_value() else {
            return -1;
        };
        let left = at.saturating_duration_since(Instant::now());
        let ms = left.as_nanos().div_ceil(1_000_000);
        libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
    }

    fn fire_timers(&self) {
        let now = Instant::now();
        loop {
            let mut timers = self.timers.borrow_mut();
            let Some(entry) = timers.first_entry() else {
                return;
            };
            if entry.key().0 > now {
                return;
            }
            let waker = entry.remove();
            drop(timers);
            waker.wake();
        }
    }

    fn register(&self, fd: RawFd) -> io::Result<Rc<IoState>> {
        let idx = free_slot(&self.io, &self.free_io);
        let generation = self.io_generation.get().wrapping_add(1);
        self.io_generation.set(generation);
        // The loop's own eventfd has token u64::MAX; generation u32::MAX with that index cannot
        // occur (the slab would need 4 billion entries).
        let token = (u64::from(generation) << 32) | idx as u64;
        let state = Rc::new(IoState {
            fd,
            token,
            // Assume readable: a first read that finds nothing costs one EAGAIN, a missed edge
            // (data that arrived before registration) would cost a hung session.
            ready: Cell::new(READ),
            write_armed: Cell::new(false),
            read_waker: RefCell::new(None),
            write_waker: RefCell::new(None),
        });
        if let Err(e) = self.ctl(
            libc::EPOLL_CTL_ADD,
            fd,
            (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            token,
        ) {
            self.free_io.borrow_mut().push(idx);
            return Err(e);
        }
        self.io.borrow_mut()[idx] = Some(state.clone());
        Ok(state)
    }

    fn deregister(&self, state: &IoState) {
        // A descriptor about to be closed: failure changes nothing (closing removes it anyway).
        let _ = self.ctl(libc::EPOLL_CTL_DEL, state.fd, 0, 0);
        let idx = (state.token & 0xffff_ffff) as usize;
        if let Some(slot) = self.io.borrow_mut().get_mut(idx) {
            *slot = None;
            self.free_io.borrow_mut().push(idx);
        }
    }

    fn take_budget(&self) -> bool {
        let b = self.budget.get();
        if b == 0 {
            return false;
        }
        self.budget.set(b - 1);
        true
    }
}

/// The index of a free entry of `slab` (a freed one if any, else a new one at the end).
fn free_slot<T>(slab: &RefCell<Vec<Option<T>>>, free: &RefCell<Vec<usize>>) -> usize {
    if let Some(i) = free.borrow_mut().pop() {
        return i;
    }
    let mut slab = slab.borrow_mut();
    slab.push(None);
    slab.len() - 1
}

/// A descriptor registered with a worker's loop; deregistered (then closed) when dropped.
pub struct Registered<T: AsRawFd> {
    io: T,
    state: Rc<IoState>,
    rt: Rc<Runtime>,
}

impl<T: AsRawFd> Registered<T> {
    /// Registers `io` (non-blocking already) for read readiness, edge triggered.
    pub fn new(rt: &Rc<Runtime>, io: T) -> io::Result<Self> {
        let state = rt.register(io.as_raw_fd())?;
        Ok(Registered {
            io,
            state,
            rt: rt.clone(),
        })
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Ready once epoll reported the descriptor readable since the last `clear_read_ready`.
    pub fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.state.ready.get() & READ != 0 {
            if self.rt.take_budget() {
                return Poll::Ready(());
            }
            // Used up its share: go to the back of the queue.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        store_waker(&self.state.read_waker, cx);
        Poll::Pending
    }

    /// Ready once epoll reported a hang-up (the peer's FIN or reset), without reading: for a
    /// session that reads nothing from the peer meanwhile but must know it left.
    pub fn poll_hang_up(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.state.ready.get() & HUP != 0 {
            return Poll::Ready(());
        }
        store_waker(&self.state.read_waker, cx);
        Poll::Pending
    }

    /// A read found nothing (EAGAIN): not readable until epoll reports a new edge.
    pub fn clear_read_ready(&self) {
        self.state.ready.set(self.state.ready.get() & !(READ | HUP));
    }

    /// A read returned less than it asked for. That usually means the socket is drained, and data
    /// arriving later makes a new edge, so the read that would only return EAGAIN is skipped. Not
    /// when epoll has reported a hang-up: a peer that sends its last bytes and closes (a client
    /// that disconnects mid-message, a server that sends FATAL and exits) makes one edge for both
    /// when they arrive before the loop looks, the short read returns the bytes, and only another
    /// read returns the end (0, or the reset). Readiness is kept then, or the session would wait
    /// for an edge that never comes, holding its upstream connection.
    pub fn clear_read_ready_after_short_read(&self) {
        let ready = self.state.ready.get();
        if ready & HUP == 0 {
            self.state.ready.set(ready & !READ);
        }
    }

    /// The descriptor took less than offered: wait until it has room again.
    pub fn clear_write_ready(&self) {
        self.state.ready.set(self.state.ready.get() & !WRITE);
    }

    /// Waits until epoll reports room to write, adding write interest to the registration for as
    /// long as needed (`disarm_write` removes it).
    pub async fn writable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_write_ready(cx)).await
    }

    /// Ready once epoll reported room to write since the last `clear_write_ready`; arms write
    /// interest while it is not (`disarm_write` removes it).
    pub fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.state.ready.get() & WRITE != 0 {
            return Poll::Ready(Ok(()));
        }
        if !self.state.write_armed.get() {
            // MOD re-evaluates readiness: room that appeared before this call still makes an
            // event, so no edge is missed.
            if let Err(e) = self.rt.ctl(
                libc::EPOLL_CTL_MOD,
                self.state.fd,
                (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
                self.state.token,
            ) {
                return Poll::Ready(Err(e));
            }
            self.state.write_armed.set(true);
        }
        store_waker(&self.state.write_waker, cx);
        Poll::Pending
    }

    /// Back to read interest only (a no-op unless `writable` armed write interest).
    pub fn disarm_write(&self) -> io::Result<()> {
        if !self.state.write_armed.get() {
            return Ok(());
        }
        self.state.write_armed.set(false);
        self.state.write_waker.borrow_mut().take();
        self.rt.ctl(
            libc::EPOLL_CTL_MOD,
            self.state.fd,
            (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            self.state.token,
        )
    }
}

impl<T: AsRawFd> Drop for Registered<T> {
    fn drop(&mut self) {
        self.rt.deregister(&self.state);
    }
}

fn store_waker(slot: &RefCell<Option<Waker>>, cx: &Context<'_>) {
    let mut slot = slot.borrow_mut();
    if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        *slot = Some(cx.waker().clone());
    }
}

/// Ready once its deadline has passed (see `Runtime::sleep`).
pub struct Sleep {
    rt: Rc<Runtime>,
    at: Instant,
    key: Option<(Instant, u64)>,
}

impl Future for Sleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if Instant::now() >= this.at {
            if let Some(key) = this.key.take() {
                this.rt.timers.borrow_mut().remove(&key);
            }
            return Poll::Ready(());
        }
        let mut timers = this.rt.timers.borrow_mut();
        let key = *this.key.get_or_insert_with(|| {
            let seq = this.rt.timer_seq.get().wrapping_add(1);
            this.rt.timer_seq.set(seq);
            (this.at, seq)
        });
        match timers.get_mut(&key) {
            Some(w) if w.will_wake(cx.waker()) => {}
            Some(w) => *w = cx.waker().clone(),
            None => {
                timers.insert(key, cx.waker().clone());
            }
        }
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.rt.timers.borrow_mut().remove(&key);
        }
    }
}

/// `future`'s output, or `None` if `d` passes first.
pub async fn timeout<F: Future>(rt: &Rc<Runtime>, d: Duration, future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut sleep = rt.sleep(d);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(v));
        }
        if Pin::new(&mut sleep).poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

/// A wake-up between tasks of one worker, with one stored permit (like `tokio::sync::Notify`'s
/// `notify_one`).
#[derive(Default)]
pub struct LocalNotify {
    permit: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl LocalNotify {
    pub fn notify_one(&self) {
        self.permit.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    pub async fn notified(&self) {
        std::future::poll_fn(|cx| {
            if self.permit.replace(false) {
                return Poll::Ready(());
            }
            store_waker(&self.waker, cx);
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};
    use std::os::unix::net::UnixStream;

    fn with_loop(body: impl FnOnce(Rc<Runtime>, Rc<Cell<bool>>) + 'static) {
        let remote = Remote::new().unwrap();
        let rt = Runtime::new(remote.clone()).unwrap();
        let done = Rc::new(Cell::new(false));
        body(rt.clone(), done.clone());
        // Tasks set `done` and notify the loop when they finish; a task whose assertion failed
        // (caught like any panic) never does, and the watchdog fails the test.
        let timed_out = Rc::new(Cell::new(false));
        let (rt2, t2, d2) = (rt.clone(), timed_out.clone(), done.clone());
        rt.spawn(async move {
            rt2.sleep(Duration::from_secs(10)).await;
            t2.set(true);
            d2.set(true);
            remote.notify();
        });
        rt.run(|| !done.get());
        assert!(!timed_out.get(), "a task of the test did not finish");
    }

    #[test]
    fn sleep_and_timeout() {
        with_loop(|rt, done| {
            let rt2 = rt.clone();
            let remote = rt.remote.clone();
            rt.spawn(async move {
                let start = Instant::now();
                rt2.sleep(Duration::from_millis(20)).await;
                assert!(start.elapsed() >= Duration::from_millis(20));
                let never = std::future::pending::<()>();
                assert!(timeout(&rt2, Duration::from_millis(10), never)
                    .await
                    .is_none());
                let quick = async { 7 };
                assert_eq!(timeout(&rt2, Duration::from_secs(5), quick).await, Some(7));
                done.set(true);
                remote.notify();
            });
        });
    }

    #[test]
    fn readiness_and_write_interest() {
        with_loop(|rt, done| {
            let (a, mut b) = UnixStream::pair().unwrap();
            a.set_nonblocking(true).unwrap();
            let a = Registered::new(&rt, a).unwrap();
            let remote = rt.remote.clone();
            // Another thread writes after a while: the task must be woken by epoll.
            let writer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                b.write_all(b"hello").unwrap();
                // Then reads everything the task sends (the task fills the buffer first).
                let mut got = 0usize;
                let mut buf = [0u8; 65536];
                while got < 1_000_000 {
                    got += b.read(&mut buf).unwrap();
                }
                got
            });
            rt.spawn(async move {
                let mut buf = [0u8; 16];
                loop {
                    std::future::poll_fn(|cx| a.poll_read_ready(cx)).await;
                    match a.get_ref().read(&mut buf) {
                        Ok(n) => {
                            assert_eq!(&buf[..n], b"hello");
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => a.clear_read_ready(),
                        Err(e) => panic!("{e}"),
                    }
                }
                let chunk = vec![0u8; 65536];
                let mut sent = 0usize;
                while sent < 1_000_000 {
                    match a
                        .get_ref()
                        .write(&chunk[..chunk.len().min(1_000_000 - sent)])
                    {
                        Ok(n) => sent += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            a.clear_write_ready();
                            a.writable().await.unwrap();
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                a.disarm_write().unwrap();
                done.set(true);
                remote.notify();
            });
            std::mem::forget(writer);
        });
    }

    /// A registered socket whose peer sent "one" (and then hung up, with `hang_up`) before the
    /// loop looked, and a task that lets the loop take that edge, reads the three bytes (a short
    /// read) and hands the socket and its peer to `then`.
    fn after_a_short_read<F>(
        hang_up: bool,
        then: impl FnOnce(Registered<UnixStream>, UnixStream) -> F + 'static,
    ) where
        F: Future<Output = ()> + 'static,
    {
        with_loop(move |rt, done| {
            let (a, mut b) = UnixStream::pair().unwrap();
            a.set_nonblocking(true).unwrap();
            let a = Registered::new(&rt, a).unwrap();
            b.write_all(b"one").unwrap();
            if hang_up {
                // Bytes and hang-up together: one edge (EPOLLIN | EPOLLRDHUP) for both.
                b.shutdown(std::net::Shutdown::Write).unwrap();
            }
            let remote = rt.remote.clone();
            let rt2 = rt.clone();
            rt.spawn(async move {
                rt2.sleep(Duration::from_millis(20)).await;
                let mut buf = [0u8; 16];
                std::future::poll_fn(|cx| a.poll_read_ready(cx)).await;
                assert_eq!(a.get_ref().read(&mut buf).unwrap(), 3);
                a.clear_read_ready_after_short_read();
                then(a, b).await;
                done.set(true);
                remote.notify();
            });
        });
    }

    #[test]
    fn last_bytes_and_hang_up_in_one_edge() {
        after_a_short_read(true, |a, b| async move {
            // Drained as far as data goes, but the end is still to be read. (The peer stays open
            // meanwhile: closing it would make a new edge.)
            std::future::poll_fn(|cx| a.poll_read_ready(cx)).await;
            assert_eq!(a.get_ref().read(&mut [0u8; 16]).unwrap(), 0);
            drop(b);
        });
    }

    #[test]
    fn short_read_without_hang_up_waits_for_the_next_edge() {
        after_a_short_read(false, |a, mut b| async move {
            // Not ready until new data comes (no read that only returns EAGAIN).
            let pending = std::future::poll_fn(|cx| Poll::Ready(a.poll_read_ready(cx))).await;
            assert!(pending.is_pending());
            b.write_all(b"two").unwrap();
            std::future::poll_fn(|cx| a.poll_read_ready(cx)).await;
            let mut buf = [0u8; 16];
            assert_eq!(a.get_ref().read(&mut buf).unwrap(), 3);
            assert_eq!(&buf[..3], b"two");
        });
    }

    #[test]
    fn wake_from_another_thread() {
        with_loop(|rt, done| {
            let remote = rt.remote.clone();
            let flag = Arc::new(AtomicBool::new(false));
            let f2 = flag.clone();
            rt.spawn(async move {
                let mut started = false;
                std::future::poll_fn(|cx| {
                    if f2.load(Ordering::SeqCst) {
                        return Poll::Ready(());
                    }
                    if !started {
                        started = true;
                        let w = cx.waker().clone();
                        let f3 = f2.clone();
                        std::thread::spawn(move || {
                            std::thread::sleep(Duration::from_millis(20));
                            f3.store(true, Ordering::SeqCst);
                            w.wake();
                        });
                    }
                    Poll::Pending
                })
                .await;
                done.set(true);
                remote.notify();
            });
            let _ = flag;
        });
    }

    #[test]
    fn a_panicking_task_ends_alone() {
        struct Guard(Rc<Cell<bool>>);
        impl Drop for Guard {
            fn drop(&mut self) {
                self.0.set(true);
            }
        }
        with_loop(|rt, done| {
            let dropped = Rc::new(Cell::new(false));
            let guard = Guard(dropped.clone());
            let rt2 = rt.clone();
            rt.spawn(async move {
                let _guard = guard;
                rt2.sleep(Duration::from_millis(5)).await;
                panic!("a bug in a session (expected by this test)");
            });
            let rt3 = rt.clone();
            let remote = rt.remote.clone();
            rt.spawn(async move {
                rt3.sleep(Duration::from_millis(30)).await;
                assert!(dropped.get(), "the panicking task's future was dropped");
                done.set(true);
                remote.notify();
            });
        });
    }

    #[test]
    fn budget_lets_others_run() {
        with_loop(|rt, done| {
            let (a, _b) = UnixStream::pair().unwrap();
            let a = Rc::new(Registered::new(&rt, a).unwrap());
            let turns = Rc::new(Cell::new(0u32));
            let t2 = turns.clone();
            // A task that finds the descriptor ready forever (never clears it).
            let a2 = a.clone();
            rt.spawn(async move {
                loop {
                    std::future::poll_fn(|cx| a2.poll_read_ready(cx)).await;
                    t2.set(t2.get() + 1);
                    if t2.get() > 10 * BUDGET {
                        break;
                    }
                }
            });
            let remote = rt.remote.clone();
            let t3 = turns.clone();
            rt.spawn(async move {
                // Runs before the busy task used up more than its first budget.
                assert!(t3.get() <= BUDGET);
                done.set(true);
                remote.notify();
            });
        });
    }
}
