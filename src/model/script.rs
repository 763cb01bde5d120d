//! A user's network as a TorchScript module (`--model torchscript`,
//! docs/model.md#torchscript-modules): whatever `torch.jit.trace` or
//! `torch.jit.script` exported, run by libtorch.
//!
//! The contract: `forward(x)` takes a float32 batch [N, 3, H, W] (the transform of
//! `--resize`, `--crop`, `--mean`, `--std`) and returns `(logits, features)`, logits
//! [N, C] and the pre-logit features [N, D]; the head's weight [C, D] and bias [C]
//! are the module's parameters `<--head>.weight` and `<--head>.bias`, and logits =
//! features W^T + b. [`ScriptNet::load`] checks all of it on a probe batch and
//! refuses a module that breaks it, saying what is missing. The module has no
//! feature layers, so Mahalanobis is not offered; ODIN's input gradient flows
//! through it as through any libtorch graph.
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{CModule, Device, IValue, Kind, Tensor};

use super::variant::Variant;

/// The `--head` prefix when none is given (torchvision's ResNets name their head `fc`).
pub const DEFAULT_HEAD: &str = "fc";

/// A loaded TorchScript module and its head.
#[derive(Debug)]
pub struct ScriptNet {
    module: CModule,
    /// Logits per image (C).
    pub head_size: i64,
    /// Width of the features (D).
    pub head_in: i64,
    /// The `--head` prefix.
    pub head: String,
}

/// The module's parameters `<prefix>.weight` and `<prefix>.bias` as a linear head
/// (W [C, D], b [C], on the CPU); the error says which parameters look like heads.
fn find_head(params: &[(String, Tensor)], prefix: &str, file: &Path) -> Result<(Tensor, Tensor)> {
    let get = |name: &str| params.iter().find(|(n, _)| n == name).map(|(_, t)| t);
    let (w, b) = match (
        get(&format!("{prefix}.weight")),
        get(&format!("{prefix}.bias")),
    ) {
        (Some(w), Some(b)) => (w, b),
        _ => {
            // The last parameters are where a head usually is.
            let names: Vec<&str> = params
                .iter()
                .rev()
                .take(4)
                .map(|(n, _)| n.as_str())
                .collect();
            bail!(
                "{}: the module has no parameters '{prefix}.weight' and '{prefix}.bias' (the head --head {prefix} names); its last parameters are: {}; give --head with the prefix of the linear layer that computes the logits",
                file.display(),
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            );
        }
    };
    if w.dim() != 2 || b.dim() != 1 || w.size()[0] != b.size()[0] {
        bail!(
            "{}: '{prefix}.weight' {:?} and '{prefix}.bias' {:?} are not a linear head (a weight [C, D] and a bias [C])",
            file.display(),
            w.size(),
            b.size()
        );
    }
    let cpu = |t: &Tensor| t.detach().to_device(Device::Cpu).to_kind(Kind::Float);
    Ok((cpu(w), cpu(b)))
}

/// Loads `file` with libtorch, naming the file in the error.
fn load_module(file: &Path, device: Device) -> Result<CModule> {
    CModule::load_on_device(file, device).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a TorchScript module the libtorch of mos can load (export one with torch.jit.trace or torch.jit.script, then torch.jit.save, with a torch no newer than mos's libtorch; docs/model.md#torchscript-modules): {}",
            file.display(),
            crate::runtime::clean_torch_message(&e.to_string())
        )
    })
}

/// The head of the TorchScript module `file` (for the post-hoc methods of a store
/// it was extracted with).
pub fn read_head(file: &Path, prefix: &str) -> Result<(Tensor, Tensor)> {
    let module = load_module(file, Device::Cpu)?;
    let params = module
        .named_parameters()
        .with_context(|| format!("{}: cannot list its parameters", file.display()))?;
    find_head(&params, prefix, file)
}

/// The (logits, features) of a forward's output, or what is wrong with it.
fn split_output(out: IValue) -> std::result::Result<(Tensor, Tensor), String> {
    let items = match out {
        IValue::Tuple(v) | IValue::GenericList(v) => v,
        IValue::Tensor(t) => {
            return Err(format!(
                "forward returned one tensor {:?}; the contract is (logits, features)",
                t.size()
            ))
        }
        other => {
            return Err(format!(
                "forward returned {}; the contract is a tuple (logits, features)",
                ivalue_kind(&other)
            ))
        }
    };
    match <[IValue; 2]>::try_from(items) {
        Ok([IValue::Tensor(l), IValue::Tensor(f)]) => Ok((l, f)),
        Ok(_) => Err(
            "forward returned a pair that is not two tensors; the contract is (logits, features)"
                .into(),
        ),
        Err(v) => Err(format!(
            "forward returned {} values; the contract is two, (logits, features)",
            v.len()
        )),
    }
}

