"""The engine's walk over blocks (BlockWalk): inputs passed on, blocks onloaded and offloaded, and
the model left as it was (devices, hooks) when anything inside the walk fails, for every walker:
activation calibration, the allocation search and pruning."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, build_tiny

import sparsewise as sw
from sparsewise.calibration import BlockWalk, capture_block_inputs, run_block
from sparsewise.data import CalibrationSet
from sparsewise.models import ModelAdapter

# A CPU device that compares unequal to the blocks' home (torch.device("cpu")), so the device
# every block is moved to can be told apart without a GPU.
COMPUTE = torch.device("cpu", 0)


def _calibration(n: int = 4, seqlen: int = 16) -> CalibrationSet:
    return CalibrationSet(input_ids=torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(0)))


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())


def _record_moves(monkeypatch, blocks) -> dict[int, list[torch.device]]:
    """{block index: devices it was moved to, in order}, recorded by wrapping each block's ``to``."""
    moves: dict[int, list[torch.device]] = {index: [] for index in range(len(blocks))}
    for index, (_name, block) in enumerate(blocks):
        def to(device, *args, _block=block, _index=index, **kwargs):
            moves[_index].append(torch.device(device))
            return type(_block).to(_block, device, *args, **kwargs)

        monkeypatch.setattr(block, "to", to, raising=False)
    return moves


def _fail_in_block(block: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """A pre-hook (registered before any walk: it must survive) that fails the block's MLP forward."""
    def boom(_module, _args):
        raise RuntimeError("boom inside the walk")

    return block.mlp.down_proj.register_forward_pre_hook(boom)


def test_walk_passes_each_blocks_outputs_to_the_next():
    model = build_tiny("llama")
    adapter = ModelAdapter(model)
    batches = list(_calibration().batches(2))
    calls = capture_block_inputs(model, adapter.blocks[0][1], batches, COMPUTE)
    expected = calls
    for _name, block in adapter.blocks:
        expected = [call.with_hidden_states(out) for call, out in zip(expected, run_block(block, expected), strict=True)]
    seen = []
    with BlockWalk(model, adapter.blocks, calls, COMPUTE) as walk:
        for step in walk:
            seen.append(step.index)
            step.outputs = run_block(step.block, step.calls)
    assert seen == list(range(len(adapter.blocks)))
    for got, want in zip(walk.calls, expected, strict=True):
        assert torch.equal(got.hidden_states, want.hidden_states)


def test_walk_restores_devices_and_hooks_on_failure(monkeypatch):
    model = build_tiny("llama")
    adapter = ModelAdapter(model)
    calls = capture_block_inputs(model, adapter.blocks[0][1], list(_calibration().batches(2)), COMPUTE)
    moves = _record_moves(monkeypatch, adapter.blocks)
    hooks_before = _hook_count(model)
    with pytest.raises(RuntimeError, match="boom"), BlockWalk(model, adapter.blocks, calls, COMPUTE) as walk:
        for step in walk:
            step.block.register_forward_hook(lambda *_: None)  # left behind on purpose: the walk removes it
            step.block.mlp.register_forward_pre_hook(lambda *_: None, with_kwargs=True)
            if step.index == 1:
                raise RuntimeError("boom")
            step.outputs = run_block(step.block, step.calls)
    assert moves == {0: [COMPUTE, torch.device("cpu")], 1: [COMPUTE, torch.device("cpu")]}
    assert _hook_count(model) == hooks_before
    assert not any(module._forward_pre_hooks_with_kwargs for module in model.modules())


def test_walk_offloads_on_break_and_refuses_misuse(monkeypatch):
    model = build_tiny("llama")
    adapter = ModelAdapter(model)
    calls = capture_block_inputs(model, adapter.blocks[0][1], list(_calibration().batches(4)), COMPUTE)
    moves = _record_moves(monkeypatch, adapter.blocks)
    with BlockWalk(model, adapter.blocks, calls, COMPUTE) as walk:
        for _step in walk:
            break
    assert moves[0] == [COMPUTE, torch.device("cpu")] and moves[1] == []
    with pytest.raises(RuntimeError, match="inside `with"):
        iter(BlockWalk(model, adapter.blocks, calls, COMPUTE))
    with pytest.raises(ValueError, match="step.outputs"), BlockWalk(model, adapter.blocks, calls, COMPUTE) as walk:
        for _step in walk:
            pass  # no outputs set: nothing to pass on
    assert moves[0][-1] == torch.device("cpu")


def _activation_walk(model):
    sw.sparsify_activations(model, "teal", 0.5, _calibration(), batch_size=2, device=COMPUTE)


def _search_walk(model):
    sw.prune(model, method="wanda", sparsity=0.5, calibration=_calibration(), allocation="tyr",
             allocation_options={"generations": 2}, device=COMPUTE, progress=False)


def _prune_walk(model):
    sw.prune(model, method="wanda", sparsity=0.5, calibration=_calibration(), sequential="block", batch_size=2,
             device=COMPUTE, progress=False)


@pytest.mark.parametrize("walker", [_activation_walk, _search_walk, _prune_walk], ids=["activation", "search", "prune"])
def test_failure_inside_any_walk_leaves_the_model_as_it_was(monkeypatch, walker):
    """Activation calibration (which had no restore-on-failure before the walk was shared), the
    Tyr search and pruning: the failing block goes back home, no hook of the walk stays."""
    model = build_tiny("llama")
    adapter = ModelAdapter(model)
    failing = _fail_in_block(adapter.blocks[1][1])
    hooks_before = _hook_count(model)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    moves = _record_moves(monkeypatch, adapter.blocks)
    with pytest.raises(RuntimeError, match="boom inside the walk"):
        walker(model)
    assert moves[1] and moves[1][0] == COMPUTE and moves[1][-1] == torch.device("cpu")
    assert moves[0][-1] == torch.device("cpu")
    assert _hook_count(model) == hooks_before  # the failing hook predates the walk and stays; nothing else
    assert all(torch.equal(tensor, state[name]) for name, tensor in model.state_dict().items())
    assert getattr(model, "_sparsewise_activation", None) is None
    failing.remove()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_activation_calibration_failure_on_gpu_leaves_parameters_on_cpu():
    model = build_tiny("llama")
    adapter = ModelAdapter(model)
    _fail_in_block(adapter.blocks[1][1])
    hooks_before = _hook_count(model)
    with pytest.raises(RuntimeError, match="boom inside the walk"):
        sw.sparsify_activations(model, "teal", 0.5, _calibration(), batch_size=2, device="cuda")
    assert all(param.device.type == "cpu" for param in model.parameters())
    assert _hook_count(model) == hooks_before
