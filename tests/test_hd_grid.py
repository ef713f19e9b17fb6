"""`hd_grid` has one convention (1 = no HD, n >= 2 = n x n crops + the whole image) in model, data and
inference; an old config.json with `data.hd_grid = 0` ("no HD" before the conventions were unified) loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmlm.checkpoint import save_model
from mmlm.config_utils import load_config
from mmlm.cli import data as data_cli
from mmlm.data.config import hd_grid_value
from mmlm.errors import UserError
from mmlm.infer.loading import load_inference_model, load_media
from mmlm.infer.random_model import random_params
from mmlm.models.config import model_config_from_dict
from mmlm.train.data import resolve_data_config


def test_hd_grid_value_reads_the_old_zero_as_no_hd():
    assert hd_grid_value(1) == 1 and hd_grid_value(2) == 2 and hd_grid_value(3.0) == 3
    assert hd_grid_value(0) == 1
    for bad in (-1, 1.5, "2", None, True):
        with pytest.raises(UserError, match=r"data\.hd_grid=.* is not a valid HD grid: use an integer n >= 1"):
            hd_grid_value(bad)


def test_training_data_follows_the_model_and_must_agree_with_it():
    config = load_config("configs/tiny.py")
    assert config.data.get("hd_grid") is None
    resolve_data_config(config)
    assert config.data.hd_grid == 1  # the model's convention, not 0

    config = load_config("configs/tiny.py", ["--config.model.hd_grid=2"])
    config.data.hd_grid = 2
    resolve_data_config(config)
    assert config.data.hd_grid == 2

    config = load_config("configs/tiny.py")
    config.data.hd_grid = 0  # old spelling of "no HD"
    resolve_data_config(config)
    assert config.data.hd_grid == 1

    config = load_config("configs/tiny.py")
    config.data.hd_grid = 3
    with pytest.raises(UserError, match="data.hd_grid=3 but model.hd_grid=1"):
        resolve_data_config(config)


def test_an_old_saved_config_with_data_hd_grid_zero_still_loads(tmp_path):
    config = load_config("configs/tiny.py")
    cfg = model_config_from_dict(config.model)
    save_model(str(tmp_path / "ckpt"), random_params(cfg, seed=0), config)
    path = tmp_path / "ckpt" / "config.json"
    saved = json.loads(path.read_text())
    saved.setdefault("data", {})["hd_grid"] = 0  # what configs saved before the unified convention hold
    path.write_text(json.dumps(saved))
    im = load_inference_model(checkpoint=str(tmp_path / "ckpt"))
    assert im.hd_grid == 1 == im.cfg.hd_grid
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "img.png")
    assert load_media(im, tmp_path / "img.png").shape == (1, 1, cfg.image_size, cfg.image_size, 3)

    saved["data"]["hd_grid"] = -2
    path.write_text(json.dumps(saved))
    with pytest.raises(UserError, match=r"data\.hd_grid=-2 is not a valid HD grid"):
        load_inference_model(checkpoint=str(tmp_path / "ckpt"))


def test_cli_hd_grid_uses_the_same_convention():
    args = data_cli.build_parser().parse_args(["inspect", "DIR"])
    assert args.hd_grid == 1
    with pytest.raises(SystemExit):
        data_cli.build_parser().parse_args(["inspect", "DIR", "--hd-grid", "0"])
