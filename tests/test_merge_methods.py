"""The classic merge methods: hand-computed math, statistics of the random ones, validation, mergekit parity."""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch
from torch import Tensor

from dam.errors import DamError
from dam.merge.methods.slerp import nuslerp, slerp
from dam.merge.methods.sparsify import (
    RADIX_MIN,
    apply_mask,
    breadcrumbs_mask,
    della_mask,
    keep_ranks,
    kth_largest,
    magnitude_mask,
    random_mask,
    sparsify,
)
from dam.merge.methods.task_arithmetic import sign_consensus
from dam.merge.registry import METHODS, REQUIRED, describe_methods, get_method

RANDOM_METHODS = ["dare_linear", "dare_ties", "della", "della_linear"]


def merge(
    name: str,
    tensors: list[Tensor],
    base: Tensor | None = None,
    base_index: int | None = None,
    model_params: list[dict[str, Any]] | None = None,
    generator: torch.Generator | None = None,
    **params: Any,
) -> Tensor:
    """Call a registered method the way the engine does."""
    if model_params is None:
        model_params = [{} for _ in tensors]
    return METHODS[name].fn(tensors, base, base_index, model_params, params, generator)


def vec(*values: float) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


def close(a: Tensor, b: Tensor, atol: float = 1e-6) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Registry


def test_registry_has_mergekit_keys_and_defaults() -> None:
    assert set(METHODS) == {
        "linear",
        "slerp",
        "nuslerp",
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "model_stock",
        "passthrough",
        "multislerp",
        "karcher",
        "sce",
        "nearswap",
        "arcee_fusion",
        "ram",
        "ramplus_tl",
    }
    normalize = {name: m.global_params["normalize"] for name, m in METHODS.items() if "normalize" in m.global_params}
    assert normalize == {
        "linear": True,
        "task_arithmetic": False,
        "ties": True,
        "dare_linear": False,
        "dare_ties": False,
        "breadcrumbs": False,
        "breadcrumbs_ties": False,
        "della": True,
        "della_linear": False,
    }
    assert {n for n, m in METHODS.items() if m.global_params.get("rescale")} == set(RANDOM_METHODS)
    assert {n for n, m in METHODS.items() if m.random} == {*RANDOM_METHODS, "arcee_fusion"}  # sampled quantiles
    assert METHODS["breadcrumbs"].model_params["gamma"] == 0.01
    assert METHODS["della"].model_params["epsilon"] == 0.15
    assert METHODS["ties"].model_params == {"weight": REQUIRED, "density": 1.0}
    assert METHODS["ties"].global_params["lambda"] == 1.0
    assert METHODS["slerp"].global_params == {"t": REQUIRED} and METHODS["slerp"].num_models == 2
    assert METHODS["nuslerp"].global_params == {"nuslerp_row_wise": False, "nuslerp_flatten": True}
    assert METHODS["model_stock"].global_params == {"filter_wise": False}
    assert METHODS["passthrough"].model_params == {"scale": None}
    base_optional = ("linear", "nuslerp", "passthrough", "multislerp", "karcher")
    assert all(m.requires_base for n, m in METHODS.items() if n not in base_optional)


def test_describe_and_get_method() -> None:
    text = describe_methods()
    assert all(name in text for name in METHODS)
    assert "gamma=0.01" in text and "epsilon=0.15" in text
    assert get_method("ties") is METHODS["ties"]
    with pytest.raises(DamError, match="unknown merge_method 'tie'.*dare_ties"):
        get_method("tie")


# ---------------------------------------------------------------------------------------------------------------
# Hand-computed math


def test_linear_normalises_weights() -> None:
    xs = [torch.full((2, 3), 1.0), torch.full((2, 3), 3.0)]
    w = [{"weight": 1.0}, {"weight": 3.0}]
    close(merge("linear", xs, model_params=w), torch.full((2, 3), 2.5))
    close(merge("linear", xs, model_params=w, normalize=False), torch.full((2, 3), 10.0))


def test_linear_one_hot_gives_that_model() -> None:
    xs = [torch.randn(4, 5) for _ in range(3)]
    for k in range(3):
        w = [{"weight": 1.0 if i == k else 0.0} for i in range(3)]
        assert torch.equal(merge("linear", xs, model_params=w), xs[k])


def test_linear_includes_a_listed_base_and_refuses_an_unlisted_one() -> None:
    xs = [vec(0.0), vec(2.0)]
    w = [{"weight": 1.0}, {"weight": 1.0}]
    close(merge("linear", xs, base=xs[0], base_index=0, model_params=w), vec(1.0))
    with pytest.raises(DamError, match="base_model is not listed"):
        merge("linear", xs, base=vec(5.0), model_params=w)


def test_slerp_endpoints_and_orthogonal_midpoint() -> None:
    e1, e2 = vec(1.0, 0.0), vec(0.0, 1.0)
    close(merge("slerp", [e2], base=e1, t=0.0), e1)
    close(merge("slerp", [e2], base=e1, t=1.0), e2)
    close(merge("slerp", [e2], base=e1, t=0.5), vec(math.sqrt(0.5), math.sqrt(0.5)))
    # t = 1/3 on orthogonal vectors turns the base by 30 degrees, and interpolates the norms' coefficients.
    a, b = 2 * e1, 3 * e2
    expected = math.sin(math.pi / 3) * a + math.sin(math.pi / 6) * b
    close(merge("slerp", [a, b], base=a, base_index=0, t=1 / 3), expected)
    # The base is the t = 0 end wherever it is listed.
    close(merge("slerp", [b, a], base=a, base_index=1, t=1 / 3), expected)


