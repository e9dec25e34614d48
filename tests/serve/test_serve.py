"""The server: continuous batching in the engine, then the real HTTP server (uvicorn in a subprocess)
through the official openai client, raw bad requests, limits, disconnects, SIGTERM draining,
schemathesis fuzzing from its own OpenAPI schema, and the web page in a real browser."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from runs import record_stage, skip_unless_ci
from test_sft import TOY, toy_run_copy
from zero_chatgpt.model.generate import generate

QUESTION = [{"role": "user", "content": "苹果是什么？"}]


# ---------------------------------------------------------------- runs and servers

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A run whose SFT model answers TOY's questions (greedy: exactly)."""
    root = tmp_path_factory.mktemp("serve_toy")
    tok = toy_run_copy(root, tmp_path_factory)
    return root, tok


@pytest.fixture(scope="module")
def endless(tmp_path_factory, toy):
    _, tok = toy
    return make_endless_run(tmp_path_factory.mktemp("serve_endless"), tok), tok


def make_endless_run(root, tok):
    """A run whose 'SFT' model is random with its stop tokens' output rows zeroed: greedy answers never end
    (a stop logit of 0 is always below the largest of ~800 random logits), so a stream lasts as long as
    max_tokens says: what the tests of queueing, disconnects and draining need."""
    from zero_chatgpt.core import checkpoint as ckpt
    from zero_chatgpt.model.transformer import ModelConfig, Transformer
    tok.save(root / "tokenizer")
    record_stage(root, "tokenizer")
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                      eos_token_id=[tok.im_end_id, tok.eot_id], pad_token_id=tok.pad_id)
    model = Transformer(cfg)
    with torch.no_grad():
        for i in tok.stop_ids:
            model.lm_head.weight[i] = 0.0
    ckpt.save_checkpoint(root / "sft", "final", model_state=model.state_dict(), cfg=cfg)
    record_stage(root, "sft", reads=["tokenizer"])
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`zero-chatgpt serve` in a subprocess, up once /health answers 200. `python`: what runs the CLI
    (("-c", CODE) patches the server before it starts; CODE calls cli.main(sys.argv[1:]))."""

    def __init__(self, root, *extra, env=None, python=("-m", "zero_chatgpt")):
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, *python, "serve", "--run-dir", str(root), "--port", str(self.port), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "ZC_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", **(env or {})})
        deadline = time.time() + 60
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.proc.stderr.read()}")
            try:
                if self.get("/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                self.stop()
                raise AssertionError("server did not come up in 60 s")
            time.sleep(0.1)
        self.base = f"http://127.0.0.1:{self.port}"

    def conn(self, timeout=30) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, body=None, headers=None, raw: bytes | None = None):
        c = self.conn()
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        c.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        r = c.getresponse()
        text = r.read().decode()
        c.close()
        try:
            return r.status, json.loads(text), dict(r.getheaders())
        except json.JSONDecodeError:
            return r.status, text, dict(r.getheaders())

    def get(self, path):
        return self.request("GET", path)[:2]

    def post(self, body, **kw):
        return self.request("POST", "/v1/chat/completions", body, **kw)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def toy_server(toy):
    s = Server(toy[0], "--slots", "4", "--max-tokens", "64")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def endless_server(endless):
    s = Server(endless[0], "--slots", "2", "--queue", "1", "--max-tokens", "900")
    yield s
    s.stop()


def _client(server, key="none"):
    from openai import OpenAI
    return OpenAI(base_url=server.base + "/v1", api_key=key, max_retries=0, timeout=60)


# ---------------------------------------------------------------- the engine: continuous batching

def test_engine_batches_requests_that_arrive_and_leave_at_different_times(endless):
    """Requests submitted while others run join the running batch; each row computes what it would alone
    (greedy tokens equal generate()'s for that prompt alone), and every request ends with its own length."""
    from zero_chatgpt.core.checkpoint import load_model
    from zero_chatgpt.serve.engine import Engine, Request, Sampling
    root, tok = endless
    model = load_model(root / "sft" / "final")
    prompts = [tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)[0]
               for q in ("苹果是什么？", "长江", "一见倾心是什么意思？请解释", "北京")]
    lengths = [40, 12, 25, 33]
    alone = [generate(model, [p], max_new_tokens=n, temperature=0.0)[0].tokens for p, n in zip(prompts, lengths)]

    engine = Engine(model, tok, slots=3, queue=8).start()
    got = {i: [] for i in range(4)}
    done = {i: threading.Event() for i in range(4)}
    text = {i: "" for i in range(4)}

    def emit_for(i):
        def emit(ev):
            if ev[0] == "text":
                text[i] += ev[2]
            elif ev[0] == "done":
                got[i] = ev[1]
                done[i].set()
        return emit
    reqs = [Request(prompt=p, sampling=Sampling(max_tokens=n, temperature=0.0), n=1, emit=emit_for(i))
            for i, (p, n) in enumerate(zip(prompts, lengths))]
    engine.submit(reqs[0])
    time.sleep(0.05)             # the first is decoding when the others arrive
    for r in reqs[1:]:
        engine.submit(r)         # 3 slots: the 4th waits for the 2nd (12 tokens) to leave
    for i in range(4):
        assert done[i].wait(30), f"request {i} never finished"
    engine.stop()
    for i in range(4):
        assert got[i]["completion_tokens"] == lengths[i]
        assert text[i] == tok.decode(alone[i]), i
    assert engine.max_batch == 3                          # three sequences shared decode steps
    assert engine.steps < sum(lengths) - 4                 # far fewer forwards than one request at a time


