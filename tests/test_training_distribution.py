"""Training's layer ratios come from the allocation registry and equal the ER/ERK/ERK+ formulas bit for bit.

The reference below evaluates the formulas directly (raw ratios, ERK+'s fixed layers, the dense-cap
re-solve) in the arithmetic order training used before it moved onto the allocation registry;
every ratio must be equal (==, not approx) on the shapes of the models the tests train.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparsewise import training
from sparsewise.allocation import LayerShape, allocate, get_allocator
from sparsewise.errors import ConfigError
from sparsewise.training.distribution import layer_sparsities

SPARSITIES = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def reference(shapes: dict[str, tuple[int, ...]], sparsity: float, distribution: str) -> dict[str, float]:
    """Direct evaluation: ER (n_out + n_in) / (n_out n_in) over the first two dims, ERK sum / prod
    of all dims; d_l = eps raw_l with eps meeting the budget, layers above 1 capped and eps re-solved;
    ERK+: first layer dense, last at max(density, 0.2), the rest share what is left."""
    if distribution == "uniform":
        return dict.fromkeys(shapes, sparsity)
    params = {name: math.prod(shape) for name, shape in shapes.items()}
    density = 1.0 - sparsity
    fixed = {}
    if distribution == "erk+":
        names = list(shapes)
        if len(names) < 3:
            raise ConfigError("needs at least three layers")
        fixed = {names[0]: 1.0, names[-1]: max(density, 0.2)}
    if distribution == "er":
        raw = {name: (shape[0] + shape[1]) / (shape[0] * shape[1]) for name, shape in shapes.items()
               if name not in fixed}
    else:
        raw = {name: sum(shape) / math.prod(shape) for name, shape in shapes.items() if name not in fixed}
    left = density * sum(params.values()) - sum(fixed[name] * params[name] for name in fixed)
    free_params = sum(params[name] for name in raw)
    if left <= 0 or left > free_params:
        raise ConfigError("cannot reach the budget with the fixed layers")
    budget = left / free_params * free_params
    capped: dict[str, float] = {}
    free = list(raw)
    eps = 0.0
    while free:
        eps = (budget - sum(capped[name] * params[name] for name in capped)) / sum(raw[name] * params[name]
                                                                                 for name in free)
        over = [name for name in free if eps * raw[name] > 1.0]
        if not over:
            break
        capped.update(dict.fromkeys(over, 1.0))
        free = [name for name in raw if name not in capped]
    densities = {**fixed, **capped, **{name: eps * raw[name] for name in free}}
    return {name: 1.0 - densities[name] for name in shapes}


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 10))


def conv_net() -> nn.Module:  # kernels of different sizes, conv last
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 1))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def mlp_wide() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 10))


SHAPE_SETS = {
    "cnn": {"conv1": (16, 3, 3, 3), "conv2": (32, 16, 3, 3), "conv3": (64, 32, 3, 3), "fc": (10, 64)},
    "capped": {"tiny": (2, 2), "big": (256, 256)},
    "mixed": {"stem": (64, 3, 7, 7), "b": (64, 64, 3, 3), "c": (128, 64, 3, 1), "d": (256, 128), "fc": (1000, 256)},
}


def outcome(fn):
    try:
        return fn()
    except ConfigError:
        return "ConfigError"


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk", "erk+"])
@pytest.mark.parametrize("shapes", list(SHAPE_SETS), ids=str)
def test_layer_sparsities_equal_the_formula_bit_for_bit(shapes, distribution):
    shapes = SHAPE_SETS[shapes]
    for sparsity in SPARSITIES:
        got = outcome(lambda s=sparsity: layer_sparsities(shapes, s, distribution))
        assert got == outcome(lambda s=sparsity: reference(shapes, s, distribution)), sparsity
        if got != "ConfigError":
            assert list(got) == list(shapes)


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk", "erk+"])
@pytest.mark.parametrize("build", [small_cnn, conv_net, mlp, mlp_wide], ids=lambda build: build.__name__)
def test_attach_gives_every_layer_the_formula_ratio(build, distribution):
    torch.manual_seed(0)
    model = build()
    shapes = {name: tuple(module.weight.shape) for name, module in model.named_modules()
              if isinstance(module, nn.Conv2d | nn.Linear)}
    assert any(len(shape) == 4 for shape in shapes.values()) == (build in (small_cnn, conv_net))
    for sparsity in (0.5, 0.8, 0.9, 0.95):
        expected = outcome(lambda s=sparsity: reference(shapes, s, distribution))
        got = outcome(lambda s=sparsity, m=model: training.attach(m, None, "magnitude", s, distribution=distribution,
                                                                  total_steps=4))
        if expected == "ConfigError":
            assert got == "ConfigError", sparsity
            continue
        assert {name: item.sparsity for name, item in got.layers.items()} == expected, sparsity
        got.finalize()
        model = build()  # finalize pruned the weights: fresh ones for the next sparsity


def test_llm_conv1d_layers_get_the_formula_ratio():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64,
                                                                 n_positions=32))
    for distribution in ("er", "erk", "erk+"):
        run = training.attach(model, None, "magnitude", 0.7, distribution=distribution, total_steps=4)
        # Conv1D stores [in, out]: the trained layer's shape is (out_features, in_features)
        shapes = {name: (item.layer.out_features, item.layer.in_features) for name, item in run.layers.items()}
        assert {name: item.sparsity for name, item in run.layers.items()} == reference(shapes, 0.7, distribution)
        run.detach()


def test_training_and_pruning_share_the_registry_allocators():
    shapes = SHAPE_SETS["cnn"]
    # training's distributions are the registry's allocators on the stored shapes
    for distribution, (name, options) in {"er": ("er", {}), "erk": ("erk", {}),
                                          "erk+": ("erk", {"plus": True})}.items():
        densities = get_allocator(name, **options).densities(shapes, 1.0 - 0.9)
        assert layer_sparsities(shapes, 0.9, distribution) == {n: 1.0 - d for n, d in densities.items()}
    # ER reads the first two dims only, ERK every dim: they differ on convs, coincide on Linear weights
    assert layer_sparsities(shapes, 0.9, "er") != layer_sparsities(shapes, 0.9, "erk")
    linear = {"a": (64, 16), "b": (128, 64), "c": (10, 128)}
    assert layer_sparsities(linear, 0.9, "er") == layer_sparsities(linear, 0.9, "erk")
    # pruning's allocate() sees Linear shapes: its preferences are training's ratios for those shapes
    layer_shapes = {name: LayerShape(*shape) for name, shape in linear.items()}
    from sparsewise.allocation import AllocationContext

    context = AllocationContext(shapes=layer_shapes, target=0.8)
    for name in ("er", "erk"):
        assert get_allocator(name).preferences(context) == layer_sparsities(linear, 0.8, name)
    assert get_allocator("erk", plus=True).preferences(context) == layer_sparsities(linear, 0.8, "erk+")


def test_erk_plus_as_an_allocation_option():
    shapes = {f"l{i}": LayerShape(64 * (i + 1), 64) for i in range(4)}
    plan = allocate("erk", target=0.7, shapes=shapes, plus=True)
    assert plan.sparsities["l0"] == 0.0
    assert plan.sparsities["l3"] == pytest.approx(0.7, abs=1 / 64)  # max(0.3, 0.2) density, to one zero per row
    assert plan.achieved == pytest.approx(0.7, abs=1 / 64)
    with pytest.raises(ConfigError, match="erk\\+ fixes the first and last layers"):
        allocate("erk", target=0.7, shapes={"a": LayerShape(8, 8), "b": LayerShape(8, 8)}, plus=True)
    with pytest.raises(ValueError, match="plus"):
        get_allocator("erk", plus="yes")
