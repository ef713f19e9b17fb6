"""The shared small model and recipe of the paper-trend studies (`experiments/paper_trends`).

    mmlm train --config configs/experiments/base.py --workdir /tmp/trends_base

A LLaVA-Mini from scratch on the synthetic `grid_shapes` task (6-12 shapes
on a 4x4 grid; questions on one cell, counts per colour, existence;
`mmlm.data.synth`). The geometry puts one scene cell in one ViT patch: 64 px
images, 16 px patches, a 4x4 patch grid, so the budgets 1 / 4 / 16 are one
token per image, per 2x2 block of cells and per cell, and 16 tokens are all
the patches (what LLaVA-1.5 hands its LLM here).

Sized for the 2-core CPU: the whole study (every row x 3 seeds,
`experiments/paper_trends/run.py`) in at most 4 hours. The study files
(`matryoshka.py`, `prefusion.py`, `resolution.py`, `pooling.py`) start from
`base_config()` and change the knobs of their rows; `quick()` shrinks any
row to seconds (`run.py --quick`, the pipeline test).

The synthetic data is rendered and built once per kind under
`synthetic.cache_dir` (shared by every row and seed); `config.seed` moves
the initialisation, the data order and the Matryoshka budget draws, not the
data.
"""

import ml_collections

from mmlm import config_defaults as d
from mmlm.train.data import synthetic_config

IMAGE_SIZE = 64      # pixels per side of the view the ViT reads (the HD source is IMAGE_SIZE * hd_grid)
PATCH_SIZE = 16      # pixels per ViT patch side: 4 x 4 patches, one per grid_shapes cell
WIDTH = 64           # vision and LLM width (also the pre-fusion blocks, which are LLM-shaped)


