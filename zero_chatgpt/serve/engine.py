"""Continuous batching for the server: requests join and leave one running batch between decode steps.

`generate.generate` decodes one fixed batch from start to end, which is what evaluation, RL rollouts
and the terminal chat need (rows that are reproducible as a unit). A server's requests arrive and end
at different times; decoding them one at a time leaves the batch dimension idle, and one thread per
request runs several forwards where one would do. Here, as in llama.cpp's server slots (and vLLM,
Kwon et al. 2023, arXiv:2309.06180, which pages the cache as well):

- one KV cache of `slots` rows (`SlotCache`), each row a sequence at its own length;
- the requests admitted at one step are prefilled together, one forward of their prompts right-padded
  to the longest (causal attention never lets a real position see the padding after it; prompts of
  very different lengths go in separate forwards, so padding stays bounded), then each prompt's
  keys/values are copied into free rows (n > 1 choices share one prefill);
- every decode step is one forward of one token for each busy row, with per-row positions and a
  per-row length mask; a row that finishes is free at the next step, and a waiting request takes it.

Greedy rows without a repetition penalty take one argmax over the batch; the others sample through the
sampler's `process_logits` (model/sampling.py: repetition penalty, temperature, top-k, top-p), per sequence with its
own torch.Generator, so `seed` reproduces an answer (greedy skips top-k / top-p, which never remove
the most likely token).

The engine runs in one thread that owns the model; callers hand it `Request`s and receive events
through the request's `emit` callback, called from that thread.
"""
from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from zero_chatgpt.model.sampling import cut_at_stop, effective_temperature, last_logits, mark_seen, pick, process_logits
from zero_chatgpt.model.transformer import KVCache


class QueueFull(Exception):
    """More requests wait than the queue holds: the caller should answer 429."""


class Draining(Exception):
    """The engine stopped taking requests (shutting down): the caller should answer 503."""


class EngineFailed(Exception):
    """The engine thread has died (a bug, or memory ran out): no request can be served; answer 503."""


class CacheTooLarge(Exception):
    """The KV cache for this many slots does not fit in memory; `per_slot`: the bytes one slot takes."""

    def __init__(self, msg: str, per_slot: int):
        super().__init__(msg)
        self.per_slot = per_slot


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Request:
    """One chat completion: `n` sequences continuing `prompt`. `emit(event)` receives, from the engine
    thread, ("text", index, delta), ("finish", index, reason), and last ("done", usage) or
    ("error", message, status, code): status 500 when its forward failed, 503 when the server cut it (code
    "shutting_down") or the engine died ("engine_failed")."""
    prompt: list[int]
    sampling: Sampling
    n: int
    emit: Callable[[tuple], None]
    cancelled: bool = False
    completion_tokens: int = 0
    open_choices: int = 0
    submitted: float = field(default_factory=time.monotonic)


class SlotCache(KVCache):
    """A KVCache whose rows are independent sequences, each with its own length (`lens`).

    Transformer.forward calls update(layer, k, v) with one new token per row; it is written at each
    row's own position, and the keys/values up to `end` (the longest row, plus the new token) are
    returned; the caller's attention mask hides what lies beyond a row's own length."""

    def __init__(self, cfg, slots: int, max_len: int, device=None, dtype=torch.float32):
        super().__init__(cfg, slots, max_len, device=device, dtype=dtype)
        self.lens = torch.zeros(slots, dtype=torch.long, device=device)
        self.rows = slots     # rows [0, rows) take part in the current forward
        self.end = 1

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kl, vl = self._k[layer], self._v[layer]
        r = torch.arange(self.rows, device=k.device)
        pos = self.lens[:self.rows]
        kl[r, :, pos] = k[:, :, 0]
        vl[r, :, pos] = v[:, :, 0]
        return kl[:self.rows, :, :self.end], vl[:self.rows, :, :self.end]

    def load(self, slot: int, prefilled: KVCache, length: int, row: int = 0) -> None:
        """Copy the first `length` positions of a prefilled cache's row `row` into row `slot`."""
        self.k[:, slot, :, :length] = prefilled.k[:, row, :, :length]
        self.v[:, slot, :, :length] = prefilled.v[:, row, :, :length]
        self.lens[slot] = length


