//! Group commit: decisions are made in memory, and what they changed is written to the data
//! dir by one writer thread, many decisions to a batch, one sync per batch. A call is answered
//! only once the batch holding its change is on disk, so an acknowledged decision survives a
//! crash.
//!
//! Batching adapts to load with no timer: the writer takes everything queued, writes it, and
//! while that write is syncing the next calls queue up for the next batch. When idle a batch is
//! one change and nothing waits; under load a batch holds whatever arrived during the last
//! sync. Changes are numbered as they are queued (under the queue's lock, so in queue order);
//! the writer publishes the number of the last change made durable, and a caller waits for its
//! own number. Each waiter is woken once, when its number is on disk: a batch wakes the
//! calls it holds, not every call waiting.
//!
//! What is queued and not yet durable is bounded (`max_unflushed`): past it a call is refused
//! with UNAVAILABLE *before* it decides anything, and a caller waits at most `write_timeout`
//! for its batch. A failed write is fatal to the engine, as an `fsync` failure is to a
//! database (the kernel may have dropped the dirty pages, so memory and disk can no longer be
//! told apart): every later call is UNAVAILABLE until quotad is restarted and recovers from the
//! data dir, and health reports the store down so that Kubernetes restarts the pod.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

use super::StoreError;
use super::data_dir::{Change, Counters, DataDir};

#[derive(Debug)]
pub struct GroupCommit {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
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
    /// Changes queued or being written.
    unflushed: AtomicUsize,
    max_unflushed: usize,
    /// Held by the writer while it writes a batch (tests hold it to stand for a disk that
    /// stops answering).
    writing: Mutex<()>,
    /// Batches written and changes in them, since start.
    batches: AtomicUsize,
    changes: AtomicUsize,
}

#[derive(Debug, Default)]
struct Queue {
    /// The number of the last change queued.
    last: u64,
    changes: Vec<Change>,
    closing: bool,
}

impl GroupCommit {
    /// Starts the writer thread for `data`, continuing from the counters it holds.
    pub fn start(
        data: Arc<DataDir>,
        max_unflushed: usize,
        write_timeout: Duration,
    ) -> Result<GroupCommit, StoreError> {
        let counters = data.counters()?;
        let shared = Arc::new(Shared {
            data,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            durable: AtomicU64::new(0),
            waiters: Mutex::new(Vec::new()),
            failed: OnceLock::new(),
            unflushed: AtomicUsize::new(0),
            max_unflushed: max_unflushed.max(1),
            writing: Mutex::new(()),
            batches: AtomicUsize::new(0),
            changes: AtomicUsize::new(0),
        });
        let writer = std::thread::Builder::new()
            .name("quotad-group-commit".into())
            .spawn({
                let shared = shared.clone();
                move || shared.write_loop(counters)
            })
            .map_err(|e| StoreError::Internal(format!("cannot start the writer thread: {e}")))?;
        Ok(GroupCommit {
            shared,
            writer: Mutex::new(Some(writer)),
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
        drop(queue);
        self.shared.wake.notify_one();
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
    /// Writes what is queued and stops the writer.
    fn drop(&mut self) {
        self.shared.lock_queue().closing = true;
        self.shared.wake.notify_one();
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(writer) = writer {
            let _ = writer.join();
        }
    }
}

impl Shared {
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

    fn write_loop(&self, mut counters: Counters) {
        loop {
            let (changes, last) = {
                let mut queue = self.lock_queue();
                while queue.changes.is_empty() && !queue.closing {
                    queue = self.wake.wait(queue).unwrap_or_else(|e| e.into_inner());
                }
                if queue.changes.is_empty() {
                    return;
                }
                (std::mem::take(&mut queue.changes), queue.last)
            };
            let count = changes.len();
            let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
            if self.failed.get().is_none() {
                let before = counters;
                if let Err(err) = self.data.write(&changes, &mut counters) {
                    counters = before;
                    let reason = format!(
                        "writing to the data dir failed ({err}); quotad stopped deciding, and \
                         a restart recovers what was acknowledged"
                    );
                    tracing::error!(path = %self.data.path().display(), "{reason}");
                    let _ = self.failed.set(reason);
                } else {
                    self.batches.fetch_add(1, Ordering::Relaxed);
                    self.changes.fetch_add(count, Ordering::Relaxed);
                    self.publish(last);
                }
            }
            self.unflushed.fetch_sub(count, Ordering::Relaxed);
            if self.failed.get().is_some() {
                // Dropped, the waiters' channels tell them to look at the failure.
                drop(std::mem::take(&mut *self.lock_waiters()));
            }
        }
    }
}
