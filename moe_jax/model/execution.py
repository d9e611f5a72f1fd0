"""What a model is built for, chosen once when it is constructed: the target's kernels and the pipeline.

The forward pass reads these choices from the module it runs: nothing inside it asks the
mesh which platform it is on, or the layout whether to pipeline. The layout in force
(`moe_jax.parallel.rules.use_layout`) only says how arrays are split: which mesh axes a
logical axis maps to, the mesh a `shard_map` runs on.

`moe_jax.programs.sharded.ShardedModel` builds the record from its mesh and strategy; a
model built without one (the single-device reference) runs on jax's default backend,
unpipelined.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_jax.names import Backend

LOOP_INVARIANT_HOIST = "while-loop-invariant-code-motion"
"""The XLA pass `Kernels.loop_converts_stay_in_loops` turns off."""


@dataclass(frozen=True)
class Kernels:
    """What the compile target offers the model's programs (`for_platform` derives it from the platform)."""

    ragged_all_to_all: bool
    """`jax.lax.ragged_all_to_all` compiles (TPU, GPU). Otherwise dropless dispatch moves its rows in
    fixed dense blocks (`moe_jax.model.moe.exchange.ragged_all_to_all_dense`)."""
    grouped_matmul: bool
    """`jax.lax.ragged_dot_general` is a grouped-matmul kernel (TPU, GPU). Otherwise the experts loop
    over dense matmuls: XLA:CPU's own lowering of ragged_dot masks an [E, M, K] copy of the rows."""
    in_place_weight_einsum: bool
    """One row times a stored weight is written as a product and a sum that reads the weight in place
    (XLA:GPU: its gemm copies each layer's slice out of the stacked parameter first; see
    `moe_jax.model.layers.weight_einsum`)."""
    narrow_manual_all_reduce: bool
    """A 16-bit all-reduce inside a partially manual `shard_map` compiles. XLA:CPU crashes on one
    ("Invalid binary instruction opcode copy", in AllReducePromotion): such sums are made in f32."""
    in_place_decode_attention: bool = False
    """A decode step's attention reads the cache as stored with row reductions (`moe_jax.model.attention.
    attend_stored`) rather than batched matmuls, which XLA:GPU feeds with a copy of each layer's keys and values.
    Off on every platform: on one H200 (bench/RESULTS.md, "Decode kernels") the reductions ran at 0.2-0.4 TB/s
    and the copy and gemm were faster at every batch (qwen3-30b-a3b at batch 64: 74 against 107 ms a step)."""
    unrolled_layers: bool = False
    """Prefill and decode run their layers one after another in the program rather than as a loop
    (`moe_jax.model.stack.run_layers`): each layer's weights and cache entries are then slices at indices known
    when the program is built, which XLA:GPU's gemm fusions read where they are stored instead of copying
    them out of the stacked arrays first (and a decode step's GQA cache writes wait for the last layer). The
    GPU's, for more rows than `max_in_place_rows`; its programs take longer to compile. qwen3-30b-a3b on one
    H200 (deviceless compile): the batch-1 prefill copied 27 ms of expert weights scanned (TTFT 66.5 ms, 38.8
    unrolled). Prefill unrolls only up to `max_unrolled_prefill_rows` rows per device."""
    max_unrolled_prefill_rows: int = 8192
    """Most rows (tokens) per device a prefill runs its layers unrolled for (`unrolled_layers`). The copies it
    saves cost the same at any batch while the compute grows with it, and the unrolled program keeps more
    temporaries live: qwen3-30b-a3b at batch 64 x 2048 on one H200 gained 1% (2053 → 2034 ms) and took 27.0
    instead of 13.4 GB of activations; at batch 1 it gained 42% and took less memory."""
    fused_prefill_attention: bool = False
    """Prefill's causal attention runs as one fused kernel (`moe_jax.model.flash`: a Pallas Triton flash attention)
    instead of XLA's blockwise form, whose f32 scores go through HBM between its ops. The GPU's, for the shapes
    the kernel takes (`moe_jax.model.flash.supported`)."""
    fused_grouped_matmul: bool = False
    """Dropless experts multiply their rows with a Pallas Triton grouped matmul over row tiles of one expert each
    (`moe_jax.model.moe.grouped_kernel`) instead of `jax.lax.ragged_dot_general`, which XLA:GPU lowers as a dense
    product with every expert. The GPU's, for the widths the kernel takes (`grouped_kernel.supported`)."""
    interpret_kernels: bool = False
    """Pallas kernels run in Pallas' interpret mode: the GPU's kernels on CPU, for tests against the plain forms."""
    max_in_place_rows: int = 4
    """Most activation rows per weight matrix that `in_place_weight_einsum` multiplies in place
    (`moe_jax.model.layers.in_place_rows`); more rows take the gemm (and its copy of the layer's slice).
    Measured on one H200 (bench/RESULTS.md, "Decode kernels"): one row in place reads the weight at about
    3 TB/s, faster than the copy and gemm; mixtral-8x7b's 3 capacity slots per expert gained in place (54 against
    70 ms a step at batch 8); qwen3-30b-a3b's 5 slots per expert and 8 rows of attention projections lost
    (at batch 64, 74 against 59 ms)."""

    separate_projections: bool = False
    """XLA:GPU's dot merger is off (`compiler_options`): it joins the q, k and v projections, which share their
    input, into one gemm over their weights concatenated, so each unrolled layer's three weight slices are copied
    out of the stacked parameters every step (qwen3-30b-a3b, decode at batch 64 on one H200: 37 MB a layer
    copied, two ops); apart, each projection's gemm reads its slice in place. The GPU's."""

    native_top_k: bool = False
    """The router takes its top k with `jax.lax.top_k` (XLA:GPU: one TopK kernel) where the tokens are not split
    (`moe_jax.model.moe.route.route`), instead of k rounds of argmax (qwen3-30b-a3b: 17 small ops a layer, 10 with
    it; each costs the GPU's per-op floor in a decode step). The GPU's."""

    loop_converts_stay_in_loops: bool = False
    """XLA's while-loop-invariant code motion is off (`compiler_options`): XLA:CPU computes bf16 in f32, and its
    float normalization upcasts the dynamic-slice that picks one layer of the stacked [L, ...] weights (and KV
    cache) by converting the whole stacked operand, which the hoist then moves ahead of the layer loop: an f32
    copy of every layer's weights among the temporaries, written every call (moe-0.5b decode at batch 4: 1.8 GB,
    its pages faulted anew each step; 202 MB without the hoist, each layer converted as its slice is read).
    The analysis compile always ran without it (`moe_jax.costs.compile.CPU_ANALYSIS_OPTIONS`); the runs now
    build that same program. The CPU's."""

    @classmethod
    def for_platform(cls, platform: str) -> Kernels:
        """The kernels of a jax platform name (``cpu``, ``gpu``, ``tpu``): XLA:CPU has none of them."""
        native = platform != Backend.CPU
        gpu = platform == Backend.GPU
        return cls(ragged_all_to_all=native, grouped_matmul=native, in_place_weight_einsum=gpu,
                   narrow_manual_all_reduce=native, unrolled_layers=gpu,
                   fused_prefill_attention=gpu, fused_grouped_matmul=gpu, separate_projections=gpu,
                   native_top_k=gpu, loop_converts_stay_in_loops=platform == Backend.CPU)

    def compiler_options(self) -> dict | None:
        """XLA options the programs are compiled with (`moe_jax.programs.sharded.ShardedModel` jits with them, so
        a deviceless compile and a run on the devices build the same program); None for XLA's defaults."""
        options = {}
        if self.separate_projections:
            options["xla_gpu_dot_merger_threshold_mb"] = 0
        if self.loop_converts_stay_in_loops:
            options["xla_disable_hlo_passes"] = LOOP_INVARIANT_HOIST
        return options or None

    @classmethod
    def of_mesh(cls, mesh) -> Kernels:
        """The kernels of the platform `mesh`'s devices are (a deviceless TPU or GPU compile's devices are the
        target's, in a CPU process)."""
        return cls.for_platform(mesh.devices.flat[0].platform)

    @classmethod
    def of_process(cls) -> Kernels:
        """The kernels of jax's default backend in this process."""
        import jax

        return cls.for_platform(jax.default_backend())


