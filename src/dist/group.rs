//! A c10d process group (ProcessGroupGloo on CPU, ProcessGroupNCCL on CUDA) over the
//! C++ shim in `shim.cpp`, with a heartbeat monitor that names a dead or hung rank
//! (docs/distributed.md#faults).
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tch::Tensor;
use thiserror::Error;

use super::env::Rendezvous;

extern "C" {
    fn mos_dist_free_string(s: *mut c_char);
    fn mos_store_new(
        host: *const c_char,
        port: i32,
        is_server: i32,
        num_workers: i32,
        timeout_ms: i64,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn mos_store_add(
        store: *mut c_void,
        key: *const c_char,
        delta: i64,
        err: *mut *mut c_char,
    ) -> i64;
    fn mos_store_set(
        store: *mut c_void,
        key: *const c_char,
        data: *const u8,
        len: i64,
        err: *mut *mut c_char,
    ) -> i32;
    fn mos_store_get(
        store: *mut c_void,
        key: *const c_char,
        out: *mut *mut u8,
        err: *mut *mut c_char,
    ) -> i64;
    fn mos_store_delete(store: *mut c_void, key: *const c_char, err: *mut *mut c_char) -> i32;
    fn mos_store_free(store: *mut c_void);
    fn mos_pg_new_gloo(
        store: *mut c_void,
        rank: i32,
        size: i32,
        timeout_ms: i64,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn mos_pg_new_nccl(
        store: *mut c_void,
        rank: i32,
        size: i32,
        device: i32,
        timeout_ms: i64,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn mos_pg_allreduce_sum(pg: *mut c_void, tensor: *mut c_void, err: *mut *mut c_char) -> i32;
    fn mos_pg_broadcast(
        pg: *mut c_void,
        tensor: *mut c_void,
        root: i32,
        err: *mut *mut c_char,
    ) -> i32;
    fn mos_pg_barrier(pg: *mut c_void, err: *mut *mut c_char) -> i32;
    fn mos_pg_free(pg: *mut c_void);
}

/// An error of the distributed runtime.
#[derive(Debug, Error)]
pub enum DistError {
    #[error("{0}")]
    C10d(String),
    #[error("{0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, DistError>;

/// The shim's error message, without the C++ stack trace that a c10 error's text
/// carries when it is wrapped into another error's message.
fn take_error(err: *mut c_char) -> String {
    if err.is_null() {
        return "unknown c10d error".into();
    }
    // SAFETY: the shim returns a NUL-terminated malloc'ed string or NULL.
    let s = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .trim()
        .to_string();
    // SAFETY: allocated by the shim with strdup.
    unsafe { mos_dist_free_string(err) };
    crate::runtime::clean_torch_message(&s)
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| DistError::Invalid(format!("{s:?} holds a NUL byte")))
}

/// A c10d TCPStore (the server on rank 0, a client elsewhere).
struct Store(*mut c_void);

// SAFETY: a TCPStore client serialises its operations internally; each thread of mos
// uses its own Store object anyway (the monitor opens its own connection).
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Store {
    fn new(
        host: &str,
        port: u16,
        server: bool,
        workers: Option<usize>,
        timeout: Duration,
    ) -> Result<Self> {
        let h = cstring(host)?;
        let mut err = std::ptr::null_mut();
        // SAFETY: valid C string and out-pointer; the shim catches C++ exceptions.
        let p = unsafe {
            mos_store_new(
                h.as_ptr(),
                i32::from(port),
                i32::from(server),
                workers.map_or(-1, |w| w as i32),
                timeout.as_millis() as i64,
                &mut err,
            )
        };
        if p.is_null() {
            return Err(DistError::C10d(format!(
                "rendezvous store {host}:{port}: {}",
                take_error(err)
            )));
        }
        Ok(Store(p))
    }

    fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let k = cstring(key)?;
        let mut err = std::ptr::null_mut();
        // SAFETY: live store handle, valid C string.
        let v = unsafe { mos_store_add(self.0, k.as_ptr(), delta, &mut err) };
        if !err.is_null() {
            return Err(DistError::C10d(take_error(err)));
        }
        Ok(v)
    }

    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let k = cstring(key)?;
        let mut err = std::ptr::null_mut();
        // SAFETY: live store handle, valid C string, `value` readable for its length.
        let rc = unsafe {
            mos_store_set(
                self.0,
                k.as_ptr(),
                value.as_ptr(),
                value.len() as i64,
                &mut err,
            )
        };
        if rc != 0 {
            return Err(DistError::C10d(take_error(err)));
        }
        Ok(())
    }

    /// The value of `key`, waiting for it up to the store's timeout.
    fn get(&self, key: &str) -> Result<Vec<u8>> {
        let k = cstring(key)?;
        let (mut out, mut err) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: live store handle, valid C string and out-pointers.
        let len = unsafe { mos_store_get(self.0, k.as_ptr(), &mut out, &mut err) };
        if len < 0 || out.is_null() {
            return Err(DistError::C10d(take_error(err)));
        }
        // SAFETY: the shim malloc'ed `len` (+1) bytes at `out`; copied, then freed once.
        let v = unsafe { std::slice::from_raw_parts(out, len as usize) }.to_vec();
        unsafe { mos_dist_free_string(out.cast()) };
        Ok(v)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let k = cstring(key)?;
        let mut err = std::ptr::null_mut();
        // SAFETY: live store handle, valid C string.
        if unsafe { mos_store_delete(self.0, k.as_ptr(), &mut err) } != 0 {
            return Err(DistError::C10d(take_error(err)));
        }
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: handle from mos_store_new, freed once.
        unsafe { mos_store_free(self.0) }
    }
}

/// The collective backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    /// NCCL on the given CUDA device.
    Nccl(usize),
}

