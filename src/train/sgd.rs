//! SGD with momentum over accumulated micro-batches (docs/finetuning.md; the original's
//! `torch.optim.SGD(trainable_params, lr=base_lr, momentum=0.9)` and its
//! accumulation loop in `finetune.py`).
//!
//! The update is torch's with momentum 0.9, dampening 0, no weight decay, no
//! Nesterov: on the first update of a parameter `buf = grad`, afterwards
//! `buf = 0.9 * buf + grad`; then `p -= lr * buf`. Only parameters with
//! `requires_grad` take part (frozen ones get no buffer and are never touched);
//! a trainable parameter whose gradient is still undefined is skipped, as torch
//! skips `grad is None`.
//!
//! Accumulation: each of the `batch_split` micro-batch losses goes through
//! [`Sgd::backward`], which back-propagates `loss / batch_split` (the original's
//! `(c / args.batch_split).backward()`), so the gradients add up to those of the
//! full-batch mean. [`Sgd::step`] then updates once and zeroes the gradients.
//! The original resets its micro-batch counter every iteration, so with
//! `batch_split > 1` it never steps; here the counter is checked instead.
//! Gradients are zeroed in place (PyTorch 1.x `zero_grad()`), not set to `None`
//! as PyTorch 2's default; the two differ only for a parameter that takes no
//! part in a forward pass after its first update, which the BiT model has not.
use std::collections::{HashMap, HashSet};

use tch::{TchError, Tensor};
use thiserror::Error;

/// The momentum of the original's optimizer.
pub const MOMENTUM: f64 = 0.9;

/// A misuse of the optimizer or a torch error.
#[derive(Debug, Error)]
pub enum SgdError {
    /// Wrong arguments, or buffers that do not fit the parameters.
    #[error("sgd: {0}")]
    Invalid(String),
    /// A libtorch error.
    #[error("sgd: {0}")]
    Torch(#[from] TchError),
}

type Result<T> = std::result::Result<T, SgdError>;

struct Slot {
    name: String,
    param: Tensor,
    buf: Option<Tensor>,
    /// The gradient accumulated since the last update (owned by the optimizer;
    /// the parameter's `.grad()` is never used, so nothing has to be zeroed).
    grad: Option<Tensor>,
}

/// SGD with momentum on the trainable parameters of a model, updating once per
/// `batch_split` accumulated micro-batches.
pub struct Sgd {
    slots: Vec<Slot>,
    batch_split: usize,
    accumulated: usize,
}

impl Sgd {
    /// An optimizer over the named parameters (shallow clones of the model's
    /// variables, e.g. a `VarStore`'s) that require gradients; the others are
    /// ignored. Updates take `batch_split` >= 1 micro-batches. Errors on a
    /// duplicate name.
    pub fn new(
        named_params: impl IntoIterator<Item = (String, Tensor)>,
        batch_split: usize,
    ) -> Result<Self> {
        if batch_split == 0 {
            return Err(SgdError::Invalid("--batch-split must be at least 1".into()));
        }
        let mut seen = HashSet::new();
        let mut slots = Vec::new();
        for (name, param) in named_params {
            if !seen.insert(name.clone()) {
                return Err(SgdError::Invalid(format!("parameter {name:?} given twice")));
            }
            if param.requires_grad() {
                slots.push(Slot {
                    name,
                    param,
                    buf: None,
                    grad: None,
                });
            }
        }
        Ok(Self {
            slots,
            batch_split,
            accumulated: 0,
        })
    }

    /// Names of the trainable parameters, in the order given.
    pub fn names(&self) -> Vec<&str> {
        self.slots.iter().map(|s| s.name.as_str()).collect()
    }

    /// Micro-batches per update.
    pub fn batch_split(&self) -> usize {
        self.batch_split
    }

    /// Micro-batches back-propagated since the last update.
    pub fn accumulated(&self) -> usize {
        self.accumulated
    }

