//! Link-time settings for the `mos` binaries (and test binaries).
//!
//! * rpath: the libtorch library directory that torch-sys built against is
//!   embedded (as RUNPATH, so `LD_LIBRARY_PATH` can still override it), so
//!   `target/release/mos` runs with no environment variables set.
//! * CUDA registration: with the default `--as-needed`, `libtorch_cuda.so` is
//!   dropped from the binary because no symbol of it is referenced directly; its
//!   static initialisers then never run and CUDA is silently unavailable. When
//!   the library exists we link it again with `--no-as-needed`.
//! * c10d shim (`src/dist/shim.cpp`, docs/distributed.md): compiled against the same
//!   libtorch headers and C++ ABI as torch-sys; its gloo declarations are
//!   `src/dist/gloo_decl`. The NCCL part (`src/dist/shim_nccl.cpp`) is compiled only
//!   when `libtorch_cuda.so`, `nccl.h` and the CUDA runtime headers are found (then
//!   the `mos_nccl` cfg is set).
//! * cuDNN's float32 setting (`src/runtime_tf32.cpp`), compiled the same way.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Exported by torch-sys (`links = "tch"`, `cargo:libtorch_lib=...`).
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-env=MOS_LIBTORCH_LIB={lib}");
    let lib_dir = Path::new(&lib);
    build_shim(lib_dir);
    for cuda_lib in ["torch_cuda", "torch_cuda_cu", "torch_cuda_cpp", "torch_hip"] {
        if lib_dir.join(format!("lib{cuda_lib}.so")).exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-l{cuda_lib}");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
    }
}

/// The first directory among `candidates` that holds `file` (a file or directory).
fn find_dir(candidates: &[PathBuf], file: &str) -> Option<PathBuf> {
    candidates.iter().find(|d| d.join(file).exists()).cloned()
}

fn build_shim(lib_dir: &Path) {
    for f in ["shim.h", "shim.cpp", "shim_nccl.cpp"] {
        println!("cargo:rerun-if-changed=src/dist/{f}");
    }
    println!("cargo:rerun-if-changed=src/runtime_tf32.cpp");
    println!("cargo:rerun-if-changed=src/dist/gloo_decl");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-env-changed=MOS_CUDA_INCLUDE");
    println!("cargo:rerun-if-env-changed=MOS_NCCL_INCLUDE");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo::rustc-check-cfg=cfg(mos_nccl)");
    let root = lib_dir.parent().expect("libtorch lib has a parent");
    let include = root.join("include");
    // As torch-sys: the CXX11 ABI of the PyPI wheels and libtorch zips since 2.7 is 1.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let base = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .pic(true)
            .warnings(false)
            .flag_if_supported("-Wno-interference-size")
            .include(&include)
            .include(include.join("torch/csrc/api/include"))
            .flag("-std=c++17")
            .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
            .flag("-DGLOG_USE_GLOG_EXPORT");
        b
    };
    // CUDA and NCCL headers: the user's (MOS_CUDA_INCLUDE / MOS_NCCL_INCLUDE, lists of
    // directories separated by ':'), the PyPI wheels' (site/nvidia/...), a CUDA
    // toolkit. cuda_runtime.h needs crt/ (the toolkit, or PyPI nvidia-cuda-crt) and
    // nv/target (CCCL: the toolkit, or PyPI nvidia-cuda-cccl); the torch wheel alone
    // ships neither, so NCCL support needs one of them.
    let site = root.parent().map(Path::to_path_buf).unwrap_or_default();
    let env_dirs = |v: &str| -> Vec<PathBuf> {
        std::env::var(v)
            .map(|s| {
                s.split(':')
                    .filter(|d| !d.is_empty())
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut cuda_dirs = env_dirs("MOS_CUDA_INCLUDE");
    cuda_dirs.extend([
        site.join("nvidia/cu13/include"),
        site.join("nvidia/cu13/include/cccl"),
        site.join("nvidia/cuda_runtime/include"),
        PathBuf::from("/usr/local/cuda/include"),
    ]);
    let mut nccl_dirs = env_dirs("MOS_NCCL_INCLUDE");
    nccl_dirs.extend([
        site.join("nvidia/nccl/include"),
        PathBuf::from("/usr/include"),
    ]);
    let cuda_inc: Option<Vec<PathBuf>> = ["cuda_runtime_api.h", "crt/host_config.h", "nv/target"]
        .iter()
        .map(|f| find_dir(&cuda_dirs, f))
        .collect();
    let nccl_inc = find_dir(&nccl_dirs, "nccl.h");
    let mut gloo = base();
    gloo.include("src/dist/gloo_decl")
        .define("USE_C10D_GLOO", None);
    let nccl = match (
        lib_dir.join("libtorch_cuda.so").exists(),
        cuda_inc,
        nccl_inc,
    ) {
        (true, Some(cuda), Some(nccl)) => Some((cuda, nccl)),
        _ => None,
    };
    if let Some((cuda, nccl_dir)) = &nccl {
        gloo.define("MOS_WITH_NCCL", None);
        let mut b = base();
        let mut seen = Vec::new();
        for d in cuda {
            if !seen.contains(d) {
                b.include(d);
                seen.push(d.clone());
            }
        }
        b.include(nccl_dir)
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .file("src/dist/shim_nccl.cpp")
            .compile("mos_c10d_nccl");
        println!("cargo:rustc-cfg=mos_nccl");
    }
    gloo.file("src/dist/shim.cpp").compile("mos_c10d");
    base()
        .file("src/runtime_tf32.cpp")
        .compile("mos_runtime_tf32");
    if nccl.is_some() {
        // The NCCL shim's calls into libc10_cuda resolve through libtorch_cuda's
        // dependencies; name it so the linker sees it.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-lc10_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
