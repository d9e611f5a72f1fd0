"""The Flax NNX MoE decoder: layers, MoE dispatch, the layer stack, the pipeline over `pp`.

What a model is built for (the target's kernels, pipelined or not) is an
`moe_jax.model.execution.Execution` given to its constructor, never read from ambient state.
"""
