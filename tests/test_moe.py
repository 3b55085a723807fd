"""Mixture-of-experts models: every expert matrix of a fused 3-D parameter is a prunable layer."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB
from tiny_moe import EXPERTS, MOE_FAMILIES, build_tiny_moe
from torch import nn

import sparsewise as sw
from sparsewise.errors import ConfigError
from sparsewise.models import ModelAdapter
from sparsewise.models.adapters import ExpertLayer
from sparsewise.models.coverage import model_coverage
from sparsewise.models.experts import all_token_experts, calibrate_all_experts
from sparsewise.patterns import Pattern, check_mask
from sparsewise.records import get_records


def expert_layers(model) -> dict[str, ExpertLayer]:
    return {name: layer for name, layer in ModelAdapter(model).prunable_layers().items()
            if isinstance(layer, ExpertLayer)}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_expert_matrix_is_a_layer(family):
    model = build_tiny_moe(family)
    layers = expert_layers(model)
    experts = model.model.layers[0].mlp.experts
    gate_up, down = experts.gate_up_proj, experts.down_proj
    assert len(layers) == 2 * 2 * EXPERTS  # blocks x (gate_up, down) x experts
    first = layers["model.layers.0.mlp.experts.gate_up_proj.3"]
    stored = tuple(gate_up.shape[1:])  # [out, in], or [in, out] when the experts say is_transposed (gpt-oss)
    assert (first.out_features, first.in_features) == (stored[::-1] if experts.is_transposed else stored)
    assert first.in_features == model.config.hidden_size  # gate_up reads the hidden state, down writes it
    assert first.get_weight().data_ptr() == gate_up[3].data_ptr()  # a view, no copy
    names = ModelAdapter(model).prunable_layers()
    assert not any(name.endswith((".gate", "shared_expert_gate")) for name in names)  # routers stay dense
    assert f"model.layers.1.mlp.experts.down_proj.{EXPERTS - 1}" in layers
    last_down = layers["model.layers.1.mlp.experts.down_proj.0"]
    assert last_down.in_features == down.shape[1 if experts.is_transposed else 2]
    assert last_down.out_features == model.config.hidden_size


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_expert_layer_is_the_matrix_the_forward_multiplies(implementation):
    """Routing every token to expert e must equal act(x Wg^T) * (x Wu^T) Wd^T with the layers' [out, in]."""
    model = build_tiny_moe("mixtral")
    model.config._experts_implementation = implementation
    experts = model.model.layers[0].mlp.experts
    layers = expert_layers(model)
    x = torch.randn(5, experts.gate_up_proj.shape[2])
    for expert in (0, EXPERTS - 1):
        routed = experts(x, torch.full((5, 1), expert), torch.ones(5, 1))
        gate_up = layers[f"model.layers.0.mlp.experts.gate_up_proj.{expert}"].get_weight()
        down = layers[f"model.layers.0.mlp.experts.down_proj.{expert}"].get_weight()
        gate, up = (x @ gate_up.T).chunk(2, dim=-1)
        manual = (experts.act_fn(gate) * up) @ down.T
        torch.testing.assert_close(routed, manual, rtol=1e-5, atol=1e-5)


def test_set_weight_writes_only_its_slice():
    model = build_tiny_moe("mixtral")
    layer = expert_layers(model)["model.layers.0.mlp.experts.down_proj.2"]
    fused = model.model.layers[0].mlp.experts.down_proj
    before = fused.detach().clone()
    layer.set_weight(torch.zeros(layer.out_features, layer.in_features))
    assert torch.count_nonzero(fused[2]) == 0
    torch.testing.assert_close(fused[[0, 1, 3]], before[[0, 1, 3]], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="expected"):
        layer.set_weight(torch.zeros(layer.in_features, layer.out_features))
    gradient = torch.randn_like(fused)  # shaped like the fused parameter: to_rows gives this expert's rows
    assert torch.equal(layer.to_rows(gradient), gradient[2])


def test_to_rows_of_transposed_storage_gives_out_by_in():
    model = build_tiny_moe("gpt_oss")  # [experts, in, out]
    layer = expert_layers(model)["model.layers.0.mlp.experts.gate_up_proj.1"]
    gradient = torch.randn_like(model.model.layers[0].mlp.experts.gate_up_proj)
    assert torch.equal(layer.to_rows(gradient), gradient[1].T)
    assert layer.to_rows(gradient).shape == layer.get_weight().shape


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize(("method", "pattern"), [("magnitude", "unstructured"), ("magnitude", "2:4"),
                                                 ("random", "unstructured")])