    /// Back-propagates one micro-batch loss, scaled by `1 / batch_split`, and
    /// returns how many micro-batches the pending update now holds. Errors if
    /// the update is already complete (call [`Sgd::step`] first).
    pub fn backward(&mut self, loss: &Tensor) -> Result<usize> {
        if self.accumulated == self.batch_split {
            return Err(SgdError::Invalid(format!(
                "{} micro-batches already accumulated; step before the next backward",
                self.batch_split
            )));
        }
        // x / 1 is x: no division node for the usual single micro-batch.
        let scaled = match self.batch_split {
            1 => loss.shallow_clone(),
            n => loss.f_div_scalar(n as f64)?,
        };
        // tch's run_backward crashes on a loss without a graph: refuse it here.
        if !scaled.requires_grad() {
            return Err(SgdError::Invalid(
                "the loss does not depend on any trainable parameter".into(),
            ));
        }
        // Gradients as fresh tensors (torch.autograd.grad), accumulated here: no
        // zeroing pass and no read-modify-write of `.grad` per micro-batch.
        let params: Vec<&Tensor> = self.slots.iter().map(|s| &s.param).collect();
        let grads = Tensor::f_run_backward(&[&scaled], &params, false, false)?;
        tch::no_grad(|| -> Result<()> {
            for (slot, g) in self.slots.iter_mut().zip(grads) {
                if !g.defined() {
                    continue;
                }
                match &mut slot.grad {
                    Some(acc) => {
                        let _ = acc.f_add_(&g)?;
                    }
                    None => slot.grad = Some(g),
                }
            }
            Ok(())
        })?;
        self.accumulated += 1;
        Ok(self.accumulated)
    }

    /// Counts a micro-batch that has no sample on this process (data-parallel
    /// training: a rank whose slice of the global micro-batch is empty).
    pub fn skip_micro(&mut self) -> Result<usize> {
        if self.accumulated == self.batch_split {
            return Err(SgdError::Invalid(format!(
                "{} micro-batches already accumulated; step before the next backward",
                self.batch_split
            )));
        }
        self.accumulated += 1;
        Ok(self.accumulated)
    }

    /// The accumulated gradients of all trainable parameters, in order, as tensors
    /// that share storage with the optimizer's (so a collective can reduce them in
    /// place before [`Sgd::step`]). A gradient still undefined (no sample on this
    /// process) becomes zeros, so every process hands over the same list.
    pub fn gradients_for_reduce(&mut self) -> Vec<Tensor> {
        self.slots
            .iter_mut()
            .map(|s| {
                s.grad
                    .get_or_insert_with(|| s.param.zeros_like())
                    .shallow_clone()
            })
            .collect()
    }

