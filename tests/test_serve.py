"""`mmlm serve`: the OpenAI client against a running server on a tiny random model.

One server per module (a subprocess on 127.0.0.1, a free port): greedy answers equal `mmlm chat`'s,
streaming, concurrency (batched answers equal sequential ones), every bad input gets a 4xx JSON error
and the server keeps serving, a client that disconnects frees its slot, SIGTERM ends it gracefully.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from mmlm.checkpoint import save_model  # noqa: E402
from mmlm.config_utils import load_config  # noqa: E402
from mmlm.cli import chat  # noqa: E402
from mmlm.infer.random_model import random_params  # noqa: E402
from mmlm.models.config import model_config_from_dict  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 64  # the server's --max_new_tokens
BODY_MB = 1.0
QUESTIONS = ["What color is the circle?", "How many shapes are there?", "Is there a red square?",
             "Where is the triangle?", "What shape is left of the circle?", "Describe the picture."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, root: Path):
        self.proc, self.url, self.root = proc, url, root
        self.lines: list[str] = []

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    config = load_config(str(REPO / "configs/tiny.py"))
    save_model(str(root / "ckpt"), random_params(model_config_from_dict(config.model), seed=1), config)
    media = root / "media"
    media.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8)).save(media / f"img{i}.png")
    (root / "outside.png").write_bytes((media / "img0.png").read_bytes())
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "mmlm.cli", "serve", "--checkpoint", str(root / "ckpt"), "--port", str(port),
           "--max_batch", "4", "--max_new_tokens", str(MAX_NEW), "--max_body_mb", str(BODY_MB),
           "--media_root", str(media), "--model_name", "tiny", "--grace_s", "20"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    srv = Server(proc, f"http://127.0.0.1:{port}", root)
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            srv.lines.append(line)
            if "ready at" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(240), "server not ready in 240 s:\n" + "".join(srv.lines)
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _data_url(path: Path, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _messages(question: str, url: str, kind: str = "image_url") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question}, {"type": kind, kind: {"url": url}}]}]


def _ask(srv: Server, question: str, image: Path, **kw) -> tuple[str, str]:
    extra = {"num_vision_tokens": kw.pop("num_vision_tokens")} if "num_vision_tokens" in kw else None
    resp = srv.client().chat.completions.create(model="tiny", messages=_messages(question, _data_url(image)),
                                                temperature=0, extra_body=extra, **kw)
    return resp.choices[0].message.content, resp.choices[0].finish_reason


def _chat_answer(srv: Server, question: str, image: Path, max_new: int, budget: int | None) -> str:
    argv = ["--checkpoint", str(srv.root / "ckpt"), "--image", str(image), "--prompt", question,
            "--max_new_tokens", str(max_new)] + ([] if budget is None else ["--num_vision_tokens", str(budget)])
    out, err = io.StringIO(), io.StringIO()
    assert chat.run(chat.build_parser().parse_args(argv), stdin=io.StringIO(), out=out, err=err) == 0
    assert out.getvalue().endswith("\n")
    return out.getvalue()[:-1]


def _post(srv: Server, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(srv.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=60,
                      **kw)


# ------------------------------------------------------------------------------ tests

def test_health_models_and_page(server):
    assert httpx.get(server.url + "/health").status_code == 200
    models = server.client().models.list()
    [card] = models.data
    assert card.id == "tiny"
    assert card.model_extra["budgets"] == [1, 4] and card.model_extra["default_budget"] == 4
    assert card.model_extra["media"] == ["image", "video"]
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert httpx.get(server.url + "/static/index.html").status_code == 200
    missing = httpx.get(server.url + "/static/..%2Fapi.py")
    assert missing.status_code == 404 and "error" in missing.json()


@pytest.mark.parametrize("q,img,budget", [(0, 0, None), (1, 1, 1), (2, 2, 4)])
def test_greedy_answers_equal_mmlm_chat(server, q, img, budget):
    image = server.root / "media" / f"img{img}.png"
    kw = {} if budget is None else {"num_vision_tokens": budget}
    text, finish = _ask(server, QUESTIONS[q], image, max_tokens=6, **kw)
    assert text == _chat_answer(server, QUESTIONS[q], image, 6, budget)
    assert finish in ("stop", "length")


def test_stream_chunks_concatenate_to_the_answer_and_end_with_done(server):
    image = server.root / "media" / "img0.png"
    full, _ = _ask(server, QUESTIONS[3], image, max_tokens=8)
    stream = server.client().chat.completions.create(model="tiny", messages=_messages(QUESTIONS[3], _data_url(image)),
                                                     temperature=0, max_tokens=8, stream=True,
                                                     stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # one chunk per token
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1 and chunks[-1].usage.prompt_tokens > 0
    # The raw event stream ends with [DONE].
    body = {"model": "tiny", "messages": _messages(QUESTIONS[3], _data_url(image)), "max_tokens": 8, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"


def test_multi_turn_answer_equals_the_interactive_chat(server):
    """Earlier user/assistant turns are the chat history, as in `mmlm chat`'s interactive mode."""
    image = server.root / "media" / "img1.png"
    argv = ["--checkpoint", str(server.root / "ckpt"), "--image", str(image), "--max_new_tokens", "4"]
    out = io.StringIO()
    rc = chat.run(chat.build_parser().parse_args(argv), stdin=io.StringIO("What is it?\nAnd the color?\n"), out=out,
                  err=io.StringIO())
    assert rc == 0
    first, second = out.getvalue().split("\n")[:2]
    messages = _messages("What is it?", _data_url(image)) + [
        {"role": "assistant", "content": first}, {"role": "user", "content": "And the color?"}]
    resp = server.client().chat.completions.create(model="tiny", temperature=0, max_tokens=4, messages=messages)
    assert resp.choices[0].message.content == second