/// Timing of the fault detection.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// A rank whose heartbeat has not advanced for this long is declared lost.
    pub heartbeat: Duration,
    /// Waiting for all ranks to join the store at the start.
    pub startup: Duration,
    /// c10d's own per-collective timeout (a last resort; the heartbeat is faster).
    pub collective: Duration,
}

impl Timeouts {
    pub fn with_heartbeat(secs: f64) -> Self {
        Timeouts {
            heartbeat: Duration::from_secs_f64(secs),
            startup: Duration::from_secs(600),
            collective: Duration::from_secs(1800),
        }
    }
}

const HEARTBEAT_PERIOD: Duration = Duration::from_millis(500);

struct Shared {
    stop: AtomicBool,
    /// Why a peer is considered lost (set by the monitor).
    verdict: Mutex<Option<String>>,
}

/// Heartbeats through the store: each rank bumps `mos/hb/<rank>` every 0.5 s and
/// watches the others' counters; one that stops advancing for `heartbeat` (dead:
/// nothing bumps it; hung: a stopped process bumps nothing either) is named, and
/// this process exits with an error shortly after, unless the main thread reports
/// the failure first.
struct Monitor {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl Monitor {
    fn start(rv: &Rendezvous, timeouts: Timeouts) -> Result<Self> {
        let store = Store::new(
            &rv.master_addr,
            rv.master_port,
            false,
            None,
            timeouts.heartbeat,
        )?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            verdict: Mutex::new(None),
        });
        let (rank, world) = (rv.rank, rv.world_size);
        let where_ = format!("{}:{}", rv.master_addr, rv.master_port);
        let sh = shared.clone();
        let handle = std::thread::Builder::new()
            .name("mos-heartbeat".into())
            .spawn(move || {
                let mut last: Vec<(i64, Instant)> = vec![(-1, Instant::now()); world];
                let fail = |msg: String| {
                    *sh.verdict.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg.clone());
                    // Leave the main thread time to report it with its own context.
                    std::thread::sleep(Duration::from_secs(3));
                    if !sh.stop.load(Ordering::SeqCst) {
                        eprintln!("Error: {msg} (rank {rank} stops)");
                        std::process::exit(1);
                    }
                };
                while !sh.stop.load(Ordering::SeqCst) {
                    let beat = (|| -> Result<Option<String>> {
                        store.add(&format!("mos/hb/{rank}"), 1)?;
                        for (r, slot) in last.iter_mut().enumerate() {
                            if r == rank || store.add(&format!("mos/done/{r}"), 0)? > 0 {
                                continue;
                            }
                            let v = store.add(&format!("mos/hb/{r}"), 0)?;
                            if v != slot.0 {
                                *slot = (v, Instant::now());
                            } else if slot.1.elapsed() > timeouts.heartbeat {
                                return Ok(Some(format!(
                                    "rank {r} stopped responding: no heartbeat for {:.0} s (it died or hangs)",
                                    timeouts.heartbeat.as_secs_f64()
                                )));
                            }
                        }
                        Ok(None)
                    })();
                    match beat {
                        Ok(None) => {}
                        Ok(Some(msg)) => return fail(msg),
                        Err(_) if sh.stop.load(Ordering::SeqCst) => return,
                        Err(e) => {
                            return fail(format!(
                                "lost the rendezvous store {where_} that rank 0 serves: rank 0 died or is unreachable ({e})"
                            ))
                        }
                    }
                    std::thread::sleep(HEARTBEAT_PERIOD);
                }
            })
            .map_err(|e| DistError::Invalid(format!("cannot start the heartbeat thread: {e}")))?;
        Ok(Monitor {
            shared,
            handle: Some(handle),
        })
    }

    /// The monitor's verdict, waiting up to `wait` for one.
    fn verdict(&self, wait: Duration) -> Option<String> {
        let t0 = Instant::now();
        loop {
            if let Some(v) = self
                .shared
                .verdict
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                return Some(v);
            }
            if t0.elapsed() > wait || self.handle.as_ref().is_none_or(|h| h.is_finished()) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A process group of `world_size` ranks.
pub struct ProcessGroup {
    pg: *mut c_void,
    monitor: Monitor,
    store: Store,
    pub rank: usize,
    pub world_size: usize,
    pub backend: Backend,
    timeouts: Timeouts,
    finished: bool,
}

impl ProcessGroup {
    /// Joins the rendezvous (rank 0 serves the TCP store) and creates the backend.
    pub fn new(rv: &Rendezvous, backend: Backend, timeouts: Timeouts) -> Result<Self> {
        let store = Store::new(
            &rv.master_addr,
            rv.master_port,
            rv.rank == 0,
            Some(rv.world_size),
            timeouts.startup,
        )?;
        let mut err = std::ptr::null_mut();
        let ms = timeouts.collective.as_millis() as i64;
        let (rank, size) = (rv.rank as i32, rv.world_size as i32);
        // SAFETY: live store handle; the shim catches C++ exceptions.
        let pg = unsafe {
            match backend {
                Backend::Gloo => mos_pg_new_gloo(store.0, rank, size, ms, &mut err),
                Backend::Nccl(dev) => {
                    mos_pg_new_nccl(store.0, rank, size, dev as i32, ms, &mut err)
                }
            }
        };
        if pg.is_null() {
            return Err(DistError::C10d(format!(
                "cannot create the {backend:?} process group (rank {} of {}): {}",
                rv.rank,
                rv.world_size,
                take_error(err)
            )));
        }
        let monitor = match Monitor::start(rv, timeouts) {
            Ok(m) => m,
            Err(e) => {
                // SAFETY: freed once, here.
                unsafe { mos_pg_free(pg) };
                return Err(e);
            }
        };
        Ok(ProcessGroup {
            pg,
            monitor,
            store,
            rank: rv.rank,
            world_size: rv.world_size,
            backend,
            timeouts,
            finished: false,
        })
    }

    /// Turns a collective's failure into an error that names the lost rank when the
    /// heartbeat finds one.
    fn failed(&self, what: &str, err: *mut c_char) -> DistError {
        let e = take_error(err);
        let wait = self.timeouts.heartbeat + Duration::from_secs(2);
        match self.monitor.verdict(wait) {
            Some(v) => DistError::C10d(format!("{v}; {what} failed on rank {}: {e}", self.rank)),
            None => DistError::C10d(format!("{what} failed on rank {}: {e}", self.rank)),
        }
    }

    /// Sums `t` over the ranks, in place.
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        let mut err = std::ptr::null_mut();
        // SAFETY: `t` is a live at::Tensor; the shim only reads the pointer during the call.
        let rc = unsafe { mos_pg_allreduce_sum(self.pg, t.as_ptr() as *mut c_void, &mut err) };
        if rc != 0 {
            return Err(self.failed("all-reduce", err));
        }
        Ok(())
    }

    /// Copies `t` of rank `root` to every rank, in place.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        let mut err = std::ptr::null_mut();
        // SAFETY: as all_reduce_sum.
        let rc =
            unsafe { mos_pg_broadcast(self.pg, t.as_ptr() as *mut c_void, root as i32, &mut err) };
        if rc != 0 {
            return Err(self.failed("broadcast", err));
        }
        Ok(())
    }

    pub fn barrier(&self) -> Result<()> {
        let mut err = std::ptr::null_mut();
        // SAFETY: live handle.
        if unsafe { mos_pg_barrier(self.pg, &mut err) } != 0 {
            return Err(self.failed("barrier", err));
        }
        Ok(())
    }

    /// Hands rank 0 the bytes of the other ranks that have any, through the
    /// rendezvous store (c10d's TCPStore). `has[r]` says whether rank `r` sends; all
    /// ranks must agree on it (e.g. from an all-reduce of counts) and on `tag`, which
    /// must be new for each call. Rank 0 gets `(rank, bytes)` in rank order, the others
    /// an empty list. Rank 0 waits for each key; a rank lost before sending is caught
    /// by the heartbeat.
    pub fn gather_to_root(
        &self,
        tag: &str,
        has: &[bool],
        mine: &[u8],
    ) -> Result<Vec<(usize, Vec<u8>)>> {
        let key = |r: usize| format!("mos/gather/{tag}/{r}");
        if self.rank != 0 {
            if has.get(self.rank).copied().unwrap_or(false) {
                self.store.set(&key(self.rank), mine)?;
            }
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for (r, _) in has.iter().enumerate().skip(1).filter(|(_, h)| **h) {
            let k = key(r);
            let v = self.store.get(&k).map_err(|e| {
                DistError::C10d(format!("getting rank {r}'s {tag} from the store: {e}"))
            })?;
            self.store.delete(&k)?;
            out.push((r, v));
        }
        Ok(out)
    }

    /// Leaves the group cleanly: marks this rank done (so the others stop watching
    /// it), waits for all, stops the heartbeat, and on rank 0 keeps the store up until
    /// every other rank has let go of it.
    pub fn finish(mut self) -> Result<()> {
        self.store.add(&format!("mos/done/{}", self.rank), 1)?;
        self.barrier()?;
        self.monitor.stop();
        if self.rank == 0 {
            let t0 = Instant::now();
            while self.store.add("mos/left", 0)? < self.world_size as i64 - 1
                && t0.elapsed() < self.timeouts.heartbeat
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        } else {
            self.store.add("mos/left", 1)?;
        }
        self.finished = true;
        Ok(())
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.monitor.stop();
        // After a failure the backend may still hold a broken collective whose
        // threads would block its destructor; the process is about to end, so it is
        // left to the exit.
        if self.finished {
            // SAFETY: handle from mos_pg_new_*, freed once.
            unsafe { mos_pg_free(self.pg) }
        }
    }
}
