"""Continuous batching: requests join a running fixed-shape batch of decoding slots.

The engine owns `max_batch` slots. Each slot has its own KV-cache rows
(`S = P_max + max_new_tokens` columns), its own write column and its own RoPE
position, so requests at different points of their answers decode together in
one jitted step of static shape: nothing recompiles when requests come and go.

A request's life:

1. **Prefill**, alone by default (batch of 1): `mmlm.infer.generate.prefill`,
   the function `mmlm chat` runs, on the prompt padded to a multiple of 32
   text tokens (a few programs cover every prompt). The vision tower and the
   compressor run here, once. With `prefill_group` G > 1, greedy requests
   admitted together with the same shapes share one prefill of up to G rows
   (padded to a power of two): several times faster per request under load,
   but not batch-invariant (below).
2. **Insert**, in the same program: its cache rows go into a free slot
   (columns `[0, P]`, the rest of the row zeroed and masked), with its first
   answer token, write column `P` and position `n_valid`.
3. **Decode**: each loop iteration runs one step over all slots; every row
   feeds its last token at its own column (`jax.vmap` over rows turns the
   model's cache write into a per-row scatter). Empty slots compute too (the
   shape is fixed) and their output is dropped.
4. A stop token, `max_tokens`, a cancellation (client gone, stop string) or
   the engine's shutdown frees the slot.

Per-row independence: rows meet only in batched matmuls of fixed shape, so a
row's arithmetic does not depend on what the other slots hold; an answer is
the same whether its request decodes alone or with 15 others (tested). A
grouped prefill is the exception: XLA's CPU kernels round a row differently
at another batch size, so its logits differ from the batch of one's by a few
1e-6 (its answers matched in every check: `experiments/serving`).

Policy (each iteration of the engine thread): admit waiting requests in
arrival order into free slots (their prefills dispatched back to back, then
their first tokens read), drop cancelled ones, then one decode step for all
active slots (its sampling path runs only when a request samples). Requests
beyond `max_batch` wait in a FIFO.
Before a decode step, while free slots remain and the HTTP layer is still
reading requests that have arrived (`expect` / `unexpect`), the engine waits
for them up to `admit_wait_s`: a burst of requests then shares its decode
steps instead of paying one step each. A request arriving alone waits for
nothing (nothing else is expected), so single-request latency is unchanged.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import queue
import threading
import time
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmlm.infer.batching import PROMPT_BUCKET, make_batch, round_up, views_per_frame
from mmlm.infer.generate import DecodeState, SamplingParams, prefill, top_p_filter
from mmlm.infer.loading import InferenceModel
from mmlm.models.config import ModelConfig
from mmlm.models.llama import KVCache, init_cache
from mmlm.models.llava_mini import LlavaMini

# Seconds a thread may hold the GIL while another waits for it (Python's default: 5 ms). The engine thread
# releases the GIL while XLA computes and needs it back for a few microseconds between programs; with the
# event loop busy parsing a burst of requests, the default made each prefill wait up to 5 ms for it. At
# 0.5 ms, 16 concurrent one-word answers on the demo took 2-7% less time (experiments/serving).
GIL_SWITCH_INTERVAL_S = 0.0005


class SlotState(NamedTuple):
    """Device state of all slots (B = max_batch, S cache columns per slot)."""

    cache: KVCache  # per layer {"k","v": (B, S, kv_heads, head_dim)}
    key_valid: jax.Array  # (B, S) bool: columns holding this slot's real tokens
    write: jax.Array  # (B,) int32: column the next fed token is written to
    pos: jax.Array  # (B,) int32: RoPE position of the next fed token
    last: jax.Array  # (B,) int32: the token to feed next (the last one sampled)
    rng: jax.Array  # (B, 2) uint32: per-slot PRNG keys
    temperature: jax.Array  # (B,) float32 (1 for greedy rows)
    top_p: jax.Array  # (B,) float32
    greedy: jax.Array  # (B,) bool


@dataclasses.dataclass
class Request:
    """One generation request. `emit(kind, value)` is called from the engine thread:
    ("token", id), then ("done", "stop" | "length" | "cancelled") or ("error", message)."""

    prompt: list[int]
    fuse_mask: list[bool]
    pixels: np.ndarray | None  # (F, K, H, W, 3) or None for a text-only prompt
    num_vision_tokens: int | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    emit: Callable[[str, Any], None]
    ignore_eos: bool = False  # decode past stop tokens up to max_tokens (fixed-length benchmarks)
    # `Engine.choose_budget`'s prefill at the budget it chose (a one-row `DecodeState`), inserted as it is. It
    # lives on the device while the request waits for a slot: a cache of the prompt's length only.
    prefilled: DecodeState | None = None
    cancelled: bool = False
    prompt_tokens: int = 0  # LLM prompt length (text + vision tokens), set by the prefill
    generated: int = 0
    slot: int = -1

    def cancel(self) -> None:
        """Thread-safe: the engine frees the request's slot at its next iteration."""
        self.cancelled = True


