"""The configuration's schema: one typed section per `[section]` of a config.

Every key is written once, here: its type, its default, what it does (and why: the paper, the
measurement, the original recipe), the values it allows, and whether it is *operational*: a key that
changes how a result is computed or reported (logging, eval and checkpoint intervals, worker and thread
counts, the device), never what it is, so it never enters a stage key and changing it never makes a
finished stage out of date. `presets/defaults.toml` is written from these classes (`render_defaults`,
and a test checks the file), `zero-chatgpt STAGE --help` lists the keys a stage reads from them, and the
errors of `core/config.py` name their allowed values from them. The six trained stages share one base,
`TrainingSection` (the training loop's keys, train/loop.py), each with its own defaults; the same idea
as TRL's one dataclass per trainer.

A key added after run directories were made carries `added_at`: the value that gives the behaviour from
before it. At that value it is left out of stage keys, so those runs' stages stay up to date.
"""
from __future__ import annotations

import math
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar

from zero_chatgpt.data.sources import FORMATS

PRESET_DIR = Path(__file__).parents[1] / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml") if p.stem != "defaults")


# ---------------------------------------------------------------- what a key allows

@dataclass(frozen=True)
class Rule:
    """What a key allows. `check(value)` returns None when fine, else what is allowed."""
    check: Callable[[Any], str | None]
    operational: bool = False       # True: never part of a stage key (see the module docstring)
    added_at: Any = None            # the value that means "as before this key existed" (module docstring)


def _num(lo=None, hi=None, lo_open=False, hi_open=False, integer=False) -> Callable[[Any], str | None]:
    def check(v):
        bad = (lo is not None and (v <= lo if lo_open else v < lo)) or \
              (hi is not None and (v >= hi if hi_open else v > hi))
        # NaN compares false with every bound and inf passes any open-ended one: neither is ever allowed
        if not bad and not (isinstance(v, float) and not math.isfinite(v)):
            return None
        lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo:g}"
        hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi:g}"
        return ("an integer " if integer else "a finite number ") + " and ".join(s for s in (lo_s, hi_s) if s)
    return check


def Int(lo=None, hi=None, **kw) -> Rule:
    return Rule(_num(lo, hi, integer=True), **kw)


def Float(lo, hi, lo_open=False, hi_open=False, **kw) -> Rule:
    """A float key in [lo, hi] (open ends with lo_open / hi_open). Both bounds are required: a value far
    beyond any sensible one (lr = 1e308) is a typo, and it is better refused now than found as a NaN
    loss hours later. The upper bounds are generous, one or more orders above any value in use."""
    return Rule(_num(lo, hi, lo_open, hi_open), **kw)


def Frac(lo_open=False, hi_open=False, **kw) -> Rule:
    return Float(0.0, 1.0, lo_open, hi_open, **kw)


def Choice(*allowed, **kw) -> Rule:
    return Rule(lambda v: None if v in allowed else "one of " + ", ".join(repr(a) for a in allowed), **kw)


def Free(**kw) -> Rule:
    """Any value of the key's type."""
    return Rule(lambda v: None, **kw)


def Each(inner: Callable[[Any], str | None], what: str, nonempty: bool = False, **kw) -> Rule:
    def check(v):
        if nonempty and not v:
            return f"a non-empty list of {what}"
        for x in v:
            why = inner(x)
            if why is not None:
                return f"a list of {what}; {x!r} is not" + (f" ({why})" if why else "")
        return None
    return Rule(check, **kw)


def _device(v: str) -> str | None:
    # "cuda" means each process's own GPU (LOCAL_RANK under torchrun); pick GPUs with CUDA_VISIBLE_DEVICES
    return None if v in ("auto", "cpu", "cuda") else "'auto', 'cpu' or 'cuda' (choose GPUs with CUDA_VISIBLE_DEVICES)"


def _source(v) -> str | None:
    fmt, sep, path = str(v).partition(":")
    return None if sep and fmt in FORMATS and path else f"FORMAT:PATH with FORMAT one of {', '.join(FORMATS)}"


def _preference_source(v) -> str | None:
    # the reward model reads pairs: any other reader's records have no chosen / rejected
    return _source(v) or (None if str(v).startswith("preference:") else "")


def _preset(v) -> str | None:
    # the preset names which keys a run starts from (config.resolve loads it under config.toml)
    return None if v in preset_names() else "one of " + ", ".join(preset_names())


_LEN = _num(1, integer=True)
_FRACTION = _num(0, 1)
BUILTIN_PARTS = ("peoples-daily", "reviews", "idioms")
NEGATIVES = ("sample", "other", "cut", "repeat", "refusal", "empty")   # the rejected answers rm.negatives may name
GRPO_REWARDS = ("rm", "rules", "rm+rules", "reference", "rm+reference", "rules+reference", "rm+rules+reference")


# ---------------------------------------------------------------- keys and sections

