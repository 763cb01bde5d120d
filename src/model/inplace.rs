//! Element-wise steps written into the fresh tensor they act on when no autograd
//! graph records it (inference): the same numbers as the out-of-place operations,
//! without a new buffer and its pass over memory. With a graph (training, input
//! gradients) they fall back to the out-of-place operations, which autograd needs.
use tch::Tensor;

/// `fresh + other`; `fresh` must be a tensor nothing else holds (an operation's
/// output).
pub(crate) fn add(fresh: Tensor, other: &Tensor) -> Tensor {
    if fresh.requires_grad() {
        fresh + other
    } else {
        let mut fresh = fresh;
        fresh += other;
        fresh
    }
}

/// `relu(fresh)`.
pub(crate) fn relu(fresh: Tensor) -> Tensor {
    if fresh.requires_grad() {
        fresh.relu()
    } else {
        let mut fresh = fresh;
        let _ = fresh.relu_();
        fresh
    }
}

/// GELU with erf, `gelu(fresh)`.
pub(crate) fn gelu(fresh: Tensor) -> Tensor {
    if fresh.requires_grad() {
        fresh.gelu("none")
    } else {
        let mut fresh = fresh;
        let _ = fresh.gelu_("none");
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn in_place_without_a_graph_and_apart_with_one() {
        let x = Tensor::randn([4, 5], (Kind::Float, Device::Cpu));
        let y = Tensor::randn([4, 5], (Kind::Float, Device::Cpu));
        for (got, want) in [
            (add(&x * 1.0, &y), &x + &y),
            (relu(&x * 1.0), x.relu()),
            (gelu(&x * 1.0), x.gelu("none")),
        ] {
            assert!(got.equal(&want));
        }
        // Without a graph the result is the input's own storage.
        let fresh = &x * 1.0;
        let ptr = fresh.data_ptr();
        assert_eq!(add(fresh, &y).data_ptr(), ptr);
        // With one, autograd keeps what it saved: the gradient of gelu(x) + y.
        let xg = x.copy().set_requires_grad(true);
        let out = add(gelu(&xg * 1.0), &y);
        out.sum(Kind::Float).backward();
        let xd = x.copy().set_requires_grad(true);
        (xd.gelu("none") + &y).sum(Kind::Float).backward();
        assert!(xg.grad().equal(&xd.grad()));
    }
}
