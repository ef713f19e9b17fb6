"""Test-session settings, applied before any test module imports jax.

The `tpu` extra installs libtpu so that tests/test_compile.py can compile for
TPU topologies on this host; jax itself must stay on the CPU (no TPU is
attached), the parallel test workers may each load libtpu, and libtpu must not
wait for a Cloud TPU metadata server that is not there.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no Cloud TPU metadata server to wait for
# The tests check results, not speed, and compiling the tiny models' programs dominates the suite: compile
# without LLVM optimisation (about half the compile time) and with XLA:CPU's older loop emitters instead of
# its MLIR fusion emitters (a third of the tiny train step's remaining compile time: 4 s instead of 12).
# Numerics stay within every test's tolerance. Tests that start subprocesses extend these flags
# (`os.environ["XLA_FLAGS"]`), so the subprocesses compile the same way.
FAST_COMPILE_FLAGS = {"--xla_backend_optimization_level": "0", "--xla_cpu_use_fusion_emitters": "false"}
for _flag, _value in FAST_COMPILE_FLAGS.items():
    if _flag not in os.environ.get("XLA_FLAGS", ""):  # a flag the caller set wins
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}={_value}".strip()

# The longest modules first (their subprocess runs and module fixtures take minutes): with `pytest -n 2`
# and `--dist loadfile` (pyproject.toml) the workers start on them and fill in with the short files, so
# no worker starts a long file while the other has nothing left. The order inside a module is kept.
_LONG_FIRST = ("test_train_e2e.py", "test_paper_trends.py", "test_notebooks.py", "test_checkpoint_integrity.py", "test_compile.py",
               "test_lmms_eval.py", "test_serve.py", "test_reliability_inputs.py", "test_reliability_writes.py",
               "test_eval_cli.py", "test_long_video.py", "test_loss_chunked.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(_LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: module order kept otherwise
