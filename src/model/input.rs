//! How images are prepared for a model (`--crop`, `--resize`, and a TorchScript
//! module's `--mean`, `--std`, `--head`), as every command that reads images takes
//! them (docs/data.md#transforms, docs/model.md#torchscript-modules).
use anyhow::Result;

use super::variant::{Family, Variant};
use super::weights::ScriptSpec;

/// The transform flags, as given (unset: the model's defaults).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InputSpec {
    pub crop: Option<usize>,
    pub resize: Option<usize>,
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    pub head: Option<String>,
}

/// Three finite values of `--mean`/`--std` (`positive` for `--std`).
fn channels(flag: &str, v: &[f32], positive: bool) -> Result<[f32; 3]> {
    let a: [f32; 3] = v.try_into().map_err(|_| {
        anyhow::anyhow!(
            "--{flag}: {} value(s); give 3, one per channel (R,G,B)",
            v.len()
        )
    })?;
    if let Some(x) = a
        .iter()
        .find(|x| !x.is_finite() || (positive && **x <= 0.0))
    {
        anyhow::bail!(
            "--{flag}: {x} is not {}",
            if positive {
                "a positive number"
            } else {
                "a finite number"
            }
        );
    }
    Ok(a)
}

impl InputSpec {
    /// `--crop`, or the model's default.
    pub fn crop(&self, model: Variant) -> usize {
        self.crop.unwrap_or(model.default_crop())
    }

    /// The model's evaluation transform with these flags.
    pub fn resolve(&self, model: Variant) -> Result<crate::data::ImageTransform> {
        let script = model.family == Family::TorchScript;
        if !script {
            for (flag, given) in [
                ("mean", self.mean.is_some()),
                ("std", self.std.is_some()),
                ("head", self.head.is_some()),
            ] {
                if given {
                    anyhow::bail!(
                        "--{flag} applies to --model torchscript; --model {} has its own",
                        model.name
                    );
                }
            }
        }
        let mut t = model
            .eval_transform(self.crop(model), self.resize)
            .map_err(anyhow::Error::msg)?;
        if let crate::data::ImageTransform::CenterCrop(c) = &mut t {
            if let Some(m) = &self.mean {
                c.mean = channels("mean", m, false)?;
            }
            if let Some(s) = &self.std {
                c.std = channels("std", s, true)?;
            }
        }
        Ok(t)
    }

    /// What loading a TorchScript module needs (its head's prefix, the probe's
    /// size); `None` for the other models.
    pub fn script_spec(&self, model: Variant) -> Option<ScriptSpec> {
        (model.family == Family::TorchScript).then(|| ScriptSpec {
            head: self
                .head
                .clone()
                .unwrap_or_else(|| super::script::DEFAULT_HEAD.to_string()),
            crop: self.crop(model),
        })
    }
}
