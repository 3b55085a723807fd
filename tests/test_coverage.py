"""Coverage: which kinds of parameters a prune targeted, so that no large weight stays dense silently."""

from __future__ import annotations

import pytest
from conftest import build_tiny
from tiny_moe import build_tiny_moe, build_tiny_t5

import sparsewise as sw
from sparsewise.metrics.report import checkpoint_report
from sparsewise.models import ModelAdapter
from sparsewise.models.coverage import model_coverage, parameter_kinds
from sparsewise.records import get_records


def test_parameter_kinds_of_llama_t5_and_mixtral():
    llama = parameter_kinds(build_tiny("llama"))
    assert llama["model.layers.0.self_attn.q_proj.weight"] == "attention"
    assert llama["model.layers.1.mlp.down_proj.weight"] == "mlp"
    assert llama["model.embed_tokens.weight"] == "embeddings"
    assert llama["model.norm.weight"] == "other"
    t5 = parameter_kinds(build_tiny_t5())
    assert t5["encoder.block.0.layer.0.SelfAttention.q.weight"] == "attention"
    assert t5["decoder.block.1.layer.1.EncDecAttention.o.weight"] == "attention"
    assert t5["encoder.block.1.layer.1.DenseReluDense.wo.weight"] == "mlp"
    assert t5["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == "embeddings"
    mixtral = parameter_kinds(build_tiny_moe("mixtral"))
    assert mixtral["model.layers.0.mlp.experts.gate_up_proj"] == "experts"
    assert mixtral["model.layers.0.mlp.experts.down_proj"] == "experts"
    assert mixtral["model.layers.0.mlp.gate.weight"] == "router"
    qwen2 = parameter_kinds(build_tiny_moe("qwen2_moe"))
    assert qwen2["model.layers.0.mlp.shared_expert.up_proj.weight"] == "mlp"
    assert qwen2["model.layers.0.mlp.shared_expert_gate.weight"] == "router"


def test_llama_every_block_linear_covered():
    model = build_tiny("llama")
    result = sw.prune(model, "magnitude", 0.5, progress=False)
    coverage = result.measure_coverage(model)
    block_weights = sum(layer.numel for layer in ModelAdapter(model).prunable_layers().values())
    assert coverage.targeted == block_weights
    assert coverage.kinds["attention"].fraction == 1.0
    assert coverage.kinds["mlp"].fraction == 1.0
    assert coverage.kinds["attention"].achieved == pytest.approx(0.5)
    assert coverage.kinds["embeddings"].fraction == 0.0  # tied lm_head is the embedding: left out by design
    assert coverage.warnings == [] and result.warnings == []
    assert [item.name for item in coverage.left_out] == ["model.embed_tokens.weight"]
    summary = result.summary()
    assert "coverage: attention 100% pruned" in summary and "mlp 100% pruned" in summary
    assert "warning" not in summary


def test_mixtral_unpruned_experts_are_reported():
    model = build_tiny_moe("mixtral")
    sw.prune(model, "magnitude", 0.5, progress=False, exclude=[r"experts\."])
    coverage = model_coverage(model, get_records(model))
    experts = coverage.kinds["experts"]
    assert experts.targeted == 0 and experts.params > 0.5 * coverage.total_params
    assert coverage.kinds["router"].targeted == 0  # the router is never pruned by default
    missing = {item.name for item in coverage.left_out if item.kind == "experts"}
    assert missing == {f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")}
    assert len(coverage.warnings) == 1 and coverage.warnings[0].startswith("experts: 4 large parameter(s)")


def test_t5_encoder_left_out_is_reported():
    model = build_tiny_t5()
    sw.prune(model, "magnitude", 0.5, progress=False, blocks=[f"decoder.block.{i}" for i in range(2)])
    coverage = model_coverage(model, get_records(model))
    assert 0 < coverage.kinds["attention"].fraction < 1 and 0 < coverage.kinds["mlp"].fraction < 1
    left = {item.name for item in coverage.left_out}
    assert "encoder.block.0.layer.0.SelfAttention.q.weight" in left
    assert not any(name.startswith("decoder.block") for name in left)
    assert any(note.startswith("attention:") and "encoder.block.0" in note for note in coverage.warnings)
    assert any(note.startswith("mlp:") for note in coverage.warnings)


def test_record_of_an_expert_slice_covers_part_of_the_fused_parameter():
    from sparsewise.records import LayerRecord

    model = build_tiny_moe("mixtral")
    name = "model.layers.0.mlp.experts.down_proj"
    shape = tuple(model.get_parameter(name).shape[1:])
    records = {f"{name}.1": LayerRecord(f"{name}.1", "unstructured", 0.5, 0.5, "magnitude", shape),
               "model.layers.9.nothing": LayerRecord("model.layers.9.nothing", "unstructured", 0.5, 0.5, "m", (2, 2))}
    coverage = model_coverage(model, records)
    assert coverage.kinds["experts"].targeted == shape[0] * shape[1]
    assert name not in {item.name for item in coverage.left_out}
    assert coverage.unmatched == ["model.layers.9.nothing"]
    assert any("name no parameter" in note for note in coverage.warnings)


def test_report_shows_coverage(tmp_path):
    model = build_tiny_moe("mixtral")
    sw.prune(model, "magnitude", 0.5, progress=False, exclude=[r"experts\."])
    sw.save(model, tmp_path / "m")
    report = checkpoint_report(tmp_path / "m")
    summary = report.summary()
    assert "coverage" in summary and "attention 100% pruned" in summary
    assert "warning      experts: 4 large parameter(s)" in summary
    assert report.to_json()["coverage"]["kinds"]["experts"]["targeted"] == 0
    assert "experts: 4 large" in report.to_html()
