"""Running the sharded model for real: serving runs, sharded-vs-unsharded verification,
multi-process clusters, numerical health.
"""
