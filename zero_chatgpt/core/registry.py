"""The registry of stages: the one place the recipe's order is spelled.

`run` walks it, `--help` lists it (marking what this version does not build yet), `chat`,
`export`, `serve` and `eval` pick models from it, and `rundir.begin` reads what a stage
reads and which config sections go into its key from it. A new stage is one entry here
and one module with a `run_stage(ctx)` function; it needs no other plumbing.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    module: str                  # "package.module"; its run_stage(ctx) runs the stage
    help: str
    out: str                     # its folder in the run directory
    reads: tuple[str, ...] = ()  # stages whose outputs it reads: their records feed its key
    sections: tuple[str, ...] = ()  # config sections it reads (its --help lists their keys); for a stage of
                                    # the recipe their result keys (config.result_items) feed its key
    trained: bool = False        # trains weights: checkpoints in out/, never deleted without --force
    model: str = ""              # "lm": a causal LM at out/final; "rm": a reward model there
    chat: bool = False           # its model is a chat model (the default for chat/serve)
    aligns: bool = False         # aligns the SFT model (RLHF): compared with SFT step by step and in the report
    distributed: bool = False    # under torchrun every rank runs it; otherwise rank 0 does, the others wait
    func: str = "run_stage"

    @property
    def steps_key(self) -> str:
        """The key whose raise continues a finished training stage instead of retraining it."""
        return f"{self.name}.max_steps"

    def load(self):
        """The stage function, or None when this version does not build the stage yet."""
        try:
            mod = importlib.import_module(self.module)
        except ModuleNotFoundError as e:
            if e.name == self.module or self.module.startswith(str(e.name) + "."):
                return None
            raise
        return getattr(mod, self.func, None)


PIPELINE: tuple[Stage, ...] = (
    Stage("data", "zero_chatgpt.stages.data", "clean and deduplicate the corpus into RUN_DIR/data",
          out="data", sections=("data",)),
    Stage("tokenizer", "zero_chatgpt.stages.tokenizer", "train the BPE tokenizer and encode the corpus into RUN_DIR/tokens",
          out="tokenizer", reads=("data",), sections=("tokenizer",)),
    Stage("pretrain", "zero_chatgpt.stages.pretrain", "pretrain the language model on RUN_DIR/tokens",
          out="pretrain", reads=("tokenizer",), sections=("run", "model", "pretrain"), trained=True, model="lm",
          distributed=True),
    Stage("sft", "zero_chatgpt.stages.sft", "build instruction data and fine-tune the pretrained model (SFT)",
          out="sft", reads=("tokenizer", "pretrain"), sections=("run", "sft"), trained=True, model="lm", chat=True,
          distributed=True),
    Stage("rm", "zero_chatgpt.stages.rm", "train the reward model on preference pairs",
          out="rm", reads=("sft",), sections=("run", "rl", "rm"), trained=True, model="rm", distributed=True),
    Stage("ppo", "zero_chatgpt.stages.ppo", "align the SFT model with PPO against the reward model",
          out="ppo", reads=("sft", "rm"), sections=("run", "rl", "ppo"), trained=True, model="lm", chat=True,
          aligns=True, distributed=True),
    Stage("dpo", "zero_chatgpt.stages.dpo", "align the SFT model with DPO on preference pairs",
          out="dpo", reads=("sft", "rm"), sections=("run", "rl", "dpo"), trained=True, model="lm", chat=True,
          aligns=True, distributed=True),
    Stage("grpo", "zero_chatgpt.stages.grpo", "align the SFT model with GRPO (group-normalized rewards, no critic)",
          out="grpo", reads=("sft", "rm"), sections=("run", "rl", "grpo"), trained=True, model="lm", chat=True,
          aligns=True, distributed=True),
    Stage("eval", "zero_chatgpt.stages.eval", "evaluate every trained model on the same held-out prompts",
          out="eval", sections=("eval",)),
    Stage("report", "zero_chatgpt.stages.report", "write RUN_DIR/report/report.md and report.html with plots",
          out="report"),
)
STAGES: dict[str, Stage] = {s.name: s for s in PIPELINE}

# Commands that use a run's outputs but are not steps of the recipe.
TOOLS: dict[str, Stage] = {t.name: t for t in (
    Stage("chat", "zero_chatgpt.serve.chat", "chat with a trained model in the terminal (streams tokens)", out="",
          sections=("chat",), func="run_command"),
    Stage("serve", "zero_chatgpt.serve.app", "serve an OpenAI-compatible API and a web chat page", out="",
          sections=("chat",), func="run_command"),
    Stage("export", "zero_chatgpt.export.command", "export a trained model (hf | gguf)", out="", sections=("chat",),
          func="run_command"),
    Stage("plan", "zero_chatgpt.train.plan", "estimate what a run costs on GPUs (time, memory per GPU, disk) before "
          "it runs", out="", func="run_command"),
)}
# Commands that only read the run directory: no lock, nothing written into it.
READ_ONLY = frozenset(TOOLS)


def model_stages(chat_only: bool = False) -> list[Stage]:
    """Stages that leave a causal LM at out/final, in pipeline order."""
    return [s for s in PIPELINE if s.model == "lm" and (s.chat or not chat_only)]


def is_built(stage: Stage) -> bool:
    """Whether this version has the stage's module (without importing it)."""
    try:
        return importlib.util.find_spec(stage.module) is not None
    except ModuleNotFoundError:
        return False
