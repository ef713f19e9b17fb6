"""LLaVA-Mini / Vicuna-7B: 1 vision token per image, 4 modality pre-fusion layers."""

from mmlm import config_defaults as d


def get_config():
    model = d.model_config(vision=d.vision_clip_vit_l14_336(), llm=d.llm_vicuna7b(), tokens=1, prefusion_layers=4)
    # Training: the paper's stage 2 (instruction tuning); configs/llava_mini_vicuna7b_stage1.py is stage 1.
    # Set --config.data.dataset_dir (an `mmlm data build` output) and --config.data.tokenizer (Vicuna's).
    config = d.paper_stage2(d.base_config(model))
    # The paper recipe shards parameters and optimizer state over all chips and recomputes every block in
    # the backward pass: it fits a v5p-64 slice at the paper's batch 256 x 2,048 tokens (README "Scaling").
    return config