def base_config(prefusion_layers: int = 1, tokens: int = 1, budgets: tuple[int, ...] = ()) -> ml_collections.ConfigDict:
    """The small LLaVA-Mini on grid_shapes; the study rows change the model knobs on this."""
    vision = ml_collections.ConfigDict(dict(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        width=WIDTH,          # ViT width
        layers=2,             # ViT blocks
        heads=4,              # ViT attention heads
        mlp_dim=2 * WIDTH,    # ViT MLP hidden width
        select_layer=-1,      # features = output of the last block
        layer_norm_eps=1e-5,
        position_init="sincos2d"))  # strong row / column directions from step 0 (CLIP's std-0.02 init: weak)
    llm = d.llm_vicuna7b()
    llm.update(
        vocab_size=512,       # the tiny tokenizer (data/tiny_tokenizer.model)
        width=WIDTH, layers=2, heads=4, kv_heads=4, head_dim=WIDTH // 4, mlp_dim=2 * WIDTH,
        tie_embeddings=True)  # answer words share their embedding with the question words (demo: faster)
    model = d.model_config(vision=vision, llm=llm, tokens=tokens, prefusion_layers=prefusion_layers,
                           budgets=budgets)
    model.compressor.heads = 4    # cross-attention heads of the query compressor (divides WIDTH)
    model.dtype = "float32"       # CPU: fp32 matmuls are the fast path
    model.scan_layers = False     # 1-4 layer stacks: unrolled steps are faster on the CPU (measured)
    model.init_std = 0            # dense kernels at the fan-in scale (as the demo): the foundation learns
                                  # counts and existence with it, not with std 0.02 (measured)
    config = d.base_config(model)
    config.text_len = 72          # text tokens assumed by `mmlm summary`
    config.mesh.allow_replicated_fallback = True  # 64-wide layers on any small CPU mesh

    # Stage 2 of LLaVA-Mini: the vision tower is frozen (it comes from the foundation, `foundation_config`,
    # through train.init_from, which the runner sets, with the projector and the LLM); projector, compressor,
    # pre-fusion and LLM train.
    train = d.train_config(steps=1200, trainable=d.STAGE2_TRAINABLE)
    # The pre-fusion blocks start as copies of the foundation LLM's blocks (block i <- LLM block i mod 2): the
    # foundation's LLM has learnt to find a cell's patch from the question, which is the pre-fusion's job.
    # Fresh pre-fusion blocks do not learn that within a row (cell colour 19-45% at 600-900 steps vs 82% with
    # the copies, fixed1 row, experiments/demo_learning/results.md).
    train.init_prefusion_from_llm = True
    train.checkpoint_every = 400  # steps between checkpoints (a killed row resumes from the last one)
    train.keep_checkpoints = 1    # only the latest checkpoint is kept (disk)
    train.log_every = 100         # steps between metric rows
    optim = d.optim_config(lr=1e-3)
    optim.schedule = "wsd"        # warmup, flat peak, linear decay over the last decay_ratio (demo: lookups are late)
    optim.warmup_ratio = 0.05     # fraction of the steps warming up
    optim.decay_ratio = 0.15      # fraction of the steps decaying at the end
    optim.end_lr_ratio = 0.05     # final LR / peak
    optim.weight_decay = 0.01     # decoupled weight decay on matrices
    ev = d.eval_config()
    ev.every = 0                  # evaluate only after the last step
    ev.loss_batches = 2           # eval batches for eval/loss
    ev.num_questions = 400        # held-out questions answered greedily (first question of each val image)
    ev.max_new_tokens = 3         # one-word answers + end of turn
    ev.budgets = ()               # budgets to score besides the default; the study rows set them
    d.add_training(config, train=train, optim=optim, eval=ev)
    config.data.batch_size = 32
    config.data.eval_batch_size = 100
    config.data.max_text_len = 72      # tokens: 3-turn grid_shapes conversations take at most 71 (tiny tokenizer)
    config.data.system_prompt = ""     # "<s>USER: <image>\nQ ASSISTANT: A</s>..." keeps sequences short
    config.data.read_threads = 2       # grain read threads
    config.data.prefetch_buffer_size = 128

    config.synthetic = synthetic_config()
    config.synthetic.kind = "grid_shapes"
    config.synthetic.num_train = 8000  # images (3 questions each)
    config.synthetic.num_eval = 400    # held-out images; the first question of each is scored
    config.synthetic.image_size = IMAGE_SIZE
    config.synthetic.questions_per_image = 3
    config.synthetic.train_category_weights = ""  # uniform: cell_color, cell_shape, count_color, exist
    return config


FOUNDATION_STEPS = 8000  # optimizer steps of the shared foundation (trained once for every row and seed)
# The parts every study row takes from the foundation (train.init_from); the rest starts fresh in each row.
FOUNDATION_PARTS = ("vision", "projector", "llm")


