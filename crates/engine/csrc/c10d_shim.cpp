// A C ABI over libtorch's own c10d: TCPStore, PrefixStore, ProcessGroupGloo and (when
// compiled with USE_C10D_NCCL) ProcessGroupNCCL. tch binds no process groups; this shim is
// the smallest surface the engine needs.
//
// Conventions:
// - every fallible function returns NULL on success or a malloc'd, NUL-terminated error
//   message that the caller frees with mm_c10d_free_str. No C++ exception crosses the
//   boundary: each entry point catches everything.
// - tensors arrive as the at::Tensor* that tch::Tensor::as_mut_ptr() hands out.
// - collectives are synchronous: the call waits for the work to finish (or to time out).
// - shim.h holds the handle types and these conventions' helpers; tp_regions.cpp adds the
//   tensor-parallel autograd functions over the same mm_pg.
#include "shim.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/headeronly/version.h>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <cstdint>
#include <vector>

using mm_shim::dup_str;
using mm_shim::guarded;
using mm_shim::wait_work;

namespace {

// shim.h's GroupRef, registered at load time of this object file, which every binary links
// (the store and process-group functions are in it).
const auto group_ref_class = torch::class_<mm_shim::GroupRef>("mm_engine", "GroupRef");

c10d::ReduceOp to_op(int op) {
  switch (op) {
    case 1:
      return c10d::ReduceOp::MAX;
    case 2:
      return c10d::ReduceOp::MIN;
    case 3:
      return c10d::ReduceOp::PRODUCT;
    default:
      return c10d::ReduceOp::SUM;
  }
}

}  // namespace

extern "C" {

void mm_c10d_free_str(char* s) { std::free(s); }

// The libtorch version the engine was compiled against.
void mm_torch_version(int* major, int* minor, int* patch) {
  *major = TORCH_VERSION_MAJOR;
  *minor = TORCH_VERSION_MINOR;
  *patch = TORCH_VERSION_PATCH;
}

int mm_c10d_has_nccl() {
#ifdef USE_C10D_NCCL
  return 1;
#else
  return 0;
#endif
}

char* mm_store_tcp(const char* host, uint16_t port, int world, int is_server, int64_t timeout_ms,
                   mm_store** out) {
  return guarded([&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server != 0;
    opts.numWorkers = static_cast<std::size_t>(world);
    opts.waitWorkers = true;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    *out = new mm_store{store};
  });
}

char* mm_store_prefix(mm_store* base, const char* prefix, mm_store** out) {
  return guarded([&] {
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), base->store);
    *out = new mm_store{store};
  });
}

char* mm_store_set(mm_store* s, const char* key, const uint8_t* data, size_t len) {
  return guarded([&] {
    std::vector<uint8_t> value(data, data + len);
    s->store->set(std::string(key), value);
  });
}

// Waits for the key (up to the store's timeout). The value is malloc'd into *data.
char* mm_store_get(mm_store* s, const char* key, uint8_t** data, size_t* len) {
  return guarded([&] {
    std::vector<uint8_t> value = s->store->get(std::string(key));
    *len = value.size();
    *data = static_cast<uint8_t*>(std::malloc(value.size() == 0 ? 1 : value.size()));
    if (*data == nullptr) throw std::bad_alloc();
    if (!value.empty()) std::memcpy(*data, value.data(), value.size());
  });
}

void mm_c10d_free_bytes(uint8_t* data) { std::free(data); }

void mm_store_free(mm_store* s) { delete s; }

// `hostname` is the address this rank binds its Gloo transport to (the address other
// ranks reach it at); NULL or "" lets Gloo resolve this machine's hostname.
char* mm_pg_gloo(mm_store* s, int rank, int size, const char* hostname, int64_t timeout_ms,
                 mm_pg** out) {
  return guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    if (hostname != nullptr && hostname[0] != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(hostname));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(s->store, rank, size, opts);
    *out = new mm_pg{pg, timeout};
  });
}

