"""Evaluation protocols: probes, segmentation, visualisations (driven by `capi_jax.evaluate`)."""