def test_slerp_parallel_falls_back_to_lerp() -> None:
    v = vec(1.0, 2.0, 3.0)
    close(merge("slerp", [4 * v], base=v, t=0.25), 1.75 * v)  # cos = 1 > 0.9995
    close(merge("slerp", [-v], base=v, t=0.25), 0.5 * v)  # cos = -1
    e1 = vec(1.0, 0.0)
    for theta, spherical in ((0.1, True), (0.02, False)):  # cos 0.995 < 0.9995 < cos 0.9998
        v1 = vec(math.cos(theta), math.sin(theta))
        expected = vec(math.cos(theta / 2), math.sin(theta / 2)) if spherical else (e1 + v1) / 2
        close(merge("slerp", [v1], base=e1, t=0.5), expected)


def test_nuslerp_weights_set_t() -> None:
    e1, e2 = vec(1.0, 0.0), vec(0.0, 1.0)
    w = [{"weight": 1.0}, {"weight": 3.0}]  # t = 3/4
    expected = math.sin(math.pi / 8) * e1 + math.sin(3 * math.pi / 8) * e2
    close(merge("nuslerp", [e1, e2], model_params=w), expected)
    base = vec(5.0, -1.0)
    close(merge("nuslerp", [base + e1, base + e2], base=base, model_params=w), base + expected)
    # Listed base: its own entry needs no weight and is left out.
    out = merge("nuslerp", [base, base + e1, base + e2], base=base, base_index=0, model_params=[{}, *w])
    close(out, base + expected)
    # Weights summing to ~0 give t = 0.5.
    zero = [{"weight": 1.0}, {"weight": -1.0}]
    close(merge("nuslerp", [e1, e2], model_params=zero), math.sqrt(0.5) * (e1 + e2))


def test_nuslerp_rows_and_columns() -> None:
    e1, e2 = vec(1.0, 0.0), vec(0.0, 1.0)
    x0 = torch.stack([e1, e1])  # rows are e1
    x1 = torch.stack([e2, e1])  # row 0 orthogonal to x0's, row 1 equal
    # Per row (flatten false): row 0 is the orthogonal midpoint, row 1 stays e1.
    out = nuslerp(0.5, x0, x1, flatten=False)
    close(out, torch.stack([math.sqrt(0.5) * (e1 + e2), e1]))
    # Per column (row_wise): column 0 of x0 is (1, 1), of x1 (0, 1); column 1: (0, 0) and (1, 0).
    out = nuslerp(0.5, x0, x1, row_wise=True, flatten=False)
    col0 = slerp(0.5, vec(1.0, 1.0), vec(0.0, 1.0))
    close(out[:, 0], col0)
    close(out[:, 1], vec(math.sqrt(0.5), 0.0))  # a zero vector counts as orthogonal (cos = 0), not collinear


def test_task_arithmetic_formula() -> None:
    base = vec(1.0, 2.0, 3.0)
    d1, d2 = vec(1.0, -1.0, 0.5), vec(-2.0, 0.0, 4.0)
    w = [{"weight": 0.5}, {"weight": 2.0}]
    out = merge("task_arithmetic", [base + d1, base + d2], base=base, model_params=w)
    close(out, base + 0.5 * d1 + 2.0 * d2)
    out = merge("task_arithmetic", [base + d1, base + d2], base=base, model_params=w, **{"lambda": 0.3})
    close(out, base + 0.3 * (0.5 * d1 + 2.0 * d2))
    out = merge("task_arithmetic", [base + d1, base + d2], base=base, model_params=w, normalize=True)
    close(out, base + (0.5 * d1 + 2.0 * d2) / 2.5)
    # Weights summing to zero leave the sum undivided (divisor 1).
    cancel = [{"weight": 1.0}, {"weight": -1.0}]
    out = merge("task_arithmetic", [base + d1, base + d2], base=base, model_params=cancel, normalize=True)
    close(out, base + d1 - d2)
    # A listed base contributes no task vector and needs no parameters.
    out = merge("task_arithmetic", [base, base + d1, base + d2], base=base, base_index=0, model_params=[{}, *w])
    close(out, base + 0.5 * d1 + 2.0 * d2)
    # Only the base: the result is the base.
    close(merge("ties", [base], base=base, base_index=0), base)


def test_ties_sign_election() -> None:
    base = torch.zeros(5)
    x1 = vec(3.0, -1.0, 2.0, 0.0, 1.0)
    x2 = vec(-1.0, -2.0, 2.0, 1.0, -1.0)
    w = [{"weight": 1.0}, {"weight": 1.0}]
    # col 0: sum 2 > 0, only x1 agrees -> 3; col 1: both negative -> -1.5; col 2: 2;
    # col 3: x1's zero never agrees -> 1; col 4: a zero sum elects +, so only x1 -> 1.
    close(merge("ties", [x1, x2], base=base, model_params=w), vec(3.0, -1.5, 2.0, 1.0, 1.0))
    close(merge("ties", [x1, x2], base=base, model_params=w, normalize=False), vec(3.0, -3.0, 4.0, 1.0, 1.0))
    # Weights enter the election: with x2 weighted 4, col 0 sums to 3 - 4 < 0 and elects x2.
    w = [{"weight": 1.0}, {"weight": 4.0}]
    assert merge("ties", [x1, x2], base=base, model_params=w)[0].item() == pytest.approx(-1.0)
    # Agreeing entries whose weights cancel (1 * 1 and -1 * -2 are both +): the zero divisor becomes 1.
    w = [{"weight": 1.0}, {"weight": -1.0}]
    close(merge("ties", [vec(1.0), vec(-2.0)], base=vec(0.0), model_params=w), vec(3.0))
    mask = sign_consensus(torch.stack([x1, x2]))
    assert mask.tolist() == [[True, True, True, False, True], [False, True, True, True, False]]


def test_ties_trims_by_magnitude() -> None:
    base = torch.zeros(4)
    x = vec(0.1, -5.0, 3.0, 0.2)
    out = merge("ties", [x], base=base, model_params=[{"weight": 1.0, "density": 0.5}])
    close(out, vec(0.0, -5.0, 3.0, 0.0))
    assert magnitude_mask(x, 0.1).tolist() == [False, True, False, False]  # k = max(1, int(0.4)) = 1


