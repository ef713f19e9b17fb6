"""LLaVA-Mini / Vicuna-7B: 1 vision token per image, 4 modality pre-fusion layers."""

from mmlm import config_defaults as d


def get_config():
    model = d.model_config(vision=d.vision_clip_vit_l14_336(), llm=d.llm_vicuna7b(), tokens=1, prefusion_layers=4)
    return d.base_config(model)
