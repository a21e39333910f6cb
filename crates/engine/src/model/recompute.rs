//! Activation recomputation as mm-engine runs it: the settings are `mm_spec::recompute`'s
//! (Megatron's flags and their meaning, shared with the launcher and its memory estimate).
//!
//! The same setting applies to the LLM's layers and the ViT's (MindSpeed-MM's InternVL recipes
//! set both alike, e.g. full/uniform/1). A recomputed segment is one autograd node made in the
//! shim (csrc/recompute.cpp): its forward runs the segment without recording a graph and saves
//! only its inputs; its backward reruns it with the forward's RNG states (drop path draws the
//! same masks) and back-propagates through the rerun. Parameter gradients and input gradients
//! are the ones of the plain graph: the tests compare whole training runs with and without.

use std::ffi::{c_char, c_void};
use std::sync::Mutex;

use tch::{TchError, Tensor};

use super::ForwardError;

type RawTensor = *mut torch_sys::C_tensor;
type RunFn = unsafe extern "C" fn(*mut c_void, *mut RawTensor, usize, *mut c_void) -> i32;
type DropFn = unsafe extern "C" fn(*mut c_void);

extern "C" {
    fn mm_recompute_apply(
        ctx: *mut c_void,
        run: RunFn,
        drop: DropFn,
        inputs: *const RawTensor,
        n: usize,
        trainable: i32,
        out: *mut RawTensor,
        cap: usize,
        n_out: *mut usize,
    ) -> *mut c_char;
    fn mm_recompute_push(sink: *mut c_void, t: RawTensor);
    fn mm_recompute_fail(sink: *mut c_void, msg: *const c_char, len: usize);
    fn mm_c10d_free_str(s: *mut c_char);
}

pub use mm_spec::recompute::Recompute;

/// The body of a segment: input tensors → output tensors.
pub type Body = Box<dyn FnMut(&[Tensor]) -> Result<Vec<Tensor>, ForwardError> + Send>;

/// Most outputs a segment returns.
const MAX_OUTPUTS: usize = 8;

/// Runs `body` over `inputs` as one recomputed segment (see the module doc). The body must be
/// a pure function of its inputs, the parameters it reads and the RNG: it runs twice when the
/// outputs are back-propagated. It may outlive this call (until the graph's backward or its
/// drop); being `'static`, it owns what it reads, or holds a [`Borrowed`] pointer whose
/// lifetime its maker vouches for ([`run_layers`]).
///
/// `trainable`: the body reads parameters that require grad (then a node is recorded even when
/// no input requires grad, so that they get their gradients). With grad mode off the body runs
/// once and nothing is kept.
pub fn checkpoint(inputs: &[&Tensor], trainable: bool, body: Body) -> Result<Vec<Tensor>, ForwardError> {
    let ctx = Box::into_raw(Box::new(Mutex::new(body))) as *mut c_void;
    let raw: Vec<RawTensor> = inputs.iter().map(|t| t.as_ptr() as RawTensor).collect();
    let mut out: [RawTensor; MAX_OUTPUTS] = [std::ptr::null_mut(); MAX_OUTPUTS];
    let mut n_out = 0usize;
    // SAFETY: `ctx` is a Box<Mutex<Body>> that the shim hands back to `drop_body` exactly once;
    // the input pointers are live tch tensors (the shim copies them); on success the first
    // `n_out` entries of `out` are new at::Tensor the shim gives away.
    let err = unsafe {
        mm_recompute_apply(
            ctx,
            run_body,
            drop_body,
            raw.as_ptr(),
            raw.len(),
            i32::from(trainable),
            out.as_mut_ptr(),
            MAX_OUTPUTS,
            &mut n_out,
        )
    };
    if !err.is_null() {
        // SAFETY: a malloc'd C string from the shim, freed by its own function.
        let msg = unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy().into_owned();
        unsafe { mm_c10d_free_str(err) };
        return Err(ForwardError::Torch(TchError::Torch(format!("recomputed segment: {msg}"))));
    }
    // SAFETY: see above.
    Ok(out[..n_out].iter().map(|&p| unsafe { Tensor::from_ptr(p) }).collect())
}

