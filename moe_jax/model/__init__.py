"""The Flax NNX MoE decoder: layers, MoE dispatch, the layer stack, the pipeline over `pp`."""
