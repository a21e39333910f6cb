// What the shim's translation units share: the handle types behind the C ABI and the
// conventions every entry point follows (see c10d_shim.cpp's header for the list).
#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

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
