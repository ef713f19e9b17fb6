"""Peak memory and wall time of `mmlm chat --video` on hour-long videos (tiny model, 1 fps).

Saves a tiny random LLaVA-Mini checkpoint (configs/tiny.py, `random_params`), makes 64x64 MPEG-4 videos
of 60, 600 and 3,600 seconds at 1 frame per second with PyAV in a temporary directory, and answers one
question about each with

    python -m mmlm.cli chat --checkpoint CKPT --video V.mp4 --prompt "..." --max_new_tokens 8 --num_vision_tokens 1

in a child process (no frame cap: every frame at 1 fps, chunked encoding), reading the child's peak
resident set size from `os.wait4`. For comparison it runs the one-batch path the chunked one replaces
(`load_media` with a cap of the whole video, then `generate.generate`: every frame's pixels on the host and
all frames through the vision tower at once) in the same way. Writes `results.md` next to this file.

    python experiments/long_video/run.py [--frames 60,600,3600] [--num_vision_tokens 1] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PROMPT = "What happens in the video?"

ONE_BATCH = """
import sys
from mmlm.infer.batching import make_batch
from mmlm.infer.generate import generate, trim_answer
from mmlm.infer.loading import encode_question, load_inference_model, load_media
im = load_inference_model(checkpoint=sys.argv[1])
pixels = load_media(im, sys.argv[2], "video", max_frames=int(sys.argv[3]))
prompt = encode_question(im, sys.argv[4], True)
batch = make_batch(im.cfg, [prompt], [pixels], pad_id=im.tokenizer.pad_id, pad_len_to=32)
tokens, lengths = generate(im.cfg, im.params, batch, max_new_tokens=8, eos_id=im.stop_ids,
                           num_vision_tokens=int(sys.argv[5]))
