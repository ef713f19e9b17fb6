"""Writes the notebooks in colab/ (edit the cells here, then `python colab/build_notebook.py`).

* `mmlm_quickstart.ipynb`: install, explore the 7B configs, the Python API, the demo.
* `explore_compression.ipynb`: a Matryoshka model asked about synthetic images and a real
  photo, the compressor's attention maps, accuracy and FLOPs per token budget.
* `cloud_tpu.ipynb`: training on a Cloud TPU slice (mesh, `mmlm compile`, every host, preemption).

Uses `nbformat` when it is installed, else plain `json` with the nbformat 4.5
schema. Cell ids are deterministic so regenerating gives a stable diff. Every
notebook reads its sizes from `MMLM_COLAB_*` environment variables (defaults:
the full tutorial), which the test suite sets to run each one in about a minute.
"""

from __future__ import annotations

import json
import os
import re
from textwrap import dedent

HERE = os.path.dirname(os.path.abspath(__file__))
QUICKSTART = "mmlm_quickstart.ipynb"
EXPLORE = "explore_compression.ipynb"
CLOUD_TPU = "cloud_tpu.ipynb"
OUT = os.path.join(HERE, QUICKSTART)



# Where the repository is: MMLM_REPO if set, else the mmlm checkout holding the kernel's working directory
# (local Jupyter starts the kernel in the notebook's directory, colab/), else Colab's /content/mmlm. Outputs go
# to /content/mmlm_runs on Colab, else to ~/mmlm_runs (not into the checkout).
FIND_REPO = """\

def find_checkout(start):
    \"\"\"The mmlm checkout (a directory with mmlm's pyproject.toml) holding `start`, or None.\"\"\"
    here = os.path.abspath(start)
    while True:
        pyproject = os.path.join(here, "pyproject.toml")
        if os.path.isfile(pyproject):
            with open(pyproject) as f:
                if re.search(r'^name = "mmlm"$', f.read(), re.M):
                    return here
        if os.path.dirname(here) == here:
            return None
        here = os.path.dirname(here)


REPO = os.environ.get("MMLM_REPO") or find_checkout(os.getcwd()) or "/content/mmlm"
"""
RUN_DIR_DEFAULT = '(\n    "/content/mmlm_runs" if os.path.isdir("/content") else os.path.expanduser("~/mmlm_runs"))'

# The setup cell of the notebooks that train: the repository checkout and where outputs go.
REPO_SETUP = FIND_REPO + """\
if not os.path.isfile(os.path.join(REPO, "pyproject.toml")):
    raise FileNotFoundError(f"no mmlm repository at {REPO}: clone or upload it there first")
os.chdir(REPO)
sys.path.insert(0, REPO)
RUN_DIR = os.environ.get("MMLM_COLAB_RUN_DIR") or """ + RUN_DIR_DEFAULT + """
os.makedirs(RUN_DIR, exist_ok=True)
print("repo:", REPO, "| outputs:", RUN_DIR)
"""

def demo_steps() -> int:
    """`train.steps` of configs/demo.py (read from the file: the builder needs no mmlm install)."""
    with open(os.path.join(HERE, "..", "configs", "demo.py")) as f:
        m = re.search(r"train_config\(steps=(\d+)", f.read())
    if not m:
        raise ValueError("configs/demo.py: no `train_config(steps=N, ...)` call found")
    return int(m.group(1))


DEMO_STEPS = demo_steps()

# notebook file name -> its cells (kind, source), in order.
NOTEBOOKS: dict[str, list[tuple[str, str]]] = {}
CELLS: list[tuple[str, str]] = []


def notebook(name: str) -> None:
    """Starts the cells of notebook `name`: `md` and `code` append to it from here on."""
    global CELLS
    CELLS = NOTEBOOKS.setdefault(name, [])


def md(text: str) -> None:
    CELLS.append(("markdown", dedent(text).strip("\n")))


def code(text: str) -> None:
    CELLS.append(("code", dedent(text).strip("\n")))


# =========================================================================== quickstart
notebook(QUICKSTART)

# --------------------------------------------------------------------------- intro
md("""
# mmlm quickstart: LLaVA-Mini in JAX, one vision token per image

**mmlm** reimplements [LLaVA-Mini](https://arxiv.org/abs/2501.03895) in JAX/Flax: a CLIP ViT, a
*query compressor* that squeezes the 576 patch features of an image into **1** vision token (a
*Matryoshka* compressor serves any budget up to its maximum with the same weights), and *modality
pre-fusion* layers that fuse the image into the instruction text before the LLM sees it.

This notebook:

1. installs mmlm,
2. compares LLaVA-1.5-7B with LLaVA-Mini-7B (parameters, vision tokens, FLOPs) from abstract shapes,
3. builds a tiny random LLaVA-Mini with the Python API and checks the Matryoshka prefix property,
4. renders the synthetic *shapes* dataset,
5. trains the demo model from scratch, then chats with it and evaluates it on fresh questions.

It runs top to bottom on a **free Colab CPU runtime** (about 10 minutes, most of it the demo
training). On a GPU or TPU runtime JAX uses the accelerator automatically.
**No weights or datasets are downloaded**: the 7B models are only analysed as shapes, and the
demo trains a small model on data it renders itself.
""")

# --------------------------------------------------------------------------- 1. install
md("""
## 1. Install

Opened from a checkout in local Jupyter (`jupyter lab colab/mmlm_quickstart.ipynb`), the notebook finds
the repository above its own directory. On Colab it expects the mmlm repository at **`/content/mmlm`**. Either

* clone it: `!git clone <URL of your mmlm repository> /content/mmlm`, or
* upload it: zip the repository, upload `mmlm.zip` with the file browser on the left, then
  `!unzip -q /content/mmlm.zip -d /content` (so that `/content/mmlm/pyproject.toml` exists).

`MMLM_REPO` (an environment variable) names another checkout.

Then run the two cells below: `pip install -e ".[data]"` installs mmlm, its `mmlm` command and
TensorFlow (the `data` extra, used to build the training dataset).
""")

