//! Shared test helpers: the deterministic "hash weights" that
//! tests/fixtures/make_model_fixtures.py uses, reproduced exactly.
#![allow(dead_code)]
use std::path::PathBuf;

use tch::{nn, Kind, Tensor};

pub mod cli;
pub mod svg;

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01B3)
    })
}

/// `n` values in {-0.5, -0.4375, ..., 0.4375} from splitmix64(fnv1a(name) ^ i).
pub fn hash_uniform(name: &str, n: usize) -> Vec<f64> {
    let seed = fnv1a64(name);
    (0..n as u64)
        .map(|i| {
            let mut z = (seed ^ i).wrapping_add(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 60) as f64 / 16.0 - 0.5
        })
        .collect()
}

/// The value rule of make_model_fixtures.py::hash_tensor.
pub fn hash_tensor(name: &str, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    let scale_shift = |u: f64| -> f64 {
        if name.ends_with("gn1.weight")
            || name.ends_with("gn2.weight")
            || name.ends_with("gn3.weight")
            || name.ends_with("gn.weight")
        {
            1.0 + 0.5 * u
        } else if name.contains(".gn") && name.ends_with(".bias") {
            0.5 * u
        } else if name.starts_with("head.") {
            0.25 * u
        } else {
            u
        }
    };
    let v: Vec<f32> = hash_uniform(name, n as usize)
        .into_iter()
        .map(|u| scale_shift(u) as f32)
        .collect();
    Tensor::from_slice(&v).reshape(shape)
}

/// `u * 2^(top - e)` with e = floor(log2(fan_in) / 2) of a weight of `shape`
/// (fan-in: the product of all but the first dimension), the scale of the
/// torchvision fixtures' weight matrices; exact in both languages.
fn fan_in_scaled(u: f64, shape: &[i64], top: i32) -> f64 {
    let fan_in: i64 = shape[1..].iter().product();
    let e = fan_in.ilog2() as i32 / 2;
    u * 2f64.powi(top - e)
}

/// The hash values of `name` mapped by `value`, as a float32 tensor of `shape`.
fn hash_tensor_with(name: &str, shape: &[i64], value: impl Fn(f64) -> f64) -> Tensor {
    let n: i64 = shape.iter().product();
    values_with(shape, &hash_uniform(name, n as usize), value)
}

/// The values `u` mapped by `value`, as a float32 tensor of `shape`.
fn values_with(shape: &[i64], u: &[f64], value: impl Fn(f64) -> f64) -> Tensor {
    let v: Vec<f32> = u.iter().map(|&u| value(u) as f32).collect();
    Tensor::from_slice(&v).reshape(shape)
}

/// The value rule of make_resnet_fixtures.py::tv_hash_tensor (torchvision names).
pub fn tv_hash_tensor(name: &str, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    tv_values(name, shape, &hash_uniform(name, n as usize))
}

/// make_torchscript_fixtures.py::tv_periodic_tensor: the rule of [`tv_hash_tensor`]
/// on the hash values of the first 509 elements, repeated.
pub fn tv_periodic_tensor(name: &str, shape: &[i64]) -> Tensor {
    let n = shape.iter().product::<i64>() as usize;
    let period = hash_uniform(name, n.min(509));
    let u: Vec<f64> = (0..n).map(|i| period[i % period.len()]).collect();
    tv_values(name, shape, &u)
}

/// make_resnet_fixtures.py::tv_values: the torchvision rule on hash values `u`.
fn tv_values(name: &str, shape: &[i64], u: &[f64]) -> Tensor {
    values_with(shape, u, |u| {
        if name.ends_with("running_var") {
            1.0 + 0.5 * u
        } else if name.ends_with("running_mean") {
            0.125 * u
        } else if shape.len() == 4 || name == "fc.weight" {
            fan_in_scaled(u, shape, if name == "fc.weight" { 1 } else { 2 })
        } else if name.ends_with(".weight") {
            1.0 + 0.25 * u
        } else {
            0.125 * u
        }
    })
}

/// The value rule of make_vit_fixtures.py::vit_hash_tensor (torchvision's ViT
/// names).
pub fn vit_hash_tensor(name: &str, shape: &[i64]) -> Tensor {
    hash_tensor_with(name, shape, |u| {
        if name == "class_token" || name == "encoder.pos_embedding" {
            u
        } else if shape.len() >= 2 {
            fan_in_scaled(u, shape, 1)
        } else if name.ends_with(".weight") {
            1.0 + 0.25 * u
        } else {
            0.125 * u
        }
    })
}

