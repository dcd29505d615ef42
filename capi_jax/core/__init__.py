"""The engine: train state, step, loop, sharding, checkpoints, optimisers, schedules.

Nothing here names a pretraining method: the engine calls the method interface
(`capi_jax.methods`) and nothing else.
"""