def key(default, help: str, rule: Rule | None = None) -> Any:
    """A config key: its default, what it does and why (`help`), and what it allows (`rule`)."""
    meta = {"help": help, "rule": rule or Free()}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def again(default, help: str | None = None, rule: Rule | None = None) -> Any:
    """An inherited key with this section's default (and, where given, its own help or rule)."""
    return field(default=default, metadata={"again": True, "help": help, "rule": rule})


def section(cls):
    """@dataclass for a config section: an `again(...)` key takes what it leaves out from the base's key."""
    base = getattr(cls.__mro__[1], "__dataclass_fields__", {})      # the nearest base's keys, inherited ones too
    for name, value in list(vars(cls).items()):
        if isinstance(value, Field) and value.metadata.get("again"):
            old = base[name]
            meta = {"help": value.metadata["help"] or old.metadata["help"],
                    "rule": value.metadata["rule"] or old.metadata["rule"]}
            setattr(cls, name, field(default=value.default, metadata=meta))
    return dataclass(cls)


class Section:
    """A config section: typed keys, read as attributes (`cfg.sft.lr`)."""
    NAME: ClassVar[str] = ""

    @classmethod
    def keys(cls) -> list[Field]:
        """The keys in the order defaults.toml shows them: the section's own first, then inherited ones."""
        out: list[Field] = []
        for c in cls.__mro__:
            parent = getattr(c.__mro__[1], "__dataclass_fields__", {}) if c is not object else {}
            out += [f for f in fields(cls) if f.name in getattr(c, "__dataclass_fields__", {}) and f.name not in parent]
        return out

    def values(self) -> dict:
        return {f.name: getattr(self, f.name) for f in self.keys()}


def rule_of(f: Field) -> Rule:
    return f.metadata["rule"]


@section
class RunSection(Section):
    NAME = "run"
    preset: str = key("demo", "the preset this config started from: an existing run takes keys it lacks from it",
                      Rule(_preset, operational=True))
    seed: int = key(1234, "global random seed", Int(0))
    device: str = key("auto", "auto | cpu | cuda", Rule(_device, operational=True))


@section
class DataSection(Section):
    """Reading, cleaning and deduplicating the corpus (stages/data.py, data/clean.py, data/dedup.py).
    Each dropped document is counted by its reason in data/stats.json."""
    NAME = "data"
    sources: list = key([], '["FORMAT:PATH", ...]; empty = the built-in corpus', Each(_source, "FORMAT:PATH strings"))
    val_fraction: float = key(0.01, "share of documents held out for validation (by hash, stable)", Frac(hi_open=True))
    builtin_parts: list = key(list(BUILTIN_PARTS), "parts of the built-in corpus read when sources = []",
                              Each(lambda v: None if v in BUILTIN_PARTS else "", ", ".join(map(repr, BUILTIN_PARTS)),
                                   nonempty=True))
    idioms: int = key(0, "the built-in idiom world, for the corpus and the SFT/RL/eval questions: 0 = the whole "
                         "dictionary (~31k); N = the N idioms the built-in news and reviews mention most",
                      Int(0, added_at=0))
    idiom_texts: int = key(1, "built-in: texts per idiom in the corpus (1..5): the dictionary paragraph, then its "
                              "meaning, an example, its origin, a definition, each in a text of its own "
                              "(builtin.idiom_texts)", Int(1, 5, added_at=1))
    text_field: str = key("text", "jsonl / skypile / parquet: the field or column holding the text",
                          Rule(lambda v: None if v else "a non-empty field name"))
    text_unit: str = key("line", 'FORMAT text: "line" = one document per line, "block" = per blank-line-separated '
                                 "block", Choice("line", "block"))
    max_record_bytes: int = key(16777216, "a longer line / JSON element is a bad record (counted, reported, skipped)",
                                Int(1))
    workers: int = key(0, "cleaning processes; 0 = all cores", Int(0, operational=True))
    executor: str = key("local", "\"local\" = a process pool here; \"ray\" = Ray tasks (pip install "
                                 "'zero-chatgpt[ray]'), for this stage and for the tokenizer stage's corpus encoding",
                        Choice("local", "ray", operational=True, added_at="local"))
    ray_address: str = key("", 'executor = "ray": "" starts a local Ray, "auto" or "ray://HOST:PORT" joins a cluster',
                           Free(operational=True, added_at=""))
    shard_docs: int = key(5000, "documents per part (the unit of parallel work, resume and output shards)", Int(1))
    drop_samples: int = key(5, "dropped documents kept per reason in stats.json for inspection",
                            Int(0, operational=True))
    # normalization
    nfkc: bool = key(True, "Unicode NFKC (１２月 -> 12月), keeping Chinese full-width punctuation (，。！？：；（）)")
    t2s: bool = key(False, "traditional -> simplified Chinese with OpenCC t2s")
    remove_citations: bool = key(True, "remove [n] / [n-m] citation marks (as the original recipe's Baike cleaning)")
    collapse_punct: bool = key(True, "。。。 / ！！ / ？？ -> one mark (as the original recipe)")
    mask_pii: bool = key(True, "mask e-mail addresses, phone, ID-card and QQ numbers (<EMAIL> <PHONE> <ID> <QQ>)")
    # filters
    min_chars: int = key(30, "drop shorter documents (characters, after normalization)", Int(0))
    min_cjk_chars: int = key(30, "drop documents with fewer CJK characters (the original recipe's Baike rule: 30)",
                             Int(0))
    min_cjk_ratio: float = key(0.3, "drop documents whose CJK share is lower (ChineseWebText / MNBVC web text: 0.30)",
                               Frac())
    min_line_punct_ratio: float = key(0.12, "multi-line documents: drop if fewer lines end in terminal punctuation "
                                            "(C4, FineWeb 0.12)", Frac())
    max_dup_line_frac: float = key(0.287, "multi-line documents: drop if more lines repeat an earlier line "
                                          "(FineWeb-2 cmn_Hani)", Frac())
    top_ngram_n: list = key([2, 3, 4], "character n-gram sizes for the most-frequent-n-gram rule (Gopher, on "
                                       "characters)", Each(_LEN, "integers >= 1"))
    top_ngram_max: list = key([0.25, 0.22, 0.21], "drop if the top n-gram covers more of the text (99.9th "
                                                  "percentile of People's Daily)", Each(_FRACTION, "numbers in [0, 1]"))
    dup_ngram_n: list = key([5, 7, 10, 13], "character n-gram sizes for the repeated-n-gram rule (Gopher; "
                                            "ChineseWebText: 13)", Each(_LEN, "integers >= 1"))
    dup_ngram_max: list = key([0.42, 0.34, 0.28, 0.25], "drop if repeated n-grams cover more of the text (99.9th "
                                                        "percentile of People's Daily)",
                              Each(_FRACTION, "numbers in [0, 1]"))
    drop_section_titles: list = key(["重要参数", "项目简介", "产品简介", "个人资料", "个人简介"],
                                    "baidubaike: drop entries with such a section (as the original recipe)")
    # deduplication
    exact_dedup: bool = key(True, "drop exact copies (xxh3-64 of the normalized text), keeping the first")
    near_dedup: bool = key(True, "drop near duplicates (MinHash + LSH, verified on the true Jaccard), keeping the "
                                 "first")
    near_threshold: float = key(0.7, "character-shingle Jaccard at or above which two documents are near "
                                     "duplicates", Frac(lo_open=True))
    shingle_chars: int = key(5, "shingle = this many characters (5-grams: 0.83 Jaccard after 2 % edits, 0.0003 "
                                "unrelated)", Int(1))
    minhash_perm: int = key(120, "MinHash permutations (datatrove/FineWeb: 112; the original recipe: 128)", Int(1))
    lsh_bands: int = key(15, "LSH bands (rows = perm / bands = 8: candidate threshold ~0.71); 0 = chosen from "
                             "near_threshold", Int(0))
    minhash_seed: int = key(1, "seed of the MinHash permutations", Int(0))