def foundation_config() -> ml_collections.ConfigDict:
    """The shared foundation: the analogue of the paper's pretrained CLIP ViT and LLM.

    A LLaVA-1.5-style model (all 16 patch tokens to the LLM, every part
    trained from scratch) on grid_shapes. Its vision tower, projector and LLM
    (`FOUNDATION_PARTS`) initialise every study row, and its LLM blocks the
    row's pre-fusion blocks (`train.init_prefusion_from_llm`); each row then
    trains projector, compressor (fresh), pre-fusion and LLM with the ViT
    frozen, as LLaVA-Mini's stage 2 does with CLIP. From scratch, a model of
    this size does not learn the cell lookups within one row's budget, hence
    the shared start.

    What it takes (`experiments/demo_learning/results.md` has every
    measurement and command): the ViT is pretrained for 300 steps on per-patch
    colour, shape, row and column (`train.vision_pretrain`; without the row and
    column heads the colour and shape features drown the patch position, which
    then explains 0.4% of the feature variance), its position embeddings start
    from a 2-D sin-cos table, cells are named "B3" (distinct tokens for the row
    and the column), and dense kernels start at the fan-in scale. With all of
    that, 4,000 steps bring cell colour to 58.5% (teacher-forced first answer
    token; 22% at step 1,500, ~30% is naming any colour present), counts to
    99.5% and existence to 71%, while cell shape stays at chance (27.5%); every
    earlier variant stayed near the priors. The 8,000-step foundation
    (`FOUNDATION_STEPS`; 875 s on the 2-core CPU) answers cell colour 100%,
    counts 100%, existence 62.5% and cell shape 21.8% (greedy exact match on
    the 1,200 held-out questions, `experiments/paper_trends/run.py`): it finds
    the cell and reads its colour, but not the shape in it: trained on with
    the answers, its ViT forgets the shapes (a linear probe reads them on 48% of
    the object patches, 99.9% after the pretraining). Hence the ViT stays frozen
    after its pretraining, as CLIP does in LLaVA: measured so, 4,000 steps give
    cell colour 77.5% and cell shape 73% (teacher-forced, as above; counts 97%,
    existence 68%), and the 8,000-step foundation of this config answers cell
    colour 90.2%, cell shape 88.4%, counts 97.7% and existence 64.4% (greedy
    exact match on the 1,200 held-out questions; 1,696 s beside other jobs).
    """
    config = base_config(prefusion_layers=0, tokens=1)
    config.model.mode = "llava15"  # all patches to the LLM: the easiest setting to learn the task in
    # The pretrained ViT stays frozen, as CLIP does in LLaVA: trained on with the answers, it loses the shapes.
    config.train.trainable = d.STAGE2_TRAINABLE
    config.train.steps = FOUNDATION_STEPS
    config.train.checkpoint_every = 1000
    # The stand-in for CLIP's pretraining: per-patch colour, shape, row and column before step 0 (the position
    # heads keep where each patch is in its features, which the cell questions need).
    config.train.vision_pretrain.steps = 300
    config.train.vision_pretrain.position_weight = 1.0
    config.optim.learning_rate = ml_collections.ConfigDict({p: 5e-4 for p in d.PARTS})  # peak LR of every part
    config.eval.budgets = (num_patches(),)
    return config


def num_patches() -> int:
    """Patches per view: the vision tokens of the LLaVA-1.5 baseline."""
    return (IMAGE_SIZE // PATCH_SIZE) ** 2


def quick(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a row to seconds (the pipeline test of `run.py --quick`): 2 steps, a few images and questions.

    The model is the row's, with its layers scanned (a shorter compile). The
    train step traces and compiles one branch per Matryoshka budget (with the
    teacher or the largest budget beside the drawn one in the distill and
    largest recipes), which dominates a quick row's time; so a row that samples
    more than 3 budgets (MQT's any m) samples its first two and its largest
    (16 branches take minutes to compile on a small CPU), and a {1, 4, 16} row
    its smallest and largest, with the per-budget draw probabilities and loss
    weights of the kept budgets. Every row is still scored at all its
    `eval.budgets` (a Matryoshka model answers at any budget up to its tokens).
    """
    config.model.scan_layers = True
    budgets = tuple(config.model.compressor.budgets)
    if len(budgets) > 2:
        keep = (0, 1, len(budgets) - 1) if len(budgets) > 3 else (0, len(budgets) - 1)
        config.model.compressor.budgets = tuple(budgets[i] for i in keep)
        for key in ("matryoshka_probs", "matryoshka_weights"):
            values = tuple(config.train.get(key) or ())
            if len(values) == len(budgets):
                config.train[key] = tuple(values[i] for i in keep)
    config.train.steps = 2
    config.train.checkpoint_every = 2
    config.train.log_every = 1
    config.train.progress_bar = False
    config.eval.num_questions = 4
    config.eval.loss_batches = 1
    config.data.batch_size = 8
    config.data.eval_batch_size = 4
    config.data.prefetch_buffer_size = 8
    config.synthetic.num_train = 16
    config.synthetic.num_eval = 4
    if config.train.vision_pretrain.steps:  # the foundation: its ViT pretraining in a few steps too
        config.train.vision_pretrain.update(steps=2, batch_size=8, num_images=16, eval_images=4)
    return config


def get_config() -> ml_collections.ConfigDict:
    return base_config()
