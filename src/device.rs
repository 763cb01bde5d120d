//! The `--device` value: `auto`, `cpu`, `cuda` or `cuda:N`, resolved once into a
//! `tch::Device`. No code path assumes CUDA; `auto` picks CUDA only when available.
use std::fmt;
use std::str::FromStr;

/// What the user asked for with `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// CUDA device 0 if CUDA is available, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// A CUDA device by ordinal (`cuda` means `cuda:0`).
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!(
                    "invalid device '{s}': expected auto, cpu, cuda or cuda:N (N a device number)"
                )),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Resolves against `cuda_devices`, the number of CUDA devices present.
    pub fn resolve_with(self, cuda_devices: usize) -> anyhow::Result<tch::Device> {
        match self {
            Self::Auto if cuda_devices > 0 => Ok(tch::Device::Cuda(0)),
            Self::Auto | Self::Cpu => Ok(tch::Device::Cpu),
            Self::Cuda(_) if cuda_devices == 0 => anyhow::bail!(
                "--device {self}: CUDA is not available to this libtorch ({}); use --device cpu or auto",
                crate::runtime::libtorch_summary()
            ),
            Self::Cuda(n) if n >= cuda_devices => anyhow::bail!(
                "--device {self}: only {cuda_devices} CUDA device(s) present (cuda:0..cuda:{})",
                cuda_devices - 1
            ),
            Self::Cuda(n) => Ok(tch::Device::Cuda(n)),
        }
    }

    /// Resolves against the CUDA devices libtorch sees.
    pub fn resolve(self) -> anyhow::Result<tch::Device> {
        let count = if tch::Cuda::is_available() {
            tch::Cuda::device_count().max(0) as usize
        } else {
            0
        };
        self.resolve_with(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!("auto".parse::<DeviceSpec>(), Ok(DeviceSpec::Auto));
        assert_eq!("CPU".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            assert!(bad.parse::<DeviceSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn resolves_against_device_count() {
        assert_eq!(DeviceSpec::Auto.resolve_with(0).unwrap(), tch::Device::Cpu);
        assert_eq!(
            DeviceSpec::Auto.resolve_with(2).unwrap(),
            tch::Device::Cuda(0)
        );
        assert_eq!(
            DeviceSpec::Cuda(1).resolve_with(2).unwrap(),
            tch::Device::Cuda(1)
        );
        let e = DeviceSpec::Cuda(2).resolve_with(2).unwrap_err().to_string();
        assert!(e.contains("only 2 CUDA device(s)"), "{e}");
        let e = DeviceSpec::Cuda(0).resolve_with(0).unwrap_err().to_string();
        assert!(e.contains("CUDA is not available"), "{e}");
    }
}
