"""The engine: train state, step, loop, checkpoints, run records, pretrained loading, the
evaluation runner, the benchmark and ahead-of-time plans.

Nothing here names a pretraining method or an evaluation protocol: the engine reaches them
through their registries (`capi_jax.methods`, `capi_jax.evaluators`) and their interfaces.
"""
