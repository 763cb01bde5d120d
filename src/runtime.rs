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

extern "C" {
    fn mos_cudnn_set_allow_tf32(allow: i32);
    fn mos_cudnn_allow_tf32() -> i32;
}

/// Makes cuDNN compute float32 convolutions in float32 for the rest of the
/// process: libtorch's default runs them in TF32 on GPUs that have it (10 bits of
/// mantissa), which would change every model's numbers on such a GPU without a
/// word. BiT's `--precision tf32` still asks for TF32 explicitly per convolution;
/// torchvision's ResNets, ViTs and TorchScript modules follow this setting. The
/// same as `torch.backends.cudnn.allow_tf32 = False`. Call it first in `main`.
pub fn float32_convolutions() {
    // SAFETY: sets one flag of libtorch's global context; no other thread runs yet.
    unsafe { mos_cudnn_set_allow_tf32(0) }
}

/// Whether cuDNN may run float32 convolutions in TF32 (see [`float32_convolutions`]).
pub fn cudnn_allows_tf32() -> bool {
    // SAFETY: reads one flag of libtorch's global context.
    unsafe { mos_cudnn_allow_tf32() != 0 }
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

/// The first libtorch error of this process that reached a panic, as
/// [`install_panic_hook`] recorded it (cleaned).
static TORCH_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// The prefix of a panic of `Result::unwrap()` (tch's panicking ops unwrap their
/// fallible twins).
const UNWRAP_ERR: &str = "called `Result::unwrap()` on an `Err` value: ";

/// Fails the way a libtorch error inside a panicking tch op fails, with `message`:
/// `main` (and [`catch_torch`]) report it as `libtorch: <message>`, without a
/// backtrace. For errors that arise where no `Result` can be returned (a
/// user's TorchScript module failing inside a forward pass).
pub fn torch_failure(message: String) -> ! {
    panic!("{UNWRAP_ERR}{:?}", tch::TchError::Torch(message))
}

/// Lines of libtorch messages that say nothing to a user of mos.
const NOISE: [&str; 5] = [
    "Exception raised from",
    "frame #",
    "CUDA kernel errors might be asynchronously reported",
    "For debugging consider passing CUDA_LAUNCH_BLOCKING",
    "Compile with `TORCH_USE_CUDA_DSA`",
];

/// A panic payload's text (`panic!` with a message gives a `String` or a `&str`).
pub fn payload_text(payload: &(dyn std::any::Any + Send)) -> Option<&str> {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
}

/// Whether a panic location is in the tch crate's sources.
fn in_tch(file: &str) -> bool {
    file.contains("/tch-") || file.starts_with("tch/") || file.contains("/tch/src/")
}

/// Reads the text of a Rust string literal as `Debug` writes it (`"a\n\"b\""`
/// → `a`, newline, `"b"`), up to its closing quote; `None` if `s` does not start
/// with a quote.
fn undebug_str(s: &str) -> Option<String> {
    let mut chars = s.strip_prefix('"')?.chars();
    let mut out = String::new();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                '0' => out.push('\0'),
                'u' => {
                    let rest: String = chars.by_ref().take_while(|&c| c != '}').collect();
                    let code = u32::from_str_radix(rest.trim_start_matches('{'), 16).ok()?;
                    out.push(char::from_u32(code)?);
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    Some(out)
}

/// The libtorch error in a panic message, if it is one: tch's panicking ops panic
/// with `called Result::unwrap() on an Err value: Torch("…")` (or another
/// `TchError`); a panic located in tch's sources counts whatever its message.
/// Returns the error cleaned by [`clean_torch_message`].
pub fn torch_panic_message(message: &str, located_in_tch: bool) -> Option<String> {
    let err = message.strip_prefix(UNWRAP_ERR);
    let tch_variant = err.and_then(|e| {
        let (variant, rest) = e.split_once('(')?;
        let known = [
            "Torch",
            "Kind",
            "Shape",
            "Convert",
            "FileFormat",
            "TensorNameNotFound",
        ];
        known.contains(&variant).then(|| {
            let text = undebug_str(rest).unwrap_or_else(|| rest.trim_end_matches(')').into());
            match variant {
                "Torch" => text,
                "Kind" => format!("tensor kind error: {text}"),
                "Shape" => format!("invalid shape: {text}"),
                v => format!("{v}: {text}"),
            }
        })
    });
    let text = match tch_variant {
        Some(t) => t,
        None if located_in_tch => err.unwrap_or(message).to_string(),
        None => return None,
    };
    Some(clean_torch_message(&text))
}

/// A libtorch error message without the C++ stack trace and the CUDA debugging
/// advice: the lines before them, trimmed.
pub fn clean_torch_message(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty() && !NOISE.iter().any(|n| l.trim_start().starts_with(n)))
        .collect();
    lines.join("\n")
}

/// Advice for a libtorch error: what the user can change. `memory` says which
/// flags bound memory use in the command at hand (e.g. "lower --batch").
pub fn torch_hint(message: &str, memory: &str) -> Option<String> {
    let m = message.to_ascii_lowercase();
    if m.contains("out of memory")
        || m.contains("not enough memory")
        || m.contains("can't allocate memory")
        || m.contains("cannot allocate memory")
    {
        Some(format!("out of memory: {memory}"))
    } else if m.contains("kernel size can't be greater than actual input size")
        || m.contains("output size is too small")
    {
        Some("the images are too small for the network: raise --crop (mos forward: larger images in --input)".into())
    } else if m.contains("expected all tensors to be on the same device") {
        Some("tensors on two devices: a mos bug, please report it with the command line; --device cpu avoids it".into())
    } else if m.contains("cuda") || m.contains("cudnn") || m.contains("cublas") {
        Some(format!(
            "a CUDA error: `mos env` shows the devices and the libtorch mos uses ({}); --device cpu runs without the GPU",
            libtorch_summary()
        ))
    } else {
        None
    }
}

/// Installs a panic hook that keeps libtorch errors (the panics of tch's
/// panicking ops, see [`torch_panic_message`]) quiet: their cleaned message is
/// recorded for [`catch_torch`] and the command boundary instead of a backtrace
/// being printed. Every other panic (a bug) is reported by the default hook.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let located = info.location().is_some_and(|l| in_tch(l.file()));
        match payload_text(info.payload()).and_then(|m| torch_panic_message(m, located)) {
            Some(msg) => {
                if let Ok(mut slot) = TORCH_PANIC.lock() {
                    slot.get_or_insert(msg);
                }
            }
            None => default(info),
        }
    }));
}