code("""
# !git clone <URL of your mmlm repository> /content/mmlm    # on Colab: or upload + unzip (see above)
import os
import re
import sys

""" + FIND_REPO + """\
if not os.path.isfile(os.path.join(REPO, "pyproject.toml")):
    raise FileNotFoundError(f"no mmlm repository at {REPO}: clone or upload it there first (see above)")
os.chdir(REPO)
sys.path.insert(0, REPO)  # import mmlm in this kernel without restarting it after the install

RUN_DIR = os.environ.get("MMLM_COLAB_RUN_DIR") or """ + RUN_DIR_DEFAULT + """  # data, checkpoints, plots
os.makedirs(RUN_DIR, exist_ok=True)
print("repo:", REPO, "| outputs:", RUN_DIR)
""")

code("""
if os.environ.get("MMLM_COLAB_SKIP_INSTALL") != "1":
    !pip install -q -e ".[data]"
!mmlm --help
""")

md("""
JAX picks the best backend available. On a GPU/TPU runtime you should see `gpu`/`tpu` below; if
you see `cpu` there, install the matching JAX build (`pip install -U "jax[cuda12]"` or
`pip install -U "jax[tpu]"`) and restart the runtime. Everything also works on the CPU.
""")

code("""
import warnings

import jax

# IPython's `!` forks a shell; JAX warns about forks once it is imported (harmless: the child execs).
warnings.filterwarnings("ignore", message=r"os\\.fork\\(\\) was called")
print("JAX", jax.__version__, "| backend:", jax.default_backend(), "| devices:", jax.devices())
""")

# --------------------------------------------------------------------------- 2. explore
md("""
## 2. Explore: LLaVA-1.5-7B vs LLaVA-Mini-7B

`mmlm summary` counts parameters per part and the vision tokens the LLM sees per image, from
abstract shapes (`jax.eval_shape`: nothing is allocated, so a 7B config takes a second). Both
models share the CLIP ViT-L/336 tower, the MLP projector and Vicuna-7B; LLaVA-Mini adds the
compressor and 4 pre-fusion layers, and feeds the LLM **1** vision token instead of 576.

The helper below runs an `mmlm ... --json` command and parses its output.
""")

code("""
import json
import shlex
import subprocess


def mmlm_json(cmd):
    \"\"\"Runs an `mmlm ... --json` command line and returns its parsed JSON output.\"\"\"
    proc = subprocess.run(shlex.split(cmd), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{cmd!r} failed:\\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def print_table(header, rows):
    \"\"\"A plain-text table: first column left-aligned, the others right-aligned.\"\"\"
    rows = [tuple(map(str, header))] + [tuple(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for n, r in enumerate(rows):
        print("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
        if n == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))


PARTS = ("vision", "projector", "compressor", "prefusion", "llm")
""")

code("""
summary = {
    "llava15_vicuna7b": mmlm_json("mmlm summary --config configs/llava15_vicuna7b.py --json"),
    "llava_mini_vicuna7b": mmlm_json("mmlm summary --config configs/llava_mini_vicuna7b.py --json"),
}
rows = [(part, *(f"{s['params'][part]:,}" for s in summary.values())) for part in PARTS + ("total",)]
rows.append(("vision tokens / image", *(s["llm_vision_tokens"] for s in summary.values())))
rows.append(("LLM sequence (64 text)", *(s["sequence_lengths"]["llm"] for s in summary.values())))
print_table(("parameters", *summary), rows)
""")

md("""
`mmlm bench flops` counts the FLOPs of **one image-question** (the prefill up to the first answer
token, 43 text tokens) per part, analytically (2 x multiply-adds of every matmul) and from XLA's
cost analysis of each part compiled on abstract shapes (about 20 s per model on a CPU). LLaVA-Mini
pays for the pre-fusion layers (they see all 576 patches) but its LLM sees 44 instead of 619 tokens.
""")

code("""
FLOPS_ARGS = os.environ.get("MMLM_COLAB_FLOPS_ARGS", "")  # "--analytic_only" skips the XLA compiles
flops = {
    "llava15_vicuna7b": mmlm_json(f"mmlm bench flops --config configs/llava15_vicuna7b.py --json --no_whole_model {FLOPS_ARGS}"),
    "llava_mini_vicuna7b": mmlm_json(f"mmlm bench flops --config configs/llava_mini_vicuna7b.py --json --no_whole_model {FLOPS_ARGS}"),
}
rows = [(part, *(f"{r['analytic'][part] / 1e12:.3f}" for r in flops.values())) for part in PARTS + ("total",)]
if all("xla" in r for r in flops.values()):
    rows.append(("total (XLA count)", *(f"{r['xla']['total'] / 1e12:.3f}" for r in flops.values())))
print_table(("TFLOPs / image-question", *flops), rows)
base, mini = (r["analytic"]["total"] for r in flops.values())
print(f"\\nLLaVA-Mini needs {mini / base:.1%} of LLaVA-1.5's FLOPs ({base / mini:.1f}x fewer)")
""")

# --------------------------------------------------------------------------- 3. python API
md("""
## 3. A tiny random LLaVA-Mini with the Python API

`configs/tiny.py` is the test-sized model: a 3-block ViT on 32 px images (16 patches), a 2-layer
LLM of width 32, and a Matryoshka compressor with M = 4 queries serving budgets m = 1 and 4. A
batch has `input_ids` with one `IMAGE_TOKEN_ID` placeholder per sample, `attention_mask`,
`fuse_mask` (the instruction tokens pre-fusion reads: not the placeholder, not the answer), `images`
of shape (batch, frames, views, H, W, 3) and `frame_mask`. The training targets, `labels` (-100 = not
supervised), stay outside the model: the loss gathers them with the `text_index` the model returns.
""")

