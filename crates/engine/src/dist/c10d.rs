//! Safe Rust over the c10d shim (csrc/c10d_shim.cpp): libtorch's own TCPStore,
//! PrefixStore, ProcessGroupGloo and ProcessGroupNCCL, the same objects torch.distributed
//! uses. Every failure becomes a [`DistError`] naming the rank and the operation, and every
//! collective is recorded by the flight recorder ([`super::flight`]): group name, per-group
//! sequence number, operation, what it is for, bytes, start and end.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, CStr, CString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tch::Tensor;

/// Wall time this process spent inside collectives and transfers called from Rust (blocking
/// with Gloo; with NCCL only the launch, since its work runs on the stream).
static COLLECTIVE_NANOS: AtomicU64 = AtomicU64::new(0);

/// [`COLLECTIVE_NANOS`] so far: the trainer takes differences around a step to get the time a
/// rank worked (compute, data) rather than waited for the others.
pub fn time_in_collectives() -> Duration {
    Duration::from_nanos(COLLECTIVE_NANOS.load(Ordering::Relaxed))
}

#[repr(C)]
struct RawStore {
    _private: [u8; 0],
}
/// The shim's `mm_pg` (also taken by the tensor-parallel functions in [`super::tp`]).
#[repr(C)]
pub(super) struct RawPg {
    _private: [u8; 0],
}
pub(super) type RawTensor = *mut torch_sys::C_tensor;

extern "C" {
    fn mm_c10d_free_str(s: *mut c_char);
    fn mm_c10d_free_bytes(b: *mut u8);
    fn mm_c10d_has_nccl() -> c_int;
    fn mm_torch_version(major: *mut c_int, minor: *mut c_int, patch: *mut c_int);
    fn mm_store_tcp(
        host: *const c_char,
        port: u16,
        world: c_int,
        is_server: c_int,
        timeout_ms: i64,
        out: *mut *mut RawStore,
    ) -> *mut c_char;
    fn mm_store_prefix(base: *mut RawStore, prefix: *const c_char, out: *mut *mut RawStore) -> *mut c_char;
    fn mm_store_set(s: *mut RawStore, key: *const c_char, data: *const u8, len: usize) -> *mut c_char;
    fn mm_store_get(s: *mut RawStore, key: *const c_char, data: *mut *mut u8, len: *mut usize) -> *mut c_char;
    fn mm_store_free(s: *mut RawStore);
    fn mm_pg_gloo(
        s: *mut RawStore,
        rank: c_int,
        size: c_int,
        hostname: *const c_char,
        timeout_ms: i64,
        out: *mut *mut RawPg,
    ) -> *mut c_char;
    fn mm_pg_nccl(s: *mut RawStore, rank: c_int, size: c_int, timeout_ms: i64, out: *mut *mut RawPg) -> *mut c_char;
    fn mm_pg_free(pg: *mut RawPg);
    fn mm_pg_allreduce(pg: *mut RawPg, t: RawTensor, op: c_int) -> *mut c_char;
    fn mm_pg_broadcast(pg: *mut RawPg, t: RawTensor, root: c_int) -> *mut c_char;
    fn mm_pg_allgather(pg: *mut RawPg, out: RawTensor, input: RawTensor) -> *mut c_char;
    fn mm_pg_reduce_scatter(pg: *mut RawPg, out: RawTensor, input: RawTensor, op: c_int) -> *mut c_char;
    fn mm_pg_send(pg: *mut RawPg, t: RawTensor, dst: c_int, tag: c_int) -> *mut c_char;
    fn mm_pg_recv(pg: *mut RawPg, t: RawTensor, src: c_int, tag: c_int) -> *mut c_char;
    fn mm_pg_batch_p2p(
        pg: *mut RawPg,
        n: c_int,
        ts: *const RawTensor,
        peers: *const c_int,
        is_send: *const c_int,
        tag: c_int,
    ) -> *mut c_char;
    fn mm_pg_barrier(pg: *mut RawPg) -> *mut c_char;
    fn mm_tensor_set_grad(var: RawTensor, grad: RawTensor) -> *mut c_char;
}

