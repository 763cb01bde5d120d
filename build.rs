//! Link-time settings for the `mos` binaries (and test binaries).
//!
//! * rpath: the libtorch library directory that torch-sys built against is
//!   embedded (as RUNPATH, so `LD_LIBRARY_PATH` can still override it), so
//!   `target/release/mos` runs with no environment variables set.
//! * CUDA registration: with the default `--as-needed`, `libtorch_cuda.so` is
//!   dropped from the binary because no symbol of it is referenced directly; its
//!   static initialisers then never run and CUDA is silently unavailable. When
//!   the library exists we link it again with `--no-as-needed`.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Exported by torch-sys (`links = "tch"`, `cargo:libtorch_lib=...`).
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-env=MOS_LIBTORCH_LIB={lib}");
    let lib_dir = Path::new(&lib);
    for cuda_lib in ["torch_cuda", "torch_cuda_cu", "torch_cuda_cpp", "torch_hip"] {
        if lib_dir.join(format!("lib{cuda_lib}.so")).exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-l{cuda_lib}");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
    }
}