@section
class TokenizerSection(Section):
    """Byte-level BPE (rustbpe to train, tiktoken to encode, exported to HF tokenizer.json)."""
    NAME = "tokenizer"
    vocab_size: int = key(32000, "ids in total = embedding rows: 256 bytes + merges + special tokens (the original "
                                 "recipe: 32000)", Int(257))
    train_chars: int = key(200000000, "characters of data/ sampled to train on (the original recipe: a ~1.5 GB "
                                      "sample); the trainer's memory grows about linearly with it (docs/experiments.md)",
                           Int(1))
    max_doc_chars: int = key(10000, "each sampled document is cut to this many characters (bounds pre-token counts "
                                    "and memory)", Int(1))
    reserved_tokens: int = key(4, "spare special tokens after <|endoftext|> <|im_start|> <|im_end|> <|pad|>", Int(0))
    pattern: str = key("", 'pre-tokenization regex for training AND encoding; "" = tokenizer.DEFAULT_PATTERN '
                           "(Llama 3's: letters/Han runs with one leading mark, digits in groups of <= 3)")
    default_system_prompt: str = key("", 'system message the chat template inserts when a chat has none ("" = none)')
    num_threads: int = key(0, "encoding threads; 0 = all cores", Int(0, operational=True))


@section
class ModelSection(Section):
    """LLaMA shape (field names as transformers' LlamaConfig); vocab_size comes from the tokenizer.
    Defaults: the original recipe's 0.1B model (hidden 512, intermediate 2752, 24 layers, 16 heads,
    untied, RoPE theta 1e6 -> ~159M parameters with a 32k vocabulary)."""
    NAME = "model"
    hidden_size: int = key(512, "width of the residual stream", Int(2))
    intermediate_size: int = key(2752, "SwiGLU hidden width (about 8/3 x hidden, rounded)", Int(1))
    num_hidden_layers: int = key(24, "transformer blocks", Int(1))
    num_attention_heads: int = key(16, "query heads (head_dim = hidden_size / heads)", Int(1))
    num_key_value_heads: int = key(0, "key/value heads for grouped-query attention; 0 = as many as query heads",
                                   Int(0))
    max_position_embeddings: int = key(1024, "longest sequence (the RoPE table size)", Int(2))
    rope_theta: float = key(1000000.0, "RoPE base (the original recipe used 1e6; LLaMA 1 used 1e4)",
                            Float(0.0, 1e9, lo_open=True))
    rms_norm_eps: float = key(1e-5, "RMSNorm epsilon", Float(0.0, 0.1, lo_open=True))
    tie_word_embeddings: bool = key(False, "share the input embedding with lm_head (saves vocab x hidden params)")
    initializer_range: float = key(0.02, "std of the normal init; o_proj/down_proj get std / sqrt(2 x layers) "
                                         "(GPT-2)", Float(0.0, 1.0, lo_open=True))


