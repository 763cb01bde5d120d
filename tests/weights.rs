//! Weight interop end to end: the same small model read from a Google-BiT-style
//! .npz (written by numpy), the paper code's .pth.tar (written by torch.save) and
//! our converted checkpoint gives the PyTorch reference's logits; strict loading
//! names what does not fit.
mod common;

use std::io::Read;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use common::{assert_rows_close, fixture, hash_tensor, read_named, FORWARD_TOL};
use mos::model::checkpoint::{self, Checkpoint};
use mos::model::weights::{
    bit_npz_key, load_model, ours_from_bit_key, read_state_dict, WeightFormat,
};
use mos::model::{ResNetV2, Variant};
use tch::{nn, Device, Tensor};

fn expected_logits() -> (Tensor, Tensor) {
    let exp = fixture("model/r14_expected.safetensors");
    (read_named(&exp, "x"), read_named(&exp, "logits"))
}

fn assert_reference_logits(path: &Path) {
    let loaded = load_model(path, None, None, Device::Cpu).unwrap();
    assert_eq!(loaded.model.variant().name, "ResNetV2-R14x0.5");
    assert_eq!(loaded.model.head_size(), 10);
    let (x, want) = expected_logits();
    let got = tch::no_grad(|| loaded.model.forward(&x));
    let what = format!("logits of {}", path.display());
    assert_rows_close(&what, &got, &want, FORWARD_TOL);
}

fn paper_checkpoint(dir: &Path) -> PathBuf {
    let mut gz = flate2::read::GzDecoder::new(
        std::fs::File::open(fixture("model/r14_paper.pth.tar.gz")).unwrap(),
    );
    let mut bytes = Vec::new();
    gz.read_to_end(&mut bytes).unwrap();
    let path = dir.join("bit.pth.tar");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn bit_npz_gives_the_reference_logits() {
    let path = fixture("model/r14_bit.npz");
    let sd = read_state_dict(&path).unwrap();
    assert_eq!(sd.format, WeightFormat::BitNpz);
    // HWIO -> OIHW: every tensor equals the hash weights exactly.
    for (name, t) in &sd.tensors {
        let want = hash_tensor(name, &t.size());
        assert!(t.equal(&want), "{name} differs after the layout conversion");
    }
    assert_reference_logits(&path);
}

#[test]
fn paper_pth_tar_gives_the_reference_logits() {
    let dir = tempfile::tempdir().unwrap();
    let path = paper_checkpoint(dir.path());
    let sd = read_state_dict(&path).unwrap();
    assert_eq!(sd.format, WeightFormat::TorchZip);
    assert_eq!(sd.step, Some(1234));
    assert!(sd.tensors.iter().all(|(n, _)| !n.starts_with("module.")));
    assert_reference_logits(&path);
}

#[test]
fn legacy_torch_checkpoint_reads_like_the_zip_format() {
    // {'state_dict' ('module.' names), 'epoch', 'arch', 'best_acc1'} in torch.save's
    // legacy format, and the same state dict in the zip format.
    let legacy_path = fixture("interop/legacy_checkpoint.pth.tar");
    let legacy = read_state_dict(&legacy_path).unwrap();
    let zip = read_state_dict(&fixture("interop/legacy_state_zip.pth")).unwrap();
    assert_eq!(legacy.format, WeightFormat::TorchLegacy);
    assert_eq!(zip.format, WeightFormat::TorchZip);
    assert_eq!(legacy.step, None);
    assert_eq!(legacy.tensors.len(), 11);
    assert_eq!(legacy.tensors.len(), zip.tensors.len());
    for ((name, t), (want_name, want)) in legacy.tensors.iter().zip(&zip.tensors) {
        assert_eq!(name, want_name);
        assert_eq!(t.kind(), want.kind(), "{name}");
        assert_eq!(t.size(), want.size(), "{name}");
        assert!(t.equal(want), "{name}");
    }
    let listing = Command::cargo_bin("mos")
        .unwrap()
        .arg("inspect")
        .arg(&legacy_path)
        .output()
        .unwrap();
    assert!(listing.status.success());
    let text = String::from_utf8(listing.stdout).unwrap();
    assert!(text.contains("torch.save legacy format"), "{text}");
    assert!(text.contains("shared_col"), "{text}");
    assert!(text.contains("11 tensors"), "{text}");
}

#[test]
fn converted_checkpoint_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let src = paper_checkpoint(dir.path());
    let out = dir.path().join("r14.safetensors");
    Command::cargo_bin("mos")
        .unwrap()
        .args(["convert", "--input"])
        .arg(&src)
        .arg("--output")
        .arg(&out)
        .assert()
        .success();
    let sd = read_state_dict(&out).unwrap();
    assert_eq!(sd.format, WeightFormat::Safetensors);
    let meta = sd.meta.as_ref().unwrap();
    assert_eq!(meta.model, "ResNetV2-R14x0.5");
    assert_eq!((meta.head_size, meta.step), (10, 1234));
    assert_reference_logits(&out);
    let listing = Command::cargo_bin("mos")
        .unwrap()
        .arg("inspect")
        .arg(&out)
        .output()
        .unwrap();
    let text = String::from_utf8(listing.stdout).unwrap();
    assert!(
        text.contains("body.block4.unit01.downsample.weight"),
        "{text}"
    );
    assert!(text.contains("[1024, 512, 1, 1]"), "{text}");
    assert!(text.contains("45 tensors"), "{text}");
}

