"""The typed configuration (core/settings.py): every key is written once, and what users read about a key
(defaults.toml, --help, the errors) is made from that one place."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from runs import previous_version
from zero_chatgpt.cli import main
from zero_chatgpt.core import config, schema, settings
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.core.registry import PIPELINE, TOOLS
from zero_chatgpt.core.settings import SECTIONS, ChatSection, DataSection, ModelSection
from zero_chatgpt.core.train_settings import TrainingSection


def test_defaults_toml_is_written_from_the_schema():
    text = (schema.PRESET_DIR / "defaults.toml").read_text(encoding="utf-8")
    assert text == settings.render_defaults(), \
        "presets/defaults.toml is stale: python -m zero_chatgpt.core.settings > zero_chatgpt/presets/defaults.toml"
    # and it reads back as the schema's defaults, key for key, type for type
    import tomllib
    parsed = tomllib.loads(text)
    want = settings.default_dict()
    assert parsed == want
    assert all(type(parsed[s][k]) is type(v) for s, vals in want.items() for k, v in vals.items())


def test_every_key_says_what_it_does_and_allows_its_default():
    for sec in SECTIONS:
        default = sec()
        for f in sec.keys():
            assert len(f.metadata["help"]) > 8, f"{sec.NAME}.{f.name} has no help text"
            assert schema.rule_of(f).check(getattr(default, f.name)) is None, f"{sec.NAME}.{f.name}"
    assert [f.name for f in dataclasses.fields(settings.Config)] == [s.NAME for s in SECTIONS]
    assert all(isinstance(getattr(settings.Config(), s.NAME), s) for s in SECTIONS)
    # the six trained stages share one base: the same loop keys, each with its own defaults
    trained = [s for s in SECTIONS if issubclass(s, TrainingSection)]
    assert {s.NAME for s in trained} == {st.name for st in PIPELINE if st.trained}
    loop_keys = {f.name for f in dataclasses.fields(TrainingSection)}
    assert all(loop_keys <= {f.name for f in s.keys()} for s in trained)
    assert len({s().lr for s in trained}) > 1


def test_each_commands_help_lists_the_keys_it_reads_with_their_defaults(capsys):
    for st in (*PIPELINE, *TOOLS.values()):
        with pytest.raises(SystemExit):
            main([st.name, "--help"])
        out = capsys.readouterr().out
        for name in st.sections:
            sec = settings.BY_NAME[name]
            assert f"[{name}]" in out, (st.name, name)
            for f in sec.keys():
                assert f"  {f.name} = {schema.toml_value(getattr(sec(), f.name))}\n" in out, (st.name, name, f.name)
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "peak learning rate" in out and "(op) torch.compile the model" in out


def test_no_default_is_written_twice():
    """The loop's, the model's, the cleaner's, the server's and the exports' defaults are the sections'."""
    from zero_chatgpt.export.common import generation_settings
    from zero_chatgpt.model.transformer import ModelConfig
    from zero_chatgpt.serve.app import Defaults
    from zero_chatgpt.train.loop import LoopSettings
    assert LoopSettings().loop_values() == TrainingSection().loop_values()
    shape = ModelSection().values()
    assert {k: getattr(ModelConfig(), k) for k in shape} == {**shape, "num_key_value_heads": shape["num_attention_heads"]}
    assert shape["num_key_value_heads"] == 0                      # 0 = as many as the query heads
    assert generation_settings(None) == ChatSection().values()
    chat = ChatSection(temperature=0.3, top_k=7)
    assert generation_settings(chat) == chat.values()
    assert dataclasses.astuple(Defaults.of(chat, 100)) == (0.3, chat.top_p, 7, chat.repetition_penalty, 100)
    # a preset's section reaches the loop whole: what the stage trains with is what the config says
    sft = config.load_preset("demo").sft
    assert LoopSettings.from_section(sft).loop_values() == sft.loop_values()


def test_consumers_receive_typed_sections():
    cfg = config.resolve(Path("/nonexistent/run"), "demo", ["sft.lr=2e-4", "data.min_chars=5"])
    assert isinstance(cfg, settings.Config) and isinstance(cfg.data, DataSection)
    assert cfg.sft.lr == 2e-4 and isinstance(cfg.sft.lr, float) and cfg.data.min_chars == 5
    with pytest.raises(TypeError):
        cfg.sft["lr"]                                     # noqa: B018 - no string-keyed reads any more


def test_a_bad_value_names_the_key_what_it_allows_and_what_it_does():
    demo = config.load_preset("demo")
    with pytest.raises(UserError) as e:
        config.validate(config.apply_overrides(demo, ["grpo.scale_rewards=\"mean\""]))
    msg = str(e.value)
    assert "'grpo.scale_rewards' = \"mean\": must be one of 'group', 'batch', 'none'" in msg
    assert "--set grpo.scale_rewards=VALUE" in msg and "Dr. GRPO" in msg        # the key's own help, from the schema
    with pytest.raises(UserError, match="Muon orthogonalizes whole matrices"):
        config.validate(config.apply_overrides(demo, ["dpo.optimizer=\"muon\"", "dpo.fsdp=true"]))


def test_stage_keys_are_those_of_the_version_before_the_typed_config(tmp_path):
    """The same config gives the same stage keys as the dict-based version before (commit 885640d), so no run
    directory made by it is retrained: its result items are computed by that version's own code."""
    old = previous_version(tmp_path / "old", "885640d")
    sets = ["sft.lr=2e-4", "grpo.ptx_coef=0.1", "data.idioms=300", "ppo.loop_penalty=0.5"]
    script = ("import json, sys\nfrom zero_chatgpt.core import config\nfrom zero_chatgpt.core.registry import PIPELINE\n"
              "out = {}\nfor preset in config.preset_names():\n"
              "    for sets in ([], SETS):\n"
              "        cfg = config.apply_overrides(config.load_preset(preset), sets)\n"
              "        out[preset + str(len(sets))] = {st.name: config.result_items(cfg, st.sections) for st in PIPELINE}\n"
              "print(json.dumps(out, sort_keys=True))\n").replace("SETS", repr(sets))
    before = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env={"PYTHONPATH": str(old), "PATH": "/usr/bin:/bin"})
    assert before.returncode == 0, before.stderr[-2000:]
    now = {}
    for preset in config.preset_names():
        for s in ([], sets):
            cfg = config.apply_overrides(config.load_preset(preset), s)
            now[preset + str(len(s))] = {st.name: config.result_items(cfg, st.sections) for st in PIPELINE}
    assert json.loads(before.stdout) == json.loads(json.dumps(now, sort_keys=True))