@section
class TrainingSection(Section):
    """The training loop's keys (train/loop.py), shared by every trained stage; each stage's section sets
    its own defaults. Its defaults here are pretraining's."""
    max_steps: int = key(19000, "optimizer steps", Int(1))
    # AdamW learning rates in use are 1e-6 .. 1e-2; above 1 every step overshoots
    lr: float = key(4e-4, "peak learning rate", Float(0.0, 1.0, lo_open=True))
    min_lr_ratio: float = key(0.1, "the schedule's floor, as a share of lr", Frac())
    warmup_steps: int = key(1000, "linear warmup steps", Int(0))
    schedule: str = key("cosine", "cosine | wsd (warmup-stable-decay, MiniCPM arXiv:2404.06395) | constant",
                        Choice("cosine", "wsd", "constant"))
    decay_fraction: float = key(0.2, "wsd only: the last share of steps that decays to the floor", Frac())
    weight_decay: float = key(0.1, "AdamW decoupled weight decay, matrices only", Float(0.0, 10.0))
    beta1: float = key(0.9, "AdamW beta1", Frac(hi_open=True))
    beta2: float = key(0.95, "AdamW beta2", Frac(hi_open=True))
    grad_clip: float = key(1.0, "clip the global gradient norm to this; 0 = off", Float(0.0, 1e4))
    precision: str = key("auto", "auto | fp32 | bf16 (autocast); auto = bf16 on CUDA and on CPUs with bf16 "
                                 "instructions (AMX or AVX512-BF16), where it was measured faster "
                                 "(runtime.resolve_precision), resolved on the machine that trains: a run's key holds "
                                 '"auto", not the result', Choice("auto", "fp32", "bf16"))
    # how it runs and what it reports, not what it computes: operational. (fsdp is not: its optimizer
    # state is saved by parameter name, DDP's by index, so a run cannot switch midway.)
    compile: bool = key(False, "torch.compile the model (faster steps after a one-off compile)",
                        Free(operational=True))
    fsdp: bool = key(False, "under torchrun: shard parameters/gradients/optimizer (FSDP2) instead of DDP")
    ema_decay: float = key(0.0, "> 0: evaluate and ship an average of the weights (EMA, this decay per step)",
                           Frac(hi_open=True, added_at=0.0))
    optimizer: str = key("adamw", "adamw | muon: Muon (torch.optim.Muon) for the blocks' matrices, AdamW for the "
                                  "rest", Choice("adamw", "muon", added_at="adamw"))
    checkpoint_every: int = key(1000, "save RUN_DIR/STAGE/step-N every this many steps; 0 = only at the end",
                                Int(0, operational=True))
    keep_last: int = key(2, "keep this many step-N checkpoints (older ones are deleted)", Int(1, operational=True))
    eval_every: int = key(500, "evaluate every this many steps; 0 = only at the end", Int(0, operational=True))
    log_every: int = key(10, "write a log record every this many steps", Int(1, operational=True))
    tensorboard: bool = key(True, "also log to RUN_DIR/logs/tb/STAGE", Free(operational=True))
    init_from: str = key("", 'start from these weights (a checkpoint or an HF Llama folder); "" = the stage before')

    def loop_values(self) -> dict:
        """The training loop's keys of this section (train/loop.LoopSettings takes them)."""
        return {f.name: getattr(self, f.name) for f in fields(TrainingSection)}


_RL_EVAL = "steps between gold evaluations on rl.gold_prompts; the best is kept as final"
_RL_FSDP = "RL needs the whole policy on every process to sample from it: DDP only"


@section
class PretrainSection(TrainingSection):
    NAME = "pretrain"
    seq_len: int = key(1024, "tokens per training sequence (documents packed, separated by <|endoftext|>)", Int(1))
    batch_tokens: int = key(524288, "tokens per optimizer step over all ranks (= micro_batch_size x seq_len x "
                                    "ranks x accumulation)", Int(1))
    micro_batch_size: int = key(16, "sequences per forward pass per rank", Int(1))
    eval_tokens: int = key(1048576, "validation tokens per evaluation (the first ones of the val split)",
                           Int(0, operational=True))
    samples: int = key(6, "text samples written to eval/pretrain.json at the end", Int(0, operational=True))
    sample_tokens: int = key(96, "new tokens per sample", Int(1, operational=True))
    max_steps: int = again(19000, "optimizer steps (19000 x 524288 = ~10B tokens, the original recipe's budget)")
    eval_every: int = again(500, "validation loss / bits per character every this many steps; 0 = only at the end")
    init_from: str = again("", "start from these weights (a checkpoint or an HF Llama folder, e.g. the original "
                               "recipe's release)")