def test_kth_largest_is_exactly_kthvalue() -> None:
    g = torch.Generator().manual_seed(5)
    n = 3 * RADIX_MIN + 17  # the radix path
    cases = {
        "distinct": torch.randn(n, generator=g).abs(),
        # bf16 deltas: few distinct values, so the k-th largest sits in a long run of equal ones
        "bf16 deltas": (0.01 * torch.randn(n, generator=g)).bfloat16().float().abs(),
        "mostly zeros": torch.where(torch.rand(n, generator=g) < 0.9, 0.0, torch.rand(n, generator=g)),
        "all equal": torch.full((n,), 0.25),
        "subnormal to large": torch.randn(n, generator=g).abs() * 10.0 ** torch.randint(-44, 30, (n,), generator=g),
        "one bucket apart": torch.tensor([1.0, 1.0 + 2**-23] * (n // 2)),  # same top 16 bits, different low 16
    }
    for name, m in cases.items():
        n = m.numel()
        for k in (1, 2, n // 3, n // 2, n - 1, n):
            expected = torch.kthvalue(m, n - k + 1).values
            got = kth_largest(m, k)
            assert got.dtype == m.dtype and got.dim() == 0
            assert got.item() == expected.item(), (name, k)
    small = torch.randn(100, generator=g).abs()  # below RADIX_MIN: kthvalue itself
    assert kth_largest(small, 7).item() == torch.kthvalue(small, 94).values.item()


def test_keep_ranks_keeps_the_true_entries_of_those_ranks_across_chunks(monkeypatch) -> None:
    import dam.merge.methods.sparsify as sparsify_module

    monkeypatch.setattr(sparsify_module, "RANK_CHUNK", 64)  # a bound in the middle of a chunk, and at its edges
    g = torch.Generator().manual_seed(3)
    for share in (0.02, 0.5, 1.0):
        flags = torch.rand(1000, generator=g) < share
        true_at = flags.nonzero().view(-1)
        total = len(true_at)
        for start, stop in [(0, 0), (0, 1), (0, 64), (5, 70), (63, 129), (0, total), (7, None), (total, None)]:
            expected = torch.zeros_like(flags)
            expected[true_at[start:stop]] = True
            assert torch.equal(keep_ranks(flags.clone(), start, stop), expected), (share, start, stop)


def test_masks_with_ties_across_rank_chunks(monkeypatch) -> None:
    """The tie rules of TIES and breadcrumbs when the tied entries span several of keep_ranks' chunks."""
    import dam.merge.methods.sparsify as sparsify_module

    monkeypatch.setattr(sparsify_module, "RANK_CHUNK", 1000)
    g = torch.Generator().manual_seed(4)
    x = (0.01 * torch.randn(300, 257, generator=g)).bfloat16().float()
    x[torch.rand(x.shape, generator=g) < 0.6] = 0.0  # most entries zero: the threshold is 0, tied in every chunk
    for density in (0.3, 0.5):
        assert torch.equal(magnitude_mask(x, density), _sorted_top_k(x, density, stable=True))
        n, keep = x.numel(), int(density * x.numel())
        start = max(0, n - keep - int(0.01 * n))
        order = torch.sort(x.abs().flatten(), stable=True).indices
        expected = torch.zeros(n, dtype=torch.bool)
        expected[order[start : start + keep]] = True
        assert torch.equal(breadcrumbs_mask(x, density, 0.01), expected.view(x.shape))


@pytest.mark.parametrize("shape", [(7,), (300, 257)])  # the second above RADIX_MIN: the radix path
@pytest.mark.parametrize(("density", "gamma"), [(0.3, 0.0), (0.5, 0.01), (0.2, 0.3), (0.9, 0.2), (0.001, 0.0)])
def test_breadcrumbs_mask_is_a_stable_sorts_window(shape, density, gamma) -> None:
    g = torch.Generator().manual_seed(len(shape))
    for x in (torch.randn(shape, generator=g), (0.01 * torch.randn(shape, generator=g)).bfloat16().float()):
        n = x.numel()
        keep, start = int(density * n), max(0, n - int(density * n) - int(gamma * n))
        order = torch.sort(x.abs().flatten(), stable=True).indices  # bf16 deltas: many equal magnitudes
        expected = torch.zeros(n, dtype=torch.bool)
        expected[order[start : start + keep]] = True
        assert torch.equal(breadcrumbs_mask(x, density, gamma), expected.view(shape))


def _sorted_top_k(x: Tensor, density: float, stable: bool) -> Tensor:
    """mergekit 0.1.5's selection (``stable=False``: its exact call) or the stable-sort order of ties."""
    k = max(1, int(density * x.numel()))
    order = torch.sort(x.abs().flatten(), descending=True, stable=stable).indices
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(x.shape)


@pytest.mark.parametrize("shape", [(7,), (64, 48), (300, 257)])
@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.9])
def test_magnitude_mask_by_threshold_picks_what_a_sort_picks(shape, density) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    # bf16-rounded deltas take few distinct values, so many magnitudes tie at the threshold
    x = (0.01 * torch.randn(shape, generator=g)).bfloat16().float()
    mask = magnitude_mask(x, density)
    assert torch.equal(mask, _sorted_top_k(x, density, stable=True))  # ties: lowest index first
    mergekit = _sorted_top_k(x, density, stable=False)
    assert int(mask.sum()) == int(mergekit.sum()) == max(1, int(density * x.numel()))
    # Everything strictly above the threshold magnitude is kept by both, and both keep the same magnitudes:
    # only which of the entries tied at the threshold survive may differ.
    threshold = x.abs()[mask].min()
    assert torch.equal(mask & (x.abs() > threshold), mergekit & (x.abs() > threshold))
    assert torch.equal(x.abs()[mask].sort().values, x.abs()[mergekit].sort().values)
    distinct = torch.randn(shape, generator=g)  # no ties: exactly mergekit's selection
    assert torch.equal(magnitude_mask(distinct, density), _sorted_top_k(distinct, density, stable=False))


def test_breadcrumbs_drops_outliers_and_keeps_the_next_density() -> None:
    values = torch.arange(1, 101, dtype=torch.float32)
    x = values * torch.where(torch.arange(100) % 2 == 0, 1.0, -1.0)
    x = x[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    mask = breadcrumbs_mask(x, density=0.1, gamma=0.05)
    assert sorted(x[mask].abs().tolist()) == list(range(86, 96))  # top 5 dropped, next 10 kept
    out = merge(
        "breadcrumbs", [x], base=torch.zeros(100), model_params=[{"weight": 1.0, "density": 0.1, "gamma": 0.05}]
    )
    close(out, x * mask)
    # Default gamma 0.01 drops the single largest; when keep + top > n fewer outliers go.
    assert sorted(x[breadcrumbs_mask(x, 0.1, 0.01)].abs().tolist()) == list(range(90, 100))
    assert sorted(x[breadcrumbs_mask(x, 0.98, 0.05)].abs().tolist()) == list(range(1, 99))


def test_model_stock_formula() -> None:
    base = vec(1.0, 1.0)
    a, b = vec(1.0, 0.0), vec(1.0, 1.0)  # offsets from the base
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    expected = t * (base + (a + b) / 2) + (1 - t) * base
    close(merge("model_stock", [base + a, base + b], base=base), expected)
    # Orthogonal offsets: t = 0, the base. Identical offsets: t = 1, the average.
    close(merge("model_stock", [base + vec(1, 0), base + vec(0, 1)], base=base), base)
    close(merge("model_stock", [base + a, base + a, base + a], base=base), base + a)
    # filter_wise: one t per row.
    base2 = torch.zeros(2, 2)
    x1 = torch.stack([vec(1, 0), vec(2, 2)])
    x2 = torch.stack([vec(0, 1), vec(2, 2)])
    close(merge("model_stock", [x1, x2], base=base2, filter_wise=True), torch.stack([vec(0, 0), vec(2, 2)]))
    # Opposite offsets with N = 2: 1 + c = 0 is singular and keeps the base.
    close(merge("model_stock", [base + a, base - a], base=base), base)


def test_dare_and_della_at_density_one_equal_their_deterministic_counterparts() -> None:
    base = torch.randn(8, 16)
    xs = [base + torch.randn(8, 16) for _ in range(3)]
    w = [{"weight": v, "density": 1.0} for v in (0.3, 0.5, 0.9)]
    ta = merge("task_arithmetic", xs, base=base, model_params=[{"weight": p["weight"]} for p in w])
    close(merge("dare_linear", xs, base=base, model_params=w), ta)
    close(merge("della_linear", xs, base=base, model_params=w), ta)
    ties = merge("ties", xs, base=base, model_params=w, normalize=False)
    close(merge("dare_ties", xs, base=base, model_params=w), ties)
    close(merge("della", xs, base=base, model_params=w, normalize=False), ties)


def test_passthrough_scale() -> None:
    x = torch.randn(3, 4)
    assert torch.equal(merge("passthrough", [x], model_params=[{"scale": None}]), x)
    assert torch.equal(merge("passthrough", [x]), x)
    close(merge("passthrough", [x], model_params=[{"scale": 0.5}]), 0.5 * x)


# ---------------------------------------------------------------------------------------------------------------
# Random methods: statistics and reproducibility

N_STAT = 100_000


def test_dare_keeps_density_fraction_and_l1_norm() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_STAT, generator=g)
    for density in (0.1, 0.5, 0.9):
        mask = random_mask(x, density, g)
        assert abs(mask.float().mean().item() - density) < 0.01
        out = apply_mask(x, mask, rescale=True)
        assert out.abs().sum().item() == pytest.approx(x.abs().sum().item(), rel=1e-5)
        assert torch.equal(out == 0, ~mask)
        close(apply_mask(x, mask, rescale=False), x * mask)
    # Survivors with an L1 norm below 1e-7 are not blown up to the original norm.
    tiny = vec(1.0, 1e-9, 0.0)
    assert torch.equal(apply_mask(tiny, torch.tensor([False, True, True]), rescale=True), vec(0.0, 1e-9, 0.0))
    close(apply_mask(tiny, torch.tensor([False, True, False]) | (tiny == 1.0), rescale=True), tiny)


def test_sparsify_in_place_writes_the_same_bits_into_its_input() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, 30, generator=g)
    x[0, :4] = torch.tensor([float("nan"), -0.0, 0.0, float("inf")])  # where's values, not a product's
    for method, options in [
        ("magnitude", {}),
        ("breadcrumbs", {"gamma": 0.05}),
        ("random", {}),
        ("della", {"epsilon": 0.1}),
    ]:
        for rescale in (False, True):
            expected = sparsify(x, method, 0.4, rescale=rescale, generator=torch.Generator().manual_seed(1), **options)
            y = x.clone()
            out = sparsify(
                y, method, 0.4, rescale=rescale, generator=torch.Generator().manual_seed(1), in_place=True, **options
            )
            assert out.data_ptr() == y.data_ptr()
            assert torch.equal(y.view(torch.int32), expected.view(torch.int32)), (method, rescale)