def test_detokenizer_holds_back_a_stop_string_split_across_tokens():
    from mmlm.serve.api import Detokenizer

    class Pieces:  # token i decodes to PIECES[i]
        PIECES = ["Hel", "lo ", "wo", "rld", "!"]

        def decode(self, ids):
            return "".join(self.PIECES[i] for i in ids)

    detok = Detokenizer(Pieces(), ["o wor"])
    deltas = [detok.add(i) for i in range(3)]
    assert deltas == ["Hel", "l", ""]  # "o " and "o wo" could start the stop string: held back
    assert detok.add(3) == "" and detok.stopped and detok.text == "Hell"
    plain = Detokenizer(Pieces(), ["xyz"])
    assert "".join(plain.add(i) for i in range(5)) + plain.flush() == "Hello world!"


def _write_video(path: Path, frames: int = 6, fps: int = 2) -> None:
    import av

    rng = np.random.default_rng(5)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def test_video_answer_equals_mmlm_chat(server):
    video = server.root / "media" / "clip.mp4"
    _write_video(video)
    resp = server.client().chat.completions.create(
        model="tiny", temperature=0, max_tokens=5,
        messages=_messages("What moves?", _data_url(video, "video/mp4"), "video_url"))
    argv = ["--checkpoint", str(server.root / "ckpt"), "--video", str(video), "--prompt", "What moves?",
            "--max_new_tokens", "5"]
    out = io.StringIO()
    assert chat.run(chat.build_parser().parse_args(argv), stdin=io.StringIO(), out=out, err=io.StringIO()) == 0
    assert resp.choices[0].message.content == out.getvalue()[:-1]


def test_ignore_eos_gives_max_tokens_tokens(server):
    resp = server.client().chat.completions.create(
        model="tiny", temperature=0, max_tokens=7, extra_body={"ignore_eos": True},
        messages=_messages(QUESTIONS[0], _data_url(server.root / "media" / "img0.png")))
    assert resp.usage.completion_tokens == 7 and resp.choices[0].finish_reason == "length"


