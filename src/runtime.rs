//! Facts about the libtorch this process runs on: version, library directory,
//! CUDA devices, cuDNN. Used by `mos env` and by error messages.
use std::path::{Path, PathBuf};

/// The libtorch version this build of mos was compiled for (tch 0.24).
pub const EXPECTED_LIBTORCH: &str = "2.11.0";

/// glibc malloc settings made by [`tune_malloc`]: blocks up to 32 MiB (the most
/// glibc allows) come from the heap instead of fresh `mmap`s, and up to 1 GiB of
/// freed heap stays with the process.
const MMAP_THRESHOLD: i32 = 32 << 20;
const TRIM_THRESHOLD: i32 = 1 << 30;

/// The environment variables with which a user sets glibc's malloc; when one is
/// set, [`tune_malloc`] leaves malloc alone.
pub const MALLOC_ENV: [&str; 4] = [
    "GLIBC_TUNABLES",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
];

/// [`malloc_setting`] when malloc keeps glibc's (or another C library's) defaults.
const MALLOC_DEFAULT: &str = "C library default";

/// What [`tune_malloc`] did, for `mos env`.
static MALLOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Keeps freed tensor memory in the process (glibc only). libtorch allocates
/// every CPU tensor with malloc; by default glibc serves the large ones with
/// `mmap` and unmaps them on free, so each training step or batch faults in and
/// zeroes its activations again. Leaves malloc alone when the user set it through
/// the environment ([`MALLOC_ENV`]) and on other C libraries. Call it first in
/// `main`, before threads start; [`malloc_setting`] says what it did.
pub fn tune_malloc() {
    let state = if let Some(var) = MALLOC_ENV.iter().find(|v| std::env::var_os(v).is_some()) {
        format!("as set by the environment ({var})")
    } else if set_malloc_thresholds() {
        "tuned (heap up to 32 MiB blocks, 1 GiB kept on free)".to_string()
    } else {
        MALLOC_DEFAULT.to_string()
    };
    let _ = MALLOC.set(state);
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_malloc_thresholds() -> bool {
    // SAFETY: mallopt only changes glibc's parameters; called before any other
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_malloc_thresholds() -> bool {
    false
}

/// What [`tune_malloc`] did in this process ("C library default" if it was not
/// called, as in a library user's program).
pub fn malloc_setting() -> String {
    MALLOC
        .get()
        .cloned()
        .unwrap_or_else(|| MALLOC_DEFAULT.to_string())
}

/// The directory of the `libtorch_cpu.so` mapped into this process (Linux), else the
/// directory the binary was built against.
pub fn libtorch_lib_dir() -> Option<PathBuf> {
    if let Ok(maps) = std::fs::read_to_string("/proc/self/maps") {
        for line in maps.lines() {
            if let Some(idx) = line.find('/') {
                let path = Path::new(&line[idx..]);
                if path.file_name().and_then(|n| n.to_str()) == Some("libtorch_cpu.so") {
                    return path.parent().map(Path::to_path_buf);
                }
            }
        }
    }
    option_env!("MOS_LIBTORCH_LIB").map(PathBuf::from)
}

/// The libtorch version read from the installation next to `lib_dir`: `version.py`
/// (PyPI wheel) or `build-version` (libtorch zip).
pub fn libtorch_version(lib_dir: &Path) -> Option<String> {
    let root = lib_dir.parent()?;
    if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("__version__") {
                let v = rest
                    .trim_start_matches([' ', '='])
                    .trim()
                    .trim_matches(['\'', '"']);
                return Some(v.to_string());
            }
        }
    }
    std::fs::read_to_string(root.join("build-version"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// A device as `--device` spells it (`cpu`, `cuda:0`), for logs and messages.
pub fn device_name(device: tch::Device) -> String {
    match device {
        tch::Device::Cpu => "cpu".into(),
        tch::Device::Cuda(n) => format!("cuda:{n}"),
        tch::Device::Mps => "mps".into(),
        tch::Device::Vulkan => "vulkan".into(),
    }
}

/// The command-line spelling of a `clap::ValueEnum` value (e.g. `--precision fp32`).
pub fn value_name<T: clap::ValueEnum>(value: &T) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// Number of CUDA devices libtorch can use (0 when CUDA is unavailable).
pub fn cuda_device_count() -> usize {
    if tch::Cuda::is_available() {
        tch::Cuda::device_count().max(0) as usize
    } else {
        0
    }
}

/// One line naming the libtorch in use, for error messages.
pub fn libtorch_summary() -> String {
    match libtorch_lib_dir() {
        Some(dir) => format!(
            "libtorch {} at {}",
            libtorch_version(&dir).unwrap_or_else(|| "(unknown version)".into()),
            dir.display()
        ),
        None => "libtorch (location unknown)".into(),
    }
}

/// Names of the CUDA devices, through the CUDA driver API (`libcuda.so.1`, already
/// loaded by libtorch when CUDA is available). `None` where the driver cannot be asked.
pub fn cuda_device_names(count: usize) -> Option<Vec<String>> {
    if count == 0 {
        return Some(Vec::new());
    }
    type CuInit = unsafe extern "C" fn(u32) -> i32;
    type CuDeviceGet = unsafe extern "C" fn(*mut i32, i32) -> i32;
    type CuDeviceGetName = unsafe extern "C" fn(*mut libc::c_char, i32, i32) -> i32;
    // SAFETY: dlopen/dlsym with NUL-terminated names; the symbols have the documented
    // CUDA driver API signatures; the name buffer outlives the call and its length is
    // passed; the handle is never closed (the driver stays loaded for libtorch anyway).
    unsafe {
        let handle = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if handle.is_null() {
            return None;
        }
        let init = libc::dlsym(handle, c"cuInit".as_ptr());
        let get = libc::dlsym(handle, c"cuDeviceGet".as_ptr());
        let get_name = libc::dlsym(handle, c"cuDeviceGetName".as_ptr());
        if init.is_null() || get.is_null() || get_name.is_null() {
            return None;
        }
        let init: CuInit = std::mem::transmute(init);
        let get: CuDeviceGet = std::mem::transmute(get);
        let get_name: CuDeviceGetName = std::mem::transmute(get_name);
        if init(0) != 0 {
            return None;
        }
        let mut names = Vec::with_capacity(count);
        for ordinal in 0..count {
            let mut dev = 0i32;
            if get(&mut dev, ordinal as i32) != 0 {
                return None;
            }
            let mut buf = [0 as libc::c_char; 256];
            if get_name(buf.as_mut_ptr(), buf.len() as i32, dev) != 0 {
                return None;
            }
            let name = std::ffi::CStr::from_ptr(buf.as_ptr());
            names.push(name.to_string_lossy().into_owned());
        }
        Some(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_version_py_and_build_version() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("lib");
        std::fs::create_dir(&lib).unwrap();
        assert_eq!(libtorch_version(&lib), None);
        std::fs::write(dir.path().join("build-version"), "2.11.0+cpu\n").unwrap();
        assert_eq!(libtorch_version(&lib).as_deref(), Some("2.11.0+cpu"));
        std::fs::write(
            dir.path().join("version.py"),
            "__all__ = ['__version__']\n__version__ = '2.11.0+cu130'\n",
        )
        .unwrap();
        assert_eq!(libtorch_version(&lib).as_deref(), Some("2.11.0+cu130"));
    }

    #[test]
    fn finds_the_mapped_libtorch() {
        // Touch libtorch so that it is mapped, then find it.
        let _ = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu));
        let dir = libtorch_lib_dir().expect("libtorch_cpu.so is mapped");
        assert!(dir.join("libtorch_cpu.so").exists(), "{}", dir.display());
        assert_eq!(cuda_device_names(0), Some(vec![]));
    }
}
