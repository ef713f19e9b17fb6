"""HF CLIP -> mmlm vision tower: selected features parity for every key style, skipped weights, export."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert_helpers import load_mmlm, read_json, run_mmlm, tiny_clip, write_json
from mmlm.models.vit import VisionTower

torch.set_grad_enabled(False)


def _features_diff(vision, cfg, params, select_layer: int) -> float:
    images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    ref = vision(torch.from_numpy(images).permute(0, 3, 1, 2), output_hidden_states=True)
    ref = ref.hidden_states[select_layer][:, 1:].numpy()
    mine = VisionTower(cfg.vision).apply({"params": params["vision"]}, jnp.asarray(images))
    return float(np.abs(np.asarray(mine) - ref).max())


@pytest.mark.parametrize("style", ["vision", "full", "bare"])
def test_clip_selected_features_match_transformers(tmp_path, style):
    src, dst = str(tmp_path / "hf"), str(tmp_path / "mmlm")
    vision = tiny_clip(src, style)
    code, out, err = run_mmlm("convert", "--from", "hf-clip", "--src", src, "--dst", dst, "--quiet")
    assert code == 0, err
    cfg, params = load_mmlm(dst)
    assert set(params) == {"vision"}
    assert cfg.vision.layers == 3 and cfg.vision.blocks_used == 2
    # The last block and the post-LayerNorm are skipped and reported (16 block tensors + 2).
    assert "skipped 16 tensor(s): CLIP blocks after the selected layer" in out
    assert "skipped 2 tensor(s): CLIP post-LayerNorm" in out
    if style == "full":
        assert "CLIPModel text tower" in out
    assert _features_diff(vision, cfg, params, -2) <= 1e-5
    code, out, err = run_mmlm("verify", "--hf", src, "--mmlm", dst, "--json")
    assert code == 0, out + err
    assert json.loads(out)["outputs"]["features"]["max_abs_diff"] <= 1e-5


def test_clip_other_select_layer_and_export(tmp_path):
    """select_layer=-1 builds every block; export rebuilds a loadable CLIPVisionModel with --vision."""
    from transformers import CLIPVisionModel

    src, dst, back = str(tmp_path / "hf"), str(tmp_path / "mmlm"), str(tmp_path / "back")
    vision = tiny_clip(src, "vision")
    assert run_mmlm("convert", "--from", "hf-clip", "--src", src, "--dst", dst, "--select_layer", "-1",
                    "--quiet")[0] == 0
    cfg, params = load_mmlm(dst)
    assert cfg.vision.blocks_used == 3
    assert _features_diff(vision, cfg, params, -1) <= 1e-5

    code, _, err = run_mmlm("convert", "--to", "hf", "--src", dst, "--dst", str(tmp_path / "x"))
    assert code == 2 and "needs --vision" in err
    code, out, err = run_mmlm("convert", "--to", "hf", "--src", dst, "--dst", back, "--vision", src, "--quiet")
    assert code == 0, err
    reloaded = CLIPVisionModel.from_pretrained(back)
    for name, tensor in vision.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_clip_rejects_other_activations(tmp_path):
    src = str(tmp_path / "hf")
    tiny_clip(src, "vision")
    path = os.path.join(src, "config.json")
    cfg = read_json(path)
    cfg["hidden_act"] = "gelu"
    write_json(path, cfg)
    code, _, err = run_mmlm("convert", "--from", "hf-clip", "--src", src, "--dst", str(tmp_path / "out"))
    assert code == 2 and "hidden_act 'gelu'" in err
