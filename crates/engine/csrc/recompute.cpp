// Activation recomputation (Megatron's `tensor_parallel.checkpoint`, torch.utils.checkpoint's
// reentrant variant) as a torch::autograd::Function whose body is a Rust callback, because tch
// cannot define custom autograd functions.
//
//   forward   stash the RNG states; run the callback under no_grad (nothing inside is saved
//             for backward); save only the inputs
//   backward  run the callback again on detached copies of the inputs with grad enabled and
//             the forward's RNG states restored (so dropout and drop path draw the same masks),
//             then back-propagate the incoming gradients through that fresh graph: the
//             parameters used inside accumulate their .grad as without recomputation, and the
//             inputs' gradients go on to the rest of the graph
//
// The callback is (ctx, inputs, n, sink) -> 0 on success: it receives new at::Tensor copies
// of the inputs (it owns them) and hands each output to mm_recompute_push(sink, t), or a
// message to mm_recompute_fail(sink, msg, len) and returns nonzero. `drop(ctx)` runs once when
// the last reference to the segment goes: when the graph node is freed (after its backward,
// or when an unused graph is dropped), or at once when no graph was recorded.
//
// The callback may run on an autograd worker thread (CUDA backward); the Rust side makes it
// Send and serialises the calls of one segment.
#include "shim.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/custom_class.h>

#include <algorithm>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

using mm_shim::guarded;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

extern "C" {
typedef int (*mm_recompute_run)(void* ctx, at::Tensor** inputs, size_t n, void* sink);
typedef void (*mm_recompute_drop)(void* ctx);
}

namespace mm_recompute {

struct Sink {
  variable_list outputs;
  std::string error;
  // Set when handing over an output or a message threw (out of memory): the run fails.
  bool broken = false;
};

struct Segment : torch::CustomClassHolder {
  void* ctx;
  mm_recompute_run run_fn;
  mm_recompute_drop drop_fn;

  Segment(void* c, mm_recompute_run r, mm_recompute_drop d) : ctx(c), run_fn(r), drop_fn(d) {}
  ~Segment() override {
    if (drop_fn != nullptr) drop_fn(ctx);
  }
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;

  variable_list run(const variable_list& inputs) {
    std::vector<at::Tensor*> owned;
    owned.reserve(inputs.size());
    for (const auto& t : inputs) owned.push_back(new at::Tensor(t));
    Sink sink;
    // The callback owns (and frees) the copies whatever it returns.
    const int rc = run_fn(ctx, owned.data(), owned.size(), &sink);
    if (rc != 0 || sink.broken) {
      throw std::runtime_error(sink.error.empty() ? "recomputed segment failed" : sink.error);
    }
    return std::move(sink.outputs);
  }
};

const auto segment_class = torch::class_<Segment>("mm_engine", "RecomputeSegment");

using SegmentRef = c10::intrusive_ptr<Segment>;

// The default generators a segment draws from: the CPU's, and the accelerator's of the inputs'
// device when they live on one.
struct RngStates {
  at::Tensor cpu;
  std::optional<at::Device> device;
  at::Tensor accel;
};

RngStates capture(const variable_list& inputs) {
  RngStates s;
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    s.cpu = gen.get_state();
  }
  for (const auto& t : inputs) {
    if (t.defined() && !t.device().is_cpu()) {
      s.device = t.device();
      auto gen = at::globalContext().defaultGenerator(t.device());
      std::lock_guard<std::mutex> lock(gen.mutex());
      s.accel = gen.get_state();
      break;
    }
  }
  return s;
}

void restore(const RngStates& s) {
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(s.cpu);
  }
  if (s.device.has_value()) {
    auto gen = at::globalContext().defaultGenerator(*s.device);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(s.accel);
  }
}

// Sets the forward's RNG states for the rerun and puts the current ones back afterwards,
// also when the rerun throws.
struct ForkRng {
  RngStates saved;
  explicit ForkRng(const RngStates& forward, const variable_list& inputs) : saved(capture(inputs)) {
    restore(forward);
  }
  ~ForkRng() {
    try {
      restore(saved);
    } catch (...) {
    }
  }
};

