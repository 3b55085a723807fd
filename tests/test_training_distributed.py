"""Sparse training under DistributedDataParallel: 2 gloo processes on CPU, each rank on its own data,
keep identical masks through RigL's prune-and-grow updates."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

WORLD_SIZE, STEPS, FREQUENCY = 2, 8, 2


def _model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 4))


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import sparsewise.training as training

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        model = DistributedDataParallel(_model())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        run = training.attach(model, optimizer, method="rigl", sparsity=0.8, total_steps=STEPS,
                              frequency=FREQUENCY, stop=1.0, log=Path(out_dir) / "log.csv", log_every=FREQUENCY)
        masks = [run.masks()]
        data = torch.Generator().manual_seed(100 + rank)  # each rank trains on different samples
        for _ in range(STEPS):
            x = torch.randn(8, 16, generator=data)
            loss = (model(x) - x[:, :4].cos()).pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            run.step()
            masks.append(run.masks())
        weights = {name: item.parameter.detach().clone() for name, item in run.layers.items()}
        torch.save({"masks": masks, "weights": weights, "updates": run.method.updates},
                   Path(out_dir) / f"rank{rank}.pt")
        run.finalize()
    finally:
        dist.destroy_process_group()


def test_rigl_masks_agree_across_two_gloo_ranks(tmp_path, free_port):
    mp.spawn(_worker, args=(free_port, str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    history = ranks[0]["masks"]
    assert len(history) == STEPS + 1
    assert [update["step"] for update in ranks[0]["updates"]] == [2, 4, 6]  # every 2 steps, cosine to 0 at 8
    for step, masks in enumerate(history):
        for name, mask in masks.items():
            for rank in range(1, WORLD_SIZE):
                assert torch.equal(ranks[rank]["masks"][step][name], mask), f"step {step} {name}: rank {rank} differs"
            # RigL drops and grows as many weights: the kept count never moves
            assert int(mask.sum()) == int(history[0][name].sum()), f"step {step} {name}"
    changed = sum(int((history[0][name] ^ history[-1][name]).sum()) for name in history[0])
    assert changed > 0  # the updates did move the topology
    for name, weight in ranks[0]["weights"].items():  # DDP: one model, bit for bit
        assert torch.equal(ranks[1]["weights"][name], weight)
        assert int((weight != 0).sum()) <= int(history[-1][name].sum())

    # one log for the job: rank 0 writes it, each record once
    from sparsewise.training.metrics import read_training_log

    rows = read_training_log(tmp_path / "log.csv")
    assert [row["step"] for row in rows if row["layer"] == "__global__"] == [0, 2, 4, 6, 8]
    assert len(rows) == 5 * 4


def _fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import sparsewise.training as training

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        model = _model()
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        with_ste = None
        try:
            training.attach(model, optimizer, method="srste", pattern="2:4", total_steps=STEPS)
        except Exception as error:  # noqa: BLE001 - the refusal is what is checked
            with_ste = str(error)
        run = training.attach(model, optimizer, method="rigl", sparsity=0.8, total_steps=STEPS,
                              frequency=FREQUENCY, stop=1.0)
        data = torch.Generator().manual_seed(100 + rank)
        for _ in range(STEPS):
            x = torch.randn(8, 16, generator=data)
            (model(x) - x[:, :4].cos()).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            run.step()
        masks = run.masks()
        weights = {name: item.weight_rows().clone() for name, item in run.layers.items()}  # gathered
        torch.save({"masks": masks, "weights": weights, "updates": run.method.updates, "ste": with_ste},
                   Path(out_dir) / f"fsdp{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_rigl_under_fsdp2_keeps_one_mask_and_zeros_on_every_shard(tmp_path, free_port):
    pytest = __import__("pytest")
    pytest.importorskip("torch.distributed.fsdp", reason="this torch has no FSDP2")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 (fully_shard)")
    mp.spawn(_fsdp_worker, args=(free_port, str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"fsdp{rank}.pt") for rank in range(WORLD_SIZE)]
    assert "FSDP2" in ranks[0]["ste"]
    assert [update["step"] for update in ranks[0]["updates"]] == [2, 4, 6]
    for name, mask in ranks[0]["masks"].items():
        assert torch.equal(ranks[1]["masks"][name], mask)
        assert 1 - mask.float().mean() == pytest.approx(0.8, abs=0.01)
        weight = ranks[0]["weights"][name]
        assert torch.equal(ranks[1]["weights"][name], weight)
        assert (weight[~mask] == 0).all(), f"{name}: a pruned weight is nonzero on some shard"
