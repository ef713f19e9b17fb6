"""The study configs of configs/experiments/ and the `FILE.py:ROW` config syntax."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmlm.config_utils import ConfigError, load_config, load_config_module, split_row
from mmlm.train.config import validate_config
from mmlm.models.config import model_config_from_dict

STUDY_DIR = Path(__file__).resolve().parents[1] / "configs" / "experiments"
STUDIES = ("matryoshka", "prefusion", "resolution", "pooling", "budget")


def _rows(study: str) -> list[str]:
    return list(load_config_module(str(STUDY_DIR / f"{study}.py")).ROWS)


@pytest.mark.parametrize("spec", [f"{STUDY_DIR / s}.py:{row}" for s in STUDIES for row in _rows(s)]
                         + [str(STUDY_DIR / "base.py")])
def test_every_study_row_passes_validation(spec):
    config = load_config(spec)
    validate_config(config, num_devices=1)
    cfg = model_config_from_dict(config.model)
    for m in config.get("eval", {}).get("budgets", ()):
        cfg.check_budget(m)  # every scored budget is one the row's model supports


def test_rows_set_what_they_name():
    def model(study, row):
        return model_config_from_dict(load_config(f"{STUDY_DIR / study}.py:{row}").model)

    assert model("prefusion", "pf4_t1").prefusion_layers == 4
    assert model("prefusion", "pf0_t16").compressor.tokens == 16
    assert model("prefusion", "llava15").mode == "llava15"
    assert model("matryoshka", "matryoshka").compressor.budgets == (1, 4, 16)
    assert model("matryoshka", "mqt_any_m").compressor.budgets == tuple(range(1, 17))
    assert model("pooling", "avgpool_t4").compressor.kind == "avgpool"
    assert model("resolution", "hd2").hd_grid == 2
    # The runner shares runs between rows with equal configs: the query rows of the pooling study are
    # the fixed-budget rows of the Matryoshka study.
    a = load_config(f"{STUDY_DIR}/pooling.py:query_t4").to_dict()
    b = load_config(f"{STUDY_DIR}/matryoshka.py:fixed4").to_dict()
    assert a == b
    for row in ("fixed16", "matryoshka"):  # the budget study's baselines are the Matryoshka study's runs
        assert load_config(f"{STUDY_DIR}/budget.py:{row}").to_dict() == \
            load_config(f"{STUDY_DIR}/matryoshka.py:{row}").to_dict()
    heavy = load_config(f"{STUDY_DIR}/budget.py:heavy_distill").train
    assert heavy.matryoshka_loss == "distill" and tuple(heavy.matryoshka_probs) == (0.1, 0.1, 0.8)


def test_split_row():
    assert split_row("configs/experiments/pooling.py:avgpool_t1") == ("configs/experiments/pooling.py", "avgpool_t1")
    assert split_row("configs/tiny.py") == ("configs/tiny.py", None)
    assert split_row("weird:name") == ("weird:name", None)  # not FILE.py:ROW: read whole


def test_row_mistakes_name_the_rows(tmp_path):
    with pytest.raises(ConfigError, match=r"no row 'nope'.*'pf0_t1'"):
        load_config(f"{STUDY_DIR}/prefusion.py:nope")
    with pytest.raises(ConfigError, match=r"study with rows.*prefusion.py:ROW.*'llava15'"):
        load_config(f"{STUDY_DIR}/prefusion.py")
    with pytest.raises(ConfigError, match="has no rows"):
        load_config("configs/tiny.py:row")
    assert issubclass(ConfigError, Exception)


def test_row_syntax_in_the_cli(capsys, tmp_path):
    from mmlm import cli

    rc = cli.main(["summary", "--config", f"{STUDY_DIR}/prefusion.py:nope"])
    out = capsys.readouterr()
    assert rc != 0 and "its rows are" in out.err


def test_bench_flops_resolves_a_study_row():
    """`mmlm bench flops --config experiments/prefusion.py:pf2_t1` finds the file under configs/ and keeps the row."""
    from mmlm.bench.flops import load_model_config
    from mmlm.configs import resolve_config_path

    assert resolve_config_path("experiments/prefusion.py:pf2_t1").endswith("configs/experiments/prefusion.py:pf2_t1")
    assert load_model_config("experiments/prefusion.py:pf2_t1").prefusion_layers == 2
