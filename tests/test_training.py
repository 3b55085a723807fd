"""Sparse training core: attach/step/finalize, layer ratios, static, GMP, SET, RigL, ISS-P."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import sparsewise as sw
from sparsewise import training
from sparsewise.errors import ConfigError, NumericalError, PatternError
from sparsewise.patterns import Pattern
from sparsewise.records import get_records
from sparsewise.training.distribution import layer_sparsities
from sparsewise.training.masks import cosine_fraction, cubic_sparsity, drop_and_grow, random_mask, soft_shrink


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 10))


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def train(model, sparsity, steps: int, seed: int = 0, lr: float = 1e-2, optimizer=None):
    generator = torch.Generator().manual_seed(seed)
    optimizer = optimizer or sparsity.optimizer
    is_cnn = isinstance(model[0], nn.Conv2d)
    for _ in range(steps):
        x = torch.randn(16, 1, 10, 10, generator=generator) if is_cnn else torch.randn(16, 16, generator=generator)
        y = torch.randint(0, 10 if is_cnn else 4, (16,), generator=generator)
        loss = nn.functional.cross_entropy(model(x), y) + sparsity.loss_term()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sparsity.step()
    return loss


def weighted(sparsities: dict[str, float], shapes: dict[str, tuple]) -> float:
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    return sum(sparsities[name] * sizes[name] for name in sizes) / sum(sizes.values())


# ---------------------------------------------------------------- layer ratios
CNN_SHAPES = {"conv1": (16, 3, 3, 3), "conv2": (32, 16, 3, 3), "conv3": (64, 32, 3, 3), "fc": (10, 64)}


@pytest.mark.parametrize("kind", ["er", "erk", "erk+", "uniform"])
def test_distributions_meet_the_budget_and_cap_at_dense(kind):
    sparsities = layer_sparsities(CNN_SHAPES, 0.9, kind)
    assert weighted(sparsities, CNN_SHAPES) == pytest.approx(0.9, abs=1e-9)
    assert all(0.0 <= value < 1.0 for value in sparsities.values())


def test_erk_is_monotone_in_sum_over_prod_and_caps_small_layers():
    sparsities = layer_sparsities(CNN_SHAPES, 0.9, "erk")
    raw = {name: sum(shape) / math.prod(shape) for name, shape in CNN_SHAPES.items()}
    order = sorted(raw, key=raw.get)
    densities = [1 - sparsities[name] for name in order]
    assert densities == sorted(densities)
    # a tiny layer would exceed density 1: capped at dense and the rest re-solved
    capped = layer_sparsities({"tiny": (2, 2), "big": (256, 256)}, 0.5, "erk")
    assert capped["tiny"] == 0.0
    assert weighted(capped, {"tiny": (2, 2), "big": (256, 256)}) == pytest.approx(0.5)


def test_erk_plus_keeps_first_layer_dense_and_fixes_the_classifier():
    sparsities = layer_sparsities(CNN_SHAPES, 0.9, "erk+")
    assert sparsities["conv1"] == 0.0 and sparsities["fc"] == pytest.approx(0.8)


def test_nm_pattern_fixes_the_ratio_and_refuses_a_distribution():
    assert set(layer_sparsities(CNN_SHAPES, None, "uniform", Pattern.parse("2:4")).values()) == {0.5}
    with pytest.raises(ConfigError, match="fixes every layer"):
        layer_sparsities(CNN_SHAPES, None, "erk", Pattern.parse("2:4"))


# ---------------------------------------------------------------- pure math
def test_random_mask_exact_count_and_seeded():
    first = random_mask((20, 30), 0.7, torch.Generator().manual_seed(3))
    again = random_mask((20, 30), 0.7, torch.Generator().manual_seed(3))
    other = random_mask((20, 30), 0.7, torch.Generator().manual_seed(4))
    assert int((~first).sum()) == 420 and torch.equal(first, again) and not torch.equal(first, other)


def test_schedules():
    assert cubic_sparsity(0, 0.9, start=0, end=100) == 0.0
    assert cubic_sparsity(50, 0.9, start=0, end=100) == pytest.approx(0.9 * (1 - 0.5**3))
    assert cubic_sparsity(100, 0.9, start=0, end=100) == cubic_sparsity(500, 0.9, start=0, end=100) == 0.9
    assert cosine_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert cosine_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert cosine_fraction(100, 0.3, 100) == 0.0


def test_drop_and_grow_keeps_the_count_and_grows_the_largest_scores():
    torch.manual_seed(0)
    weight = torch.randn(8, 8)
    mask = random_mask((8, 8), 0.75, torch.Generator().manual_seed(0))
    scores = torch.rand(8, 8)
    new_mask, grown = drop_and_grow(weight, mask, 4, scores)
    assert int(new_mask.sum()) == int(mask.sum())
    dropped = mask & ~new_mask
    assert int(dropped.sum()) <= 4
    kept_magnitudes = weight.abs()[mask & new_mask]
    assert weight.abs()[dropped].max() <= kept_magnitudes.min()
    # every grown entry outranks every entry that stayed out
    assert scores[grown].min() >= scores[~new_mask].max()
    unchanged, none = drop_and_grow(weight, mask, 0, scores)
    assert torch.equal(unchanged, mask) and not none.any()


def test_soft_shrink_scales_exactly_the_lowest_fraction():
    torch.manual_seed(0)
    weight = torch.randn(10, 10)
    new, keep = soft_shrink(weight, 0.5, 0.9)
    low = weight.abs().reshape(-1).argsort()[:50]
    assert int((~keep).sum()) == 50 and not keep.reshape(-1)[low].any()
    assert torch.equal(new[~keep], weight[~keep] * 0.9) and torch.equal(new[keep], weight[keep])
    hard, _ = soft_shrink(weight, 0.5, 0.0)
    assert int((hard == 0).sum()) == 50


# ---------------------------------------------------------------- methods through attach
@pytest.mark.parametrize("method", ["random", "magnitude", "gmp", "set", "rigl", "issp"])
def test_every_method_ends_at_the_exact_budget(method):
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    options = {"frequency": 5} if method in ("gmp", "set", "rigl") else {}
    sparsity = training.attach(model, optimizer, method, 0.9, distribution="erk", total_steps=40, **options)
    targets = {name: item.sparsity for name, item in sparsity.layers.items()}
    train(model, sparsity, 40)
    records = sparsity.finalize()
    shapes = {name: tuple(item.layer.module.weight.shape) for name, item in sparsity.layers.items()}
    for name, record in records.items():
        numel = math.prod(shapes[name])
        assert int((record.mask == 0).sum()) == math.floor(targets[name] * numel + 1e-9), name
        weight = dict(model.named_modules())[name].weight
        assert int((weight == 0).sum()) >= int((~record.mask).sum())
    assert weighted({n: r.achieved for n, r in records.items()}, shapes) == pytest.approx(0.9, abs=1e-3)
    assert get_records(model) == records
    assert not any("sparsity_mask" in key for key in model.state_dict())


def test_static_masks_stay_zero_under_momentum_and_weight_decay():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    sparsity = training.attach(model, optimizer, "random", 0.8, total_steps=10, seed=1)
    masks = sparsity.masks()
    train(model, sparsity, 10)
    for name, item in sparsity.layers.items():
        assert torch.equal(item.mask_rows(), masks[name])
        assert (item.weight_rows()[~masks[name]] == 0).all()
        assert (item.weight_rows()[masks[name]] != 0).all()


def test_same_seed_same_masks():
    masks = []
    for seed in (0, 0, 1):
        model = mlp()
        sparsity = training.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), "set", 0.8,
                                   total_steps=20, frequency=5, seed=seed)
        train(model, sparsity, 20)
        masks.append(sparsity.masks())
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])
    assert any(not torch.equal(masks[0][n], masks[2][n]) for n in masks[0])


def test_gmp_only_shrinks_the_mask_and_follows_the_cubic_schedule():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sparsity = training.attach(model, optimizer, "gmp", 0.8, total_steps=40, frequency=5, start=0.0, end=0.5)
    previous = sparsity.masks()
    assert all(mask.all() for mask in previous.values())  # starts dense
    for step in range(1, 41):
        train(model, sparsity, 1, seed=step)
        current = sparsity.masks()
        for name in current:
            assert not (current[name] & ~previous[name]).any(), "a pruned weight came back"
        previous = current
        if step == 10:
            expected = cubic_sparsity(10, 0.8, start=0, end=20)
            assert sparsity.global_sparsity() == pytest.approx(expected, abs=0.01)
    assert sparsity.global_sparsity() == pytest.approx(0.8, abs=0.005)


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_prune_and_grow_keeps_nonzero_count_constant(method):
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sparsity = training.attach(model, optimizer, method, 0.8, total_steps=40, frequency=4)
    counts = {name: int(mask.sum()) for name, mask in sparsity.masks().items()}
    flipped = 0
    for _ in range(40):
        before = sparsity.masks()
        train(model, sparsity, 1)
        after = sparsity.masks()
        assert {name: int(mask.sum()) for name, mask in after.items()} == counts
        flipped += sum(int((before[n] ^ after[n]).sum()) for n in after)
    assert flipped > 0
    assert sparsity.method.updates and all(update["step"] % 4 == 0 for update in sparsity.method.updates)


def test_rigl_grows_where_the_dense_gradient_is_largest_and_starts_grown_weights_at_zero():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: weights move only by the method
    sparsity = training.attach(model, optimizer, "rigl", 0.8, total_steps=10, frequency=1, fraction=0.3)
    before = sparsity.masks()
    x, y = torch.randn(16, 16), torch.randint(0, 4, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {name: item.rows(item.parameter.grad).abs().clone() for name, item in sparsity.layers.items()}
    optimizer.step()
    sparsity.step()
    for name, item in sparsity.layers.items():
        after = item.mask_rows()
        grown = after & ~before[name]
        assert grown.any()
        assert (item.weight_rows()[grown] == 0).all()
        stayed_out = ~after & ~before[name]
        assert grads[name][grown].min() >= grads[name][stayed_out].max()


def test_rigl_fraction_zero_never_changes_the_mask():
    model = mlp()
    sparsity = training.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), "rigl", 0.8,
                               total_steps=20, frequency=2, fraction=0.0)
    masks = sparsity.masks()
    train(model, sparsity, 20)
    assert all(torch.equal(masks[n], sparsity.masks()[n]) for n in masks)


def test_issp_shrinks_then_hard_prunes():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    sparsity = training.attach(model, optimizer, "issp", 0.5, total_steps=10, shrink=0.9, hard_at=0.5)
    name, item = next(iter(sparsity.layers.items()))
    weight = item.weight_rows().clone()
    train(model, sparsity, 1)
    low = ~training.masks.magnitude_mask(weight, 0.5, Pattern(scope="layer"))
    assert torch.allclose(item.weight_rows()[low], weight[low] * 0.9)
    assert torch.equal(item.weight_rows()[~low], weight[~low])
    assert sparsity.global_sparsity() == 0.0  # soft phase: nothing is exactly zero yet
    train(model, sparsity, 9)
    assert sparsity.global_sparsity() == pytest.approx(0.5, abs=0.01)


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path):
    def fresh():
        model = mlp()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        return model, optimizer, training.attach(model, optimizer, "rigl", 0.8, total_steps=20, frequency=3, seed=5)

    model, optimizer, sparsity = fresh()
    generator = torch.Generator().manual_seed(9)
    batches = [(torch.randn(16, 16, generator=generator), torch.randint(0, 4, (16,), generator=generator))
               for _ in range(20)]

    def run(model, optimizer, sparsity, chunk):
        for x, y in chunk:
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            sparsity.step()

    run(model, optimizer, sparsity, batches)
    reference = copy.deepcopy(model.state_dict())

    model, optimizer, sparsity = fresh()
    run(model, optimizer, sparsity, batches[:10])
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "sparsity": sparsity.state_dict()}, tmp_path / "ckpt.pt")
    assert any(key.endswith("sparsity_mask") for key in model.state_dict())

    model, optimizer, sparsity = fresh()
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    sparsity.load_state_dict(state["sparsity"])
    run(model, optimizer, sparsity, batches[10:])
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_llm_attach_targets_block_linears_only_and_finalized_model_saves(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sparsity = training.attach(model, optimizer, "rigl", 0.7, total_steps=6, frequency=2)
    assert all(".h." in name for name in sparsity.layers) and len(sparsity.layers) == 8  # Conv1D x 4 x 2
    ids = torch.randint(0, 64, (2, 16))
    for _ in range(6):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sparsity.step()
    records = sparsity.finalize()
    assert all(record.achieved == pytest.approx(0.7, abs=1e-3) for record in records.values())
    sw.save(model, tmp_path / "out")
    loaded = sw.load(tmp_path / "out")
    assert set(get_records(loaded)) == set(records)


def test_bad_input_gets_clear_errors():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        training.attach(model, optimizer, "rigl", 1.2, total_steps=10)
    with pytest.raises(ConfigError, match="unknown sparse-training method"):
        training.attach(model, optimizer, "nope", 0.5, total_steps=10)
    with pytest.raises(ConfigError, match="total_steps"):
        training.attach(model, optimizer, "rigl", 0.5, total_steps=0)
    with pytest.raises(PatternError, match="divisible"):
        training.attach(model, optimizer, "magnitude", None, pattern="2:3", total_steps=10)
    with pytest.raises(ConfigError, match="N:M"):
        training.attach(model, optimizer, "rigl", None, pattern="2:4", total_steps=10)
    assert not any("sparsity_mask" in key for key in model.state_dict()), "a failed attach left buffers"
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="non-finite"):
        training.attach(model, optimizer, "rigl", 0.5, total_steps=10)


def test_attach_twice_is_refused_and_step_after_finalize_too():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sparsity = training.attach(model, optimizer, "magnitude", 0.5, total_steps=10)
    with pytest.raises(ConfigError, match="attached twice"):
        training.attach(model, optimizer, "magnitude", 0.5, total_steps=10)
    sparsity.finalize()
    with pytest.raises(ConfigError, match="after finalize"):
        sparsity.step()


@pytest.mark.parametrize("method", ["random", "rigl"])
def test_rescale_multiplies_kept_weights_by_inverse_sqrt_density(method):
    plain, scaled = mlp(), mlp()
    first = training.attach(plain, None, method, 0.75, total_steps=10, seed=2)
    second = training.attach(scaled, None, method, 0.75, total_steps=10, seed=2, rescale=True)
    for name in first.layers:
        assert torch.allclose(second.layers[name].weight_rows(), first.layers[name].weight_rows() * 2.0)