def test_dare_draws_are_torch_bernoullis() -> None:
    # mergekit draws torch.bernoulli(full_like(x, density)); dam's faster u < density must keep the same entries
    x = torch.randn(300, 70)
    for density in (0.01, 0.3, 0.77):
        expected = torch.bernoulli(torch.full_like(x, density), generator=torch.Generator().manual_seed(4)).bool()
        assert torch.equal(random_mask(x, density, torch.Generator().manual_seed(4)), expected)


def test_della_keeps_density_fraction_ramped_by_magnitude() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100, 1000, generator=g)
    density, epsilon = 0.4, 0.1
    mask = della_mask(x, density, epsilon, g)
    assert abs(mask.float().mean().item() - density) < 0.01
    # Within each row, the largest tenth by magnitude keeps ~density + 0.9 epsilon, the smallest ~ - 0.9 epsilon.
    rank = x.abs().argsort(dim=1).argsort(dim=1)
    top, bottom = mask[rank >= 900].float().mean().item(), mask[rank < 100].float().mean().item()
    assert abs(top - (density + 0.9 * epsilon)) < 0.015
    assert abs(bottom - (density - 0.9 * epsilon)) < 0.015
    out = sparsify(x, "della", density, epsilon=epsilon, rescale=True, generator=g)
    assert out.abs().sum().item() == pytest.approx(x.abs().sum().item(), rel=1e-5)
    # A single column has no ramp: p = density.
    col = della_mask(torch.randn(N_STAT, 1, generator=g), density, epsilon, g)
    assert abs(col.float().mean().item() - density) < 0.01