/// A libtorch error the panic hook recorded and nobody caught (a panic in a
/// thread whose end went unnoticed); clears the record.
pub fn take_recorded_torch_error() -> Option<String> {
    TORCH_PANIC.lock().ok().and_then(|mut s| s.take())
}

/// The libtorch error of a caught panic `payload`: from the payload itself, or as
/// the panic hook recorded it (a panic located in tch). Clears the record.
pub fn take_torch_error(payload: &(dyn std::any::Any + Send)) -> Option<String> {
    let recorded = take_recorded_torch_error();
    payload_text(payload)
        .and_then(|m| torch_panic_message(m, false))
        .or(recorded)
}

/// Runs `f`, turning a libtorch error that panics inside it (tch's panicking ops)
/// into an error `libtorch: <message>`; any other panic goes on unwinding.
pub fn catch_torch<T>(f: impl FnOnce() -> T) -> anyhow::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => Ok(v),
        Err(payload) => match take_torch_error(&*payload) {
            Some(msg) => Err(anyhow::anyhow!("libtorch: {msg}")),
            None => std::panic::resume_unwind(payload),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float32_convolutions_turns_cudnn_tf32_off() {
        assert!(cudnn_allows_tf32(), "libtorch's default allows TF32");
        float32_convolutions();
        assert!(!cudnn_allows_tf32());
    }

    #[test]
    fn a_torch_failure_is_reported_as_a_libtorch_error() {
        let e = catch_torch(|| torch_failure("the module failed".into())).unwrap_err();
        assert_eq!(e.to_string(), "libtorch: the module failed");
    }

    #[test]
    fn torch_panics_are_read_and_cleaned() {
        let raw = "called `Result::unwrap()` on an `Err` value: Torch(\"Calculated padded input size per channel: (6 x 11). Kernel size: (7 x 7). Kernel size can't be greater than actual input size\\nException raised from check_shape_forward at /pytorch/aten/src/ATen/native/Convolution.cpp:705 (most recent call first):\\nframe #0: c10::Error::Error(c10::SourceLocation, std::__cxx11::basic_string<char>) + 0x9d (0x7f in libc10.so)\\nframe #1: <unknown function>\\n\")";
        assert_eq!(
            torch_panic_message(raw, false).unwrap(),
            "Calculated padded input size per channel: (6 x 11). Kernel size: (7 x 7). Kernel size can't be greater than actual input size"
        );
        let cuda = "called `Result::unwrap()` on an `Err` value: Torch(\"CUDA error: out of memory\\nCUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.\\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\\n\\nException raised from c10_cuda_check_implementation\")";
        let msg = torch_panic_message(cuda, false).unwrap();
        assert_eq!(msg, "CUDA error: out of memory");
        assert_eq!(
            torch_hint(&msg, "lower --batch").as_deref(),
            Some("out of memory: lower --batch")
        );
        // Quotes and backslashes inside the message survive.
        let quoted = "called `Result::unwrap()` on an `Err` value: Kind(\"a \\\"b\\\" c\\\\d\")";
        assert_eq!(
            torch_panic_message(quoted, false).unwrap(),
            "tensor kind error: a \"b\" c\\d"
        );
        // Our own bugs are not libtorch errors, unless they happen inside tch.
        assert_eq!(torch_panic_message("index out of bounds", false), None);
        let other = "called `Result::unwrap()` on an `Err` value: Os { code: 2 }";
        assert_eq!(torch_panic_message(other, false), None);
        assert_eq!(
            torch_panic_message("tensor is not a scalar", true).as_deref(),
            Some("tensor is not a scalar")
        );
    }

    #[test]
    fn hints_name_what_to_change() {
        let m = |s: &str| torch_hint(s, "lower --batch");
        assert!(
            m("DefaultCPUAllocator: not enough memory: you tried to allocate 10 bytes")
                .unwrap()
                .contains("lower --batch")
        );
        assert!(m("Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!")
            .unwrap()
            .contains("--device cpu"));
        assert!(m("CUDA error: an illegal memory access was encountered")
            .unwrap()
            .contains("mos env"));
        assert!(m("Kernel size can't be greater than actual input size")
            .unwrap()
            .contains("raise --crop"));
        assert_eq!(
            m("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"),
            None
        );
    }

    #[test]
    fn catch_torch_turns_a_tch_panic_into_an_error() {
        let x = tch::Tensor::zeros([2, 3], (tch::Kind::Float, tch::Device::Cpu));
        let y = tch::Tensor::zeros([4, 5], (tch::Kind::Float, tch::Device::Cpu));
        let e = catch_torch(|| x.matmul(&y)).unwrap_err().to_string();
        assert!(e.starts_with("libtorch: "), "{e}");
        assert!(e.contains("cannot be multiplied"), "{e}");
        assert!(
            !e.contains("frame #") && !e.contains("Exception raised"),
            "{e}"
        );
        assert_eq!(catch_torch(|| 7).unwrap(), 7);
        // Any other panic is not ours to hide.
        let other = std::panic::catch_unwind(|| catch_torch(|| panic!("a bug")));
        assert!(other.is_err());
    }

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