# ----------------------------------------------------------------------- jitted steps

def _slot_step(cfg: ModelConfig, params: Any, st: SlotState, all_greedy: jax.Array) -> tuple[SlotState, jax.Array]:
    """Feeds every slot's last token at its own column; returns the new state and tokens (B,).

    all_greedy: () bool, no request in a slot samples (the host knows; a freed slot keeps its old flags).
    """
    model = LlavaMini(cfg)
    variables = {"params": params}
    s = st.key_valid.shape[1]
    col = jnp.minimum(st.write, s - 1)
    key_valid = st.key_valid | (jnp.arange(s)[None, :] == col[:, None])
    embeds = model.apply(variables, st.last[:, None], method=LlavaMini.embed_tokens)  # (B, 1, D)

    def row(e, pos, kv, cache_row, c):
        one = jax.tree.map(lambda a: a[None], cache_row)
        logits, new = model.apply(variables, e[None], pos[None, None], kv[None], one, c, method=LlavaMini.decode)
        return logits[0, -1], jax.tree.map(lambda a: a[0], new)

    logits, cache = jax.vmap(row)(embeds, st.pos, key_valid, st.cache, col)  # (B, V) fp32
    keys = jax.vmap(jax.random.split)(st.rng)  # (B, 2, 2)
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample() -> jax.Array:
        filtered = top_p_filter(logits / st.temperature[:, None], st.top_p[:, None])
        sampled = jax.vmap(jax.random.categorical)(keys[:, 1], filtered).astype(jnp.int32)
        return jnp.where(st.greedy, argmax, sampled)

    # The sampling path (a sort of every row's logits, the Gumbel noise) costs more than the rest of a demo
    # step; when no request samples, the step skips it. Each row's token is the same either way: greedy
    # rows take the argmax, and a sampled row's draw depends only on its own key.
    tokens = jax.lax.cond(all_greedy, lambda: argmax, sample)
    new = SlotState(cache=cache, key_valid=key_valid, write=st.write + 1, pos=st.pos + 1, last=tokens,
                    rng=keys[:, 0], temperature=st.temperature, top_p=st.top_p, greedy=st.greedy)
    return new, tokens


_slot_step_jit = jax.jit(_slot_step, static_argnames=("cfg",), donate_argnames=("st",))


def _insert(st: SlotState, cache: KVCache, valid: jax.Array, slots: jax.Array, first: jax.Array,
            n_valid: jax.Array, rng: jax.Array, temperature: jax.Array, top_p: jax.Array,
            greedy: jax.Array) -> SlotState:
    """Puts G prefilled requests (cache (G, P+1, ...), valid (G, P+1)) into `slots` (G,); their rows are
    reset first. first, n_valid, temperature, top_p, greedy: (G,); rng: (G, 2). A slot named twice must
    get the same row twice (a group's padding repeats a request)."""
    s = st.key_valid.shape[1]

    def put(big: jax.Array, small: jax.Array) -> jax.Array:
        rows = jnp.zeros(small.shape[:1] + (s,) + big.shape[2:], big.dtype)
        rows = jax.lax.dynamic_update_slice(rows, small.astype(big.dtype), (0,) * rows.ndim)
        return big.at[slots].set(rows)

    return SlotState(
        cache=jax.tree.map(put, st.cache, cache), key_valid=put(st.key_valid, valid),
        write=st.write.at[slots].set(valid.shape[1] - 1), pos=st.pos.at[slots].set(n_valid),
        last=st.last.at[slots].set(first), rng=st.rng.at[slots].set(rng),
        temperature=st.temperature.at[slots].set(temperature), top_p=st.top_p.at[slots].set(top_p),
        greedy=st.greedy.at[slots].set(greedy))


