//! Compiles the c10d shim (csrc/c10d_shim.cpp, and csrc/tp_regions.cpp for the
//! tensor-parallel autograd functions) against the libtorch that torch-sys found, and sets an
//! rpath to torch/lib so `mm-engine` runs without LD_LIBRARY_PATH on the machine that built it.
//!
//! torch-sys publishes its libtorch lib dir through its `links = "tch"` key, which reaches
//! this script as DEP_TCH_LIBTORCH_LIB (we depend on torch-sys directly for that reason).
//! With a pip-installed torch the layout is site-packages/torch/{lib,include} and the
//! NCCL/CUDA headers sit beside it in site-packages/nvidia/{nccl,cu13}/include.

use std::env;
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=csrc");
    println!("cargo:rerun-if-env-changed=MM_ENGINE_NO_NCCL");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo::rustc-check-cfg=cfg(mm_nccl)");

    let lib = match env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(v) => PathBuf::from(v),
        Err(_) => {
            eprintln!(
                "mm-engine build: torch-sys did not report its libtorch directory \
                 (DEP_TCH_LIBTORCH_LIB). Build through `make` so that torch-sys finds the \
                 project venv (LIBTORCH_USE_PYTORCH=1, VIRTUAL_ENV=.venv)."
            );
            std::process::exit(1);
        }
    };
    let torch_dir = lib.parent().expect("torch lib dir has a parent").to_path_buf();
    let include = torch_dir.join("include");
    let api_include = include.join("torch/csrc/api/include");
    for dir in [&include, &api_include] {
        if !dir.is_dir() {
            eprintln!("mm-engine build: libtorch headers not found at {}", dir.display());
            std::process::exit(1);
        }
    }

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(&api_include)
        .define("USE_C10D_GLOO", None)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .file("csrc/c10d_shim.cpp")
        .file("csrc/cuda_info.cpp")
        .file("csrc/recompute.cpp")
        .file("csrc/ring_attention.cpp")
        .file("csrc/tp_regions.cpp");

    if let Some(includes) = nccl_headers(&torch_dir, &lib) {
        build.define("USE_C10D_NCCL", None);
        for dir in includes {
            build.include(dir);
        }
        println!("cargo:rustc-cfg=mm_nccl");
        // ProcessGroupNCCL lives in libtorch_cuda: keep it linked even under --as-needed,
        // which also makes CUDA visible to tch at run time.
        println!("cargo:rustc-link-arg-bins=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg-bins=-ltorch_cuda");
        println!("cargo:rustc-link-arg-bins=-Wl,--as-needed");
        // csrc/cuda_info.cpp (device name, caching allocator statistics) calls into c10_cuda:
        // every target that links the library needs it, tests included.
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    build.compile("mm_c10d");

    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-env=MM_ENGINE_LIBTORCH_LIB={}", lib.display());
}

/// NCCL support is compiled in when this libtorch has CUDA and the NCCL and CUDA headers
/// are in the venv (scripts/setup.sh installs the header wheels that complete them);
/// MM_ENGINE_NO_NCCL=1 turns it off.
fn nccl_headers(torch_dir: &Path, lib: &Path) -> Option<Vec<PathBuf>> {
    if env::var_os("MM_ENGINE_NO_NCCL").is_some() || !lib.join("libtorch_cuda.so").exists() {
        return None;
    }
    let site = torch_dir.parent()?;
    let nccl = site.join("nvidia/nccl/include");
    let cuda = site.join("nvidia/cu13/include");
    let complete = nccl.join("nccl.h").exists()
        && ["cuda_runtime_api.h", "crt/host_config.h", "nv/target"].iter().all(|h| cuda.join(h).exists());
    if !complete {
        println!("cargo:warning=mm-engine: building without NCCL: CUDA/NCCL headers incomplete in {}", site.display());
        return None;
    }
    Some(vec![nccl, cuda])
}
