"""Single-tensor timings of the spherical methods and the Karcher mean: the reference
(methods.py on float32 copies, stored as bfloat16, as engine.reference_merge runs it)
against the fast paths (kernels.FAST_PATHS, and the torch engine's TORCH_METHODS on the
CPU), on one bfloat16 tensor of 8M entries with a base and two models (slerp: the base and
one). Median of 5. Then where the Karcher mean's time goes: its iterations, and one
iteration against a slerp.

    python3 bench/sphere_bench.py [entries]
"""

from __future__ import annotations

import statistics
import sys
import time
from functools import partial
from unittest import mock

import numpy as np
import torch

from lrmerge_hub.merge.engine import SHAPED
from lrmerge_hub.merge.kernels import FAST_PATHS
from lrmerge_hub.merge.methods import METHODS
from lrmerge_hub.merge.torch_engine import TORCH_METHODS, host_tensor, to_float32

CASES = {  # label: (method, model params, params, rows: the tensor's shape is (rows, n / rows))
    "slerp": ("slerp", [{}], {"t": 0.4}, 1),
    "nuslerp": ("nuslerp", [{"weight": 0.6}, {"weight": 0.4}], {"nuslerp_flatten": True, "nuslerp_row_wise": False}, 1),
    "nuslerp rows": (
        "nuslerp",
        [{"weight": 0.6}, {"weight": 0.4}],
        {"nuslerp_flatten": False, "nuslerp_row_wise": False},
        2048,
    ),
    "nuslerp cols": (
        "nuslerp",
        [{"weight": 0.6}, {"weight": 0.4}],
        {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        2048,
    ),
    "multislerp": ("multislerp", [{"weight": 0.6}, {"weight": 0.4}], {"normalize_weights": True, "eps": 1e-8}, 1),
    "model_stock": ("model_stock", [{}, {}], {"filter_wise": False}, 1),
    "model_stock rows": ("model_stock", [{}, {}], {"filter_wise": True}, 2048),
    "karcher": ("karcher", [{}, {}], {"max_iter": 10, "tol": 1e-5}, 1),
}


def median_seconds(fn, runs: int = 5) -> float:
    fn()  # compiled / warm
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference(method, base, xs, model_params, params, shape):
    f32 = [to_float32(host_tensor(a)).view(shape) for a in [base, *xs]]
    return METHODS[method].fn(f32[0], f32[1:], model_params, params)[0].to(torch.bfloat16)


def kernels(method, base, xs, model_params, params, shape):
    shaped = {"shape": shape} if method in SHAPED else {}
    return FAST_PATHS[method](base, xs, model_params, params, out_bf16=True, check_finite=True, **shaped)


def torch_engine(method, base, xs, model_params, params, shape):
    tensors = [host_tensor(a) for a in xs]
    shaped = {"shape": shape} if method in SHAPED else {}
    return TORCH_METHODS[method](host_tensor(base), tensors, model_params, params, torch.bfloat16, **shaped)


def main(n: int) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    models = [(base.float() + 0.05 * torch.randn(n, generator=g)).to(torch.bfloat16) for _ in range(2)]
    raw = [a.view(torch.int16).numpy().view(np.uint16) for a in [base, *models]]
    print(f"{n} entries, bfloat16, {torch.get_num_threads()} torch threads")
    for label, (method, model_params, params, rows) in CASES.items():
        xs = raw[1 : 1 + len(model_params)]
        args = (method, raw[0], xs, model_params, params, (rows, n // rows) if rows > 1 else (n,))
        ref, fast, te = (median_seconds(partial(f, *args)) for f in (reference, kernels, torch_engine))
        print(
            f"{label:16s} reference {ref:6.3f} s  kernels {fast:6.3f} s ({ref / fast:4.1f}x)  torch engine {te:.3f} s"
        )

    from lrmerge_hub.merge import geometric

    inputs = [to_float32(host_tensor(a)) for a in raw[:2]]
    iterations = 0
    cos = torch.cos

    def counting_cos(x):  # karcher_mean calls torch.cos once per iteration that moves the mean
        nonlocal iterations
        iterations += 1
        return cos(x)

    with mock.patch.object(geometric.torch, "cos", counting_cos):
        geometric.karcher_mean(inputs, 10, 1e-5)
    one = median_seconds(lambda: geometric.karcher_mean(inputs, 1, 1e-5))
    ten = median_seconds(lambda: geometric.karcher_mean(inputs, 10, 1e-5))
    slerp = median_seconds(lambda: geometric.slerp(0.5, *inputs))
    print(
        f"karcher (2 inputs): {iterations} iterations of max_iter 10; 1 iteration {one:.3f} s, 10 {ten:.3f} s"
        f" ({(ten - one) / 9:.3f} s per iteration); geometric.slerp {slerp:.3f} s"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 23)
