"""Sparse training on real images (CPU): dense vs 90% / 95% sparse vs 2:4, every method.

Data: the real MNIST test split (../shared/data/mnist-t10k, md5-checked; first 8,000 images to
train, last 2,000 held out) and scikit-learn's bundled 8x8 digits (1,797 images; 1,437 train,
360 held out, fixed permutation). Models: an MLP (784-300-100-10, LeNet-300-100) and a small CNN
(2 conv 16/32 channels with pooling + 2 linear). Every sparse layer of the model is trained sparse (first and last included;
ERK gives small layers more density). Optimizer SGD momentum 0.9, lr 0.05 cosine, wd 5e-4,
batch 64; same epochs and seed for every row. Accuracy on the held-out images; the final
sparsity is measured from the weights after finalize(), N:M validity checked on the masks.

    python benchmarks/train_mnist.py --epochs 15 --seeds 0,1 --json-out .bench/train_mnist.json
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import sparsewise as sw
from sparsewise import training
from sparsewise.patterns import check_mask

REPO = Path(__file__).resolve().parents[1]
MNIST_MD5 = {"t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
             "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}
# (method, sparsity, pattern, distribution, options)
ROWS = [("dense", 0.0, None, None, {})]
for target in (0.9, 0.95):
    ROWS += [("random", target, None, "erk", {}), ("gmp", target, None, "erk", {}), ("set", target, None, "erk", {}),
             ("rigl", target, None, "erk", {}), ("rigl", target, None, "uniform", {}),
             ("issp", target, None, "erk", {})]
# sparse from scratch with the kept weights scaled by 1/sqrt(density) at init
ROWS += [(method, target, None, "erk", {"rescale": True}) for target in (0.9, 0.95) for method in ("random", "set", "rigl")]
ROWS += [("magnitude", 0.9, None, "erk", {}),
         ("srste", None, "2:4", "uniform", {}), ("pgf", None, "2:4", "uniform", {"stages": "stepwise"}),
         ("cast", None, "2:4", "uniform", {}), ("bdwp", None, "2:4", "uniform", {})]


def load_mnist(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    arrays = {}
    for name, expected in MNIST_MD5.items():
        raw = (folder / name).read_bytes()
        if hashlib.md5(raw).hexdigest() != expected:
            raise SystemExit(f"{folder / name}: md5 differs from the data README ({expected}); re-fetch the file.")
        arrays[name] = gzip.decompress(raw)
    images = torch.frombuffer(bytearray(arrays["t10k-images-idx3-ubyte.gz"]), dtype=torch.uint8, offset=16)
    labels = torch.frombuffer(bytearray(arrays["t10k-labels-idx1-ubyte.gz"]), dtype=torch.uint8, offset=8)
    images = images.reshape(-1, 1, 28, 28).float() / 255.0
    return (images - 0.1307) / 0.3081, labels.long()


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return (images[order] - 0.5) / 0.5, labels[order]


def split(dataset: str, data_dir: Path):
    if dataset == "mnist":
        images, labels = load_mnist(data_dir / "mnist-t10k")
        return (images[:8000], labels[:8000]), (images[8000:], labels[8000:])
    images, labels = load_digits()
    cut = len(labels) - 360
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


def build(kind: str, side: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(side * side, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
                             nn.Linear(100, 10))
    after = side // 4  # two same-size 3x3 convs, each followed by 2x2 max pooling
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(32 * after * after, 128), nn.ReLU(), nn.Linear(128, 10))


def log_path(log_dir: Path | None, dataset: str, kind: str, row, seed: int) -> Path | None:
    """Where the run's sparsity log goes (``sparsewise report --training-log``), or None."""
    if log_dir is None:
        return None
    method, target, pattern, distribution, options = row
    label = method + "".join(f"+{key}" for key, value in options.items() if value is True)
    shown = (pattern or f"{target:g}").replace(":", "of")
    return log_dir / f"{dataset}_{kind}_{label}_{shown}_{distribution}_seed{seed}.csv"


def untileable(model: nn.Module, method: str, pattern: str | None) -> list[str] | None:
    """Layers an N:M pattern cannot tile stay dense (the first conv has 9 inputs per row; BDWP also
    needs the output dim divisible by M and runs on Linear layers only): named in the results."""
    if pattern is None:
        return None
    group = int(pattern.split(":")[1])
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            rows_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            if rows_in % group or method == "bdwp":
                names.append(name)
        elif isinstance(module, nn.Linear) and (module.in_features % group
                                                or (method == "bdwp" and module.out_features % group)):
            names.append(name)
    return [f"^{name}$" for name in names] or None


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(images[i:i + 500]).argmax(1) == labels[i:i + 500]).sum())
                      for i in range(0, len(labels), 500))
    model.train()
    return correct / len(labels)


