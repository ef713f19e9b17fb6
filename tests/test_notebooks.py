"""The colab/ notebooks executed headless (nbclient + an IPython kernel), top to bottom, with small sizes.

Each notebook reads its sizes from `MMLM_COLAB_*` environment variables (the kernel inherits this
process's environment): here a few training steps of the tiny model on a few dozen synthetic images,
so each runs in about a minute on a CPU. A cell that raises fails the test, and so does a `!` shell
command that printed a traceback or an `mmlm ...: error:` line (IPython does not raise for those).
One test per notebook: pytest-xdist runs them in parallel.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
# A tiny training run: few images, small batches, a short final evaluation.
SMALL_DATA = ("--config.synthetic.num_train=64 --config.synthetic.num_eval=16 --config.data.batch_size=8 "
              "--config.data.eval_batch_size=8 --config.eval.num_questions=16 --config.eval.loss_batches=1 "
              "--config.train.log_every=1 --config.train.checkpoint_every=4")
COMMON = {
    "MMLM_COLAB_SKIP_INSTALL": "1",
    "MMLM_COLAB_STEPS": "4",
    "MMLM_COLAB_CONFIG": "configs/tiny.py",
    "MMLM_COLAB_TRAIN_ARGS": SMALL_DATA,
    "MMLM_COLAB_NUM_QUESTIONS": "16",
    "JAX_PLATFORMS": "cpu",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    # These runs check that the notebooks work, not speed: conftest's fast-compile flags.
    "XLA_FLAGS": os.environ["XLA_FLAGS"],
}
# The quickstart runs as local Jupyter runs it from a checkout: the kernel started in colab/ and no MMLM_REPO
# (its setup cell finds the repository above the notebook); the others are given MMLM_REPO, as on Colab.
FROM_CHECKOUT = "mmlm_quickstart.ipynb"
NOTEBOOKS = {
    "mmlm_quickstart.ipynb": {"MMLM_COLAB_FLOPS_ARGS": "--analytic_only"},
    "explore_compression.ipynb": {},
    # `mmlm compile` has its own tests; on a CPU host libtpu alone takes minutes to start, so the notebook's
    # compile cell takes its documented skip path here.
    "cloud_tpu.ipynb": {"MMLM_COLAB_TPU_STEPS": "12", "MMLM_COLAB_COMPILE": "0"},
}
FAILED_COMMAND = re.compile(r"Traceback \(most recent call last\)|^mmlm [\w ]+: error:", re.M)


def _outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif out.get("output_type") in ("execute_result", "display_data"):
                parts.append(str(out.get("data", {}).get("text/plain", "")))
    return "".join(parts)


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    """A persistent XLA compilation cache shared by the notebooks' kernels and commands: the tiny model's
    programs compiled by one (the train step, the answer generation) are reused by the next."""
    return tmp_path_factory.mktemp("notebook_jit_cache")


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_executes(name, tmp_path, monkeypatch, compile_cache):
    cache = {"JAX_COMPILATION_CACHE_DIR": str(compile_cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    for key, value in {**COMMON, **NOTEBOOKS[name], **cache, "MMLM_REPO": str(REPO),
                       "MMLM_COLAB_RUN_DIR": str(tmp_path / "runs"),
                       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}.items():
        monkeypatch.setenv(key, value)
    kernel_dir = tmp_path
    if name == FROM_CHECKOUT:
        monkeypatch.delenv("MMLM_REPO")
        kernel_dir = REPO / "colab"
    monkeypatch.delenv("MMLM_EXPLORE_WORKDIR", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend, so figures become outputs
    monkeypatch.delenv("MMLM_TPU_NAME", raising=False)
    nb = nbformat.read(REPO / "colab" / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(kernel_dir)}})
    try:
        client.execute()  # raises CellExecutionError naming the cell when one raises
    finally:
        nbformat.write(nb, tmp_path / name)  # the executed notebook, outputs included, for a failure's post-mortem
    text = _outputs_text(nb)
    failed = FAILED_COMMAND.search(text)
    assert not failed, f"{name}: a shell command failed:\n{text[max(0, failed.start() - 2000):failed.end() + 3000]}"
    if name == FROM_CHECKOUT:
        assert f"repo: {REPO} |" in text  # found from the kernel's directory
    if name == "cloud_tpu.ipynb":
        assert "SKIPPED: set MMLM_TPU_NAME" in text  # the TPU-only cells skip themselves with a note
        assert "SKIPPED: mmlm compile for v5p-8" in text
        assert "logged steps:" in text
    if name == "explore_compression.ipynb":
        assert (tmp_path / "runs" / "budgets.png").is_file()
        images = sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))
        # 4 synthetic images, the preprocessing figure, 2 compression-map renders, the map grid, the budget plots
        assert images >= 9, images