def test_stop_strings_cut_the_answer(server):
    image = server.root / "media" / "img1.png"
    full, _ = _ask(server, QUESTIONS[0], image, max_tokens=12)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), full
    cut, finish = _ask(server, QUESTIONS[0], image, max_tokens=12, stop=[stop])
    assert cut == full[: full.index(stop)] and finish == "stop"
    stream = server.client().chat.completions.create(model="tiny", messages=_messages(QUESTIONS[0], _data_url(image)),
                                                     temperature=0, max_tokens=12, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == cut


def test_concurrent_answers_equal_sequential_ones(server):
    """8 requests on 4 slots: some join a running batch, some wait; every answer is its sequential one."""
    jobs = [(QUESTIONS[i % len(QUESTIONS)], server.root / "media" / f"img{i % 3}.png", 4 if i % 2 else 1)
            for i in range(8)]
    sequential = [_ask(server, q, img, max_tokens=10 + i, num_vision_tokens=m) for i, (q, img, m) in enumerate(jobs)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_ask, server, q, img, max_tokens=10 + i, num_vision_tokens=m)
                   for i, (q, img, m) in enumerate(jobs)]
        concurrent_answers = [f.result(timeout=120) for f in futures]
    assert concurrent_answers == sequential
    assert len({a for a, _ in sequential}) > 1  # distinct answers: the rows did not mix


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels (a decompression bomb by its header) with one tiny row."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 7)) + chunk(b"IEND", b"")


def _bad_cases(root: Path) -> list[tuple[str, object, int, str | None]]:
    img = _data_url(root / "media" / "img0.png")

    def body(**kw):
        b = {"model": "tiny", "messages": _messages("What color?", img), "max_tokens": 4}
        b.update(kw)
        return b

    def with_url(url):
        return body(messages=_messages("What color?", url))

    return [
        ("broken base64", with_url("data:image/png;base64,iVBORw0K!!!#"), 400, "invalid_media"),
        ("undecodable image", with_url("data:image/png;base64," + base64.b64encode(b"not an image" * 10).decode()),
         400, "invalid_media"),
        ("decompression bomb", with_url("data:image/png;base64," + base64.b64encode(_png_header_only(40000, 40000))
                                        .decode()), 400, "invalid_media"),
        ("undecodable video", body(messages=_messages("What?", "data:video/mp4;base64," +
                                                      base64.b64encode(b"\0" * 64).decode(), "video_url")),
         400, "invalid_media"),
        ("oversized body", with_url("data:image/png;base64," + "A" * int(BODY_MB * 1024 * 1024 * 1.2)), 413,
         "body_too_large"),
        ("unknown model", body(model="gpt-4o"), 404, "model_not_found"),
        ("prompt too long", body(messages=_messages("why " * 200, img)), 400, "context_length_exceeded"),
        ("temperature nan", json.dumps(body()).replace('"max_tokens": 4', '"max_tokens": 4, "temperature": NaN'),
         400, "invalid_value"),
        ("temperature negative", body(temperature=-0.5), 400, "invalid_value"),
        ("top_p zero", body(top_p=0), 400, "invalid_value"),
        ("top_p above 1", body(top_p=1.5), 400, "invalid_value"),
        ("unsupported budget", body(num_vision_tokens=5), 400, "unsupported_budget"),
        ("max_tokens over the limit", body(max_tokens=MAX_NEW + 1), 400, "invalid_value"),
        ("file outside the media root", with_url((root / "outside.png").as_uri()), 400, "invalid_media"),
        ("file traversal", with_url((root / "media").as_uri() + "/../outside.png"), 400, "invalid_media"),
        ("http url", with_url("http://example.com/cat.png"), 400, "invalid_media"),
        ("two images", body(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": img}}, {"type": "image_url", "image_url": {"url": img}},
            {"type": "text", "text": "?"}]}]), 400, "too_many_media"),
        ("no messages", body(messages=[]), 400, "invalid_value"),
        ("last message not from the user", body(messages=[{"role": "assistant", "content": "hi"}]), 400,
         "invalid_value"),
        ("invalid json", "{not json", 400, "invalid_json"),
    ]