def _prefill_into(cfg: ModelConfig, params: Any, st: SlotState, batch: dict, slots: jax.Array, keys: jax.Array,
                  sp: SamplingParams, *, num_vision_tokens: int | None, greedy: bool
                  ) -> tuple[SlotState, jax.Array]:
    """The prefill of G requests (`generate.prefill` on their batch of G rows; G = 1 is what `mmlm chat`
    runs) and the insertion of row i into `slots[i]` (G,), in one program (one dispatch per batch).
    Returns the state and (G, 2) [first token, n_valid] rows.

    keys: (G, 2) the requests' PRNG keys. A batch of one samples its first token with a subkey of its key
    (its slot continues from the key); a larger batch must be greedy (one key would serve all rows).
    """
    if slots.shape[0] > 1 and not greedy:
        raise ValueError("a prefill of several requests must be greedy")
    pre = prefill(cfg, params, batch, sp, jax.random.split(keys[0])[1], max_new_tokens=1,
                  num_vision_tokens=num_vision_tokens, greedy=greedy)
    first, n_valid = pre.tokens[:, 0], pre.prompt_valid
    g = slots.shape[0]
    st = _insert(st, pre.cache, pre.key_valid, slots, first, n_valid, keys, jnp.full((g,), sp.temperature),
                 jnp.full((g,), sp.top_p), jnp.full((g,), greedy))
    return st, jnp.stack([first, n_valid], axis=1)


_prefill_into_jit = jax.jit(_prefill_into, static_argnames=("cfg", "num_vision_tokens", "greedy"),
                            donate_argnames=("st",))


@functools.partial(jax.jit, static_argnames=("greedy",), donate_argnames=("st",))
def _insert_prefilled(st: SlotState, pre: DecodeState, slots: jax.Array, keys: jax.Array, sp: SamplingParams, *,
                      greedy: bool) -> tuple[SlotState, jax.Array]:
    """`_prefill_into`'s insertion of a prefill already made (`Engine.choose_budget`): (1, 2) [first token,
    n_valid]."""
    first, n_valid = pre.tokens[:, 0], pre.prompt_valid
    g = slots.shape[0]
    st = _insert(st, pre.cache, pre.key_valid, slots, first, n_valid, keys, jnp.full((g,), sp.temperature),
                 jnp.full((g,), sp.top_p), jnp.full((g,), greedy))
    return st, jnp.stack([first, n_valid], axis=1)


# ----------------------------------------------------------------------------- engine

def max_prompt_length(cfg: ModelConfig, params: Any, max_text_len: int, max_frames: int) -> int:
    """Longest LLM prompt (text + vision tokens) a request can have: the largest text bucket with the
    largest video at the largest budget (shapes only, nothing runs)."""
    t = round_up(max_text_len, PROMPT_BUCKET)
    k, s = views_per_frame(cfg), cfg.image_size
    batch = {"input_ids": jax.ShapeDtypeStruct((1, t), jnp.int32),
             "attention_mask": jax.ShapeDtypeStruct((1, t), bool),
             "fuse_mask": jax.ShapeDtypeStruct((1, t), bool),
             "images": jax.ShapeDtypeStruct((1, max_frames, k, s, s, 3), jnp.float32),
             "frame_mask": jax.ShapeDtypeStruct((1, max_frames), bool)}
    m = max(cfg.supported_budgets)
    out = jax.eval_shape(lambda p, b: LlavaMini(cfg).apply({"params": p}, b, m, "left",
                                                           method=LlavaMini.build_llm_inputs), params, batch)
    return int(out["embeds"].shape[1])


