"""The chat REPL, driven through a pipe like a script would; and its message when no model is trained."""
import subprocess
import sys

import pytest

from test_sft import TOY, toy_run_copy
from zero_chatgpt.serve.chat import pick_stage
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.rundir import RunDir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_run")
    toy_run_copy(root, tmp_path_factory)
    return root


def _chat(root, stdin, *extra):
    return subprocess.run([sys.executable, "-m", "zero_chatgpt", "chat", "--run-dir", str(root), *extra],
                          input=stdin, capture_output=True, text=True, timeout=120,
                          env={"ZC_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PATH": ""})


@pytest.mark.slow
def test_chat_through_a_pipe(run_dir):
    script = "\n".join(["/temp abc", "/temp nan", "/temp inf", "/temp 1e308", "/temp 0", "苹果是什么？", "/reset", "白菜是什么？", "/system 你是助手", "/help",
                        "/nope", "/quit", "老虎是什么？"]) + "\n"
    r = _chat(run_dir, script, "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    # stdout holds only the streamed answers, one per line; nothing after /quit is answered
    assert r.stdout.splitlines() == [TOY["苹果"], TOY["白菜"]], (r.stdout, r.stderr)
    err = r.stderr
    assert "chatting with sft" in err and "(temperature 0.0)" in err
    for bad in ("abc", "nan", "inf", "1e308"):     # float() reads nan and inf; neither is a temperature
        assert f"(/temp needs a finite number >= 0 and <= 10, e.g. /temp 0.7; got {bad!r})" in err
    assert err.count("(temperature ") == 1
    assert "conversation reset" in err and "system prompt: '你是助手'" in err and "unknown command /nope" in err


def test_no_model_says_which_stage_to_run(tmp_path):
    from runs import record_stage
    from zero_chatgpt.core import checkpoint as ckpt
    from test_sft import _tiny_model, make_tokenizer
    rd = RunDir(tmp_path)
    with pytest.raises(UserError, match="no trained model.*zero-chatgpt run"):
        pick_stage(rd, None)
    m = _tiny_model(make_tokenizer())
    ckpt.save_checkpoint(tmp_path / "pretrain", "final", model_state=m.state_dict(), cfg=m.config)
    record_stage(tmp_path, "pretrain")
    with pytest.raises(UserError, match=r"zero-chatgpt sft --run-dir"):
        pick_stage(rd, None)
    with pytest.raises(UserError, match=r"no usable dpo model.*zero-chatgpt dpo --run-dir"):
        pick_stage(rd, "dpo")
    assert pick_stage(rd, "pretrain") == "pretrain"
    # through the command line: one line, exit status 2
    r = _chat(tmp_path, "你好\n")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "zero-chatgpt sft --run-dir" in r.stderr


def test_chat_with_stdin_closed_is_one_line(run_dir):
    r = subprocess.run(["bash", "-c", f'exec "{sys.executable}" -m zero_chatgpt chat --run-dir "{run_dir}" <&-'],
                       capture_output=True, text=True, timeout=120, env={"ZC_NO_PROGRESS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "standard input, which is closed" in r.stderr and "| zero-chatgpt chat --run-dir" in r.stderr