def test_every_bad_input_gets_a_4xx_json_error_and_the_server_keeps_serving(server):
    image = server.root / "media" / "img0.png"
    good, _ = _ask(server, "What color?", image, max_tokens=4)
    for name, body, status, code in _bad_cases(server.root):
        r = _post(server, "/v1/chat/completions", body)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], name
        assert err["code"] == code, (name, err)
        if name == "unsupported budget":
            assert "[1, 4]" in err["message"]
        if name == "oversized body":
            assert "--max_body_mb" in err["message"]
        assert _ask(server, "What color?", image, max_tokens=4)[0] == good, f"not serving after {name}"
    # The OpenAI client sees them as API errors too.
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="tiny", messages=_messages("?", _data_url(image)),
                                                temperature=-1)
    # A file under the media root is read.
    url = (server.root / "media" / "img0.png").as_uri()
    r = _post(server, "/v1/chat/completions", {"messages": _messages("What color?", url), "max_tokens": 4})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == good


def test_compression_map(server):
    img = _data_url(server.root / "media" / "img0.png")
    r = _post(server, "/v1/mmlm/compression_map", {"image": img, "num_vision_tokens": 4})
    assert r.status_code == 200, r.text
    png = base64.b64decode(r.json()["image"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == (2 * 224, 2 * 224)  # 4 tokens: a 2 x 2 grid of panels
    for body in ({"image": "data:image/png;base64,@@", "num_vision_tokens": None},
                 {"image": img, "num_vision_tokens": 5}, {"image": 5}):
        bad = _post(server, "/v1/mmlm/compression_map", body)
        assert bad.status_code == 400 and bad.json()["error"]["message"]


def test_auto_budget_answers_as_mmlm_chat_auto_and_as_the_fixed_budget_it_names(server):
    """`"num_vision_tokens": "auto"`: the cascade picks a budget per request; the answer names it, equals the
    answer asked at that fixed budget and `mmlm chat --num_vision_tokens auto`'s; a video with auto is refused."""
    image = server.root / "media" / "img1.png"
    card = server.client().models.list().data[0]
    assert card.model_extra["auto"] is True and card.model_extra["auto_threshold"] == 0.5
    resp = server.client().chat.completions.create(model="tiny", messages=_messages(QUESTIONS[4], _data_url(image)),
                                                   temperature=0, max_tokens=6,
                                                   extra_body={"num_vision_tokens": "auto"})
    used = resp.model_extra["num_vision_tokens"]
    assert used in (1, 4)
    text = resp.choices[0].message.content
    assert text == _ask(server, QUESTIONS[4], image, max_tokens=6, num_vision_tokens=used)[0]
    assert text == _chat_answer(server, QUESTIONS[4], image, 6, "auto")
    fixed = server.client().chat.completions.create(model="tiny", messages=_messages(QUESTIONS[4], _data_url(image)),
                                                    temperature=0, max_tokens=2, extra_body={"num_vision_tokens": 1})
    assert fixed.model_extra["num_vision_tokens"] == 1
    stream = server.client().chat.completions.create(model="tiny", messages=_messages(QUESTIONS[4], _data_url(image)),
                                                     temperature=0, max_tokens=6, stream=True,
                                                     extra_body={"num_vision_tokens": "auto"})
    chunks = list(stream)
    assert chunks[0].model_extra["num_vision_tokens"] == used
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    video = server.root / "clip.mp4"
    _write_video(video)
    r = _post(server, "/v1/chat/completions", {"messages": _messages("What happens?", _data_url(video, "video/mp4"),
                                                                      "video_url"), "num_vision_tokens": "auto"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_budget"
    bad = _post(server, "/v1/chat/completions", {"messages": _messages("Hi?", _data_url(image)),
                                                  "num_vision_tokens": "most"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_type"


def _long_stream(server, first_chunk: threading.Event | None = None, close_after_first: bool = False) -> dict:
    """A streamed answer that runs to max_tokens (the random model emits no stop token for this question)."""
    body = {"model": "tiny", "messages": _messages(QUESTIONS[5], _data_url(server.root / "media" / "img2.png")),
            "max_tokens": MAX_NEW, "stream": True}
    events = []
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if first_chunk is not None and len(events) == 2:
                    first_chunk.set()
                    if close_after_first:
                        break
    return {"events": events}


def test_a_client_that_disconnects_frees_its_slot(server):
    full, finish = _ask(server, QUESTIONS[5], server.root / "media" / "img2.png", max_tokens=MAX_NEW)
    assert finish == "length"  # the answer would run MAX_NEW tokens
    before = httpx.get(server.url + "/v1/mmlm/status").json()
    _long_stream(server, threading.Event(), close_after_first=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = httpx.get(server.url + "/v1/mmlm/status").json()
        if status["active"] == 0 and status["cancelled"] > before["cancelled"]:
            break
        time.sleep(0.05)
    assert status["active"] == 0 and status["cancelled"] == before["cancelled"] + 1, status
    assert _ask(server, QUESTIONS[5], server.root / "media" / "img2.png", max_tokens=MAX_NEW)[0] == full


def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(server):
    """Last test of the module: it stops the module's server."""
    first = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(_long_stream, server, first)
        assert first.wait(60)
        server.proc.send_signal(signal.SIGTERM)
        events = future.result(timeout=60)["events"]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(60) == 0, "".join(server.lines)
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=5)


def test_without_the_serve_extra_the_command_names_the_install(monkeypatch, capsys):
    from mmlm.cli import serve as cli

    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    assert cli.main(["--checkpoint", "unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmlm serve: error:") and 'pip install -e ".[serve]"' in err and "\n" not in err


@pytest.mark.parametrize("argv, message", [
    (["--prefill_group", "0"], "--prefill_group must be in [1, --max_batch=16], got 0"),
    (["--max_batch", "4", "--prefill_group", "8"], "--prefill_group must be in [1, --max_batch=4], got 8"),
])
def test_a_bad_prefill_group_is_named_before_anything_loads(capsys, argv, message):
    from mmlm.cli import serve as cli

    assert cli.main(["--checkpoint", "unused"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmlm serve: error:") and message in err and "\n" not in err


def test_health_is_503_until_compiled_and_a_llava15_model_has_no_compression_map(tmp_path):
    """In-process app whose engine never starts: /health says not ready; llava15 refuses compression maps;
    a chunked upload over the body limit gets its 413 too."""
    from fastapi.testclient import TestClient

    from mmlm.infer.loading import inference_model
    from mmlm.serve.api import ServerSettings, create_app
    from mmlm.serve.engine import Engine

    config = load_config(str(REPO / "configs/tiny.py"))
    config.model.mode = "llava15"
    im = inference_model(config, random_params(model_config_from_dict(config.model), seed=0), "llava15-tiny")
    app = create_app(Engine(im, max_batch=1, max_new_tokens=4),
                     ServerSettings(model_name="base", max_new_tokens=4, max_body_bytes=1 << 20, media_root=None))
    client = TestClient(app)  # no lifespan: the engine is not started (not compiled)
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == "not_ready"
    r = client.post("/v1/mmlm/compression_map", json={"image": "data:image/png;base64,AAAA"})
    assert r.status_code == 400 and "no compressor" in r.json()["error"]["message"]
    chunked = client.post("/v1/chat/completions", content=(b"x" * 65536 for _ in range(20)))  # no Content-Length
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "body_too_large"
    card = client.get("/v1/models").json()["data"][0]
    assert card["budgets"] == [im.cfg.vision.num_patches] and card["default_budget"] == im.cfg.vision.num_patches
    assert card["auto"] is False
    body = {"messages": [{"role": "user", "content": "Hi?"}], "num_vision_tokens": "auto"}
    r = client.post("/v1/chat/completions", json=body)  # no Matryoshka budgets: auto is refused, listing them
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_budget"
    assert str(im.cfg.vision.num_patches) in r.json()["error"]["message"]


def test_media_refuses_file_urls_without_a_media_root(tmp_path):
    from mmlm.serve.media import MediaError, url_bytes

    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(MediaError, match="--media_root"):
        url_bytes((tmp_path / "a.png").as_uri(), "image", None)
    assert url_bytes((tmp_path / "a.png").as_uri(), "image", str(tmp_path)) == b"x"


def _engine_with_tiny_model(admit_wait_s: float, max_batch: int = 2, prefill_group: int = 1):
    from mmlm.infer.loading import encode_question, inference_model
    from mmlm.serve.engine import Engine, Request

    config = load_config(str(REPO / "configs/tiny.py"))
    im = inference_model(config, random_params(model_config_from_dict(config.model), seed=0), "tiny")
    engine = Engine(im, max_batch=max_batch, max_new_tokens=4, admit_wait_s=admit_wait_s,
                    prefill_group=prefill_group)
    engine.start()
    assert engine.ready.wait(300)
    images = np.random.default_rng(0).random((4, 1, 1, im.image_size, im.image_size, 3), np.float32)

    def request(done: threading.Event, tokens: list | None = None, temperature: float = 0.0,
                seed: int = 0, image: int = 0, question: str = "What is it?", budget: int | None = None) -> Request:
        def emit(kind, value):
            if kind == "token" and tokens is not None:
                tokens.append(value)
            if kind in ("done", "error"):
                done.set()

        prompt, fuse = encode_question(im, question, True, return_fuse_mask=True)
        return Request(prompt=prompt, fuse_mask=fuse, pixels=images[image] if image else images[0] * 0,
                       num_vision_tokens=budget, max_tokens=4, temperature=temperature,
                       top_p=1.0 if temperature == 0 else 0.9, seed=seed, ignore_eos=True, emit=emit)

    return engine, request


def test_a_decode_step_waits_for_expected_requests_so_a_burst_shares_its_steps():
    """Two requests announced (`expect`): the first waits for the second before decoding, then both decode in
    the same steps; an announcement withdrawn (`unexpect`) releases the wait; an unannounced request alone
    waits for nothing (the generous admit_wait_s would make this test hang otherwise)."""
    engine, request = _engine_with_tiny_model(admit_wait_s=600.0)
    try:
        first, second = threading.Event(), threading.Event()
        engine.expect()
        engine.expect()
        engine.submit(request(first), expected=True)
        time.sleep(0.3)
        assert engine.status()["steps"] == 0 and not first.is_set()  # waiting for the announced request
        engine.submit(request(second), expected=True)
        assert first.wait(120) and second.wait(120)
        assert engine.status()["steps"] == 3  # 4 tokens each: one from the prefill, three shared steps

        third = threading.Event()
        engine.expect()
        engine.submit(request(third))  # an unannounced submit: the announcement above still stands
        time.sleep(0.3)
        assert not third.is_set()
        engine.unexpect()
        assert third.wait(120)

        alone = threading.Event()
        engine.submit(request(alone))
        assert alone.wait(120)
        assert engine.status()["steps"] == 9
    finally:
        engine.stop()


def test_a_sampled_and_a_greedy_answer_do_not_depend_on_what_shares_their_steps():
    """A step where every request is greedy skips the sampling path; one with a sampled request runs it for
    all rows. Either way each row's tokens are its own: a sampled answer (its seed) and a greedy answer are
    the same alone as side by side."""
    engine, request = _engine_with_tiny_model(admit_wait_s=0.0)

    def answer(*specs: tuple[float, int]) -> list[list[int]]:
        events = [threading.Event() for _ in specs]
        tokens: list[list[int]] = [[] for _ in specs]
        for done, toks, (temperature, seed) in zip(events, tokens, specs):
            engine.submit(request(done, toks, temperature, seed))
        assert all(e.wait(120) for e in events)
        return tokens

    try:
        sampled, greedy = (5.0, 3), (0.0, 0)
        alone = answer(sampled)[0] + answer(greedy)[0]
        together = answer(sampled, greedy)
        assert len(alone) == 8 and together[0] + together[1] == alone
        assert answer((5.0, 4))[0] != alone[:4] or answer((5.0, 5))[0] != alone[:4]  # the seed matters
    finally:
        engine.stop()


def test_grouped_prefills_give_the_answers_of_prefills_alone():
    """--prefill_group: greedy requests admitted together share one prefill (3 padded to a batch of 4 rows),
    a sampled one stays alone; every answer is the one it gets alone. A group of a shape not seen before
    (another budget) is prefilled one request at a time while its program compiles in the background,
    then shares one prefill."""
    engine, request = _engine_with_tiny_model(admit_wait_s=0.0, max_batch=4, prefill_group=4)
    specs = [{"image": 1}, {"image": 2, "question": "How many shapes are there here?"}, {"image": 3},
             {"image": 1, "temperature": 5.0, "seed": 3}]

    def wait_compiled() -> None:
        deadline = time.monotonic() + 300
        while engine.status()["compiling"] and time.monotonic() < deadline:  # the grouped programs
            time.sleep(0.05)
        assert engine.status()["compiling"] == 0

    def answer(group: list[dict]) -> list[list[int]]:
        events = [threading.Event() for _ in group]
        tokens: list[list[int]] = [[] for _ in group]
        with engine._cv:  # the engine thread takes them all in one admission
            for done, toks, spec in zip(events, tokens, group):
                engine.submit(request(done, toks, **spec))
        assert all(e.wait(120) for e in events)
        return tokens

    try:
        alone = [answer([spec])[0] for spec in specs]
        wait_compiled()
        before = engine.status()
        together = answer(specs)
        after = engine.status()
        assert after["admitted"] - before["admitted"] == 4
        assert after["prefills"] - before["prefills"] == 2  # the three greedy requests in one
        assert together == alone and all(len(a) == 4 for a in alone)
        assert len({tuple(a) for a in alone}) > 1  # distinct answers: the rows did not mix

        ones = [{**spec, "budget": 1} for spec in specs[:3]]  # the default budget is 4
        alone = [answer([spec])[0] for spec in ones]
        before = engine.status()
        first = answer(ones)
        assert engine.status()["prefills"] - before["prefills"] == 3 and first == alone
        wait_compiled()
        before = engine.status()
        assert answer(ones) == alone and engine.status()["prefills"] - before["prefills"] == 1
    finally:
        engine.stop()


def test_an_auto_request_is_answered_from_the_cascades_prefill_as_the_fixed_budget_it_chose():
    """`Engine.choose_budget` (the server's "auto"): the cascade's prefill at the budget it stops at goes into
    the slot as it is (no second prefill); greedy or sampled, the answer is the request asked at that budget."""
    engine, request = _engine_with_tiny_model(admit_wait_s=0.0)

    def run(req) -> list[int]:
        engine.submit(req)
        assert done.wait(120)
        return tokens

    answers = []
    try:
        for temperature, seed in ((0.0, 0), (5.0, 3)):
            fixed = {}
            for m in (1, 4):
                done, tokens = threading.Event(), []
                fixed[m] = run(request(done, tokens, temperature, seed, image=1, budget=m))
            answers.append(fixed)
            for threshold, m in ((1e-6, 1), (1 - 1e-6, 4)):  # a random model's first token: neither extreme
                done, tokens = threading.Event(), []
                req = request(done, tokens, temperature, seed, image=1)
                seen = engine.choose_budget(req, threshold)
                assert req.num_vision_tokens == m and len(seen) == (1, 4).index(m) + 1
                assert req.prefilled is not None
                before = engine.status()["prefills"]
                assert run(req) == fixed[m] and len(fixed[m]) == 4
                assert req.prefilled is None and engine.status()["prefills"] == before + 1  # inserted as it was
        assert any(a[1] != a[4] for a in answers)  # the budget changes an answer: the check can tell them apart
    finally:
        engine.stop()


def test_the_benchmark_ratio_interval_brackets_the_ratio_and_narrows_with_agreeing_rounds():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "serving_bench", Path(__file__).resolve().parents[1] / "experiments" / "serving" / "run.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(0)
    seq = [{"tokens": 16, "wall": w} for w in rng.uniform(0.20, 0.26, 40)]
    conc = [{"tokens": 16, "wall": w} for w in rng.uniform(0.08, 0.14, 40)]
    ratio = (16 * 40 / sum(r["wall"] for r in conc)) / (16 * 40 / sum(r["wall"] for r in seq))
    lo, hi = bench.ratio_interval(conc, seq)
    assert lo < ratio < hi and (lo, hi) == bench.ratio_interval(conc, seq)  # reproducible
    same = [{"tokens": 16, "wall": 0.1}] * 40
    assert bench.ratio_interval(same, [{"tokens": 16, "wall": 0.2}] * 40) == pytest.approx((2.0, 2.0))
    assert hi - lo < 0.5 * (max(s["wall"] / c["wall"] for s, c in zip(seq, conc))
                            - min(s["wall"] / c["wall"] for s, c in zip(seq, conc)))
