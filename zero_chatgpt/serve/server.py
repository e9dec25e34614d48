"""Running the app under uvicorn: the checks before listening (the API key, who can reach the address),
the drain on SIGTERM, and a shutdown that no console failure can hold up."""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
from typing import TYPE_CHECKING

import uvicorn

from zero_chatgpt.core.console import info
from zero_chatgpt.core.errors import UserError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from zero_chatgpt.serve.engine import Engine


def say(msg: str) -> None:
    """A console line that never stops the server: with stderr gone (`serve 2>&1 | head -2`: a closed
    pipe) or busy (a signal handler interrupting a write), the line is dropped and the server goes on."""
    try:
        info(msg)
    except Exception:   # noqa: BLE001 - BrokenPipeError, EIO, "reentrant call": none is worth failing for
        pass


def check_api_key(key: str | None) -> None:
    """An empty key would leave /v1 open while the user believes it locked: refuse it."""
    if key is None:
        return
    if not key.strip():
        raise UserError("the API key is empty (--api-key '' or ZC_API_KEY=''), which would leave /v1 open to "
                        "anyone: give a real key (e.g. --api-key \"$(openssl rand -hex 16)\"), or unset ZC_API_KEY "
                        "and leave out --api-key to serve without one")
    if key != key.strip():
        raise UserError("the API key starts or ends with white space, which HTTP drops from headers, so no client "
                        "could send it: give --api-key (or ZC_API_KEY) without it")


def is_loopback(host: str) -> bool:
    """True when every address `host` stands for is this machine's own (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None)
    except OSError:
        return False                # unresolvable: binding fails later with its own message
    return bool(found) and all(ipaddress.ip_address(a[4][0].split("%")[0]).is_loopback for a in found)


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    if api_key is None and not insecure and not is_loopback(host):
        raise UserError(f"--host {host} can be reached from other machines, and no API key is set: anyone who "
                        "reaches it could use the model and its compute. Set --api-key KEY (or ZC_API_KEY), "
                        "or pass --insecure to serve it open anyway (a trusted network only)")


def serve(app: FastAPI, engine: Engine, host: str, port: int, drain_timeout: float, on_start=None) -> None:
    """Run uvicorn until SIGINT/SIGTERM. The first signal drains: the server keeps accepting and answers new
    requests 503, running ones get drain_timeout seconds and are then cut (an error event, or a 503), and only
    when every response has gone out does uvicorn close the listening socket and stop. A second signal stops
    at once."""

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if app.state.draining:           # a second signal: stop now, cutting what still runs
                # in a thread: the engine's lock may be held by the code this handler interrupted
                threading.Thread(target=engine.abort, daemon=True,
                                 args=("the server was stopped before this answer finished",)).start()
                return super().handle_exit(sig, frame)
            app.state.draining = True
            say(f"draining: new requests get 503, running ones have {drain_timeout:g} s to finish "
                "(a second Ctrl-C stops now)")
            threading.Thread(target=self.finish, daemon=True).start()

        def finish(self):
            try:
                done = engine.drain(drain_timeout)
                if not done:
                    engine.abort(f"the server shut down before this answer finished (it waited "
                                 f"--drain-timeout {drain_timeout:g} s)")
                # Until the last responses (and the cut ones' errors) are sent, keep listening and answering 503:
                # uvicorn's shutdown closes the socket, and a client would see a refused connection instead.
                deadline = time.monotonic() + 2.0
                while app.state.inflight and time.monotonic() < deadline:
                    time.sleep(0.01)
                why = "by a second signal" if done else f"after the {drain_timeout:g} s drain"
                say(f"stopped: {engine.cut} request(s) still running were cut {why}" if engine.cut else
                    "drained: every request finished; stopped")
            finally:
                # Whatever happened above, stop as asked, exit status 0 (uvicorn's own handler would
                # re-raise the signal at exit).
                self.should_exit = True

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if on_start is not None and self.servers:
                on_start(self.servers[0].sockets[0].getsockname()[1])

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5,
                            access_log=False)
    DrainingServer(config).run()