/// [`checkpoint`] of a body with one output.
pub fn checkpoint1(inputs: &[&Tensor], trainable: bool, body: Body) -> Result<Tensor, ForwardError> {
    let mut out = checkpoint(inputs, trainable, body)?;
    match out.len() {
        1 => Ok(out.remove(0)),
        n => Err(ForwardError::Torch(TchError::Torch(format!("a recomputed segment returned {n} outputs, not 1")))),
    }
}

unsafe extern "C" fn run_body(ctx: *mut c_void, inputs: *mut RawTensor, n: usize, sink: *mut c_void) -> i32 {
    // SAFETY: the shim passes `n` new at::Tensor pointers that this function now owns.
    let inputs: Vec<Tensor> = (0..n).map(|i| unsafe { Tensor::from_ptr(*inputs.add(i)) }).collect();
    // SAFETY: `ctx` is the Box<Mutex<Body>> made by `checkpoint`, alive until `drop_body`.
    let body = unsafe { &*(ctx as *const Mutex<Body>) };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut f = body.lock().unwrap_or_else(|p| p.into_inner());
        f(&inputs)
    }));
    let fail = |msg: String| {
        // SAFETY: `sink` is the shim's, valid for this call; the message is copied.
        unsafe { mm_recompute_fail(sink, msg.as_ptr() as *const c_char, msg.len()) };
        1
    };
    match result {
        Ok(Ok(outputs)) => {
            for t in &outputs {
                // SAFETY: the shim copies the tensor (a reference count) before we drop ours.
                unsafe { mm_recompute_push(sink, t.as_ptr() as RawTensor) };
            }
            0
        }
        Ok(Err(e)) => fail(e.to_string()),
        Err(p) => {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            fail(format!("panicked: {what}"))
        }
    }
}

unsafe extern "C" fn drop_body(ctx: *mut c_void) {
    // SAFETY: called once by the shim with the pointer `checkpoint` leaked.
    drop(unsafe { Box::from_raw(ctx as *mut Mutex<Body>) });
}

/// Runs `layers` over `input` as `recompute` says: the segments it recomputes through
/// [`checkpoint`], the others plainly. `make` gives the layer step (a closure owning what the
/// layers share, e.g. the rotary tables and the mask), one per recomputed segment;
/// `trainable` says whether a layer's parameters require grad.
///
/// # Safety
/// A recomputed segment keeps a pointer to `layers` in the graph it records: `layers` must
/// stay alive and unmoved until that graph's backward has run or the graph is dropped (the
/// model's layers outlive every step's graph), and nothing may mutate them meanwhile.
pub unsafe fn run_layers<L: 'static, F>(
    layers: &[L],
    recompute: Option<Recompute>,
    input: &Tensor,
    trainable: impl Fn(&L) -> bool,
    make: impl Fn() -> F,
) -> Result<Tensor, ForwardError>
where
    F: FnMut(&L, &Tensor) -> Result<Tensor, ForwardError> + Send + 'static,
{
    let segments = match recompute {
        Some(r) => r.segments(layers.len()),
        None => vec![(0..layers.len(), false)],
    };
    let mut h = input.shallow_clone();
    for (range, recomputed) in segments {
        if recomputed {
            let (all, mut step) = (Borrowed::new(layers), make());
            let train = layers[range.clone()].iter().any(&trainable);
            h = checkpoint1(
                &[&h],
                train,
                Box::new(move |t| {
                    // SAFETY: the layers live as long as the model, which outlives its graphs.
                    let layers = unsafe { all.get() };
                    let mut h = t[0].shallow_clone();
                    for layer in &layers[range.clone()] {
                        h = step(layer, &h)?;
                    }
                    Ok(vec![h])
                }),
            )?;
        } else {
            let mut step = make();
            for layer in &layers[range] {
                h = step(layer, &h)?;
            }
        }
    }
    Ok(h)
}

/// A pointer to a model part that a segment body reads: the part outlives every graph built
/// from it (the promise of [`run_layers`]'s caller).
pub struct Borrowed<T: ?Sized>(*const T);