class _Seq:
    """One sequence being decoded in a slot."""

    def __init__(self, req: Request, index: int, slot: int, device, vocab: int):
        self.req, self.index, self.slot = req, index, slot
        self.tokens: list[int] = []
        self.emitted = 0          # characters of decoded text already sent
        s = req.sampling
        self.greedy = effective_temperature(s.temperature) == 0
        self.gen = None             # greedy draws nothing
        if not self.greedy:
            seed = s.seed + index if s.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            self.gen = torch.Generator(device=device).manual_seed(seed)
        self.seen = None
        if s.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            self.seen[0, torch.as_tensor(req.prompt, device=device)] = True


class Engine:
    """The decode loop and its scheduler. start() launches the thread; submit() queues a request;
    cancel() frees its slots at the next step; drain() stops intake and waits for the running ones."""

    def __init__(self, model, tok, *, slots: int = 8, queue: int = 64):
        self.model, self.tok = model, tok
        self.slots, self.queue_limit = slots, queue
        self.max_len = model.config.max_position_embeddings
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.stop_ids = set(tok.stop_ids)
        self.cond = threading.Condition()
        self.pending: collections.deque[Request] = collections.deque()
        self.active: dict[int, _Seq] = {}          # slot -> sequence
        self.free = list(range(slots))             # kept sorted: the lowest rows are used first
        self.live: dict[int, Request] = {}         # every request submitted and not yet ended, wherever it is
        self.accepting = True
        self.failure: str | None = None            # why the engine thread died; None while it runs
        self.cut = 0                               # requests ended by abort()
        self._stop = False
        self.thread: threading.Thread | None = None
        self.steps = 0                             # decode forwards so far (one per step, any batch)
        self.max_batch = 0                         # the most sequences one decode step has carried
        self.busy_s = {"prefill": 0.0, "decode": 0.0}   # engine time in prompt forwards and in decode steps

    # ------------------------------------------------------------------ callers' side (any thread)

    def start(self) -> "Engine":
        """Allocate the KV cache here, in the caller, so that a cache too large for memory fails before the
        server listens (CacheTooLarge) rather than killing the thread behind a healthy-looking server."""
        self.cache = self._allocate_cache()
        self.thread = threading.Thread(target=self._run, name="zero-chatgpt-engine", daemon=True)
        self.thread.start()
        return self

    def cache_bytes(self) -> tuple[int, int]:
        """(the whole cache, one slot) in bytes: keys and values of every layer over the full context."""
        c = self.model.config
        per_slot = 2 * c.num_hidden_layers * c.num_key_value_heads * self.max_len * c.head_dim * self.dtype.itemsize
        return per_slot * self.slots, per_slot

    def _allocate_cache(self) -> "SlotCache":
        need, per_slot = self.cache_bytes()
        free = available_memory(self.device)
        if free is not None and need > free:
            raise CacheTooLarge(f"needs {_gib(need)}, {_gib(free)} is available", per_slot)
        try:
            # under inference_mode, as the thread that writes it runs
            with torch.inference_mode():
                return SlotCache(self.model.config, self.slots, self.max_len, device=self.device, dtype=self.dtype)
        except RuntimeError as e:      # torch's "can't allocate memory" (CPU) and OutOfMemoryError (CUDA)
            raise CacheTooLarge(f"needs {_gib(need)}: {str(e).splitlines()[0]}", per_slot) from None

    @property
    def failed(self) -> str | None:
        """Why the engine can serve nothing any more, or None while it can."""
        if self.failure is None and self.thread is not None and not self.thread.is_alive() and not self._stop:
            return "the engine thread has exited"
        return self.failure

    def submit(self, req: Request) -> None:
        with self.cond:
            if self.failed:
                raise EngineFailed(self.failed)
            if not self.accepting:
                raise Draining("the server is shutting down")
            if self._waiting() >= self.queue_limit:
                raise QueueFull(f"{self._waiting()} requests are already waiting for a slot")
            req.open_choices = req.n
            self.pending.append(req)
            self.live[id(req)] = req
            self.cond.notify()

    def _waiting(self) -> int:
        """(under the lock) Queued requests that the free slots will not take at the next step: a request
        submitted a moment ago is not waiting while a slot is free for it."""
        free = len(self.free)
        for i, r in enumerate(self.pending):     # admitted in order, as _run does: the first that does not fit waits
            if r.n > free:
                return len(self.pending) - i
            free -= r.n
        return 0

    def cancel(self, req: Request) -> None:
        with self.cond:
            req.cancelled = True
            self.cond.notify()

    def load(self) -> dict:
        with self.cond:
            return {"slots": self.slots, "busy": len(self.active), "queued": self._waiting(),
                    "prefill_s": round(self.busy_s["prefill"], 3), "decode_s": round(self.busy_s["decode"], 3)}

    def drain(self, timeout: float) -> bool:
        """Refuse new requests; wait up to `timeout` s for queued and running ones. True if all finished."""
        deadline = time.monotonic() + timeout
        with self.cond:
            self.accepting = False
            # `live`, not pending + active: a request being prefilled is in neither
            while self.live:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.1))
        return True

    def abort(self, message: str) -> None:
        """Cut every request now (at the end of a drain that ran out of time): each gets
        ("error", message, 503, "shutting_down"), and the engine frees their slots at its next step."""
        with self.cond:
            self.accepting = False
            victims = list(self.live.values())
            self.live.clear()
            for r in victims:
                r.cancelled = True
            self.cut += len(victims)
            self.cond.notify_all()
        for r in victims:
            r.emit(("error", message, 503, "shutting_down"))

    def stop(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout=10)

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:
            # A bug outside _guard's reach (or memory gone): without this the requests it holds would wait
            # forever behind a /health that says ok. Fail them, refuse new ones, and let the traceback print.
            with self.cond:
                self.failure = f"{type(e).__name__}: {e}"
                self.accepting = False
                victims = list(self.live.values())
                self.live.clear()
                self.cond.notify_all()
            for r in victims:
                r.emit(("error", f"the model engine stopped ({self.failure}); restart the server", 503,
                        "engine_failed"))
            raise

    def _loop(self) -> None:
        with torch.inference_mode(), self.model.fused_for_inference():
            while True:
                with self.cond:
                    while not self._stop and not self.pending and not self.active:
                        self.cond.wait()
                    if self._stop:
                        break
                    self._drop_cancelled()
                    admitted = []
                    while self.pending and len(self.free) >= self.pending[0].n:
                        req = self.pending.popleft()
                        admitted.append((req, [self.free.pop(0) for _ in range(req.n)]))
                t0 = time.perf_counter()
                for group in prefill_groups(admitted):
                    self._guard_prefill(group)
                t1 = time.perf_counter()
                if self.active:
                    self._guard(None, self._decode_step)
                self.busy_s["prefill"] += t1 - t0
                self.busy_s["decode"] += time.perf_counter() - t1
                with self.cond:
                    self.cond.notify_all()      # drain() waits on the same condition

    def _guard(self, req: Request | None, fn, *args) -> None:
        """A failed forward fails its requests (an error event), never the engine."""
        try:
            fn(*args)
        except Exception as e:   # noqa: BLE001 - reported to the client, the loop goes on
            victims = [req] if req is not None else list({id(s.req): s.req for s in self.active.values()}.values())
            for r in victims:
                self._finish_request(r, error=f"generation failed: {type(e).__name__}: {e}")

    def _guard_prefill(self, group: list[tuple[Request, list[int]]]) -> None:
        """Prefill `group` together. If that forward fails, each prompt is tried alone (one of them may be the
        cause); a request whose prefill fails gets an error event and the slots it was given are free again."""
        try:
            self._prefill(group)
            return
        except Exception as e:   # noqa: BLE001 - reported to the clients, the loop goes on
            error = f"generation failed: {type(e).__name__}: {e}"
        if len(group) > 1 and not any(slot in self.active for _, slots in group for slot in slots):
            for item in group:    # the forward failed (nothing joined the batch): one prompt alone may be the cause
                self._guard_prefill([item])
            return
        for req, slots in group:
            with self.cond:
                running = id(req) in self.live
                for slot in slots:
                    if slot not in self.active and slot not in self.free:
                        self._release(slot)
            if running:      # not one that ended already (an answer of one token, or an abort)
                self._finish_request(req, error=error)

    def _drop_cancelled(self) -> None:
        """(under the lock) Cancelled requests leave the queue and free their slots now."""
        if any(r.cancelled for r in self.pending):
            self.pending = collections.deque(r for r in self.pending if not r.cancelled)
        for slot in [s for s, q in self.active.items() if q.req.cancelled]:
            del self.active[slot]
            self._release(slot)
        running = {id(q.req) for q in self.active.values()} | {id(r) for r in self.pending}
        for key in [k for k, r in self.live.items() if r.cancelled and k not in running]:
            del self.live[key]

    def _release(self, slot: int) -> None:
        self.cache.lens[slot] = 0       # an idle row in a decode batch then costs one position, not its old length
        self.free.append(slot)
        self.free.sort()

    def _prefill(self, group: list[tuple[Request, list[int]]]) -> None:
        """One forward over the prompts of `group`, right-padded to the longest: a causal row never attends to
        the padding after its own positions, so each prompt's keys, values and last logits are its own."""
        lens = [len(req.prompt) for req, _ in group]
        B, L = len(group), max(lens)
        tmp = KVCache(self.model.config, B, L, device=self.device, dtype=self.dtype)
        ids = torch.zeros(B, L, dtype=torch.long)
        for i, (req, _) in enumerate(group):
            ids[i, :lens[i]] = torch.as_tensor(req.prompt, dtype=torch.long)
        hidden = self.model(ids.to(self.device), kv_cache=tmp, return_hidden=True)
        last = hidden[torch.arange(B, device=self.device), torch.as_tensor(lens, device=self.device) - 1]
        logits = self.model.logits(last).float()
        seqs, rows = [], []
        for r, (req, slots) in enumerate(group):
            for i, slot in enumerate(slots):
                self.cache.load(slot, tmp, lens[r], row=r)
                seq = _Seq(req, i, slot, self.device, self.model.config.vocab_size)
                with self.cond:
                    self.active[slot] = seq
                seqs.append(seq)
                rows.append(r)
        for seq, tok in zip(seqs, self._next_tokens(seqs, logits, rows)):
            self._accept(seq, tok)

    def _decode_step(self) -> None:
        with self.cond:
            seqs = list(self.active.values())
        rows = max(s.slot for s in seqs) + 1
        last = [0] * rows
        for s in seqs:
            last[s.slot] = s.tokens[-1]
        busy = torch.as_tensor([s.slot for s in seqs], device=self.device)
        cache = self.cache
        lens = cache.lens[:rows]
        cache.rows, cache.end = rows, int(lens.max()) + 1
        # Row r attends to its own positions [0, lens[r]] (the new token included) and nothing else.
        mask = (torch.arange(cache.end, device=self.device)[None, :] <= lens[:, None])[:, None, None, :]
        hidden = self.model(torch.as_tensor(last, device=self.device)[:, None], position_ids=lens[:, None].clone(),
                            attention_mask=mask, kv_cache=cache, return_hidden=True)
        cache.pos = 0                     # SlotCache tracks lengths per row, not one position
        cache.lens[busy] += 1
        logits = last_logits(self.model, hidden)
        self.steps += 1
        self.max_batch = max(self.max_batch, len(seqs))
        seqs = [s for s in seqs if not s.req.cancelled]
        for s, tok in zip(seqs, self._next_tokens(seqs, logits, [s.slot for s in seqs])):
            if not s.req.cancelled:
                self._accept(s, tok)

    def _next_tokens(self, seqs: list[_Seq], logits: torch.Tensor, rows: list[int]) -> list[int]:
        """The next token of each sequence from its row of `logits`: one argmax for all the greedy rows without a
        repetition penalty, the sampler for each other row."""
        toks = [0] * len(seqs)
        plain = [i for i, s in enumerate(seqs) if s.greedy and s.seen is None]
        if plain:
            at = torch.as_tensor([rows[i] for i in plain], device=logits.device)
            for i, tok in zip(plain, logits.index_select(0, at).max(-1).indices.tolist()):
                toks[i] = tok
        for i, s in enumerate(seqs):
            if not (s.greedy and s.seen is None):
                toks[i] = self._sample(s, logits[rows[i]:rows[i] + 1])
        return toks

    def _sample(self, seq: _Seq, logits: torch.Tensor) -> int:
        sp = seq.req.sampling
        t = effective_temperature(sp.temperature)
        # greedy: top-k and top-p keep the most likely token, so the argmax is the same without them
        scores = process_logits(logits, seq.seen, sp.repetition_penalty, t, sp.top_k if t else 0, sp.top_p if t else 1.0)
        tok = pick(scores, t, seq.gen)
        mark_seen(seq.seen, tok)
        return int(tok)

    def _accept(self, seq: _Seq, tok: int) -> None:
        """Take one sampled token: send the text that is safe to send, finish the sequence when it stops."""
        req = seq.req
        seq.tokens.append(tok)
        req.completion_tokens += 1
        reason = None
        if tok in self.stop_ids:
            reason = "stop"
        elif len(seq.tokens) >= req.sampling.max_tokens or len(req.prompt) + len(seq.tokens) >= self.max_len:
            reason = "length"
        body = seq.tokens[:-1] if reason == "stop" else seq.tokens
        text, hit = cut_at_stop(self.tok.decode(body), req.sampling.stop)
        if hit:
            reason = "stop"
        if reason is None:
            # Hold back an incomplete UTF-8 character (decoded as U+FFFD until its last byte comes)
            # and any tail that may be the start of a stop string: a client must never see either.
            safe = len(text.rstrip("\ufffd"))
            held = 0
            for s in req.sampling.stop:
                held = max(held, next((k for k in range(min(len(s) - 1, safe), 0, -1)
                                       if text[:safe].endswith(s[:k])), 0))
            safe -= held
        else:
            safe = len(text)
        if safe > seq.emitted:
            req.emit(("text", seq.index, text[seq.emitted:safe]))
            seq.emitted = safe
        if reason is not None:
            with self.cond:
                self.active.pop(seq.slot, None)
                self._release(seq.slot)
            req.emit(("finish", seq.index, reason))
            req.open_choices -= 1
            if req.open_choices == 0:
                self._finish_request(req)

    def _finish_request(self, req: Request, error: str | None = None) -> None:
        with self.cond:
            self.live.pop(id(req), None)
        if error is not None:
            with self.cond:
                for slot in [s for s, q in self.active.items() if q.req is req]:
                    del self.active[slot]
                    self._release(slot)
            req.open_choices = 0
            req.emit(("error", error, 500, None))
            return
        usage = {"prompt_tokens": len(req.prompt), "completion_tokens": req.completion_tokens,
                 "total_tokens": len(req.prompt) + req.completion_tokens}
        req.emit(("done", usage))


