"""The FastAPI app: OpenAI chat completions over the slot engine, model list, compression maps, the page.

Routes:
  GET  /                          the web page (static/index.html); GET /static/{name}: its files
  GET  /health                    200 once the programs are compiled, 503 before (and while stopping)
  GET  /v1/models                 OpenAI list; each model also carries budgets / default_budget / media
  POST /v1/chat/completions       OpenAI format, streamed (SSE) or not; extensions `num_vision_tokens` (the
                                  Matryoshka budget, or "auto": the confidence cascade picks it per
                                  request) and `ignore_eos` (answers of exactly max_tokens tokens, for
                                  throughput benchmarks, as vLLM's); the answer (and the first streamed
                                  chunk) carries the budget it used as `num_vision_tokens`
  POST /v1/mmlm/compression_map   {"image": data URL, "num_vision_tokens": int|null} -> {"image": PNG data URL}
  GET  /v1/mmlm/status            slots in use, waiting requests, counters

Every error is `{"error": {"message", "type", "param", "code"}}` with a 4xx status for the client's
mistakes (400 bad request, 404 unknown model / route, 413 body over --max_body_mb) and 500/503 for the
server's. Requests are parsed by hand (not by pydantic) so that each message names the field at fault.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import itertools
import json
import math
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmlm.errors import UserError
from mmlm.infer import cascade
from mmlm.infer.loading import InferenceModel, encode_question
from mmlm.serve.engine import Engine, Request
from mmlm.serve.media import MediaError, image_pixels, url_bytes, video_pixels

STATIC_DIR = Path(__file__).parent / "static"
MAX_STOP_SEQUENCES = 4
# Request bodies up to this size (bytes) are parsed on the event loop: decoding a small inline image takes
# well under a millisecond, less than handing it to a worker thread and back. Larger bodies, videos, file://
# media are parsed in a worker thread so the loop keeps serving (and "auto" budgets' cascades run in one).
INLINE_PARSE_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    model_name: str
    max_new_tokens: int  # longest answer a request may ask for (the default max_tokens too)
    max_body_bytes: int
    media_root: str | None
    auto_threshold: float = cascade.DEFAULT_THRESHOLD  # `num_vision_tokens: "auto"`: escalate below this


class ApiError(Exception):
    """An error answered in the OpenAI shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.kind)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


# --------------------------------------------------------------------------- parsing

@dataclasses.dataclass
class ChatRequest:
    prompt: list[int]
    fuse_mask: list[bool]
    pixels: Any  # np.ndarray (F, K, H, W, 3) or None
    media_kind: str | None
    num_vision_tokens: int | str | None  # the budget to answer at, or "auto" (an image request: the cascade's)
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    stream: bool
    include_usage: bool
    ignore_eos: bool = False


def _budget(body: dict, im: InferenceModel) -> int | str | None:
    """The request's `num_vision_tokens`: a budget the model has, None (its default) or "auto"."""
    budget = body.get("num_vision_tokens")
    if cascade.is_auto(budget):
        try:
            cascade.cascade_budgets(im.cfg)
        except UserError as e:
            raise ApiError(400, str(e), "num_vision_tokens", "unsupported_budget") from None
        return cascade.AUTO
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
        raise ApiError(400, "'num_vision_tokens' must be an integer or \"auto\"", "num_vision_tokens",
                       "invalid_type")
    try:
        return im.cfg.check_budget(budget)
    except ValueError as e:
        raise ApiError(400, f"{e}. Supported budgets: {list(im.cfg.supported_budgets)}", "num_vision_tokens",
                       "unsupported_budget") from None


