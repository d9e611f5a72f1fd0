"""Hugging Face safetensors checkpoints ↔ moe-jax parameters, placed straight onto the mesh.

Each of our parameters is built from one Hugging Face tensor per layer (and per expert):
ours = transpose(reshape(hf, split), perm), with the layer (and expert) index in front; the
experts' gate and up projections are two tensors stacked into one parameter. Matmul weights are
stored as Hugging Face stores them, [out, in] (the contracted dimension minor: the layout the
compiled kernels read), so perm is the identity for all but the router and the output head ([in, out] here).
`load_params` asks jax for each device's shard (`jax.make_array_from_callback`) and
reads only that slice of each tensor (safetensors' lazy slicing), so no process holds
the whole model. Names, shapes and leftovers are checked: a missing, unexpected or
mis-shaped tensor is an error naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_jax.config import ModelConfig
from moe_jax.errors import MoeJaxError


@dataclass(frozen=True)
class Source:
    """Where one of our parameters comes from."""

    path: str
    """Our parameter path, e.g. ``blocks/attn/wq_hkd``."""
    name: str | tuple[str, ...]
    """Hugging Face tensor name; ``{l}`` is the layer, ``{e}`` the expert. Several names: those tensors
    (each as described by the fields below) stacked on our first dimension after layer and expert."""
    split: tuple[int, ...]
    """The HF tensor reshaped to these dims (one HF dim may split into two; the inner one is never sliced)."""
    perm: tuple[int, ...]
    """Our dims (after layer/expert) = split dims in this order."""
    groups: tuple[int, ...]
    """How many split dims each HF dim became (e.g. (2, 1): HF dim 0 → two split dims)."""
    per_layer: bool = True
    per_expert: bool = False
    first_layer: int = 0
    """The Hugging Face index of our stack's layer 0 (DeepSeek-V3's MoE stack follows its dense layers)."""
    stride: int = 1
    """Hugging Face layers between our stack's consecutive layers (``cfg.moe_interleave``: Llama 4 Maverick's MoE
    layers are every 2nd)."""
    sublayers: int = 0
    """> 0: our parameter has a second leading axis of this many sub-layers, sub-layer j of our layer g being Hugging
    Face layer first_layer + g · stride + j (the dense layers inside each interleaved group, `moe_jax.model.stack`)."""

    def hf_layer(self, layer: int, sub: int = 0) -> int:
        """The Hugging Face layer index of our stack's `layer` (and sub-layer `sub`)."""
        return self.first_layer + layer * self.stride + sub

    @property
    def names(self) -> tuple[str, ...]:
        """The Hugging Face tensor name(s) (templates with ``{l}`` and ``{e}``)."""
        return self.name if isinstance(self.name, tuple) else (self.name,)

    @property
    def stacked(self) -> bool:
        """Whether several tensors are stacked into this parameter."""
        return isinstance(self.name, tuple)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """Shape of the Hugging Face tensor (split dims of each group multiplied back)."""
        starts = np.cumsum((0,) + self.groups[:-1])
        return tuple(math.prod(self.split[k:k + c]) for k, c in zip(starts, self.groups, strict=True))


def layer_positions(src: Source, cfg: ModelConfig) -> list[tuple[tuple[int, ...], int]]:
    """A per-layer source's (index on its parameter's leading axes, Hugging Face layer) pairs, in order: one leading
    axis (the stack's layers), or two with `Source.sublayers`."""
    count = cfg.first_dense_layers if src.path.startswith("dense_blocks/") else cfg.moe_layers
    if src.sublayers:
        return [((g, j), src.hf_layer(g, j)) for g in range(count) for j in range(src.sublayers)]
    return [((g,), src.hf_layer(g)) for g in range(count)]


def _global_sources(cfg: ModelConfig) -> list[Source]:
    """Embedding, final norm and (unless tied) the output head: the same names in every family."""
    V, D = cfg.vocab_size, cfg.d_model
    out = [Source("embed_vd", "model.embed_tokens.weight", (V, D), (0, 1), (1, 1), per_layer=False),
           Source("final_norm/scale", "model.norm.weight", (D,), (0,), (1,), per_layer=False)]
    if not cfg.tie_embeddings:
        out.append(Source("head_dv", "lm_head.weight", (V, D), (1, 0), (1, 1), per_layer=False))
    return out