# Prompts prefilled together are right-padded to the longest: a group stays within this many padded positions
# per real one (and this many tokens in all), so one long prompt does not make many short ones pay its length.
PREFILL_PAD_RATIO = 1.5
PREFILL_MAX_TOKENS = 8192


def prefill_groups(admitted: list[tuple[Request, list[int]]]) -> list[list[tuple[Request, list[int]]]]:
    """Split the requests admitted at one step into prefill forwards: by prompt length, each group's padded size
    (its count x its longest prompt) at most PREFILL_PAD_RATIO x its real tokens and PREFILL_MAX_TOKENS (a prompt
    longer than that goes alone)."""
    groups: list[list[tuple[Request, list[int]]]] = []
    group: list[tuple[Request, list[int]]] = []
    real = 0
    for item in sorted(admitted, key=lambda rs: len(rs[0].prompt)):
        n = len(item[0].prompt)       # the longest so far: the list is sorted
        padded = (len(group) + 1) * n
        if group and (padded > PREFILL_PAD_RATIO * (real + n) or padded > PREFILL_MAX_TOKENS):
            groups.append(group)
            group, real = [], 0
        group.append(item)
        real += n
    if group:
        groups.append(group)
    return groups


def available_memory(device: torch.device) -> int | None:
    """Bytes that a new allocation on `device` can take, or None where that is not known. On Linux a CPU
    allocation beyond it may still succeed (overcommit), then the OOM killer ends the process at the
    first touch: checking first is what gives a clear message instead."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"
