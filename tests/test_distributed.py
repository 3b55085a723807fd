"""Calibration split across processes (torch.distributed, gloo on CPU) gives the masks of one process.

The test runs this file as a script in 2 processes (one spawn for every method and mode), each
pruning the same tiny LLaMA on its share of the calibration samples; the parent compares their
masks and weights with a one-process run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsewise.calibration.distributed import all_reduce_stats, shard_samples, world
from sparsewise.calibration.stats import STAT_HESSIAN, STAT_NORMS, LayerStats
from sparsewise.errors import ConfigError

WORLD_SIZE = 2
CASES = [(method, mode) for method in ("wanda", "sparsegpt") for mode in ("layer", "block")]
N_SAMPLES, SEQLEN, BATCH = 5, 16, 2  # 5 samples: uneven shards (2 + 3) and several batches per rank


def calibration_set():
    from conftest import VOCAB

    from sparsewise.data import CalibrationSet

    ids = torch.randint(0, VOCAB, (N_SAMPLES, SEQLEN), generator=torch.Generator().manual_seed(1))
    return CalibrationSet(input_ids=ids, source="tensor")


def run_cases(device: str = "cpu") -> dict[str, dict[str, torch.Tensor]]:
    """{"method/mode": {layer: pruned weight}} for every case, in this process's world."""
    from conftest import build_tiny

    import sparsewise as sw

    out = {}
    for method, mode in CASES:
        model = build_tiny("llama", seed=0)
        result = sw.prune(model, method, sparsity=0.5, calibration=calibration_set(), progress=False,
                          sequential=mode, batch_size=BATCH, device=device)
        modules = dict(model.named_modules())
        out[f"{method}/{mode}"] = {name: modules[name].weight.detach().cpu().clone() for name in result.records}
    return out


def _worker(out_dir: Path, backend: str) -> None:
    import torch.distributed as dist

    device = "cpu"
    if backend == "nccl":  # one GPU per rank, statistics reduced on the GPUs
        device = f"cuda:{int(os.environ['RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    try:
        rank, _ = world()
        # a rank that saw no tokens of a layer still joins the reduce with zero sums
        stats = LayerStats(8, frozenset({STAT_NORMS, STAT_HESSIAN}))
        if rank == 0:
            stats.update(torch.arange(24, dtype=torch.float32, device=device).reshape(3, 8))
        all_reduce_stats(stats, torch.device(device))
        from sparsewise.calibration.run import calibration_batches

        shares = [[batch["input_ids"].shape[0] for batch in calibration_batches(calibration_set(), size)]
                  for size in (None, BATCH)]
        torch.save({"cases": run_cases(device), "shares": shares,
                    "stats": (stats.tokens, stats.sq_sum.cpu(), stats.xtx.cpu())}, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one(tmp_path, free_port):
    _two_ranks_match_one(tmp_path, free_port, "gloo")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
def test_two_nccl_gpus_match_one(tmp_path, free_port):
    _two_ranks_match_one(tmp_path, free_port, "nccl")


def _two_ranks_match_one(tmp_path, free_port, backend: str) -> None:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port),
           "WORLD_SIZE": str(WORLD_SIZE), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, __file__, str(tmp_path), backend],
                         env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(WORLD_SIZE)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log}"
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]

    # rank 0 takes samples 0-1, rank 1 samples 2-4; block mode re-batches each share by BATCH
    assert [data["shares"] for data in ranks] == [[[2], [2]], [[3], [2, 1]]]
    tokens, sq_sum, xtx = ranks[1]["stats"]
    x = torch.arange(24, dtype=torch.float32).reshape(3, 8)
    assert tokens == 3
    torch.testing.assert_close(sq_sum, (x * x).sum(0))
    torch.testing.assert_close(xtx, x.T @ x)

    single = run_cases("cuda:0" if backend == "nccl" else "cpu")
    for case, weights in single.items():
        for name, weight in weights.items():
            for rank, data in enumerate(ranks):
                got = data["cases"][case][name]
                # ranks never diverge: identical bits on every rank
                assert torch.equal(got, ranks[0]["cases"][case][name]), f"{case} {name}: rank {rank} differs"
                assert torch.equal(got != 0, weight != 0), f"{case} {name}: mask differs from one process"
                # sparsegpt's updates see X^T X summed in another order: equal up to float rounding
                torch.testing.assert_close(got, weight, rtol=0, atol=1e-5, msg=f"{case} {name}")


def test_shard_samples_uses_every_sample_once():
    samples = {"input_ids": torch.arange(7).reshape(7, 1), "flag": True}
    shares = [shard_samples(samples, rank, 3) for rank in range(3)]
    assert [share["input_ids"].shape[0] for share in shares] == [2, 2, 3]
    assert torch.equal(torch.cat([share["input_ids"] for share in shares]), samples["input_ids"])
    assert all(share["flag"] is True for share in shares)
    assert world() == (0, 1)
    assert shard_samples(samples)["input_ids"].shape[0] == 7  # one process keeps everything


def test_shard_samples_refuses_fewer_samples_than_ranks():
    with pytest.raises(ConfigError, match="2 samples for 3 processes"):
        shard_samples({"input_ids": torch.zeros(2, 4)}, 0, 3)
    with pytest.raises(ConfigError, match="disagree"):
        shard_samples({"input_ids": torch.zeros(4, 4), "attention_mask": torch.zeros(3, 4)}, 0, 2)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    _worker(Path(sys.argv[1]), sys.argv[2])


@pytest.mark.slow  # two real-model processes: ~1-5 min on 2 cores
def test_cli_prune_under_two_gloo_ranks(tmp_path, smollm2, free_port):
    """`torchrun --nproc-per-node 2 -m sparsewise prune ...` as two processes with torchrun's
    environment: both ranks finish, only rank 0 prints the summary and writes the output."""
    import os
    import subprocess
    import sys

    # the smollm2 fixture: skip where the bundled real model (with its tokenizer) is missing
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": ""}
        argv = [sys.executable, "-m", "sparsewise", "prune", "--model", "smollm2-135m", "--method", "wanda",
                "--calib", str(calib), "--calib-n", "4", "--calib-seqlen", "16", "--fidelity-n", "1",
                "--fidelity-seqlen", "8", "--out", str(tmp_path / "out"), "--no-progress", "--device", "cpu"]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert "wanda" in outputs[0][0] and outputs[1][0].strip() == ""
    assert (tmp_path / "out").is_dir()