@section
class SFTSection(TrainingSection):
    NAME = "sft"
    sources: list = key([], '["FORMAT:PATH", ...]; empty = the built-in instructions',
                        Each(_source, "FORMAT:PATH strings"))
    eval_fraction: float = key(0.05, "share of idioms (or --source conversations) held out for evaluation, by "
                                     "stable hash", Frac(hi_open=True))
    rl_fraction: float = key(0.15, "share kept out of SFT as the prompt pool for the reward model and RL "
                                   "(rl.jsonl)", Frac(hi_open=True))
    val_fraction: float = key(0.02, "share of the SFT idioms held out for the SFT validation loss (val.jsonl)",
                              Frac(hi_open=True))
    multi_turn_fraction: float = key(0.1, "built-in: share of idioms asked as one multi-turn conversation "
                                          "(follow-ups say 它)", Frac())
    identity_fraction: float = key(0.02, "built-in: identity/greeting dialogues repeated up to this share of "
                                         "train.jsonl", Frac(hi_open=True))
    extra_idioms: int = key(0, "built-in with data.idioms > 0: this many dictionary idioms outside that world join "
                               "SFT's train split only (-1 = all): unseen in pretraining, they make SFT learn to copy "
                               "the asked idiom instead of recalling a similar one (chat_data.extra_idioms)",
                            Int(-1, added_at=0))
    min_prompt_chars: int = key(2, "--source: drop conversations whose first question is shorter (the original "
                                   "recipe's length filter)", Int(0))
    max_prompt_chars: int = key(512, "--source: drop conversations whose first question is longer", Int(1))
    dedup_threshold: float = key(0.8, "--source: MinHash Jaccard threshold over user+assistant text "
                                      "(data/dedup.find_duplicates)", Frac(lo_open=True))
    max_seq_len: int = key(512, "longest conversation in tokens (capped by the model's context); longer ones keep "
                                "their first max_seq_len tokens, so a cut answer has no eos; counted in the summary",
                           Int(8))
    max_train_samples: int = key(0, "train on at most this many conversations of train.jsonl (0 = all)", Int(0))
    val_samples: int = key(512, "conversations of val.jsonl for the validation loss", Int(0, operational=True))
    batch_tokens: int = key(16384, "tokens per optimizer step (rows x padded length, all ranks); sets gradient "
                                   "accumulation", Int(1))
    micro_batch_tokens: int = key(4096, "token budget of one forward pass (length-grouped rows x longest row)",
                                  Int(8))
    unlikelihood: float = key(1.0, "alpha of token-level unlikelihood on the answer's earlier tokens (Welleck et al. "
                                   "2019, arXiv:1908.04319; model/losses.py): it keeps greedy answers from looping at "
                                   "no cost in validation loss (docs/experiments.md); 0 = plain SFT",
                              Float(0.0, 100.0))
    max_steps: int = again(1000)
    lr: float = again(1e-4, "peak learning rate (the original recipe's SFT: 1e-4)")
    warmup_steps: int = again(50)
    weight_decay: float = again(0.0, "AdamW weight decay on matrices (SFT commonly uses 0)")
    checkpoint_every: int = again(500)
    eval_every: int = again(200, "steps between validation losses (0 = only at the end)")
    init_from: str = again("", 'checkpoint folder to start from; "" = RUN_DIR/pretrain/final')


@section
class EvalSection(Section):
    NAME = "eval"
    num_prompts: int = key(1000, "test prompts reported (the kinds taken in turn, seeded); the built-in test part "
                                 "has ~5,000", Int(1))
    gold_fraction: float = key(0.2, "share of the eval idioms (by stable hash, all questions of an idiom together) "
                                    "kept as the gold part, on which RL stages select checkpoints (eval/prompts.py: "
                                    "gold_prompts); never reported", Frac(hi_open=True))
    max_new_tokens: int = key(128, "answer limit in tokens; an answer without eos within it counts against eos_rate",
                              Int(1))
    batch_size: int = key(64, "prompts generated together (left-padded, KV cache)", Int(1, operational=True))
    repetition_penalty: float = key(1.0, "1 = plain greedy; above 1, greedy over CTRL-penalized scores, with plain "
                                         "greedy reported beside it as plain_greedy (a model trained with "
                                         "sft.unlikelihood needs none: docs/experiments.md)",
                                    Float(0.0, 10.0, lo_open=True))
    num_samples: int = key(20, "(question, answer, reference) samples kept in eval/<stage>.json", Int(0))
    val_samples: int = key(256, "conversations of sft_data/val.jsonl for chat_val_loss", Int(0))
    bootstrap: int = key(2000, "resamples of the paired bootstrap behind each vs_sft 95 % interval (seed: "
                               "run.seed); 0 = none", Int(0))


