"""Test-session settings, applied before any test module imports jax.

The `tpu` extra installs libtpu so that tests/test_compile.py can compile for
TPU topologies on this host; jax itself must stay on the CPU (no TPU is
attached), and the parallel test workers may each load libtpu.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