struct Recompute : torch::autograd::Function<Recompute> {
  // `forced`: the index of an input made a leaf that requires grad only so that a node is
  // recorded (see mm_recompute_apply), or -1; its gradient is neither computed nor returned.
  static variable_list forward(AutogradContext* ctx, const SegmentRef& seg, int64_t forced, at::TensorList inputs) {
    const variable_list in(inputs.begin(), inputs.end());
    // Saved before the body runs, so an in-place change of an input in the body is caught.
    ctx->save_for_backward(in);
    RngStates rng = capture(in);
    variable_list out;
    {
      at::NoGradGuard no_grad;
      out = seg->run(in);
    }
    ctx->saved_data["forced"] = forced;
    ctx->saved_data["segment"] = seg;
    ctx->saved_data["cpu_rng"] = rng.cpu;
    if (rng.device.has_value()) {
      ctx->saved_data["accel_rng"] = rng.accel;
      ctx->saved_data["accel_type"] = static_cast<int64_t>(rng.device->type());
      ctx->saved_data["accel_index"] = static_cast<int64_t>(rng.device->index());
    }
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto seg = ctx->saved_data.at("segment").toCustomClass<Segment>();
    const variable_list saved = ctx->get_saved_variables();
    RngStates rng;
    rng.cpu = ctx->saved_data.at("cpu_rng").toTensor();
    if (ctx->saved_data.count("accel_rng") != 0) {
      rng.accel = ctx->saved_data.at("accel_rng").toTensor();
      rng.device = at::Device(static_cast<c10::DeviceType>(ctx->saved_data.at("accel_type").toInt()),
                              static_cast<c10::DeviceIndex>(ctx->saved_data.at("accel_index").toInt()));
    }
    const int64_t forced = ctx->saved_data.at("forced").toInt();
    variable_list detached;
    detached.reserve(saved.size());
    for (size_t i = 0; i < saved.size(); ++i) {
      at::Tensor d = saved[i].detach();
      if (saved[i].requires_grad() && static_cast<int64_t>(i) != forced) d.requires_grad_(true);
      detached.push_back(d);
    }
    variable_list out;
    {
      ForkRng fork(rng, detached);
      at::AutoGradMode grad(true);
      out = seg->run(detached);
    }
    TORCH_CHECK(out.size() == grads.size(), "a recomputed segment returned ", out.size(), " outputs, its forward ",
                grads.size());
    variable_list roots, root_grads;
    for (size_t i = 0; i < out.size(); ++i) {
      if (out[i].requires_grad() && grads[i].defined()) {
        roots.push_back(out[i]);
        root_grads.push_back(grads[i]);
      }
    }
    if (!roots.empty()) torch::autograd::backward(roots, root_grads);
    variable_list result{at::Tensor(), at::Tensor()};  // the segment and `forced` arguments
    for (const auto& d : detached) result.push_back(d.requires_grad() ? d.grad() : at::Tensor());
    return result;
  }
};

}  // namespace mm_recompute

extern "C" {

// Called from Rust frames: nothing may throw out of these.
void mm_recompute_push(void* sink, const at::Tensor* t) {
  auto* s = static_cast<mm_recompute::Sink*>(sink);
  try {
    s->outputs.push_back(*t);
  } catch (...) {
    s->broken = true;
  }
}

void mm_recompute_fail(void* sink, const char* msg, size_t len) {
  auto* s = static_cast<mm_recompute::Sink*>(sink);
  try {
    s->error.assign(msg, len);
  } catch (...) {
    s->broken = true;
  }
}

// Runs the segment `ctx` over `inputs` as one autograd node (see the header). The segment is
// taken over at once: `drop(ctx)` runs exactly once, on success or failure. Up to `cap`
// outputs come back in `out` (new tensors the caller owns), their count in *n_out.
//
// `trainable`: the segment reads parameters that require grad. A node is only recorded when
// an input requires grad, so when none does (the first layers after a frozen embedding) the
// first floating-point input is replaced by a detached copy that does: the parameters inside
// still get their gradients, as torch.utils.checkpoint's users must arrange by hand. That copy's
// own gradient is neither computed in the rerun nor returned.
char* mm_recompute_apply(void* ctx, mm_recompute_run run, mm_recompute_drop drop, at::Tensor** inputs, size_t n,
                         int trainable, at::Tensor** out, size_t cap, size_t* n_out) {
  mm_recompute::SegmentRef seg;
  try {
    seg = c10::make_intrusive<mm_recompute::Segment>(ctx, run, drop);
  } catch (...) {
    drop(ctx);
    return mm_shim::dup_str("could not allocate a recomputed segment");
  }
  return guarded([&] {
    std::vector<at::Tensor> in;
    in.reserve(n);
    for (size_t i = 0; i < n; ++i) in.push_back(*inputs[i]);
    const bool any = std::any_of(in.begin(), in.end(), [](const at::Tensor& t) { return t.requires_grad(); });
    int64_t forced = -1;
    if (trainable != 0 && !any && at::GradMode::is_enabled()) {
      for (size_t i = 0; i < in.size(); ++i) {
        if (in[i].is_floating_point()) {
          in[i] = in[i].detach().requires_grad_(true);
          forced = static_cast<int64_t>(i);
          break;
        }
      }
    }
    variable_list result = mm_recompute::Recompute::apply(seg, forced, at::TensorList(in));
    TORCH_CHECK(result.size() <= cap, "a recomputed segment returned ", result.size(), " outputs, at most ", cap,
                " expected");
    for (size_t i = 0; i < result.size(); ++i) out[i] = new at::Tensor(std::move(result[i]));
    *n_out = result.size();
  });
}

}  // extern "C"
