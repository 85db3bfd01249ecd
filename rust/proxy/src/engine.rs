//! The engine: worker threads that run established sessions.
//!
//! Theory of operation. `Engine::new` starts `workers` OS threads, each running a single-threaded
//! event loop of its own (`crate::rt`: epoll, a run queue, timers; the shape of pgbouncer's event
//! loop, one per core). `adopt` hands a session to the
//! next worker, round robin. Each session is one task that owns both sockets and a
//! `SessionRelay`: it waits until a command arrives or either socket is readable, then, without
//! waiting, reads one chunk into the worker's shared buffer, feeds it through the relay and writes
//! the result as far as the other socket takes it. Only what that socket does not take stays with
//! the session (its backlog), and the task writes the backlog out before it reads again. That is
//! the backpressure: a slow client stops the task reading from the server, so a session holds at
//! most about one chunk whatever the result size, and an idle session holds no I/O buffer at all.
//! A session waits in one hand-written poll on its mailbox and both sockets' readiness; whichever
//! wins, nothing of the others is lost (readiness stays set, commands stay queued).
//!
//! Talking to the control plane. Events go into one bounded queue; when the queue goes from empty to
//! non-empty the engine writes to an eventfd the control plane waits on, so a burst of events costs
//! the control plane one wake-up. A session that would overflow the queue waits for room (only
//! reporting can produce many events). Commands go into a session's inbox, and its worker is told
//! through the worker's queue and eventfd to wake it.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::Future as _;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::rt::{self, EventFd, LocalNotify, Registered, Remote, Runtime, Sleep};
use crate::tls::{TlsError, TlsLayer};
use ostiary_wire::pg::audit::{AuditEntry, AuditTrack};
use ostiary_wire::pg::backend::{self, ErrorFields};
use ostiary_wire::pg::frontend;
use ostiary_wire::pg::masking::MaskPlan;
use ostiary_wire::pg::recording::Recorder;
use ostiary_wire::pg::relay::{
    BackendEvent, FrontendStop, Gate, RelayStats, Remember, SessionRelay, Statement, Verdict,
};
use ostiary_wire::pg::sqlstate;
use ostiary_wire::{Limits, WireError};

const READ_BUF: usize = 64 * 1024;
/// How long a terminating session waits for the server to finish the message it is sending
/// before the connection is closed without a goodbye.
const TERMINATE_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    pub workers: usize,
    pub limits: Limits,
    pub event_capacity: usize,
    /// Fault injection for the perf gate's self-test: CPU burnt per chunk scanned (zero: none).
    pub fault_spin: Duration,
    /// How long audit entries may wait in a worker before they are handed to the control plane
    /// (a worker also hands them over once it holds `AUDIT_BATCH`).
    pub audit_flush: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            workers: 1,
            limits: Limits::default(),
            event_capacity: 65_536,
            fault_spin: Duration::ZERO,
            audit_flush: Duration::from_millis(20),
        }
    }
}

/// Everything a worker needs to run one session.
pub struct SessionSpec {
    pub id: u64,
    pub client: OwnedFd,
    pub client_tls: Option<TlsLayer>,
    /// Plaintext the client sent after its handshake that the control plane already read.
    pub client_prefix: Vec<u8>,
    pub upstream: OwnedFd,
    pub upstream_tls: Option<TlsLayer>,
    /// Plaintext the server sent after ReadyForQuery that the control plane already read.
    pub upstream_prefix: Vec<u8>,
    pub gate: Gate,
    pub report: bool,
    /// Masking of what the server sends, if the session's rules ask for it.
    pub mask: Option<MaskPlan>,
    /// Statement entries for the audit trail, if it is on.
    pub audit: Option<AuditSpec>,
    /// The session's recording (what the client sent and received), if it is on.
    pub record: Option<RecordSpec>,
}

#[derive(Debug, Clone, Copy)]
pub struct RecordSpec {
    pub max_rows: u64,
    pub max_field: usize,
    /// Frames a session holds before it hands them over (it also does once a second).
    pub max_buffer: usize,
}

/// How often a recorded session hands its frames over at least (a crash loses at most this).
const RECORDING_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
pub struct AuditSpec {
    /// Bytes of statement text and parameters kept per entry.
    pub max_text: usize,
    /// Sync mode: what the client sends is held until the control plane reports the entries of
    /// its statements durable (`Command::AuditDurable`).
    pub write_ahead: bool,
}

/// Audit entries a worker gathers before handing them over without waiting for `audit_flush`.
pub const AUDIT_BATCH: usize = 512;

/// How long a session waits at most for the audit backlog to come down before it hands over its
/// entries anyway (the control plane's own limit, `max_pending`, then decides).
const AUDIT_BACKLOG_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub enum Command {
    Verdict {
        seq: u64,
        verdict: Verdict,
        remember: Remember,
    },
    /// End the session at its next idle point (outside a transaction, nothing owed).
    Drain { code: String, message: String },
    /// End the session now (at the next message boundary towards the client).
    Terminate { code: String, message: String },
    /// The audit entries handed over with `ticket` (and all before) are durable: what the client
    /// sent with them may go to the server.
    AuditDurable { ticket: u64 },
    /// The audit trail could not record them: what is held is dropped and the session ends.
    AuditFailed { code: String, message: String },
    /// Refuse every statement from now on with this error, or stop refusing (None).
    Refuse { refusal: Option<(String, String)> },
    /// Send the client a NoticeResponse (at the next message boundary towards it), e.g. while a
    /// statement of it is held for approval. `held`: the statement now waiting for a verdict waits
    /// for people (an approval), so a client that leaves meanwhile ends the session: the statement
    /// must not run for nobody once approved (a verdict that takes milliseconds is waited for, as
    /// PostgreSQL runs what a client sent before its EOF).
    Notice {
        code: String,
        message: String,
        held: bool,
    },
}

#[derive(Debug, Clone)]
pub enum Event {
    Statement {
        session: u64,
        statement: Statement,
    },
    Backend {
        session: u64,
        events: Vec<BackendEvent>,
    },
    /// Audit entries of one or more sessions (session id, entry), in the order they were made.
    /// `ack` names a session waiting for `Command::AuditDurable` with this ticket.
    Audit {
        entries: Vec<(u64, AuditEntry)>,
        ack: Option<(u64, u64)>,
    },
    /// Recording frames of one session (`ostiary_wire::pg::recording`), in order.
    Recording {
        session: u64,
        frames: Vec<u8>,
    },
    Ended {
        session: u64,
        reason: String,
        detail: String,
        stats: RelayStats,
        /// Values masked, per rule of the session's mask plan.
        masked: Vec<u64>,
    },
}

/// What the control plane sends a worker thread.
enum ToWorker {
    Adopt(Box<SessionSpec>, Arc<Inbox>),
    /// A command waits in this session's inbox.
    Wake(u64),
    /// Commands wait in the inboxes of all this worker's sessions.
    WakeAll,
}

/// A session's commands. The control plane queues them here directly, before it tells the worker,
/// so a command sent before the client's next bytes arrived is always seen before those bytes; the
/// session looks with one atomic load per wake-up (no channel polled, no waker registered).
#[derive(Default)]
struct Inbox {
    queue: Mutex<VecDeque<Command>>,
    waiting: AtomicBool,
}

impl Inbox {
    fn put(&self, cmd: Command) {
        let mut q = self.queue.lock().expect("inbox lock");
        q.push_back(cmd);
        self.waiting.store(true, Ordering::Release);
    }