def test_data_free_methods_prune_every_expert(family, method, pattern, tmp_path):
    model = build_tiny_moe(family)
    sw.prune(model, method, 0.5, pattern=pattern, progress=False)
    records = get_records(model)
    layers = expert_layers(model)
    assert set(layers) <= set(records)
    parsed = Pattern.parse(pattern)
    for name, layer in layers.items():
        weight = layer.get_weight()
        assert (weight == 0).float().mean().item() == pytest.approx(0.5), name
        assert records[name].achieved == pytest.approx(0.5)
        if parsed.kind == "nm":
            assert check_mask(weight != 0, parsed), name
        assert torch.equal(records[name].mask, weight != 0)
    coverage = model_coverage(model, records)
    assert coverage.kinds["experts"].fraction == 1.0 and coverage.kinds["experts"].achieved == pytest.approx(0.5)
    assert coverage.warnings == []
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()

    sw.save(model, tmp_path / "m")
    loaded = sw.load(tmp_path / "m")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    loaded_records = get_records(loaded)
    for name in layers:
        assert torch.equal(loaded_records[name].mask, records[name].mask), name
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)


def test_saved_experts_are_compressed(tmp_path):
    import json

    model = build_tiny_moe("mixtral")
    sw.prune(model, "magnitude", None, pattern="2:4", progress=False)
    sw.save(model, tmp_path / "m")
    tensors = json.loads((tmp_path / "m" / "sparsewise.json").read_text())["tensors"]
    entry = tensors["model.layers.0.mlp.experts.gate_up_proj"]
    assert entry["storage"] == "nm" and entry["shape"] == list(model.model.layers[0].mlp.experts.gate_up_proj.shape)


def _calibration():
    return torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize(("method", "sequential", "pattern"), [
    ("wanda", "layer", "unstructured"), ("wanda", "block", "2:4"),
    ("sparsegpt", "layer", "2:4"), ("sparsegpt", "block", "unstructured")])
def test_calibrated_methods_see_the_tokens_routed_to_each_expert(family, method, sequential, pattern):
    model = build_tiny_moe(family)
    implementation = model.config._experts_implementation
    result = sw.prune(model, method, 0.5, pattern=pattern, calibration=_calibration(), progress=False,
                      sequential=sequential)
    assert model.config._experts_implementation == implementation  # eager only while observed
    layers = expert_layers(model)
    assert set(layers) <= set(result.records)
    tokens = model.config.num_experts_per_tok * _calibration().numel()
    for block in range(2):
        routed = [result.records[f"model.layers.{block}.mlp.experts.gate_up_proj.{e}"].info["tokens"]
                  for e in range(EXPERTS)]
        assert sum(routed) == tokens and all(0 < count < tokens for count in routed)  # routed, not all
        for e in range(EXPERTS):  # gate_up and down of one expert see the same tokens
            assert result.records[f"model.layers.{block}.mlp.experts.down_proj.{e}"].info["tokens"] == routed[e]
    for name, layer in layers.items():
        assert (layer.get_weight() == 0).float().mean().item() == pytest.approx(0.5), name
        if pattern == "2:4":
            assert check_mask(layer.get_weight() != 0, Pattern.parse(pattern)), name
    assert all_token_experts(model) == []
    with torch.no_grad():
        assert torch.isfinite(model(_calibration()).logits).all()
    assert not any(matrix._forward_pre_hooks or matrix._forward_hooks
                   for matrix in (layer.module for layer in layers.values()))  # hooks all removed


