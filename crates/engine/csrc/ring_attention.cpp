// Ring attention for context parallelism (Megatron's megatron_cp_algo): each rank of the
// context-parallel group holds a share of the sequence's queries, keys and values; the keys and
// values travel around the ring (rank r sends to r + 1 and receives from r − 1) while every rank
// computes the attention of its queries against the chunk it holds, merging the blocks with a
// running log-sum-exp. Nothing of size sequence × sequence, and no more than two remote K/V
// chunks, exist at a time; the exchange of the next chunk overlaps the current block's compute.
// A block is computed in tiles of query rows (at most ~2^25 scores each, masks built per tile),
// and a tile whose queries see none of the block's keys (the causal mask's upper blocks) is
// skipped.
//
// Forward, for this rank's queries q [B, KV·rep, Tq, D] and the chunks (k, v) [B, KV, Tk, D] of
// every rank in turn:
//   s   = q kᵀ / √D, masked where key position > query position or the key is padding
//   lse_b = logsumexp(s) (−∞ for a row that sees no key of the block), o_b = softmax(s) v
//   lse = logaddexp(lse, lse_b), o = o·exp(lse_old − lse) + o_b·exp(lse_b − lse)
// Grouped-query attention is handled in the products (q viewed as [B, KV, rep, Tq, D]): keys and
// values travel once per kv head, not repeated.
//
// Backward (FlashAttention's, per block, with the forward's final lse): p = exp(s − lse),
// dv += pᵀ dO, dp = dO vᵀ, ds = p (dp − rowsum(dO ∘ o)), dq += ds k / √D, dk += dsᵀ q / √D. The
// keys and values go around the ring again, each with its gradient accumulators, which after the
// last block take one more hop home to the rank that owns the chunk.
//
// Masks come from global positions: `positions` [cp, Tl] lists every rank's token positions (the
// load-balanced chunks r and 2·cp − 1 − r, computed by the caller) and `valid` [B, T] marks the
// padded sequence's real tokens. Blocks are computed in fp32 whatever the inputs' dtype.
//
// Transfers: a send to the next rank and a receive from the previous one, posted together and
// waited after the block (NCCL: one coalesced group, as torch's batch_isend_irecv, so two ranks
// sending to each other on one stream do not deadlock; Gloo: two asynchronous ops). Every rank of
// the group must run the same forwards and backwards in the same order, as for tp_regions.cpp.
#include "shim.h"

#include <torch/csrc/autograd/custom_function.h>
#include <torch/custom_class.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