@section
class ChatSection(Section):
    """Sampling of `zero-chatgpt chat`, the server's defaults, and the exports' generation settings."""
    NAME = "chat"
    temperature: float = key(0.7, "sampling temperature (0 = greedy; /temp X changes it in chat)", Float(0.0, 10.0))
    top_k: int = key(50, "sample among the k most likely tokens (0 = off)", Int(0))
    top_p: float = key(0.9, "nucleus sampling: the smallest set with this much probability (1 = off)",
                       Frac(lo_open=True))
    repetition_penalty: float = key(1.1, "CTRL-style penalty on tokens already in the answer (1 = off)",
                                    Float(0.0, 10.0, lo_open=True))


@section
class RLSection(Section):
    """Shared by the reward model's data and every RL stage (rm, dpo, ppo, grpo)."""
    NAME = "rl"
    temperature: float = key(0.8, "sampling temperature of rollouts and of the SFT samples in the preference data; "
                                  "no top-k / top-p / repetition penalty: the log-probs must be those of the sampler",
                             Float(0.0, 10.0, lo_open=True))
    max_new_tokens: int = key(96, "longest sampled answer (rollouts, preference data); the reward model is trained "
                                  "on answers of this length, so it never scores longer ones", Int(1))
    gold_prompts: int = key(200, "held-out prompts (the eval split's gold part, never reported) whose greedy char_f1 "
                                 "selects each RL stage's final checkpoint", Int(1))
    gold_max_new_tokens: int = key(96, "answer limit when scoring those prompts", Int(1))
    seed: int = key(0, "seed of the preference data, the reward model and every RL stage; 0 = run.seed. Another "
                       "value trains RM -> PPO / DPO / GRPO again on the same SFT model (bench/rl_seeds.py)",
                    Int(0, added_at=0))


@section
class RMSection(TrainingSection):
    """The reward model: the SFT backbone + a scalar head, Bradley-Terry loss on preference pairs built from
    the RM part of the RL prompt pool (sft_data/rl.jsonl, rl_part = "rm"), or read from --source
    preference:FILE."""
    NAME = "rm"
    sources: list = key([], '["preference:PATH", ...] JSON lines {prompt, chosen, rejected}; empty = built from '
                            "the pool", Each(_preference_source, "preference:PATH strings"))
    prompts: int = key(0, "RM prompts to build pairs from (0 = all); each gives one pair per kind in `negatives`",
                       Int(0))
    negatives: list = key(list(NEGATIVES), "rejected answers: an SFT sample (at rl.temperature), another idiom's "
                                           "explanation, the reference cut mid-way (no eos), a phrase repeated, a "
                                           "refusal, an empty answer; chosen is always the reference",
                          Each(lambda v: None if v in NEGATIVES else "", ", ".join(NEGATIVES), nonempty=True))
    val_fraction: float = key(0.1, "share of RM prompts (by idiom) held out for accuracy, probes and gold agreement",
                              Frac(lo_open=True, hi_open=True))
    eval_pairs: int = key(512, "held-out pairs scored at each evaluation during training (the first ones); the "
                               "final evaluation scores all of them", Int(1, operational=True))
    gold_samples: int = key(2, "SFT samples per held-out prompt for gold_agreement (pairs whose char_f1 differ by "
                               ">= 0.2)", Int(2))
    max_seq_len: int = key(256, "longest prompt + answer in tokens (the prompt's start is cut first)", Int(16))
    batch_pairs: int = key(64, "preference pairs per optimizer step (all ranks)", Int(1))
    micro_batch_pairs: int = key(32, "pairs per forward pass (chosen and rejected together: 2x the rows)", Int(1))
    max_steps: int = again(300)
    lr: float = again(1e-4, "peak learning rate (TRL's RewardTrainer default)")
    warmup_steps: int = again(10)
    weight_decay: float = again(0.0)
    checkpoint_every: int = again(100)
    eval_every: int = again(100, "steps between held-out accuracies (0 = only at the end)")
    init_from: str = again("", '"" = the SFT model\'s backbone (RUN_DIR/sft/final) with a new scalar head')


@section
class DPOSection(TrainingSection):
    """Direct preference optimization (Rafailov et al. 2023, arXiv:2305.18290) on the reward model's training
    pairs: -log sigmoid(beta * ((log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected))),
    pi_ref = the SFT model, its log-probs computed once; chosen and rejected in one forward."""
    NAME = "dpo"
    beta: float = key(0.1, "strength of the implicit KL to the SFT model (the paper's and TRL's default)",
                      Float(0.0, 100.0, lo_open=True))
    sft_loss: float = key(0.0, "weight of the chosen answers' mean cross-entropy added to the loss (RPO-style); "
                               "0 = off", Float(0.0, 100.0))
    max_seq_len: int = key(256, "longest prompt + answer in tokens", Int(16))
    batch_pairs: int = key(64, "pairs per optimizer step (all ranks)", Int(1))
    micro_batch_pairs: int = key(32, "pairs per forward pass", Int(1))
    max_steps: int = again(200)
    lr: float = again(1e-5)
    warmup_steps: int = again(10)
    weight_decay: float = again(0.0)
    checkpoint_every: int = again(50)
    eval_every: int = again(25, _RL_EVAL, Int(0))
    log_every: int = again(5)
    ema_decay: float = again(0.0, "> 0: evaluate and ship an average of the actor (EMA, this decay per step)")
    init_from: str = again("", '"" = RUN_DIR/sft/final')


