"""Tiny LLaVA-Mini for tests: every code path, random weights, fp32, milliseconds per step."""

import ml_collections

from mmlm import config_defaults as d


def get_config():
    vision = ml_collections.ConfigDict(dict(image_size=32, patch_size=8, width=32, layers=3, heads=2, mlp_dim=64,
                                            select_layer=-2, layer_norm_eps=1e-5))
    llm = d.llm_vicuna7b()
    llm.update(vocab_size=256, width=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp_dim=64)
    model = d.model_config(vision=vision, llm=llm, tokens=4, prefusion_layers=2, budgets=(1, 4))
    model.compressor.heads = 2
    model.dtype = "float32"
    config = d.base_config(model)
    config.text_len = 24
    return config