def _mla_sources(cfg: ModelConfig, stack: str, first: int) -> list[Source]:
    """One stack's MLA attention and its pre-attention norm (`moe_jax.model.mla.MLAttention`)."""
    D, H, Dh = cfg.d_model, cfg.num_heads, cfg.head_dim
    R, Rq, Dr, Dv = cfg.kv_lora_rank, cfg.q_lora_rank, cfg.qk_rope_head_dim, cfg.v_head_dim
    attn = "model.layers.{l}.self_attn"
    out = [Source(f"{stack}/attn_norm/scale", "model.layers.{l}.input_layernorm.weight", (D,), (0,), (1,)),
           Source(f"{stack}/attn/wkv_a_cd", f"{attn}.kv_a_proj_with_mqa.weight", (R + Dr, D), (0, 1), (1, 1)),
           Source(f"{stack}/attn/kv_norm/scale", f"{attn}.kv_a_layernorm.weight", (R,), (0,), (1,)),
           Source(f"{stack}/attn/wkv_b_hkr", f"{attn}.kv_b_proj.weight", (H, Dh - Dr + Dv, R), (0, 1, 2), (2, 1)),
           Source(f"{stack}/attn/wo_dhv", f"{attn}.o_proj.weight", (D, H, Dv), (0, 1, 2), (1, 2))]
    if Rq:
        out += [Source(f"{stack}/attn/wq_a_rd", f"{attn}.q_a_proj.weight", (Rq, D), (0, 1), (1, 1)),
                Source(f"{stack}/attn/q_norm/scale", f"{attn}.q_a_layernorm.weight", (Rq,), (0,), (1,)),
                Source(f"{stack}/attn/wq_b_hkr", f"{attn}.q_b_proj.weight", (H, Dh, Rq), (0, 1, 2), (2, 1))]
    else:
        out.append(Source(f"{stack}/attn/wq_hkd", f"{attn}.q_proj.weight", (H, Dh, D), (0, 1, 2), (2, 1)))
    return [dataclasses.replace(src, first_layer=first) for src in out]


def _gqa_sources(cfg: ModelConfig, stack: str, first: int = 0) -> list[Source]:
    """One stack's GQA attention (`moe_jax.model.layers.Attention`: projections, their biases, QK-norm) and its
    pre-attention norm, as Qwen3-MoE, Mixtral, OLMoE and GLM-4.5 name them."""
    D, H, K, Dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn = "model.layers.{l}.self_attn"
    out = [Source(f"{stack}/attn_norm/scale", "model.layers.{l}.input_layernorm.weight", (D,), (0,), (1,)),
           Source(f"{stack}/attn/wq_hkd", f"{attn}.q_proj.weight", (H, Dh, D), (0, 1, 2), (2, 1)),
           Source(f"{stack}/attn/wk_kkd", f"{attn}.k_proj.weight", (K, Dh, D), (0, 1, 2), (2, 1)),
           Source(f"{stack}/attn/wv_kkd", f"{attn}.v_proj.weight", (K, Dh, D), (0, 1, 2), (2, 1)),
           Source(f"{stack}/attn/wo_dhk", f"{attn}.o_proj.weight", (D, H, Dh), (0, 1, 2), (1, 2))]
    if cfg.attention_bias:                                  # q, k, v (o_proj's: gpt-oss, `_gpt_oss_sources`)
        out += [Source(f"{stack}/attn/bq_hk", f"{attn}.q_proj.bias", (H, Dh), (0, 1), (2,)),
                Source(f"{stack}/attn/bk_kk", f"{attn}.k_proj.bias", (K, Dh), (0, 1), (2,)),
                Source(f"{stack}/attn/bv_kk", f"{attn}.v_proj.bias", (K, Dh), (0, 1), (2,))]
    if cfg.qk_norm == "head":
        out += [Source(f"{stack}/attn/q_norm/scale", f"{attn}.q_norm.weight", (Dh,), (0,), (1,)),
                Source(f"{stack}/attn/k_norm/scale", f"{attn}.k_norm.weight", (Dh,), (0,), (1,))]
    elif cfg.qk_norm == "full":
        out += [Source(f"{stack}/attn/q_norm/scale", f"{attn}.q_norm.weight", (H, Dh), (0, 1), (2,)),
                Source(f"{stack}/attn/k_norm/scale", f"{attn}.k_norm.weight", (K, Dh), (0, 1), (2,))]
    return [dataclasses.replace(src, first_layer=first) for src in out]


