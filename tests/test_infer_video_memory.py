"""Video KV-cache size: one compressed token per frame for LLaVA-Mini, N patches for the baseline."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mmlm import IMAGE_TOKEN_ID
from mmlm.bench import video_memory
from mmlm.bench.common import baseline_of
from mmlm.cli import bench_video_memory
from mmlm.config_utils import load_config
from mmlm.infer.batching import make_batch
from mmlm.infer.generate import prefill, sampling_params
from mmlm.models.config import model_config_from_dict
from mmlm.models.summary import abstract_params


def _tiny(*overrides):
    return model_config_from_dict(load_config("configs/tiny.py", overrides).model)


def test_compiled_cache_grows_by_one_token_kv_per_frame():
    mini = _tiny("--config.model.compressor.tokens=1", "--config.model.compressor.budgets=()")
    base = baseline_of(mini)
    assert base.mode == "llava15" and mini.mode == "llava_mini"
    per_token = 2 * 2 * 8 * 2 * 4  # layers x kv_heads x head_dim x (K, V) x fp32 bytes
    assert video_memory.per_token_kv_bytes(mini) == per_token
    rows_mini = video_memory.measure(mini, [1, 2, 5], text_tokens=10, tokens_per_frame=1)
    rows_base = video_memory.measure(base, [1, 2, 5], text_tokens=10, tokens_per_frame=base.vision.num_patches)
    assert video_memory.check(rows_mini, mini) == [] and video_memory.check(rows_base, base) == []
    assert video_memory.per_frame_growth(rows_mini) == [per_token, per_token]
    assert video_memory.per_frame_growth(rows_base) == [16 * per_token] * 2  # 16 patches per 32 px frame
    for r in rows_mini:
        assert r["cache_bytes"] == (10 + r["frames"]) * per_token  # read from XLA's memory analysis
        assert r["alias_bytes"] == r["cache_bytes"] == r["cache_bytes_from_arguments"]


def test_check_flags_a_wrong_growth():
    mini = _tiny()
    rows = [dict(frames=1, tokens_per_frame=4, cache_bytes=100, cache_bytes_from_arguments=100,
                 expected_cache_bytes=100),
            dict(frames=2, tokens_per_frame=4, cache_bytes=150, cache_bytes_from_arguments=150,
                 expected_cache_bytes=150)]
    assert any("per-frame growth" in p for p in video_memory.check(rows, mini))


def test_generation_cache_holds_m_slots_per_frame():
    """The cache `generate` allocates for a T-frame video: text + T*m vision slots (+ answer slots)."""
    cfg = _tiny()
    params = abstract_params(cfg)
    sp, _ = sampling_params(0.0, 1.0, 2)
    prompt = [1, IMAGE_TOKEN_ID, 5, 6, 7]
    for frames in (1, 3, 6):
        media = np.zeros((frames, 1, 32, 32, 3), np.float32)
        batch = make_batch(cfg, [prompt], [media], pad_id=0, pad_len_to=1)
        for m in (1, 4):
            state = jax.eval_shape(lambda p, b: prefill(cfg, p, b, sp, jax.random.PRNGKey(0), max_new_tokens=3,
                                                        num_vision_tokens=m, greedy=True), params, batch)
            slots = state.cache["k"].shape[2]
            assert slots == (len(prompt) - 1) + frames * m + 3
    base = dataclasses.replace(baseline_of(cfg), compressor=cfg.compressor)
    media = np.zeros((3, 1, 32, 32, 3), np.float32)
    batch = make_batch(base, [prompt], [media], pad_id=0, pad_len_to=1)
    state = jax.eval_shape(lambda p, b: prefill(base, p, b, sp, jax.random.PRNGKey(0), max_new_tokens=3,
                                                num_vision_tokens=None, greedy=True), abstract_params(base), batch)
    assert state.cache["k"].shape[2] == (len(prompt) - 1) + 3 * 16 + 3
    assert state.cache["k"].dtype == jnp.float32


def test_cli_reports_ok(capsys):
    rc = bench_video_memory.main(["--config", "configs/tiny.py", "--frames", "1,2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "check: per-frame growth = layers x kv_heads x head_dim x 2 x bytes x tokens_per_frame: OK" in out
    assert "llava_mini: +1,024 B" in out  # 4 tokens/frame x 256 B/token