    /// Applies one update with learning rate `lr` (finite, >= 0), then zeroes
    /// the gradients. Errors unless exactly `batch_split` micro-batches were
    /// accumulated.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(SgdError::Invalid(format!(
                "learning rate must be finite and >= 0, got {lr}"
            )));
        }
        if self.accumulated != self.batch_split {
            return Err(SgdError::Invalid(format!(
                "step after {} of {} micro-batches",
                self.accumulated, self.batch_split
            )));
        }
        tch::no_grad(|| -> Result<()> {
            for slot in &mut self.slots {
                let Some(grad) = slot.grad.take() else {
                    continue;
                };
                match &mut slot.buf {
                    Some(buf) => {
                        let _ = buf.f_mul_scalar_(MOMENTUM)?;
                        let _ = buf.f_add_(&grad)?;
                    }
                    // The first update's buffer is the gradient itself (owned).
                    None => slot.buf = Some(grad),
                }
                if let Some(buf) = &slot.buf {
                    let _ = slot.param.f_sub_(&buf.f_mul_scalar(lr)?)?;
                }
            }
            Ok(())
        })?;
        self.zero_grad();
        Ok(())
    }

    /// Zeroes the gradients of the trainable parameters and drops any partly
    /// accumulated update.
    pub fn zero_grad(&mut self) {
        for slot in &mut self.slots {
            slot.grad = None;
        }
        self.accumulated = 0;
    }

    /// The momentum buffers by parameter name, for checkpoints: one per
    /// trainable parameter that has been updated (all of them after the first
    /// update of a model whose forward uses every parameter). The tensors share
    /// storage with the live buffers: save them before the next step.
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        let with_buf = self.slots.iter().filter_map(|s| Some((s, s.buf.as_ref()?)));
        with_buf
            .map(|(s, b)| (s.name.clone(), b.shallow_clone()))
            .collect()
    }

    /// Restores momentum buffers saved by [`Sgd::buffers`]. Strict: either no
    /// buffer at all (a run saved before its first update) or exactly one per
    /// trainable parameter, each of the parameter's shape and kind; copied to
    /// the parameter's device. On error nothing changes.
    pub fn set_buffers(&mut self, buffers: Vec<(String, Tensor)>) -> Result<()> {
        let mut by_name: HashMap<String, Tensor> = HashMap::new();
        for (name, buf) in buffers {
            if !self.slots.iter().any(|s| s.name == name) {
                return Err(SgdError::Invalid(format!(
                    "momentum buffer for {name:?}, which is not a trainable parameter"
                )));
            }
            if by_name.insert(name.clone(), buf).is_some() {
                return Err(SgdError::Invalid(format!(
                    "momentum buffer {name:?} given twice"
                )));
            }
        }
        let mut restored = Vec::with_capacity(self.slots.len());
        if !by_name.is_empty() {
            for slot in &self.slots {
                let buf = by_name.remove(&slot.name).ok_or_else(|| {
                    SgdError::Invalid(format!("no momentum buffer for {:?}", slot.name))
                })?;
                if buf.size() != slot.param.size() || buf.kind() != slot.param.kind() {
                    return Err(SgdError::Invalid(format!(
                        "momentum buffer {:?} is {:?} {:?}, the parameter {:?} {:?}",
                        slot.name,
                        buf.kind(),
                        buf.size(),
                        slot.param.kind(),
                        slot.param.size()
                    )));
                }
                restored.push(buf.f_to_device(slot.param.device())?.f_detach_copy()?);
            }
        }
        let mut restored = restored.into_iter();
        for slot in &mut self.slots {
            slot.buf = restored.next();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    const NAMES: [&str; 5] = ["w1", "b1", "w2", "b2", "frozen"];

    fn fixture() -> Vec<(String, Tensor)> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/train/sgd.safetensors"
        );
        Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn get(t: &[(String, Tensor)], name: &str) -> Tensor {
        let found = t.iter().find(|(n, _)| n == name);
        found
            .unwrap_or_else(|| panic!("{name} not in the fixture"))
            .1
            .shallow_clone()
    }

    /// The fixture's parameters (all but `frozen` trainable), fresh copies.
    fn params(t: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
        let p = |n: &str| {
            get(t, &format!("init_{n}"))
                .copy()
                .set_requires_grad(n != "frozen")
        };
        NAMES.iter().map(|n| (n.to_string(), p(n))).collect()
    }

    /// Named shallow clones, as a model hands its variables to the optimizer.
    fn shallow(p: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
        p.iter()
            .map(|(n, x)| (n.clone(), x.shallow_clone()))
            .collect()
    }

    /// The fixture's tanh MLP and its cross-entropy on micro-batch (k, m).
    fn loss(t: &[(String, Tensor)], p: &[(String, Tensor)], k: i64, m: i64) -> Tensor {
        let w = |i: usize| &p[i].1;
        let x = get(t, "x").get(k).get(m);
        let h = (x.matmul(&w(0).tr()) + w(1)).tanh();
        let logits = h.matmul(&w(2).tr()) + w(3) + w(4);
        logits.cross_entropy_for_logits(&get(t, "y").get(k).get(m))
    }

    /// Largest |got - want| relative to the tensor's scale max(|want|): torch
    /// updates `p` with one fused `p + (-lr) * buf`, we round `lr * buf` first,
    /// so an element that nearly cancels can differ by an ulp of the larger
    /// operands, more than 1e-6 of its own (small) value.
    fn rel_diff(got: &Tensor, want: &Tensor) -> f64 {
        assert_eq!(got.size(), want.size());
        let g = Vec::<f64>::try_from(got.to_kind(Kind::Double).flatten(0, -1)).unwrap();
        let w = Vec::<f64>::try_from(want.to_kind(Kind::Double).flatten(0, -1)).unwrap();
        let scale = w.iter().fold(0.0, |m: f64, x| m.max(x.abs()));
        let rel = |(a, b): (&f64, &f64)| if a == b { 0.0 } else { (a - b).abs() / scale };
        g.iter().zip(&w).map(rel).fold(0.0, f64::max)
    }

    #[test]
    fn matches_torch_sgd_with_accumulation() {
        let t = fixture();
        let p = params(&t);
        let frozen_before = p[4].1.copy();
        let mut sgd = Sgd::new(shallow(&p), 2).unwrap();
        assert_eq!(sgd.names(), ["w1", "b1", "w2", "b2"]);
        let lrs = Vec::<f64>::try_from(get(&t, "lrs")).unwrap();
        // float32 on both sides, relative to each tensor's largest entry: per update
        // the gradient (sums of <= 8 products, tanh, log-softmax, the micro-batch
        // sum) rounds <= 16 times at that scale, momentum and step a few more; the
        // errors accumulate over the updates.
        let f32_unit = f64::from(f32::EPSILON) / 2.0;
        let tol = 2.0 * 16.0 * (lrs.len() as f64 + 1.0) * f32_unit;
        let mut worst = 0.0f64;
        for (k, &lr) in lrs.iter().enumerate() {
            for m in 0..2 {
                assert_eq!(
                    sgd.backward(&loss(&t, &p, k as i64, m)).unwrap(),
                    m as usize + 1
                );
            }
            sgd.step(lr).unwrap();
            for (name, param) in &p {
                let d = rel_diff(param, &get(&t, &format!("p{k}_{name}")));
                assert!(d <= tol, "update {k}: {name} differs by {d:e}");
                worst = worst.max(d);
            }
            let bufs = sgd.buffers();
            assert_eq!(bufs.len(), 4);
            for (name, buf) in &bufs {
                let d = rel_diff(buf, &get(&t, &format!("buf{k}_{name}")));
                assert!(d <= tol, "update {k}: buffer {name} differs by {d:e}");
                worst = worst.max(d);
            }
        }
        eprintln!(
            "torch.optim.SGD: largest difference {worst:.3e}, tolerance {tol:.3e} (margin {:.1}x)",
            tol / worst
        );
        // The frozen parameter: untouched, no gradient, no buffer.
        assert!(p[4].1.equal(&frozen_before));
        assert!(!p[4].1.grad().defined());
        assert!(sgd.buffers().iter().all(|(n, _)| n != "frozen"));
    }

    #[test]
    fn buffers_round_trip_and_resume() {
        let t = fixture();
        let (pa, pb) = (params(&t), params(&t));
        let mut a = Sgd::new(shallow(&pa), 1).unwrap();
        a.backward(&loss(&t, &pa, 0, 0)).unwrap();
        a.step(0.1).unwrap();
        // A second run resumes from a's parameters and momentum buffers.
        tch::no_grad(|| {
            for ((_, x), (_, y)) in pb.iter().zip(&pa) {
                x.shallow_clone().copy_(y);
            }
        });
        let mut b = Sgd::new(shallow(&pb), 1).unwrap();
        b.set_buffers(Vec::new()).unwrap();
        assert!(b.buffers().is_empty());
        let saved = a.buffers().into_iter().map(|(n, x)| (n, x.copy()));
        b.set_buffers(saved.collect()).unwrap();
        a.backward(&loss(&t, &pa, 1, 0)).unwrap();
        b.backward(&loss(&t, &pb, 1, 0)).unwrap();
        a.step(0.05).unwrap();
        b.step(0.05).unwrap();
        for ((n, x), (_, y)) in pa.iter().zip(&pb) {
            assert!(x.equal(y), "{n} differs after resuming");
        }
    }

    #[test]
    fn rejects_misuse() {
        let t = fixture();
        let p = params(&t);
        let named = || shallow(&p);
        assert!(Sgd::new(named(), 0).is_err());
        let mut twice: Vec<(String, Tensor)> = named();
        twice.push(("w1".into(), p[0].1.shallow_clone()));
        assert!(Sgd::new(twice, 1).is_err());

        let mut sgd = Sgd::new(named(), 2).unwrap();
        sgd.backward(&loss(&t, &p, 0, 0)).unwrap();
        let err = sgd.step(0.1).unwrap_err().to_string();
        assert!(err.contains("1 of 2"), "{err}");
        sgd.backward(&loss(&t, &p, 0, 1)).unwrap();
        assert!(sgd.backward(&loss(&t, &p, 1, 0)).is_err());
        assert!(sgd.step(f64::NAN).is_err());
        assert!(sgd.step(-1.0).is_err());
        sgd.step(0.1).unwrap();

        let good: Vec<(String, Tensor)> = sgd.buffers();
        let with = |name: &str, x: Tensor| -> Vec<(String, Tensor)> {
            let mut v: Vec<(String, Tensor)> =
                good.iter().map(|(n, b)| (n.clone(), b.copy())).collect();
            v.push((name.to_string(), x));
            v
        };
        let zeros = |s: &[i64]| Tensor::zeros(s, (Kind::Float, tch::Device::Cpu));
        for (bad, why) in [
            (with("frozen", zeros(&[3])), "not a trainable"),
            (with("w1", zeros(&[4, 5])), "twice"),
            (
                good[1..]
                    .iter()
                    .map(|(n, b)| (n.clone(), b.copy()))
                    .collect(),
                "no momentum",
            ),
        ] {
            let err = sgd.set_buffers(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
        let mut wrong_shape: Vec<(String, Tensor)> = good[1..]
            .iter()
            .map(|(n, b)| (n.clone(), b.copy()))
            .collect();
        wrong_shape.push(("w1".into(), zeros(&[5, 4])));
        assert!(sgd
            .set_buffers(wrong_shape)
            .unwrap_err()
            .to_string()
            .contains("[5, 4]"));
        let mut wrong_kind: Vec<(String, Tensor)> = good[1..]
            .iter()
            .map(|(n, b)| (n.clone(), b.copy()))
            .collect();
        wrong_kind.push(("w1".into(), zeros(&[4, 5]).to_kind(Kind::Double)));
        assert!(sgd.set_buffers(wrong_kind).is_err());
        assert_eq!(sgd.buffers().len(), 4, "a failed restore changes nothing");
    }
}