def test_calibrated_prune_of_an_expert_matches_a_prune_on_its_routed_tokens():
    """The statistics of an expert are those of exactly the tokens the router sent it."""
    from sparsewise.calibration.stats import LayerStats
    from sparsewise.methods import LayerTask, get_method

    model = build_tiny_moe("mixtral")
    reference = build_tiny_moe("mixtral")
    sw.prune(model, "wanda", 0.5, calibration=_calibration(), progress=False, sequential="block",
             include=[r"experts\."])
    mlp = reference.model.layers[0].mlp
    seen = {}
    mlp.register_forward_pre_hook(lambda _m, args: seen.update(x=args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        reference(_calibration())
        _, _, chosen = mlp.gate(seen["x"])
    expert = 2
    routed = seen["x"][(chosen == expert).any(-1)]
    stats = LayerStats(routed.shape[1], get_method("wanda").needs)
    stats.update(routed)
    weight = reference.model.layers[0].mlp.experts.gate_up_proj[expert].detach()
    task = LayerTask("x", weight.clone(), 0.5, Pattern.parse("unstructured"), stats, torch.Generator(), {})
    expected = get_method("wanda").prune_layer(task).weight
    torch.testing.assert_close(model.model.layers[0].mlp.experts.gate_up_proj[expert].detach(), expected)


def test_an_expert_the_router_never_picks_is_calibrated_on_all_tokens():
    model = build_tiny_moe("mixtral")
    for layer in model.model.layers:
        router = layer.mlp.gate
        original = router.forward

        def never_three(hidden, original=original):
            logits, _, _ = original(hidden)
            logits = logits.clone()
            logits[:, 3] = float("-inf")
            scores, indices = torch.topk(logits.softmax(-1), 2, dim=-1)
            return logits, scores / scores.sum(-1, keepdim=True), indices

        router.forward = never_three
    result = sw.prune(model, "sparsegpt", 0.5, calibration=_calibration(), progress=False)
    assert set(all_token_experts(model)) == {f"model.layers.{block}.mlp.experts.{p}.3"
                                             for block in range(2) for p in ("gate_up_proj", "down_proj")}
    assert result.records["model.layers.0.mlp.experts.gate_up_proj.3"].info["tokens"] == _calibration().numel()
    for name, layer in expert_layers(model).items():
        assert (layer.get_weight() == 0).float().mean().item() == pytest.approx(0.5), name


def test_calibrate_all_experts_sends_every_token_to_every_expert():
    model = build_tiny_moe("qwen3_moe")
    with calibrate_all_experts():
        result = sw.prune(model, "sparsegpt", 0.5, calibration=_calibration(), progress=False)
    for name, record in result.records.items():
        if "experts" in name:
            assert record.info["tokens"] == _calibration().numel(), name
    assert result.measure_coverage(model).kinds["experts"].fraction == 1.0


def test_the_all_experts_option_of_prune_matches_the_context_manager():
    routed = sw.prune(build_tiny_moe("qwen3_moe"), "sparsegpt", 0.5, calibration=_calibration(), progress=False)
    model = build_tiny_moe("qwen3_moe")
    result = sw.prune(model, "sparsegpt", 0.5, calibration=_calibration(), all_experts=True, progress=False)
    expert_tokens = [record.info["tokens"] for name, record in result.records.items() if "experts" in name]
    assert expert_tokens and set(expert_tokens) == {_calibration().numel()}
    assert any(record.info["tokens"] < _calibration().numel()
               for name, record in routed.records.items() if "experts" in name)  # routed-only by default
    with calibrate_all_experts():
        reference = sw.prune(build_tiny_moe("qwen3_moe"), "sparsegpt", 0.5, calibration=_calibration(), progress=False)
    for name, record in result.records.items():
        assert torch.equal(record.mask, reference.records[name].mask), name


def test_an_unobservable_experts_forward_is_refused():
    """A forward that multiplies the whole 3-D tensor at once cannot be split per expert: say so."""
    model = build_tiny_moe("mixtral")
    experts = model.model.layers[0].mlp.experts

    def einsum_forward(hidden, top_k_index, top_k_weights):
        return torch.einsum("eoi,ti->to", experts.down_proj, torch.zeros(hidden.shape[0], experts.down_proj.shape[2]))

    experts.forward = einsum_forward
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ConfigError, match="routed to each expert cannot be observed"):
        sw.prune(model, "wanda", 0.5, calibration=_calibration(), progress=False)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # restored


# ------------------------------------------------------------------ expert dropping (structured)


def test_experts_to_keep_drops_the_least_selected_per_group():
    from sparsewise.methods.expert_drop import experts_to_keep

    assert experts_to_keep(torch.tensor([5.0, 1, 3, 1]), 0.5).tolist() == [True, False, True, False]
    assert experts_to_keep(torch.tensor([5.0, 1, 3, 0]), 0.25).tolist() == [True, True, True, False]
    # two routing groups [0, 1] and [2, 3]: one expert goes from each, even where a group is busier
    assert experts_to_keep(torch.tensor([5.0, 4, 3, 0]), 0.5, groups=2).tolist() == [True, False, True, False]
    with pytest.raises(ConfigError, match="equal routing groups"):
        experts_to_keep(torch.ones(4), 0.5, groups=3)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_drop_removes_the_least_routed_experts(family, tmp_path):
    model = build_tiny_moe(family)
    sw.prune(model, "magnitude", 0.5, progress=False)  # masks first: their records must follow the experts
    result = sw.prune(model, "expert_drop", 0.25, calibration=_calibration(), progress=False)
    kept = EXPERTS - 1
    for block in range(2):
        name = f"model.layers.{block}.mlp.experts"
        facts = result.removed["blocks"][name]
        selections = facts["selections"]
        assert sum(selections) == model.config.num_experts_per_tok * _calibration().numel()
        assert len(facts["dropped"]) == 1 and selections[facts["dropped"][0]] == min(selections)
        experts = model.get_submodule(name)
        assert experts.gate_up_proj.shape[0] == experts.down_proj.shape[0] == kept
        router = model.get_submodule(name.replace("experts", "router" if family == "gpt_oss" else "gate"))
        assert router.weight.shape[0] == kept and experts.num_experts == kept
    counts = {attribute: getattr(model.config, attribute) for attribute in ("num_experts", "num_local_experts",
                                                                             "n_routed_experts")
              if hasattr(model.config, attribute)}
    assert counts and set(counts.values()) == {kept}
    assert "1 of 4 experts dropped in each of 2 MoE layers" in result.summary()
    assert result.removed["params_removed"] > 0
    records = get_records(model)
    layers = expert_layers(model)
    assert len(layers) == 2 * 2 * kept and set(layers) <= set(records)
    for name, layer in layers.items():  # renumbered records still describe their slices
        assert torch.equal(records[name].mask, layer.get_weight() != 0), name
    ids = _calibration()
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)

    sw.save(model, tmp_path / "m")
    loaded = sw.load(tmp_path / "m")  # rebuilt from the saved config, which counts the remaining experts
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    if family == "mixtral":
        with pytest.raises(sw.errors.CheckpointError, match="expert_drop"):
            sw.load(tmp_path / "m", model=build_tiny_moe(family))  # the original architecture no longer fits