def _number(body: dict, name: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{name}' must be a number, got {json.dumps(value)[:40]}", name, "invalid_type")
    value = float(value)
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ApiError(400, f"'{name}' must be a finite number in {bound}, got {value}", name, "invalid_value")
    return value


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer, got {json.dumps(value)[:40]}", name, "invalid_type")
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ApiError(400, f"'{name}' must be {rng}, got {value}", name, "invalid_value")
    return value


def _message_parts(content: Any, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise ApiError(400, f"{where}.content must be a string or a list of content parts", where, "invalid_type")
    return content


def _part_url(part: dict, key: str, where: str) -> str:
    value = part.get(key)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise ApiError(400, f"{where}.{key}.url must be a string (a data: URL or file:// path)", where,
                       "invalid_type")
    return url


def parse_chat_request(body: Any, im: InferenceModel, settings: ServerSettings) -> ChatRequest:
    """Validates an OpenAI chat-completions body and builds the model prompt (media decoded).

    Runs in a worker thread: media decoding is CPU work.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if model is not None and model != settings.model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {settings.model_name!r} "
                            "(GET /v1/models)", "model", "model_not_found")
    n = _integer(body, "n", 1, 1, None)
    if n != 1:
        raise ApiError(400, f"'n' must be 1 (one answer per request), got {n}", "n", "unsupported_value")
    max_tokens = _integer(body, "max_completion_tokens", None, 1, settings.max_new_tokens)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", settings.max_new_tokens, 1, settings.max_new_tokens)
    temperature = _number(body, "temperature", 0.0, 0.0, 100.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    seed = _integer(body, "seed", 0, 0, 2**32 - 1)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_SEQUENCES:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP_SEQUENCES} of them",
                       "stop", "invalid_value")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream", "invalid_type")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "'ignore_eos' must be true or false", "ignore_eos", "invalid_type")
    options = body.get("stream_options") or {}
    include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages",
                       "invalid_value")
    system: str | None = None
    turns: list[tuple[str, str]] = []  # (role, text)
    media: tuple[str, str, str] | None = None  # (kind, url, where)
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"{where} must be an object with role system, user or assistant", where,
                           "invalid_value")
        texts = []
        for j, part in enumerate(_message_parts(msg.get("content"), where)):
            kind = part.get("type")
            pw = f"{where}.content[{j}]"
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{pw}.text must be a string", pw, "invalid_type")
                texts.append(part["text"])
            elif kind in ("image_url", "video_url"):
                if msg["role"] != "user":
                    raise ApiError(400, f"{pw}: media goes in a user message", pw, "invalid_value")
                if media is not None:
                    raise ApiError(400, f"{pw}: one image or video per conversation (this model reads one)",
                                   pw, "too_many_media")
                media = (kind.split("_")[0], _part_url(part, kind, pw), pw)
            else:
                raise ApiError(400, f"{pw}: unsupported content part type {kind!r} (text, image_url, video_url)",
                               pw, "invalid_value")
        text = "\n".join(texts)
        if msg["role"] in ("system", "developer"):
            system = text if system is None else system + "\n" + text
        else:
            turns.append((msg["role"], text))
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message must be a user message (the question to answer)", "messages",
                       "invalid_value")
    history, pending_q = [], None
    for role, text in turns[:-1]:
        if role == "user":
            pending_q = text if pending_q is None else pending_q + "\n" + text
        else:
            history.append((pending_q or "", text))
            pending_q = None
    question = turns[-1][1] if pending_q is None else pending_q + "\n" + turns[-1][1]
    if not question.strip() and media is None:
        raise ApiError(400, "the question is empty", "messages", "invalid_value")

    budget = _budget(body, im)
    if budget == cascade.AUTO and media is not None and media[0] == "video":
        raise ApiError(400, "'num_vision_tokens': \"auto\" answers questions about an image (as `mmlm chat`); "
                            f"for a video give one of the budgets {list(im.cfg.supported_budgets)}",
                       "num_vision_tokens", "unsupported_budget")
    pixels = None
    if media is not None:
        kind, url, where = media
        try:
            data = url_bytes(url, where, settings.media_root)
            pixels = image_pixels(im, data, where) if kind == "image" else video_pixels(im, data, where)
        except MediaError as e:
            raise ApiError(400, str(e), where, "invalid_media") from None
    if system is not None:
        im = dataclasses.replace(im, system_prompt=system)
    try:
        prompt, fuse = encode_question(im, question, pixels is not None, history, return_fuse_mask=True)
    except ValueError as e:  # e.g. an <image> marker in a text-only conversation
        raise ApiError(400, str(e), "messages", "invalid_value") from None
    if len(prompt) > im.max_text_len:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens, more than the model's text length of "
                            f"{im.max_text_len} tokens; shorten the question or the conversation", "messages",
                       "context_length_exceeded")
    if budget == cascade.AUTO and pixels is None:  # a text-only prompt has no vision tokens: no budget to choose
        budget = None
    return ChatRequest(prompt=prompt, fuse_mask=fuse, pixels=pixels, media_kind=media[0] if media else None,
                       num_vision_tokens=budget, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                       seed=seed, stop=stop, stream=stream, include_usage=include_usage, ignore_eos=ignore_eos)


# ---------------------------------------------------------------------- text output

class Detokenizer:
    """Answer text of a growing id list: appends only, holds back text a stop string may still complete."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` handed out
        self.stopped = False

    def add(self, token: int) -> str:
        """The new text this token makes safe to send (possibly empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its last byte
            return ""
        self.text = text
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self._take(cut)
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._take(len(text) - hold)

    def _take(self, upto: int) -> str:
        out = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return out

    def flush(self) -> str:
        """The held-back rest at the end of the answer."""
        if not self.stopped:
            self.text = self.tokenizer.decode(self.ids)
        return self._take(len(self.text))


# ------------------------------------------------------------------------------ app

class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets a 413, by its Content-Length before it is read,
    or (chunked uploads) as soon as the bytes read pass the limit."""

    def __init__(self, app, limit: int, too_large):
        self.app, self.limit, self.too_large = app, limit, too_large

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self.too_large(int(length))(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge()  # answered by the app's exception handler
            return message

        await self.app(scope, limited, send)


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    """The ASGI app serving `engine`'s model (the engine is started and stopped by the app's lifespan)."""
    import contextlib

    im = engine.im
    state = {"stopping": False}
    id_prefix, counter = uuid.uuid4().hex[:16], itertools.count()  # completion ids: unique, cheap

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if engine._thread is None:
            engine.start()
        yield
        state["stopping"] = True
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="mmlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    limit = settings.max_body_bytes
    app.add_middleware(BodyLimit, limit=limit, too_large=lambda size: _too_large(size))

    def _too_large(size: int | None) -> JSONResponse:
        got = f" ({size} bytes)" if size else ""
        return error_response(413, f"the request body{got} is over this server's limit of {limit} bytes "
                                   "(--max_body_mb); send a smaller image or video", None, "body_too_large")

    @app.exception_handler(BodyTooLarge)
    async def _body_too_large(request, exc):
        return _too_large(None)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, f"{message}: {request.method} {request.url.path}", None,
                              "not_found" if exc.status_code == 404 else None, kind)

    async def _json(request: HttpRequest) -> Any:
        return _loads(await request.body())

    def _loads(raw: bytes) -> Any:
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None

    def _parse_inline(raw: bytes, body: Any) -> bool:
        """Whether a chat request is cheap enough to parse on the event loop (see INLINE_PARSE_BYTES)."""
        return (len(raw) <= INLINE_PARSE_BYTES and isinstance(body, dict)
                and b"video_url" not in raw and b"file:" not in raw)  # a file's size is not the body's

    # -------------------------------------------------------------- routes
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        path = (STATIC_DIR / name).resolve()
        if path.parent != STATIC_DIR.resolve() or not path.is_file():
            raise ApiError(404, f"no static file {name!r}", None, "not_found")
        return FileResponse(path)

    @app.get("/health")
    async def health():
        if engine.ready.is_set() and not state["stopping"]:
            return {"status": "ok"}
        return error_response(503, "the model is still compiling" if not state["stopping"] else
                              "the server is shutting down", None, "not_ready", "server_error")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    def model_card() -> dict:
        cfg = im.cfg
        return {"id": settings.model_name, "object": "model", "created": int(time.time()), "owned_by": "mmlm",
                "budgets": list(cfg.supported_budgets), "default_budget": cfg.check_budget(None),
                "auto": _supports_auto(cfg), "auto_threshold": settings.auto_threshold,
                "media": ["image", "video"], "mode": cfg.mode, "max_tokens": settings.max_new_tokens,
                "max_text_len": im.max_text_len, "max_frames": im.max_frames}

    def _supports_auto(cfg) -> bool:
        try:
            return bool(cascade.cascade_budgets(cfg))
        except UserError:
            return False

    @app.get("/v1/mmlm/status")
    async def status():
        return engine.status()

    @app.post("/v1/mmlm/compression_map")
    async def compression_map(request: HttpRequest):
        body = await _json(request)
        return await run_in_threadpool(_compression_map, body)

    def _compression_map(body: Any) -> dict:
        from mmlm.infer.compression_map import compression_maps, display_image, render_compression_map

        if im.cfg.mode != "llava_mini":
            raise ApiError(400, "this model is a llava15 baseline: it has no compressor, so no compression map",
                           None, "no_compressor")
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
        budget = body.get("num_vision_tokens")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
            raise ApiError(400, "'num_vision_tokens' must be an integer", "num_vision_tokens", "invalid_type")
        try:
            m = im.cfg.check_budget(budget)
        except ValueError as e:
            raise ApiError(400, f"{e}. Supported budgets: {list(im.cfg.supported_budgets)}", "num_vision_tokens",
                           "unsupported_budget") from None
        try:
            pixels = image_pixels(im, url_bytes(body.get("image"), "image", settings.media_root), "image")
        except MediaError as e:
            raise ApiError(400, str(e), "image", "invalid_media") from None
        maps = compression_maps(im.cfg, engine.params, pixels[None], m)[0]
        img = render_compression_map([display_image(im.cfg, frame, im.image_mean, im.image_std)
                                      for frame in pixels], maps, 224)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return {"image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"),
                "num_vision_tokens": m}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        if state["stopping"]:
            raise ApiError(503, "the server is shutting down", None, "shutting_down", "server_error")
        engine.expect()  # a decode step about to run may wait for this request to join it
        try:
            raw = await request.body()
            body = _loads(raw)
            if _parse_inline(raw, body):
                parsed = parse_chat_request(body, im, settings)
            else:
                parsed = await run_in_threadpool(parse_chat_request, body, im, settings)
        except BaseException:  # a bad request, or the client gone: nothing to wait for
            engine.unexpect()
            raise
        return await _answer(request, parsed)

    async def _answer(request: HttpRequest, parsed: ChatRequest):
        """Submits a parsed request (ending its `expect`) and answers it, streamed or not."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        auto = parsed.num_vision_tokens == cascade.AUTO
        req = Request(prompt=parsed.prompt, fuse_mask=parsed.fuse_mask, pixels=parsed.pixels,
                      num_vision_tokens=None if auto else parsed.num_vision_tokens, max_tokens=parsed.max_tokens,
                      temperature=parsed.temperature, top_p=parsed.top_p, seed=parsed.seed,
                      ignore_eos=parsed.ignore_eos,
                      emit=lambda kind, value: loop.call_soon_threadsafe(events.put_nowait, (kind, value)))
        try:
            if auto:  # the cascade's prefills, in a worker thread; the engine inserts the last one as it is
                await run_in_threadpool(engine.choose_budget, req, settings.auto_threshold)
        except BaseException:
            engine.unexpect()
            raise
        try:
            engine.submit(req, expected=True)
        except RuntimeError as e:
            raise ApiError(503, str(e), None, "shutting_down", "server_error") from None
        rid = f"chatcmpl-{id_prefix}{next(counter):08x}"
        created = int(time.time())
        detok = Detokenizer(im.tokenizer, parsed.stop)
        if parsed.stream:
            return StreamingResponse(_stream(request, req, events, detok, parsed, rid, created),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await _complete(request, req, events, detok, rid, created)

    def _used_budget(req: Request) -> int | None:
        """The budget the answer was given at (None for a text-only prompt)."""
        return im.cfg.check_budget(req.num_vision_tokens) if req.pixels is not None else None

    def _usage(req: Request) -> dict:
        return {"prompt_tokens": req.prompt_tokens, "completion_tokens": req.generated,
                "total_tokens": req.prompt_tokens + req.generated}

    async def _events(request: HttpRequest | None, req: Request, events: asyncio.Queue, detok: Detokenizer
                      ) -> AsyncIterator[tuple[str, str]]:
        """("text", delta) per token, then ("done", finish_reason); cancels the request on a stop string.

        With `request` (a non-streamed answer), a client that disconnects cancels the request; a streamed
        answer is cancelled by Starlette closing its generator instead.
        """
        while True:
            try:
                kind, value = await asyncio.wait_for(events.get(), timeout=1.0)
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    req.cancel()
                    return
                continue
            if kind == "token":
                delta = detok.add(value)
                if detok.stopped:
                    req.cancel()
                    yield "text", delta
                    yield "done", "stop"
                    return
                yield "text", delta
            elif kind == "done":
                yield "text", detok.flush()
                yield "done", "stop" if value in ("stop", "cancelled") else value
                return
            else:
                raise ApiError(500 if not state["stopping"] else 503, str(value), None, "engine_error",
                               "server_error")

    async def _complete(request, req, events, detok, rid, created):
        finish = "stop"
        try:
            async for kind, value in _events(request, req, events, detok):
                if kind == "done":
                    finish = value
        finally:
            req.cancel()  # no-op once finished; frees the slot if this handler was cancelled
        answer = {"id": rid, "object": "chat.completion", "created": created, "model": settings.model_name,
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": detok.text},
                               "finish_reason": finish, "logprobs": None}],
                  "usage": _usage(req), "num_vision_tokens": _used_budget(req)}
        # Plain JSON types only: serialised here, not through FastAPI's generic encoder.
        return Response(json.dumps(answer), media_type="application/json")

    async def _stream(request, req, events, detok, parsed: ChatRequest, rid, created):
        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True,
                  **extra) -> str:
            data = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": settings.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
                    if choices else [], **extra}
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""}, num_vision_tokens=_used_budget(req))
            async for kind, value in _events(None, req, events, detok):
                if kind == "text":
                    if value:
                        yield chunk({"content": value})
                else:
                    yield chunk({}, value)
            if parsed.include_usage:
                yield chunk({}, usage=_usage(req), choices=False)
            yield "data: [DONE]\n\n"
        except ApiError as e:  # the engine failed mid-answer: an error event, then the end
            error = {"message": e.message, "type": e.kind, "param": None, "code": e.code}
            yield f"data: {json.dumps({'error': error})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            req.cancel()  # the client went away (the generator is closed) or the answer ended

    return app
