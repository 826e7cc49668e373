//! Group commit: decisions are made in memory, and what they changed is written to the data dir
//! by one writer thread, many decisions to a batch, one durable write of the commit log per
//! batch. A call is answered only once the batch holding its change is on disk, so an
//! acknowledged decision survives a crash. A second thread, the applier, then brings the
//! database up to date with the batches the log holds (several at a time when it falls behind,
//! without a sync), and checkpoints it (at every new log segment and every 250 ms) so that the
//! log can drop what it no longer needs: the oldest segment it drops becomes the spare for the
//! next one, so that a new segment costs the writer a rename, not a segment of zeros. A third
//! thread makes a spare of zeros when the log has no segment to spare (a new data dir). Reads
//! of the database (history, the export) first wait for the applier to reach what was
//! acknowledged.
//!
//! Batching adapts to load: the writer takes everything queued, writes it, and while that write
//! is syncing the next calls queue up for the next batch. When idle a batch is one change and
//! nothing waits; under load a batch holds whatever arrived during the last sync, and once
//! batches hold several changes the writer also lets the next one gather for half a
//! millisecond, so that calls arriving together do not each wake it. Changes are numbered as
//! they are queued (under the queue's lock, so in queue order); the writer publishes the number
//! of the last change made durable, and a caller waits for its own number. Each waiter is woken
//! once, when its number is on disk: a batch wakes the calls it holds, not every call waiting.
//!
//! What is queued and not yet applied is bounded (`max_unflushed`): past it a call is refused
//! with UNAVAILABLE *before* it decides anything, and a caller waits at most `write_timeout`
//! for its batch. A failed write is fatal to the engine, as an `fsync` failure is to a database
//! (the kernel may have dropped the dirty pages, so memory and disk can no longer be told
//! apart): every later call is UNAVAILABLE until quotad is restarted and recovers from the data
//! dir, and health reports the store down so that Kubernetes restarts the pod.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::{Notify, oneshot};

use super::StoreError;
use super::commit_log::{self, CommitLog};
use super::data_dir::{Change, Counters, DataDir, encode_changes};

/// How often the applier syncs the database at most (a checkpoint), beside the checkpoint at
/// each new log segment.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// How long the writer lets a batch gather when the last one held several changes (calls
/// are arriving together): the calls of that time then share one write and one wake-up of
/// the writer, where each would otherwise wake it (as PostgreSQL's `commit_delay` does when
/// `commit_siblings` transactions are open). Never when a call arrives alone. Measured on a
/// 2-core VM at saturation: with it, the writer's CPU per Reserve+Commit pair went from 13 to
/// 7.5 µs (the change in pairs per second was within that VM's noise); 2 ms cost pairs.
const GATHER: Duration = Duration::from_micros(500);

/// How long the applier lets batches gather before it applies them, unless a reader waits
/// for them or half the unflushed bound does: fewer and larger database writes, in which an
/// account changed by several decisions is written once, and a record or charge both made
/// and dropped is not written at all. Measured on a 2-core VM at saturation: 5 ms cost the
/// applier 22 µs of CPU per Reserve+Commit pair, 100 ms 13 µs.
const APPLY_PAUSE: Duration = Duration::from_millis(100);

/// The nice value of the threads off the answer's path (the applier, the spare segments):
/// when the cores are busy, the scheduler runs the calls first, so that the applier's bursts
/// of database writes do not stand in front of them. Raising a thread's nice value needs no
/// privilege. Not so low that the applier falls behind at saturation (it needs about a fifth
/// of a core there): nice 5 weighs a third of a normal thread.
const BACKGROUND_NICE: libc::c_int = 5;

/// Lowers the calling thread's priority to [`BACKGROUND_NICE`] (a no-op where it fails:
/// it only orders work that runs anyway).
fn yield_to_calls() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take no pointers; on Linux a thread id names one thread.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, BACKGROUND_NICE);
    }
}

#[derive(Debug)]
pub struct GroupCommit {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    write_timeout: Duration,
}

