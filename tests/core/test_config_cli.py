"""Config resolution and the CLI contract."""
import subprocess
import sys
from dataclasses import replace

import pytest

from zero_chatgpt.cli import main
from zero_chatgpt.core import config
from zero_chatgpt.core.errors import UserError


def test_every_preset_loads_and_matches_schema():
    schema = config.defaults()
    for name in config.preset_names():
        cfg = config.load_preset(name).to_dict()
        assert set(cfg) == set(schema)
        for section in schema:
            assert set(cfg[section]) == set(schema[section]), (name, section)


def test_override_types_and_errors():
    cfg = config.load_preset("demo")
    cfg2 = config.apply_overrides(cfg, ["data.val_fraction=1", "run.seed=7", 'run.device="cpu"'])
    assert cfg2.data.val_fraction == 1.0 and isinstance(cfg2.data.val_fraction, float)
    assert cfg2.run.seed == 7
    with pytest.raises(UserError, match=r"unknown config key 'data.nope'.*valid keys in \[data\]"):
        config.apply_overrides(cfg, ["data.nope=1"])
    with pytest.raises(UserError, match=r"'run.seed' must be int, got string"):
        config.apply_overrides(cfg, ["run.seed=abc"])
    with pytest.raises(UserError, match="valid sections"):
        config.apply_overrides(cfg, ["nosuch.key=1"])
    with pytest.raises(UserError, match="expected section.key=value"):
        config.apply_overrides(cfg, ["seed"])


def test_resolved_config_is_written_and_reused(tmp_path):
    cfg = config.resolve(tmp_path, "demo", ["run.seed=99"])
    assert not (tmp_path / "config.toml").exists()          # resolving writes nothing
    config.save(tmp_path, cfg)
    again = config.resolve(tmp_path, None, [])
    assert again == cfg and again.run.seed == 99


def test_cli_unknown_key_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "zero_chatgpt", "data", "--run-dir", str(tmp_path),
                        "--set", "data.bogus=1"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "data.bogus" in r.stderr


def test_every_subcommand_has_help(capsys):
    for cmd in ["run", "data", "tokenizer", "pretrain", "sft", "rm", "ppo", "dpo", "grpo", "eval", "report",
                "chat", "serve", "export"]:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "--run-dir" in capsys.readouterr().out