/// A c10d failure: which rank, which operation, what libtorch said.
#[derive(Debug, thiserror::Error)]
#[error("rank {rank}: {op}: {message}")]
pub struct DistError {
    pub rank: usize,
    pub op: String,
    pub message: String,
}

impl DistError {
    /// The same error with what the operation was for, e.g. "all_reduce (gradient bucket 2 of 5)".
    pub fn during(mut self, what: impl std::fmt::Display) -> DistError {
        self.op = format!("{} ({what})", self.op);
        self
    }
}

/// Turns the shim's "NULL or malloc'd message" convention into a Result.
fn check(err: *mut c_char, rank: usize, op: impl Into<String>) -> Result<(), DistError> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: the shim returns either NULL or a NUL-terminated malloc'd string it owns no more.
    let message = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    unsafe { mm_c10d_free_str(err) };
    Err(DistError { rank, op: op.into(), message })
}

fn cstring(s: &str, rank: usize, op: &str) -> Result<CString, DistError> {
    CString::new(s).map_err(|_| DistError { rank, op: op.into(), message: format!("{s:?} contains a NUL byte") })
}

/// The libtorch version this engine was compiled against, e.g. "2.11.0".
pub fn torch_version() -> String {
    let (mut a, mut b, mut c) = (0, 0, 0);
    unsafe { mm_torch_version(&mut a, &mut b, &mut c) };
    format!("{a}.{b}.{c}")
}

/// Whether this build carries ProcessGroupNCCL.
pub fn has_nccl() -> bool {
    unsafe { mm_c10d_has_nccl() != 0 }
}

/// Makes `grad` the `.grad` of the leaf tensor `var` (tch binds no setter). The data-parallel
/// engine uses it for a parameter that received no gradient on this rank but did on another.
pub fn set_grad(var: &Tensor, grad: &Tensor) -> Result<(), String> {
    let err = unsafe { mm_tensor_set_grad(var.as_ptr() as RawTensor, grad.as_ptr() as RawTensor) };
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: as in `check`.
    let message = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    unsafe { mm_c10d_free_str(err) };
    Err(message)
}

/// A key-value store shared by all ranks (rank 0 serves it), used for rendezvous.
pub struct Store {
    raw: *mut RawStore,
    rank: usize,
}

// SAFETY: c10d stores are internally synchronised; the handle is only an owning pointer.
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Store {
    /// Connects to (rank 0: serves) the TCPStore at `host:port`, waiting up to `timeout`
    /// for all `world` ranks.
    pub fn tcp(host: &str, port: u16, rank: usize, world: usize, timeout: Duration) -> Result<Store, DistError> {
        let op = format!("rendezvous with TCPStore at {host}:{port}");
        let chost = cstring(host, rank, &op)?;
        let mut raw = std::ptr::null_mut();
        let err = unsafe {
            mm_store_tcp(
                chost.as_ptr(),
                port,
                world as c_int,
                (rank == 0) as c_int,
                timeout.as_millis() as i64,
                &mut raw,
            )
        };
        check(err, rank, op)?;
        Ok(Store { raw, rank })
    }

    /// A view of this store whose keys all start with `prefix` (one per subgroup).
    pub fn prefixed(&self, prefix: &str) -> Result<Store, DistError> {
        let c = cstring(prefix, self.rank, "prefix store")?;
        let mut raw = std::ptr::null_mut();
        check(unsafe { mm_store_prefix(self.raw, c.as_ptr(), &mut raw) }, self.rank, "prefix store")?;
        Ok(Store { raw, rank: self.rank })
    }

    /// Global rank of this process (for error messages).
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), DistError> {
        let op = format!("store set {key}");
        let c = cstring(key, self.rank, &op)?;
        check(unsafe { mm_store_set(self.raw, c.as_ptr(), value.as_ptr(), value.len()) }, self.rank, op)
    }

    /// Waits (up to the store timeout) for `key` and returns its value.
    pub fn get(&self, key: &str) -> Result<Vec<u8>, DistError> {
        let op = format!("store get {key}");
        let c = cstring(key, self.rank, &op)?;
        let mut data = std::ptr::null_mut();
        let mut len = 0usize;
        check(unsafe { mm_store_get(self.raw, c.as_ptr(), &mut data, &mut len) }, self.rank, op)?;
        // SAFETY: on success the shim malloc'd `len` bytes at `data`.
        let out = unsafe { std::slice::from_raw_parts(data, len) }.to_vec();
        unsafe { mm_c10d_free_bytes(data) };
        Ok(out)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        unsafe { mm_store_free(self.raw) }
    }
}