def test_engine_n_choices_share_a_prefill_and_seed_reproduces(endless):
    from zero_chatgpt.core.checkpoint import load_model
    from zero_chatgpt.serve.engine import Engine, Request, Sampling
    root, tok = endless
    model = load_model(root / "sft" / "final")
    prompt = tok.encode_chat(QUESTION, add_generation_prompt=True)[0]
    engine = Engine(model, tok, slots=4).start()

    def run(seed):
        out, ev_done = {0: "", 1: "", 2: ""}, threading.Event()

        def emit(ev):
            if ev[0] == "text":
                out[ev[1]] += ev[2]
            elif ev[0] in ("done", "error"):
                ev_done.set()
        engine.submit(Request(prompt=prompt, sampling=Sampling(max_tokens=20, temperature=1.0, seed=seed),
                              n=3, emit=emit))
        assert ev_done.wait(30)
        return out
    a, b, c = run(7), run(7), run(8)
    engine.stop()
    assert a == b and a != c
    assert len(set(a.values())) == 3          # the three choices are sampled independently


def test_engine_cancel_frees_slots_at_once(endless):
    from zero_chatgpt.core.checkpoint import load_model
    from zero_chatgpt.serve.engine import Engine, Request, Sampling
    root, tok = endless
    model = load_model(root / "sft" / "final")
    prompt = tok.encode_chat(QUESTION, add_generation_prompt=True)[0]
    engine = Engine(model, tok, slots=1).start()
    first = threading.Event()
    r = Request(prompt=prompt, sampling=Sampling(max_tokens=900, temperature=0.0), n=1,
                emit=lambda ev: first.set())
    engine.submit(r)
    assert first.wait(10)
    t0 = time.time()
    engine.cancel(r)
    while engine.load()["busy"] and time.time() - t0 < 2:
        time.sleep(0.005)
    load = engine.load()
    assert {k: load[k] for k in ("slots", "busy", "queued")} == {"slots": 1, "busy": 0, "queued": 0}
    assert load["prefill_s"] > 0 and load["decode_s"] > 0     # the engine counts its time in both
    assert time.time() - t0 < 0.5
    engine.stop()


def test_engine_drain_waits_for_a_request_it_is_still_prefilling(endless):
    """drain() returns only once every submitted request has ended, including one taken from the queue whose
    prompt is being prefilled (in neither the queue nor the batch at that moment)."""
    from zero_chatgpt.core.checkpoint import load_model
    from zero_chatgpt.serve.engine import Draining, Engine, Request, Sampling
    root, tok = endless
    model = load_model(root / "sft" / "final")
    prompt = tok.encode_chat([{"role": "user", "content": "苹果是什么？" * 40}], add_generation_prompt=True)[0]
    engine = Engine(model, tok, slots=1)
    prefill = engine._prefill

    def slow_prefill(*a):        # widen the window in which the request is in neither the queue nor the batch
        time.sleep(0.3)
        prefill(*a)
    engine._prefill = slow_prefill
    engine.start()
    for _ in range(2):
        done = threading.Event()
        engine.accepting = True
        engine.submit(Request(prompt=prompt, sampling=Sampling(max_tokens=30, temperature=0.0), n=1,
                              emit=lambda ev: done.set() if ev[0] == "done" else None))
        assert engine.drain(30) and done.is_set()
    with pytest.raises(Draining):
        engine.submit(Request(prompt=prompt, sampling=Sampling(max_tokens=1), n=1, emit=lambda ev: None))
    engine.stop()


