"""LLaVA-Mini / LLaMA-3.1-8B-Instruct: 1 token per image or video frame, 4 pre-fusion layers."""

from mmlm import config_defaults as d


def get_config():
    model = d.model_config(vision=d.vision_clip_vit_l14_336(), llm=d.llm_llama31_8b(), tokens=1, prefusion_layers=4)
    config = d.base_config(model)
    config.max_frames = 64  # video frames sampled at 1 fps, at most this many (middle of equal segments)
    d.paper_stage2(config)  # training: paper stage 2
    config.data.template = "llama_3_1"
    config.data.max_frames = config.get_ref("max_frames")
    # A batch is cut along the frame axis to the smallest of these that holds its longest video (64 when none
    # does): a batch of images costs 1 frame instead of 64, short videos 8-32. One compiled step per count used.
    config.data.frame_buckets = (1, 8, 16, 32)
    return config
