//! Shared test helpers: the deterministic "hash weights" that
//! tests/fixtures/make_model_fixtures.py uses, reproduced exactly.
#![allow(dead_code)]
use std::path::PathBuf;

use tch::{nn, Kind, Tensor};

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

/// Saves a random ResNetV2-R14x0.5 with `head` outputs as our checkpoint at `path`:
/// libtorch's init from `seed`, and a non-zero head (normal, std `head_std`) so that
/// scores differ between images.
pub fn random_checkpoint(
    path: &std::path::Path,
    head: i64,
    group_config: Option<Vec<i64>>,
    seed: i64,
    head_std: f64,
) {
    use mos::model::checkpoint::{self, Checkpoint, CheckpointMeta};
    tch::manual_seed(seed);
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let variant: mos::model::Variant = "ResNetV2-R14x0.5".parse().expect("known variant");
    let _m = mos::model::ResNetV2::new(&vs.root(), variant, head);
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            if name.starts_with("head.") {
                t.copy_(&(t.randn_like() * head_std));
            }
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
