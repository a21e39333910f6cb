// Tensor- and sequence-parallel regions: Megatron's communication mappings
// (megatron/core/tensor_parallel/mappings.py) as torch::autograd::Function nodes over a c10d
// group, because tch cannot define custom autograd functions. Each forward runs a collective
// (or none) and records a node whose backward runs the paired one on the same group:
//
//   copy_to_tp            forward identity                 backward all-reduce(sum)
//   reduce_from_tp        forward all-reduce(sum)          backward identity
//   gather_from_tp        forward all-gather, last dim     backward keep own slice
//   scatter_to_tp         forward keep own slice, last dim backward all-gather
//   gather_from_sp        forward all-gather, dim 0        backward reduce-scatter(sum)
//   reduce_scatter_to_sp  forward reduce-scatter(sum), 0   backward all-gather
//   scatter_to_sp         forward keep own slice, dim 0    backward all-gather
//
// Slices may be uneven (MindSpeed's unaligned linear: 25 heads on 8 ranks hold 4,3,3,3,3,3,3,3):
// the caller passes one size per group rank, or none for equal slices. Gloo's all-gather and
// reduce-scatter need equal pieces, so uneven ones travel zero-padded to the largest.
//
// Lifetime: a node keeps a counted reference (intrusive_ptr) to the c10d Backend, so a graph
// stays valid after the Rust ProcessGroup that built it is dropped; the Backend is destroyed
// with the last graph or handle that refers to it. What no reference can guarantee is the
// peers: a backward that runs a collective needs every rank of the group to run the same
// backward, in the same order.
//
// Outputs follow shim.h's conventions: NULL or an error message, and on success a new
// at::Tensor in *out that the caller owns (tch's Tensor::from_ptr; tch frees it with delete).
#include "shim.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/custom_class.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <numeric>
#include <vector>