char* mm_pg_nccl(mm_store* s, int rank, int size, int64_t timeout_ms, mm_pg** out) {
#ifdef USE_C10D_NCCL
  return guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = timeout;
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(s->store, rank, size, opts);
    *out = new mm_pg{pg, timeout};
  });
#else
  (void)s;
  (void)rank;
  (void)size;
  (void)timeout_ms;
  (void)out;
  return dup_str("this mm-engine was built without NCCL (the libtorch it was built against has no CUDA)");
#endif
}

void mm_pg_free(mm_pg* pg) { delete pg; }

char* mm_pg_allreduce(mm_pg* pg, at::Tensor* t, int op) {
  return guarded([&] {
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions opts;
    opts.reduceOp = to_op(op);
    opts.timeout = pg->timeout;
    wait_work(pg->backend->allreduce(ts, opts), pg->timeout);
  });
}

char* mm_pg_broadcast(mm_pg* pg, at::Tensor* t, int root) {
  return guarded([&] {
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = pg->timeout;
    wait_work(pg->backend->broadcast(ts, opts), pg->timeout);
  });
}

// out has size world * in.numel(), rank r's input lands at [r*n, (r+1)*n).
char* mm_pg_allgather(mm_pg* pg, at::Tensor* out, at::Tensor* in) {
  return guarded([&] {
    c10d::AllgatherOptions opts;
    opts.timeout = pg->timeout;
    wait_work(pg->backend->_allgather_base(*out, *in, opts), pg->timeout);
  });
}

// in has size world * out.numel(); rank r receives the reduction of slice r.
char* mm_pg_reduce_scatter(mm_pg* pg, at::Tensor* out, at::Tensor* in, int op) {
  return guarded([&] {
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = to_op(op);
    opts.timeout = pg->timeout;
    wait_work(pg->backend->_reduce_scatter_base(*out, *in, opts), pg->timeout);
  });
}

char* mm_pg_send(mm_pg* pg, at::Tensor* t, int dst, int tag) {
  return guarded([&] {
    std::vector<at::Tensor> ts{*t};
    wait_work(pg->backend->send(ts, dst, tag), pg->timeout);
  });
}

char* mm_pg_recv(mm_pg* pg, at::Tensor* t, int src, int tag) {
  return guarded([&] {
    std::vector<at::Tensor> ts{*t};
    wait_work(pg->backend->recv(ts, src, tag), pg->timeout);
  });
}

// Posts every transfer (sends and receives, in order) and then waits for all of them, as
// torch.distributed.batch_isend_irecv does, so two ranks sending to each other at once do not
// deadlock (pipeline parallelism's steady state). NCCL's transfers go in one coalesced group
// (on one stream per pair of ranks, a send posted alone would wait for the peer's receive);
// Gloo posts each op asynchronously. Tensors are matched per pair of ranks in posting order.
char* mm_pg_batch_p2p(mm_pg* pg, int n, at::Tensor** ts, const int* peers, const int* is_send, int tag) {
  return guarded([&] {
    const bool coalesce = pg->backend->getBackendName() == "nccl";
    if (coalesce) {
      pg->backend->startCoalescing();
    }
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    works.reserve(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
      std::vector<at::Tensor> one{*ts[i]};
      works.push_back(is_send[i] != 0 ? pg->backend->send(one, peers[i], tag)
                                      : pg->backend->recv(one, peers[i], tag));
    }
    if (coalesce) {
      wait_work(pg->backend->endCoalescing(), pg->timeout);
    } else {
      for (auto& w : works) {
        wait_work(w, pg->timeout);
      }
    }
  });
}

// Makes `grad` the .grad of the leaf `var` (tch has no setter): the data-parallel engine gives a
// parameter that received no gradient on this rank, but did on another, the reduced gradient.
char* mm_tensor_set_grad(at::Tensor* var, at::Tensor* grad) {
  return guarded([&] { var->mutable_grad() = *grad; });
}

char* mm_pg_barrier(mm_pg* pg) {
  return guarded([&] {
    c10d::BarrierOptions opts;
    opts.timeout = pg->timeout;
    wait_work(pg->backend->barrier(opts), pg->timeout);
  });
}

}  // extern "C"