    fn take(&self) -> Option<Command> {
        if !self.waiting.load(Ordering::Acquire) {
            return None;
        }
        let mut q = self.queue.lock().expect("inbox lock");
        let cmd = q.pop_front();
        if q.is_empty() {
            self.waiting.store(false, Ordering::Release);
        }
        cmd
    }
}

/// How the control plane reaches one worker thread: a queue and the loop's eventfd.
struct WorkerLink {
    queue: Mutex<VecDeque<ToWorker>>,
    /// The engine is gone: the worker ends.
    closed: AtomicBool,
    remote: Arc<Remote>,
}

impl WorkerLink {
    fn send(&self, msg: ToWorker) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        let mut q = self.queue.lock().expect("worker queue lock");
        let was_empty = q.is_empty();
        q.push_back(msg);
        drop(q);
        if was_empty {
            self.remote.notify();
        }
        true
    }
}

struct Inner {
    config: EngineConfig,
    workers: Vec<Arc<WorkerLink>>,
    /// Live sessions: the worker each runs on and its inbox.
    sessions: Mutex<HashMap<u64, (usize, Arc<Inbox>)>>,
    events: Mutex<VecDeque<Event>>,
    event_fd: EventFd,
    next_worker: AtomicUsize,
    /// Audit records the control plane holds unwritten, and the count at which sessions wait
    /// before handing over more entries (0: never); see `Engine::set_audit_backlog`.
    audit_backlog: AtomicUsize,
    audit_high: AtomicUsize,
    /// Audit entries handed over that the control plane has not yet made records of (it says so
    /// in `set_audit_backlog`).
    audit_queued: AtomicUsize,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for w in &self.workers {
            w.closed.store(true, Ordering::Release);
            w.remote.notify();
        }
    }
}

impl Inner {
    /// Audit entries handed over and not yet written: in the event queue, and (as the control
    /// plane last said) records it holds.
    fn audit_backlog(&self) -> usize {
        self.audit_backlog.load(Ordering::Relaxed) + self.audit_queued.load(Ordering::Relaxed)
    }

    fn push(&self, ev: Event) -> bool {
        let mut q = self.events.lock().expect("event queue lock");
        let was_empty = q.is_empty();
        q.push_back(ev);
        let full = q.len() >= self.config.event_capacity;
        drop(q);
        if was_empty {
            self.event_fd.notify();
        }
        full
    }

    /// Queues audit entries (counted in `audit_queued` until the control plane takes them).
    async fn push_audit(
        &self,
        rt: &Rc<Runtime>,
        entries: Vec<(u64, AuditEntry)>,
        ack: Option<(u64, u64)>,
    ) {
        self.audit_queued
            .fetch_add(entries.len(), Ordering::Relaxed);
        self.push_waiting(rt, Event::Audit { entries, ack }).await;
    }

    /// Queues an event; if that filled the queue, waits until the control plane made room (a
    /// session producing events faster than they are taken, e.g. reports of a large result).
    async fn push_waiting(&self, rt: &Rc<Runtime>, ev: Event) {
        if self.push(ev) {
            while self.events.lock().expect("event queue lock").len() >= self.config.event_capacity
            {
                rt.sleep(Duration::from_millis(2)).await;
            }
        }
    }
}

/// The handle the control plane holds; cloning shares the same engine. Every session holds the
/// engine until it ends; once the last handle and the last session are gone, the worker threads
/// end. Terminate sessions to stop them: dropping the handles alone leaves them running.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    pub fn new(config: EngineConfig) -> io::Result<Self> {
        let event_fd = EventFd::new()?;
        let workers_n = config.workers.max(1);
        let mut links = Vec::with_capacity(workers_n);
        for _ in 0..workers_n {
            links.push(Arc::new(WorkerLink {
                queue: Mutex::new(VecDeque::new()),
                closed: AtomicBool::new(false),
                remote: Remote::new()?,
            }));
        }
        let inner = Arc::new(Inner {
            config,
            workers: links.clone(),
            sessions: Mutex::new(HashMap::new()),
            events: Mutex::new(VecDeque::new()),
            event_fd,
            next_worker: AtomicUsize::new(0),
            audit_backlog: AtomicUsize::new(0),
            audit_high: AtomicUsize::new(0),
            audit_queued: AtomicUsize::new(0),
        });
        for (i, link) in links.into_iter().enumerate() {
            let inner2 = Arc::downgrade(&inner);
            // A worker whose loop cannot start says so at once (not with its first session).
            let (ok_tx, ok_rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("ostiary-worker-{i}"))
                .spawn(move || worker(link, inner2, ok_tx))?;
            ok_rx
                .recv()
                .map_err(|_| io::Error::other("a worker thread ended at start"))??;
        }
        Ok(Engine { inner })
    }

    pub fn workers(&self) -> usize {
        self.inner.workers.len()
    }

    /// The eventfd that becomes readable when events are waiting.
    pub fn event_fd(&self) -> i32 {
        self.inner.event_fd.as_raw_fd()
    }

    pub fn adopt(&self, spec: SessionSpec) -> Result<(), String> {
        let id = spec.id;
        let i = self.inner.next_worker.fetch_add(1, Ordering::Relaxed) % self.inner.workers.len();
        let inbox = Arc::new(Inbox::default());
        {
            let mut sessions = self.inner.sessions.lock().expect("sessions lock");
            if sessions.contains_key(&id) {
                return Err(format!("session {id} exists already"));
            }
            sessions.insert(id, (i, inbox.clone()));
        }
        if !self.inner.workers[i].send(ToWorker::Adopt(Box::new(spec), inbox)) {
            self.inner
                .sessions
                .lock()
                .expect("sessions lock")
                .remove(&id);
            return Err("the engine is shut down".into());
        }
        Ok(())
    }

    /// Sends a command to one session; false if it has ended.
    pub fn command(&self, session: u64, cmd: Command) -> bool {
        let sessions = self.inner.sessions.lock().expect("sessions lock");
        sessions.get(&session).is_some_and(|(w, inbox)| {
            inbox.put(cmd);
            self.inner.workers[*w].send(ToWorker::Wake(session))
        })
    }

    /// Sends a command to every live session; returns how many got it.
    pub fn broadcast(&self, cmd: Command) -> usize {
        let sessions = self.inner.sessions.lock().expect("sessions lock");
        let mut per_worker = vec![0usize; self.inner.workers.len()];
        for (w, inbox) in sessions.values() {
            inbox.put(cmd.clone());
            per_worker[*w] += 1;
        }
        per_worker
            .iter()
            .enumerate()
            .filter(|&(w, &n)| n > 0 && self.inner.workers[w].send(ToWorker::WakeAll))
            .map(|(_, &n)| n)
            .sum()
    }

    /// The audit trail's backlog, as the control plane last counted it: with `pending` records
    /// unwritten at or above `high`, a session about to hand over audit entries first waits
    /// (for at most `AUDIT_BACKLOG_WAIT`) until the backlog is below half of `high`. A client
    /// pipelining statements faster than the store writes is slowed down this way, instead of
    /// filling the backlog until everyone is refused. `high` 0 turns it off (the store is down:
    /// refusal or spooling take over).
    ///
    /// `taken`: audit entries of `("audit", ...)` events the control plane has now made records
    /// of (they counted as queued until then).
    pub fn set_audit_backlog(&self, pending: usize, high: usize, taken: usize) {
        if taken > 0 {
            let _ =
                self.inner
                    .audit_queued
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |q| {
                        Some(q.saturating_sub(taken))
                    });
        }
        self.inner.audit_backlog.store(pending, Ordering::Relaxed);
        self.inner.audit_high.store(high, Ordering::Relaxed);
    }

    pub fn session_count(&self) -> usize {
        self.inner.sessions.lock().expect("sessions lock").len()
    }

    /// Takes up to `max` waiting events and clears the eventfd.
    pub fn poll_events(&self, max: usize) -> Vec<Event> {
        self.inner.event_fd.clear();
        let mut q = self.inner.events.lock().expect("event queue lock");
        let n = q.len().min(max);
        let out: Vec<Event> = q.drain(..n).collect();

        let more = !q.is_empty();
        drop(q);
        if more {
            self.inner.event_fd.notify();
        }
        out
    }
}