# ---------------------------------------------------------------- the HTTP API through the openai client

@pytest.mark.slow
def test_openai_client_plain_stream_n_stop_usage(toy_server):
    client = _client(toy_server)
    assert [m.id for m in client.models.list().data] == ["sft"]
    r = client.chat.completions.create(model="sft", messages=QUESTION, temperature=0, max_tokens=16)
    assert r.choices[0].message.content == TOY["苹果"] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="sft", messages=QUESTION, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == TOY["苹果"]
    raw = [c.model_dump(exclude_unset=True) for c in chunks if c.choices]
    assert raw[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in r["choices"][0]["delta"] for r in raw[1:])      # as OpenAI: no "role": null
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    r = client.chat.completions.create(model="sft", messages=QUESTION, temperature=0, max_tokens=16, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2] and {c.message.content for c in r.choices} == {TOY["苹果"]}

    answer = TOY["苹果"]
    r = client.chat.completions.create(model="sft", messages=QUESTION, temperature=0, max_tokens=16,
                                       stop=[answer[1:]])
    assert r.choices[0].message.content == answer[:1] and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="sft", messages=QUESTION, temperature=0, max_tokens=16,
                                                 stop=answer[1:], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer[:1]

    r = client.chat.completions.create(model="sft", messages=QUESTION, temperature=0, max_completion_tokens=1)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 1

    r = client.chat.completions.create(model="sft", messages=QUESTION, temperature=1e-300, max_tokens=16)
    assert r.choices[0].message.content == TOY["苹果"]           # a vanishing temperature is greedy, not NaN

    same = [client.chat.completions.create(model="sft", messages=QUESTION, temperature=1.5, max_tokens=12,
                                           seed=3).choices[0].message.content for _ in range(2)]
    assert same[0] == same[1]