#[test]
fn strict_loading_names_tensor_file_and_shapes() {
    let path = fixture("model/r14_bit.npz");
    // A bigger architecture: missing units.
    let r26: Variant = "ResNetV2-R26x0.5".parse().unwrap();
    let e = format!(
        "{:#}",
        load_model(&path, Some(r26), None, Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(e.contains("r14_bit.npz"), "{e}");
    assert!(
        e.contains("missing tensor 'body.block1.unit02.conv1.weight'"),
        "{e}"
    );
    // Wrong head size for the task (e.g. a flat checkpoint where a group head is needed).
    let e = format!(
        "{:#}",
        load_model(&path, None, Some(14), Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(e.contains("head has 10 outputs but 14 are needed"), "{e}");
    // A shape mismatch and an unexpected tensor.
    let dir = tempfile::tempdir().unwrap();
    let mut sd = read_state_dict(&path).unwrap();
    for (name, t) in sd.tensors.iter_mut() {
        if name == "before_head.gn.weight" {
            *t = Tensor::ones([7], (tch::Kind::Float, Device::Cpu));
        }
    }
    sd.tensors.push((
        "body.block9.extra".into(),
        Tensor::zeros([2], (tch::Kind::Float, Device::Cpu)),
    ));
    let bad = dir.path().join("bad.safetensors");
    checkpoint::save(
        &bad,
        &Checkpoint {
            meta: None,
            model: sd.tensors,
            momentum: vec![],
        },
    )
    .unwrap();
    let r14: Variant = "ResNetV2-R14x0.5".parse().unwrap();
    let e = format!(
        "{:#}",
        load_model(&bad, Some(r14), None, Device::Cpu)
            .err()
            .unwrap()
    );
    assert!(e.contains("bad.safetensors"), "{e}");
    assert!(e.contains("tensor 'before_head.gn.weight' has shape [7] but model ResNetV2-R14x0.5 expects [1024]"), "{e}");
    assert!(e.contains("unexpected tensor 'body.block9.extra'"), "{e}");
}

#[test]
fn bit_key_mapping_round_trips_for_every_variant_tensor() {
    let vs = nn::VarStore::new(Device::Cpu);
    let _m = ResNetV2::new(&vs.root(), "BiT-S-R101x1".parse().unwrap(), 1000);
    let names: Vec<String> = vs.variables().into_keys().collect();
    for name in &names {
        let key = bit_npz_key(name).unwrap_or_else(|| panic!("no BiT key for {name}"));
        assert!(key.starts_with("resnet/"), "{key}");
        assert_eq!(
            ours_from_bit_key(&key).as_deref(),
            Some(name.as_str()),
            "{key}"
        );
    }
    assert_eq!(
        bit_npz_key("body.block3.unit17.gn2.bias").as_deref(),
        Some("resnet/block3/unit17/b/group_norm/beta")
    );
    assert_eq!(
        bit_npz_key("body.block2.unit01.downsample.weight").as_deref(),
        Some("resnet/block2/unit01/a/proj/standardized_conv2d/kernel")
    );
    assert_eq!(
        ours_from_bit_key("resnet/block1/unit01/d/group_norm/gamma"),
        None
    );
}

#[test]
fn unreadable_files_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, b"hello world, not weights").unwrap();
    let e = format!("{:#}", read_state_dict(&junk).unwrap_err());
    assert!(
        e.contains("junk.bin") && e.contains("unknown weight format"),
        "{e}"
    );
    // A raw pickle that is not a torch.save file of either format.
    let e = format!(
        "{:#}",
        read_state_dict(&fixture("interop/plain_p5.pkl")).unwrap_err()
    );
    assert!(
        e.contains("plain_p5.pkl") && e.contains("without torch.save's magic number"),
        "{e}"
    );
    let e = format!(
        "{:#}",
        read_state_dict(&fixture("interop/evil_global.pth")).unwrap_err()
    );
    assert!(e.contains("disallowed pickle global"), "{e}");
    let missing = dir.path().join("nope.npz");
    let e = format!("{:#}", read_state_dict(&missing).unwrap_err());
    assert!(e.contains("nope.npz"), "{e}");
}

#[test]
fn run_directories_resolve_to_their_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("finetune_flat");
    std::fs::create_dir_all(&run).unwrap();
    let e = format!(
        "{:#}",
        load_model(&run, None, None, Device::Cpu).err().unwrap()
    );
    assert!(e.contains("checkpoint.safetensors, bit.pth.tar"), "{e}");
    // The paper code's run directory holds bit.pth.tar.
    let paper = paper_checkpoint(dir.path());
    std::fs::rename(&paper, run.join("bit.pth.tar")).unwrap();
    assert_reference_logits(&run);
}