print(im.tokenizer.decode(trim_answer(tokens[0], lengths[0])))
print(f"{pixels.shape[0]} frames", file=sys.stderr)
"""


def write_video(path: str, frames: int, size: int = 64, seed: int = 0) -> None:
    """`frames` seconds at 1 fps: a random colour per frame and a moving bright square."""
    import av

    rng = np.random.default_rng(seed)
    with av.open(path, "w") as out:
        stream = out.add_stream("mpeg4", rate=1)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.full((size, size, 3), rng.integers(0, 255, 3), np.uint8)
            x = (i * 3) % (size - 16)
            img[8:24, x:x + 16] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def run_child(argv: list[str]) -> dict:
    """Runs a child process: its exit code, wall time, peak RSS (MiB, `os.wait4`), stdout and stderr."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    with tempfile.TemporaryFile("w+") as fout, tempfile.TemporaryFile("w+") as ferr:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=fout, stderr=ferr, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        fout.seek(0)
        ferr.seek(0)
        return {"rc": proc.returncode, "wall": wall, "rss_mib": usage.ru_maxrss / 1024, "out": fout.read(),
                "err": ferr.read()}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", default="60,600,3600", help="video lengths in seconds (= frames at 1 fps)")
    p.add_argument("--workdir", default=None, help="where the checkpoint and videos go (default: a temp dir)")
    p.add_argument("--num_vision_tokens", type=int, default=1,
                   help="vision tokens per frame (default 1, LLaVA-Mini's; the tiny model supports 1 and 4)")
    p.add_argument("--one_batch_max", type=int, default=600,
                   help="run the one-batch comparison up to this many frames (it holds every frame: 3,600 "
                        "frames took 13 GiB; 0 = never)")
    p.add_argument("--out", default=os.path.join(HERE, "results.md"))
    args = p.parse_args(argv)
    frames = [int(x) for x in args.frames.split(",")]
    sys.path.insert(0, REPO)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # saving the checkpoint needs no accelerator
    from mmlm.checkpoint import save_model
    from mmlm.config_utils import load_config
    from mmlm.infer.random_model import random_params
    from mmlm.models.config import model_config_from_dict

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        config = load_config(os.path.join(REPO, "configs/tiny.py"))
        cfg = model_config_from_dict(config.model)
        ckpt = os.path.join(tmp, "ckpt")
        save_model(ckpt, random_params(cfg, seed=0), config)
        rows = []
        for n in frames:
            video = os.path.join(tmp, f"v{n}.mp4")
            write_video(video, n)
            size = os.path.getsize(video)
            chat = run_child([sys.executable, "-m", "mmlm.cli", "chat", "--checkpoint", ckpt, "--video", video,
                                    "--prompt", PROMPT, "--max_new_tokens", "8",
                                    "--num_vision_tokens", str(args.num_vision_tokens)])
            if chat["rc"] != 0:
                print(chat["err"], file=sys.stderr)
                raise SystemExit(f"mmlm chat failed on {n} frames")
            row = {"frames": n, "bytes": size, "chat": chat}
            if n <= args.one_batch_max:
                row["one"] = run_child([sys.executable, "-c", ONE_BATCH, ckpt, video, str(n), PROMPT,
                                        str(args.num_vision_tokens)])
            rows.append(row)
            print(f"{n} frames: chunked {chat['wall']:.1f} s, {chat['rss_mib']:.0f} MiB"
                  + (f"; one batch {row['one']['wall']:.1f} s, {row['one']['rss_mib']:.0f} MiB (rc {row['one']['rc']})"
                     if "one" in row else ""), flush=True)
    base = rows[0]["chat"]["rss_mib"]
    lines = ["# Long video: peak memory and wall time of `mmlm chat --video` (tiny model, 1 fps)", "",
             f"`python experiments/long_video/run.py --frames {args.frames} --num_vision_tokens {args.num_vision_tokens} --one_batch_max {args.one_batch_max}` on {cpu_name()} "
             f"({os.cpu_count()} CPUs, shared), JAX {__import__('jax').__version__}, CPU backend.", "",
             f"Tiny random LLaVA-Mini (configs/tiny.py: 32 px frames, `--num_vision_tokens "
             f"{args.num_vision_tokens}` per frame, 2 pre-fusion layers, a 2-layer 32-wide LLM), 64x64 MPEG-4 videos at 1 fps, every frame (no cap), default chunks "
             "(data.video_chunk_frames 16 frames, data.prefill_chunk_tokens 512). Peak RSS is the child "
             "process's `ru_maxrss` (`os.wait4`); wall time includes start-up and compiling.", "",
             "| frames (s at 1 fps) | video | vision tokens | chunked: wall | chunked: peak RSS | vs the first |"
             " one batch: wall | one batch: peak RSS |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        c = r["chat"]
        one = r.get("one")
        one_cells = ("| – | – |" if one is None else
                     f"| {one['wall']:.1f} s | {one['rss_mib']:.0f} MiB |" if one["rc"] == 0 else
                     f"| failed (rc {one['rc']}) | {one['rss_mib']:.0f} MiB |")
        tokens = r["frames"] * args.num_vision_tokens
        lines.append(f"| {r['frames']} | {r['bytes'] / 1024:.0f} KiB | {tokens} | {c['wall']:.1f} s | "
                     f"{c['rss_mib']:.0f} MiB | {c['rss_mib'] / base:.2f}x {one_cells}")
    last = rows[-1]["chat"]["rss_mib"] / base
    lines += ["", f"Acceptance (the longest video's peak RSS at most 1.5x the {rows[0]['frames']}-frame one's): "
              f"{'holds' if last <= 1.5 else 'does NOT hold'} ({last:.2f}x).", "",
              "Answers (random weights, so the text is noise; the point is that every run answers):", ""]
    for r in rows:
        lines.append(f"- {r['frames']} frames: chunked {r['chat']['out'].strip()!r}"
                     + (f", one batch {r['one']['out'].strip()!r}" if r.get("one") and r["one"]["rc"] == 0 else ""))
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
