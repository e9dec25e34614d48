"""`zero-chatgpt chat`: a multi-turn chat in the terminal, streaming each token as it is generated.

    zero-chatgpt chat --run-dir runs/demo [--stage sft]
    printf '你好\\n「一见倾心」是什么意思？\\n/quit\\n' | zero-chatgpt chat --run-dir runs/demo

Each line is a user message, or a command:
    /reset         forget the conversation (the system prompt stays)
    /system TEXT   set the system prompt (and start over); "/system" alone restores the default
    /temp X        sampling temperature (0 = greedy)
    /help          the commands
    /quit          leave (so does end of input, or Ctrl-D)

Answers go to stdout, everything else (banner, notices) to stderr, so a pipe reads just the
answers, one line each. The conversation so far is re-encoded every turn with the chat template;
when it no longer fits the context, the oldest turns are dropped (and that is said).
"""
from __future__ import annotations

import codecs
import sys

import torch

from zero_chatgpt.core.checkpoint import load_model, stage_model_path
from zero_chatgpt.core.config import RULES
from zero_chatgpt.core.console import info
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.rundir import pick_model
from zero_chatgpt.model.generate import generate
from zero_chatgpt.model.tokenizer import load_tokenizer

HELP = "commands: /reset, /system TEXT, /temp X, /help, /quit"


def pick_stage(run_dir, stage: str | None) -> str:
    """The stage whose model to chat with (see rundir.pick_model), saying why later ones were passed over."""
    name, _, notes = pick_model(run_dir, stage, chat=True)
    for n in notes:
        info(n)
    return name


class TokenPrinter:
    """Writes tokens to a stream as they come, decoding UTF-8 across token boundaries (a Chinese
    character is often split over two byte-level tokens); stop tokens are not printed."""

    def __init__(self, tok, out):
        self.tok, self.out = tok, out
        self.stops = set(tok.stop_ids)
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, index: int, token_id: int) -> None:
        if token_id in self.stops:
            return
        text = self.dec.decode(self.tok.token_bytes[token_id])
        if text:
            self.out.write(text)
            self.out.flush()

    def finish(self) -> None:
        tail = self.dec.decode(b"", final=True)
        self.out.write(tail + "\n")
        self.out.flush()


class ChatSession:
    """The conversation state and one turn of generation; the REPL around it is `repl`."""

    def __init__(self, model, tok, *, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                 repetition_penalty: float, seed: int):
        self.model, self.tok = model, tok
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_k, self.top_p, self.rep = temperature, top_k, top_p, repetition_penalty
        self.system: str | None = None
        self.history: list[dict] = []
        self.gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def prompt_ids(self) -> list[int]:
        """The conversation with the generation prompt; oldest turns dropped until it fits the context."""
        limit = max(8, self.model.config.max_position_embeddings - self.max_new_tokens)
        while True:
            ids = self.tok.encode_chat(self.messages(), add_generation_prompt=True)[0]
            if len(ids) <= limit or len(self.history) <= 1:
                return ids[-limit:]
            self.history = self.history[2:]      # one user + assistant pair
            info("(the conversation got longer than the context: oldest turn forgotten)")

    def reply(self, user_text: str, out) -> str:
        self.history.append({"role": "user", "content": user_text})
        printer = TokenPrinter(self.tok, out)
        g = generate(self.model, [self.prompt_ids()], max_new_tokens=self.max_new_tokens,
                     temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                     repetition_penalty=self.rep, stop_ids=self.tok.stop_ids, tokenizer=self.tok,
                     stream=printer, generator=self.gen)[0]
        printer.finish()
        if g.finish_reason == "length":
            info(f"(answer cut at {self.max_new_tokens} tokens)")
        self.history.append({"role": "assistant", "content": g.text})
        return g.text


def repl(session: ChatSession, lines, out, interactive: bool) -> None:
    """Read user lines (a terminal or a pipe) and answer each; commands start with '/'."""
    prompt = "你> " if interactive else ""
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit"):
                return
            if cmd == "/reset":
                session.history = []
                info("(conversation reset)")
            elif cmd == "/system":
                session.system = arg or None
                session.history = []
                info(f"(system prompt: {arg!r}; conversation reset)" if arg else "(default system prompt)")
            elif cmd == "/temp":
                # the range of chat.temperature in the config; float() also reads "nan" and "inf", which
                # that rule refuses: NaN would poison every softmax, and inf is no temperature
                rule = RULES["chat"]["temperature"].check
                try:
                    t = float(arg)
                    if rule(t) is not None:
                        raise ValueError
                except ValueError:
                    info(f"(/temp needs {rule(float('nan'))}, e.g. /temp 0.7; got {arg!r})")
                else:
                    session.temperature = t
                    info(f"(temperature {t})")
            elif cmd == "/help":
                info(HELP)
            else:
                info(f"(unknown command {cmd}; {HELP})")
            if interactive:
                print(prompt, end="", file=sys.stderr, flush=True)
            continue
        if interactive:
            print("助手> ", end="", file=sys.stderr, flush=True)
        session.reply(text, out)
        if interactive:
            print(prompt, end="", file=sys.stderr, flush=True)


def load_chat_model(ctx):
    """(stage, model in eval mode on run.device, tokenizer) of the chat model `--stage` names or pick_stage picks:
    what `chat` and `serve` talk with."""


    rd = ctx.run_dir
    stage = pick_stage(rd, ctx.args.get("stage"))
    device = ctx.cfg.run.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return stage, load_model(stage_model_path(rd, stage), device=device).eval(), load_tokenizer(rd.tokenizer)


def run_command(ctx) -> None:
    if sys.stdin is None or sys.stdin.closed:
        # started with stdin closed (`<&-`, some service managers): there is nothing to read messages from
        raise UserError("chat reads your messages from standard input, which is closed here: run it in a terminal, "
                        "or pipe the messages in, e.g. printf '你好\\n' | zero-chatgpt chat --run-dir "
                        f"{ctx.run_dir.root}")
    rd = ctx.run_dir
    stage, model, tok = load_chat_model(ctx)
    c = ctx.cfg.chat
    session = ChatSession(model, tok, max_new_tokens=int(ctx.args.get("max_new_tokens") or 256),
                          temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                          repetition_penalty=c.repetition_penalty, seed=ctx.cfg.run.seed)
    interactive = sys.stdin.isatty()
    info(f"chatting with {stage} ({stage_model_path(rd, stage)}); {HELP}")
    if interactive:
        print("你> ", end="", file=sys.stderr, flush=True)
    try:
        repl(session, sys.stdin, sys.stdout, interactive)
    except (KeyboardInterrupt, EOFError):
        pass
    if interactive:
        print(file=sys.stderr)