using mm_shim::guarded;
using mm_shim::wait_work;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace mm_ring {

// What the node keeps of its group (shim.h).
using CpGroup = mm_shim::GroupRef;
using Group = c10::intrusive_ptr<CpGroup>;

// One posted exchange: `send` to the next rank, the previous rank's into `recv`.
struct Exchange {
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  std::chrono::milliseconds timeout;

  void wait() {
    for (auto& w : works) wait_work(w, timeout);
    works.clear();
  }
};

Exchange post(const CpGroup& g, at::Tensor& send, at::Tensor& recv, int tag) {
  const int n = g.size(), r = g.rank();
  const int next = (r + 1) % n, prev = (r + n - 1) % n;
  Exchange ex{{}, g.timeout};
  const bool coalesce = g.backend->getBackendName() == "nccl";
  if (coalesce) g.backend->startCoalescing();
  std::vector<at::Tensor> s{send}, v{recv};
  // Even ranks send first, odd ranks receive first (both are asynchronous: the order only
  // matters where a pair's transfers serialize, and with an even group it has no cycle).
  if (r % 2 == 0) {
    ex.works.push_back(g.backend->send(s, next, tag));
    ex.works.push_back(g.backend->recv(v, prev, tag));
  } else {
    ex.works.push_back(g.backend->recv(v, prev, tag));
    ex.works.push_back(g.backend->send(s, next, tag));
  }
  if (coalesce) {
    ex.works.clear();
    ex.works.push_back(g.backend->endCoalescing());
  }
  return ex;
}

// The boolean mask [B, 1, 1, rows, Tk] of a tile's queries at `qpos` [rows] against keys at
// `kpos` [Tk] whose realness is `real` [B, Tk]: causal in global positions, and the key real.
at::Tensor tile_mask(const at::Tensor& qpos, const at::Tensor& kpos, const at::Tensor& real) {
  at::Tensor causal = kpos.unsqueeze(0).le(qpos.unsqueeze(1));
  const int64_t b = real.size(0);
  return causal.view({1, 1, 1, qpos.size(0), kpos.size(0)}).logical_and(real.view({b, 1, 1, 1, kpos.size(0)}));
}

// −∞ rows (no key seen) replaced by 0, so that exp(s − lse) of their −∞ scores is 0, not NaN.
at::Tensor finite_or_zero(const at::Tensor& lse) { return at::where(at::isinf(lse), at::zeros_like(lse), lse); }

// Scores [B, KV, rep, rows, Tk] of a tile's queries q_t [B, KV, rep·rows, D] (the rep query
// heads of a kv head folded into the rows, so K is never repeated) against kf [B, KV, Tk, D]
// (fp32), scaled and masked to −∞ by `mask` [B, 1, 1, rows, Tk]. In place where the tensor is
// this function's own: a block's temporaries are the largest allocations of the step.
at::Tensor scores(const at::Tensor& q_t, const at::Tensor& kf, const at::Tensor& mask, int64_t rep, double scale) {
  at::Tensor s = at::matmul(q_t, kf.transpose(-1, -2));
  s.mul_(scale);
  auto shape = s.sizes().vec();  // [B, KV, rep·rows, Tk]
  at::Tensor s5 = s.view({shape[0], shape[1], rep, shape[2] / rep, shape[3]});
  return s5.masked_fill_(mask.logical_not(), -std::numeric_limits<float>::infinity());
}

// A tile of q5-shaped [B, KV, rep, Tq, D] rows at_row..at_row+len, as [B, KV, rep·len, D].
at::Tensor fold_rows(const at::Tensor& x5, int64_t at_row, int64_t len) {
  at::Tensor t = x5.narrow(3, at_row, len);
  return t.reshape({t.size(0), t.size(1), t.size(2) * len, t.size(4)});
}

// Query rows per tile of a block: at most `budget` scores (the caller's; 2^25 = 128 MiB in fp32
// by default) per tile, so a block's working set (scores, probabilities and their gradients)
// stays bounded whatever the sequence.
int64_t tile_rows(int64_t budget, int64_t b, int64_t heads, int64_t tq, int64_t tk) {
  return std::max<int64_t>(1, std::min<int64_t>(tq, budget / std::max<int64_t>(1, b * heads * tk)));
}

// Calls `tile(at_row, len, mask, kf, vf)` for each tile of query rows (at `qpos`, of the
// sequence's real tokens `valid`) against the chunk `cur` [2, B, KV, Tk, D] whose keys sit at
// `kpos`, with the tile's mask and the chunk's keys and values in fp32; a tile whose queries see
// none of the keys is skipped. Forward and backward walk the same tiles through it.
template <typename F>
void each_visible_tile(const at::Tensor& cur, const at::Tensor& qpos, const at::Tensor& kpos, const at::Tensor& valid,
                       int64_t tile_scores, int64_t heads, F&& tile) {
  at::Tensor real = valid.index_select(1, kpos);
  at::Tensor kf = cur.select(0, 0).to(at::kFloat), vf = cur.select(0, 1).to(at::kFloat);
  const int64_t tq = qpos.size(0), rows = tile_rows(tile_scores, valid.size(0), heads, tq, cur.size(3));
  for (int64_t at_row = 0; at_row < tq; at_row += rows) {
    const int64_t len = std::min(rows, tq - at_row);
    at::Tensor m = tile_mask(qpos.narrow(0, at_row, len), kpos, real);
    if (!m.any().item<bool>()) continue;
    tile(at_row, len, m, kf, vf);
  }
}

// K and V stacked into one buffer [2, B, KV, Tk, D], the unit that travels.
at::Tensor stack_kv(const at::Tensor& k, const at::Tensor& v) { return at::stack({k, v}).contiguous(); }

struct RingAttention : torch::autograd::Function<RingAttention> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& positions, const at::Tensor& valid, const Group& g,
                            int64_t tile_scores) {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "ring attention takes [B, heads, T, D] tensors");
    const int n = g->size(), r = g->rank();
    TORCH_CHECK(positions.dim() == 2 && positions.size(0) == n, "positions must be [cp, local] for ", n, " ranks");
    const int64_t b = q.size(0), heads = q.size(1), tq = q.size(2), d = q.size(3), kv = k.size(1);
    TORCH_CHECK(heads % kv == 0, heads, " query heads do not group over ", kv, " key/value heads");
    TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == b && k.size(2) == tq && k.size(3) == d,
                "ring attention: keys ", k.sizes(), " and values ", v.sizes(), " do not match the queries ", q.sizes());
    TORCH_CHECK(positions.size(1) == tq && positions.scalar_type() == at::kLong,
                "ring attention: positions must be int64 [cp, ", tq, "], not ", positions.sizes());
    TORCH_CHECK(valid.dim() == 2 && valid.size(0) == b && valid.scalar_type() == at::kBool,
                "ring attention: valid must be bool [", b, ", T], not ", valid.sizes());
    const int64_t rep = heads / kv;
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    at::Tensor q5 = q.to(at::kFloat).view({b, kv, rep, tq, d});
    at::Tensor qpos = positions.select(0, r);
    const float neg_inf = -std::numeric_limits<float>::infinity();
    at::Tensor out = at::zeros({b, kv, rep, tq, d}, q.options().dtype(at::kFloat));
    at::Tensor lse = at::full({b, kv, rep, tq}, neg_inf, q.options().dtype(at::kFloat));
    at::Tensor cur = stack_kv(k, v);
    for (int step = 0; step < n; ++step) {
      const int src = (r - step + n) % n;
      at::Tensor next;
      Exchange ex{{}, g->timeout};
      if (step + 1 < n) {
        next = at::empty_like(cur);
        ex = post(*g, cur, next, step);
      }
      const int64_t tk = cur.size(3);
      auto tile = [&](int64_t at_row, int64_t len, const at::Tensor& m, const at::Tensor& kf, const at::Tensor& vf) {
        at::Tensor s = scores(fold_rows(q5, at_row, len), kf, m, rep, scale);
        at::Tensor lse_b = at::logsumexp(s, -1);
        at::Tensor p = s.sub_(finite_or_zero(lse_b).unsqueeze(-1)).exp_();
        at::Tensor o_b = at::matmul(p.view({b, kv, rep * len, tk}), vf).view({b, kv, rep, len, d});
        at::Tensor o = out.narrow(3, at_row, len), l = lse.narrow(3, at_row, len);
        at::Tensor merged = at::logaddexp(l, lse_b);
        at::Tensor base = finite_or_zero(merged);
        o.copy_(o * at::exp(l - base).unsqueeze(-1) + o_b * at::exp(lse_b - base).unsqueeze(-1));
        l.copy_(merged);
      };
      each_visible_tile(cur, qpos, positions.select(0, src), valid, tile_scores, heads, tile);
      if (step + 1 < n) {
        ex.wait();
        cur = next;
      }
    }
    at::Tensor result = out.view({b, heads, tq, d}).to(q.scalar_type());
    // The output as returned (in the inputs' dtype, as flash attention keeps it), not fp32.
    ctx->save_for_backward({q, k, v, result, lse, positions, valid});
    ctx->saved_data["group"] = g;
    ctx->saved_data["tile_scores"] = tile_scores;
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &out = saved[3], &lse = saved[4];
    const at::Tensor &positions = saved[5], &valid = saved[6];
    Group g = ctx->saved_data.at("group").toCustomClass<CpGroup>();
    const int64_t tile_scores = ctx->saved_data.at("tile_scores").toInt();
    const int n = g->size(), r = g->rank();
    const int64_t b = q.size(0), heads = q.size(1), tq = q.size(2), d = q.size(3), kv = k.size(1);
    const int64_t rep = heads / kv;
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    at::Tensor q5 = q.to(at::kFloat).view({b, kv, rep, tq, d});
    at::Tensor d_out = grads[0].to(at::kFloat).reshape({b, kv, rep, tq, d});
    at::Tensor row = (d_out * out.to(at::kFloat).view({b, kv, rep, tq, d})).sum(-1, /*keepdim=*/true);
    at::Tensor base = finite_or_zero(lse).unsqueeze(-1);
    at::Tensor qpos = positions.select(0, r);
    at::Tensor dq = at::zeros_like(q5);
    at::Tensor cur = stack_kv(k, v);
    // The gradients of the chunk `cur` holds, [2, B, KV, Tk, D] fp32, travelling with it.
    at::Tensor acc = at::zeros(cur.sizes(), cur.options().dtype(at::kFloat));
    for (int step = 0; step < n; ++step) {
      const int src = (r - step + n) % n;
      // The chunk itself moves on while its block is computed (it is only read); its gradients
      // follow once the block has added to them.
      at::Tensor next;
      Exchange a{{}, g->timeout};
      if (step + 1 < n) {
        next = at::empty_like(cur);
        a = post(*g, cur, next, 2 * step);
      }
      const int64_t tk = cur.size(3);
      auto tile = [&](int64_t at_row, int64_t len, const at::Tensor& m, const at::Tensor& kf, const at::Tensor& vf) {
        at::Tensor q_t = fold_rows(q5, at_row, len), d_out_t = fold_rows(d_out, at_row, len);
        at::Tensor p = scores(q_t, kf, m, rep, scale).sub_(base.narrow(3, at_row, len)).exp_();
        at::Tensor p2 = p.view({b, kv, rep * len, tk});
        acc.select(0, 1).add_(at::matmul(p2.transpose(-1, -2), d_out_t));
        at::Tensor ds = at::matmul(d_out_t, vf.transpose(-1, -2))
                            .view({b, kv, rep, len, tk})
                            .sub_(row.narrow(3, at_row, len))
                            .mul_(p)
                            .view({b, kv, rep * len, tk});
        dq.narrow(3, at_row, len).add_(at::matmul(ds, kf).mul_(scale).view({b, kv, rep, len, d}));
        acc.select(0, 0).add_(at::matmul(ds.transpose(-1, -2), q_t).mul_(scale));
      };
      each_visible_tile(cur, qpos, positions.select(0, src), valid, tile_scores, heads, tile);
      if (n == 1) break;
      // The chunk and its gradients move on; after the last block only the gradients go, home.
      if (step + 1 < n) {
        at::Tensor next_acc = at::empty_like(acc);
        a.wait();
        Exchange c = post(*g, acc, next_acc, 2 * step + 1);
        c.wait();
        cur = next;
        acc = next_acc;
      } else {
        at::Tensor home = at::empty_like(acc);
        Exchange c = post(*g, acc, home, 2 * step + 1);
        c.wait();
        acc = home;
      }
    }
    at::Tensor dq_out = dq.view({b, heads, tq, d}).to(q.scalar_type());
    return {dq_out,       acc.select(0, 0).to(k.scalar_type()), acc.select(0, 1).to(v.scalar_type()),
            at::Tensor(), at::Tensor(),                          at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace mm_ring

extern "C" {

// q [B, H, Tl, D], k and v [B, KV, Tl, D] (this rank's tokens, after RoPE), positions [cp, Tl]
// (int64: every rank's global positions), valid [B, T] (bool: the real tokens of the padded
// sequence), tile_scores: the most scores a tile of query rows computes at once (above 0).
// Returns the attention output [B, H, Tl, D] as a new tensor the caller owns.
char* mm_cp_ring_attention(mm_pg* pg, at::Tensor* q, at::Tensor* k, at::Tensor* v, at::Tensor* positions,
                           at::Tensor* valid, int64_t tile_scores, at::Tensor** out) {
  return guarded([&] {
    TORCH_CHECK(tile_scores > 0, "ring attention: tile_scores must be above 0, not ", tile_scores);
    *out = new at::Tensor(
        mm_ring::RingAttention::apply(*q, *k, *v, *positions, *valid, mm_shim::group_ref(pg), tile_scores));
  });
}

}  // extern "C"