@pytest.mark.slow
def test_concurrent_http_requests_share_decode_steps(endless_server):
    """Two streams at once on a 2-slot server: both run together (their chunks interleave) rather than one after
    the other."""
    s = endless_server
    order = []

    def stream(tag):
        c = s.conn()
        c.request("POST", "/v1/chat/completions", json.dumps(
            {"model": "sft", "messages": QUESTION, "temperature": 0, "max_tokens": 150, "stream": True}),
            {"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200
        for line in r:
            if line.startswith(b"data: {"):
                order.append(tag)
        c.close()
    ts = [threading.Thread(target=stream, args=(t,)) for t in "ab"]
    [t.start() for t in ts]
    [t.join(60) for t in ts]
    assert order.count("a") == order.count("b") > 30     # chunks: text deltas (a split character waits)
    # interleaved: neither stream finished before the other started sending
    first_b, last_a = order.index("b"), len(order) - 1 - order[::-1].index("a")
    first_a, last_b = order.index("a"), len(order) - 1 - order[::-1].index("b")
    assert first_b < last_a and first_a < last_b


# ---------------------------------------------------------------- bad requests: always a 4xx in OpenAI's shape

BAD = [
    ("malformed JSON", b'{"model": "sft", "messages": [', 400, None),
    ("not an object", b'[1, 2]', 400, None),
    ("empty messages", {"model": "sft", "messages": []}, 400, "messages"),
    ("no messages", {"model": "sft"}, 400, "messages"),
    ("unknown role", {"model": "sft", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("content a number", {"model": "sft", "messages": [{"role": "user", "content": 5}]}, 400, None),
    ("temperature a string", {"model": "sft", "messages": QUESTION, "temperature": "hot"}, 400, "temperature"),
    ("temperature too high", {"model": "sft", "messages": QUESTION, "temperature": 9}, 400, "temperature"),
    ("n = 0", {"model": "sft", "messages": QUESTION, "n": 0}, 400, "n"),
    ("n = 1000", {"model": "sft", "messages": QUESTION, "n": 1000}, 400, "n"),
    ("n above the slots", {"model": "sft", "messages": QUESTION, "n": 5}, 400, "n"),
    ("stream not a bool", {"model": "sft", "messages": QUESTION, "stream": 1}, 400, "stream"),
    ("max_tokens above the limit", {"model": "sft", "messages": QUESTION, "max_tokens": 10_000}, 400, "max_tokens"),
    ("max_tokens 0", {"model": "sft", "messages": QUESTION, "max_tokens": 0}, 400, "max_tokens"),
    ("five stop strings", {"model": "sft", "messages": QUESTION, "stop": list("abcde")}, 400, "stop"),
    ("empty stop string", {"model": "sft", "messages": QUESTION, "stop": [""]}, 400, "stop"),
    ("unknown field", {"model": "sft", "messages": QUESTION, "logit_bias": {}}, 400, "logit_bias"),
    ("unknown model", {"model": "gpt-9", "messages": QUESTION}, 404, "model"),
    ("prompt over the context", {"model": "sft", "messages": [{"role": "user", "content": "苹果" * 400}]}, 400,
     "messages"),
]


@pytest.mark.parametrize("what,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_4xx_in_openai_shape(toy_server, what, body, status, param):
    if isinstance(body, bytes):
        code, j, _ = toy_server.request("POST", "/v1/chat/completions", raw=body)
    else:
        code, j, _ = toy_server.post(body)
    assert code == status, (what, j)
    assert set(j) == {"error"} and set(j["error"]) == {"message", "type", "param", "code"}, j
    assert j["error"]["message"] and j["error"]["type"]
    if param is not None:
        assert j["error"]["param"] == param, j


def test_huge_body_unknown_route_and_method(toy_server):
    code, j, _ = toy_server.request("POST", "/v1/chat/completions", raw=b'{"x": "' + b"a" * (2 << 20) + b'"}')
    assert code == 413 and j["error"]["code"] == "request_too_large"
    code, j, _ = toy_server.request("GET", "/v1/nothing")
    assert code == 404 and "error" in j
    code, j, _ = toy_server.request("DELETE", "/v1/models")
    assert code == 405 and "error" in j
    code, j, _ = toy_server.request("GET", "/v1/models/gpt-9")
    assert code == 404 and j["error"]["code"] == "model_not_found"
    code, html = toy_server.get("/")
    assert code == 200 and "<textarea" in html and "http://" not in html and "https://" not in html


@pytest.mark.slow
def test_api_key(toy):
    s = Server(toy[0], env={"ZC_API_KEY": "sekret"})
    try:
        code, j, headers = s.request("GET", "/v1/models")
        assert code == 401 and j["error"]["code"] == "invalid_api_key"
        assert s.request("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        code, _, _ = s.request("POST", "/v1/chat/completions", raw=b"{not json")   # refused before parsing
        assert code == 401
        assert s.get("/health")[0] == 200                     # health checks need no key
        r = _client(s, "sekret").chat.completions.create(model="sft", messages=QUESTION, temperature=0, max_tokens=8)
        assert r.choices[0].message.content == TOY["苹果"]
    finally:
        s.stop()


# ---------------------------------------------------------------- limits, disconnects, draining

def _open_stream(server, max_tokens=900):
    c = server.conn()
    c.request("POST", "/v1/chat/completions", json.dumps(
        {"model": "sft", "messages": QUESTION, "temperature": 0, "max_tokens": max_tokens, "stream": True}),
        {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200
    assert r.readline().startswith(b"data: ")
    return c, r


def _wait_health(server, pred, timeout=5.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        h = server.get("/health")[1]
        if pred(h):
            return h, time.time() - t0
        time.sleep(0.02)
    raise AssertionError(f"health never reached the state: {h}")


def test_disconnect_frees_the_slot_and_a_full_queue_gets_429(endless_server):
    s = endless_server
    c1, _ = _open_stream(s)
    c2, _ = _open_stream(s)                      # both slots busy
    _wait_health(s, lambda h: h["busy"] == 2)
    waiting = threading.Thread(target=lambda: s.post({"model": "sft", "messages": QUESTION, "max_tokens": 4}))
    waiting.start()                              # the one queue place
    _wait_health(s, lambda h: h["queued"] == 1)
    code, j, headers = s.post({"model": "sft", "messages": QUESTION, "max_tokens": 4})
    assert code == 429 and j["error"]["type"] == "rate_limit_error" and headers.get("retry-after") == "1"
    c1.close()
    c2.close()                                   # clients gone mid-stream (900 tokens would take seconds)
    h, took = _wait_health(s, lambda h: h["busy"] == 0 and h["queued"] == 0)
    assert took < 2.0, took
    waiting.join(10)


@pytest.mark.slow
def test_sigterm_drains_running_streams_and_refuses_new_ones(endless):
    s = Server(endless[0], "--slots", "2", "--max-tokens", "900")
    try:
        c, r = _open_stream(s, max_tokens=400)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        code, j, _ = s.post({"model": "sft", "messages": QUESTION, "max_tokens": 4})
        assert code == 503 and j["error"]["code"] == "shutting_down"
        assert s.get("/health")[1]["status"] == "draining"
        events = [line.decode().strip() for line in r if line.strip()]
        c.close()
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2][6:])
        assert last["choices"][0]["finish_reason"] == "length"
        assert s.proc.wait(30) == 0
    finally:
        s.stop()


# ---------------------------------------------------------------- fuzzing from the schema

@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_violation(toy_server, tmp_path):
    exe = Path(sys.executable).parent / "schemathesis"
    r = subprocess.run([str(exe), "run", f"{toy_server.base}/openapi.json", "--checks",
                        "not_a_server_error,response_schema_conformance,status_code_conformance,"
                        "content_type_conformance", "-n", "40", "--seed", "1", "-w", "1",
                        "--request-timeout", "20", "--no-color"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)   # its cache folder goes there
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "Tested: 4" in r.stdout, r.stdout[-2000:]       # every operation of the schema was exercised


# ---------------------------------------------------------------- the web page, in a real browser

@pytest.mark.slow
def test_web_page_streams_a_reply_in_chromium(toy_server, endless_server, tmp_path):
    if not Path("/usr/bin/chromium").exists():
        skip_unless_ci("the browser test needs Debian's chromium: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        requests, console = [], []
        page.on("request", lambda req: requests.append(req.url))
        page.on("console", lambda msg: console.append(msg.text))
        page.goto(toy_server.base + "/")
        page.wait_for_selector("#model:has-text('model: sft')")
        page.fill("#temp", "0")
        page.fill("#maxtok", "16")                 # the toy server allows 64
        page.fill("#input", "苹果是什么？")
        page.keyboard.press("Enter")
        try:
            page.wait_for_selector(".msg.assistant:not(.streaming)", timeout=20_000)
        except Exception:
            raise AssertionError(f"no finished reply; page log: {console}; page text: {page.inner_text('body')}")
        assert page.inner_text(".msg.assistant") == TOY["苹果"]
        bodies = []
        page.on("request", lambda req: bodies.append(req.post_data_json) if req.method == "POST" else None)
        page.fill("#input", "白菜是什么？")          # a second turn: the page sends the whole conversation
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('.msg.assistant:not(.streaming)').length == 2",
                               timeout=20_000)
        assert [m["role"] for m in bodies[-1]["messages"]] == ["user", "assistant", "user"]
        assert bodies[-1]["messages"][1]["content"] == TOY["苹果"] and bodies[-1]["stream"] is True
        page.fill("#maxtok", "9999")               # over the server's limit: the page shows the API's message
        page.fill("#input", "老虎是什么？")
        page.click("#send")
        page.wait_for_selector(".note.error:has-text('max_tokens 9999 is above')")

        # Stop: a long answer is cut by the button, the page says so, and the server frees the slot.
        page2 = browser.new_page()
        page2.on("request", lambda req: requests.append(req.url.replace(endless_server.base, toy_server.base)))
        page2.goto(endless_server.base + "/")
        page2.wait_for_selector("#model:has-text('model: sft')")
        page2.fill("#temp", "0")
        page2.fill("#maxtok", "900")
        page2.fill("#input", "苹果是什么？")
        page2.click("#send")
        page2.wait_for_function("document.querySelector('.msg.assistant.streaming')?.textContent.length > 5")
        page2.click("#stop")
        page2.wait_for_selector(".note:has-text('(stopped)')")
        assert page2.is_enabled("#send") and not page2.is_enabled("#stop")
        _wait_health(endless_server, lambda h: h["busy"] == 0, timeout=2.0)
        page.screenshot(path=str(Path(os.environ.get("ZC_SCREENSHOTS") or tmp_path) / "serve-page.png"))
        browser.close()
    assert requests and all(u.startswith(toy_server.base) for u in requests), requests
