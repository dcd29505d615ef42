"""Parity suites against numbers produced by the official releases, behind
`python -m capi_jax.check_reference` (`harness`: comparisons, reports; one module per fixture
kind). Nothing on the training path imports them."""