// SAFETY: a body only reads the part (layers: tch tensors, i.e. counted references to
// libtorch tensors, whose reference counts are atomic), possibly on an autograd thread while
// the training thread waits in forward or backward; the part is not mutated meanwhile
// ([`run_layers`]'s contract). tch's Tensor is not `Sync` only because it wraps a raw pointer.
unsafe impl<T: ?Sized> Send for Borrowed<T> {}

impl<T: ?Sized> Borrowed<T> {
    pub fn new(t: &T) -> Borrowed<T> {
        Borrowed(t)
    }

    /// # Safety
    /// The part must still be alive (the caller of [`checkpoint`] promised it).
    pub unsafe fn get(&self) -> &T {
        unsafe { &*self.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// A segment gives the values and the gradients (of its input and of a parameter it reads)
    /// of the same computation without it, also with dropout, and its body runs twice.
    #[test]
    fn a_segment_matches_the_plain_graph_with_dropout() {
        let w = Tensor::randn([4, 4], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let x0 = Tensor::randn([3, 4], (Kind::Double, Device::Cpu));
        let f = |x: &Tensor, w: &Tensor| (x.matmul(w).tanh().dropout(0.5, true) * 3.0).sin();

        tch::manual_seed(7);
        let x = x0.copy().set_requires_grad(true);
        let plain = f(&x, &w);
        plain.sum(Kind::Double).backward();
        let (gx, gw) = (x.grad().copy(), w.grad().copy());
        let _ = w.grad().zero_();

        tch::manual_seed(7);
        let x = x0.copy().set_requires_grad(true);
        let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (wp, counter) = (w.shallow_clone(), runs.clone());
        let y = checkpoint1(
            &[&x],
            true,
            Box::new(move |t| {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(vec![f(&t[0], &wp)])
            }),
        )
        .unwrap();
        assert_eq!(f64::try_from((&y - &plain).abs().max()).unwrap(), 0.0, "same forward values");
        // Draw something between forward and backward: the rerun must not see it.
        let _ = Tensor::rand([10], (Kind::Float, Device::Cpu));
        y.sum(Kind::Double).backward();
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2, "forward, then the rerun");
        assert_eq!(f64::try_from((x.grad() - gx).abs().max()).unwrap(), 0.0);
        assert_eq!(f64::try_from((w.grad() - gw).abs().max()).unwrap(), 0.0);
    }

    #[test]
    fn an_error_in_the_body_names_the_segment() {
        let x = Tensor::ones([2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let e = checkpoint(&[&x], true, Box::new(|_| Err(ForwardError::Torch(TchError::Torch("boom".into())))))
            .unwrap_err()
            .to_string();
        assert!(e.contains("recomputed segment") && e.contains("boom"), "{e}");
        let e = checkpoint(&[&x], true, Box::new(|_| panic!("bad layer"))).unwrap_err().to_string();
        assert!(e.contains("panicked: bad layer"), "{e}");
    }

    /// Parameters inside a segment get gradients when its input needs none (a frozen embedding
    /// before trainable layers), and a frozen segment (`trainable` false) records nothing.
    #[test]
    fn parameters_behind_an_input_without_grad_still_learn() {
        let w = Tensor::randn([3, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::randn([2, 3], (Kind::Float, Device::Cpu));
        let wp = w.shallow_clone();
        let y = checkpoint1(&[&x], true, Box::new(move |t| Ok(vec![t[0].matmul(&wp)]))).unwrap();
        y.sum(Kind::Float).backward();
        let want = x.sum_dim_intlist([0].as_slice(), false, Kind::Float).unsqueeze(1).expand([3, 3], false);
        assert!(w.grad().allclose(&want, 1e-6, 1e-6, false));
        let frozen = Tensor::randn([3, 3], (Kind::Float, Device::Cpu));
        let y = checkpoint1(&[&x], false, Box::new(move |t| Ok(vec![t[0].matmul(&frozen)]))).unwrap();
        assert!(!y.requires_grad());
    }
}
