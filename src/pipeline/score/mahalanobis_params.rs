//! Tuned Mahalanobis parameters: `mos tune-mahalanobis`'s `mahalanobis.safetensors`
//! (docs/mahalanobis.md), read for test-baseline, `mos score`, `mos benchmark` and
//! the tuning itself ([`read_params`]). The math is [`crate::ood::mahalanobis`]'s;
//! the scores of images with noise are [`super::image_pass`]'s.
//!
//! A parameter file (or the class statistics `mahalanobis_stats.safetensors`) is
//! checked before anything computes with it: every tensor present, floating
//! point, finite, and of a shape that fits the others. What is accepted:
//!
//! - `mean.{l}`, l = 0..4: [C, D_l], the class means of layer l (C >= 1 the same
//!   for every layer, D_l >= 1);
//! - `precision.{l}`: [D_l, D_l];
//! - `lr_weight`: [5] as tune-mahalanobis writes it, or [1, 5] (scikit-learn's
//!   `coef_`);
//! - `lr_bias` and `magnitude`: [1] as tune-mahalanobis writes them, or a scalar;
//!   the magnitude is >= 0.
//!
//! Floating point means float16, bfloat16, float32 or float64; the values are
//! used as float64. Every error names the file and the tensor.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::model::checkpoint::{self, kind_name, shape};
use crate::model::Variant;
use crate::ood::mahalanobis::{GaussianLayer, LayerParams};

/// The tensor `name` of `t`: present, floating point and finite.
pub fn float_tensor<'a>(t: &'a [(String, Tensor)], name: &str, file: &Path) -> Result<&'a Tensor> {
    let x = t
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, x)| x)
        .with_context(|| format!("{}: no tensor '{name}'", file.display()))?;
    if !matches!(
        x.kind(),
        Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double
    ) {
        bail!(
            "{}: tensor '{name}' is {}; expected floating point (float16, bfloat16, float32 or float64)",
            file.display(),
            kind_name(x.kind())
        );
    }
    if x.numel() > 0 && x.isfinite().all().int64_value(&[]) == 0 {
        bail!(
            "{}: tensor '{name}' holds NaN or infinite values",
            file.display()
        );
    }
    Ok(x)
}

/// Checks `mean.{l}` and `precision.{l}` of `layers` layers, and returns them
/// (as stored). With `variant`, D_l must be the width of its layer l.
pub fn check_layers(
    t: &[(String, Tensor)],
    layers: usize,
    file: &Path,
    variant: Option<Variant>,
) -> Result<Vec<(Tensor, Tensor)>> {
    let f = file.display();
    let mut classes: Option<i64> = None;
    let mut out = Vec::with_capacity(layers);
    for l in 0..layers {
        let (mn, pn) = (format!("mean.{l}"), format!("precision.{l}"));
        let mean = float_tensor(t, &mn, file)?;
        let precision = float_tensor(t, &pn, file)?;
        let &[c, d] = mean.size().as_slice() else {
            bail!(
                "{f}: tensor '{mn}' has shape {}; expected [classes, features]",
                shape(mean)
            );
        };
        if c < 1 || d < 1 {
            bail!(
                "{f}: tensor '{mn}' has shape {}; expected at least one class and one feature",
                shape(mean)
            );
        }
        match classes {
            Some(c0) if c0 != c => bail!(
                "{f}: tensor '{mn}' has {c} classes (rows) but mean.0 has {c0}; every layer needs the same classes"
            ),
            _ => classes = Some(c),
        }
        if precision.size() != [d, d] {
            bail!(
                "{f}: tensor '{pn}' has shape {}; expected [{d}, {d}] for the {d} features of {mn}",
                shape(precision)
            );
        }
        if let Some(v) = variant {
            let want = v.feature_channels()[l];
            if want != d {
                bail!(
                    "{f}: tensor '{mn}' has {d} features but layer {l} of --model {} has {want}; the parameters were tuned for another model",
                    v.name
                );
            }
        }
        out.push((mean.shallow_clone(), precision.shallow_clone()));
    }
    Ok(out)
}