def test_expert_drop_refuses_to_leave_fewer_experts_than_top_k():
    model = build_tiny_moe("qwen3_moe")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ConfigError, match="top-k = 2"):
        sw.prune(model, "expert_drop", 0.75, calibration=_calibration(), progress=False)
    assert {name: tensor.shape for name, tensor in model.state_dict().items()} == {
        name: tensor.shape for name, tensor in before.items()}


def test_expert_drop_needs_a_moe_model():
    from conftest import build_tiny

    with pytest.raises(ConfigError, match="no routed mixture-of-experts"):
        sw.prune(build_tiny("llama"), "expert_drop", 0.25, calibration=_calibration(), progress=False)


def test_accelerate_keeps_expert_matrices_masked_dense_and_says_so():
    from sparsewise.runtime import accelerate
    from sparsewise.runtime.accelerate import EXPERTS_DENSE

    model = build_tiny_moe("qwen2_moe")
    sw.prune(model, "magnitude", 0.5, progress=False)
    ids = _calibration()[:1]
    with torch.no_grad():
        before = model(ids).logits
    report = accelerate(model, rows=None)  # untimed: every pruned linear swapped
    experts = list(expert_layers(model))
    assert all(report.skipped[name] == EXPERTS_DENSE for name in experts)
    assert report.swapped and not any("experts." in name for name in report.swapped)
    assert f"{len(experts)} pruned expert matrices in 4 fused expert parameters stay in masked dense form" in \
        report.summary()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("family", "allocation", "options"), [("gpt_oss", "owl", {"lam": 0.1}),
                                                                 ("mixtral", "ecoflap", {})])
