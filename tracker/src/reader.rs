//! Drains the kernel's fanotify queue as fast as it fills.
//!
//! The kernel queue is small (16384 events by default) and a full queue loses
//! events, which costs a rescan of the whole upper dir. Classifying and writing
//! changes is much slower than reading them, so a dedicated thread only reads: it
//! decodes each buffer once and moves it into a bounded backlog in memory, together
//! with the command line of each writer read right away (short-lived writers are gone
//! a few ms later). The
//! watcher takes what is backlogged (up to `MAX_BATCH`) at once, so the busier the
//! writers, the larger (and cheaper per event) its batches.

use crate::execs::ExecCache;
use crate::fid;
use crate::sys::{self, FanotifyGroup};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// One `read(2)` worth of records, decoded.
pub(crate) struct Chunk {
    pub bytes: Vec<u8>,
    /// The events of `bytes`, in order (view each with `EventSpans::view(&bytes)`).
    pub events: Vec<fid::EventSpans>,
    /// Set when a record could not be decoded: the events after it are lost.
    pub undecodable: Option<fid::ParseError>,
    /// Command lines of the writers in `bytes`, by pid.
    pub commands: HashMap<i32, Vec<u8>>,
}

impl Chunk {
    /// Decodes `bytes` (one read of a fanotify group) and reads the command line of
    /// each writer, reusing those `commands` knows.
    fn decode(bytes: Vec<u8>, commands_known: &mut Commands) -> Chunk {
        let now = Instant::now();
        let Commands { known, execs } = commands_known;
        // An exec since a command line was read may have changed it.
        let execs_seen = execs.as_deref().map(ExecCache::execs_seen);
        known.retain(|_, (_, at, seen)| {
            now.duration_since(*at) < COMMAND_TTL && *seen == execs_seen
        });
        let mut events = Vec::new();
        let mut undecodable = None;
        let mut commands = HashMap::new();
        for event in fid::events(&bytes) {
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    undecodable = Some(e);
                    break;
                }
            };
            if event.pid > 0 && !commands.contains_key(&event.pid) {
                let (command, _, _) = known.entry(event.pid).or_insert_with(|| {
                    (
                        command_of(event.pid as u32, execs.as_deref()),
                        now,
                        execs_seen,
                    )
                });
                commands.insert(event.pid, command.clone());
            }
            events.push(fid::EventSpans::of(&event, &bytes));
        }
        Chunk {
            bytes,
            events,
            undecodable,
            commands,
        }
    }
}

/// Read buffer; the kernel needs room for at least one whole event per read.
const READ_BUF: usize = 256 * 1024;
/// Past this much unprocessed data the reader stops reading and lets the kernel
/// queue absorb (and, at worst, overflow): memory stays bounded.
const MAX_BACKLOG: usize = 64 * 1024 * 1024;

/// Largest batch handed to the watcher (about 40k events): bounds the memory a
/// batch's bookkeeping takes and keeps sync answers prompt under load.
const MAX_BATCH: usize = 4 * 1024 * 1024;

#[derive(Default)]
struct State {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    /// Why the reader stopped, if it did on an error.
    failed: Option<String>,
}

#[derive(Default)]
pub(crate) struct Backlog {
    state: Mutex<State>,
    filled: Condvar,
    drained: Condvar,
}

impl Backlog {
    fn push(&self, chunk: Chunk, stop: &AtomicBool) {
        let Ok(mut s) = self.state.lock() else { return };
        while s.bytes >= MAX_BACKLOG && !stop.load(Ordering::SeqCst) {
            s = match self.drained.wait_timeout(s, Duration::from_millis(100)) {
                Ok((s, _)) => s,
                Err(_) => return,
            };
        }
        s.bytes += chunk.bytes.len();
        s.chunks.push_back(chunk);
        self.filled.notify_one();
    }

    fn fail(&self, why: String) {
        if let Ok(mut s) = self.state.lock() {
            s.failed = Some(why);
        }
        self.filled.notify_all();
    }

    /// What is backlogged, up to `MAX_BATCH` bytes, waiting up to `timeout` for
    /// something to arrive.
    pub fn take_batch(&self, timeout: Duration) -> Result<Vec<Chunk>, String> {
        let Ok(mut s) = self.state.lock() else {
            return Err("the event reader panicked".into());
        };
        if s.chunks.is_empty() && s.failed.is_none() {
            s = match self.filled.wait_timeout(s, timeout) {
                Ok((s, _)) => s,
                Err(_) => return Err("the event reader panicked".into()),
            };
        }
        if let Some(why) = &s.failed
            && s.chunks.is_empty()
        {
            return Err(why.clone());
        }
        let mut taken = Vec::new();
        let mut bytes = 0;
        while let Some(chunk) = s.chunks.pop_front() {
            bytes += chunk.bytes.len();
            taken.push(chunk);
            if bytes >= MAX_BATCH {
                break;
            }
        }
        s.bytes -= bytes;
        self.drained.notify_all();
        Ok(taken)
    }
}

/// Pause between drains of a busy kernel queue; far below what fills it (16384
/// events).
const READ_PAUSE: Duration = Duration::from_millis(3);
/// Events again within this long of the last ones mean writers are busy.
const BUSY_GAP: Duration = Duration::from_millis(20);

/// How long a writer's command line read from /proc is reused for its next events.
const COMMAND_TTL: Duration = Duration::from_millis(200);

/// Writers' command lines: those read lately, and the exec cache when there is one.
struct Commands {
    /// By pid: the command line, when it was read, and the exec cache's count of
    /// execs then.
    known: HashMap<i32, (Vec<u8>, Instant, Option<u64>)>,
    execs: Option<Arc<ExecCache>>,
}

/// The command line of writer `pid`: from /proc while it lives (what it runs now,
/// whatever the exec cache has processed yet), else as the exec cache saw it start.
fn command_of(pid: u32, execs: Option<&ExecCache>) -> Vec<u8> {
    let now = sys::command_of(pid);
    if !now.is_empty() {
        return now;
    }
    execs.and_then(|c| c.command(pid)).unwrap_or_default()
}

/// Reads until `stop` is set or reading fails (the failure lands in the backlog).
pub(crate) fn run(
    group: FanotifyGroup,
    backlog: Arc<Backlog>,
    stop: Arc<AtomicBool>,
    execs: Option<Arc<ExecCache>>,
) {
    let mut buf = vec![0u8; READ_BUF];
    let mut known = Commands {
        known: HashMap::new(),
        execs,
    };
    let mut last_drain = Instant::now() - BUSY_GAP;
    while !stop.load(Ordering::SeqCst) {
        match group.wait(Duration::from_millis(100)) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => return backlog.fail(format!("polling fanotify: {e}")),
        }
        // Drain what is queued now, a buffer at a time; each chunk keeps only the
        // bytes read, so the backlog's memory is what it counts.
        let mut drained = 0;
        loop {
            let n = match group.read(&mut buf) {
                Ok(n) => n,
                Err(e) => return backlog.fail(format!("reading fanotify: {e}")),
            };
            if n == 0 {
                break;
            }
            drained += n;
            backlog.push(Chunk::decode(buf[..n].to_vec(), &mut known), &stop);
        }
        // While events keep coming, let them gather for a moment: the kernel merges
        // repeated events on the same file (every write(2) is one) while they wait in
        // its queue. The first events after a quiet spell (a lone change, a sync
        // cookie) are read at once.
        let now = Instant::now();
        if drained > 0 && now.duration_since(last_drain) < BUSY_GAP {
            std::thread::sleep(READ_PAUSE);
        }
        if drained > 0 {
            last_drain = now;
        }
    }
}