@pytest.mark.parametrize("name", RANDOM_METHODS)
def test_random_methods_preserve_each_models_l1_norm(name: str) -> None:
    """One model, weight 1, no normalisation: the output delta is that model's rescaled sparse delta."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(N_STAT, generator=g)
    delta = torch.randn(N_STAT, generator=g)
    out = merge(
        name, [base + delta], base=base, model_params=[{"weight": 1.0, "density": 0.3}], generator=g, normalize=False
    )
    out_delta = out - base
    assert abs((out_delta != 0).float().mean().item() - 0.3) < 0.01
    assert out_delta.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-4)


@pytest.mark.parametrize("name", RANDOM_METHODS)
def test_random_methods_reproducible_from_seed(name: str) -> None:
    base = torch.randn(64, 64)
    xs = [base + torch.randn(64, 64) for _ in range(2)]
    w = [{"weight": 0.5, "density": 0.5}, {"weight": 0.7, "density": 0.6}]

    def run(seed: int) -> Tensor:
        return merge(name, xs, base=base, model_params=w, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    torch.manual_seed(3)
    first = merge(name, xs, base=base, model_params=w)
    torch.manual_seed(3)
    assert torch.equal(first, merge(name, xs, base=base, model_params=w))  # generator=None: the global RNG


# ---------------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    ("name", "model_params", "params", "match"),
    [
        ("ties", {"weight": 1.0, "density": 0.0}, {}, r"models\[0\]: density=0.0 is outside \(0, 1\]"),
        ("dare_ties", {"weight": 1.0, "density": 1.5}, {}, r"density=1.5 is outside"),
        ("breadcrumbs", {"weight": 1.0, "density": 0.5, "gamma": 1.0}, {}, r"gamma=1.0 is outside \[0, 1\)"),
        ("della", {"weight": 1.0, "density": 0.5, "epsilon": 0.5}, {}, r"density=0.5 and epsilon=0.5"),
        ("della_linear", {"weight": 1.0, "density": 0.9, "epsilon": 0.15}, {}, r"epsilon=0.15"),
        ("ties", {"density": 0.5}, {}, r"models\[0\]: missing required parameter 'weight'"),
        ("ties", {"weight": "heavy"}, {}, r"'weight' must be a finite number"),
        ("ties", {"weight": 1.0, "densty": 0.5}, {}, r"unknown parameter\(s\) densty"),
        ("ties", {"weight": 1.0}, {"normalize": "yes"}, r"'normalize' must be true or false"),
        ("ties", {"weight": 1.0}, {"lambda": float("nan")}, r"'lambda' must be a finite number"),
        ("linear", {"weight": 0.0}, {}, r"weight: the weights \[0.0, 0.0\] sum to 0"),
    ],
)
def test_bad_parameters_raise(name: str, model_params: dict, params: dict, match: str) -> None:
    base = torch.zeros(4)
    xs = [torch.randn(4), torch.randn(4)]
    with pytest.raises(DamError, match=match):
        merge(name, xs, base=None if name == "linear" else base, model_params=[model_params] * 2, **params)


def test_bad_structure_raises() -> None:
    x, y, z = torch.randn(4), torch.randn(4), torch.randn(4)
    with pytest.raises(DamError, match="missing required parameter 't'"):
        merge("slerp", [x], base=y)
    with pytest.raises(DamError, match="slerp merges exactly 2"):
        merge("slerp", [x, y], base=z, t=0.5)
    with pytest.raises(DamError, match="slerp merges exactly 2"):
        merge("slerp", [x, y, z], base=x, base_index=0, t=0.5)
    with pytest.raises(DamError, match="slerp needs base_model"):
        merge("slerp", [x, y], t=0.5)
    with pytest.raises(DamError, match="ties needs base_model"):
        merge("ties", [x, y], model_params=[{"weight": 1.0}] * 2)
    with pytest.raises(DamError, match="model_stock needs at least two models besides the base"):
        merge("model_stock", [x, y], base=x, base_index=0)
    with pytest.raises(DamError, match="nuslerp needs exactly two models"):
        merge("nuslerp", [x, y, z], model_params=[{"weight": 1.0}] * 3)
    with pytest.raises(DamError, match="passthrough merges exactly 1"):
        merge("passthrough", [x, y])
    with pytest.raises(DamError, match="input shapes differ"):
        merge("linear", [x, torch.randn(5)], model_params=[{"weight": 1.0}] * 2)
    with pytest.raises(DamError, match="2 models but 1 per-model"):
        merge("linear", [x, y], model_params=[{"weight": 1.0}])


# ---------------------------------------------------------------------------------------------------------------
# Parity with mergekit 0.1.5 on random tensors


def mergekit_merge(
    name: str, tensors: list[Tensor], base_index: int | None, per_model: dict[str, list[Any]], params: dict[str, Any]
) -> Tensor:
    """mergekit's own merge method on one tensor group (the base, if any, is one of ``tensors``)."""
    mk = pytest.importorskip("mergekit.merge_methods")
    group = mk.TensorGroup.from_tensors(tensors, base_index=base_index)
    parameters = {**params, **{key: dict(enumerate(values)) for key, values in per_model.items()}}
    (out,) = mk.get(name)([group], parameters=parameters)
    return out


