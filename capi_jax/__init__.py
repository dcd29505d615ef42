"""capi_jax: CAPI (Cluster and Predict Latent Patches) pretraining in JAX/Flax."""