/// The values of a float tensor whose shape is one of `shapes`.
pub fn values(
    t: &[(String, Tensor)],
    name: &str,
    shapes: &[&[i64]],
    file: &Path,
) -> Result<Vec<f64>> {
    let x = float_tensor(t, name, file)?;
    if !shapes.iter().any(|s| x.size() == *s) {
        let expected: Vec<String> = shapes
            .iter()
            .map(|s| {
                if s.is_empty() {
                    "a scalar".to_string()
                } else {
                    let dims: Vec<String> = s.iter().map(i64::to_string).collect();
                    format!("[{}]", dims.join(", "))
                }
            })
            .collect();
        bail!(
            "{}: tensor '{name}' has shape {}; expected {}",
            file.display(),
            shape(x),
            expected.join(" or ")
        );
    }
    Ok(Vec::<f64>::try_from(
        x.to_kind(Kind::Double).flatten(0, -1),
    )?)
}

/// Feature layers: root and block1..block4.
pub const LAYERS: usize = 5;
/// The parameter file in the run directory.
pub const PARAMS: &str = "mahalanobis.safetensors";

/// Tuned Mahalanobis parameters as `test-baseline` uses them.
#[derive(Debug)]
pub struct MahalanobisParams {
    pub layers: Vec<GaussianLayer>,
    pub lr_weight: Vec<f64>,
    pub lr_bias: f64,
    pub magnitude: f64,
}

pub(crate) fn named(path: &Path) -> Result<Vec<(String, Tensor)>> {
    Ok(checkpoint::load(path)?.model)
}

/// The class means and precisions of `path`'s tensors `t`, checked (see the
/// module's documentation); with `variant`, against its layers' widths.
pub(crate) fn read_layers(
    t: &[(String, Tensor)],
    path: &Path,
    variant: Option<Variant>,
) -> Result<Vec<LayerParams>> {
    Ok(check_layers(t, LAYERS, path, variant)?
        .into_iter()
        .map(|(mean, precision)| LayerParams {
            mean: mean.to_kind(Kind::Double),
            precision: precision.to_kind(Kind::Double),
        })
        .collect())
}

/// The layers prepared for scoring on `device`.
pub(crate) fn gaussian_layers(
    params: &[LayerParams],
    device: Device,
) -> Result<Vec<GaussianLayer>> {
    Ok(params
        .iter()
        .map(|p| GaussianLayer::new(&p.mean.to_device(device), &p.precision.to_device(device)))
        .collect::<std::result::Result<Vec<_>, _>>()?)
}

/// Reads `mahalanobis.safetensors` (or the run directory holding it) onto `device`,
/// checking every tensor (see the module's documentation).
pub fn read_params(path: &Path, device: Device) -> Result<MahalanobisParams> {
    read_params_for(path, device, None)
}