def ours(
    name: str, tensors: list[Tensor], base_index: int | None, per_model: dict[str, list[Any]], params: dict[str, Any]
) -> Tensor:
    model_params = [{key: values[i] for key, values in per_model.items()} for i in range(len(tensors))]
    if base_index is not None and name not in ("linear", "passthrough"):
        model_params[base_index] = {}
    base = tensors[base_index] if base_index is not None else None
    return METHODS[name].fn(tensors, base, base_index, model_params, params, None)


def family(n: int, shape: tuple[int, ...] = (24, 40), seed: int = 0, quantized: bool = False) -> list[Tensor]:
    """A base and ``n`` fine-tunes; ``quantized`` rounds deltas to a coarse grid so magnitudes tie often."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    deltas = [0.1 * torch.randn(shape, generator=g) for _ in range(n)]
    if quantized:
        deltas = [torch.round(d * 40) / 40 for d in deltas]
    return [base] + [base + d for d in deltas]


WEIGHTS = [1.0, 0.6, 0.3, -0.2]
DENSITIES = [1.0, 0.5, 0.35, 0.8]

PARITY_CASES: list[tuple[str, dict[str, list[Any]], dict[str, Any]]] = [
    ("task_arithmetic", {"weight": WEIGHTS}, {}),
    ("task_arithmetic", {"weight": WEIGHTS}, {"normalize": True, "lambda": 0.7}),
    ("ties", {"weight": WEIGHTS, "density": DENSITIES}, {}),
    ("ties", {"weight": WEIGHTS, "density": DENSITIES}, {"normalize": False, "lambda": 1.3, "int8_mask": True}),
    ("ties", {"weight": WEIGHTS, "density": DENSITIES}, {"rescale": True}),
    ("breadcrumbs", {"weight": WEIGHTS, "density": DENSITIES, "gamma": [0, 0.05, 0.01, 0.3]}, {}),
    ("breadcrumbs_ties", {"weight": WEIGHTS, "density": DENSITIES, "gamma": [0, 0.05, 0.01, 0.3]}, {}),
    ("breadcrumbs_ties", {"weight": WEIGHTS, "density": DENSITIES}, {"normalize": True}),
]


@pytest.mark.parametrize("quantized", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize(("name", "per_model", "params"), PARITY_CASES)
def test_task_arithmetic_family_matches_mergekit(
    name: str, per_model: dict[str, list[Any]], params: dict[str, Any], quantized: bool, monkeypatch
) -> None:
    tensors = family(3, quantized=quantized)
    if quantized and name == "ties":
        # dam's TIES keeps the lowest-index entries among magnitudes tied at the threshold (a stable sort's
        # order); mergekit's unstable argsort keeps others. With a stable argsort, mergekit must agree exactly.
        monkeypatch.setattr(torch, "argsort", functools.partial(torch.argsort, stable=True))
    if quantized and name.startswith("breadcrumbs"):
        # the same for breadcrumbs' two bounds: dam takes tied magnitudes in a stable ascending sort's order
        monkeypatch.setattr(torch, "sort", functools.partial(torch.sort, stable=True))
    close(ours(name, tensors, 0, per_model, params), mergekit_merge(name, tensors, 0, per_model, params))


@pytest.mark.parametrize("name", RANDOM_METHODS)
def test_random_methods_replay_mergekit_draws(name: str) -> None:
    """With the global RNG seeded alike, the Bernoulli draws (and so the outputs) are mergekit's own."""
    tensors = family(3, shape=(16, 64))
    per_model = {"weight": WEIGHTS, "density": [1.0, 0.5, 0.3, 0.7]}
    if name.startswith("della"):
        per_model["epsilon"] = [0.0, 0.1, 0.2, 0.05]
    expected = (torch.manual_seed(7), mergekit_merge(name, tensors, 0, per_model, {}))[1]
    torch.manual_seed(7)
    close(ours(name, tensors, 0, per_model, {}), expected)


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_mergekit(normalize: bool) -> None:
    tensors = family(3)
    per_model = {"weight": [0.2, 0.5, 1.5, -0.4]}
    close(
        ours("linear", tensors, None, per_model, {"normalize": normalize}),
        mergekit_merge("linear", tensors, None, per_model, {"normalize": normalize}),
    )


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0, 1.2])
@pytest.mark.parametrize("case", ["random", "near_parallel", "zero_base"])
def test_slerp_matches_mergekit(t: float, case: str) -> None:
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    if case == "near_parallel":
        b = 2 * a + 1e-3 * b
    if case == "zero_base":
        a = torch.zeros_like(a)
    for base_index, tensors in ((0, [a, b]), (1, [b, a])):
        close(
            ours("slerp", tensors, base_index, {}, {"t": t}),
            mergekit_merge("slerp", tensors, base_index, {}, {"t": t}),
        )


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("row_wise", [True, False])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_matches_mergekit(flatten: bool, row_wise: bool, with_base: bool) -> None:
    tensors = family(2, shape=(12, 20), seed=5)
    tensors[2][3] = tensors[1][3]  # one collinear row
    tensors[1][5] = (tensors[0][5] if with_base else 0) + 1e-9 * tensors[1][5]  # one vector below nuslerp's 1e-7 clamp
    params = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    per_model = {"weight": [0.0, 0.3, 0.9]}
    if not with_base:
        tensors, per_model = tensors[1:], {"weight": [0.3, 0.9]}
    base_index = 0 if with_base else None
    close(
        ours("nuslerp", tensors, base_index, per_model, params),
        mergekit_merge("nuslerp", tensors, base_index, per_model, params),
    )


