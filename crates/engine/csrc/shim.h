// What the shim's translation units share: the handle types behind the C ABI and the
// conventions every entry point follows (see c10d_shim.cpp's header for the list).
#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>
#include <torch/custom_class.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

struct mm_store {
  c10::intrusive_ptr<c10d::Store> store;
};

struct mm_pg {
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
};

namespace mm_shim {

// What an autograd node of the shim (tp_regions.cpp, ring_attention.cpp) keeps of its group: a
// counted reference to the c10d Backend, so a graph outlives the Rust ProcessGroup that built
// it. It sits in AutogradContext::saved_data, a map of IValues, which can hold a C++ object
// only as a registered custom class: c10d_shim.cpp registers it (as mm_engine.GroupRef) once,
// at load time of an object file the linker always keeps.
struct GroupRef : torch::CustomClassHolder {
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;

  GroupRef(c10::intrusive_ptr<c10d::Backend> b, std::chrono::milliseconds t) : backend(std::move(b)), timeout(t) {}
  int rank() const { return backend->getRank(); }
  int size() const { return backend->getSize(); }
};

inline c10::intrusive_ptr<GroupRef> group_ref(const mm_pg* pg) {
  return c10::make_intrusive<GroupRef>(pg->backend, pg->timeout);
}

// A malloc'd copy the Rust side frees with mm_c10d_free_str.
inline char* dup_str(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, s.data(), s.size());
    out[s.size()] = '\0';
  }
  return out;
}

// Runs `f`; NULL when it returned, the message of whatever it threw otherwise. Every
// extern "C" function body goes through this: no C++ exception may cross the boundary.
template <typename F>
char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error& e) {
    return dup_str(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return dup_str(e.what());
  } catch (...) {
    return dup_str("unknown C++ exception");
  }
}

inline void wait_work(const c10::intrusive_ptr<c10d::Work>& work, std::chrono::milliseconds timeout) {
  if (!work->wait(timeout)) {
    throw std::runtime_error("collective did not complete");
  }
}

}  // namespace mm_shim