@dataclass(frozen=True)
class Pipeline:
    """The layer stack pipelined over `stages` stages (the layout's stage axis), GPipe microbatches per call."""

    stages: int
    """pp."""
    prefill_microbatches: int | None = None
    """Microbatches of a prefill (and of a full forward); None for `moe_jax.model.pipeline`'s default."""
    decode_microbatches: int | None = None
    """Microbatches of a decode step; None for the default."""

    def microbatches(self, *, decode: bool) -> int | None:
        """The microbatches chosen for a decode step or a prefill, None for the default."""
        return self.decode_microbatches if decode else self.prefill_microbatches


@dataclass(frozen=True)
class Execution:
    """How a `moe_jax.model.transformer.Transformer` runs: the target's kernels, pipelined or not."""

    kernels: Kernels
    pipeline: Pipeline | None = None
    """None: the layers run as one scan on every device (no pipeline stages)."""

    @classmethod
    def local(cls) -> Execution:
        """Unpipelined, on jax's default backend: the single-device model."""
        return cls(Kernels.of_process())


SHAPES_ONLY = Execution(Kernels.for_platform(Backend.CPU))
"""For building a model only to read its parameter shapes (placement, memory guards): the parameters
do not depend on the kernels, and naming a platform keeps jax's backend unstarted, so a command can
still choose its device count afterwards."""