def _deepseek_v3_sources(cfg: ModelConfig) -> list[Source]:
    """DeepSeek-V3 and GLM-4.5: MLA (DeepSeek-V3) or GQA (GLM-4.5) attention in every layer; dense SwiGLU FFNs in
    the first ``first_dense_layers`` (our ``dense_blocks`` stack), then MoE layers with a sigmoid router, its
    score-correction bias and shared experts (``blocks``). The two families name these tensors alike."""
    attention = _mla_sources if cfg.attention == "mla" else _gqa_sources
    D, E, F, Fs, Fd = (cfg.d_model, cfg.num_experts, cfg.expert_ffn, cfg.num_shared_experts * cfg.expert_ffn,
                       cfg.dense_ffn)
    k = cfg.first_dense_layers
    mlp = "model.layers.{l}.mlp"
    moe = [Source("blocks/moe_norm/scale", "model.layers.{l}.post_attention_layernorm.weight", (D,), (0,), (1,)),
           Source("blocks/moe/router_de", f"{mlp}.gate.weight", (E, D), (1, 0), (1, 1)),
           Source("blocks/moe/router_bias_e", f"{mlp}.gate.e_score_correction_bias", (E,), (0,), (1,)),
           Source("blocks/moe/w_gate_up_epfd", (f"{mlp}.experts.{{e}}.gate_proj.weight",
                                               f"{mlp}.experts.{{e}}.up_proj.weight"), (F, D), (0, 1), (1, 1),
                  per_expert=True),
           Source("blocks/moe/w_down_edf", f"{mlp}.experts.{{e}}.down_proj.weight", (D, F), (0, 1), (1, 1),
                  per_expert=True)]
    if Fs:
        moe += [Source("blocks/moe/shared_gate_up_pfd", (f"{mlp}.shared_experts.gate_proj.weight",
                                                        f"{mlp}.shared_experts.up_proj.weight"), (Fs, D), (0, 1),
                       (1, 1)),
                Source("blocks/moe/shared_down_df", f"{mlp}.shared_experts.down_proj.weight", (D, Fs), (0, 1), (1, 1))]
    out = _global_sources(cfg) + attention(cfg, "blocks", k) + [dataclasses.replace(s, first_layer=k) for s in moe]
    if k:
        out += attention(cfg, "dense_blocks", 0) + [
            Source("dense_blocks/ffn_norm/scale", "model.layers.{l}.post_attention_layernorm.weight", (D,), (0,), (1,)),
            Source("dense_blocks/ffn/w_gate_up_pfd", (f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"), (Fd, D),
                   (0, 1), (1, 1)),
            Source("dense_blocks/ffn/w_down_df", f"{mlp}.down_proj.weight", (D, Fd), (0, 1), (1, 1))]
    return out


def _gpt_oss_sources(cfg: ModelConfig) -> list[Source]:
    """gpt-oss (transformers' ``GptOss*`` modules): GQA with q/k/v/o biases and per-head ``sinks``; the router
    (``mlp.router``, weight and bias); the experts fused per layer, with biases: ``gate_up_proj`` [E, D, 2F] whose
    last dim interleaves gate and up (column 2f the gate, 2f + 1 the up of unit f: transformers' ``_apply_gate``
    takes ``[..., ::2]`` and ``[..., 1::2]``), ``gate_up_proj_bias`` [E, 2F] alike, ``down_proj`` [E, F, D],
    ``down_proj_bias`` [E, D]. Unquantized tensors only (MXFP4 ``_blocks``/``_scales`` are refused with
    the config, `moe_jax.config.hf`)."""
    D, E, F, H = cfg.d_model, cfg.num_experts, cfg.expert_ffn, cfg.num_heads
    attn, mlp = "model.layers.{l}.self_attn", "model.layers.{l}.mlp"
    out = _global_sources(cfg) + _gqa_sources(cfg, "blocks") + [
        Source("blocks/attn/sinks_h", f"{attn}.sinks", (H,), (0,), (1,)),
        Source("blocks/moe_norm/scale", "model.layers.{l}.post_attention_layernorm.weight", (D,), (0,), (1,)),
        Source("blocks/moe/router_de", f"{mlp}.router.weight", (E, D), (1, 0), (1, 1)),
        Source("blocks/moe/router_bias_e", f"{mlp}.router.bias", (E,), (0,), (1,)),
        # [E, D, 2F] split (E, D, F, 2): ours [E, 2, F, D] = split dims (0, 3, 2, 1)
        Source("blocks/moe/w_gate_up_epfd", f"{mlp}.experts.gate_up_proj", (E, D, F, 2), (0, 3, 2, 1), (1, 1, 2)),
        Source("blocks/moe/w_down_edf", f"{mlp}.experts.down_proj", (E, F, D), (0, 2, 1), (1, 1, 1)),
        Source("blocks/moe/b_gate_up_epf", f"{mlp}.experts.gate_up_proj_bias", (E, F, 2), (0, 2, 1), (1, 2)),
        Source("blocks/moe/b_down_ed", f"{mlp}.experts.down_proj_bias", (E, D), (0, 1), (1, 1))]
    if cfg.attention_out_bias:
        out.append(Source("blocks/attn/bo_d", f"{attn}.o_proj.bias", (D,), (0,), (1,)))
    return out


def _llama4_sources(cfg: ModelConfig) -> list[Source]:
    """Llama 4 text (transformers' ``Llama4ForCausalLM``): GQA without biases (the L2 qk-norm has no weight; the
    checkpoint's q/k rows pair up interleaved, which `moe_jax.model.layers.rope` rotates as they are), the MoE
    under ``feed_forward``: ``router`` [E, D], the experts fused per layer, ``gate_up_proj`` [E, D, 2F] (the first F
    columns the gate, the last F the up: transformers' ``chunk(2)``), ``down_proj`` [E, F, D], and the shared
    expert's gate/up/down projections. With ``cfg.moe_interleave`` I > 1 (Maverick) the MoE layers are every I-th
    (layers I − 1, 2I − 1, ...) and the I − 1 before each are dense: ``feed_forward`` a SwiGLU MLP (gate_proj,
    up_proj, down_proj: transformers' ``Llama4TextMLP``), our ``blocks/dense`` sub-layers."""
    D, E, F, Fd = cfg.d_model, cfg.num_experts, cfg.expert_ffn, cfg.dense_ffn
    Fs = cfg.num_shared_experts * F
    ff = "model.layers.{l}.feed_forward"
    step = cfg.moe_interleave
    if step > 1:
        dense = _gqa_sources(cfg, "blocks/dense") + [
            Source("blocks/dense/ffn_norm/scale", "model.layers.{l}.post_attention_layernorm.weight", (D,), (0,), (1,)),
            Source("blocks/dense/ffn/w_gate_up_pfd", (f"{ff}.gate_proj.weight", f"{ff}.up_proj.weight"), (Fd, D),
                   (0, 1), (1, 1)),
            Source("blocks/dense/ffn/w_down_df", f"{ff}.down_proj.weight", (D, Fd), (0, 1), (1, 1))]
        moe = [dataclasses.replace(src, first_layer=step - 1, stride=step) for src in _llama4_sources(
            cfg.replace(moe_interleave=1, dense_ffn=0)) if src.per_layer]
        return (_global_sources(cfg) + moe
                + [dataclasses.replace(src, stride=step, sublayers=step - 1) for src in dense])
    return _global_sources(cfg) + _gqa_sources(cfg, "blocks") + [
        Source("blocks/moe_norm/scale", "model.layers.{l}.post_attention_layernorm.weight", (D,), (0,), (1,)),
        Source("blocks/moe/router_de", f"{ff}.router.weight", (E, D), (1, 0), (1, 1)),
        # [E, D, 2F] split (E, D, 2, F): ours [E, 2, F, D] = split dims (0, 2, 3, 1)
        Source("blocks/moe/w_gate_up_epfd", f"{ff}.experts.gate_up_proj", (E, D, 2, F), (0, 2, 3, 1), (1, 1, 2)),
        Source("blocks/moe/w_down_edf", f"{ff}.experts.down_proj", (E, F, D), (0, 2, 1), (1, 1, 1)),
        Source("blocks/moe/shared_gate_up_pfd", (f"{ff}.shared_expert.gate_proj.weight",
                                                f"{ff}.shared_expert.up_proj.weight"), (Fs, D), (0, 1), (1, 1)),
        Source("blocks/moe/shared_down_df", f"{ff}.shared_expert.down_proj.weight", (D, Fs), (0, 1), (1, 1))]


def sources(cfg: ModelConfig) -> list[Source]:
    """The name and layout mapping of `cfg`'s family."""
    D, E, F = cfg.d_model, cfg.num_experts, cfg.expert_ffn
    layer = "model.layers.{l}"
    if cfg.family in ("deepseek_v3", "glm4_moe"):
        return _deepseek_v3_sources(cfg)
    if cfg.family == "gpt_oss":
        return _gpt_oss_sources(cfg)
    if cfg.family == "llama4_text":
        return _llama4_sources(cfg)
    if cfg.family == "mixtral":
        moe, gate, up, down, router = ("block_sparse_moe", "w1", "w3", "w2", "block_sparse_moe.gate")
    elif cfg.family in ("qwen3_moe", "olmoe"):
        moe, gate, up, down, router = ("mlp", "gate_proj", "up_proj", "down_proj", "mlp.gate")
    else:
        raise MoeJaxError(f"model family {cfg.family!r} has no Hugging Face checkpoint format; "
                          "supported: qwen3_moe, mixtral, olmoe, deepseek_v3, glm4_moe, gpt_oss, llama4_text")
    return _global_sources(cfg) + _gqa_sources(cfg, "blocks") + [
        Source("blocks/moe_norm/scale", f"{layer}.post_attention_layernorm.weight", (D,), (0,), (1,)),
        Source("blocks/moe/router_de", f"{layer}.{router}.weight", (E, D), (1, 0), (1, 1)),
        Source("blocks/moe/w_gate_up_epfd", (f"{layer}.{moe}.experts.{{e}}.{gate}.weight",
                                            f"{layer}.{moe}.experts.{{e}}.{up}.weight"), (F, D), (0, 1), (1, 1),
               per_expert=True),
        Source("blocks/moe/w_down_edf", f"{layer}.{moe}.experts.{{e}}.{down}.weight", (D, F), (0, 1), (1, 1),
               per_expert=True),
    ]


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
"""The safetensors dtypes a weight may be stored in (cast to the model's dtype when read)."""


TEXT_PREFIXES = ("language_model.", "model.language_model.")
"""Where a multimodal checkpoint (Llama 4's ``Llama4ForConditionalGeneration``) keeps its text model's tensors: the
released layout, and the one later transformers versions write (its head then at ``lm_head.weight``)."""
OTHER_MODALITIES = ("vision_model.", "multi_modal_projector.")
"""The multimodal checkpoint's tensors a text model does not use: the vision encoder and its projector."""


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file or sharded with an index), opened lazily.

    A multimodal checkpoint (tensors under ``language_model.``, beside ``vision_model.`` and
    ``multi_modal_projector.``: Llama 4 as released) is read as its text model: each text tensor by its name
    without the prefix, and the other modalities' tensors set aside in `other_modalities` (not read)."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        d = Path(directory)
        index = d / "model.safetensors.index.json"
        try:
            if index.exists():
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise ValueError("weight_map must map tensor names to file names")
            elif (d / "model.safetensors").exists():
                weight_map = None
            else:
                raise MoeJaxError(f"no model.safetensors or model.safetensors.index.json in {str(d)!r}")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MoeJaxError(f"{str(index)!r} is not a valid safetensors index: {e}") from None
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._handles, self.location, self._stored = {}, {}, {}
        for name in files:
            try:
                handle = safe_open(str(d / name), framework="numpy")
            except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
                raise MoeJaxError(f"cannot read {str(d / name)!r}: {e}") from None
            self._handles[name] = handle
            for key in handle.keys():
                self.location[key] = name
        self.other_modalities: list[str] = []
        """A multimodal checkpoint's tensors of other modalities (names as stored), which are not read."""
        if any(k.startswith(TEXT_PREFIXES) for k in self.location):
            self._text_model(d)

    def _text_model(self, directory: Path) -> None:
        """Read a multimodal checkpoint as its text model: ``language_model.model.X`` (``model.language_model.X``)
        as ``model.X``, ``language_model.lm_head.weight`` as ``lm_head.weight``; the other modalities' tensors set
        aside. Two stored tensors that would take one name are an error, not a silent choice."""
        other = ("model.vision_model.", "model.multi_modal_projector.", *OTHER_MODALITIES)
        self.other_modalities = sorted(k for k in self.location if k.startswith(other))
        location, stored = {}, {}
        for key, file in self.location.items():
            if key.startswith(other):
                continue
            name = key
            if key.startswith("model.language_model."):
                name = "model." + key.removeprefix("model.language_model.")
            elif key.startswith("language_model."):
                name = key.removeprefix("language_model.")
            if name in location:
                raise MoeJaxError(f"checkpoint {str(directory)!r} holds both {stored[name]!r} and {key!r}: both "
                                  f"would be the text model's {name!r}")
            location[name], stored[name] = file, key
        self.location, self._stored = location, stored

    def _slice(self, name: str):
        return self._handles[self.location[name]].get_slice(self._stored.get(name, name))

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name` as stored."""
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """Tensor `name`'s dtype as safetensors names it (``BF16``, ``F32``, ``I32`` ...)."""
        return str(self._slice(name).get_dtype())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """The slice `index` of tensor `name` (only those bytes are read)."""
        return np.asarray(self._slice(name)[index])


def _hf_index(src: Source, ours: tuple[slice, ...]) -> tuple[tuple[slice, ...], tuple[int, ...], tuple[slice, ...]]:
    """Map a slice of our (per-layer) dims to a slice of the HF tensor, the split shape it reads, and the slice
    of that to keep. An HF dim whose inner split dims are sliced (Llama 4's fused [E, D, 2F] experts split (2, F),
    F over tp) is read whole and sliced after the reshape; otherwise only the slice is read."""
    split_slices = [slice(None)] * len(src.split)
    for our_dim, split_dim in enumerate(src.perm):
        split_slices[split_dim] = ours[our_dim]
    bounds = [s.indices(n) for s, n in zip(split_slices, src.split, strict=True)]
    hf, k, shape, keep = [], 0, [], []
    for count in src.groups:
        dims = list(range(k, k + count))
        if any(bounds[i][:2] != (0, src.split[i]) for i in dims[1:]):        # an inner dim sliced: read it whole
            hf.append(slice(None))
            shape += [src.split[i] for i in dims]
            keep += [slice(*bounds[i][:2]) for i in dims]
        else:
            inner_size = math.prod(src.split[i] for i in dims[1:])
            start, stop, _ = bounds[dims[0]]
            hf.append(slice(start * inner_size, stop * inner_size))
            shape += [bounds[i][1] - bounds[i][0] for i in dims]
            keep += [slice(None)] * count
        k += count
    return tuple(hf), tuple(shape), tuple(keep)


def _layer_block(ckpt: Checkpoint, src: Source, name: str, ours: tuple[slice, ...]) -> np.ndarray:
    index, shape, keep = _hf_index(src, ours)
    return ckpt.read(name, index).reshape(shape)[keep].transpose(src.perm)


def check_checkpoint(ckpt: Checkpoint, cfg: ModelConfig) -> None:
    """Every expected tensor is present with its shape, and nothing else is there."""
    expected = {}
    for src in sources(cfg):
        layers = [hf for _, hf in layer_positions(src, cfg)] if src.per_layer else [None]
        experts = range(cfg.num_experts) if src.per_expert else [None]
        for layer in layers:
            for e in experts:
                for name in src.names:
                    expected[name.format(l=layer, e=e)] = src.hf_shape
    missing = [n for n in expected if n not in ckpt.location]
    if missing:
        raise MoeJaxError(f"checkpoint is missing {len(missing)} tensor(s), first {missing[0]!r}")
    for n, shape in expected.items():
        if ckpt.shape(n) != shape:
            raise MoeJaxError(f"tensor {n!r} has shape {ckpt.shape(n)}, expected {shape} for {cfg.name}")
    not_float = [n for n in expected if ckpt.dtype(n) not in FLOAT_DTYPES]
    if not_float:
        n = not_float[0]
        raise MoeJaxError(f"tensor {n!r} is stored as {ckpt.dtype(n)} ({len(not_float)} such tensor(s)); weights "
                          f"must be floating point ({', '.join(FLOAT_DTYPES)}): an integer tensor would be cast "
                          "silently, and a quantized checkpoint needs its own loader")
    unexpected = sorted(set(ckpt.location) - set(expected))
    if cfg.family in ("deepseek_v3", "glm4_moe"):   # their multi-token-prediction layers past the last: unused
        unexpected = [n for n in unexpected if not _is_mtp(n, cfg.num_layers)]
    if unexpected:
        raise MoeJaxError(f"checkpoint has {len(unexpected)} tensor(s) this model does not use, first "
                          f"{unexpected[0]!r}")


def _is_mtp(name: str, num_layers: int) -> bool:
    """Whether `name` belongs to a layer past the model's: the multi-token-prediction (MTP) layers of DeepSeek-V3
    (``model.layers.61.*``) and GLM-4.5 (``num_nextn_predict_layers``: ``model.layers.92.*``, Air's ``46.*``), which
    only speculative decoding uses; the served model, as transformers', ignores them."""
    parts = name.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= num_layers


def load_params(directory: str | Path, cfg: ModelConfig, param_shardings, abstract_params):
    """Parameters of `cfg` from a checkpoint, each device reading only its shard.

    param_shardings/abstract_params: from `ShardedModel` (or any matching trees).

    FP8 weights (``cfg.weight_dtype``): a weight's ``q`` and ``scale`` (`moe_jax.model.quant`) are computed from
    the checkpoint's tensor as stored (bf16, f16 or f32). A device's shard of ``q`` needs its matrices' scales,
    which depend on whole matrices: it reads the whole matrices its shard cuts into (tp-split attention and
    expert weights are read whole by each device of the split, once).
    """
    import jax

    from moe_jax.model.quant import quantize

    ckpt = Checkpoint(directory)
    check_checkpoint(ckpt, cfg)
    by_path = {src.path: src for src in sources(cfg)}
    dtype = np.dtype(jax.numpy.dtype(cfg.dtype))
    whole = (slice(None), slice(None))

    def build(path, var, sharding):
        src = by_path.get(path)
        part = None
        if src is None and path.rpartition("/")[2] in ("q", "scale"):     # an FP8 weight's values or scales
            src, part = by_path.get(path.rpartition("/")[0]), path.rpartition("/")[2]
        if src is None:
            raise MoeJaxError(f"no checkpoint tensor maps to parameter {path}")

        lead = (1 if src.per_layer else 0) + (1 if src.sublayers else 0) + (1 if src.per_expert else 0)

        def block(index, **at):
            """Our block past the layer/expert dims: one tensor's slice, or the stacked tensors' slices."""
            if not src.stacked:
                return _layer_block(ckpt, src, src.name.format(**at), tuple(index[lead:]))
            parts = range(*index[lead].indices(len(src.names)))
            return np.stack([_layer_block(ckpt, src, src.names[i].format(**at), tuple(index[lead + 1:]))
                             for i in parts])

        def shard(index):
            """Our block `index` of the weight, in the checkpoint's dtype."""
            if not src.per_layer:
                return block(index)
            layers = range(*index[0].indices(var.shape[0]))     # (an FP8 weight's scales: its leading dims too)
            blocks = []
            for layer in layers:
                hf_layer = src.hf_layer(layer)
                if src.sublayers:                               # [sub-layers, ...]: each its own HF layer
                    subs = range(*index[1].indices(var.shape[1]))
                    blocks.append(np.stack([block(index, l=src.hf_layer(layer, j)) for j in subs]))
                elif src.per_expert:
                    experts = range(*index[1].indices(var.shape[1]))
                    blocks.append(np.stack([block(index, l=hf_layer, e=e) for e in experts]))
                else:
                    blocks.append(block(index, l=hf_layer))
            return np.stack(blocks)

        def quantized(index):
            """The FP8 values (part "q") or scales ([..., 1]) of the whole matrices `index` cuts into, then the
            shard's part."""
            index = tuple(index)
            matrices = index[:-2] if part == "q" else index[:-1]
            q, scale = quantize(shard((*matrices, *whole)).astype(np.float32))
            return q[(..., *index[-2:])] if part == "q" else scale

        if part is not None:
            return jax.make_array_from_callback(var.shape, sharding, quantized)
        return jax.make_array_from_callback(var.shape, sharding, lambda index: shard(index).astype(dtype))

    from moe_jax.parallel.rules import _path_str, map_params

    flat, _ = jax.tree_util.tree_flatten_with_path(param_shardings,
                                                   is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    shard_tree = {_path_str(p): s for p, s in flat}
    return map_params(abstract_params, lambda path, var: var.replace(build(path, var, shard_tree[path])))


def save_params(params, cfg: ModelConfig, directory: str | Path) -> Path:
    """Write parameters as a Hugging Face checkpoint (config.json + model.safetensors).

    Each tensor keeps its parameter's own dtype: a bf16 model is written as bf16 (safetensors' ``BF16``,
    as released checkpoints are) and loads back bit for bit; f32 norms and router stay f32. FP8 weights are
    written dequantized, in the compute dtype (``cfg.dtype``): exact, their scales being powers of two, so an
    FP8 model loads back to the same FP8 values, and a bf16 model reads the checkpoint as any other.
    """
    import jax.numpy as jnp
    from safetensors.numpy import save_file

    from moe_jax.config.hf import to_hf_dict
    from moe_jax.parallel.rules import map_params

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {}
    map_params(params, lambda path, var: arrays.__setitem__(path, np.asarray(var[...])))
    tensors = {}
    for src in sources(cfg):
        if src.path not in arrays and f"{src.path}/q" in arrays:       # an FP8 weight (`moe_jax.model.quant`)
            q, scale = arrays[f"{src.path}/q"], arrays[f"{src.path}/scale"]
            arrays[src.path] = (q.astype(np.float32) * scale[..., None]).astype(jnp.dtype(cfg.dtype))
        value = arrays[src.path]
        layers = layer_positions(src, cfg) if src.per_layer else [((), None)]
        for lead, layer in layers:
            per_layer = value[lead]
            experts = range(cfg.num_experts) if src.per_expert else [None]
            for e in experts:
                block = per_layer[e] if e is not None else per_layer
                for i, name in enumerate(src.names):
                    part = block[i] if src.stacked else block
                    hf = np.transpose(part, np.argsort(src.perm))
                    tensors[name.format(l=layer, e=e)] = np.ascontiguousarray(hf.reshape(src.hf_shape))
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(to_hf_dict(cfg), indent=2))
    return d
