"""`mmlm serve`: an OpenAI-compatible chat-completions server with batched decoding and a web page.

    mmlm serve --workdir workdirs/demo                       # http://127.0.0.1:8000
    mmlm serve --checkpoint ckpt/ --port 9000 --max_batch 16 --media_root ~/pictures

Prints one line `mmlm serve: ready at http://HOST:PORT ...` once the model's programs are compiled
(GET /health answers 503 until then). SIGTERM: new connections are refused, requests in flight finish
(up to --grace_s seconds), then the server exits with status 0 (Ctrl-C: the same, exit status 130).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from mmlm.cli.common import add_model_source, run_command
from mmlm.errors import UserError

INSTALL_HINT = 'pip install -e ".[serve]"'


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmlm serve",
        description="Serve a model over HTTP: the OpenAI chat-completions API (POST /v1/chat/completions, "
                    "streamed or not, images and videos as data: URLs), GET /v1/models, a compression-map "
                    "endpoint and a web page at /. Concurrent requests decode together in a fixed batch of "
                    "--max_batch slots.")
    add_model_source(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--max_batch", type=int, default=16,
                   help="decoding slots: requests answered at once; more wait in arrival order (default 16)")
    p.add_argument("--max_new_tokens", type=int, default=256,
                   help="longest answer a request may ask for (max_tokens), and its default (default 256)")
    p.add_argument("--admit_wait_ms", type=float, default=10.0,
                   help="longest time a decode step waits for requests still being read, so that a burst of "
                        "requests shares its decode steps (default 10 ms; 0: never wait)")
    p.add_argument("--prefill_group", type=int, default=1,
                   help="greedy requests admitted together and of the same shape share one prefill of up to this "
                        "many rows (default 1: every request is prefilled alone, as `mmlm chat` does, so that an "
                        "answer never depends on the requests beside it; larger is faster under load, but a "
                        "row's logits then differ from the batch of one's in the last bits). The grouped "
                        "programs compile in the background once the server is ready")
    p.add_argument("--auto_threshold", type=float, default=None,
                   help="for requests with \"num_vision_tokens\": \"auto\" (Matryoshka models): the first answer "
                        "token's probability below which the cascade escalates to the next budget (default: "
                        "`mmlm chat`'s, 0.5; `mmlm eval --calibration_data` calibrates one)")
    p.add_argument("--model_name", default=None,
                   help="model id in the API (default: the workdir's or checkpoint's directory name)")
    p.add_argument("--media_root", default=None,
                   help="directory whose files requests may name as file:///path (default: none; file:// "
                        "URLs are refused and media come as data: URLs)")
    p.add_argument("--max_body_mb", type=float, default=20.0,
                   help="largest request body in MB (default 20); a larger one gets a 413 error")
    p.add_argument("--grace_s", type=float, default=30.0,
                   help="on SIGTERM, how long requests in flight may take to finish (default 30 s)")
    p.add_argument("--weights", default="float", choices=("float", "int8"),
                   help="LLM weights: 'float' as stored (default) or 'int8' (weight-only int8)")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the one in the model's config)")
    p.add_argument("--template", default=None, help="conversation template (default: the model's)")
    p.add_argument("--log_level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default warning; info logs every request)")
    return p


def _validate(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    if args.max_batch < 1:
        raise UserError(f"--max_batch must be >= 1, got {args.max_batch}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if not args.max_body_mb > 0:
        raise UserError(f"--max_body_mb must be > 0, got {args.max_body_mb}")
    if not 1 <= args.prefill_group <= args.max_batch:
        raise UserError(f"--prefill_group must be in [1, --max_batch={args.max_batch}], got {args.prefill_group}")
    if not 0 <= args.admit_wait_ms <= 10_000:
        raise UserError(f"--admit_wait_ms must be in [0, 10000], got {args.admit_wait_ms}")
    if args.auto_threshold is not None:
        from mmlm.infer.cascade import check_threshold  # imports jax: not at --help time

        check_threshold(args.auto_threshold)
    if not args.grace_s >= 0:
        raise UserError(f"--grace_s must be >= 0, got {args.grace_s}")
    if args.media_root is not None and not os.path.isdir(args.media_root):
        raise UserError(f"--media_root {args.media_root!r} is not a directory")


def run(args: argparse.Namespace) -> int:
    _validate(args)  # the flags first: a mistake in them is named whatever is installed
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise UserError(f"serving needs FastAPI and uvicorn ({e.name} is missing): {INSTALL_HINT}") from None
    from mmlm.infer.loading import load_inference_model
    from mmlm.serve.api import ServerSettings, create_app
    from mmlm.serve.engine import GIL_SWITCH_INTERVAL_S, Engine

    im = load_inference_model(workdir=args.workdir, checkpoint=args.checkpoint, step=args.step,
                              tokenizer=args.tokenizer, template=args.template, weights=args.weights)
    source = os.path.abspath(args.workdir or args.checkpoint)
    name = args.model_name or os.path.basename(source.rstrip(os.sep)) or "mmlm"
    settings = ServerSettings(model_name=name, max_new_tokens=args.max_new_tokens,
                              max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                              media_root=os.path.abspath(args.media_root) if args.media_root else None,
                              **({} if args.auto_threshold is None else {"auto_threshold": args.auto_threshold}))
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # the engine thread gets the GIL back promptly
    engine = Engine(im, max_batch=args.max_batch, max_new_tokens=args.max_new_tokens,
                    admit_wait_s=args.admit_wait_ms / 1000, prefill_group=args.prefill_group)
    app = create_app(engine, settings)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.grace_s, access_log=args.log_level in ("info", "debug"))
    server = uvicorn.Server(config)

    def announce() -> None:
        engine.ready.wait()
        while not server.started and not server.should_exit:
            threading.Event().wait(0.05)
        if server.started:
            host = f"[{args.host}]" if ":" in args.host else args.host
            port = server.servers[0].sockets[0].getsockname()[1] if server.servers else args.port
            print(f"mmlm serve: ready at http://{host}:{port} (model {name!r}, {im.cfg.mode}, "
                  f"{args.max_batch} slots)", flush=True)

    threading.Thread(target=announce, name="mmlm-announce", daemon=True).start()
    # uvicorn handles SIGTERM (graceful shutdown), then re-raises it to the handler it found installed:
    # this one, so that a requested shutdown ends with exit status 0 instead of death by the signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    groups = (f"; prefills of up to {args.prefill_group} requests compile in the background once it is ready"
              if args.prefill_group > 1 else "")
    print(f"mmlm serve: {im.source}: compiling the decoding programs ({args.max_batch} slots{groups})...",
          file=sys.stderr, flush=True)
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits 1 when it cannot bind the address
        if e.code:
            raise UserError(f"cannot listen on {args.host}:{args.port} (in use, or not an address of this "
                            "machine); pick another --port or --host") from None
    return 0


def main(argv: list[str]) -> int:
    return run_command("serve", run, build_parser().parse_args(argv), interruptible=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