code("""
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import mmlm
from mmlm.config_utils import load_config
from mmlm.models.config import model_config_from_dict
from mmlm.models.llava_mini import LlavaMini
from mmlm.models.loss import targets_from_labels, token_loss

config = load_config("configs/tiny.py")
cfg = model_config_from_dict(config.model)
print("budgets:", cfg.supported_budgets, "| default:", cfg.default_budget,
      "| patches per image:", cfg.vision.num_patches, "| vocab:", cfg.llm.vocab_size)

B, T, S = 2, 12, cfg.image_size
rng = np.random.default_rng(0)
input_ids = rng.integers(3, cfg.llm.vocab_size, (B, T)).astype(np.int32)
input_ids[:, 1] = mmlm.IMAGE_TOKEN_ID               # where the image goes
labels = np.full((B, T), mmlm.IGNORE_INDEX, np.int32)
labels[:, -4:] = input_ids[:, -4:]                  # supervise the last 4 tokens ("the answer")
batch = {
    "input_ids": input_ids,
    "attention_mask": np.ones((B, T), bool),
    "fuse_mask": (labels == mmlm.IGNORE_INDEX) & (input_ids != mmlm.IMAGE_TOKEN_ID),
    "images": rng.standard_normal((B, 1, 1, S, S, 3)).astype(np.float32),  # 1 frame, 1 view
    "frame_mask": np.ones((B, 1), bool),
}

model = LlavaMini(cfg)
variables = model.init(jax.random.key(0), batch)
params = nn.unbox(variables)["params"]               # plain arrays (the init boxes them with axis names)
for part, tree in params.items():
    print(f"{part:<11}{sum(x.size for x in jax.tree.leaves(tree)):>8,} parameters")
""")

md("""
The forward returns logits over the LLM sequence: T - 1 text positions plus m vision tokens (the
placeholder is replaced). `num_vision_tokens` picks the Matryoshka budget. With random weights the
loss is about ln(vocab) = ln(512) = 6.2.
""")

code("""
for m in cfg.supported_budgets:
    out = model.apply({"params": params}, batch, num_vision_tokens=m)
    loss = token_loss(out["logits"], targets_from_labels(labels, out["text_index"]))["loss"]
    print(f"m={m}: logits {out['logits'].shape} (T - 1 + m = {T - 1 + m}), loss {float(loss):.3f}")
""")

md("""
**Matryoshka property.** The compressor's queries never attend to each other, so the m-token
output is exactly the first m rows of the M-token output: one set of weights, any budget.
""")

code("""
v = {"params": params}
feats = model.apply(v, batch["images"], method=LlavaMini.encode_images)          # (B, F, K, N, Dv)
tokens = {m: model.apply(v, feats, m, method=LlavaMini.compress) for m in cfg.supported_budgets}
M = max(tokens)
print("ViT features:", feats.shape)
for m, t in tokens.items():
    diff = float(jnp.max(jnp.abs(t - tokens[M][:, :, :m])))
    print(f"m={m}: tokens {t.shape}; max |m-token output - first {m} of the {M}-token output| = {diff:.1e}")
    assert diff < 1e-5
""")

# --------------------------------------------------------------------------- 4. data
md("""
## 4. Synthetic data

`mmlm data synth` renders LLaVA-format datasets that exercise every code path. `shapes`: 1-3
coloured shapes on a 3x3 grid with one-word questions about colour, shape, count, relative
position and existence. It writes `OUT/SPLIT.json` (LLaVA conversations), `OUT/SPLIT_questions.jsonl`
(one question per line, for `mmlm eval`) and the images. The demo renders its own training set the
same way (48 px images); here are a few.
""")

code("""
from IPython.display import display
from PIL import Image

!mmlm data synth --kind shapes --out {RUN_DIR}/peek --num 6 --seed 0 --split peek --image-size 48 --questions-per-image 3 --overwrite

records = json.load(open(f"{RUN_DIR}/peek/peek.json"))
for rec in records[:4]:
    display(Image.open(f"{RUN_DIR}/peek/{rec['image']}").resize((144, 144), Image.NEAREST))
    turns = rec["conversations"]
    for human, gpt in zip(turns[::2], turns[1::2]):
        print(f"  Q: {human['value'].replace('<image>', '').strip():<55} A: {gpt['value']}")
""")

# --------------------------------------------------------------------------- 5. train
md("""
## 5. Train the demo

`configs/demo.py` is a small LLaVA-Mini (ViT, 1 vision token, 2 pre-fusion layers, 2-layer LLM,
about 1.5 M parameters) trained from scratch: on first use it renders 12,000 `shapes` images (3
questions each) and builds them into a TFDS dataset under the workdir, pretrains the ViT for a few
seconds to name the colour and shape in each patch (the stand-in for a pretrained CLIP tower),
trains for @STEPS@ steps (AdamW; warmup, a flat learning rate, a short final decay) and ends with
greedy exact-match accuracy on 500 held-out questions (92-93% on the development CPU).

**Time:** about 6 minutes on a 2-core CPU for the full demo (`STEPS = @N@`); faster on a GPU/TPU
runtime. Lower `STEPS` for a quick look (the accuracy will be lower: the lookups of an object by
its colour or shape are learned after a few hundred steps, see the README's "The demo").
Re-running the cell resumes from the last checkpoint in `WORKDIR` (delete it to start over).
""".replace("@STEPS@", f"{DEMO_STEPS:,}").replace("@N@", str(DEMO_STEPS)))

code("""
STEPS = int(os.environ.get("MMLM_COLAB_STEPS", @STEPS@))     # @STEPS@ = the full demo
WORKDIR = f"{RUN_DIR}/demo"
EXTRA = os.environ.get("MMLM_COLAB_TRAIN_ARGS", "")        # more --config.* overrides, if any
CONFIG = os.environ.get("MMLM_COLAB_CONFIG", "configs/demo.py")  # the demo (tests: the tiny model)

!mmlm train --config {CONFIG} --workdir {WORKDIR} --config.train.steps={STEPS} {EXTRA}
""".replace("@STEPS@", str(DEMO_STEPS)))

md("""
Every `log_every` steps the trainer appends a row to `WORKDIR/metrics.jsonl` (loss, token accuracy,
learning rate, throughput, ...); evaluation rows carry `eval/...` keys. `results.json` holds the
final numbers.
""")

code("""
rows = [json.loads(line) for line in open(f"{WORKDIR}/metrics.jsonl") if line.strip()]
train_rows = [r for r in rows if "loss" in r]
steps = [r["step"] for r in train_rows]

try:
    import matplotlib.pyplot as plt
except ImportError:
    plt = None
if plt is not None and train_rows:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
    ax1.plot(steps, [r["loss"] for r in train_rows])
    ax1.set(xlabel="step", ylabel="train loss", yscale="log", title="loss")
    ax2.plot(steps, [r["token_accuracy"] for r in train_rows])
    ax2.set(xlabel="step", ylabel="token accuracy", ylim=(0, 1), title="answer-token accuracy")
    plt.show()
else:
    for r in train_rows[:: max(1, len(train_rows) // 12)] + train_rows[-1:]:
        print(f"step {r['step']:>5}  loss {r['loss']:.4f}  token accuracy {r['token_accuracy']:.3f}")

results = json.load(open(f"{WORKDIR}/results.json"))
print({k: v for k, v in results.get("eval", {}).items() if k.startswith("eval/")})
""")