@section
class PolicySection(TrainingSection):
    """What PPO and GRPO share: rollouts, their passes and the penalties and mixes on top."""
    prompts_per_rollout: int = key(64, "prompts sampled per rollout (all ranks; a multiple of the process count)",
                                   Int(1))
    epochs: int = key(1, "passes over each rollout", Int(1))
    minibatches: int = key(2, "optimizer steps per pass (each a share of the rollout's answers)", Int(1))
    gen_batch_size: int = key(64, "answers generated together", Int(1, operational=True))
    kl_budget: float = key(25.0, "a rollout whose mean KL to SFT (nats per answer) exceeds this ends the run; "
                                 "0 = none", Float(0.0, 1e6))
    missing_eos_penalty: float = key(1.0, "subtracted from the reward of an answer cut at rl.max_new_tokens "
                                          "(normalized units)", Float(0.0, 100.0))
    loop_penalty: float = key(0.0, "subtracted from the reward of an answer that loops (a 4-gram 3+ times: eval's "
                                   "repetition_rate)", Float(0.0, 100.0, added_at=0.0))
    clip: float = key(0.2, "policy ratio clip", Float(0.0, 10.0, lo_open=True))
    ptx_coef: float = key(0.0, "weight of an SFT loss on SFT conversations mixed into every step (PPO-ptx, "
                               "Ouyang et al. 2022); 0 = off", Float(0.0, 100.0))
    ptx_rows: int = key(16, "SFT conversations per step when ptx_coef > 0", Int(1))
    ptx_pool: int = key(4096, "the SFT conversations those rows are drawn from: the first ones of sft_data's train "
                              "split, encoded once", Int(1, added_at=4096))
    max_steps: int = again(200, "optimizer steps (rollouts = max_steps / (epochs x minibatches))")
    lr: float = again(1e-5)
    min_lr_ratio: float = again(1.0)
    warmup_steps: int = again(0)
    schedule: str = again("constant")
    weight_decay: float = again(0.0)
    precision: str = again("auto", "auto | fp32 | bf16 (rollout log-probs are recomputed in this precision)")
    checkpoint_every: int = again(20)
    eval_every: int = again(20, _RL_EVAL, Int(0))
    log_every: int = again(4)
    fsdp: bool = again(False, _RL_FSDP)
    ema_decay: float = again(0.0, "> 0: evaluate and ship an average of the actor (EMA, this decay per step)")
    init_from: str = again("", '"" = RUN_DIR/sft/final')


@section
class PPOSection(PolicySection):
    """PPO against the reward model (stages/ppo.py): actor from SFT, reference = SFT (frozen), critic from the
    RM. Each rollout samples answers to RL prompts at rl.temperature, up to rl.max_new_tokens; the reward is
    the normalized RM score at the answer's end minus a per-token KL penalty to SFT."""
    NAME = "ppo"
    kl_coef: float = key(0.05, "initial beta of the per-token KL penalty (k1: log pi - log pi_ref)",
                         Float(0.0, 100.0))
    kl_target: float = key(4.0, "KL to SFT (nats per answer) the adaptive controller steers beta toward; 0 = fixed "
                                "beta", Float(0.0, 1e4))
    kl_horizon: int = key(10000, "the controller's horizon (Ziegler et al. 2019): larger moves beta more slowly",
                          Int(1))
    gamma: float = key(1.0, "GAE discount", Frac())
    lam: float = key(0.95, "GAE lambda", Frac())
    value_clip: float = key(0.2, "value clip around the rollout's values", Float(0.0, 1e3, lo_open=True))
    vf_coef: float = key(0.1, "weight of the critic's loss", Float(0.0, 100.0))
    critic_lr: float = key(5e-5, "the critic's peak learning rate (its own optimizer)", Float(0.0, 1.0, lo_open=True))
    epochs: int = again(2, "PPO epochs over each rollout")


