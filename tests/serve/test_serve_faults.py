"""The server when things go wrong, against the real uvicorn process: settings it must refuse before
listening, a KV cache that cannot be allocated, an engine thread that dies, a drain that runs out of time,
a stderr pipe that closes, and request bodies that never finish arriving."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from test_serve import QUESTION, Server, _open_stream, make_endless_run
from test_sft import make_tokenizer

ENV = {**{k: v for k, v in os.environ.items() if k != "ZC_API_KEY"}, "ZC_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run whose answers never end on their own (see make_endless_run)."""
    return make_endless_run(tmp_path_factory.mktemp("serve_faults"), make_tokenizer())


def _serve_all(run, cases: dict, timeout=60) -> dict:
    """`zero-chatgpt serve` for each case, all at once (each is a separate interpreter start); name ->
    (exit status, stderr). A server that comes up instead of refusing is killed at `timeout`: status None."""
    procs = {}
    for name, (args, env) in cases.items():
        procs[name] = subprocess.Popen([sys.executable, "-m", "zero_chatgpt", "serve", "--run-dir", str(run), *args],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       env={**ENV, **env})
    out = {}
    for name, p in procs.items():
        try:
            _, err = p.communicate(timeout=timeout)
            out[name] = (p.returncode, err)
        except subprocess.TimeoutExpired:
            p.kill()
            out[name] = (None, p.communicate()[1])
    return out


def _last_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


@pytest.mark.slow
def test_unsafe_or_invalid_settings_are_refused_with_one_line(run):
    """An empty key (flag or environment) would serve /v1 open; a non-loopback host without a key would serve
    the model to the network; port 70000 made asyncio raise OverflowError. Each is one line, status 2."""
    got = _serve_all(run, {
        "empty --api-key": (["--api-key", "", "--port", "0"], {}),
        "empty ZC_API_KEY": (["--port", "0"], {"ZC_API_KEY": ""}),
        "0.0.0.0 without a key": (["--host", "0.0.0.0", "--port", "0"], {}),
        "port 70000": (["--port", "70000"], {}),
    })
    for name, (code, err) in got.items():
        assert code == 2, (name, code, err[-2000:])
        assert "Traceback" not in err, (name, err)
    for name in ("empty --api-key", "empty ZC_API_KEY"):
        err = got[name][1]
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("error: the API key is empty") and "ZC_API_KEY" in err and "--api-key" in err, err
    err = got["0.0.0.0 without a key"][1]
    assert len(err.strip().splitlines()) == 1, err
    assert "--host 0.0.0.0" in err and "--insecure" in err and "--api-key" in err and "other machines" in err, err
    line = _last_line(got["port 70000"][1])
    assert "argument --port" in line and "0..65535" in line and "70000" in line, line


@pytest.mark.slow
def test_a_kv_cache_too_large_for_memory_stops_before_listening(run):
    """`--slots` far beyond memory: the engine thread used to die at its first allocation behind a /health that
    said ok, and every chat request hung. Now the cache is allocated (or measured against free memory)
    before the server listens, and the command ends with one line naming --slots."""
    code, err = _serve_all(run, {"huge": (["--slots", "2000000", "--port", "0"], {})})["huge"]
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: cannot allocate the KV cache for --slots 2000000") and "lower --slots" in err, err


def test_a_failed_cache_allocation_is_cache_too_large_before_the_thread_starts(run, monkeypatch):
    """Where free memory is unknown (or the check passes), the allocation itself fails: torch's allocator error
    becomes CacheTooLarge in the caller of start(), and no engine thread is left running."""
    from zero_chatgpt.core.checkpoint import load_model
    from zero_chatgpt.serve import engine
    from zero_chatgpt.model.tokenizer import load_tokenizer
    monkeypatch.setattr(engine, "available_memory", lambda device: None)
    # 2^26 slots x 4 MiB = 256 TiB: beyond the address space, so the allocation fails under any overcommit policy
    e = engine.Engine(load_model(run / "sft" / "final"), load_tokenizer(run / "tokenizer"), slots=1 << 26)
    with pytest.raises(engine.CacheTooLarge, match="can't allocate memory") as got:
        e.start()
    assert e.thread is None and got.value.per_slot == 4 << 20     # 4 layers x 4 heads x 1024 x 32 x fp32, k and v


