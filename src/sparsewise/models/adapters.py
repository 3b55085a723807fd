"""Generic model adapters: find the repeated blocks and the prunable linears of any model.

CONTRACT (implemented by the models helper; used by calibration/oneshot/formats/metrics):

PrunableLayer
    name: str                 fully qualified module name, e.g. "model.layers.0.self_attn.q_proj"
    module: nn.Module         nn.Linear or transformers' Conv1D (GPT-2, weight stored [in, out])
    in_features / out_features: int
    get_weight() -> Tensor    the weight as [out, in] (a transposed *copy-free view* for Conv1D)
    set_weight(w: Tensor)     write a [out, in] tensor back (in place, keeping dtype/device/layout)

ModelAdapter(model, include=None, exclude=None, targets="blocks")
    model: nn.Module
    family: str               "llama", "gpt2", "opt", "phi3", "bert", "vit", ... or "generic"
    blocks: list[tuple[str, nn.Module]]   the repeated blocks in execution order, with names
    block_layers(index) -> dict[str, PrunableLayer]   prunable layers of one block, in execution order
    prunable_layers() -> dict[str, PrunableLayer]     all of them (filtered by include/exclude)
    extra_layers() -> dict[str, PrunableLayer]        linears outside blocks that were asked for
                                                      (lm_head / embeddings only when targets asks)
    Include/exclude are lists of regular expressions matched with re.search against full names.
    Raise UnsupportedModelError with a clear message when no block list can be found.
"""
