"""LLaVA-1.5-7B baseline: CLIP ViT-L/14-336 + mlp2x_gelu + Vicuna-7B, all 576 tokens to the LLM."""

from mmlm import config_defaults as d


def get_config():
    model = d.model_config(vision=d.vision_clip_vit_l14_336(), llm=d.llm_vicuna7b(), mode="llava15",
                           tokens=576, prefusion_layers=0)
    return d.base_config(model)
