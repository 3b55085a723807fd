"""Sparse-training metrics (SAD, PQ Index, the CSV log and its report), distillation losses and the
transformers Trainer callback, on CPU with tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsewise as sw
from sparsewise.errors import ConfigError
from sparsewise.training.distill import BlockOutputs, Distiller, logit_kl, squarehead_loss
from sparsewise.training.metrics import GLOBAL_ROW, mask_flips, pq_index, read_training_log


def tiny_llama(seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.LlamaForCausalLM(config).eval()


def token_batch(seed: int = 1, batch: int = 2, seqlen: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (batch, seqlen), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0  # a padded sequence: its last tokens must not count
    return {"input_ids": ids, "attention_mask": mask}


# ---------------------------------------------------------------------------------------- SAD / PQI
def test_mask_flips_is_the_hamming_distance():
    mask = torch.rand(8, 16, generator=torch.Generator().manual_seed(0)) > 0.5
    assert mask_flips(mask, mask.clone()) == 0
    changed = mask.clone()
    where = torch.tensor([0, 5, 77, 100, 127])
    changed.view(-1)[where] ^= True
    assert mask_flips(mask, changed) == 5 == mask_flips(changed, mask)
    assert mask_flips(mask.float(), changed.to(torch.uint8)) == 5  # nonzero = kept, any dtype
    with pytest.raises(ConfigError, match="shapes"):
        mask_flips(mask, mask.T)


@pytest.mark.parametrize(("p", "q"), [(0.5, 1.0), (1.0, 2.0), (0.3, 0.7)])
def test_pq_index_of_constant_and_one_hot_vectors(p, q):
    for d, value in [(10, 3.7), (7, 0.3), (64, -2.0)]:
        assert pq_index(torch.full((d,), value), p, q).item() == 0.0
        one_hot = torch.zeros(d)
        one_hot[d // 2] = value
        assert pq_index(one_hot, p, q).item() == pytest.approx(1 - d ** (1 / q - 1 / p), rel=1e-12)


def test_pq_index_per_row_over_unpruned_entries():
    weight = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(4, 12, generator=torch.Generator().manual_seed(1)) > 0.4
    rows = pq_index(weight, dim=1, mask=mask)
    assert rows.shape == (4,)
    for i in range(4):  # each row's value is the PQI of its kept entries alone
        assert rows[i].item() == pytest.approx(pq_index(weight[i][mask[i]]).item(), rel=1e-12)
    # pruning more of a vector never makes the kept part look denser than a constant one
    assert (rows >= 0).all() and (rows < 1).all()
    assert pq_index(weight, mask=mask).item() == pytest.approx(pq_index(weight[mask]).item(), rel=1e-12)
    assert torch.isnan(pq_index(torch.zeros(5)))  # 0/0: undefined, not silently 0
    with pytest.raises(ConfigError, match="0 < p < q"):
        pq_index(weight, p=1.0, q=0.5)


# ---------------------------------------------------------------------------------------- distillation
def test_squarehead_is_zero_on_identical_states_and_scale_invariant():
    gen = torch.Generator().manual_seed(0)
    teacher = [torch.randn(2, 5, 8, generator=gen) * scale for scale in (1.0, 30.0)]
    student = [t + 0.1 * torch.randn(2, 5, 8, generator=gen) for t in teacher]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert squarehead_loss(teacher, [t.clone() for t in teacher], mask).item() == 0.0
    loss = squarehead_loss(student, teacher, mask, eps=0.0)
    assert loss.item() > 0
    for c in (1e-3, 7.0, 1e3):
        scaled = squarehead_loss([s * c for s in student], [t * c for t in teacher], mask, eps=0.0)
        torch.testing.assert_close(scaled, loss, rtol=1e-5, atol=0)
    # the formula by hand: per-layer normalized MSE over non-padding tokens, summed over layers
    keep = mask.bool()
    by_hand = sum(((s[keep] - t[keep]) ** 2).mean() / ((t[keep] ** 2).mean() + 1e-6)
                  for s, t in zip(student, teacher, strict=True))
    torch.testing.assert_close(squarehead_loss(student, teacher, mask), by_hand)
    torch.testing.assert_close(squarehead_loss(student, teacher, mask, reduction="mean"), by_hand / 2)
    # padding does not count: garbage in masked positions changes nothing
    noisy = [s.clone() for s in student]
    noisy[0][1, 3:] += 1e3
    torch.testing.assert_close(squarehead_loss(noisy, teacher, mask), squarehead_loss(student, teacher, mask))


def test_logit_kl():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 64, generator=gen)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    assert logit_kl(logits, logits.clone(), 2.0, mask).item() == 0.0
    other = logits + torch.randn(2, 6, 64, generator=gen)
    kl = logit_kl(other, logits, 1.0, mask)
    assert kl.item() > 0
    keep = mask.bool()
    p_teacher = logits[keep].softmax(-1)
    by_hand = (p_teacher * (p_teacher.log() - other[keep].log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(kl, by_hand)
    torch.testing.assert_close(logit_kl(other, logits, 3.0, mask),
                               9 * logit_kl(other / 3, logits / 3, 1.0, mask))  # T^2 scaling


def test_block_outputs_handles_tuple_and_tensor_blocks():
    class TupleBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return (self.fc(x), "extra")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([TupleBlock() for _ in range(3)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)[0]
            return x

    net = Net()
    x = torch.randn(2, 4)
    with BlockOutputs(net) as captured:
        out = net(x)
    assert len(captured.hidden) == 3 and torch.equal(captured.hidden[-1], out)
    assert not any(block._forward_hooks for block in net.layers)  # hooks are removed on exit
    with pytest.raises(ConfigError, match="produced no output"):
        _ = BlockOutputs(net).hidden

    model = tiny_llama()  # LLaMA blocks return a tensor in transformers 5
    with BlockOutputs(model) as captured:
        model(**token_batch())
    assert [tuple(h.shape) for h in captured.hidden] == [(2, 12, 32)] * 2


def test_distiller_on_a_tiny_llama():
    teacher = tiny_llama()
    student = copy.deepcopy(teacher)
    batch = token_batch()
    distiller = Distiller(student, teacher, ce=1.0, squarehead=1.0, kl=0.5)
    total, parts = distiller.loss(batch)
    assert parts["squarehead"] == 0.0 and parts["kl"] == 0.0
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    own_loss = student(**batch, labels=labels).loss
    assert parts["ce"] == pytest.approx(float(own_loss.detach()), rel=1e-5)
    assert total.item() == pytest.approx(parts["ce"], rel=1e-5)

    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.add_(0.05 * torch.randn_like(student.model.layers[0].mlp.down_proj.weight))
    total, parts = distiller.loss(batch)
    assert parts["squarehead"] > 0 and parts["kl"] > 0
    assert total.item() == pytest.approx(parts["ce"] + parts["squarehead"] + 0.5 * parts["kl"], rel=1e-5)
    total.backward()
    assert student.model.layers[0].mlp.down_proj.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())  # the teacher runs under no_grad

    # a bf16 teacher: states come back in float32 on the student's side, the loss stays close
    half = Distiller(student, copy.deepcopy(teacher).to(torch.bfloat16), ce=0.0, squarehead=1.0)
    _, half_parts = half.loss(batch)
    assert set(half_parts) == {"squarehead", "loss"}
    assert half_parts["squarehead"] == pytest.approx(parts["squarehead"], rel=0.2)


# ---------------------------------------------------------------------------------------- the log
def mlp() -> nn.Module:
    torch.manual_seed(0)
    # 800, 1600 and 400 weights: 80% of each is a whole number, so the target is met exactly
    return nn.Sequential(nn.Linear(20, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 10))


def train_rigl(log_path, steps: int = 20):
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    run = sw.training.attach(model, optimizer, method="rigl", sparsity=0.8, total_steps=steps, frequency=5,
                             log=log_path, log_every=5)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 20, generator=gen)
        loss = (model(x) - x[:, :10].sin()).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        run.step()
    run.finalize()
    return run


@pytest.fixture(scope="module")
def rigl_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("log") / "deeper" / "log.csv"  # parent dirs are created
    run = train_rigl(path)
    return path, run


def test_training_log_tracks_rigl(rigl_log):
    path, run = rigl_log
    rows = read_training_log(path)
    steps = sorted({row["step"] for row in rows})
    assert steps == [0, 5, 10, 15, 20]
    layers = ["0", "2", "4"]
    for step in steps:  # one row per layer and a global one: finalize at step 20 adds no duplicate
        assert sorted(row["layer"] for row in rows if row["step"] == step) == sorted([*layers, GLOBAL_ROW])
    glob = {row["step"]: row for row in rows if row["layer"] == GLOBAL_ROW}
    assert glob[20]["sparsity"] == pytest.approx(0.8, abs=1e-12)
    assert glob[20]["target_sparsity"] == pytest.approx(0.8, abs=1e-12)
    assert glob[20]["params"] == 2800
    assert glob[0]["flips_since_last"] == 0
    # RigL updates at steps 5 and 10 (stop = 75% of 20): flips there, none after
    assert glob[5]["flips_since_last"] > 0 and glob[10]["flips_since_last"] > 0
    assert glob[15]["flips_since_last"] == 0 and glob[20]["flips_since_last"] == 0
    assert [u["step"] for u in run.method.updates] == [5, 10]
    # drop k, grow k: the symmetric difference of two masks of one size is even
    assert all(row["flips_since_last"] % 2 == 0 for row in rows)
    per_layer = [row for row in rows if row["step"] == 5 and row["layer"] != GLOBAL_ROW]
    assert sum(row["flips_since_last"] for row in per_layer) == glob[5]["flips_since_last"]
    assert all(0 < row["pq_index"] < 1 for row in rows)
    # grown weights start at zero: right after an update the measured sparsity exceeds the target
    assert glob[5]["sparsity"] > 0.8


def test_report_training_log_through_the_cli(rigl_log, tmp_path, capsys):
    from sparsewise.cli import main

    path, _ = rigl_log
    png = tmp_path / "plots" / "out.png"
    assert main(["report", "--training-log", str(path), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "steps 0 -> 20 (5 records), 3 trained layers, 2,800 weights" in out
    assert "final global sparsity 80.00% (target 80.00%)" in out
    assert "mask flips (SAD) per logged interval: 0-5:" in out and "15-20: 0" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    import json

    assert main(["report", "--training-log", str(path), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["steps"] == [0, 5, 10, 15, 20] and facts["final_sparsity"] == pytest.approx(0.8)
    assert [layer["layer"] for layer in facts["layers"]] == ["0", "2", "4"]
    assert main(["report", "--plot", str(png)]) == 2
    assert "--training-log" in capsys.readouterr().err
    assert main(["report"]) == 2
    assert main(["report", "--training-log", str(tmp_path / "missing.csv")]) == 2


# ---------------------------------------------------------------------------------------- Trainer
def test_trainer_callback_keeps_half_of_the_block_linears(tmp_path):
    import transformers as tf

    from sparsewise.models import ModelAdapter
    from sparsewise.records import get_records
    from sparsewise.training.hf import SparseTrainingCallback

    model = tiny_llama().train()
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, 64, (8, 16), generator=gen)]
    callback = SparseTrainingCallback(method="magnitude", sparsity=0.5, log=tmp_path / "log.csv", log_every=2)
    args = tf.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2,
                                learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                                logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    trainer = tf.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    before = {name: layer.get_weight().clone() for name, layer in ModelAdapter(model).prunable_layers().items()}
    trainer.train()

    assert callback.sparsity is not None and callback.sparsity.finalized
    assert callback.sparsity.step_count == 4 and callback.sparsity.total_steps == 4
    layers = ModelAdapter(model).prunable_layers()
    assert len(layers) == 14
    for name, layer in layers.items():
        weight = layer.get_weight()
        assert (weight == 0).float().mean().item() == 0.5, name
        assert not torch.equal(weight, before[name] * (weight != 0)), f"{name} did not train"
    records = get_records(model)
    assert set(records) == set(layers) and all(r.method == "training:magnitude" for r in records.values())
    assert not any("sparsity_mask" in key for key in model.state_dict())  # finalize removed the buffers
    assert sorted({row["step"] for row in read_training_log(tmp_path / "log.csv")}) == [0, 2, 4]


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, rigl_log, tmp_path):
    import sys

    from sparsewise.metrics.plots import plot_training_log

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="pip install matplotlib"):
        plot_training_log(read_training_log(rigl_log[0]), tmp_path / "x.png")
