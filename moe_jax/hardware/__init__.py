"""Hardware presets (peak FLOP/s, HBM, links, with sources) and the GPU compile targets shipped
beside them (`targets/`).
"""