@section
class GRPOSection(PolicySection):
    """GRPO (stages/grpo.py): k answers per prompt, each one's reward normalized within its group, no critic."""
    NAME = "grpo"
    samples_per_prompt: int = key(8, "answers per prompt (the group)", Int(2))
    reward: str = key("rm", '"rm": the normalized reward model; "rules": 1 for an exactly right pinyin / a valid '
                            'chaining idiom, else 0; "reference": char_f1 against the RL idiom\'s dictionary answer '
                            '(meaning, origin, example, pinyin); "a+b" sums them ("rm+rules", ...). Without "rm" '
                            "only the prompt kinds a reward is defined on are sampled", Choice(*GRPO_REWARDS))
    rules_weight: float = key(1.0, 'weight of the rules / reference rewards beside "rm" (and their scale alone)',
                              Float(0.0, 100.0, lo_open=True))
    scale_rewards: str = key("group", "each answer's advantage is its reward minus its group's mean, divided by: "
                                      "\"group\" its group's std (DeepSeekMath); \"batch\" the rollout's std (Lite "
                                      "PPO, arXiv:2508.08221); \"none\" nothing (Dr. GRPO, arXiv:2503.20783)",
                             Choice("group", "batch", "none", added_at="group"))
    kl_coef: float = key(0.04, "weight of the k3 KL(pi || pi_ref) term in the loss (DeepSeekMath's 0.04)",
                         Float(0.0, 100.0))
    prompts_per_rollout: int = again(16)
    ptx_coef: float = again(0.0, rule=Float(0.0, 100.0, added_at=0.0))
    ptx_rows: int = again(16, rule=Int(1, added_at=16))


SECTIONS: tuple[type[Section], ...] = (RunSection, DataSection, TokenizerSection, ModelSection, PretrainSection,
                                       SFTSection, EvalSection, ChatSection, RLSection, RMSection, DPOSection,
                                       PPOSection, GRPOSection)
BY_NAME: dict[str, type[Section]] = {s.NAME: s for s in SECTIONS}


@dataclass
class Config:
    """A whole configuration: one typed section per [section]."""
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    model: ModelSection = field(default_factory=ModelSection)
    pretrain: PretrainSection = field(default_factory=PretrainSection)
    sft: SFTSection = field(default_factory=SFTSection)
    eval: EvalSection = field(default_factory=EvalSection)
    chat: ChatSection = field(default_factory=ChatSection)
    rl: RLSection = field(default_factory=RLSection)
    rm: RMSection = field(default_factory=RMSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    ppo: PPOSection = field(default_factory=PPOSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return cls(**{name: sec(**d.get(name, {})) for name, sec in BY_NAME.items()})

    def to_dict(self) -> dict:
        """{section: {key: value}} in defaults.toml's order (what config.toml and the stage keys hold)."""
        return {name: getattr(self, name).values() for name in BY_NAME}

    def section(self, name: str) -> Section:
        return getattr(self, name)

    def rl_seed(self) -> int:
        """The seed of the preference data, the reward model and the RL stages: rl.seed, or run.seed when 0."""
        return self.rl.seed or self.run.seed


def rule(section_name: str, key_name: str) -> Rule:
    return rule_of(BY_NAME[section_name].__dataclass_fields__[key_name])


def default_dict() -> dict:
    """{section: {key: default}}: the schema as plain values (what presets and --set are merged over)."""
    return Config().to_dict()


# ---------------------------------------------------------------- defaults.toml, --help

def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _wrap(text: str, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    return lines + ([cur] if cur else [])


def help_text(f: Field) -> str:
    return ("(op) " if rule_of(f).operational else "") + f.metadata["help"]


def render_defaults(width: int = 118) -> str:
    """presets/defaults.toml: every key with its default and what it does, from the classes above."""
    out = ["# Every configuration key, its default, and what it does. Written from zero_chatgpt/core/settings.py",
           "# (python -m zero_chatgpt.core.settings > zero_chatgpt/presets/defaults.toml); edit the key there.",
           "# Presets override a subset; `--set section.key=value` overrides any key. Unknown keys are errors;",
           "# every value is checked before anything runs. Keys marked (op) change how a stage runs or what it",
           "# reports (intervals, workers, threads, the device, samples shown), not what it computes: they never",
           "# make a finished stage out of date.", ""]
    for sec in SECTIONS:
        out.append(f"[{sec.NAME}]")
        doc = " ".join((sec.__doc__ or "").split())
        doc = "" if doc.startswith(sec.__name__ + "(") else doc      # dataclass's generated signature: no doc
        out += [f"# {line}" for line in _wrap(doc, width - 2)]
        defaults = sec()
        for f in sec.keys():
            lhs = f"{f.name} = {toml_value(getattr(defaults, f.name))}"
            col = max(len(lhs) + 1, 25)
            text = _wrap(help_text(f).replace("STAGE", sec.NAME), max(40, width - col - 2))
            out.append(f"{lhs:<{col}}# {text[0]}")
            out += [f"{'':<{col}}# {line}" for line in text[1:]]
        out.append("")
    return "\n".join(out)


def describe_keys(section_names, width: int = 100) -> str:
    """The keys of these sections with their defaults, for a command's --help."""
    out = []
    for name in section_names:
        sec = BY_NAME[name]
        out.append(f"[{name}]  (--set {name}.KEY=VALUE; a preset may change the defaults shown)")
        for f in sec.keys():
            text = _wrap(help_text(f).replace("STAGE", name), width - 6)
            out.append(f"  {f.name} = {toml_value(getattr(sec(), f.name))}")
            out += [f"      {line}" for line in text]
    return "\n".join(out)


if __name__ == "__main__":
    print(render_defaults(), end="")