/// The image folder of the torchvision fixtures' end-to-end checks
/// (make_resnet_fixtures.py and make_vit_fixtures.py, `E2E`): committed image
/// fixtures copied into three class folders under `root`.
pub fn e2e_folder(root: &std::path::Path) {
    for (class, files) in [
        ("a", ["gray.jpg", "rgb420.jpg"]),
        ("b", ["p.png", "rgb.png"]),
        ("c", ["portrait.png", "rgba.png"]),
    ] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for f in files {
            std::fs::copy(fixture(&format!("images/{f}")), root.join(class).join(f)).unwrap();
        }
    }
}

/// Overwrites every variable of `vs` with `rule(name, shape)`.
pub fn fill_with(vs: &nn::VarStore, rule: fn(&str, &[i64]) -> Tensor) {
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            var.copy_(&rule(&name, &var.size()).to_kind(Kind::Float));
        }
    });
}

/// Checks that the variables of `vs` are the state-dict keys and shapes of
/// `want` (a model of a fixture's keys.json: `keys` [[name, shape], ...] and
/// `parameters`), none more; keys `skip` accepts are no variables, and the
/// parameters counted are the variables `counted` accepts.
pub fn assert_state_dict_keys(
    what: &str,
    vs: &nn::VarStore,
    want: &serde_json::Value,
    skip: &dyn Fn(&str) -> bool,
    counted: &dyn Fn(&str) -> bool,
) {
    let vars = vs.variables();
    let mut expected = Vec::new();
    for kv in want["keys"].as_array().unwrap() {
        let k = kv[0].as_str().unwrap();
        if skip(k) {
            continue;
        }
        let shape: Vec<i64> = kv[1]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_i64().unwrap())
            .collect();
        let var = vars
            .get(k)
            .unwrap_or_else(|| panic!("{what}: no variable '{k}'"));
        assert_eq!(var.size(), shape, "{what}: {k}");
        expected.push(k.to_string());
    }
    let mut ours: Vec<&String> = vars.keys().collect();
    ours.sort();
    expected.sort();
    assert_eq!(
        ours,
        expected.iter().collect::<Vec<_>>(),
        "{what}: the same names, none more"
    );
    let params: i64 = vars
        .iter()
        .filter(|(k, _)| counted(k))
        .map(|(_, v)| v.numel() as i64)
        .sum();
    assert_eq!(params, want["parameters"].as_i64().unwrap(), "{what}");
}

/// Overwrites every variable of `vs` with its hash value.
pub fn fill_hash_weights(vs: &nn::VarStore) {
    tch::no_grad(|| {
        for (name, mut var) in vs.variables() {
            let t = hash_tensor(&name, &var.size()).to_kind(Kind::Float);
            var.copy_(&t);
        }
    });
}

/// Relative max difference: max|a-b| / max|b|.
pub fn rel_max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let diff = (a - b).abs().max().double_value(&[]);
    let scale = b.abs().max().double_value(&[]).max(1e-12);
    diff / scale
}

/// float32's unit roundoff, 2^-24: the relative error of one rounding.
pub const U32: f64 = 5.960_464_477_539_063e-8;
/// float64's unit roundoff, 2^-53.
pub const U64: f64 = 1.110_223_024_625_156_5e-16;

/// Two float32 forward passes of the R14 network (ours and PyTorch's, or with other
/// kernels) per sample, relative to the largest entry of its feature map or logit
/// vector: they differ only in summation order, ~u32 sqrt(K) <= 4e-6 per
/// convolution of K <= 4608 terms, over 14 convolutions renormalised by GroupNorm.
pub const FORWARD_TOL: f64 = 1e-4;

/// Prints and checks one comparison: `error <= tol`, with the margin left.
pub fn check(what: &str, error: f64, tol: f64) -> f64 {
    eprintln!(
        "{what}: error {error:.3e}, tolerance {tol:.3e} (margin {:.1}x)",
        tol / error
    );
    assert!(error <= tol, "{what}: error {error:e} > tolerance {tol:e}");
    error
}