def test_allocation_gives_every_expert_matrix_its_ratio(family, allocation, options):
    model = build_tiny_moe(family)
    result = sw.prune(model, "wanda", 0.5, calibration=_calibration(), allocation=allocation,
                      allocation_options=options, progress=False)
    layers = expert_layers(model)
    assert set(layers) <= set(result.records)
    ratios = {name: result.records[name].sparsity for name in layers}
    assert len(set(ratios.values())) > 1  # the allocator moved the expert layers off the uniform 50%
    for name, layer in layers.items():  # each expert matrix pruned to its own planned ratio
        zeros = (layer.get_weight() == 0).float().mean().item()
        assert zeros == pytest.approx(ratios[name], abs=1 / layer.in_features), name
    assert result.achieved_sparsity == pytest.approx(0.5, abs=1e-3)  # the weighted mean hits the target
    experts = result.measure_coverage(model).kinds["experts"]
    assert experts.fraction == 1.0 and experts.achieved == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("method", ["teal", "wina"])
def test_activation_sparsity_reaches_the_routed_input_of_every_expert(method):
    model = build_tiny_moe("gpt_oss")
    ids = _calibration()
    with torch.no_grad():
        dense = model(ids).logits
    handle = sw.sparsify_activations(model, method, 0.5, calibration=ids)
    experts = set(expert_layers(model))
    assert experts <= {hook.site.name for hook in handle.hooks}
    measured = handle.measure([{"input_ids": ids}])
    for name in experts:  # thresholds from the routed tokens, met on them
        assert measured[name] == pytest.approx(0.5, abs=0.15), name
    with torch.no_grad():
        sparse = model(ids).logits
    assert torch.isfinite(sparse).all() and not torch.equal(sparse, dense)
    sw.remove_activation_sparsity(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense)  # detached: the experts forward is unobserved again


def test_gate_activation_methods_refuse_routed_experts():
    model = build_tiny_moe("qwen2_moe")  # its shared expert has an act_fn: the routed ones must not pass silently
    with pytest.raises(sw.errors.UnsupportedModelError, match="use an input method"):
        sw.sparsify_activations(model, "cats", 0.5, calibration=_calibration())


class _ListMoE(nn.Module):
    """A plain MoE layer: per-expert MLPs in a ModuleList, a linear gate returning logits (top-2)."""

    def __init__(self, width: int = 16, experts: int = 4) -> None:
        super().__init__()
        self.top_k = 2
        self.gate = nn.Linear(width, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
                                     for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.gate(x).softmax(-1).topk(self.top_k, dim=-1)
        out = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            hit = (chosen == index).any(-1)
            share = (weights * (chosen == index)).sum(-1, keepdim=True)
            out[hit] += share[hit] * expert(x[hit])
        return x + out


class _ListMoEModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.layers = nn.ModuleList(_ListMoE() for _ in range(2))
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.head(hidden)


def test_expert_drop_slices_an_expert_module_list_counted_from_gate_logits():
    torch.manual_seed(0)
    model = _ListMoEModel().eval()
    kept_modules = list(model.layers[0].experts)
    result = sw.prune(model, "expert_drop", 0.5, calibration=_calibration(), progress=False)
    facts = result.removed["blocks"]["layers.0.experts"]
    assert sum(facts["selections"]) == 2 * _calibration().numel()  # top-2 of the gate's logits
    dropped = facts["dropped"]
    assert sorted(facts["selections"])[:2] == sorted(facts["selections"][i] for i in dropped)
    layer = model.layers[0]
    assert len(layer.experts) == 2 and layer.gate.weight.shape == (2, 16) and layer.gate.out_features == 2
    assert list(layer.experts) == [module for i, module in enumerate(kept_modules) if i not in dropped]
    with torch.no_grad():
        assert torch.isfinite(model(_calibration())).all()


def test_expert_drop_keeps_group_limited_routing_groups_equal():
    """DeepSeek-V3 routes within n_group contiguous groups: each group loses the same number."""
    import transformers as tf
    from tiny_moe import tiny_moe_config

    config = tiny_moe_config("deepseek_v3")
    config.n_routed_experts, config.n_group, config.topk_group = 8, 2, 1
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    result = sw.prune(model, "expert_drop", 0.25, calibration=_calibration(), progress=False)
    for facts in result.removed["blocks"].values():
        assert len(facts["dropped"]) == 2 and sorted(index // 4 for index in facts["dropped"]) == [0, 1]
    assert model.config.n_routed_experts == 6 and model.model.layers[0].mlp.gate.e_score_correction_bias.shape == (6,)
    with torch.no_grad():
        assert torch.isfinite(model(_calibration()).logits).all()
