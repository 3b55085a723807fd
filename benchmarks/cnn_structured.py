"""Structured (channel) pruning of CNNs on real images, CPU: accuracy, params, MACs, batch-1 latency.

Issue 19 point 5. Data and training settings are those of train_mnist.py (its loaders are imported):
MNIST test split (first 8,000 images train, last 2,000 held out) and scikit-learn digits (1,437 /
360); SGD momentum 0.9, lr 0.05 cosine, wd 5e-4, batch 64, seed 0. Models: train_mnist's small CNN
with a BatchNorm after each conv ("cnn": conv 16-32, pools, linear 128, 10; network slimming ranks
channels by BN scales) and a ResNet-style CNN ("resnet": stem 16, basic blocks 16 and 16->32
stride 2 with a 1x1 shortcut, residual adds, BN, global pool, linear). Rows:

- dense:            trained --epochs from scratch
- slim:             dense + --sparse-epochs with L1 on BN scales (BNScaleL1, decaying strength),
                    prune conv channels to 50% of the MACs (one global BN-scale ranking, residual
                    groups kept together, beta folded into the next bias), then --finetune-epochs: plain CE
                    ("slim+ft") or CE + CWD from the dense teacher on the last conv map ("slim+cwd")
- precrop:          untrained net cropped to 50% of the MACs from SNIP layer densities on one batch,
                    trained --epochs from scratch
- wgsef:            dense + --sparse-epochs of proximal SGD with the WGSEF prox (k = 50% of the
                    channels of every conv group), zero channels removed, then --finetune-epochs CE

Latency: batch 1, eval, inference_mode, torch.set_num_threads(1) and (2); dense and pruned are timed
in alternating blocks (the machine may be shared) and the speedup is the median of per-round ratios
(``best_speedup``: ratio of the fastest blocks). ``--retime JSON`` re-measures only the latency of
saved rows, from their widths (latency depends on shapes, not on trained values).

    python benchmarks/cnn_structured.py --json-out .bench/cnn_structured.json
    python benchmarks/cnn_structured.py --retime benchmarks/results/cpu-2026-12-03/cnn_structured.json --rounds 100
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sparsewise as sw
from sparsewise.structured import (
    BNScaleL1,
    ChannelWiseDistillLoss,
    ProxRegularizer,
    channel_group_specs,
    count_params,
    nonzero_channels,
    precrop,
    prune_channels,
    remove_channels,
    trace_channels,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_mnist import accuracy, split  # noqa: E402  (the shared MNIST/digits loaders)

REPO = Path(__file__).resolve().parents[1]


def small_cnn(side: int) -> nn.Sequential:
    after = side // 4
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * after * after, 128), nn.ReLU(), nn.Linear(128, 10))


class BasicBlock(nn.Module):
    def __init__(self, channels: int, out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.shortcut = (nn.Sequential(nn.Conv2d(channels, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                         if stride != 1 or out != channels else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNetCNN(nn.Module):
    def __init__(self, side: int):
        super().__init__()
        pool = 2 if side > 16 else 1
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.MaxPool2d(pool))
        self.stage1 = BasicBlock(16, 16)
        self.stage2 = nn.Sequential(BasicBlock(16, 32, stride=2), BasicBlock(32, 32))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stage2(self.stage1(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def build(kind: str, side: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return small_cnn(side) if kind == "cnn" else ResNetCNN(side)


def feature_layer(model: nn.Module) -> nn.Module:
    """The module whose output is the last conv feature map (CWD is applied there)."""
    return model[6] if isinstance(model, nn.Sequential) else model.stage2


def train(model: nn.Module, train_set, epochs: float, seed: int, *, lr: float = 0.05, regularizer=None,
          prox: ProxRegularizer | None = None, teacher: nn.Module | None = None, cwd_weight: float = 1.0,
          batch: int = 64) -> float:
    """train_mnist's loop (SGD momentum 0.9, cosine lr, wd 5e-4); returns seconds."""
    images, labels = train_set
    steps_per_epoch = len(labels) // batch
    total = max(1, int(steps_per_epoch * epochs))
    extra = []
    cwd = None
    if teacher is not None:
        captured: dict[str, torch.Tensor] = {}
        hooks = [feature_layer(model).register_forward_hook(lambda m, a, out: captured.__setitem__("student", out)),
                 feature_layer(teacher).register_forward_hook(lambda m, a, out: captured.__setitem__("teacher", out))]
        probe = images[:2]
        with torch.no_grad():
            model.eval(), teacher.eval()
            model(probe), teacher(probe)
        cwd = ChannelWiseDistillLoss(tau=1.0, student_channels=captured["student"].shape[1],
                                     teacher_channels=captured["teacher"].shape[1])
        extra = list(cwd.parameters())
    optimizer = torch.optim.SGD(list(model.parameters()) + extra, lr=lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    if prox is not None:
        prox.attach(optimizer)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    step = 0
    while step < total:
        order = torch.randperm(len(labels), generator=generator)
        for index in order[: steps_per_epoch * batch].view(steps_per_epoch, batch):
            loss = F.cross_entropy(model(images[index]), labels[index])
            if regularizer is not None:
                loss = loss + regularizer.loss_term()
            if cwd is not None:
                with torch.no_grad():
                    teacher(images[index])
                loss = loss + cwd_weight * cwd(captured["student"], captured["teacher"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            if regularizer is not None:
                regularizer.step()
            step += 1
            if step >= total:
                break
    if prox is not None:
        prox.detach()
    if teacher is not None:
        for hook in hooks:
            hook.remove()
    model.eval()
    return time.perf_counter() - start


def frozen(model: nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    """TorchScript trace + freeze (folds BatchNorm into the convs, drops Python module overhead)."""
    with torch.no_grad():
        return torch.jit.freeze(torch.jit.trace(copy.deepcopy(model).eval(), x))


def latency_speedup(dense: nn.Module, pruned: nn.Module, side: int, threads: int, rounds: int, block: int,
                    jit: bool = False) -> dict:
    """Median batch-1 latency (ms) of each model and the median of per-round dense/pruned ratios
    (eager modules, or both TorchScript-frozen with ``jit``)."""
    torch.set_num_threads(threads)
    x = torch.randn(1, 1, side, side)
    dense.eval(), pruned.eval()
    if jit:
        dense, pruned = frozen(dense, x), frozen(pruned, x)
    times = {"dense": [], "pruned": []}
    ratios = []
    best = {"dense": float("inf"), "pruned": float("inf")}
    with torch.inference_mode():
        for model in (dense, pruned):
            for _ in range(50):
                model(x)
        for _ in range(rounds):
            measured = {}
            for key, model in (("dense", dense), ("pruned", pruned)):
                start = time.perf_counter()
                for _ in range(block):
                    model(x)
                measured[key] = (time.perf_counter() - start) / block
                times[key].append(measured[key])
                best[key] = min(best[key], measured[key])
            ratios.append(measured["dense"] / measured["pruned"])
    torch.set_num_threads(1)
    mode = "jit_" if jit else ""
    return {f"dense_{mode}ms_t{threads}": round(1e3 * statistics.median(times["dense"]), 4),
            f"{mode}ms_t{threads}": round(1e3 * statistics.median(times["pruned"]), 4),
            f"{mode}speedup_t{threads}": round(statistics.median(ratios), 3),
            f"{mode}best_speedup_t{threads}": round(best["dense"] / best["pruned"], 3)}


def describe(model: nn.Module, side: int) -> dict:
    graph = trace_channels(model, torch.zeros(2, 1, side, side))
    convs = {name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    channels = sum(group.size for group in graph.prunable() if set(group.producers) & convs)  # a residual group once
    return {"params": count_params(model), "macs": graph.macs(), "conv_channels": channels}


def run_model(dataset: str, kind: str, train_set, test_set, args) -> list[dict]:
    side = train_set[0].shape[-1]
    example = train_set[0][:64]
    rows = []
    dense = build(kind, side, args.seed)
    wall = train(dense, train_set, args.epochs, args.seed)
    base = {"dataset": dataset, "model": kind}
    dense_row = {**base, "method": "dense", "accuracy": accuracy(dense, *test_set), "train_s": round(wall, 1),
                 **describe(dense, side)}
    rows.append(dense_row)
    print(json.dumps(dense_row), flush=True)

    def finish(row: dict, model: nn.Module) -> dict:
        row.update(describe(model, side))
        row["accuracy_drop"] = round(100 * (dense_row["accuracy"] - row["accuracy"]), 2)
        row["macs_ratio"] = round(row["macs"] / dense_row["macs"], 3)
        row["channels_ratio"] = round(row["conv_channels"] / dense_row["conv_channels"], 3)  # prunable conv channels
        for threads in args.thread_counts:
            for jit in (False, True):
                row.update(latency_speedup(dense, model, side, threads, args.rounds, args.block, jit))
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    if "slim" in args.only:
        slimming_rows(dense, base, train_set, test_set, example, finish, args)
    if "precrop" in args.only:
        precrop_row(kind, side, base, train_set, test_set, example, finish, args)
    if "wgsef" in args.only:
        wgsef_row(dense, base, train_set, test_set, example, finish, args)
    return rows


def slimming_rows(dense, base, train_set, test_set, example, finish, args) -> None:
    """Network slimming + CWD (the YOLOv8 compression recipe)."""
    slim = copy.deepcopy(dense)
    steps = int(len(train_set[1]) // 64 * args.sparse_epochs)
    l1 = BNScaleL1(slim, strength=args.l1, total_steps=steps, schedule="decay")
    wall = train(slim, train_set, args.sparse_epochs, args.seed + 1, lr=args.sparse_lr, regularizer=l1)
    sparse_accuracy = accuracy(slim, *test_set)
    result = prune_channels(slim, example, flops_ratio=args.keep, importance="bn_scale", scope="global")
    pruned_accuracy = accuracy(slim, *test_set)
    for label, teacher in (("slim+ft", None), ("slim+cwd", dense)):
        student = copy.deepcopy(slim)
        ft_wall = train(student, train_set, args.finetune_epochs, args.seed + 2, lr=args.finetune_lr,
                        teacher=copy.deepcopy(teacher) if teacher is not None else None, cwd_weight=args.cwd_weight)
        finish({**base, "method": label, "accuracy": accuracy(student, *test_set), "accuracy_l1_trained": sparse_accuracy,
                "accuracy_pruned_no_ft": pruned_accuracy, "train_s": round(wall + ft_wall, 1),
                "widths": result.widths}, student)



def precrop_row(kind, side, base, train_set, test_set, example, finish, args) -> None:
    """PreCropping at 50% of the MACs, trained from scratch."""
    cropped = build(kind, side, args.seed)
    batch = (train_set[0][:256], train_set[1][:256])
    crop = precrop(cropped, example, batch, flops_ratio=args.keep)
    wall = train(cropped, train_set, args.epochs, args.seed)
    finish({**base, "method": "precrop", "accuracy": accuracy(cropped, *test_set), "train_s": round(wall, 1),
            "snip_density": round(crop.density, 4), "widths": crop.widths}, cropped)



def wgsef_row(dense, base, train_set, test_set, example, finish, args) -> None:
    """WGSEF proximal training to k = 50% channels per conv group, removal, short fine-tune."""
    grouped = copy.deepcopy(dense)
    graph = trace_channels(grouped, example)
    linears = [name for name, module in grouped.named_modules() if isinstance(module, nn.Linear)]
    specs = channel_group_specs(grouped, graph, exclude=linears)
    prox = ProxRegularizer(grouped, specs, keep=args.keep, strength=args.prox)
    wall = train(grouped, train_set, args.sparse_epochs, args.seed + 1, lr=args.sparse_lr, prox=prox)
    prox.strength = float("inf")  # final hard step: exactly k groups per family
    prox.step()
    keep = nonzero_channels(grouped, graph)
    prox_accuracy = accuracy(grouped, *test_set)
    remove_channels(grouped, graph, keep)
    removed_accuracy = accuracy(grouped, *test_set)
    ft_wall = train(grouped, train_set, args.finetune_epochs, args.seed + 2, lr=args.finetune_lr)
    finish({**base, "method": "wgsef+ft", "accuracy": accuracy(grouped, *test_set), "accuracy_prox_trained": prox_accuracy,
            "accuracy_removed_no_ft": removed_accuracy, "train_s": round(wall + ft_wall, 1)}, grouped)


def shaped_like(row: dict, side: int, keep: float) -> nn.Module:
    """A randomly initialized model with the widths of a saved row (latency depends on shapes only)."""
    model = build(row["model"], side, 0)
    if row["method"] == "dense":
        return model
    graph = trace_channels(model, torch.zeros(2, 1, side, side))
    convs = {name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    widths = {}
    for group in graph.prunable():
        if "widths" in row:
            widths[group.index] = row["widths"].get(group.producers[0], group.size)
        else:  # wgsef: k = round(keep * size) channels of every conv group (ProxRegularizer's count)
            widths[group.index] = max(1, int(round(keep * group.size))) if set(group.producers) & convs else group.size
    remove_channels(model, graph, {index: torch.arange(width) for index, width in widths.items()})
    if trace_channels(model, torch.zeros(2, 1, side, side)).macs() != row["macs"]:
        raise SystemExit(f"rebuilt {row['dataset']} {row['model']} {row['method']} does not match the saved MACs")
    return model


def retime(path: Path, args) -> None:
    """Re-measure the batch-1 latency of every saved row from its shapes (no training)."""
    saved = json.loads(path.read_text())
    print(json.dumps({"retime": str(path), "machine": cpu_name(), "torch": torch.__version__, "rounds": args.rounds,
                      "block": args.block, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}), flush=True)
    keep = saved["settings"]["keep"]
    for row in saved["rows"]:
        if row["method"] == "dense":
            side = 28 if row["dataset"] == "mnist" else 8
            dense = shaped_like(row, side, keep)
            continue
        pruned = shaped_like(row, side, keep)
        timing = {"dataset": row["dataset"], "model": row["model"], "method": row["method"], "macs_ratio": row["macs_ratio"]}
        for threads in args.thread_counts:
            for jit in (False, True):
                timing.update(latency_speedup(dense, pruned, side, threads, args.rounds, args.block, jit))
        print(json.dumps(timing), flush=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--datasets", default="mnist,digits")
    parser.add_argument("--models", default="cnn,resnet")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--sparse-epochs", type=float, default=2)
    parser.add_argument("--finetune-epochs", type=float, default=2)
    parser.add_argument("--sparse-lr", type=float, default=0.02)
    parser.add_argument("--finetune-lr", type=float, default=0.02)
    parser.add_argument("--keep", type=float, default=0.5,
                        help="fraction of MACs kept (slim, precrop) / of channels per conv group (wgsef)")
    parser.add_argument("--l1", type=float, default=0.03,
                        help="BNScaleL1 strength (decays to 10%%); MNIST, 50%% channels: 0.03 kept the L1-trained "
                             "ResNet at 98.75%%, 0.3 collapsed it to 11.5%%")
    parser.add_argument("--prox", type=float, default=2.0, help="WGSEF strength lambda (step: lambda * lr)")
    parser.add_argument("--cwd-weight", type=float, default=1.0)
    parser.add_argument("--digits-scale", type=float, default=5,
                        help="digits has 1,437 training images of 8x8: every epoch count is multiplied by this")
    parser.add_argument("--only", default="slim,precrop,wgsef", help="compressed rows to run (dense always runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", default="1,2", help="thread counts of the latency measurement")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--json-out", type=Path, default=REPO / ".bench" / "cnn_structured.json")
    parser.add_argument("--retime", type=Path, help="only re-measure latency of the rows saved in this JSON")
    args = parser.parse_args()
    args.thread_counts = [int(t) for t in args.threads.split(",")]
    if args.retime:
        torch.set_num_threads(1)
        return retime(args.retime, args)
    torch.set_num_threads(1)
    header = {"machine": cpu_name(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "torch": torch.__version__, "sparsewise": sw.__version__,
              "train_threads": 1, "latency_threads": args.thread_counts, "rounds": args.rounds, "block": args.block,
              "settings": {k: v for k, v in vars(args).items() if k not in ("data", "json_out", "thread_counts")},
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(header, default=str), flush=True)
    results = []
    start = time.perf_counter()
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    for dataset in args.datasets.split(","):
        train_set, test_set = split(dataset, args.data)
        scale = args.digits_scale if dataset == "digits" else 1.0
        scaled = argparse.Namespace(**{**vars(args), **{key: getattr(args, key) * scale for key in
                                                        ("epochs", "sparse_epochs", "finetune_epochs")}})
        for kind in args.models.split(","):
            results += run_model(dataset, kind, train_set, test_set, scaled)
            args.json_out.write_text(json.dumps({**header, "rows": results}, indent=1, default=str))
    header["total_s"] = round(time.perf_counter() - start, 1)
    args.json_out.write_text(json.dumps({**header, "rows": results}, indent=1, default=str))
    summarize(results, header)


def summarize(results: list[dict], header: dict) -> None:
    threads = header["latency_threads"]
    print(f"\n{'data':6} {'model':6} {'method':9} {'acc %':>6} {'drop':>5} {'ch':>5} {'params':>7} {'MACs':>9} "
          f"{'MACs x':>6} " + " ".join(f"{'ms t' + str(t):>7} {'spd t' + str(t):>7} {'jit t' + str(t):>7}"
                                        for t in threads))
    for row in results:
        latency = " ".join(f"{row.get(f'ms_t{t}', float('nan')):7.3f} {row.get(f'speedup_t{t}', 1.0):7.2f} "
                           f"{row.get(f'jit_speedup_t{t}', 1.0):7.2f}" for t in threads)
        if row["method"] == "dense":
            others = [r for r in results if r["dataset"] == row["dataset"] and r["model"] == row["model"]
                      and f"dense_ms_t{threads[0]}" in r]
            latency = " ".join(f"{statistics.median(r[f'dense_ms_t{t}'] for r in others):7.3f} {1.0:7.2f} {1.0:7.2f}"
                               for t in threads) if others else latency
        print(f"{row['dataset']:6} {row['model']:6} {row['method']:9} {100 * row['accuracy']:6.2f} "
              f"{row.get('accuracy_drop', 0.0):5.2f} {row['conv_channels']:5d} {row['params']:7d} {row['macs']:9d} "
              f"{row.get('macs_ratio', 1.0):6.3f} {latency}")
    print(f"total {header.get('total_s')} s")


if __name__ == "__main__":
    main()