# --------------------------------------------------------------------------- chat + eval
md("""
### Chat with the trained model

A fresh image (`--split test --seed 1`: a random stream the training data never used). `mmlm chat`
answers one question with `--prompt` (interactive without it); `--save_compression_map` draws where
the compressed vision token looks: its cross-attention over the ViT patches, averaged over heads.
""")

code("""
NUM_QUESTIONS = int(os.environ.get("MMLM_COLAB_NUM_QUESTIONS", 100))
!mmlm data synth --kind shapes --out {RUN_DIR}/fresh --num {NUM_QUESTIONS} --seed 1 --split test --image-size 48 --overwrite

questions = [json.loads(line) for line in open(f"{RUN_DIR}/fresh/test_questions.jsonl")]
q = questions[0]
IMAGE, QUESTION = f"{RUN_DIR}/fresh/{q['image']}", q["text"]
display(Image.open(IMAGE).resize((144, 144), Image.NEAREST))
print("question:", QUESTION, "| reference answer:", q["answer"])
""")

code("""
!mmlm chat --workdir {WORKDIR} --image {IMAGE} --prompt "{QUESTION}" --max_new_tokens 8 --save_compression_map {RUN_DIR}/compression_map.png --overwrite

display(Image.open(f"{RUN_DIR}/compression_map.png"))
""")

md("""
### Evaluate on fresh questions

`mmlm eval` answers a question JSONL (greedy, batched) and scores exact match, overall and per
question category. Images are found relative to the JSONL (`--images` overrides that).
""")

code("""
!mmlm eval --workdir {WORKDIR} --data {RUN_DIR}/fresh/test_questions.jsonl --out {RUN_DIR}/eval --max_new_tokens 4 --no_progress --overwrite

metrics = json.load(open(f"{RUN_DIR}/eval/metrics.json"))
row = metrics["rows"][0]
print(f"exact match: {row['accuracy']:.1%} of {row['count']} questions ({row['num_vision_tokens']} vision token)")
print_table(("category", "accuracy"), [(c, f"{a:.1%}") for c, a in sorted(row["by_category"].items())])
""")

md("""
## Next steps

* `mmlm bench flops --config configs/mqt_llava_mini_vicuna7b.py --num_vision_tokens 16`: FLOPs at
  another Matryoshka budget; `mmlm bench video-memory`: KV-cache bytes vs video frames.
* `mmlm train --config configs/tiny.py --workdir W` trains a Matryoshka model (budgets 1 and 4);
  `mmlm eval --workdir W --data ... --num_vision_tokens 1,4` compares the budgets.
* `mmlm convert` imports the released LLaVA-Mini weights from Hugging Face (a GPU/TPU runtime
  with enough memory is needed for 7B models).
""")


# =========================================================================== explore_compression
notebook(EXPLORE)

md("""
# Explore the compressor: what one vision token sees

LLaVA-Mini squeezes an image into a handful of vision tokens (one, in the paper's headline model)
with a *query compressor*: learned queries cross-attend over the ViT's patch features. mmlm's
**Matryoshka** compressor trains one set of M queries so that the first m of them work on their
own, for every budget m it was trained with.

This notebook:

1. trains a small Matryoshka LLaVA-Mini on the synthetic *shapes* data (or reuses one),
2. asks it questions about synthetic images at every token budget,
3. runs a **real photo** through the same pad-to-square / resize / normalise path the model uses,
4. draws the compressor's **attention maps**: where each compressed token looks,
5. plots **accuracy and FLOPs per token budget**.

It runs on a free Colab CPU runtime; the first run trains for about 6 minutes (set
`MMLM_COLAB_STEPS` lower for a quick look: the answers get worse, every cell still runs).
""")

md("""
## Setup

As in `mmlm_quickstart.ipynb`: the checkout holding this notebook in local Jupyter, else
`/content/mmlm` on Colab (or `MMLM_REPO`), installed with `pip install -e .`. `RUN_DIR` receives the data, the checkpoint and the plots.
""")

code("""
import os
import re
import sys

""" + REPO_SETUP)

code("""
if os.environ.get("MMLM_COLAB_SKIP_INSTALL") != "1":
    !pip install -q -e ".[data]" matplotlib
""")

code("""
import io
import json
import warnings

import jax
import numpy as np
from IPython.display import display
from PIL import Image

warnings.filterwarnings("ignore", message=r"os\\.fork\\(\\) was called")
print("JAX", jax.__version__, "| backend:", jax.default_backend())
try:
    import matplotlib.pyplot as plt
except ImportError:  # the plots below fall back to printed tables
    plt = None
""")

# --------------------------------------------------------------------------- 1. train
md("""
## 1. A Matryoshka model

`configs/demo.py` is the demo of the quickstart: a small LLaVA-Mini (ViT on 48 px images with a
3 x 3 patch grid, 2 pre-fusion layers, 2-layer LLM) trained from scratch on *shapes*. Here its
compressor gets **M = 4 queries** (a 2 x 2 query grid) trained Matryoshka-style with budgets
**1 and 4**: each step samples a budget and uses only the first m queries.

If `WORKDIR` already holds a checkpoint, `mmlm train` resumes from it (and stops at once if it
already reached `STEPS`). Point `MMLM_EXPLORE_WORKDIR` at another Matryoshka run to skip training.
""")

code("""
CONFIG = os.environ.get("MMLM_COLAB_CONFIG", "configs/demo.py")
STEPS = int(os.environ.get("MMLM_COLAB_STEPS", @STEPS@))     # @STEPS@ = the demo's own schedule
EXTRA = os.environ.get("MMLM_COLAB_TRAIN_ARGS", "")        # more --config.* overrides, if any
WORKDIR = os.environ.get("MMLM_EXPLORE_WORKDIR", f"{RUN_DIR}/matryoshka")
MATRYOSHKA = '--config.model.compressor.tokens=4 "--config.model.compressor.budgets=(1,4)"'

if "MMLM_EXPLORE_WORKDIR" not in os.environ:
    !mmlm train --config {CONFIG} --workdir {WORKDIR} --config.train.steps={STEPS} {MATRYOSHKA} {EXTRA}
""".replace("@STEPS@", str(DEMO_STEPS)))