/// The backend a process group runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Gloo,
    Nccl,
}

impl Backend {
    /// NCCL for CUDA tensors, Gloo otherwise (as torch.distributed's default pairing).
    pub fn for_device(device: tch::Device) -> Backend {
        if device.is_cuda() {
            Backend::Nccl
        } else {
            Backend::Gloo
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum ReduceOp {
    Sum = 0,
    Max = 1,
    Min = 2,
    Product = 3,
}

/// A process group over `size` ranks; `rank` is this process's index inside the group.
pub struct ProcessGroup {
    raw: *mut RawPg,
    /// Rank inside this group.
    pub rank: usize,
    pub size: usize,
    /// Global rank, for error messages.
    global_rank: usize,
    pub backend: Backend,
    timeout: Duration,
    /// The flight recorder's name of the group, the same on every member ("world", "dp[0,2]").
    name: String,
    /// Global ranks of the members in group-rank order (0..size until [`ProcessGroup::named`]).
    ranks: Vec<usize>,
    /// Collectives entered on this group so far (the recorder's sequence numbers).
    seq: AtomicU64,
    /// Point-to-point transfers so far per (source, destination) global rank pair.
    p2p_seq: Mutex<HashMap<(usize, usize), u64>>,
}

/// Bytes of a tensor's elements (for the flight recorder).
pub(super) fn nbytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

// SAFETY: a c10d Backend may be used from any thread; we never share it concurrently
// without &mut (all collective methods take &self but c10d serialises internally).
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl ProcessGroup {
    /// Creates a group of `size` ranks on `store`. For Gloo, `bind_host` is the address
    /// this rank listens on (the one other ranks reach it at).
    pub fn new(
        store: &Store,
        backend: Backend,
        rank: usize,
        size: usize,
        bind_host: Option<&str>,
        timeout: Duration,
    ) -> Result<ProcessGroup, DistError> {
        let global_rank = store.rank;
        let mut raw = std::ptr::null_mut();
        let ms = timeout.as_millis() as i64;
        match backend {
            Backend::Gloo => {
                let op = "create Gloo process group";
                let host = cstring(bind_host.unwrap_or(""), global_rank, op)?;
                let err = unsafe { mm_pg_gloo(store.raw, rank as c_int, size as c_int, host.as_ptr(), ms, &mut raw) };
                check(err, global_rank, op)?;
            }
            Backend::Nccl => {
                let err = unsafe { mm_pg_nccl(store.raw, rank as c_int, size as c_int, ms, &mut raw) };
                check(err, global_rank, "create NCCL process group")?;
            }
        }
        Ok(ProcessGroup {
            raw,
            rank,
            size,
            global_rank,
            backend,
            timeout,
            name: "world".into(),
            ranks: (0..size).collect(),
            seq: AtomicU64::new(0),
            p2p_seq: Mutex::new(HashMap::new()),
        })
    }

    /// Names the group for the flight recorder (see [`super::flight::group_name`]) and records
    /// its members' global ranks in group-rank order. Unnamed groups are "world".
    pub fn named(mut self, name: impl Into<String>, ranks: &[usize]) -> ProcessGroup {
        self.name = name.into();
        self.ranks = ranks.to_vec();
        super::flight::register_group(&self.name, ranks);
        self
    }

    /// The flight recorder's name of the group.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `call` and adds its wall time to [`time_in_collectives`].
    fn timed<T>(call: impl FnOnce() -> T) -> T {
        let t0 = Instant::now();
        let out = call();
        COLLECTIVE_NANOS.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }

    /// Runs one collective `call` of the shim under the flight recorder: entered (the next
    /// sequence number of this group) before, left after a success; a failure keeps the entry
    /// open, so the last state shows where the rank gave up. Errors name `error_op`, plus
    /// `what` when given.
    pub(super) fn recorded(
        &self,
        op: &str,
        what: &str,
        bytes: u64,
        error_op: impl Into<String>,
        call: impl FnOnce() -> *mut c_char,
    ) -> Result<(), DistError> {
        self.recorded_as(op, what, bytes, error_op, true, call)
    }

    /// [`ProcessGroup::recorded`]; `waiting`: whether the call's time is time spent waiting on
    /// the others ([`time_in_collectives`]), false for calls that mostly compute (ring
    /// attention's forward, whose transfers overlap its blocks).
    pub(super) fn recorded_as(
        &self,
        op: &str,
        what: &str,
        bytes: u64,
        error_op: impl Into<String>,
        waiting: bool,
        call: impl FnOnce() -> *mut c_char,
    ) -> Result<(), DistError> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let id = super::flight::enter(&self.name, seq, op, what, bytes);
        let err = if waiting { Self::timed(call) } else { call() };
        if err.is_null() {
            super::flight::leave(id);
        }
        let error_op = error_op.into();
        self.done(err, if what.is_empty() { error_op } else { format!("{error_op} ({what})") })
    }

    /// As [`ProcessGroup::recorded`] for point-to-point transfers `(group rank of the peer,
    /// send?, bytes)`. They are not numbered on the group (its members do not all take part,
    /// nor equally often) but per direction, as `p2p[<src>-><dst>]` (global ranks, registered
    /// as a group of the two): the k-th transfer from src to dst has sequence number k on both
    /// ends, and both record it as "send/recv". One entry per transfer, all entered before the
    /// call and left after it.
    fn recorded_p2p(&self, ops: &[(usize, bool, u64)], what: &str, call: impl FnOnce() -> *mut c_char) -> *mut c_char {
        let ids: Vec<u64> = ops
            .iter()
            .map(|&(peer, send, bytes)| {
                let other = self.ranks.get(peer).copied().unwrap_or(peer);
                let (src, dst) = if send { (self.global_rank, other) } else { (other, self.global_rank) };
                let name = format!("p2p[{src}->{dst}]");
                let seq = {
                    let mut counts = self.p2p_seq.lock().unwrap_or_else(|e| e.into_inner());
                    let n = counts.entry((src, dst)).or_insert(0);
                    if *n == 0 {
                        super::flight::register_group(&name, &[src, dst]);
                    }
                    *n += 1;
                    *n
                };
                super::flight::enter(&name, seq, "send/recv", what, bytes)
            })
            .collect();
        let err = Self::timed(call);
        if err.is_null() {
            for id in ids {
                super::flight::leave(id);
            }
        }
        err
    }

    /// The shim's handle, for the other wrappers of this module's group ([`super::tp`]).
    pub(super) fn raw(&self) -> *mut RawPg {
        self.raw
    }

    /// [`check`] plus what the usual failures of a running job mean.
    pub(super) fn done(&self, err: *mut c_char, op: impl Into<String>) -> Result<(), DistError> {
        check(err, self.global_rank, op).map_err(|mut e| {
            let m = e.message.to_lowercase();
            if m.contains("timed out") || m.contains("timeout") {
                e.message.push_str(&format!(
                    " (no answer within MM_DIST_TIMEOUT_S = {} s: a peer rank is stuck, stopped or unreachable)",
                    self.timeout.as_secs()
                ));
            } else if m.contains("connection reset") || m.contains("connection closed") || m.contains("broken pipe") {
                e.message.push_str(" (a peer rank of this group exited or was killed)");
            }
            e
        })
    }

    /// The at::Tensor behind a tch tensor. Collectives write into the tensor's storage,
    /// never into the handle itself, so a shared borrow of an input is enough; outputs
    /// are taken as `&mut` at the API for honesty.
    pub(super) fn ptr(t: &Tensor) -> RawTensor {
        t.as_ptr() as RawTensor
    }

    // Every collective takes `what`: what it is for ("step totals"), or "" when the caller
    // does not say. The flight recorder keeps it and errors read "all_reduce (what)".

    pub fn all_reduce(&self, t: &mut Tensor, op: ReduceOp, what: &str) -> Result<(), DistError> {
        let raw = Self::ptr(t);
        self.recorded("all_reduce", what, nbytes(t), "all_reduce", || unsafe {
            mm_pg_allreduce(self.raw, raw, op as c_int)
        })
    }

    pub fn broadcast(&self, t: &mut Tensor, root: usize, what: &str) -> Result<(), DistError> {
        let raw = Self::ptr(t);
        self.recorded("broadcast", what, nbytes(t), "broadcast", || unsafe {
            mm_pg_broadcast(self.raw, raw, root as c_int)
        })
    }

    /// `out` holds `size` × `input.numel()` elements, group rank r's input at slice r.
    pub fn all_gather(&self, out: &mut Tensor, input: &Tensor, what: &str) -> Result<(), DistError> {
        let (o, i) = (Self::ptr(out), Self::ptr(input));
        self.recorded("all_gather", what, nbytes(out), "all_gather", || unsafe { mm_pg_allgather(self.raw, o, i) })
    }

    /// `input` holds `size` × `out.numel()` elements; group rank r receives the reduction of slice r.
    pub fn reduce_scatter(&self, out: &mut Tensor, input: &Tensor, op: ReduceOp, what: &str) -> Result<(), DistError> {
        let (o, i) = (Self::ptr(out), Self::ptr(input));
        self.recorded("reduce_scatter", what, nbytes(input), "reduce_scatter", || unsafe {
            mm_pg_reduce_scatter(self.raw, o, i, op as c_int)
        })
    }

    pub fn send(&self, t: &Tensor, dst: usize, tag: i32, what: &str) -> Result<(), DistError> {
        let err = self.recorded_p2p(&[(dst, true, nbytes(t))], what, || unsafe {
            mm_pg_send(self.raw, Self::ptr(t), dst as c_int, tag)
        });
        self.done(err, if what.is_empty() { format!("send to {dst}") } else { format!("send to {dst} ({what})") })
    }

    pub fn recv(&self, t: &mut Tensor, src: usize, tag: i32, what: &str) -> Result<(), DistError> {
        let raw = Self::ptr(t);
        let err = self
            .recorded_p2p(&[(src, false, nbytes(t))], what, || unsafe { mm_pg_recv(self.raw, raw, src as c_int, tag) });
        self.done(err, if what.is_empty() { format!("recv from {src}") } else { format!("recv from {src} ({what})") })
    }

    /// Posts every transfer at once and waits for all (`batch_isend_irecv`): `(tensor, group
    /// rank of the peer, send?)`; received tensors are written in place. Transfers between two
    /// ranks match in posting order, so both ends must post them in the same order. Errors name
    /// `what` as the operation.
    pub fn batch_p2p(&self, ops: &[(&Tensor, usize, bool)], what: &str) -> Result<(), DistError> {
        if ops.is_empty() {
            return Ok(());
        }
        let ts: Vec<RawTensor> = ops.iter().map(|(t, _, _)| Self::ptr(t)).collect();
        let peers: Vec<c_int> = ops.iter().map(|(_, p, _)| *p as c_int).collect();
        let sends: Vec<c_int> = ops.iter().map(|(_, _, s)| c_int::from(*s)).collect();
        let n = ops.len() as c_int;
        let recorded: Vec<(usize, bool, u64)> = ops.iter().map(|(t, p, s)| (*p, *s, nbytes(t))).collect();
        let err = self.recorded_p2p(&recorded, what, || unsafe {
            mm_pg_batch_p2p(self.raw, n, ts.as_ptr(), peers.as_ptr(), sends.as_ptr(), 0)
        });
        self.done(err, what)
    }

    /// Global rank of this process (for error messages).
    pub fn global_rank(&self) -> usize {
        self.global_rank
    }

    pub fn barrier(&self, what: &str) -> Result<(), DistError> {
        self.recorded("barrier", what, 0, "barrier", || unsafe { mm_pg_barrier(self.raw) })
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        unsafe { mm_pg_free(self.raw) }
    }
}