/// A session's side of its inbox, on its worker thread: the waker the worker wakes when the
/// control plane says a command waits (a channel of its own per session would cost atomic
/// operations and a waker registration every time the session wakes for I/O).
#[derive(Default)]
struct Mailbox {
    inbox: Arc<Inbox>,
    /// The engine is gone: no more commands will come.
    closed: std::cell::Cell<bool>,
    waker: RefCell<Option<std::task::Waker>>,
}

impl Mailbox {
    fn wake(&self) {
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// A waiting command, `Ready(None)` once the engine is gone, or `Pending` (waker kept).
    fn poll(&self, cx: &Context<'_>) -> Poll<Option<Command>> {
        if let Some(c) = self.inbox.take() {
            return Poll::Ready(Some(c));
        }
        if self.closed.get() {
            return Poll::Ready(None);
        }
        let mut slot = self.waker.borrow_mut();
        if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *slot = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

type Mailboxes = Rc<RefCell<HashMap<u64, Rc<Mailbox>>>>;

/// Takes a session's mailbox off its worker's list when the session ends (or its task panics).
struct Unlist(Mailboxes, u64);

impl Drop for Unlist {
    fn drop(&mut self) {
        self.0.borrow_mut().remove(&self.1);
    }
}

/// recv(2) as a system call of its own. glibc's `recv`/`send` are thread cancellation points that
/// switch the cancellation state around every call, a measurable share of the per-message cost.
fn sys_recv(fd: &impl AsRawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call; the address
    // arguments are null, which recvfrom(2) allows.
    let n = unsafe {
        libc::syscall(
            libc::SYS_recvfrom,
            fd.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
            0,
            std::ptr::null_mut::<libc::sockaddr>(),
            std::ptr::null_mut::<libc::socklen_t>(),
        )
    };
    byte_count(n)
}

/// A system call's byte count, or the error it reported in errno.
fn byte_count(n: libc::c_long) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// send(2) as a system call of its own (see `sys_recv`); MSG_NOSIGNAL as Rust's own writes do.
fn sys_send(fd: &impl AsRawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the whole call; no address.
    let n = unsafe {
        libc::syscall(
            libc::SYS_sendto,
            fd.as_raw_fd(),
            buf.as_ptr(),
            buf.len(),
            libc::MSG_NOSIGNAL,
            std::ptr::null::<libc::sockaddr>(),
            0 as libc::socklen_t,
        )
    };
    byte_count(n)
}

/// TCP keepalive of both legs: a peer that vanished without a FIN or reset (a host powered off,
/// a NAT or firewall that dropped the flow) is found after about `KEEPALIVE_IDLE` +
/// `KEEPALIVE_COUNT` × `KEEPALIVE_INTERVAL` seconds of silence, and its session ends instead of
/// holding a backend forever. Linux's default would wait two hours before the first probe.
const KEEPALIVE_IDLE: libc::c_int = 60;
const KEEPALIVE_INTERVAL: libc::c_int = 15;
const KEEPALIVE_COUNT: libc::c_int = 4;

fn set_keepalive(fd: &impl AsRawFd) -> io::Result<()> {
    let opts = [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_IDLE),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, KEEPALIVE_INTERVAL),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_COUNT),
    ];
    for (level, name, value) in opts {
        // SAFETY: `value` is a c_int that lives for the call; its size is passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn worker(
    link: Arc<WorkerLink>,
    inner: std::sync::Weak<Inner>,
    started: std::sync::mpsc::Sender<io::Result<()>>,
) {
    let rt = match Runtime::new(link.remote.clone()) {
        Ok(rt) => rt,
        Err(e) => {
            let _ = started.send(Err(e));
            return;
        }
    };
    let _ = started.send(Ok(()));
    if let Some(i) = inner.upgrade() {
        let every = i.config.audit_flush;
        let weak = inner.clone();
        drop(i);
        let rt2 = rt.clone();
        rt.spawn(async move {
            loop {
                // No timer while nothing waits: an armed timer makes every idle wait of the
                // worker (epoll_wait with a timeout) read the clock.
                if AUDIT_BUF.with_borrow(Vec::is_empty) {
                    AUDIT_WAKE.with(Rc::clone).notified().await;
                }
                rt2.sleep(every).await;
                let Some(inner) = weak.upgrade() else { break };
                let entries = AUDIT_BUF.with_borrow_mut(std::mem::take);
                if !entries.is_empty() {
                    inner.push_audit(&rt2, entries, None).await;
                }
            }
        });
    }
    let boxes: Mailboxes = Rc::default();
    let scratch = Rc::new(RefCell::new(Scratch::new()));
    rt.run(|| {
        loop {
            let msg = link.queue.lock().expect("worker queue lock").pop_front();
            let Some(msg) = msg else { break };
            dispatch(msg, &rt, &boxes, &scratch, &inner);
        }
        if link.closed.load(Ordering::Acquire) {
            // The engine is gone (which happens only once no session holds it).
            for mb in boxes.borrow().values() {
                mb.closed.set(true);
                mb.wake();
            }
            return false;
        }
        true
    });
}

/// Handles one thing the control plane sent this worker: a session to adopt, or commands waiting.
fn dispatch(
    msg: ToWorker,
    rt: &Rc<Runtime>,
    boxes: &Mailboxes,
    scratch: &Rc<RefCell<Scratch>>,
    inner: &std::sync::Weak<Inner>,
) {
    let (spec, inbox) = match msg {
        ToWorker::Adopt(spec, inbox) => (*spec, inbox),
        ToWorker::Wake(id) => {
            if let Some(mb) = boxes.borrow().get(&id) {
                mb.wake();
            }
            return;
        }
        ToWorker::WakeAll => {
            for mb in boxes.borrow().values() {
                mb.wake();
            }
            return;
        }
    };
    let Some(inner) = inner.upgrade() else { return };
    let mb = Rc::new(Mailbox {
        inbox,
        ..Mailbox::default()
    });
    boxes.borrow_mut().insert(spec.id, mb.clone());
    let boxes = boxes.clone();
    let scratch = scratch.clone();
    let rt2 = rt.clone();
    rt.spawn(async move {
        let mut guard = EndGuard {
            id: spec.id,
            inner: inner.clone(),
            ended: false,
        };
        let unlist = Unlist(boxes, spec.id);
        let (reason, detail, stats, masked) = match Session::start(spec, &inner, scratch, &rt2) {
            Ok(s) => s.run(&mb, &inner).await,
            Err(e) => (
                "io_error".to_owned(),
                e.to_string(),
                RelayStats::default(),
                Vec::new(),
            ),
        };
        drop(unlist);
        guard.end(reason, detail, stats, masked);
    });
}

/// Reports a session's end exactly once: normally through `end`, and if the task panics (a bug),
/// from `drop`, so the control plane never keeps a session that no longer exists.
struct EndGuard {
    id: u64,
    inner: Arc<Inner>,
    ended: bool,
}

impl EndGuard {
    fn end(&mut self, reason: String, detail: String, stats: RelayStats, masked: Vec<u64>) {
        self.ended = true;
        self.inner
            .sessions
            .lock()
            .expect("sessions lock")
            .remove(&self.id);
        self.inner.push(Event::Ended {
            session: self.id,
            reason,
            detail,
            stats,
            masked,
        });
    }
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        if !self.ended {
            self.end(
                "internal_error".into(),
                "the session task panicked".into(),
                RelayStats::default(),
                Vec::new(),
            );
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("{side}: {err}")]
    Protocol { side: &'static str, err: WireError },
}

/// Buffers shared by every session of one worker thread. A session uses them only between two
/// await points (read, scan, write as far as the socket takes it), so an idle session owns no I/O
/// buffer at all: its memory is its relay state plus whatever a peer could not take yet (`backlog`).
struct Scratch {
    read: Vec<u8>,
    plain: Vec<u8>,
    out: Vec<u8>,
    raw: Vec<u8>,
}

thread_local! {
    /// Audit entries of this worker's sessions not yet handed to the control plane.
    static AUDIT_BUF: RefCell<Vec<(u64, AuditEntry)>> = const { RefCell::new(Vec::new()) };
    /// Tells the worker's audit flusher that `AUDIT_BUF` holds entries again.
    static AUDIT_WAKE: Rc<LocalNotify> = Rc::new(LocalNotify::default());
}

impl Scratch {
    fn new() -> Self {
        Scratch {
            read: vec![0u8; READ_BUF],
            plain: Vec::with_capacity(READ_BUF),
            out: Vec::with_capacity(READ_BUF + 1024),
            raw: Vec::with_capacity(READ_BUF + 4096),
        }
    }
}

/// Backlog capacity kept between writes; a larger one (a slow peer during a large result) is freed
/// once it drains.
const BACKLOG_KEEP: usize = 4096;

/// One leg of a session: a socket, optionally wrapped in TLS.
///
/// The session clears read readiness itself: a read that returns less than the buffer drained the
/// socket, and epoll (edge triggered) reports any later data as a new event, so the usual extra
/// read that only returns EAGAIN is skipped. That saves a system call per message in each
/// direction. (Unless epoll reported a hang-up: see `Registered::clear_read_ready_after_short_read`.)
struct Leg {
    tcp: Rc<Registered<std::net::TcpStream>>,
    tls: Option<TlsLayer>,
    /// Raw bytes the peer's socket did not take yet, in order.
    backlog: Vec<u8>,
}

/// What woke a session.
enum Wake {
    Command(Option<Command>),
    Client,
    Upstream,
    /// Room again (or a failure to ask for it) in a socket whose backlog waits.
    ClientWritable(io::Result<()>),
    UpstreamWritable(io::Result<()>),
    Deadline,
    /// The client left while its statement waited for approval.
    ClientGone,
}

/// What one read says about the socket's read readiness.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Drained {
    /// The read filled the buffer: there may be more.
    No,
    /// The read returned less than the buffer: drained, unless the peer hung up (see
    /// `Registered::clear_read_ready_after_short_read`).
    Short,
    /// The read found nothing (EAGAIN).
    Empty,
}

impl Drained {
    fn apply<T: AsRawFd>(self, fd: &Registered<T>) {
        match self {
            Drained::No => {}
            Drained::Short => fd.clear_read_ready_after_short_read(),
            Drained::Empty => fd.clear_read_ready(),
        }
    }
}

enum Read {
    /// Spurious readiness: nothing to read.
    Nothing,
    /// The peer closed the connection (or its TLS session).
    Closed(&'static str),
    /// Bytes were read and passed on.
    Data,
}

impl Leg {
    fn new(rt: &Rc<Runtime>, fd: OwnedFd, tls: Option<TlsLayer>) -> io::Result<Self> {
        let std = std::net::TcpStream::from(fd);
        std.set_nonblocking(true)?;
        std.set_nodelay(true)?;
        set_keepalive(&std)?;
        // Registered for reading only: with write interest as well, every ACK that frees send
        // buffer space is an epoll event (EPOLLOUT, edge triggered) that wakes the worker for
        // nothing, which cost ~1.5 µs of CPU per short transaction. `flush` asks for writability
        // only while the peer's buffer is full.
        Ok(Leg {
            tcp: Rc::new(Registered::new(rt, std)?),
            tls,
            backlog: Vec::new(),
        })
    }