code("""
from mmlm.cli.common import quiet_library_logs
from mmlm.infer.loading import load_inference_model

quiet_library_logs()  # no Orbax/absl chatter about read-only checkpoint directories
im = load_inference_model(workdir=WORKDIR)
cfg = im.cfg
BUDGETS = list(cfg.supported_budgets)
print(f"budgets {BUDGETS} | {cfg.vision.num_patches} patches per {im.image_size} px image "
      f"| compressor grid {cfg.compressor.grid} x {cfg.compressor.grid} | template {im.template!r}")
""")

# --------------------------------------------------------------------------- 2. ask
md("""
## 2. Questions about synthetic images

Fresh images from a random stream the training data never used (`--split test --seed 1`). The
helper `ask` is what `mmlm chat` does for one question: encode the prompt with the model's
template, build a batch, decode greedily until the end-of-turn token. `num_vision_tokens` picks
the budget: the same weights answer with 1 or with 4 vision tokens.
""")

code("""
import jax.random

from mmlm.infer.chat import answer
from mmlm.infer.loading import load_image_pixels

NUM_QUESTIONS = int(os.environ.get("MMLM_COLAB_NUM_QUESTIONS", 500))
!mmlm data synth --kind shapes --out {RUN_DIR}/fresh --num {NUM_QUESTIONS} --seed 1 --split test --image-size {im.image_size} --overwrite


def ask(pixels, question, m=None, max_new_tokens=8):
    \"\"\"Greedy answer of the model to `question` about `pixels` (1, K, H, W, 3) with m vision tokens.\"\"\"
    return answer(im, pixels, question, [], num_vision_tokens=m, max_new_tokens=max_new_tokens,
                  temperature=0.0, top_p=1.0, rng=jax.random.key(0), out=io.StringIO()).strip()


questions = [json.loads(line) for line in open(f"{RUN_DIR}/fresh/test_questions.jsonl")]
for q in questions[:4]:
    pixels = load_image_pixels(im, f"{RUN_DIR}/fresh/{q['image']}")
    display(Image.open(f"{RUN_DIR}/fresh/{q['image']}").resize((120, 120), Image.NEAREST))
    answers = {m: ask(pixels, q["text"], m) for m in BUDGETS}
    print(f"Q: {q['text']}  reference: {q['answer']!r}  " +
          "  ".join(f"m={m}: {a!r}" for m, a in answers.items()))
""")

# --------------------------------------------------------------------------- 3. photo
md("""
## 3. A real photo through the real preprocessing

Any image goes through the same three steps as in training (LLaVA's recipe):

1. **pad to a square** with the CLIP mean colour, image centred (nothing is cropped away),
2. **resize** to the model's input size (bicubic),
3. **normalise** each channel with the CLIP mean and standard deviation.

The photo comes from a package, nothing is downloaded: scikit-image's astronaut when scikit-image
is installed, else the portrait of Grace Hopper that ships with matplotlib.
""")

code("""
from mmlm.data import preprocess


def sample_photo():
    \"\"\"(name, RGB PIL image) of a photo shipped with an installed package.\"\"\"
    try:
        from skimage import data as skdata

        return "astronaut (scikit-image)", Image.fromarray(skdata.astronaut())
    except ImportError:
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            return "Grace Hopper (matplotlib)", Image.open(f).convert("RGB")


name, photo = sample_photo()
print(f"{name}: {photo.size[0]} x {photo.size[1]} px, mode {photo.mode}")
square = preprocess.expand_to_square(photo, preprocess.mean_color(im.image_mean))
resized = square.resize((im.image_size, im.image_size), Image.BICUBIC)
pixels = preprocess.normalize(np.asarray(resized)[None], im.image_mean, im.image_std)
print("padded to", square.size, "| resized to", resized.size, "| normalised", pixels.shape, pixels.dtype)
print("per-channel mean after normalisation:", pixels.reshape(-1, 3).mean(0).round(2),
      "| std:", pixels.reshape(-1, 3).std(0).round(2))

# The library's one-call path is exactly these steps (it is what chat, eval and training use).
same = preprocess.preprocess_image(photo, im.image_size, im.hd_grid, im.image_mean, im.image_std)
assert np.array_equal(same, pixels), "preprocess_image differs from the step-by-step path"

if plt is not None:
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4))
    for ax, img, title in zip(axes, (photo, square, resized), ("original", "padded to a square",
                                                                f"resized to {im.image_size} px")):
        ax.imshow(img)
        ax.set_title(title)
        ax.axis("off")
    plt.show()
else:
    display(square.resize((160, 160)), resized.resize((160, 160), Image.NEAREST))
""")

md("""
The model only knows the *shapes* world (its vocabulary is a few hundred colour and shape words),
so its answers about a photo are guesses in that vocabulary. The point here is the path: a photo
of any size and aspect ratio reaches the model exactly as its training images did.
""")

code("""
photo_pixels = pixels[None]           # (1 image, K=1 view, H, W, 3)
for question in ("What color is the object?", "How many objects are there?"):
    print(f"Q: {question}  " + "  ".join(f"m={m}: {ask(photo_pixels, question, m)!r}" for m in BUDGETS))
""")

# --------------------------------------------------------------------------- 4. maps
md("""
## 4. Where the compressed tokens look

`mmlm.infer.compression_map.compression_maps` recomputes the compressor's cross-attention from its
parameters: for each compressed token, a distribution over the ViT's patch grid (averaged over the
heads). Matryoshka prefixes are exact: the map of token 0 is the same at budget 1 and at budget 4.
`render_compression_map` draws them over the image the compressor saw (what
`mmlm chat --save_compression_map` writes).
""")