using mm_shim::guarded;
using mm_shim::wait_work;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace mm_tp {

// What a node keeps of its group (shim.h).
using TpGroup = mm_shim::GroupRef;
using Group = c10::intrusive_ptr<TpGroup>;
using Sizes = std::vector<int64_t>;

Group group_of(AutogradContext* ctx) { return ctx->saved_data.at("group").toCustomClass<TpGroup>(); }

int64_t offset_of(const Sizes& sizes, int rank) {
  return std::accumulate(sizes.begin(), sizes.begin() + rank, int64_t{0});
}

// The slices of a dimension of length `total` split over the group: `given` (one size per
// rank, summing to `total`) or equal slices.
Sizes split_sizes(const TpGroup& g, int64_t total, const Sizes& given) {
  const int w = g.size();
  if (given.empty()) {
    TORCH_CHECK(total % w == 0, "a dimension of ", total, " does not split into ", w,
                " equal slices; pass one size per rank");
    return Sizes(w, total / w);
  }
  TORCH_CHECK(static_cast<int>(given.size()) == w, given.size(), " slice sizes for a group of ", w, " ranks");
  for (int64_t s : given) TORCH_CHECK(s >= 0, "negative slice size ", s);
  const int64_t sum = std::accumulate(given.begin(), given.end(), int64_t{0});
  TORCH_CHECK(sum == total, "slice sizes ", c10::IntArrayRef(given), " sum to ", sum, ", not to the dimension's ",
              total);
  return given;
}

// The slices of a dimension whose own slice is `own` long: `given` (whose entry for this rank
// must be `own`) or `own` on every rank (which the caller promises).
Sizes gathered_sizes(const TpGroup& g, int64_t own, const Sizes& given) {
  const int w = g.size();
  if (given.empty()) return Sizes(w, own);
  TORCH_CHECK(static_cast<int>(given.size()) == w, given.size(), " slice sizes for a group of ", w, " ranks");
  for (int64_t s : given) TORCH_CHECK(s >= 0, "negative slice size ", s);
  TORCH_CHECK(given[g.rank()] == own, "rank ", g.rank(), "'s slice is ", own, " long, the sizes ",
              c10::IntArrayRef(given), " say ", given[g.rank()]);
  return given;
}

bool all_equal(const Sizes& sizes) {
  return std::adjacent_find(sizes.begin(), sizes.end(), std::not_equal_to<>()) == sizes.end();
}

int64_t wrap(const at::Tensor& x, int64_t dim) {
  TORCH_CHECK(x.dim() >= 1, "a tensor-parallel region needs a tensor of at least one dimension");
  return c10::maybe_wrap_dim(dim, x.dim());
}

// A fresh contiguous sum over the group (the input is never written: an incoming gradient
// may be shared with other graph branches).
at::Tensor all_reduce_sum(const TpGroup& g, const at::Tensor& x) {
  if (g.size() == 1) return x;
  std::vector<at::Tensor> ts{x.clone(at::MemoryFormat::Contiguous)};
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  opts.timeout = g.timeout;
  wait_work(g.backend->allreduce(ts, opts), g.timeout);
  return ts[0];
}

// This rank's slice of `dim`, as its own contiguous tensor (not a view that would keep the
// whole input alive).
at::Tensor keep_slice(const TpGroup& g, const at::Tensor& x, int64_t dim, const Sizes& sizes) {
  if (g.size() == 1) return x;
  const int r = g.rank();
  return x.narrow(dim, offset_of(sizes, r), sizes[r]).clone(at::MemoryFormat::Contiguous);
}

// Every rank's `x` concatenated along `dim`, rank q's slice sizes[q] long.
at::Tensor all_gather(const TpGroup& g, const at::Tensor& x, int64_t dim, const Sizes& sizes) {
  const int w = g.size();
  if (w == 1) return x;
  const int64_t longest = *std::max_element(sizes.begin(), sizes.end());
  at::Tensor piece = x.contiguous();
  if (x.size(dim) != longest) {
    auto shape = x.sizes().vec();
    shape[dim] = longest;
    piece = at::zeros(shape, x.options());
    piece.narrow(dim, 0, x.size(dim)).copy_(x);
  }
  // Gloo's all-gather cuts its output into `w` chunks along dim 0, each shaped like the input.
  auto flat_shape = piece.sizes().vec();
  flat_shape[0] *= w;
  at::Tensor out = at::empty(flat_shape, piece.options());
  c10d::AllgatherOptions opts;
  opts.timeout = g.timeout;
  wait_work(g.backend->_allgather_base(out, piece, opts), g.timeout);
  if (dim == 0 && all_equal(sizes)) return out;
  auto stacked_shape = piece.sizes().vec();
  stacked_shape.insert(stacked_shape.begin(), w);
  at::Tensor stacked = out.view(stacked_shape);
  std::vector<at::Tensor> parts;
  parts.reserve(w);
  for (int q = 0; q < w; ++q) parts.push_back(stacked.select(0, q).narrow(dim, 0, sizes[q]));
  return at::cat(parts, dim);
}

// Rank r receives the sum over ranks of rows [offset_r, offset_r + sizes[r]) of `x`.
at::Tensor reduce_scatter_first(const TpGroup& g, const at::Tensor& x, const Sizes& sizes) {
  const int w = g.size();
  if (w == 1) return x;
  const int64_t longest = *std::max_element(sizes.begin(), sizes.end());
  at::Tensor input = x.contiguous();
  if (!all_equal(sizes)) {
    auto shape = x.sizes().vec();
    shape[0] = longest * w;
    input = at::zeros(shape, x.options());
    int64_t offset = 0;
    for (int q = 0; q < w; ++q) {
      input.narrow(0, q * longest, sizes[q]).copy_(x.narrow(0, offset, sizes[q]));
      offset += sizes[q];
    }
  }
  auto shape = x.sizes().vec();
  shape[0] = longest;
  at::Tensor out = at::empty(shape, x.options());
  c10d::ReduceScatterOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  opts.timeout = g.timeout;
  wait_work(g.backend->_reduce_scatter_base(out, input, opts), g.timeout);
  const int64_t own = sizes[g.rank()];
  return own == longest ? out : out.narrow(0, 0, own).clone();
}

struct CopyToTpRegion : torch::autograd::Function<CopyToTpRegion> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const Group& g) {
    ctx->saved_data["group"] = g;
    return x;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {all_reduce_sum(*group_of(ctx), grads[0]), at::Tensor()};
  }
};

struct ReduceFromTpRegion : torch::autograd::Function<ReduceFromTpRegion> {
  static at::Tensor forward(AutogradContext*, const at::Tensor& x, const Group& g) { return all_reduce_sum(*g, x); }
  static variable_list backward(AutogradContext*, variable_list grads) { return {grads[0], at::Tensor()}; }
};