class Engine:
    """Slot-batched generation on a background thread. `submit` is thread-safe.

    Args:
      im: the loaded model.
      max_batch: decoding slots (requests decoding at once; more wait in a FIFO).
      max_new_tokens: the longest answer a request may ask for (sizes each slot's cache).
      admit_wait_s: longest time (seconds) a decode step waits for requests the HTTP layer is still
        reading (`expect`), so that they join this step; 0 never waits.
      prefill_group: most greedy requests of the same shape that share one prefill (1: each alone, the
        batch-invariant default; see `_prefill`). Grouped programs compile on a background thread (those
        of the warm-up shape after warm-up, others when a group of a new shape first comes) and run once
        while the engine is idle; `status()["compiling"]` counts those not ready.
    """

    def __init__(self, im: InferenceModel, *, max_batch: int, max_new_tokens: int, admit_wait_s: float = 0.01,
                 prefill_group: int = 1):
        self.im = im
        self.cfg = im.cfg
        self.params = nn.unbox(im.params)
        self.max_batch = max_batch
        self.max_new_tokens = max_new_tokens
        self.prompt_slots = max_prompt_length(self.cfg, self.params, im.max_text_len, im.max_frames)
        self.slots = self.prompt_slots + 1 + max_new_tokens
        self.stop_ids = set(im.stop_ids)
        self._stop_array = np.asarray(im.stop_ids, np.int32)
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: list[Request | None] = [None] * max_batch
        self._expected = 0  # requests announced by `expect` and not yet submitted (or given up)
        self.admit_wait_s = admit_wait_s
        self.prefill_group = prefill_group
        # Grouped prefills, keyed by (rows, `_shape`): compiled ahead of time on a background thread
        # (`_compile_groups`), then run once while the engine is idle (`_run_cold`).
        self._group_programs: dict[tuple, Any] = {}
        self._compiling: set[tuple] = set()  # queued or compiling
        self._uncompilable: set[tuple] = set()  # failed to compile: those groups are prefilled one at a time
        self._cold: list[tuple[int, Request]] = []  # compiled, not yet run: (rows, a request of its shape)
        self._compile_queue: queue.SimpleQueue = queue.SimpleQueue()
        self._compiler: threading.Thread | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()
        self.stats: dict[str, float] = {"admitted": 0, "finished": 0, "cancelled": 0, "failed": 0, "steps": 0,
                                        "prefills": 0, "prefill_seconds": 0.0, "step_seconds": 0.0}
        self._state = self._empty_state()

    # ------------------------------------------------------------------ public
    def start(self, warmup: bool = True) -> None:
        """Starts the engine thread; with `warmup`, compiles the common programs first (then `ready`)."""
        self._thread = threading.Thread(target=self._run, args=(warmup,), name="mmlm-engine", daemon=True)
        self._thread.start()

    def expect(self) -> None:
        """Announces a request being read and parsed; `submit` or `unexpect` ends the announcement."""
        with self._cv:
            self._expected += 1

    def unexpect(self) -> None:
        """Withdraws an `expect` whose request will not be submitted (a bad request)."""
        with self._cv:
            self._expected = max(0, self._expected - 1)
            self._cv.notify()

    def submit(self, req: Request, *, expected: bool = False) -> None:
        """Queues `req`; `expected` when it was announced by `expect` (the announcement ends)."""
        with self._cv:
            if expected:
                self._expected = max(0, self._expected - 1)
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            self._waiting.append(req)
            self._cv.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Ends the engine: waiting and decoding requests get an error event; a grouped prefill being
        compiled is finished first."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._compile_queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        if self._compiler is not None:  # a compile left running would crash the interpreter's exit
            self._compiler.join(timeout)

    def status(self) -> dict[str, float]:
        """Slots, active / waiting requests, grouped prefill programs still compiling (or not yet run once),
        counters and the engine thread's busy seconds."""
        with self._cv:
            active = sum(r is not None for r in self._active)
            return {"slots": self.max_batch, "active": active, "waiting": len(self._waiting),
                    "compiling": len(self._compiling) + len(self._cold), **self.stats}

    # ---------------------------------------------------------------- internals
    def _empty_state(self) -> SlotState:
        b, s, cfg = self.max_batch, self.slots, self.cfg
        return SlotState(
            cache=init_cache(cfg.llm, b, s, cfg.compute_dtype, per_layer=not cfg.scan_layers),
            key_valid=jnp.zeros((b, s), bool), write=jnp.zeros((b,), jnp.int32), pos=jnp.zeros((b,), jnp.int32),
            last=jnp.zeros((b,), jnp.int32), rng=jnp.zeros((b, 2), jnp.uint32),
            temperature=jnp.ones((b,), jnp.float32), top_p=jnp.ones((b,), jnp.float32),
            greedy=jnp.ones((b,), bool))

    def _warmup_request(self) -> Request:
        """A one-image prompt in the first text bucket at the default budget (what warm-up compiles)."""
        from mmlm.infer.loading import encode_question

        im = self.im
        pixels = np.zeros((1, views_per_frame(self.cfg), im.image_size, im.image_size, 3), np.float32)
        prompt, fuse = encode_question(im, "Hello", True, return_fuse_mask=True)
        return Request(prompt=prompt, fuse_mask=fuse, pixels=pixels, num_vision_tokens=None, max_tokens=2,
                       temperature=0.0, top_p=1.0, seed=0, emit=lambda kind, value: None)

    def _warmup(self) -> Request:
        """Compiles the decode step and the prefill of `_warmup_request`; returns that request."""
        req = self._warmup_request()
        self._admit([req])
        while any(r is not None for r in self._active):
            self._step()
        self.stats.update({key: type(value)(0) for key, value in self.stats.items()})
        return req

    def _plan_group(self, rows: int, shape: tuple, req: Request) -> None:
        """Queues the grouped prefill of `rows` requests shaped like `req` for the background compiler."""
        sample = dataclasses.replace(req, emit=lambda kind, value: None, cancelled=False, generated=0, slot=-1)
        with self._cv:
            self._compiling.add((rows, shape))
        self._compile_queue.put((rows, shape, sample))
        if self._compiler is None:
            state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self._state)
            self._compiler = threading.Thread(target=self._compile_groups, args=(state,), name="mmlm-compile",
                                              daemon=True)
            self._compiler.start()

    def _compile_groups(self, state: SlotState) -> None:
        """The background compiler: grouped prefill programs, ahead of time from shapes (no state is
        copied), one after the other while the engine serves; until one is ready, its groups are prefilled
        one request at a time (`_groups`)."""
        while (item := self._compile_queue.get()) is not None and not self._stopping:
            rows, shape, req = item
            try:
                args = self._group_inputs([req] * rows)
                program = _prefill_into_jit.lower(self.cfg, self.params, state, args["batch"], args["slots"],
                                                  args["keys"], args["sp"], num_vision_tokens=args["m"],
                                                  greedy=True).compile()
            except Exception:  # costs only speed: these groups are prefilled one request at a time
                program = None
            with self._cv:
                if program is None:
                    self._uncompilable.add((rows, shape))
                else:
                    self._group_programs[(rows, shape)] = program
                    self._cold.append((rows, req))
                self._compiling.discard((rows, shape))
                self._cv.notify()

    def _run_cold(self) -> None:
        """Runs a grouped prefill program compiled ahead of time once, on copies of a request of its shape,
        while the engine is idle: its first run costs tens of milliseconds more than the next ones (XLA sets
        it up), which would otherwise fall on the first requests it serves. The counters are left as they
        were."""
        (rows, req), stats = self._cold[0], dict(self.stats)
        self._admit([dataclasses.replace(req, max_tokens=1) for _ in range(rows)])
        while any(r is not None for r in self._active):
            self._step()
        with self._cv:
            self.stats = stats
            self._cold.pop(0)  # status() counts it until here

    def _run(self, warmup: bool) -> None:
        if warmup:
            req = self._warmup()
            for rows in sorted({self._group_rows(n) for n in range(2, self.prefill_group + 1)}):
                self._plan_group(rows, self._shape(req), req)
        self.ready.set()
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not any(self._active) and not self._cold:
                    self._cv.wait()
                if self._stopping:
                    break
                idle = not self._waiting and not any(self._active)
            if idle and self._cold:
                self._run_cold()
                continue
            self._admit_arrivals()
            if any(r is not None for r in self._active):
                self._step()
        self._fail_all("the server is shutting down")

    def _take_waiting(self) -> list[Request]:
        with self._cv:
            free = sum(r is None for r in self._active)
            return [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]

    def _admit_arrivals(self) -> None:
        """Admits the waiting requests, then, for up to `admit_wait_s`, the expected ones as they come."""
        deadline = time.monotonic() + self.admit_wait_s
        while True:
            admit = self._take_waiting()
            if admit:
                self._admit(admit)
            with self._cv:
                while (not self._waiting and self._expected and not self._stopping
                       and None in self._active and time.monotonic() < deadline):
                    self._cv.wait(max(0.0, deadline - time.monotonic()))
                if not self._waiting or None not in self._active or self._stopping:
                    return

    def _fail_all(self, message: str) -> None:
        with self._cv:
            pending = list(self._waiting) + [r for r in self._active if r is not None]
            self._waiting.clear()
            self._active = [None] * self.max_batch
        for req in pending:
            req.emit("error", message)

    def _finish(self, req: Request, reason: str) -> None:
        with self._cv:
            if 0 <= req.slot < self.max_batch and self._active[req.slot] is req:
                self._active[req.slot] = None
            self.stats["cancelled" if reason == "cancelled" else "finished"] += 1
        req.emit("done", reason)

    def _token(self, req: Request, token: int) -> bool:
        """Delivers a sampled token; returns True when the request is finished."""
        if req.cancelled:
            self._finish(req, "cancelled")
            return True
        if token in self.stop_ids and not req.ignore_eos:
            self._finish(req, "stop")
            return True
        req.generated += 1
        req.emit("token", token)
        if req.generated >= req.max_tokens:
            self._finish(req, "length")
            return True
        return False

    def _admit(self, reqs: list[Request]) -> None:
        """Prefills the requests into free slots; one that ends at its first token frees it again.

        Each request is prefilled alone, or with `prefill_group` > 1 greedy requests of the same shape
        share one prefill (`_groups`). All the prefills are dispatched before the first result is read:
        XLA runs them back to back while this thread prepares the next one's batch.
        """
        start = time.perf_counter()
        live = []
        for req in reqs:
            if req.cancelled:  # gone while waiting
                self._finish(req, "cancelled")
                continue
            with self._cv:
                req.slot = self._active.index(None)
                self._active[req.slot] = req  # reserved: the next request takes another slot
            live.append(req)
        dispatched = []
        for group in self._groups(live):
            try:
                dispatched.append((group, self._prefill(group)))
                self.stats["prefills"] += 1
            except Exception as e:  # an internal error fails these requests only
                for req in group:
                    self._fail_prefill(req, e)
        for group, out in dispatched:
            try:
                rows = np.asarray(out).reshape(-1, 2)
            except Exception as e:
                for req in group:
                    self._fail_prefill(req, e)
                continue
            for req, (first, n_valid) in zip(group, rows.tolist()):
                req.prompt_tokens = n_valid
                self.stats["admitted"] += 1
                self._token(req, first)  # a first token that ends the answer frees the slot
        self.stats["prefill_seconds"] += time.perf_counter() - start

    def _group_rows(self, n: int) -> int:
        """Rows of the prefill batch of n requests: the next power of two, at most `prefill_group` (a few
        programs cover every group)."""
        return min(1 << (n - 1).bit_length(), self.prefill_group)

    def _groups(self, reqs: list[Request]) -> list[list[Request]]:
        """Splits admitted requests into prefill batches, in arrival order within each.

        With `prefill_group` 1 every request is its own batch. Otherwise greedy requests whose batches have
        the same shapes (media shape, budget, text bucket) share batches of up to `prefill_group` rows;
        sampled requests stay alone (each needs its own key for its first token), and so do requests
        prefilled by `choose_budget`.
        """
        if self.prefill_group == 1:
            return [[req] for req in reqs]
        by_shape: dict[tuple, list[Request]] = {}
        groups = []
        for req in reqs:
            try:
                shape = self._shape(req)
            except ValueError:  # an unsupported budget: its prefill alone reports it
                shape = None
            if req.temperature != 0.0 or shape is None or req.prefilled is not None:
                groups.append([req])
                continue
            by_shape.setdefault(shape, []).append(req)
        for shape, same in by_shape.items():
            for i in range(0, len(same), self.prefill_group):
                group = same[i:i + self.prefill_group]
                key = (self._group_rows(len(group)), shape)
                if len(group) == 1 or key in self._group_programs:
                    groups.append(group)
                    continue
                if key not in self._compiling and key not in self._uncompilable:
                    self._plan_group(*key, group[0])  # a new shape: compiled in the background meanwhile
                groups += [[r] for r in group]
        return groups

    def _shape(self, req: Request) -> tuple:
        """What a prefill program depends on besides its rows: media shape, budget (the default one named),
        text bucket."""
        m = self.cfg.check_budget(req.num_vision_tokens) if req.pixels is not None else None
        media = None if req.pixels is None else (req.pixels.shape, req.pixels.dtype.str)
        return media, m, round_up(len(req.prompt), PROMPT_BUCKET)

    def _fail_prefill(self, req: Request, error: Exception) -> None:
        with self._cv:
            if self._active[req.slot] is req:
                self._active[req.slot] = None
            self.stats["failed"] += 1
        req.emit("error", f"prefill failed: {type(error).__name__}: {error}")

    def _prefill(self, group: list[Request]) -> jax.Array:
        """Dispatches the prefill of `group` into its slots; returns (G, 2) [first token, prompt length] rows
        (not yet read).

        A group of one is the program `mmlm chat` runs (a batch of 1), so that its arithmetic never depends
        on which requests arrive with it. A larger group is one batch padded to a power of two rows with
        copies of its first request: faster per request, but XLA's CPU kernels round a row differently at
        another batch size, so its logits may differ from the batch of 1's in the last bits.
        """
        args = self._group_inputs(group)
        if group[0].prefilled is not None:  # the cascade's prefill at the budget it chose
            self._state, out = _insert_prefilled(self._state, group[0].prefilled, args["slots"], args["keys"],
                                                 args["sp"], greedy=args["greedy"])
            group[0].prefilled = None  # its cache now lives in the slot
        elif len(group) > 1:  # compiled ahead of time (`_groups`): the jitted program below, for these shapes
            program = self._group_programs[(len(args["slots"]), self._shape(group[0]))]
            self._state, out = program(self.params, self._state, args["batch"], args["slots"], args["keys"],
                                       args["sp"])
        else:
            self._state, out = _prefill_into_jit(self.cfg, self.params, self._state, args["batch"], args["slots"],
                                                 args["keys"], args["sp"], num_vision_tokens=args["m"],
                                                 greedy=args["greedy"])
        return out

    def _group_inputs(self, group: list[Request]) -> dict[str, Any]:
        """The prefill program's inputs for `group`: its batch padded to `_group_rows` rows with copies of
        the first request, slots (G,), keys (G, 2), sampling parameters, budget and greediness."""
        im, req = self.im, group[0]
        greedy = req.temperature == 0.0
        size = self._group_rows(len(group))
        pad = size - len(group)
        return {
            "batch": make_batch(self.cfg, [r.prompt for r in group], [r.pixels for r in group],
                                pad_id=im.tokenizer.pad_id, pad_len_to=PROMPT_BUCKET, batch_size=size,
                                fuse_masks=[r.fuse_mask for r in group]),
            "slots": np.asarray([r.slot for r in group] + [req.slot] * pad, np.int32),
            # = jax.random.PRNGKey(seed) for 0 <= seed < 2**32
            "keys": np.asarray([[0, r.seed] for r in group] + [[0, req.seed]] * pad, np.uint32),
            # Host arrays (no eager device ops per request); the same values as `generate.sampling_params`.
            "sp": SamplingParams(temperature=np.float32(1.0 if greedy else req.temperature),
                                 top_p=np.float32(req.top_p), stop_ids=self._stop_array, pad_id=self._stop_array[0]),
            "m": self.cfg.check_budget(req.num_vision_tokens) if req.pixels is not None else None,
            "greedy": greedy}

    def choose_budget(self, req: Request, threshold: float) -> list[float]:
        """`num_vision_tokens: "auto"` for an image request, on the calling thread (the HTTP layer's worker,
        while this engine decodes): the confidence cascade (`mmlm.infer.cascade.cascade_prefill`) on the
        inputs `_prefill` would build for it, with its key. Sets `req.num_vision_tokens` to the budget it
        stopped at and `req.prefilled` to the prefill there, which `_prefill` then inserts as it is: the
        answer is the fixed-budget request's, and the prefill is not run twice. Returns the first-token
        probabilities seen."""
        from mmlm.infer.cascade import cascade_prefill

        args = self._group_inputs([req])
        rng = jax.random.split(args["keys"][0])[1]  # as `_prefill_into` draws answer token 0
        chosen = cascade_prefill(self.cfg, self.params, args["batch"], threshold, args["sp"], rng, max_new_tokens=1,
                                 greedy=args["greedy"])
        req.num_vision_tokens, req.prefilled = chosen.budget, chosen.state
        return chosen.confidences

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            all_greedy = all(r is None or r.temperature == 0.0 for r in self._active)
            self._state, tokens = _slot_step_jit(self.cfg, self.params, self._state, np.bool_(all_greedy))
            tokens = np.asarray(tokens)
        except Exception as e:  # an internal error: fail the decoding requests, start from clean slots
            with self._cv:
                active = [r for r in self._active if r is not None]
                self._active = [None] * self.max_batch
                self.stats["failed"] += len(active)
            self._state = self._empty_state()
            for req in active:
                req.emit("error", f"decoding failed: {type(e).__name__}: {e}")
            return
        self.stats["steps"] += 1
        self.stats["step_seconds"] += time.perf_counter() - start
        for slot, req in enumerate(list(self._active)):
            if req is not None:
                self._token(req, int(tokens[slot]))