code("""
from mmlm.infer.compression_map import compression_maps, display_image, render_compression_map

synthetic = load_image_pixels(im, f"{RUN_DIR}/fresh/{questions[0]['image']}")
M = max(BUDGETS)
for title, px in (("synthetic image", synthetic), (name, photo_pixels)):
    maps = compression_maps(cfg, im.params, px[None], M)[0]            # (frames, m, g, g)
    first = compression_maps(cfg, im.params, px[None], min(BUDGETS))[0]
    assert np.allclose(first[:, 0], maps[:, 0], atol=1e-6), "token 0 differs between budgets"
    shown = [display_image(cfg, frame, im.image_mean, im.image_std) for frame in px]
    print(f"{title}: {M} maps over a {maps.shape[-2]} x {maps.shape[-1]} patch grid; "
          f"token 0 attends most to patch (row, column) "
          f"{tuple(int(i) for i in np.unravel_index(maps[0, 0].argmax(), maps.shape[-2:]))}")
    display(render_compression_map(shown, maps, panel_size=160))
""")

code("""
if plt is not None:
    fig, axes = plt.subplots(1, M, figsize=(2.6 * M, 2.6))
    for i, ax in enumerate(np.atleast_1d(axes)):
        ax.imshow(maps[0, i], cmap="inferno", vmin=0)
        ax.set_title(f"token {i}")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"attention over the patch grid ({name})")
    plt.show()
""")

# --------------------------------------------------------------------------- 5. budgets
md("""
## 5. Accuracy and FLOPs per token budget

`mmlm eval --num_vision_tokens 1,4` answers every fresh question at each budget (exact match,
per category). `mmlm.bench.flops.flops_report` counts the FLOPs of one image-question prefill per
part (analytic: 2 x multiply-adds of every matmul). For this small model the LLM is cheap, so the
budget barely moves the total; the same count for the 7B Matryoshka config
(`configs/mqt_llava_mini_vicuna7b.py`) shows why fewer vision tokens matter at scale.
""")

code("""
!mmlm eval --workdir {WORKDIR} --data {RUN_DIR}/fresh/test_questions.jsonl --out {RUN_DIR}/eval_budgets --num_vision_tokens {",".join(map(str, BUDGETS))} --max_new_tokens 4 --no_progress --overwrite

metrics = json.load(open(f"{RUN_DIR}/eval_budgets/metrics.json"))
accuracy = {row["num_vision_tokens"]: row["accuracy"] for row in metrics["rows"]}
categories = sorted(metrics["rows"][0]["by_category"])
for row in metrics["rows"]:
    print(f"m={row['num_vision_tokens']}: {row['accuracy']:.1%} of {row['count']} | " +
          ", ".join(f"{c} {row['by_category'][c]:.0%}" for c in categories))
""")

code("""
from mmlm.bench.flops import flops_report, load_model_config

TEXT = 43  # instruction tokens of one question (the quickstart's count)
small = {m: flops_report(cfg, TEXT, m, xla=False)["analytic"] for m in BUDGETS}
big_cfg = load_model_config("configs/mqt_llava_mini_vicuna7b.py")
BIG_BUDGETS = list(big_cfg.supported_budgets)
big = {m: flops_report(big_cfg, TEXT, m, xla=False)["analytic"] for m in BIG_BUDGETS}
for title, table in (("this model", small), ("7B Matryoshka config", big)):
    print(title)
    for m, parts in table.items():
        print(f"  m={m:<3} total {parts['total'] / 1e9:10.3f} GFLOPs   llm {parts['llm'] / 1e9:10.3f}   "
              f"prefusion {parts['prefusion'] / 1e9:10.3f}")
""")

code("""
if plt is not None:
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 3.6))
    ax1.plot(BUDGETS, [accuracy[m] for m in BUDGETS], "o-")
    ax1.set(xlabel="vision tokens m", ylabel="exact match", ylim=(0, 1), xscale="log", xticks=BUDGETS,
            xticklabels=BUDGETS, title="accuracy (this model)")
    ax2.plot(BUDGETS, [small[m]["total"] / 1e6 for m in BUDGETS], "o-")
    ax2.set(xlabel="vision tokens m", ylabel="MFLOPs / image-question", xscale="log", xticks=BUDGETS,
            xticklabels=BUDGETS, title="FLOPs (this model)")
    for part in ("vision", "prefusion", "llm"):
        ax3.plot(BIG_BUDGETS, [big[m][part] / 1e12 for m in BIG_BUDGETS], "o-", label=part)
    ax3.plot(BIG_BUDGETS, [big[m]["total"] / 1e12 for m in BIG_BUDGETS], "k--", label="total")
    ax3.set(xlabel="vision tokens m", ylabel="TFLOPs / image-question", xscale="log", xticks=BIG_BUDGETS,
            xticklabels=BIG_BUDGETS, title="FLOPs (7B Matryoshka config)")
    ax3.legend()
    plt.tight_layout()
    plt.savefig(f"{RUN_DIR}/budgets.png", dpi=80)
    plt.show()
""")

md("""
## Next steps

* Train with more budgets: `--config.model.compressor.tokens=9 "--config.model.compressor.budgets=(1,4,9)"`
  (the 3 x 3 patch grid of the demo allows up to 9 queries that each can own a patch).
* `mmlm chat --workdir WORKDIR --image PHOTO --num_vision_tokens 1 --save_compression_map maps.png`
  does sections 2 and 4 from the command line.
* `mmlm bench flops --config configs/mqt_llava_mini_vicuna7b.py --num_vision_tokens 16` adds XLA's
  own count to the analytic one.
""")


# =========================================================================== cloud_tpu
notebook(CLOUD_TPU)

md("""
# Training on a Cloud TPU slice

A Cloud TPU *slice* (for example `v5p-8`: 4 chips, 1 host; `v5p-64`: 32 chips on 8 hosts) runs one
`mmlm train` process per host; JAX joins them into one program over all chips. This notebook walks
through the four things to get right, in the order you need them:

1. **the mesh**: how `config.mesh` splits the batch and the weights over the chips,
2. **`mmlm compile`**: compile the real train step for a slice *on this machine*, before renting it,
   to learn whether the config fits in HBM and how fast a step should be,
3. **launching on every host** with `gcloud compute tpus tpu-vm ssh --worker=all`,
4. **resuming after a preemption** from the workdir's checkpoints.

Everything except the TPU-only steps runs here on a CPU: the mesh and the preemption drill use 8
simulated CPU devices. Cells that need libtpu, `gcloud` or a TPU say so and skip themselves.
""")