@pytest.mark.parametrize("filter_wise", [True, False])
@pytest.mark.parametrize("shape", [(24, 40), (40,)])
def test_model_stock_matches_mergekit(filter_wise: bool, shape: tuple[int, ...]) -> None:
    tensors = family(3, shape=shape, seed=6)
    params = {"filter_wise": filter_wise}
    close(ours("model_stock", tensors, 0, {}, params), mergekit_merge("model_stock", tensors, 0, {}, params))


@pytest.mark.parametrize("scale", [None, 0.25])
def test_passthrough_matches_mergekit(scale: float | None) -> None:
    x = torch.randn(8, 8)
    per_model = {"scale": [scale]}
    close(ours("passthrough", [x], None, per_model, {}), mergekit_merge("passthrough", [x], None, per_model, {}))


@pytest.mark.parametrize("quantized", [False, True])
def test_sparsify_helpers_match_mergekit(quantized: bool) -> None:
    mk = pytest.importorskip("mergekit.sparsify")
    gta = pytest.importorskip("mergekit.merge_methods.generalized_task_arithmetic")
    x = family(1, shape=(32, 50), seed=8, quantized=quantized)[1]
    for rescale in (None, mk.RescaleNorm.l1):
        on = rescale is not None
        for density in (0.01, 0.3, 0.77, 1.0):
            close(sparsify(x, "magnitude", density, rescale=on), mk.magnitude(x, density, rescale))
            for gamma in (0.0, 0.01, 0.2):
                expected = mk.magnitude_outliers(x, density, rescale, gamma=gamma)
                close(sparsify(x, "breadcrumbs", density, gamma=gamma, rescale=on), expected)
            torch.manual_seed(9)
            expected = mk.bernoulli(x, density, rescale)
            torch.manual_seed(9)
            close(sparsify(x, "random", density, rescale=on), expected)
        for density, epsilon in ((0.5, 0.1), (0.3, 0.25), (0.9, 0.05)):
            torch.manual_seed(10)
            expected = mk.della_magprune(x, density, epsilon, rescale)
            torch.manual_seed(10)
            close(sparsify(x, "della", density, epsilon=epsilon, rescale=on), expected)
    stacked = torch.stack(family(3, seed=11, quantized=True)[1:]) - family(3, seed=11, quantized=True)[0]
    assert torch.equal(sign_consensus(stacked), gta.get_mask(stacked, method="sum"))


# ---------------------------------------------------------------------------------------------------------------
# mergekit 0.1.5's newer methods: multislerp, karcher, sce, nearswap, arcee_fusion, ram, ramplus_tl


def test_multislerp_equal_weights_is_the_spherical_midpoint_with_the_mean_norm() -> None:
    out = merge("multislerp", [vec(2.0, 0.0), vec(0.0, 4.0)], model_params=[{"weight": 1.0}, {"weight": 1.0}])
    close(out, vec(3.0, 3.0) / math.sqrt(2), atol=1e-5)  # eps = 1e-8 in the unit vectors moves the result ~1e-8


def test_multislerp_with_base_interpolates_task_vectors_and_one_model_is_returned_as_is() -> None:
    base = vec(1.0, 1.0)
    params = [{}, {"weight": 0.5}, {"weight": 0.5}]
    out = merge("multislerp", [base, vec(2.0, 1.0), vec(1.0, 2.0)], base, 0, params)
    close(out, base + vec(1.0, 1.0) / math.sqrt(2), atol=1e-5)
    close(merge("multislerp", [base, vec(5.0, 7.0)], base, 0, [{}, {"weight": 0.3}]), vec(5.0, 7.0))


def test_multislerp_antipodal_inputs_fall_back_to_lerp_for_two_and_fail_for_three() -> None:
    a = vec(1.0, 2.0)
    close(merge("multislerp", [a, -a], model_params=[{"weight": 0.5}] * 2), vec(0.0, 0.0))
    with pytest.raises(DamError, match="weighted sum of the unit inputs is zero"):
        merge("multislerp", [a, -a, a, -a], model_params=[{"weight": 0.25}] * 4)
    # every source equal to the base (a tensor no fine-tune touched): zero task vectors, the base comes back
    # (mergekit 0.1.5 raises its antipodal error here)
    close(merge("multislerp", [a, a, a, a], a, 0, [{}] + [{"weight": 1 / 3}] * 3), a)
    with pytest.raises(DamError, match="models\\[1\\]: missing required parameter 'weight'"):
        merge("multislerp", [a, a], model_params=[{"weight": 1.0}, {}])


def test_karcher_mean_of_orthogonal_and_parallel_directions() -> None:
    out = merge("karcher", [vec(1.0, 0.0), vec(0.0, 3.0)])
    close(out, vec(2.0, 2.0) / math.sqrt(2), atol=1e-5)  # tol 1e-5 stops the iteration within ~1e-6 of the mean
    close(merge("karcher", [vec(1.0, 2.0), vec(3.0, 6.0)]), vec(2.0, 4.0), atol=1e-5)
    close(merge("karcher", [vec(0.0, 0.0), vec(0.0, 0.0)]), vec(0.0, 0.0))
    with pytest.raises(DamError, match="max_iter must be a non-negative integer"):
        merge("karcher", [vec(1.0), vec(2.0)], max_iter=2.5)


