//! `mos env`: what mos runs on (versions, library directory, CUDA, cuDNN, threads).
use serde::Serialize;

use crate::cli::EnvArgs;
use crate::runtime;

/// The facts `mos env` reports.
#[derive(Debug, Serialize)]
pub struct EnvReport {
    pub mos_version: String,
    pub libtorch_version: Option<String>,
    pub libtorch_expected: String,
    pub libtorch_lib_dir: Option<String>,
    pub cuda_available: bool,
    pub cuda_device_count: usize,
    pub cuda_devices: Option<Vec<String>>,
    pub cudnn_available: bool,
    pub cudnn_version: Option<i64>,
    /// Whether cuDNN may run float32 convolutions in TF32 (off in mos: see
    /// `runtime::float32_convolutions`).
    pub cudnn_tf32: bool,
    pub cpu_threads: i32,
    /// How CPU memory is allocated: see `runtime::tune_malloc`.
    pub malloc: String,
    pub selected_device: String,
    /// The architectures `--model` takes, by family.
    pub models: Models,
}

/// The `--model` names of each family.
#[derive(Debug, Serialize)]
pub struct Models {
    pub bit: Vec<&'static str>,
    pub torchvision: Vec<&'static str>,
    /// `torchscript`: a user's TorchScript module.
    pub torchscript: Vec<&'static str>,
}

/// Collects the report; `--device` is resolved so that a bad value fails here too.
pub fn collect(args: &EnvArgs) -> anyhow::Result<EnvReport> {
    let lib_dir = runtime::libtorch_lib_dir();
    let count = runtime::cuda_device_count();
    let selected = args.device.device.resolve_with(count)?;
    let cudnn_available = count > 0 && tch::Cuda::cudnn_is_available();
    Ok(EnvReport {
        mos_version: env!("CARGO_PKG_VERSION").to_string(),
        libtorch_version: lib_dir.as_deref().and_then(runtime::libtorch_version),
        libtorch_expected: runtime::EXPECTED_LIBTORCH.to_string(),
        libtorch_lib_dir: lib_dir.map(|d| d.display().to_string()),
        cuda_available: count > 0,
        cuda_device_count: count,
        cuda_devices: runtime::cuda_device_names(count),
        cudnn_available,
        cudnn_version: cudnn_available.then(tch::utils::version_cudnn),
        cudnn_tf32: runtime::cudnn_allows_tf32(),
        cpu_threads: tch::get_num_threads(),
        malloc: runtime::malloc_setting(),
        selected_device: runtime::device_name(selected),
        models: Models {
            bit: crate::model::VARIANTS.iter().map(|v| v.name).collect(),
            torchvision: crate::model::TORCHVISION_VARIANTS
                .iter()
                .map(|v| v.name)
                .collect(),
            torchscript: vec![crate::model::variant::TORCHSCRIPT.name],
        },
    })
}

fn or_unknown<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map(ToString::to_string)
        .unwrap_or_else(|| "unknown".into())
}

/// Renders the report as aligned `key: value` lines.
pub fn render(r: &EnvReport) -> String {
    let devices = match &r.cuda_devices {
        Some(names) if names.is_empty() => "none".to_string(),
        Some(names) => names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("cuda:{i} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        None => "(names unavailable: CUDA driver not found)".to_string(),
    };
    let rows = [
        ("mos", r.mos_version.clone()),
        ("libtorch", or_unknown(&r.libtorch_version)),
        ("libtorch expected", r.libtorch_expected.clone()),
        ("library dir", or_unknown(&r.libtorch_lib_dir)),
        ("CUDA available", r.cuda_available.to_string()),
        (
            "CUDA devices",
            format!("{} ({devices})", r.cuda_device_count),
        ),
        (
            "cuDNN",
            match r.cudnn_version {
                Some(v) => v.to_string(),
                None => "not available".to_string(),
            },
        ),
        (
            "cuDNN float32 convs",
            if r.cudnn_tf32 {
                "TF32 allowed"
            } else {
                "float32 (TF32 off)"
            }
            .to_string(),
        ),
        ("CPU threads", r.cpu_threads.to_string()),
        ("malloc", r.malloc.clone()),
        ("--device resolves to", r.selected_device.clone()),
        ("models (BiT)", r.models.bit.join(", ")),
        ("models (torchvision)", r.models.torchvision.join(", ")),
        ("models (your own)", r.models.torchscript.join(", ")),
    ];
    let mut out = String::new();
    for (k, v) in rows {
        out.push_str(&format!("{:<22}{v}\n", format!("{k}:")));
    }
    if let Some(v) = &r.libtorch_version {
        if v.split('+').next() != Some(r.libtorch_expected.as_str()) {
            out.push_str(&format!(
                "warning: this mos was built for libtorch {}, but {v} is loaded\n",
                r.libtorch_expected
            ));
        }
    }
    out
}

pub fn run(args: &EnvArgs) -> anyhow::Result<()> {
    let report = collect(args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}