/// Prints and checks comparisons with one tolerance each: `errors[i] <= tols[i]`.
/// Reports the entry closest to its tolerance; returns its error / tolerance.
pub fn check_each(what: &str, errors: &[f64], tols: &[f64]) -> f64 {
    assert_eq!(errors.len(), tols.len(), "{what}: lengths differ");
    if errors.is_empty() {
        eprintln!("{what}: nothing to compare");
        return 0.0;
    }
    let (mut worst, mut at) = (-1.0f64, 0);
    for (i, (e, t)) in errors.iter().zip(tols).enumerate() {
        assert!(t.is_finite() && *t > 0.0, "{what}[{i}]: tolerance {t}");
        if e / t > worst || e.is_nan() {
            (worst, at) = (e / t, i);
        }
    }
    eprintln!(
        "{what}: worst entry {at}: error {:.3e}, tolerance {:.3e} (margin {:.1}x)",
        errors[at],
        tols[at],
        1.0 / worst
    );
    for (i, (e, t)) in errors.iter().zip(tols).enumerate() {
        assert!(e <= t, "{what}[{i}]: error {e:e} > tolerance {t:e}");
    }
    worst
}

/// float32 input gradients of the R14 network (ours vs PyTorch's, or with other
/// kernels), relative to the largest entry of each sample's gradient: the backward
/// pass runs the same convolutions transposed, so as in [`FORWARD_TOL`].
pub const GRAD_TOL: f64 = 1e-4;

/// Checks a signed step `got` = x -/+ step sign(g) against the reference's `want`
/// (same x, same step): they may differ only where |g_i| <= GRAD_TOL max_j |g_j|
/// over the sample (first dimension), i.e. where the float32 gradient `grad` is
/// within its rounding error of 0 and its sign is not determined. Returns, per
/// sample, whether every entry agrees.
pub fn check_step_signs(what: &str, got: &Tensor, want: &Tensor, grad: &Tensor) -> Vec<bool> {
    assert_eq!(got.size(), want.size(), "{what}: shapes differ");
    assert_eq!(got.size(), grad.size(), "{what}: gradient shape");
    let n = got.size()[0];
    let differ = got.ne_tensor(want).reshape([n, -1]);
    let g = grad.to_kind(Kind::Double).abs().reshape([n, -1]);
    let scale = g.amax(1, true);
    let rel = &g / &scale;
    let near_zero = rel.le(GRAD_TOL).sum(Kind::Int64).int64_value(&[]);
    let flipped = differ.sum(Kind::Int64).int64_value(&[]);
    let worst = (rel * differ.to_kind(Kind::Double)).max().double_value(&[]);
    eprintln!(
        "{what}: {flipped} of {} steps differ from the reference, the largest there at          |grad| = {worst:.3e} of the sample's largest (tolerance {GRAD_TOL:.0e});          {near_zero} entries lie within the tolerance of 0",
        got.numel()
    );
    assert!(
        worst <= GRAD_TOL,
        "{what}: a step differs where |grad| is {worst:e} of the largest, above {GRAD_TOL:e}"
    );
    (0..n)
        .map(|i| differ.get(i).any().int64_value(&[]) == 0)
        .collect()
}

/// Whether `json`, a float read back from a JSON file, is the f64 `value` that was
/// written: serde_json writes the shortest exact decimal, but its default parser
/// (without the `float_roundtrip` feature) may return a neighbour 1 ulp away.
pub fn json_f64_eq(json: f64, value: f64) -> bool {
    json == value || (json - value).abs() <= f64::EPSILON * value.abs()
}

/// `t` as a vector of f64.
pub fn to_vec(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).expect("a float tensor")
}

/// Asserts that every row (first dimension) of `got` is within `tol` of `want`
/// relative to that row's largest entry, `max_j |got_ij - want_ij| <= tol max_j
/// |want_ij|`, the form rounding errors take in a float computation whose
/// intermediate values are of the size of its results (a logit vector, a
/// feature map): an element-wise relative bound would be ill-conditioned for
/// entries near zero. Returns the largest error in units of the row scale.
pub fn assert_rows_close(what: &str, got: &Tensor, want: &Tensor, tol: f64) -> f64 {
    assert_eq!(got.size(), want.size(), "{what}: shapes differ");
    let n = want.size()[0];
    let g = got.to_kind(Kind::Double).reshape([n, -1]);
    let w = want.to_kind(Kind::Double).reshape([n, -1]);
    let err = (&g - &w).abs().amax(1, false);
    let scale = w.abs().amax(1, false);
    let rel = (err / scale).max().double_value(&[]);
    check(what, rel, tol)
}