/// [`read_params`], and with `variant` the class means' widths checked against its
/// layers.
pub fn read_params_for(
    path: &Path,
    device: Device,
    variant: Option<Variant>,
) -> Result<MahalanobisParams> {
    let file: PathBuf = if path.is_dir() {
        path.join(PARAMS)
    } else {
        path.to_path_buf()
    };
    let t = named(&file).context("--mahalanobis-param-path")?;
    let layers = gaussian_layers(&read_layers(&t, &file, variant)?, device)?;
    let lr_weight = values(
        &t,
        "lr_weight",
        &[&[LAYERS as i64], &[1, LAYERS as i64]],
        &file,
    )?;
    let lr_bias = values(&t, "lr_bias", &[&[1], &[]], &file)?[0];
    let magnitude = values(&t, "magnitude", &[&[1], &[]], &file)?[0];
    if magnitude < 0.0 {
        bail!(
            "{}: tensor 'magnitude' is {magnitude}; expected a non-negative number",
            file.display()
        );
    }
    Ok(MahalanobisParams {
        layers,
        lr_weight,
        lr_bias,
        magnitude,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, x: Tensor) -> (String, Tensor) {
        (name.to_string(), x)
    }

    fn layers(c: i64, d: &[i64]) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        for (l, &d) in d.iter().enumerate() {
            v.push(t(
                &format!("mean.{l}"),
                Tensor::zeros([c, d], (Kind::Float, tch::Device::Cpu)),
            ));
            v.push(t(
                &format!("precision.{l}"),
                Tensor::eye(d, (Kind::Double, tch::Device::Cpu)),
            ));
        }
        v
    }

    fn err(r: Result<impl std::fmt::Debug>) -> String {
        format!("{:#}", r.expect_err("an error"))
    }

    #[test]
    fn layers_are_checked_for_shape_kind_and_values() {
        let file = Path::new("p.safetensors");
        let good = layers(3, &[2, 4]);
        assert_eq!(check_layers(&good, 2, file, None).unwrap().len(), 2);
        let mut v = layers(3, &[2, 4]);
        v[2] = t(
            "mean.1",
            Tensor::zeros([4, 4], (Kind::Float, tch::Device::Cpu)),
        );
        let e = err(check_layers(&v, 2, file, None));
        assert!(
            e.contains("p.safetensors: tensor 'mean.1' has 4 classes"),
            "{e}"
        );
        let mut v = layers(3, &[2, 4]);
        v[3] = t(
            "precision.1",
            Tensor::eye(3, (Kind::Float, tch::Device::Cpu)),
        );
        let e = err(check_layers(&v, 2, file, None));
        assert!(
            e.contains("'precision.1' has shape [3, 3]; expected [4, 4]"),
            "{e}"
        );
        let mut v = layers(3, &[2, 4]);
        v[1] = t(
            "precision.0",
            Tensor::from_slice(&[1.0, f64::NAN, 0.0, 1.0]).reshape([2, 2]),
        );
        let e = err(check_layers(&v, 2, file, None));
        assert!(e.contains("'precision.0' holds NaN"), "{e}");
        let mut v = layers(3, &[2, 4]);
        v[0] = t(
            "mean.0",
            Tensor::zeros([3, 2], (Kind::Int64, tch::Device::Cpu)),
        );
        let e = err(check_layers(&v, 2, file, None));
        assert!(
            e.contains("'mean.0' is int64; expected floating point"),
            "{e}"
        );
        let mut v = layers(3, &[2, 4]);
        v[0] = t(
            "mean.0",
            Tensor::zeros([6], (Kind::Float, tch::Device::Cpu)),
        );
        let e = err(check_layers(&v, 2, file, None));
        assert!(
            e.contains("'mean.0' has shape [6]; expected [classes, features]"),
            "{e}"
        );
        let e = err(check_layers(&layers(3, &[2]), 2, file, None));
        assert!(e.contains("no tensor 'mean.1'"), "{e}");
        // The widths of the model's layers.
        let r14: Variant = "ResNetV2-R14x0.5".parse().unwrap();
        let widths = r14.feature_channels();
        check_layers(&layers(2, &widths), 5, file, Some(r14)).unwrap();
        let e = err(check_layers(
            &layers(2, &[32, 128, 256, 512, 512]),
            5,
            file,
            Some(r14),
        ));
        assert!(
            e.contains(
                "'mean.4' has 512 features but layer 4 of --model ResNetV2-R14x0.5 has 1024"
            ),
            "{e}"
        );
    }

    #[test]
    fn values_accept_the_listed_shapes_only() {
        let file = Path::new("p.safetensors");
        let v = vec![
            t("one", Tensor::from_slice(&[0.5f32])),
            t("scalar", Tensor::from(0.25f64)),
            t("empty", Tensor::zeros([0], (Kind::Float, tch::Device::Cpu))),
        ];
        let scalar: &[&[i64]] = &[&[1], &[]];
        assert_eq!(values(&v, "one", scalar, file).unwrap(), [0.5]);
        assert_eq!(values(&v, "scalar", scalar, file).unwrap(), [0.25]);
        let e = err(values(&v, "empty", scalar, file));
        assert!(
            e.contains("p.safetensors: tensor 'empty' has shape [0]; expected [1] or a scalar"),
            "{e}"
        );
    }
}
