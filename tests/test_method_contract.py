"""The method contract: declared capabilities, checked at entry; results that replace modules;
whole-model methods (ARMOR) behind the same registry; module builders for checkpoints."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from conftest import VOCAB, build_tiny
from torch import nn

import sparsewise as sw
from sparsewise.calibration.stats import STAT_NORMS
from sparsewise.config import PruneConfig
from sparsewise.errors import CheckpointError, ConfigError
from sparsewise.methods import (
    Capabilities,
    LayerResult,
    Method,
    available_methods,
    check_pattern,
    get_method,
    method_capabilities,
    register,
)
from sparsewise.methods.base import _METHODS
from sparsewise.modules import module_builder, module_types, register_module
from sparsewise.patterns import Pattern


def _calibration(n: int = 2, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(0))


def test_every_registered_method_declares_capabilities():
    for name in available_methods():
        caps = method_capabilities(name)
        assert isinstance(caps, Capabilities), name
        assert caps.patterns and caps.scopes
    assert method_capabilities("armor").whole_model and method_capabilities("armor").replaces_modules
    assert method_capabilities("sparsegpt").updates_weights and not method_capabilities("wanda").updates_weights
    assert "global" in method_capabilities("magnitude").scopes and "global" not in method_capabilities("wanda").scopes
    assert method_capabilities("wanda").needs == frozenset({STAT_NORMS}) == get_method("wanda").needs


def test_requests_are_checked_against_capabilities_before_any_work():
    with pytest.raises(ConfigError, match="takes patterns 2:4, not 4:8"):
        check_pattern(get_method("armor"), Pattern.parse("4:8"))
    with pytest.raises(ConfigError, match="scope 'global'.*magnitude, random"):
        check_pattern(get_method("sparsegpt"), Pattern.parse("unstructured:global"))
    check_pattern(get_method("random"), Pattern.parse("unstructured:global"))  # declared: no error
    with pytest.raises(ConfigError, match="takes patterns 2:4"):  # the recipe/CLI config checks the same way
        PruneConfig(method="armor", pattern="unstructured").validate()
    model = build_tiny("llama")
    before = {name: p.clone() for name, p in model.named_parameters()}
    with pytest.raises(ConfigError, match="scope 'global'"):
        sw.prune(model, method="wanda", pattern="unstructured:global", calibration=_calibration(), progress=False)
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())


def test_a_plugin_written_against_the_first_protocol_still_registers():
    class OldStyle:
        name = "test-old-style"
        needs = frozenset({STAT_NORMS})

        def prune_layer(self, task):
            return get_method("wanda").prune_layer(task)

    register(OldStyle)
    try:
        assert method_capabilities("test-old-style") == Capabilities(needs=frozenset({STAT_NORMS}))
        result = sw.prune(build_tiny("llama"), method="test-old-style", sparsity=0.5, calibration=_calibration(),
                          progress=False)
        assert abs(result.achieved_sparsity - 0.5) < 1e-6
    finally:
        _METHODS.unregister("test-old-style")


class ScaledLinear(nn.Module):
    """A toy replacement module: a pruned linear (the core) followed by a learned per-output scale."""

    def __init__(self, inner: nn.Linear):
        super().__init__()
        self.inner = inner
        self.scale = nn.Parameter(torch.full((inner.out_features,), 0.5))

    def forward(self, x):
        return self.inner(x) * self.scale


class _Replacing(Method):
    name: ClassVar[str] = "test-replacing"
    capabilities: ClassVar[Capabilities] = Capabilities(needs=frozenset({STAT_NORMS}), replaces_modules=True)
    fail_at: str | None = None

    def prune_layer(self, task):
        if task.name == self.fail_at:
            raise RuntimeError("planned failure")
        pruned = get_method("wanda").prune_layer(task)
        inner = nn.Linear(task.weight.shape[1], task.weight.shape[0], bias=False)
        with torch.no_grad():
            inner.weight.copy_(pruned.weight * 2.0)  # x2 then x0.5: the layer computes what Wanda's does
        return LayerResult(weight=pruned.weight, mask=pruned.mask, info={"kind": "scaled"},
                           module=ScaledLinear(inner), core="inner")


@pytest.fixture
def replacing():
    register(_Replacing)
    _Replacing.fail_at = None
    yield _Replacing
    _METHODS.unregister(_Replacing.name)


def test_a_result_can_put_a_module_in_the_layers_place(replacing):
    calib = _calibration()
    reference, model = build_tiny("llama"), build_tiny("llama")
    sw.prune(reference, method="wanda", sparsity=0.5, calibration=calib, progress=False)
    result = sw.prune(model, method=replacing.name, sparsity=0.5, calibration=calib, progress=False)
    swapped = [name for name, module in model.named_modules() if isinstance(module, ScaledLinear)]
    assert len(swapped) == 14 and sorted(result.records) == sorted(f"{name}.inner" for name in swapped)
    assert all(record.achieved == 0.5 and record.method == replacing.name for record in result.records.values())
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # same masks as Wanda's, the same function: later layers saw the new modules' outputs
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_failed_replacing_run_puts_every_original_module_back(replacing):
    model = build_tiny("llama")
    modules_before = dict(model.named_modules())
    weights_before = {name: p.clone() for name, p in model.named_parameters()}
    replacing.fail_at = "model.layers.1.self_attn.k_proj"  # after block 0 was replaced
    with pytest.raises(RuntimeError, match="planned failure"):
        sw.prune(model, method=replacing.name, sparsity=0.5, calibration=_calibration(), progress=False)
    assert dict(model.named_modules()).keys() == modules_before.keys()
    assert all(modules_before[name] is module for name, module in model.named_modules())
    assert all(torch.equal(weights_before[name], p) for name, p in model.named_parameters())


def test_armor_is_an_ordinary_registered_method():
    assert "armor" in available_methods()
    with pytest.raises(ConfigError, match="use prune_model"):
        get_method("armor").prune_layer(None)
    with pytest.raises(ConfigError, match="unknown ARMOR option"):
        get_method("armor", damp_ratio=0.1)
    with pytest.raises(ConfigError, match="walks the whole model itself"):
        sw.prune(build_tiny("llama"), method="armor", pattern="2:4", calibration=_calibration(), allocation="owl")
    with pytest.raises(ConfigError, match="needs calibration data"):
        sw.prune(build_tiny("llama"), method="armor", pattern="2:4", progress=False)


def test_checkpoint_module_builders_come_from_a_registry():
    assert "armor" in module_types() and module_builder("armor") is not None and module_builder("nope") is None
    with pytest.raises(RuntimeError, match="registered twice"):
        register_module("armor")(ScaledLinear)
    model = build_tiny("llama")
    from sparsewise.formats.checkpoint import _rebuild_modules

    with pytest.raises(CheckpointError, match="unknown type 'future-layer'.*knows armor"):
        _rebuild_modules(model, {"model.layers.0.mlp.up_proj": {"type": "future-layer"}})