def test_help_lists_the_registry_and_marks_what_is_not_built(capsys):
    from zero_chatgpt.core.registry import PIPELINE, is_built
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert " → ".join(s.name for s in PIPELINE) in out           # the order, from the one registry
    for st in PIPELINE:
        with pytest.raises(SystemExit):
            main([st.name, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert ("[not built yet in this version]" in text) == (not is_built(st)), st.name


def test_a_key_added_later_enters_stage_keys_only_when_set():
    """pretrain.ema_decay came after run directories with stage records: at its default (off, the
    behaviour before it) it is not in the closure, so those runs' stages stay current; set, it is."""
    cfg = config.Config()
    assert "pretrain.ema_decay" not in config.result_items(cfg, ["pretrain"])
    assert "pretrain.lr" in config.result_items(cfg, ["pretrain"])
    cfg.pretrain.ema_decay = 0.99
    assert config.result_items(cfg, ["pretrain"])["pretrain.ema_decay"] == 0.99


def _cli_error(capsys, *args) -> str:
    """Run zero-chatgpt ARGS in this process; it must end in one error line (status 2, no traceback)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_a_config_toml_that_is_not_utf8_is_one_line_for_any_command(tmp_path, capsys):
    (tmp_path / "config.toml").write_bytes(b'[run]\npreset = "demo"\nseed = 7  # caf\xe9 (Latin-1)\n')
    for cmd in ("data", "sft", "report", "chat", "export --out x"):
        err = _cli_error(capsys, *cmd.split(), "--run-dir", tmp_path)
        assert f"{tmp_path / 'config.toml'}:3: not UTF-8" in err and "save the file as UTF-8" in err, err


def test_an_unknown_preset_or_an_empty_config_toml_is_refused(tmp_path, capsys):
    cfg = tmp_path / "config.toml"
    cfg.write_text('[run]\npreset = "nope"\n')
    err = _cli_error(capsys, "data", "--run-dir", tmp_path)
    assert "preset = 'nope' is not a preset" in err and "demo, gpu-0.5b" in err
    err = _cli_error(capsys, "data", "--run-dir", tmp_path / "new", "--set", "run.preset=nope")    # as --preset nope
    assert "'run.preset' = \"nope\": must be one of demo" in err
    for text in ("", "# only a comment\n"):
        cfg.write_text(text)
        err = _cli_error(capsys, "data", "--run-dir", tmp_path)
        assert "is empty" in err and "silently mean the demo defaults" in err and "--preset NAME" in err
        assert cfg.read_text() == text                    # refused, not replaced
    # a config saved by the tool resolves as before
    config.save(tmp_path, config.resolve(tmp_path / "fresh", "gpu-0.5b", []))
    assert config.resolve(tmp_path, None, []).run.preset == "gpu-0.5b"


def test_every_float_key_refuses_non_finite_and_absurd_values(capsys):
    cfg = config.load_preset("demo")
    floats = [(s, k) for s, keys in config.RULES.items() for k in keys if isinstance(getattr(cfg.section(s), k), float)]
    assert len(floats) > 80
    for s, k in floats:
        for bad in (float("inf"), float("-inf"), float("nan"), 1e308, -1e308):
            c = replace(cfg, **{s: replace(cfg.section(s), **{k: bad})})
            with pytest.raises(UserError, match=rf"'{s}\.{k}' = .*must be a finite number >?=? \S+ and <=? \S+; "
                                                rf"set it with --set {s}\.{k}="):
                config.validate(c)
    for name in config.preset_names():                   # every value in use stays inside its range
        config.validate(config.load_preset(name))
    # learning rates: in use up to ~1e-2, refused above 1
    config.validate(config.apply_overrides(cfg, ["rm.lr=0.01", "ppo.critic_lr=1"]))
    for item in ("rm.lr=inf", "rm.lr=1e308", "rm.lr=2", "ppo.critic_lr=10"):
        with pytest.raises(UserError, match=r"must be a finite number > 0 and <= 1;"):
            config.validate(config.apply_overrides(cfg, [item]))
    err = _cli_error(capsys, "data", "--run-dir", "/nonexistent/run", "--set", "rm.lr=inf")
    assert "'rm.lr' = inf: must be a finite number > 0 and <= 1" in err


def test_rl_seed_defaults_to_the_run_seed(tmp_path):
    cfg = config.resolve(tmp_path / "a", "demo", ["run.seed=99"])
    assert cfg.rl.seed == 0 and cfg.rl_seed() == 99
    cfg = config.resolve(tmp_path / "b", "demo", ["run.seed=99", "rl.seed=7"])
    assert cfg.rl_seed() == 7
    # a run recorded before rl.seed existed keeps its stage keys (its value then was the run seed's)
    assert config.RULES["rl"]["seed"].added_at == 0


def test_keys_added_since_a_run_was_made_keep_that_runs_behaviour(tmp_path):
    """A run saved before data.idioms existed keeps the whole dictionary although the demo preset now sizes
    the world; a new run gets the preset's value."""
    config.save(tmp_path / "old", config.resolve(tmp_path / "old", "demo", []))
    path = tmp_path / "old" / "config.toml"
    text = path.read_text(encoding="utf-8")
    assert "idioms = 3000" in text
    path.write_text("\n".join(x for x in text.splitlines() if not x.startswith(("idioms =", "idiom_texts ="))),
                    encoding="utf-8")
    old = config.resolve(tmp_path / "old", None, [])
    assert old.data.idioms == 0 and old.data.idiom_texts == 1
    assert config.resolve(tmp_path / "new", "demo", []).data.idioms == 3000
