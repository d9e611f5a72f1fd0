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


def stack_layers(src: Source, cfg: ModelConfig) -> range:
    """The Hugging Face layer indices of a per-layer source's stack (its parameter's leading axis, in order)."""
    count = cfg.first_dense_layers if src.path.startswith("dense_blocks/") else cfg.num_layers - src.first_layer
    return range(src.first_layer, src.first_layer + count)


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


def _deepseek_v3_sources(cfg: ModelConfig) -> list[Source]:
    """DeepSeek-V3: MLA in every layer; dense SwiGLU FFNs in the first ``first_dense_layers`` (our ``dense_blocks``
    stack), then MoE layers with a sigmoid router, its score-correction bias and shared experts (``blocks``)."""
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
    out = _global_sources(cfg) + _mla_sources(cfg, "blocks", k) + [dataclasses.replace(s, first_layer=k) for s in moe]
    if k:
        out += _mla_sources(cfg, "dense_blocks", 0) + [
            Source("dense_blocks/ffn_norm/scale", "model.layers.{l}.post_attention_layernorm.weight", (D,), (0,), (1,)),
            Source("dense_blocks/ffn/w_gate_up_pfd", (f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"), (Fd, D),
                   (0, 1), (1, 1)),
            Source("dense_blocks/ffn/w_down_df", f"{mlp}.down_proj.weight", (D, Fd), (0, 1), (1, 1))]
    return out


def sources(cfg: ModelConfig) -> list[Source]:
    """The name and layout mapping of `cfg`'s family."""
    D, H, K, Dh, E, F, V = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_experts,
                            cfg.expert_ffn, cfg.vocab_size)
    layer = "model.layers.{l}"
    if cfg.family == "deepseek_v3":
        return _deepseek_v3_sources(cfg)
    if cfg.family == "mixtral":
        moe, gate, up, down, router = ("block_sparse_moe", "w1", "w3", "w2", "block_sparse_moe.gate")
    elif cfg.family in ("qwen3_moe", "olmoe"):
        moe, gate, up, down, router = ("mlp", "gate_proj", "up_proj", "down_proj", "mlp.gate")
    else:
        raise MoeJaxError(f"model family {cfg.family!r} has no Hugging Face checkpoint format; "
                          "supported: qwen3_moe, mixtral, olmoe, deepseek_v3")
    out = [
        Source("embed_vd", "model.embed_tokens.weight", (V, D), (0, 1), (1, 1), per_layer=False),
        Source("final_norm/scale", "model.norm.weight", (D,), (0,), (1,), per_layer=False),
        Source("blocks/attn_norm/scale", f"{layer}.input_layernorm.weight", (D,), (0,), (1,)),
        Source("blocks/moe_norm/scale", f"{layer}.post_attention_layernorm.weight", (D,), (0,), (1,)),
        Source("blocks/attn/wq_hkd", f"{layer}.self_attn.q_proj.weight", (H, Dh, D), (0, 1, 2), (2, 1)),
        Source("blocks/attn/wk_kkd", f"{layer}.self_attn.k_proj.weight", (K, Dh, D), (0, 1, 2), (2, 1)),
        Source("blocks/attn/wv_kkd", f"{layer}.self_attn.v_proj.weight", (K, Dh, D), (0, 1, 2), (2, 1)),
        Source("blocks/attn/wo_dhk", f"{layer}.self_attn.o_proj.weight", (D, H, Dh), (0, 1, 2), (1, 2)),
        Source("blocks/moe/router_de", f"{layer}.{router}.weight", (E, D), (1, 0), (1, 1)),
        Source("blocks/moe/w_gate_up_epfd", (f"{layer}.{moe}.experts.{{e}}.{gate}.weight",
                                            f"{layer}.{moe}.experts.{{e}}.{up}.weight"), (F, D), (0, 1), (1, 1),
               per_expert=True),
        Source("blocks/moe/w_down_edf", f"{layer}.{moe}.experts.{{e}}.{down}.weight", (D, F), (0, 1), (1, 1),
               per_expert=True),
    ]
    if not cfg.tie_embeddings:
        out.append(Source("head_dv", "lm_head.weight", (V, D), (1, 0), (1, 1), per_layer=False))
    if cfg.qk_norm == "head":
        out += [Source("blocks/attn/q_norm/scale", f"{layer}.self_attn.q_norm.weight", (Dh,), (0,), (1,)),
                Source("blocks/attn/k_norm/scale", f"{layer}.self_attn.k_norm.weight", (Dh,), (0,), (1,))]
    elif cfg.qk_norm == "full":
        out += [Source("blocks/attn/q_norm/scale", f"{layer}.self_attn.q_norm.weight", (H, Dh), (0, 1), (2,)),
                Source("blocks/attn/k_norm/scale", f"{layer}.self_attn.k_norm.weight", (K, Dh), (0, 1), (2,))]
    return out


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
"""The safetensors dtypes a weight may be stored in (cast to the model's dtype when read)."""


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file or sharded with an index), opened lazily."""

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
        self._handles, self.location = {}, {}
        for name in files:
            try:
                handle = safe_open(str(d / name), framework="numpy")
            except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
                raise MoeJaxError(f"cannot read {str(d / name)!r}: {e}") from None
            self._handles[name] = handle
            for key in handle.keys():
                self.location[key] = name

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name` as stored."""
        return tuple(self._handles[self.location[name]].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """Tensor `name`'s dtype as safetensors names it (``BF16``, ``F32``, ``I32`` ...)."""
        return str(self._handles[self.location[name]].get_slice(name).get_dtype())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """The slice `index` of tensor `name` (only those bytes are read)."""
        return np.asarray(self._handles[self.location[name]].get_slice(name)[index])


def _hf_index(src: Source, ours: tuple[slice, ...]) -> tuple[tuple[slice, ...], tuple[int, ...]]:
    """Map a slice of our (per-layer) dims to a slice of the HF tensor, and the sliced split shape."""
    split_slices = [slice(None)] * len(src.split)
    for our_dim, split_dim in enumerate(src.perm):
        split_slices[split_dim] = ours[our_dim]
    bounds = [s.indices(n) for s, n in zip(split_slices, src.split, strict=True)]
    hf, k = [], 0
    for count in src.groups:
        dims = list(range(k, k + count))
        for inner in dims[1:]:                              # inner split dims are never sliced (Dh)
            if bounds[inner][:2] != (0, src.split[inner]):
                raise MoeJaxError(f"{src.path}: a shard slices inside {src.name}'s split dimension {inner}")
        inner_size = math.prod(src.split[i] for i in dims[1:])
        start, stop, _ = bounds[dims[0]]
        hf.append(slice(start * inner_size, stop * inner_size))
        k += count
    return tuple(hf), tuple(b[1] - b[0] for b in bounds)


def _layer_block(ckpt: Checkpoint, src: Source, name: str, ours: tuple[slice, ...]) -> np.ndarray:
    index, shape = _hf_index(src, ours)
    return ckpt.read(name, index).reshape(shape).transpose(src.perm)


def check_checkpoint(ckpt: Checkpoint, cfg: ModelConfig) -> None:
    """Every expected tensor is present with its shape, and nothing else is there."""
    expected = {}
    for src in sources(cfg):
        layers = stack_layers(src, cfg) if src.per_layer else [None]
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
    if cfg.family == "deepseek_v3":   # the multi-token-prediction module past the last layer: unused (as transformers)
        unexpected = [n for n in unexpected if not _is_mtp(n, cfg.num_layers)]
    if unexpected:
        raise MoeJaxError(f"checkpoint has {len(unexpected)} tensor(s) this model does not use, first "
                          f"{unexpected[0]!r}")


def _is_mtp(name: str, num_layers: int) -> bool:
    """Whether `name` belongs to a layer past the model's (DeepSeek-V3's MTP module, ``model.layers.61.*``)."""
    parts = name.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= num_layers


def load_params(directory: str | Path, cfg: ModelConfig, param_shardings, abstract_params):
    """Parameters of `cfg` from a checkpoint, each device reading only its shard.

    param_shardings/abstract_params: from `ShardedModel` (or any matching trees).
    """
    import jax

    ckpt = Checkpoint(directory)
    check_checkpoint(ckpt, cfg)
    by_path = {src.path: src for src in sources(cfg)}
    dtype = np.dtype(jax.numpy.dtype(cfg.dtype))

    def build(path, var, sharding):
        src = by_path.get(path)
        if src is None:
            raise MoeJaxError(f"no checkpoint tensor maps to parameter {path}")

        lead = (1 if src.per_layer else 0) + (1 if src.per_expert else 0)

        def block(index, **at):
            """Our block past the layer/expert dims: one tensor's slice, or the stacked tensors' slices."""
            if not src.stacked:
                return _layer_block(ckpt, src, src.name.format(**at), tuple(index[lead:]))
            parts = range(*index[lead].indices(len(src.names)))
            return np.stack([_layer_block(ckpt, src, src.names[i].format(**at), tuple(index[lead + 1:]))
                             for i in parts])

        def shard(index):
            if not src.per_layer:
                return block(index).astype(dtype)
            layers = range(*index[0].indices(var.shape[0]))
            blocks = []
            for layer in layers:
                hf_layer = layer + src.first_layer
                if src.per_expert:
                    experts = range(*index[1].indices(var.shape[1]))
                    blocks.append(np.stack([block(index, l=hf_layer, e=e) for e in experts]))
                else:
                    blocks.append(block(index, l=hf_layer))
            return np.stack(blocks).astype(dtype)

        return jax.make_array_from_callback(var.shape, sharding, shard)

    from moe_jax.parallel.rules import _path_str, map_params

    flat, _ = jax.tree_util.tree_flatten_with_path(param_shardings,
                                                   is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    shard_tree = {_path_str(p): s for p, s in flat}
    return map_params(abstract_params, lambda path, var: var.replace(build(path, var, shard_tree[path])))


def save_params(params, cfg: ModelConfig, directory: str | Path) -> Path:
    """Write parameters as a Hugging Face checkpoint (config.json + model.safetensors).

    Each tensor keeps its parameter's own dtype: a bf16 model is written as bf16 (safetensors' ``BF16``,
    as released checkpoints are) and loads back bit for bit; f32 norms and router stay f32.
    """
    from safetensors.numpy import save_file

    from moe_jax.config.hf import to_hf_dict
    from moe_jax.parallel.rules import map_params

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {}
    map_params(params, lambda path, var: arrays.__setitem__(path, np.asarray(var[...])))
    tensors = {}
    for src in sources(cfg):
        value = arrays[src.path]
        layers = stack_layers(src, cfg) if src.per_layer else [None]
        for layer in layers:
            per_layer = value[layer - src.first_layer] if layer is not None else value
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