#[derive(Debug)]
struct Shared {
    data: Arc<DataDir>,
    queue: Mutex<Queue>,
    wake: Condvar,
    /// The number of the last change on disk; written under `waiters`' lock.
    durable: AtomicU64,
    /// Calls waiting for their change, by its number: woken (sent to, or dropped on a
    /// failure) by the writer once it is on disk.
    waiters: Mutex<Vec<(u64, oneshot::Sender<()>)>>,
    /// Set once, by the first failed write.
    failed: OnceLock<String>,
    /// Batches on disk in the log, waiting for the applier.
    to_apply: Mutex<Applying>,
    apply_wake: Condvar,
    /// The number of the last change applied to the database, and a wake-up for readers
    /// waiting for it.
    applied: AtomicU64,
    applied_notify: Notify,
    /// The number of the last batch the database holds durably (after a checkpoint): the log
    /// drops the segments before it.
    checkpointed: AtomicU64,
    /// Changes queued, being written, or waiting for the applier.
    unflushed: AtomicUsize,
    max_unflushed: usize,
    /// Held by the writer while it writes a batch (tests hold it to stand for a disk that
    /// stops answering).
    writing: Mutex<()>,
    /// Batches written and changes in them, since start.
    batches: AtomicUsize,
    changes: AtomicUsize,
    /// Asks the spare thread for the log's next segment (`wanted`), or to stop (`closing`).
    spare: Mutex<SpareRequest>,
    spare_wake: Condvar,
}

#[derive(Debug, Default)]
struct SpareRequest {
    wanted: bool,
    closing: bool,
}

#[derive(Debug, Default)]
struct Applying {
    /// Each batch's number, the number of its last change, and its changes.
    batches: Vec<(u64, u64, Vec<Change>)>,
    checkpoint: bool,
    closing: bool,
    /// A reader waits for the applier: apply now, without the pause.
    urgent: bool,
    /// The applier waits for a batch with none pending: the next batch wakes it.
    applier_idle: bool,
}

#[derive(Debug, Default)]
struct Queue {
    /// The number of the last change queued.
    last: u64,
    changes: Vec<Change>,
    closing: bool,
    /// The writer is waiting for changes: only then does a queued change need to wake it
    /// (under load it finds them when its write returns, and a wake-up is a system call).
    writer_waiting: bool,
}