def run(row, dataset: str, kind: str, train_set, test_set, epochs: int, seed: int, batch: int = 64,
        log_dir: Path | None = None) -> dict:
    method, target, pattern, distribution, options = row
    images, labels = train_set
    model = build(kind, images.shape[-1], seed)
    steps_per_epoch = len(labels) // batch
    total = steps_per_epoch * epochs
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    sparsity = None
    if method != "dense":
        sparsity = training.attach(model, optimizer, method, target, pattern=pattern, distribution=distribution,
                                   total_steps=total, seed=seed, exclude=untileable(model, method, pattern),
                                   log=log_path(log_dir, dataset, kind, row, seed), log_every=50, **options)
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * batch:(step + 1) * batch]
            loss = nn.functional.cross_entropy(model(images[index]), labels[index])
            if sparsity is not None:
                loss = loss + sparsity.loss_term()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            if sparsity is not None:
                sparsity.step()
    wall = time.perf_counter() - start
    label = method + "".join(f"+{key}" for key, value in options.items() if value is True)
    result = {"dataset": dataset, "model": kind, "method": label, "target": target, "pattern": pattern or "unstructured",
              "distribution": distribution, "seed": seed, "wall_s": round(wall, 1)}
    if sparsity is not None:
        result["dense_layers"] = sorted(set(dict(model.named_modules())) & {n.strip("^$") for n in
                                                                           untileable(model, method, pattern) or []})
    if sparsity is not None:
        records = sparsity.finalize()
        numel = {name: record.shape[0] * record.shape[1] for name, record in records.items()}
        zeros = sum(int((record.mask == 0).sum()) for record in records.values())
        weight_zeros = sum(int((item.weight_rows() == 0).sum()) for item in sparsity.layers.values())
        result.update(sparsity=round(zeros / sum(numel.values()), 5),
                      weight_sparsity=round(weight_zeros / sum(numel.values()), 5),
                      nm_valid=all(check_mask(record.mask, pattern) for record in records.values()) if pattern else None)
    result["accuracy"] = accuracy(model, *test_set)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--datasets", default="mnist,digits")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--only", help="comma-separated methods to run, e.g. rigl,rigl+rescale (dense always runs)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: these models are too small to gain from more, and 2 threads on a "
                             "busy 2-core machine ran 10x slower)")
    parser.add_argument("--log-dir", type=Path, help="write each sparse run's log (sparsity, mask flips, PQ Index)")
    parser.add_argument("--json-out", type=Path, default=REPO / ".bench" / "train_mnist.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "sparsewise": sw.__version__, "epochs": args.epochs,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(header), flush=True)
    wanted = args.only.split(",") if args.only else None
    rows = [row for row in ROWS if row[0] == "dense" or not wanted
            or row[0] + "".join(f"+{k}" for k, v in row[4].items() if v is True) in wanted]
    results = []
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    for dataset in args.datasets.split(","):
        train_set, test_set = split(dataset, args.data)
        for kind in args.models.split(","):
            for row in rows:
                for seed in (int(s) for s in args.seeds.split(",")):
                    result = run(row, dataset, kind, train_set, test_set, args.epochs, seed, log_dir=args.log_dir)
                    results.append(result)
                    print(json.dumps(result), flush=True)
                    tmp = args.json_out.with_suffix(".tmp")
                    tmp.write_text(json.dumps({**header, "rows": results}, indent=1))
                    tmp.replace(args.json_out)
    summarize(results)


def summarize(results: list[dict]) -> None:
    groups: dict[tuple, list[dict]] = {}
    for result in results:
        key = (result["dataset"], result["model"], result["method"], result["target"], result["pattern"],
               result["distribution"])
        groups.setdefault(key, []).append(result)
    print(f"\n{'data':7} {'model':5} {'method':14} {'target':>6} {'dist':8} {'sparsity':>8} {'N:M ok':>6} "
          f"{'acc % (mean +- sd)':>20}")
    for (dataset, model, method, target, pattern, dist), items in groups.items():
        accs = [100 * item["accuracy"] for item in items]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        shown = pattern if pattern != "unstructured" else (f"{target:.2f}" if target else "-")
        sparsity = items[0].get("sparsity", 0.0)
        valid = items[0].get("nm_valid")
        print(f"{dataset:7} {model:5} {method:14} {shown:>6} {dist or '-':8} {sparsity:8.4f} "
              f"{'-' if valid is None else str(valid):>6} {statistics.mean(accs):12.2f} +- {spread:.2f}")


if __name__ == "__main__":
    main()