# A server whose engine thread dies at its first request, as a bug outside the per-request guard would kill it.
DIE_AT_FIRST_REQUEST = """
import sys
from zero_chatgpt.serve import engine
def boom(self):
    raise RuntimeError("injected engine fault")
engine.Engine._drop_cancelled = boom
from zero_chatgpt.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_dead_engine_makes_health_fail_and_requests_get_503_at_once(run):
    s = Server(run, "--slots", "2", python=("-c", DIE_AT_FIRST_REQUEST))
    try:
        t0 = time.time()
        code, j, _ = s.post({"model": "sft", "messages": QUESTION, "max_tokens": 4})   # the one it dies on
        assert code == 503 and j["error"]["code"] == "engine_failed", j
        assert "injected engine fault" in j["error"]["message"] and "restart" in j["error"]["message"], j
        assert time.time() - t0 < 10
        code, h = s.get("/health")
        assert code == 503 and h["status"] == "failed" and "injected engine fault" in h["error"], h
        for stream in (False, True):
            t0 = time.time()
            code, j, _ = s.post({"model": "sft", "messages": QUESTION, "max_tokens": 4, "stream": stream})
            assert code == 503 and j["error"]["code"] == "engine_failed" and j["error"]["type"] == "server_error", j
            assert time.time() - t0 < 1.0
        s.proc.send_signal(signal.SIGTERM)       # nothing is left to drain: it stops at once
        assert s.proc.wait(15) == 0
    finally:
        s.stop()


# A server whose decode steps take at least 10 ms each, so that a 900-token stream outlasts a 1 s drain on
# any machine.
SLOW_DECODE = """
import sys, time
from zero_chatgpt.serve import engine
step = engine.Engine._decode_step
def slow_step(self):
    time.sleep(0.01)
    step(self)
engine.Engine._decode_step = slow_step
from zero_chatgpt.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_drain_keeps_answering_503_and_cuts_what_outlasts_drain_timeout(run):
    """SIGTERM with a stream running past --drain-timeout: until that stream has ended, a new request gets
    the announced 503 (uvicorn used to close its socket as soon as the drain gave up, refusing connections
    while the stream went on uncut); at the deadline the stream is cut with an error event."""
    s = Server(run, "--slots", "2", "--max-tokens", "900", "--drain-timeout", "1", python=("-c", SLOW_DECODE))
    try:
        assert s.proc.stderr.readline().startswith("serving sft")
        c, r = _open_stream(s, max_tokens=900)     # 9 s or more: it outlasts the 1 s drain
        ended, events = threading.Event(), []

        def read():
            events.extend(line.decode().strip() for line in r if line.strip())
            ended.set()
        threading.Thread(target=read, daemon=True).start()
        t0 = time.time()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.stderr.readline().startswith("draining")      # from here on, every request gets 503
        answers = []
        while not ended.is_set():
            try:
                answers.append(s.post({"model": "sft", "messages": QUESTION, "max_tokens": 4})[0])
            except OSError as e:
                if not ended.is_set():      # refused while a response was still being sent
                    answers.append(type(e).__name__)
            time.sleep(0.05)
        cut_after = time.time() - t0
        c.close()
        assert answers and set(answers) == {503}, answers
        assert events[-1].startswith("data: {") and "[DONE]" not in events[-1], events[-3:]
        err = json.loads(events[-1][6:])["error"]
        assert err["code"] == "shutting_down" and "--drain-timeout 1 s" in err["message"], err
        assert cut_after < 5, cut_after
        assert s.proc.wait(15) == 0
        assert "were cut" in s.proc.stderr.read()
    finally:
        s.stop()


@pytest.mark.slow
def test_sigterm_stops_the_server_when_its_stderr_pipe_is_closed(run):
    """`serve 2>&1 | head -2`: once head has exited, writing "drained" raised BrokenPipeError in the drain
    thread before it told uvicorn to stop, and the server stayed up for ever."""
    s = Server(run, "--slots", "2", "--max-tokens", "900")
    try:
        assert s.proc.stderr.readline().startswith("serving sft")
        c, _ = _open_stream(s)                   # holds the drain open until the pipe is closed
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.stderr.readline().startswith("draining")
        s.proc.stderr.close()                    # head -2 exits: every later write gets EPIPE
        c.close()                                # the stream ends, the drain finishes and says so
        assert s.proc.wait(15) == 0
    finally:
        s.proc.stderr = None                     # closed above: Popen must not read it again
        s.stop()


@pytest.fixture(scope="module")
def open_server(run):
    s = Server(run, "--host", "0.0.0.0", "--insecure", "--body-timeout", "1")
    yield s
    s.stop()


def test_insecure_serves_a_non_loopback_host_without_a_key_and_says_so(open_server):
    line = open_server.proc.stderr.readline()
    assert line.startswith("serving sft") and "http://0.0.0.0:" in line and "--insecure" in line, line
    code, j, _ = open_server.request("GET", "/v1/models")
    assert code == 200 and j["data"][0]["id"] == "sft"


def test_stalled_request_bodies_get_408_and_their_connections_close(open_server):
    """Clients that send headers and part of a body, then nothing: each used to hold its connection (and
    its share of the server) for as long as it liked. With --body-timeout 1 each gets a 408 in OpenAI's
    shape after a second, and the connection is closed."""
    socks = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", open_server.port), timeout=10)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 200\r\n\r\n{\"model\": \"sft\", ")
        socks.append(sock)
    t0 = time.time()
    for sock in socks:
        data = b""
        while chunk := sock.recv(65536):          # until the server closes the connection
            data += chunk
        sock.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), data[:300]
        err = json.loads(body)["error"]
        assert err["code"] == "request_timeout" and "--body-timeout" in err["message"], err
    assert time.time() - t0 < 5
    assert open_server.get("/health")[0] == 200       # and the server goes on serving
