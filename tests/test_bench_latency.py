"""`mmlm bench latency`: the transformers peer holds mmlm's weights and answers exactly as mmlm does."""

import pytest

from mmlm.bench.latency import bench_model
from mmlm.bench.latency_peer import peer_row
from mmlm.bench.common import baseline_of
from mmlm.config_utils import load_config
from mmlm.models.config import model_config_from_dict

pytest.importorskip("transformers")


def test_transformers_llava_with_mmlm_weights_gives_mmlm_logits_and_greedy_tokens():
    config = load_config("configs/tiny.py", ["--config.model.dtype=float32", "--config.model.projector=mlp2x_gelu"])
    base = baseline_of(model_config_from_dict(config.model))
    row = bench_model(base, batch=1, text_len=8, new_tokens=6, runs=1, keep=True)
    assert row["decode_ms_per_token"] > 0 and row["ttft_ms"] > 0
    peer = peer_row(base, **row.pop("_peer"), new_tokens=6, runs=1)
    assert peer["max_abs_logit_diff"] < 1e-4
    assert peer["greedy_tokens_equal"] == 6
    assert peer["llm_prompt_tokens"] == base.vision.num_patches + 7  # the placeholder became every patch
    assert peer["decode_ms_per_token"] > 0
