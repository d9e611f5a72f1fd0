"""The programs moe-jax serves (prefill, decode) on a mesh, what each device holds, and the guards
run before anything is built.
"""