/// A deterministic pseudo-random generator (SplitMix64) owned by one test, so
/// that tests running in parallel threads never share a generator (libtorch's
/// `randn` draws from one global generator).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u = 1.0 - self.uniform(); // in (0, 1]
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    /// A float32 tensor of standard normal values.
    pub fn normal_tensor(&mut self, shape: &[i64]) -> Tensor {
        let n: i64 = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.normal() as f32).collect();
        Tensor::from_slice(&v).reshape(shape)
    }

    /// A float32 tensor uniform in [lo, hi).
    pub fn uniform_tensor(&mut self, shape: &[i64], lo: f64, hi: f64) -> Tensor {
        let n: i64 = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (lo + (hi - lo) * self.uniform()) as f32)
            .collect();
        Tensor::from_slice(&v).reshape(shape)
    }
}

/// Reads one tensor by name from a safetensors file.
pub fn read_named(path: &std::path::Path, name: &str) -> Tensor {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name} not in {}", path.display()))
        .1
}

/// ResNetV2-R14x0.5 with a 10-way head and the hash weights of the fixtures.
pub fn r14() -> (nn::VarStore, mos::model::ResNetV2) {
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let variant: mos::model::Variant = "ResNetV2-R14x0.5".parse().expect("known variant");
    let model = mos::model::ResNetV2::new(&vs.root(), variant, 10);
    fill_hash_weights(&vs);
    (vs, model)
}

/// Saves a random ResNetV2-R14x0.5 with `head` outputs as our checkpoint at `path`,
/// drawn from [`Rng`] with `seed` (not libtorch's global generator, which tests in
/// parallel threads share): convolutions normal with std 1/sqrt(fan-in), GroupNorm
/// scale 1 and shift 0, and a non-zero head (normal, std `head_std`) so that
/// scores differ between images.
pub fn random_checkpoint(
    path: &std::path::Path,
    head: i64,
    group_config: Option<Vec<i64>>,
    seed: u64,
    head_std: f64,
) {
    use mos::model::checkpoint::{self, Checkpoint, CheckpointMeta};
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let variant: mos::model::Variant = "ResNetV2-R14x0.5".parse().expect("known variant");
    let _m = mos::model::ResNetV2::new(&vs.root(), variant, head);
    let mut rng = Rng::new(seed);
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0)); // a fixed order of draws
    tch::no_grad(|| {
        for (name, t) in &mut vars {
            let shape = t.size();
            let value = if name.starts_with("head.") {
                rng.normal_tensor(&shape) * head_std
            } else if name.contains(".gn") && name.ends_with(".weight") {
                Tensor::ones(&shape[..], (Kind::Float, tch::Device::Cpu))
            } else if name.contains(".gn") {
                Tensor::zeros(&shape[..], (Kind::Float, tch::Device::Cpu))
            } else {
                let fan_in: i64 = shape[1..].iter().product();
                rng.normal_tensor(&shape) / (fan_in as f64).sqrt()
            };
            t.copy_(&value);
        }
    });
    let meta = CheckpointMeta {
        model: variant.name.into(),
        head_size: head,
        group_config,
        step: 0,
        config: serde_json::Value::Null,
    };
    let model = vs.variables().into_iter().collect();
    let ckpt = Checkpoint {
        meta: Some(meta),
        model,
        momentum: vec![],
    };
    checkpoint::save(path, &ckpt).expect("checkpoint written");
}

/// The post-hoc fit saved in a run directory: `fit.json`, and the tensors of
/// `fit.safetensors` sorted by name. Checks that the safetensors' `fit` metadata
/// is the same document as `fit.json`.
pub fn read_fit(run: &std::path::Path) -> (serde_json::Value, Vec<(String, Tensor)>) {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("fit.json")).unwrap()).unwrap();
    let path = run.join("fit.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap_or_default();
    let inner: serde_json::Value = serde_json::from_str(&meta["fit"]).unwrap();
    assert_eq!(
        inner,
        json,
        "{}: metadata and fit.json differ",
        path.display()
    );
    let mut tensors = Tensor::read_safetensors(&path).unwrap();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    (json, tensors)
}

/// The number logged after `prefix` (up to the next space or comma) on the
/// first line of `log` that has it.
pub fn logged_number(log: &str, prefix: &str) -> f64 {
    let rest = log
        .split(prefix)
        .nth(1)
        .unwrap_or_else(|| panic!("no {prefix:?} in {log}"));
    let token = rest
        .split(|c: char| c.is_whitespace() || c == ',')
        .next()
        .unwrap();
    token
        .parse()
        .unwrap_or_else(|_| panic!("{prefix:?} is followed by {token:?}"))
}
