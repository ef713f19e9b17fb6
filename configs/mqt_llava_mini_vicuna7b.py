"""Matryoshka LLaVA-Mini / Vicuna-7B: M=64 nested queries, budgets {1, 4, 16, 64}."""

from mmlm import config_defaults as d


def get_config():
    model = d.model_config(vision=d.vision_clip_vit_l14_336(), llm=d.llm_vicuna7b(), tokens=64, prefusion_layers=4,
                           budgets=(1, 4, 16, 64))
    # Training: paper stage 2; each step trains one budget drawn uniformly from {1, 4, 16, 64}.
    return d.paper_stage2(d.base_config(model))