fn ivalue_kind(v: &IValue) -> &'static str {
    match v {
        IValue::None => "None",
        IValue::Double(_) | IValue::Int(_) | IValue::Bool(_) => "a number",
        IValue::String(_) => "a string",
        IValue::GenericDict(_) => "a dict",
        IValue::TensorList(_) => "a list of tensors",
        _ => "a value of another type",
    }
}

impl ScriptNet {
    /// Loads the module `file` on `device` with its head `<head>.weight/.bias` and
    /// checks the contract on a probe batch of two `crop x crop` images: a pair of
    /// float tensors [2, C] and [2, D], and logits equal to the features through
    /// the head (within float32 rounding of the head's sums).
    pub fn load(file: &Path, head: &str, crop: usize, device: Device) -> Result<ScriptNet> {
        let mut module = load_module(file, device)?;
        module.set_eval();
        let params = module
            .named_parameters()
            .with_context(|| format!("{}: cannot list its parameters", file.display()))?;
        let (w, b) = find_head(&params, head, file)?;
        let (c, d) = (w.size()[0], w.size()[1]);
        let net = ScriptNet {
            module,
            head_size: c,
            head_in: d,
            head: head.to_string(),
        };
        // A probe with varied pixels (zeros would hide a head applied to nothing).
        let s = crop as i64;
        let probe =
            Tensor::linspace(-2.0, 2.0, 2 * 3 * s * s, (Kind::Float, device)).reshape([2, 3, s, s]);
        let (logits, feats) = tch::no_grad(|| net.try_outputs(&probe)).map_err(|e| {
            anyhow::anyhow!(
                "{}: breaks the TorchScript contract on a batch of 2 x 3 x {crop} x {crop}: {e}",
                file.display()
            )
        })?;
        if logits.size() != [2, c] || feats.size() != [2, d] {
            bail!(
                "{}: forward returned logits {:?} and features {:?} for a batch of 2; the head '{head}' (weight [{c}, {d}]) needs [2, {c}] and [2, {d}]",
                file.display(),
                logits.size(),
                feats.size()
            );
        }
        let (l, f) = (
            logits.to_device(Device::Cpu).to_kind(Kind::Double),
            feats.to_device(Device::Cpu).to_kind(Kind::Double),
        );
        let via_head = f.matmul(&w.to_kind(Kind::Double).tr()) + b.to_kind(Kind::Double);
        // float32 sums of D products: a relative error far below 1e-3 of their scale.
        let scale = f64::try_from(
            f.abs()
                .matmul(&w.to_kind(Kind::Double).abs().tr())
                .max()
                .maximum(&b.abs().max().to_kind(Kind::Double)),
        )?
        .max(1e-12);
        let err = f64::try_from((&l - &via_head).abs().max())?;
        if err.is_nan() || err > 1e-3 * scale {
            bail!(
                "{}: its logits are not its features through the head '{head}' (largest difference {err:.3e} on a scale of {scale:.3e}): forward must return (head(features), features) with the head's parameters under --head {head}",
                file.display()
            );
        }
        Ok(net)
    }

    /// The architecture name (`torchscript`).
    pub fn variant(&self) -> Variant {
        super::variant::TORCHSCRIPT
    }

    /// (logits, features) of `x`, or the contract's failure in words.
    fn try_outputs(&self, x: &Tensor) -> std::result::Result<(Tensor, Tensor), String> {
        let out = self
            .module
            .forward_is(&[IValue::Tensor(x.shallow_clone())])
            .map_err(|e| crate::runtime::clean_torch_message(&e.to_string()))?;
        let (l, f) = split_output(out)?;
        let float = |t: &Tensor| {
            matches!(
                t.kind(),
                Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
            )
        };
        if !float(&l) || !float(&f) {
            return Err(format!(
                "forward returned {:?} logits and {:?} features; both must be floating point",
                l.kind(),
                f.kind()
            ));
        }
        Ok((
            l.to_kind(Kind::Float),
            f.flatten(1, -1).to_kind(Kind::Float),
        ))
    }

    /// (logits [N, C], features [N, D]) of `x`, with a graph when gradients are on.
    /// A module that fails on a batch after passing the probe is a libtorch error
    /// (reported as one, `main` catches it).
    pub fn outputs(&self, x: &Tensor) -> (Tensor, Tensor) {
        match self.try_outputs(x) {
            Ok(v) => v,
            Err(e) => crate::runtime::torch_failure(format!("the TorchScript module: {e}")),
        }
    }
}