def test_sce_energy_weights_and_sign_erasure_by_hand() -> None:
    base = vec(0.0, 0.0, 0.0)
    # task vectors (1, -1, 2) and (3, 2, 0): energies 2 and 13/3, normalised to 6/19 and 13/19;
    # elected signs (+, +, +): entry 1 drops the first model, entry 2 the second (a zero never agrees).
    out = merge("sce", [base, vec(1.0, -1.0, 2.0), vec(3.0, 2.0, 0.0)], base, 0)
    e0, e1 = 6 / 19, 13 / 19
    close(out, vec((e0 * 1 + e1 * 3) / (e0 + e1), 2.0, 2.0))


def test_sce_select_topk_keeps_the_entries_that_vary_most_across_models() -> None:
    base = vec(0.0, 0.0, 0.0, 0.0)
    a, b = vec(1.0, 5.0, 2.0, 0.0), vec(1.0, -5.0, 3.0, 0.0)  # variances 0, 25, 0.25, 0
    out = merge("sce", [base, a, b], base, 0, select_topk=0.5)  # k = int(2 nonzero * 0.5) = 1: entry 1 only
    assert out[0] == 0 and out[2] == 0 and out[3] == 0 and out[1] != 0


def test_population_variance_is_torch_var_bit_for_bit(monkeypatch) -> None:
    from dam.merge.methods import sce

    g = torch.Generator().manual_seed(3)
    monkeypatch.setattr(sce, "VARIANCE_CHUNK", 1000)  # several chunks, the last one partial
    for n, shape in ((2, (37, 90)), (3, (4096,)), (5, (7, 11, 13))):
        x = torch.randn(n, *shape, generator=g) * torch.rand(n, 1, generator=g).view(n, *[1] * len(shape))
        for t in (x, x.bfloat16().float(), 1e-3 * x):
            assert torch.equal(sce.population_variance(t), torch.var(t, dim=0, unbiased=False))


def test_sce_mask_keeps_what_topk_keeps() -> None:
    from dam.merge.methods.sce import sce_mask

    g = torch.Generator().manual_seed(4)
    distinct = torch.randn(3, 300, 257, generator=g)  # above RADIX_MIN entries: the radix path, no tied variances
    var = torch.var(distinct, dim=0, unbiased=False)
    for topk in (0.01, 0.3, 0.5, 0.99):
        k = int(torch.count_nonzero(var) * topk)
        expected = torch.zeros(var.numel(), dtype=torch.bool)
        expected[torch.topk(var.view(-1), k).indices] = True  # mergekit's selection
        assert torch.equal(sce_mask(distinct, topk), expected.view(var.shape))
    # tied variances at the threshold: the lowest-index ones are kept, k of them in all
    tied = torch.tensor([[0.0, 1.0, 1.0, 1.0, 2.0, 0.0], [0.0, -1.0, -1.0, -1.0, -2.0, 0.0]])  # variances 0 1 1 1 4 0
    assert sce_mask(tied, 0.5).tolist() == [False, True, False, False, True, False]  # k = int(4 * 0.5) = 2


def test_nearswap_takes_near_values_and_moves_far_ones_by_t() -> None:
    base, other = vec(0.0, 0.0, 0.0), vec(0.05, 1.0, -0.2)
    out = merge("nearswap", [base, other], base, 0, t=0.1)
    close(out, vec(0.05, 0.1, -0.1))
    with pytest.raises(DamError, match="missing required parameter 't'"):
        merge("nearswap", [base, other], base, 0)
    with pytest.raises(DamError, match="exactly 2 model"):
        merge("nearswap", [base, other, other], base, 0, t=0.1)


def test_arcee_fusion_keeps_only_outlier_importance_changes() -> None:
    from dam.merge.methods.arcee_fusion import importance

    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 16, generator=g)
    other = base + 1e-3 * torch.randn(8, 16, generator=g)
    other[3, 5] += 4.0  # one large change: its row's KL and its |delta| make it an outlier
    out = merge("arcee_fusion", [base, other], base, 0)
    scores = importance(other, base)
    q1, median, q3 = torch.quantile(scores.flatten(), torch.tensor([0.25, 0.5, 0.75]), interpolation="lower")
    kept = scores >= median + 1.5 * (q3 - q1)
    close(out, torch.where(kept, other, base))
    assert kept[3, 5] and kept.sum() < 0.25 * kept.numel()


def test_arcee_fusion_samples_quartiles_of_large_tensors_from_the_generator() -> None:
    from dam.merge.methods.arcee_fusion import QUANTILE_SAMPLE_SIZE, approximate_quantiles

    x = torch.rand(QUANTILE_SAMPLE_SIZE + 200_000, generator=torch.Generator().manual_seed(0))
    q = torch.tensor([0.25, 0.5, 0.75])
    first = approximate_quantiles(x, q, torch.Generator().manual_seed(1))
    again = approximate_quantiles(x, q, torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    # 1M samples of a uniform variable: each quartile's standard error is ~sqrt(q(1-q)/1e6) < 5e-4, so 0.003 is 6 sigma
    close(first, q, atol=3e-3)


def test_ram_averages_overlapping_changes_and_keeps_unique_ones() -> None:
    base = vec(0.0, 0.0, 0.0)
    a, b = vec(1.0, 1e-6, 2.0), vec(3.0, 0.0, 0.0)  # entry 0: both change it; entry 1: below epsilon; entry 2: a only
    close(merge("ram", [base, a, b], base, 0), vec(2.0, 0.0, 2.0))
    # RAM+: a shares 1 entry and owns 1, so rho = 1, clamped to alpha = 0.2: lambda = 1 + 0.1 * 0.2 on its own entry
    close(merge("ramplus_tl", [base, a, b], base, 0), vec(2.0, 0.0, 2.0 * 1.02))
    close(merge("ramplus_tl", [base, a, b], base, 0, r=0.0), merge("ram", [base, a, b], base, 0))