    /// Reads once into `read` and decrypts into `plain` when TLS is on. Returns the plaintext and
    /// whether the peer closed, or `None` when there was nothing to read. `drained` says whether
    /// the socket may have more to read now (the caller then clears its read readiness).
    fn try_read<'a>(
        &mut self,
        read: &'a mut [u8],
        plain: &'a mut Vec<u8>,
        raw: &mut Vec<u8>,
        drained: &mut Drained,
    ) -> Result<Option<(&'a [u8], bool)>, SessionError> {
        let n = match sys_recv(self.tcp.get_ref(), read) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                *drained = Drained::Empty;
                return Ok(None);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        *drained = if n < read.len() {
            Drained::Short
        } else {
            Drained::No
        };
        if n == 0 {
            return Ok(Some((&[], true)));
        }
        match &mut self.tls {
            None => Ok(Some((&read[..n], false))),
            Some(tls) => {
                plain.clear();
                let closed = tls.receive_raw_into(&read[..n], plain)?;
                // TLS records owed in reply (alerts, key updates).
                self.write_now(&[], raw)?;
                Ok(Some((&plain[..], closed)))
            }
        }
    }

    /// Sends plaintext: encrypts it when TLS is on, writes as much as the socket takes now and keeps
    /// the rest in `backlog` for `flush`. Never waits.
    fn write_now(&mut self, plain: &[u8], raw: &mut Vec<u8>) -> Result<(), SessionError> {
        let bytes: &[u8] = match &mut self.tls {
            None => plain,
            Some(tls) => {
                if !plain.is_empty() {
                    tls.write_plain(plain)?;
                }
                raw.clear();
                tls.take_raw(raw)?;
                raw
            }
        };
        if bytes.is_empty() {
            return Ok(());
        }
        if !self.backlog.is_empty() {
            self.backlog.extend_from_slice(bytes);
            return Ok(());
        }
        let mut off = 0;
        while off < bytes.len() {
            match sys_send(self.tcp.get_ref(), &bytes[off..]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.backlog.extend_from_slice(&bytes[off..]);
        Ok(())
    }

    /// Waits until the backlog is written: this is the backpressure, the session reads nothing more
    /// from the other side meanwhile.
    ///
    /// The socket is registered for reading only, so waiting for room adds write interest for as
    /// long as this flush lasts (a full socket buffer, i.e. a peer slower than the other side: two
    /// epoll_ctl calls per buffer-full of data).
    async fn flush(&mut self) -> Result<(), SessionError> {
        if self.backlog.is_empty() {
            return Ok(());
        }
        let mut off = 0;
        let result = loop {
            if off >= self.backlog.len() {
                break Ok(());
            }
            match sys_send(self.tcp.get_ref(), &self.backlog[off..]) {
                Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.tcp.clear_write_ready();
                    if let Err(e) = self.tcp.writable().await {
                        break Err(e);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        let disarmed = self.tcp.disarm_write();
        result?;
        disarmed?;
        if self.backlog.capacity() > BACKLOG_KEEP {
            self.backlog = Vec::new();
        } else {
            self.backlog.clear();
        }
        Ok(())
    }

    /// Writes as much of the backlog as the socket takes now, without waiting. Returns whether
    /// it is all out; if not, the socket's write readiness is cleared and the session's loop
    /// waits for room (`poll_write_ready`) while it goes on reading the other direction.
    fn try_flush(&mut self) -> Result<bool, SessionError> {
        if self.backlog.is_empty() {
            return Ok(true);
        }
        let mut off = 0;
        while off < self.backlog.len() {
            match sys_send(self.tcp.get_ref(), &self.backlog[off..]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.tcp.clear_write_ready();
                    self.backlog.drain(..off);
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.tcp.disarm_write()?;
        if self.backlog.capacity() > BACKLOG_KEEP {
            self.backlog = Vec::new();
        } else {
            self.backlog.clear();
        }
        Ok(true)
    }

    /// Writes `plain` and waits until it is out.
    async fn send(&mut self, plain: &[u8]) -> Result<(), SessionError> {
        let mut raw = Vec::new();
        self.write_now(plain, &mut raw)?;
        self.flush().await
    }

    /// Ends the sending side: what is still owed (the last messages, TLS close_notify) for up to
    /// `TERMINATE_GRACE` (a peer that does not read must not hold the session), then FIN.
    async fn close(&mut self, rt: &Rc<Runtime>) {
        if let Some(tls) = &mut self.tls {
            tls.send_close_notify();
            let mut raw = Vec::new();
            let _ = self.write_now(&[], &mut raw);
        }
        let _ = rt::timeout(rt, TERMINATE_GRACE, self.flush()).await;
        let _ = self.tcp.get_ref().shutdown(std::net::Shutdown::Write);
    }
}

struct Session {
    id: u64,
    client: Leg,
    upstream: Leg,
    relay: SessionRelay,
    /// Client plaintext not yet scanned (after a hold, or pipelined during the handshake).
    pending: Vec<u8>,
    upstream_prefix: Vec<u8>,
    events: Vec<BackendEvent>,
    report: bool,
    drain: Option<Vec<u8>>,
    terminate: Option<Vec<u8>>,
    fault_spin: Duration,
    audit: bool,
    write_ahead: bool,
    /// Sync audit: the last ticket handed over, and what waits for it to be durable.
    ticket: u64,
    stash: Vec<u8>,
    waiting: bool,
    /// The statement waited for is held for approval: the client's hang-up ends the session.
    watch_hang_up: bool,
    recorder: Option<(Recorder, usize, std::time::Instant)>,
    /// Gateway-made notices waiting for a message boundary towards the client.
    notices: Vec<u8>,
    /// The server was sent EOF after the client's (see `main_loop`): no Terminate follows.
    upstream_shut: bool,
    /// The worker's buffers (one set per worker thread, see `Scratch`).
    scratch: Rc<RefCell<Scratch>>,
    /// The worker's event loop.
    rt: Rc<Runtime>,
}

/// The end detail of a session whose client was done when a write found it gone.
fn gone_detail(why: &str, e: &dyn std::fmt::Display) -> String {
    if why.is_empty() {
        e.to_string()
    } else {
        format!("{why}; {e}")
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Burns CPU for `d` (the perf gate's deliberate slowdown; zero in production).
fn spin(d: Duration) {
    if d.is_zero() {
        return;
    }
    let start = std::time::Instant::now();
    while start.elapsed() < d {
        std::hint::spin_loop();
    }
}

fn protocol(side: &'static str) -> impl FnOnce(WireError) -> SessionError {
    move |err| SessionError::Protocol { side, err }
}

impl Session {
    fn start(
        spec: SessionSpec,
        inner: &Inner,
        scratch: Rc<RefCell<Scratch>>,
        rt: &Rc<Runtime>,
    ) -> Result<Self, SessionError> {
        Ok(Session {
            scratch,
            rt: rt.clone(),
            id: spec.id,
            client: Leg::new(rt, spec.client, spec.client_tls)?,
            upstream: Leg::new(rt, spec.upstream, spec.upstream_tls)?,
            relay: {
                let mut relay = SessionRelay::new(inner.config.limits, spec.gate, spec.report);
                if let Some(plan) = spec.mask {
                    relay.set_masking(plan);
                }
                if let Some(a) = spec.audit {
                    relay.set_audit(AuditTrack::new(a.max_text, a.write_ahead));
                }
                relay
            },
            audit: spec.audit.is_some(),
            write_ahead: spec.audit.is_some_and(|a| a.write_ahead),
            ticket: 0,
            stash: Vec::new(),
            waiting: false,
            watch_hang_up: false,
            notices: Vec::new(),
            recorder: spec.record.map(|r| {
                (
                    Recorder::new(r.max_rows, r.max_field, r.max_buffer),
                    r.max_buffer / 2,
                    std::time::Instant::now(),
                )
            }),
            pending: spec.client_prefix,
            upstream_prefix: spec.upstream_prefix,
            events: Vec::new(),
            report: spec.report,
            drain: None,
            terminate: None,
            fault_spin: inner.config.fault_spin,
            upstream_shut: false,
        })
    }

    /// Runs `f` with the worker's buffers.
    fn with_scratch<R>(&mut self, f: impl FnOnce(&mut Self, &mut Scratch) -> R) -> R {
        let scratch = Rc::clone(&self.scratch);
        let mut s = scratch.borrow_mut();
        f(self, &mut s)
    }

    async fn run(
        mut self,
        cmds: &Mailbox,
        inner: &Inner,
    ) -> (String, String, RelayStats, Vec<u64>) {
        let (reason, detail) = match self.main_loop(cmds, inner).await {
            Ok((r, d)) => (r.to_owned(), d),
            Err(SessionError::Protocol { side, err }) => {
                // Tell the client why, if that does not break a message it is receiving.
                if self.relay.client_at_boundary() {
                    let (code, msg) = match &err {
                        WireError::Refused(why) => (
                            sqlstate::INSUFFICIENT_PRIVILEGE,
                            format!("terminating connection: {why}"),
                        ),
                        // Not the server's fault: the gateway's own limit, failing closed.
                        WireError::TooLarge {
                            what: "server message to mask",
                            length,
                            limit,
                        } => (
                            sqlstate::PROGRAM_LIMIT_EXCEEDED,
                            format!(
                                "terminating connection: a result message of {length} bytes is \
                                 over the {limit} bytes masking holds whole (limits.max_statement); \
                                 it was not passed unmasked"
                            ),
                        ),
                        WireError::TooLarge {
                            what: ostiary_wire::pg::relay::FOLLOWED_MESSAGE,
                            length,
                            limit,
                        } => (
                            sqlstate::PROGRAM_LIMIT_EXCEEDED,
                            format!(
                                "terminating connection: a client message of {length} bytes is \
                                 over the {limit} bytes a masked session holds whole to follow \
                                 it (limits.max_statement)"
                            ),
                        ),
                        _ => (
                            sqlstate::PROTOCOL_VIOLATION,
                            format!("protocol violation from the {side}: {err}"),
                        ),
                    };
                    let bytes = backend::error_response("FATAL", code, &msg);
                    let rt = self.rt.clone();
                    let _ = rt::timeout(&rt, TERMINATE_GRACE, self.client.send(&bytes)).await;
                }
                ("protocol_error".to_owned(), format!("{side}: {err}"))
            }
            Err(e) => ("io_error".to_owned(), e.to_string()),
        };
        if !self.upstream_shut {
            if !self.relay.terminated() {
                // The server gets a Terminate unless the client's own was already passed on.
                let bye = frontend::terminate();
                let rt = self.rt.clone();
                let _ = rt::timeout(&rt, TERMINATE_GRACE, self.upstream.send(&bye)).await;
            }
            let rt = self.rt.clone();
            self.upstream.close(&rt).await;
        }
        let rt = self.rt.clone();
        self.client.close(&rt).await;
        if let Some((rec, _, _)) = self.recorder.as_mut() {
            let frames = rec.take();
            if !frames.is_empty() {
                inner
                    .push_waiting(
                        &self.rt,
                        Event::Recording {
                            session: self.id,
                            frames,
                        },
                    )
                    .await;
            }
        }
        if let Some(a) = self.relay.audit_mut() {
            a.set_now(now_us());
            a.finish();
            let mine = a.take().into_iter().map(|e| (self.id, e));
            let entries = AUDIT_BUF.with_borrow_mut(|b| {
                b.extend(mine);
                std::mem::take(b)
            });
            if !entries.is_empty() {
                inner.push_audit(&self.rt, entries, None).await;
            }
        }
        (
            reason,
            detail,
            self.relay.stats,
            self.relay.masked_counts().to_vec(),
        )
    }

    async fn main_loop(
        &mut self,
        cmds: &Mailbox,
        inner: &Inner,
    ) -> Result<(&'static str, String), SessionError> {
        if !self.upstream_prefix.is_empty() {
            let prefix = std::mem::take(&mut self.upstream_prefix);
            self.with_scratch(|this, s| this.scan_backend(&prefix, &mut s.out, &mut s.raw))?;
            self.after_backend(inner).await?;
        }
        let mut deadline: Option<Sleep> = None;
        let (cfd, ufd) = (self.client.tcp.clone(), self.upstream.tcp.clone());
        let mut upstream_first = false;
        // The client is done (it sent EOF, a FIN or the end of its TLS session, or Terminate)
        // while the server still owes it answers. As PostgreSQL itself does, the statements it
        // sent before still run and their answers are relayed: the server gets EOF in turn once
        // everything before it is written, and the session ends when nothing is owed any more or
        // the server closes. A client that is gone altogether (not just half-closed) makes the
        // first write after that fail, which ends the session just the same.
        let mut half_closed: Option<&'static str> = None;
        // A client protocol error met while answers were owed: the session's end, once they are out.
        let mut deferred: Option<SessionError> = None;
        loop {
            if !self.pending.is_empty() && !self.relay.is_holding() && !self.waiting {
                let pending = std::mem::take(&mut self.pending);
                let hold = self
                    .with_scratch(|this, s| this.scan_frontend(&pending, &mut s.out, &mut s.raw))?;
                self.after_frontend(hold, inner).await?;
            }
            if half_closed.is_none() && self.relay.terminated() {
                // (Nothing can be held or pending once the relay has passed the Terminate on.)
                if !self.relay.server_owes_answer() && !self.relay.unsynced() {
                    return Ok(("client_closed", String::new()));
                }
                half_closed = Some("");
            }
            if let Some(why) = half_closed {
                // The server's EOF follows everything the client sent: not while a statement
                // waits for a decision, more of its bytes wait behind it, or sync audit holds them.
                if !self.upstream_shut
                    && !self.waiting
                    && !self.relay.is_holding()
                    && self.pending.is_empty()
                    && self.upstream.try_flush()?
                {
                    if !self.relay.terminated() {
                        let rt = self.rt.clone();
                        self.upstream.close(&rt).await;
                    }
                    // After the client's Terminate the server ends the session itself once it
                    // has answered what came before; anything more from us (TLS close_notify)
                    // would be unread when it exits, and its reset would drop the answers still
                    // on their way.
                    self.upstream_shut = true;
                }
                // (Messages after the last Sync have no ReadyForQuery to wait for: then the
                // server's closing the connection, after it read the EOF, ends the session.)
                if self.upstream_shut && !self.relay.server_owes_answer() && !self.relay.unsynced()
                {
                    if let Some(e) = deferred.take() {
                        return Err(e);
                    }
                    match self.client.try_flush() {
                        Ok(true) => return Ok(("client_closed", why.into())),
                        Ok(false) => {} // the loop waits for room, as for any backlog
                        Err(e) => return Ok(("client_closed", gone_detail(why, &e))),
                    }
                }
            }
            if !self.notices.is_empty() && self.relay.backend_at_boundary() {
                let notices = std::mem::take(&mut self.notices);
                self.with_scratch(|this, s| this.client.write_now(&notices, &mut s.raw))?;
                if let Some((rec, _, _)) = self.recorder.as_mut() {
                    let _ = rec.backend(&notices, now_us());
                }
            }
            if self.terminate.is_some() && self.relay.backend_at_boundary() {
                let bytes = self.terminate.take().unwrap_or_default();
                let rt = self.rt.clone();
                let _ = rt::timeout(&rt, TERMINATE_GRACE, self.client.send(&bytes)).await;
                return Ok(("terminated", String::new()));
            }
            if self.drain.is_some() && self.relay.idle() && self.pending.is_empty() && !self.waiting
            {
                let bytes = self.drain.take().unwrap_or_default();
                let rt = self.rt.clone();
                let _ = rt::timeout(&rt, TERMINATE_GRACE, self.client.send(&bytes)).await;
                return Ok(("drained", String::new()));
            }
            if self.terminate.is_some() && deadline.is_none() {
                deadline = Some(self.rt.sleep(TERMINATE_GRACE));
            }
            // Backpressure, each direction on its own: a side is not read while what it sent
            // before still waits for room on the other side, and the other direction goes on
            // meanwhile (a server that is blocked writing its answers must still be read, or a
            // client pipelining more than the socket buffers hold would deadlock the session).
            let to_client = !self.client.backlog.is_empty();
            let to_upstream = !self.upstream.backlog.is_empty();
            // Once the session is to end, no new statements are read from the client.
            let holding = self.relay.is_holding()
                || self.waiting
                || half_closed.is_some()
                || self.terminate.is_some()
                || to_upstream;
            let watch_hang_up = self.watch_hang_up && self.relay.is_holding();
            // Alternate which side is looked at first so neither can starve the other.
            upstream_first = !upstream_first;
            // One hand-written poll instead of `select!`: readiness is polled in place (no waiter
            // registered and removed per wake-up), which is most of the per-message cost here.
            let wake = std::future::poll_fn(|cx| {
                if let Poll::Ready(c) = cmds.poll(cx) {
                    return Poll::Ready(Wake::Command(c));
                }
                // First, or a peer that always has more to read would starve it.
                if let Some(sleep) = deadline.as_mut() {
                    if Pin::new(sleep).poll(cx).is_ready() {
                        return Poll::Ready(Wake::Deadline);
                    }
                }
                if watch_hang_up && cfd.poll_hang_up(cx).is_ready() {
                    return Poll::Ready(Wake::ClientGone);
                }
                if to_client {
                    if let Poll::Ready(r) = cfd.poll_write_ready(cx) {
                        return Poll::Ready(Wake::ClientWritable(r));
                    }
                }
                if to_upstream {
                    if let Poll::Ready(r) = ufd.poll_write_ready(cx) {
                        return Poll::Ready(Wake::UpstreamWritable(r));
                    }
                }
                let client = |cx: &mut Context<'_>| {
                    if holding {
                        return Poll::Pending;
                    }
                    cfd.poll_read_ready(cx).map(|()| Wake::Client)
                };
                let upstream = |cx: &mut Context<'_>| {
                    if to_client {
                        return Poll::Pending;
                    }
                    ufd.poll_read_ready(cx).map(|()| Wake::Upstream)
                };
                let first = if upstream_first {
                    upstream(cx)
                } else {
                    client(cx)
                };
                if first.is_ready() {
                    return first;
                }
                let second = if upstream_first {
                    client(cx)
                } else {
                    upstream(cx)
                };
                if second.is_ready() {
                    return second;
                }
                Poll::Pending
            })
            .await;
            match wake {
                Wake::Command(Some(c)) => self.on_command(c, inner).await?,
                Wake::Command(None) => return Ok(("terminated", "engine stopped".into())),
                Wake::Client => {
                    let (outcome, hold, drained) = match self.on_client_readable() {
                        Ok(read) => read,
                        Err(e @ SessionError::Protocol { side: "client", .. })
                            if deferred.is_none()
                                && (self.relay.server_owes_answer() || self.relay.unsynced()) =>
                        {
                            // Answers to what the client sent before are owed: relay them as
                            // after an EOF (`half_closed`), then end with this error.
                            deferred = Some(e);
                            half_closed = Some("");
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    drained.apply(&cfd);
                    match (outcome, hold) {
                        // (A statement returned as held is the one the relay now holds.)
                        (Read::Closed(why), hold)
                            if self.relay.is_holding()
                                || !self.pending.is_empty()
                                || self.relay.server_owes_answer()
                                || self.relay.unsynced() =>
                        {
                            // Answers are owed, or statements wait for a decision (as they would
                            // if the EOF had come a moment later, unread while they wait): finish
                            // them, see `half_closed`.
                            self.after_frontend(hold, inner).await?;
                            half_closed = Some(why);
                        }
                        (Read::Closed(why), _) => return Ok(("client_closed", why.into())),
                        (Read::Nothing, _) => {}
                        (Read::Data, hold) => self.after_frontend(hold, inner).await?,
                    }
                }
                Wake::Upstream => {
                    let step = self.on_upstream_readable();
                    let step = match step {
                        Ok((outcome, drained)) => {
                            drained.apply(&ufd);
                            match outcome {
                                Read::Closed(why) => Ok(Some(why)),
                                Read::Nothing => Ok(None),
                                Read::Data => self.after_backend(inner).await.map(|()| None),
                            }
                        }
                        Err(e) => Err(e),
                    };
                    match (step, half_closed) {
                        (Ok(None), _) => {}
                        (Ok(Some(_)), Some(why)) => {
                            if let Some(e) = deferred.take() {
                                return Err(e);
                            }
                            return Ok(("client_closed", why.into()));
                        }
                        (Ok(Some(why)), None) => return Ok(("upstream_closed", why.into())),
                        // After the client's EOF a failed write means it is gone, not a fault.
                        (Err(SessionError::Io(e)), Some(why)) => {
                            return Ok(("client_closed", gone_detail(why, &e)))
                        }
                        (Err(e), _) => return Err(e),
                    }
                }
                Wake::ClientWritable(r) => {
                    let flushed = r
                        .map_err(SessionError::from)
                        .and_then(|()| self.client.try_flush());
                    match (flushed, half_closed) {
                        (Ok(_), _) => {}
                        // After the client's EOF a failed write means it is gone, not a fault.
                        (Err(e), Some(why)) => return Ok(("client_closed", gone_detail(why, &e))),
                        (Err(e), None) => return Err(e),
                    }
                }
                Wake::UpstreamWritable(r) => {
                    r?;
                    self.upstream.try_flush()?;
                }
                Wake::Deadline => {
                    return Ok((
                        "terminated",
                        "closed mid-message after the grace period".into(),
                    ));
                }
                Wake::ClientGone => {
                    // The held statement is dropped unsent (the control plane's wait is cancelled
                    // when it hears of the end; the request stays pending, see `Approvals.hold`).
                    return Ok((
                        "client_closed",
                        "the client left while its statement waited for approval".into(),
                    ));
                }
            }
        }
    }

    /// Reads what the client sent, scans it and passes it upstream, all without waiting.
    fn on_client_readable(&mut self) -> Result<(Read, Option<Statement>, Drained), SessionError> {
        self.with_scratch(|this, s| {
            let Scratch {
                read,
                plain,
                out,
                raw,
            } = s;
            let mut drained = Drained::No;
            let Some((data, closed)) = this.client.try_read(read, plain, raw, &mut drained)? else {
                return Ok((Read::Nothing, None, drained));
            };
            let hold = if data.is_empty() {
                None
            } else {
                this.scan_frontend(data, out, raw)?
            };
            if closed {
                let why = if this.client.tls.is_some() {
                    "client closed its TLS session"
                } else {
                    "client closed the connection without Terminate"
                };
                return Ok((Read::Closed(why), None, drained));
            }
            Ok((Read::Data, hold, drained))
        })
    }

    /// Reads what the server sent, scans it and passes it to the client, all without waiting.
    fn on_upstream_readable(&mut self) -> Result<(Read, Drained), SessionError> {
        self.with_scratch(|this, s| {
            let Scratch {
                read,
                plain,
                out,
                raw,
            } = s;
            let mut drained = Drained::No;
            let Some((data, closed)) = this.upstream.try_read(read, plain, raw, &mut drained)?
            else {
                return Ok((Read::Nothing, drained));
            };
            if !data.is_empty() {
                this.scan_backend(data, out, raw)?;
            }
            if closed {
                return Ok((Read::Closed("the server closed the connection"), drained));
            }
            Ok((Read::Data, drained))
        })
    }

    /// Scans client plaintext and writes what may pass upstream. On a hold, the rest of `data` is
    /// kept in `pending` and the held statement returned.
    fn scan_frontend(
        &mut self,
        data: &[u8],
        out: &mut Vec<u8>,
        raw: &mut Vec<u8>,
    ) -> Result<Option<Statement>, SessionError> {
        out.clear();
        spin(self.fault_spin);
        if self.audit {
            self.relay.set_now(now_us());
        }
        let stop = match self.relay.feed_frontend(data, out) {
            Ok(stop) => stop,
            Err(e) => {
                // What came before the bad bytes goes on, as PostgreSQL runs the messages it read
                // before one it cannot: the session then ends once their answers are relayed.
                let _ = self.send_upstream(out, raw);
                return Err(protocol("client")(e));
            }
        };
        if let Some((rec, _, _)) = self.recorder.as_mut() {
            // Only what was consumed: held bytes are scanned (and recorded) again later.
            let used = match &stop {
                FrontendStop::Consumed => data,
                FrontendStop::Hold { consumed, .. } => &data[..*consumed],
            };
            // A recorder that meets bytes it cannot frame stops recording (and says so in its
            // frames); the relay, which checks the same bytes, decides about the session.
            let _ = rec.frontend(used, now_us());
        }
        self.send_upstream(out, raw)?;
        Ok(match stop {
            FrontendStop::Consumed => None,
            FrontendStop::Hold {
                consumed,
                statement,
            } => {
                self.pending = data[consumed..].to_vec();
                Some(statement)
            }
        })
    }

    /// Scans server plaintext and writes what goes to the client.
    fn scan_backend(
        &mut self,
        data: &[u8],
        out: &mut Vec<u8>,
        raw: &mut Vec<u8>,
    ) -> Result<(), SessionError> {
        out.clear();
        spin(self.fault_spin);
        if self.audit {
            self.relay.set_now(now_us());
        }
        let fed = self.relay.feed_backend(data, out, &mut self.events);
        if let Some((rec, _, _)) = self.recorder.as_mut() {
            let _ = rec.backend(out, now_us());
        }
        // On an error, what passed before the bad message still goes out (the client's stream is
        // then between messages, where the session's FATAL can follow).
        self.client.write_now(out, raw)?;
        fed.map_err(protocol("server"))
    }

    /// Writes what goes to the server, unless the sync audit trail must first make the entries of
    /// these statements durable: then it waits in `stash` (in order) for `AuditDurable`.
    fn send_upstream(&mut self, out: &[u8], raw: &mut Vec<u8>) -> Result<(), SessionError> {
        let starts = self.relay.audit().map_or(0, |a| a.starts());
        if self.write_ahead && (self.waiting || starts > 0) {
            self.stash.extend_from_slice(out);
            self.waiting = true;
            return Ok(());
        }
        self.upstream.write_now(out, raw)
    }

    /// Hands the session's new audit entries to its worker's batch; with write-ahead entries (or a
    /// full batch) the batch goes to the control plane now, with a ticket when this session waits.
    async fn flush_audit(&mut self, inner: &Inner) {
        let Some(a) = self.relay.audit_mut() else {
            return;
        };
        if !a.has_entries() {
            return;
        }
        let starts = a.starts() > 0;
        let high = inner.audit_high.load(Ordering::Relaxed);
        if high > 0 && inner.audit_backlog() >= high {
            // Backpressure (see `Engine::set_audit_backlog`): this session reads no more from its
            // client meanwhile; others carry on.
            let until = std::time::Instant::now() + AUDIT_BACKLOG_WAIT;
            while inner.audit_backlog() >= high / 2
                && inner.audit_high.load(Ordering::Relaxed) > 0
                && std::time::Instant::now() < until
            {
                self.rt.sleep(Duration::from_millis(5)).await;
            }
        }
        let Some(a) = self.relay.audit_mut() else {
            return;
        };
        let mine = a.take().into_iter().map(|e| (self.id, e));
        let (entries, ack) = AUDIT_BUF.with_borrow_mut(|b| {
            if b.is_empty() {
                AUDIT_WAKE.with(|w| w.notify_one());
            }
            b.extend(mine);
            if self.write_ahead && starts {
                self.ticket += 1;
                (std::mem::take(b), Some((self.id, self.ticket)))
            } else if b.len() >= AUDIT_BATCH {
                (std::mem::take(b), None)
            } else {
                (Vec::new(), None)
            }
        });
        if !entries.is_empty() {
            inner.push_audit(&self.rt, entries, ack).await;
        }
    }

    /// Hands recording frames over once enough are buffered, or a second after the last time.
    async fn flush_recording(&mut self, inner: &Inner) {
        let Some((rec, half, at)) = self.recorder.as_mut() else {
            return;
        };
        let n = rec.buffered();
        if n == 0 || (n < *half && at.elapsed() < RECORDING_EVERY) {
            return;
        }
        *at = std::time::Instant::now();
        let frames = rec.take();
        inner
            .push_waiting(
                &self.rt,
                Event::Recording {
                    session: self.id,
                    frames,
                },
            )
            .await;
    }

    async fn after_frontend(
        &mut self,
        hold: Option<Statement>,
        inner: &Inner,
    ) -> Result<(), SessionError> {
        if hold.is_none() && self.nothing_owed() {
            return Ok(());
        }
        self.client.try_flush()?;
        self.upstream.try_flush()?;
        self.flush_recording(inner).await;
        if self.audit {
            self.flush_audit(inner).await;
        }
        if let Some(statement) = hold {
            inner
                .push_waiting(
                    &self.rt,
                    Event::Statement {
                        session: self.id,
                        statement,
                    },
                )
                .await;
        }
        Ok(())
    }

    /// Nothing to write out or hand over after a read: the common case of a session without
    /// audit, recording or reporting, decided without entering the async steps below.
    fn nothing_owed(&self) -> bool {
        self.client.backlog.is_empty()
            && self.upstream.backlog.is_empty()
            && self.recorder.is_none()
            && !self.audit
            && (!self.report || self.events.is_empty())
    }

    async fn after_backend(&mut self, inner: &Inner) -> Result<(), SessionError> {
        if self.nothing_owed() {
            return Ok(());
        }
        self.upstream.try_flush()?;
        self.client.try_flush()?;
        self.flush_recording(inner).await;
        if self.audit {
            self.flush_audit(inner).await;
        }
        if self.report && !self.events.is_empty() {
            let events = std::mem::take(&mut self.events);
            inner
                .push_waiting(
                    &self.rt,
                    Event::Backend {
                        session: self.id,
                        events,
                    },
                )
                .await;
        }
        Ok(())
    }

    async fn on_command(&mut self, cmd: Command, inner: &Inner) -> Result<(), SessionError> {
        match cmd {
            Command::Verdict {
                seq,
                verdict,
                remember,
            } => {
                if self.audit {
                    self.relay.set_now(now_us());
                }
                self.watch_hang_up = false;
                self.with_scratch(|this, s| {
                    s.out.clear();
                    this.relay
                        .resolve(seq, verdict, remember, &mut s.out)
                        .map_err(protocol("control plane"))?;
                    let out = std::mem::take(&mut s.out);
                    let r = this.send_upstream(&out, &mut s.raw);
                    s.out = out;
                    r
                })?;
                self.upstream.try_flush()?;
                if self.audit {
                    self.flush_audit(inner).await;
                }
            }
            Command::AuditDurable { ticket } => {
                if self.waiting && ticket >= self.ticket {
                    self.waiting = false;
                    let stash = std::mem::take(&mut self.stash);
                    self.with_scratch(|this, s| this.upstream.write_now(&stash, &mut s.raw))?;
                    self.upstream.try_flush()?;
                }
            }
            Command::AuditFailed { code, message } => {
                self.stash.clear();
                self.terminate = Some(ErrorFields::new("FATAL", &code, &message).encode_error());
            }
            Command::Refuse { refusal } => self.relay.set_refusal(refusal),
            Command::Notice {
                code,
                message,
                held,
            } => {
                self.notices
                    .extend(ErrorFields::new("NOTICE", &code, &message).encode_notice());
                if held && self.relay.is_holding() {
                    self.watch_hang_up = true;
                }
            }
            Command::Drain { code, message } => {
                self.drain = Some(backend::error_response("FATAL", &code, &message));
            }
            Command::Terminate { code, message } => {
                self.terminate = Some(ErrorFields::new("FATAL", &code, &message).encode_error());
            }
        }
        Ok(())
    }
}