code("""
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

""" + REPO_SETUP)

code("""
if os.environ.get("MMLM_COLAB_SKIP_INSTALL") != "1":
    !pip install -q -e ".[data]"
""")

# --------------------------------------------------------------------------- 1. mesh
md("""
## 1. The mesh

`config.mesh` names three axes, whose sizes multiply to the number of chips (one of them may be
`-1`: all the chips left):

| axis | splits | costs per step |
| --- | --- | --- |
| `data` | the batch (weights replicated) | one all-reduce of the gradients |
| `fsdp` | the batch **and** the weights / optimizer state | all-gathers of the weights, reduce-scatter of the gradients |
| `tensor` | attention heads and MLP columns inside each layer | activations exchanged inside every layer |

Rules of thumb: start with `fsdp` = all chips (weights and Adam state spread over every chip's
HBM); add `tensor` = 2 or 4 only when one layer's activations do not fit; keep `data` > 1 for the
axis that crosses slices. The global batch (`data.batch_size`) must divide by `data x fsdp`, and
the attention heads by `tensor`.

The cell below resolves a few meshes for 8 devices, the way `mmlm train` does
(`mmlm.sharding.mesh_shape`), and shows the mistakes it refuses.
""")

code("""
from mmlm.sharding import mesh_shape

for mesh in ({"data": -1}, {"fsdp": -1}, {"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": -1, "tensor": 2},
             {"fsdp": 3}):
    try:
        print(f"{str(mesh):<42} -> {mesh_shape(mesh, 8)}")
    except ValueError as e:
        print(f"{str(mesh):<42} -> refused: {e}")
""")

md("""
On the command line the mesh is three overrides. Here 8 *simulated* CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`) stand in for a `v5p-16` slice: the tiny
test model trains with its weights sharded 2-way (`fsdp`) and its heads 2-way (`tensor`), and its
batch split 4-way (`data x fsdp`). The same command runs on a TPU slice unchanged.
""")

code("""
STEPS = int(os.environ.get("MMLM_COLAB_TPU_STEPS", 300))
WORKDIR = f"{RUN_DIR}/tpu_drill"
MESH = "--config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2"
TRAIN = (f"mmlm train --config configs/tiny.py --workdir {WORKDIR} --config.train.steps={STEPS} "
         f"--config.train.checkpoint_every={max(STEPS // 4, 1)} --config.train.log_every=1 {MESH}")
XLA_FLAGS = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"  # 8 CPU "chips"
ENV = {**os.environ, "XLA_FLAGS": XLA_FLAGS.strip(), "JAX_PLATFORMS": "cpu",
       "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR", f"{RUN_DIR}/jax_cache")}
shutil.rmtree(WORKDIR, ignore_errors=True)   # a fresh run for the drill below
print(TRAIN)
""")

# --------------------------------------------------------------------------- 2. compile
md("""
## 2. Check that a config fits a slice: `mmlm compile`

Renting a slice to find out that the model does not fit is expensive. `mmlm compile` compiles the
real train step (the trainer's own, with the config's mesh) for a **named slice** on this machine:
libtpu describes the slice's chips (`jax.experimental.topologies`) and the TPU compiler runs here,
without a TPU. Its report gives the memory per chip (arguments, temporaries, outputs) against the
chip's HBM (`fits`), the analytic FLOPs per step and an estimated step time.

    mmlm compile --config configs/llava_mini_vicuna7b.py --topology v5p-8 --json

It needs the `libtpu` package (`pip install libtpu`; Colab TPU runtimes have it). Without it, or
with an mmlm that has no `compile` command, the cell says so and skips.
""")

code("""
from mmlm.cli import COMMANDS

COMPILE_CONFIG = os.environ.get("MMLM_COLAB_COMPILE_CONFIG", "configs/llava_mini_vicuna7b.py")
TOPOLOGY = os.environ.get("MMLM_COLAB_TOPOLOGY", "v5p-8")


def compile_unavailable():
    \"\"\"Why `mmlm compile` cannot run here, or None when it can.\"\"\"
    if os.environ.get("MMLM_COLAB_COMPILE", "1") == "0":
        return "turned off with MMLM_COLAB_COMPILE=0"
    if "compile" not in COMMANDS:
        return "this mmlm has no `mmlm compile` command (update the repository)"
    if importlib.util.find_spec("libtpu") is None:
        return "libtpu is not installed (`pip install libtpu`, or use a Colab TPU runtime)"
    try:
        from jax.experimental import topologies  # noqa: F401
    except ImportError as e:
        return f"this JAX has no jax.experimental.topologies ({e})"
    return None


why = compile_unavailable()
if why:
    print(f"SKIPPED: mmlm compile for {TOPOLOGY}: {why}.")
    compile_report = None
else:
    cmd = f"mmlm compile --config {COMPILE_CONFIG} --topology {TOPOLOGY} --json"
    print(cmd)
    proc = subprocess.run(shlex.split(cmd), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed:\\n{proc.stderr[-3000:]}")
    compile_report = json.loads(proc.stdout)
    per_chip = compile_report.get("per_chip_bytes", {})
    print(f"fits on {TOPOLOGY}: {compile_report['fits']} "
          f"({100 * compile_report.get('hbm_fraction', float('nan')):.1f}% of HBM per chip)")
    for key, value in per_chip.items():
        print(f"  {key:<12} {value / 2**30:8.2f} GiB per chip")
    for key in ("model_flops_per_step", "estimated_step_seconds", "projected_mfu", "compile_seconds"):
        if key in compile_report:
            print(f"  {key}: {compile_report[key]:.4g}")
""")

md("""
If it does not fit: shard more (`--config.mesh.fsdp=-1`), rematerialise activations
(`--config.model.remat_policy=dots` or `full`), or lower the batch per chip
(`--config.data.batch_size`). Re-run the compile after each change: each costs minutes on this
machine instead of an hour on the slice.
""")