// Forward all-gather along `dim`; backward keeps this rank's slice of the gradient (the
// computation after the gather is replicated on every rank) or, with `reduce_grad`, sums the
// gradient's slices over the group (it is partial on each rank: sequence parallelism).
struct GatherRegion : torch::autograd::Function<GatherRegion> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const Group& g, int64_t dim,
                            const Sizes& given, bool reduce_grad) {
    dim = wrap(x, dim);
    TORCH_CHECK(!reduce_grad || dim == 0, "a reduce-scattered gradient is supported along dim 0 only");
    Sizes sizes = gathered_sizes(*g, x.size(dim), given);
    ctx->saved_data["group"] = g;
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["sizes"] = sizes;
    ctx->saved_data["reduce_grad"] = reduce_grad;
    return all_gather(*g, x, dim, sizes);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    Group g = group_of(ctx);
    const int64_t dim = ctx->saved_data.at("dim").toInt();
    const Sizes sizes = ctx->saved_data.at("sizes").toIntVector();
    at::Tensor grad = ctx->saved_data.at("reduce_grad").toBool() ? reduce_scatter_first(*g, grads[0], sizes)
                                                                 : keep_slice(*g, grads[0], dim, sizes);
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Forward keeps this rank's slice along `dim`; backward all-gathers the gradient's slices.
struct ScatterRegion : torch::autograd::Function<ScatterRegion> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const Group& g, int64_t dim,
                            const Sizes& given) {
    dim = wrap(x, dim);
    Sizes sizes = split_sizes(*g, x.size(dim), given);
    ctx->saved_data["group"] = g;
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["sizes"] = sizes;
    return keep_slice(*g, x, dim, sizes);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    Group g = group_of(ctx);
    const int64_t dim = ctx->saved_data.at("dim").toInt();
    const Sizes sizes = ctx->saved_data.at("sizes").toIntVector();
    return {all_gather(*g, grads[0], dim, sizes), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Forward reduce-scatters dim 0 (sums the partial results of every rank, keeps this rank's
// rows); backward all-gathers the gradient's rows.
struct ReduceScatterToSpRegion : torch::autograd::Function<ReduceScatterToSpRegion> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const Group& g, const Sizes& given) {
    wrap(x, 0);
    Sizes sizes = split_sizes(*g, x.size(0), given);
    ctx->saved_data["group"] = g;
    ctx->saved_data["sizes"] = sizes;
    return reduce_scatter_first(*g, x, sizes);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    Group g = group_of(ctx);
    const Sizes sizes = ctx->saved_data.at("sizes").toIntVector();
    return {all_gather(*g, grads[0], 0, sizes), at::Tensor(), at::Tensor()};
  }
};

using mm_shim::group_ref;

Sizes sizes_from(const int64_t* sizes, size_t n) { return n == 0 ? Sizes{} : Sizes(sizes, sizes + n); }

}  // namespace mm_tp

extern "C" {

char* mm_tp_copy_to(mm_pg* pg, at::Tensor* x, at::Tensor** out) {
  return guarded([&] { *out = new at::Tensor(mm_tp::CopyToTpRegion::apply(*x, mm_tp::group_ref(pg))); });
}

char* mm_tp_reduce_from(mm_pg* pg, at::Tensor* x, at::Tensor** out) {
  return guarded([&] { *out = new at::Tensor(mm_tp::ReduceFromTpRegion::apply(*x, mm_tp::group_ref(pg))); });
}

// sizes: one slice length per group rank, or n == 0 for equal slices (likewise below).
char* mm_tp_gather_last(mm_pg* pg, at::Tensor* x, const int64_t* sizes, size_t n, at::Tensor** out) {
  return guarded([&] {
    *out = new at::Tensor(mm_tp::GatherRegion::apply(*x, mm_tp::group_ref(pg), int64_t{-1},
                                                     mm_tp::sizes_from(sizes, n), false));
  });
}

char* mm_tp_scatter_last(mm_pg* pg, at::Tensor* x, const int64_t* sizes, size_t n, at::Tensor** out) {
  return guarded([&] {
    *out = new at::Tensor(
        mm_tp::ScatterRegion::apply(*x, mm_tp::group_ref(pg), int64_t{-1}, mm_tp::sizes_from(sizes, n)));
  });
}

char* mm_sp_gather_first(mm_pg* pg, at::Tensor* x, const int64_t* sizes, size_t n, at::Tensor** out) {
  return guarded([&] {
    *out = new at::Tensor(
        mm_tp::GatherRegion::apply(*x, mm_tp::group_ref(pg), int64_t{0}, mm_tp::sizes_from(sizes, n), true));
  });
}

char* mm_sp_reduce_scatter_first(mm_pg* pg, at::Tensor* x, const int64_t* sizes, size_t n, at::Tensor** out) {
  return guarded([&] {
    *out = new at::Tensor(
        mm_tp::ReduceScatterToSpRegion::apply(*x, mm_tp::group_ref(pg), mm_tp::sizes_from(sizes, n)));
  });
}

char* mm_sp_scatter_first(mm_pg* pg, at::Tensor* x, const int64_t* sizes, size_t n, at::Tensor** out) {
  return guarded([&] {
    *out = new at::Tensor(
        mm_tp::ScatterRegion::apply(*x, mm_tp::group_ref(pg), int64_t{0}, mm_tp::sizes_from(sizes, n)));
  });
}

}  // extern "C"