impl GroupCommit {
    /// Starts the writer thread, appending to `log`, and the applier, bringing `data` up to
    /// date from the counters it holds.
    pub fn start(
        data: Arc<DataDir>,
        log: CommitLog,
        max_unflushed: usize,
        write_timeout: Duration,
    ) -> Result<GroupCommit, StoreError> {
        let counters = data.counters()?;
        let log_dir = log.dir().to_path_buf();
        let segment_bytes = log.segment_bytes();
        tracing::info!(
            path = %log_dir.display(),
            segment_bytes,
            direct_io = log.direct(),
            next_batch = log.next_batch(),
            "commit log ready"
        );
        let shared = Arc::new(Shared {
            data,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            durable: AtomicU64::new(0),
            waiters: Mutex::new(Vec::new()),
            failed: OnceLock::new(),
            to_apply: Mutex::new(Applying::default()),
            apply_wake: Condvar::new(),
            applied: AtomicU64::new(0),
            applied_notify: Notify::new(),
            checkpointed: AtomicU64::new(counters.batches),
            unflushed: AtomicUsize::new(0),
            max_unflushed: max_unflushed.max(1),
            writing: Mutex::new(()),
            batches: AtomicUsize::new(0),
            changes: AtomicUsize::new(0),
            // The first segment was taken at start; the next needs a spare made unless the log
            // kept one (from the segments before the start).
            spare: Mutex::new(SpareRequest {
                wanted: !log.has_spare(),
                closing: false,
            }),
            spare_wake: Condvar::new(),
        });
        let spawn = |name: &str, run: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(run)
                .map_err(|e| StoreError::Internal(format!("cannot start thread {name}: {e}")))
        };
        let writer = spawn("quotad-group-commit", {
            let shared = shared.clone();
            Box::new(move || shared.write_loop(log))
        })?;
        let applier = spawn("quotad-applier", {
            let shared = shared.clone();
            Box::new(move || shared.apply_loop(counters))
        })?;
        let spares = spawn("quotad-log-spares", {
            let shared = shared.clone();
            Box::new(move || shared.spare_loop(&log_dir, segment_bytes))
        })?;
        Ok(GroupCommit {
            shared,
            threads: Mutex::new(vec![writer, applier, spares]),
            write_timeout,
        })
    }

    pub fn data(&self) -> &DataDir {
        &self.shared.data
    }

    /// Whether a new decision may be made now: refused once the writer failed or when too
    /// much is waiting to be written. Called before deciding, so a refusal changes nothing.
    pub fn admit(&self) -> Result<(), StoreError> {
        if let Some(reason) = self.shared.failed.get() {
            return Err(StoreError::Unavailable(reason.clone()));
        }
        if self.shared.unflushed.load(Ordering::Relaxed) >= self.shared.max_unflushed {
            return Err(StoreError::Unavailable(format!(
                "the data dir is behind: {} changes are waiting to be written",
                self.shared.max_unflushed
            )));
        }
        Ok(())
    }

    /// Queues a change; returns its number, to wait on with [`durable`](Self::durable). The
    /// caller holds the account's lock, so one account's changes queue in decision order.
    pub fn submit(&self, change: Change) -> u64 {
        self.shared.unflushed.fetch_add(1, Ordering::Relaxed);
        let mut queue = self.shared.lock_queue();
        queue.last += 1;
        queue.changes.push(change);
        let number = queue.last;
        let waiting = std::mem::take(&mut queue.writer_waiting);
        drop(queue);
        if waiting {
            self.shared.wake.notify_one();
        }
        number
    }

    /// The number of the last change on disk.
    pub fn durable_number(&self) -> u64 {
        self.shared.durable.load(Ordering::Acquire)
    }

    /// Waits until change `number` (and so every change queued before it) is on disk.
    pub async fn durable(&self, number: u64) -> Result<(), StoreError> {
        let shared = &self.shared;
        if shared.durable.load(Ordering::Acquire) >= number {
            return Ok(());
        }
        let (wake, woken) = oneshot::channel();
        {
            let mut waiters = shared.lock_waiters();
            // Checked again under the lock the writer publishes under, so that a batch that
            // landed since is not waited for.
            if shared.durable.load(Ordering::Acquire) >= number {
                return Ok(());
            }
            if shared.failed.get().is_none() {
                waiters.push((number, wake));
            }
        }
        match tokio::time::timeout(self.write_timeout, woken).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(StoreError::Unavailable(
                shared
                    .failed
                    .get()
                    .cloned()
                    .unwrap_or_else(|| "the data dir writer stopped".into()),
            )),
            Err(_) => Err(StoreError::Unavailable(format!(
                "the data dir did not confirm the write within {} ms",
                self.write_timeout.as_millis()
            ))),
        }
    }

    /// The number of the last change applied to the database.
    pub fn applied_number(&self) -> u64 {
        self.shared.applied.load(Ordering::Acquire)
    }

    /// Waits until the database holds change `number` (and every change before it): a read
    /// of the database then sees everything acknowledged up to it.
    pub async fn applied(&self, number: u64) -> Result<(), StoreError> {
        let shared = &self.shared;
        let deadline = tokio::time::Instant::now() + self.write_timeout;
        loop {
            let notified = shared.applied_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if shared.applied.load(Ordering::Acquire) >= number {
                return Ok(());
            }
            if let Some(reason) = shared.failed.get() {
                return Err(StoreError::Unavailable(reason.clone()));
            }
            shared.lock_applying().urgent = true;
            shared.apply_wake.notify_one();
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(StoreError::Unavailable(format!(
                    "the data dir did not apply the write within {} ms",
                    self.write_timeout.as_millis()
                )));
            }
        }
    }

    /// Why the writer stopped, if it failed.
    pub fn failure(&self) -> Option<&str> {
        self.shared.failed.get().map(String::as_str)
    }

    /// Batches written and the changes they held, since start.
    pub fn written(&self) -> (usize, usize) {
        (
            self.shared.batches.load(Ordering::Relaxed),
            self.shared.changes.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
impl GroupCommit {
    /// Keeps the writer from writing while the guard lives: a disk that stopped answering.
    pub(super) fn stall(&self) -> std::sync::MutexGuard<'_, ()> {
        self.shared.writing.lock().unwrap()
    }

    /// Changes queued or being written.
    pub(super) fn unflushed(&self) -> usize {
        self.shared.unflushed.load(Ordering::Relaxed)
    }
}

impl Drop for GroupCommit {
    /// Writes and applies what is queued, checkpoints the database, and stops its threads.
    fn drop(&mut self) {
        self.shared.lock_queue().closing = true;
        self.shared.wake.notify_one();
        let mut threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        // Started writer, applier, spares: the spares stop once the other two have, as no
        // segment is wanted any more.
        let spares = threads.pop();
        for thread in threads {
            let _ = thread.join();
        }
        self.shared.lock_spare().closing = true;
        self.shared.spare_wake.notify_one();
        if let Some(spares) = spares {
            let _ = spares.join();
        }
    }
}

impl Shared {
    fn lock_spare(&self) -> std::sync::MutexGuard<'_, SpareRequest> {
        self.spare.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the log's next segment whenever the applier asks. A thread of its own, because
    /// writing a segment of zeros takes a while (it is written in synced chunks, so as not to
    /// hold the disk): on the writer it would hold every call, on the applier every read.
    fn spare_loop(&self, log_dir: &std::path::Path, segment_bytes: u64) {
        yield_to_calls();
        loop {
            {
                let mut spare = self.lock_spare();
                while !spare.wanted && !spare.closing {
                    spare = self
                        .spare_wake
                        .wait(spare)
                        .unwrap_or_else(|e| e.into_inner());
                }
                if spare.closing {
                    return;
                }
                spare.wanted = false;
            }
            if let Err(err) = commit_log::make_spare(log_dir, segment_bytes) {
                // The writer makes one itself when it needs it.
                tracing::warn!(error = %err, "could not ready a spare commit log segment");
            }
        }
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Pushes and swaps only: a panicking holder leaves the queue consistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_waiters(&self) -> std::sync::MutexGuard<'_, Vec<(u64, oneshot::Sender<()>)>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes changes up to `last` durable, and wakes the calls that waited for them.
    fn publish(&self, last: u64) {
        let ready = {
            let mut waiters = self.lock_waiters();
            self.durable.store(last, Ordering::Release);
            let (ready, waiting) = std::mem::take(&mut *waiters)
                .into_iter()
                .partition::<Vec<_>, _>(|(number, _)| *number <= last);
            *waiters = waiting;
            ready
        };
        for (_, wake) in ready {
            let _ = wake.send(());
        }
    }

    fn lock_applying(&self) -> std::sync::MutexGuard<'_, Applying> {
        self.to_apply.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, what: &str, err: impl std::fmt::Display) {
        let reason = format!(
            "{what} failed ({err}); quotad stopped deciding, and a restart recovers what was \
             acknowledged"
        );
        tracing::error!(path = %self.data.path().display(), "{reason}");
        let _ = self.failed.set(reason);
        // Dropped, the waiters' channels tell them to look at the failure.
        drop(std::mem::take(&mut *self.lock_waiters()));
        self.applied_notify.notify_waiters();
    }

    fn write_loop(&self, mut log: CommitLog) {
        let mut checkpointed = self.checkpointed.load(Ordering::Acquire);
        // Whether the last batch held several changes: then calls are arriving together.
        let mut gather = false;
        loop {
            let (changes, last) = {
                if gather {
                    std::thread::sleep(GATHER);
                }
                let mut queue = self.lock_queue();
                while queue.changes.is_empty() && !queue.closing {
                    queue.writer_waiting = true;
                    queue = self.wake.wait(queue).unwrap_or_else(|e| e.into_inner());
                }
                queue.writer_waiting = false;
                if queue.changes.is_empty() {
                    break;
                }
                (std::mem::take(&mut queue.changes), queue.last)
            };
            let count = changes.len();
            gather = count >= 2;
            let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
            if self.failed.get().is_some() {
                self.unflushed.fetch_sub(count, Ordering::Relaxed);
                continue;
            }
            let now_checkpointed = self.checkpointed.load(Ordering::Acquire);
            if now_checkpointed != checkpointed {
                checkpointed = now_checkpointed;
                if let Err(err) = log.checkpointed(checkpointed) {
                    self.fail("dropping checkpointed commit log segments", err);
                }
            }
            let batch = log.next_batch();
            let segments = log.segments();
            if let Err(err) = log.append(batch, &encode_changes(&changes)) {
                self.fail("writing to the commit log", err);
                self.unflushed.fetch_sub(count, Ordering::Relaxed);
                continue;
            }
            self.batches.fetch_add(1, Ordering::Relaxed);
            self.changes.fetch_add(count, Ordering::Relaxed);
            self.publish(last);
            let mut applying = self.lock_applying();
            applying.batches.push((batch, last, changes));
            let mut wake = std::mem::take(&mut applying.applier_idle);
            // Half the bound waiting: apply now rather than refuse calls for a pause.
            if self.unflushed.load(Ordering::Relaxed) * 2 >= self.max_unflushed && !applying.urgent
            {
                applying.urgent = true;
                wake = true;
            }
            // A new segment: the applier checkpoints, so that the segments before it can go
            // (the log holds about two segments, and a start replays at most that), the first
            // of them becoming the next spare.
            let took = log.segments() > segments;
            if took {
                applying.checkpoint = true;
                wake = true;
            }
            drop(applying);
            // The segments before it still wait for a checkpoint (the applier is behind): the
            // spare thread makes one of zeros, so that the next change of segment does not
            // write one on this thread.
            if took && log.segments() > 2 && !log.has_spare() {
                self.lock_spare().wanted = true;
                self.spare_wake.notify_one();
            }
            if wake {
                self.apply_wake.notify_one();
            }
        }
        self.lock_applying().closing = true;
        self.apply_wake.notify_one();
    }

    fn apply_loop(&self, mut counters: Counters) {
        yield_to_calls();
        let mut last_checkpoint = std::time::Instant::now();
        loop {
            let (batches, checkpoint, closing) = {
                let mut applying = self.lock_applying();
                let mut deadline = None;
                while !(applying.checkpoint || applying.closing || applying.urgent) {
                    if applying.batches.is_empty() {
                        applying.applier_idle = true;
                        applying = self
                            .apply_wake
                            .wait(applying)
                            .unwrap_or_else(|e| e.into_inner());
                        continue;
                    }
                    let now = std::time::Instant::now();
                    let until = *deadline.get_or_insert(now + APPLY_PAUSE);
                    if now >= until {
                        break;
                    }
                    applying = self
                        .apply_wake
                        .wait_timeout(applying, until - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                applying.applier_idle = false;
                applying.urgent = false;
                let checkpoint = std::mem::take(&mut applying.checkpoint);
                (
                    std::mem::take(&mut applying.batches),
                    checkpoint,
                    applying.closing,
                )
            };
            let count: usize = batches.iter().map(|(_, _, changes)| changes.len()).sum();
            if let Some(&(last_batch, last_change, _)) = batches.last()
                && self.failed.get().is_none()
            {
                let changes: Vec<Change> = batches
                    .into_iter()
                    .flat_map(|(_, _, changes)| changes)
                    .collect();
                let before = counters;
                match self.data.write(&changes, &mut counters, last_batch) {
                    Ok(()) => {
                        self.applied.store(last_change, Ordering::Release);
                        self.applied_notify.notify_waiters();
                    }
                    Err(err) => {
                        counters = before;
                        self.fail("applying the commit log to the database", err);
                    }
                }
            }
            self.unflushed.fetch_sub(count, Ordering::Relaxed);
            // Also every CHECKPOINT_EVERY: each sync then has little to write, where one sync per
            // segment would flush seconds of database writes at once and hold the disk (and the
            // log's writes behind it) for as long.
            let due = count > 0 && last_checkpoint.elapsed() >= CHECKPOINT_EVERY;
            if (checkpoint || closing || due) && self.failed.get().is_none() {
                last_checkpoint = std::time::Instant::now();
                match self.data.checkpoint() {
                    Ok(()) => self.checkpointed.store(counters.batches, Ordering::Release),
                    Err(err) => self.fail("checkpointing the database", err),
                }
            }
            if closing && self.lock_applying().batches.is_empty() {
                return;
            }
        }
    }
}