# --------------------------------------------------------------------------- 3. launch
md("""
## 3. Launch on every host

A slice of more than one host (v5p-16 and up, v5litepod-16 and up) runs the **same command on
every host**; `--multihost` makes each process call `jax.distributed.initialize()`, which finds
the other hosts from the TPU metadata. Every host needs the repository, the installed package and
the same view of the workdir and data: use a bucket mounted with gcsfuse or a Filestore share for
`--workdir` and `--config.synthetic.cache_dir` / `--config.data.dataset_dir`.

```bash
# once: create the slice (spot VMs are cheap but can be preempted at any time)
gcloud compute tpus tpu-vm create mmlm-v5p --zone=us-east5-a --accelerator-type=v5p-16 \\
    --version=v2-alpha-tpuv5 --spot
# copy the repository to every host, install it everywhere
gcloud compute tpus tpu-vm scp --recurse ./mmlm mmlm-v5p: --zone=us-east5-a --worker=all
gcloud compute tpus tpu-vm ssh mmlm-v5p --zone=us-east5-a --worker=all \\
    --command='pip install -e "./mmlm[data]" "jax[tpu]"'
```

The cell below writes the launch command for your slice; it runs it only when
`MMLM_TPU_NAME` and `MMLM_TPU_ZONE` are set and `gcloud` is installed.
""")

code("""
TPU_NAME = os.environ.get("MMLM_TPU_NAME", "mmlm-v5p")
TPU_ZONE = os.environ.get("MMLM_TPU_ZONE", "us-east5-a")
SHARED = "/mnt/shared"   # the same directory on every host (gcsfuse bucket or Filestore)
remote = (f"cd mmlm && mmlm train --config configs/llava_mini_vicuna7b.py --workdir {SHARED}/llava_mini_7b "
          f"--multihost --config.mesh.fsdp=-1")
launch = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", TPU_NAME, f"--zone={TPU_ZONE}", "--worker=all",
          f"--command={remote}"]
print(shlex.join(launch))

if "MMLM_TPU_NAME" in os.environ and "MMLM_TPU_ZONE" in os.environ and shutil.which("gcloud"):
    subprocess.run(launch, check=True)
else:
    print("SKIPPED: set MMLM_TPU_NAME and MMLM_TPU_ZONE (and install gcloud) to launch on your slice.")
""")

md("""
`--worker=all` starts the processes in parallel and streams every host's output, so the log
lines are interleaved; only process 0 writes `metrics.jsonl` and the TensorBoard events. If one
host fails, the others block in their next collective: stop all of them
(`--command='pkill -f "mmlm train"'` on `--worker=all`) and start again: the run resumes.
""")

# --------------------------------------------------------------------------- 4. preemption
md("""
## 4. Resuming after a preemption

Spot and preemptible slices get a SIGTERM some seconds before they are taken away. `mmlm train`
then finishes the current step, saves a checkpoint (on a multi-host slice the hosts first agree
on the step), and exits with status 143. Every `train.checkpoint_every` steps it saves anyway.
Running **the same command again** resumes from the newest checkpoint in the workdir: same data
order, same optimizer state, same learning-rate schedule.

The drill below does it for real on the 8 simulated devices: start the run from section 1, send
SIGTERM once a few steps are logged, then run the same command again.
""")

code("""
def logged_steps():
    \"\"\"Steps of the training rows in metrics.jsonl so far (a line being written is skipped).\"\"\"
    steps = []
    if os.path.exists(f"{WORKDIR}/metrics.jsonl"):
        for line in open(f"{WORKDIR}/metrics.jsonl"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in row:
                steps.append(row["step"])
    return steps


proc = subprocess.Popen(shlex.split(TRAIN), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
while proc.poll() is None and len(logged_steps()) < 3:
    time.sleep(0.2)
if proc.poll() is None:
    proc.send_signal(signal.SIGTERM)      # what the TPU runtime sends before taking the VMs away
out = proc.communicate()[0]
print("\\n".join(out.strip().splitlines()[-4:]))
print(f"exit status {proc.returncode} (143 = preempted, checkpoint saved); steps logged: {len(logged_steps())}")
checkpoints = sorted(int(d) for d in os.listdir(f"{WORKDIR}/checkpoints") if d.isdigit())
print("checkpoints on disk:", checkpoints)
""")

code("""
resumed = subprocess.run(shlex.split(TRAIN), env=ENV, capture_output=True, text=True)
if resumed.returncode:
    raise RuntimeError(f"resume failed:\\n{resumed.stderr[-3000:]}")
print("\\n".join(l for l in resumed.stderr.splitlines() if "resum" in l.lower() or "steps " in l)[-1500:])
steps = logged_steps()
print(f"logged steps: {steps[0]}..{steps[-1]} ({len(steps)} rows)")
assert steps[-1] == STEPS, "the resumed run did not reach the last step"
""")

md("""
A step logged twice is normal: the steps after the last checkpoint are recomputed on resume
(with SIGTERM the checkpoint is the step where it stopped, so nothing is lost). On a slice, put the
launch command of section 3 in a loop that recreates the slice when it is preempted; a queued
resource (`gcloud compute tpus queued-resources create ... --spot`) does the waiting for you.

## Checklist

* `mmlm compile --config CFG --topology SLICE` says `fits: true` before you rent the slice.
* The workdir and the data are on storage every host sees.
* The same command on every host, with `--multihost`; rerun it unchanged to resume.
""")


# --------------------------------------------------------------------------- writing
METADATA = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
    "colab": {"provenance": [], "toc_visible": True},
}


def build(name: str = QUICKSTART) -> dict:
    """Notebook `name` as a JSON-ready dict (nbformat 4.5)."""
    cells = []
    for i, (kind, text) in enumerate(NOTEBOOKS[name]):
        # Sources as lists of lines, as nbformat writes them: the same file with or without nbformat.
        cell = {"cell_type": kind, "id": f"cell-{i:02d}", "metadata": {}, "source": text.splitlines(keepends=True)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {"cells": cells, "metadata": METADATA, "nbformat": 4, "nbformat_minor": 5}


def write(name: str) -> None:
    nb = build(name)
    out = os.path.join(HERE, name)
    try:
        import nbformat
    except ImportError:
        nbformat = None
    if nbformat is not None:
        node = nbformat.from_dict(nb)
        nbformat.validate(node)
        nbformat.write(node, out)
    else:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(nb, f, indent=1, ensure_ascii=False, sort_keys=True)
            f.write("\n")
    print(f"wrote {out} ({len(nb['cells'])} cells)")


def main() -> None:
    for name in NOTEBOOKS:
        write(name)


if __name__ == "__main__":
    main()
