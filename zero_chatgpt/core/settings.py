"""The configuration's schema: one typed section per `[section]` of a config.

Every key is written once, here (the trained stages' sections in core/train_settings.py; how a key is
declared and checked in core/schema.py): its type, its default, what it does (and why: the paper, the
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

from dataclasses import dataclass, field

from zero_chatgpt.core.schema import (
    BUILTIN_PARTS,
    FRACTION,
    POSITIVE_INT,
    Choice,
    Each,
    Float,
    Frac,
    Free,
    Int,
    Rule,
    Section,
    device_name,
    help_text,
    key,
    preset_name,
    section,
    source_spec,
    toml_value,
    wrap,
)
from zero_chatgpt.core.train_settings import DPOSection, GRPOSection, PPOSection, PretrainSection, RMSection, SFTSection

# ---------------------------------------------------------------- what a key allows


# ---------------------------------------------------------------- keys and sections


@section
class RunSection(Section):
    NAME = "run"
    preset: str = key("demo", "the preset this config started from: an existing run takes keys it lacks from it",
                      Rule(preset_name, operational=True))
    seed: int = key(1234, "global random seed", Int(0))
    device: str = key("auto", "auto | cpu | cuda", Rule(device_name, operational=True))


@section
class DataSection(Section):
    """Reading, cleaning and deduplicating the corpus (stages/data.py, data/clean.py, data/dedup.py).
    Each dropped document is counted by its reason in data/stats.json."""
    NAME = "data"
    sources: list = key([], '["FORMAT:PATH", ...]; empty = the built-in corpus', Each(source_spec, "FORMAT:PATH strings"))
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
                                       "characters)", Each(POSITIVE_INT, "integers >= 1"))
    top_ngram_max: list = key([0.25, 0.22, 0.21], "drop if the top n-gram covers more of the text (99.9th "
                                                  "percentile of People's Daily)", Each(FRACTION, "numbers in [0, 1]"))
    dup_ngram_n: list = key([5, 7, 10, 13], "character n-gram sizes for the repeated-n-gram rule (Gopher; "
                                            "ChineseWebText: 13)", Each(POSITIVE_INT, "integers >= 1"))
    dup_ngram_max: list = key([0.42, 0.34, 0.28, 0.25], "drop if repeated n-grams cover more of the text (99.9th "
                                                        "percentile of People's Daily)",
                              Each(FRACTION, "numbers in [0, 1]"))
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


def default_dict() -> dict:
    """{section: {key: default}}: the schema as plain values (what presets and --set are merged over)."""
    return Config().to_dict()


# ---------------------------------------------------------------- defaults.toml, --help


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
        out += [f"# {line}" for line in wrap(doc, width - 2)]
        defaults = sec()
        for f in sec.keys():
            lhs = f"{f.name} = {toml_value(getattr(defaults, f.name))}"
            col = max(len(lhs) + 1, 25)
            text = wrap(help_text(f).replace("STAGE", sec.NAME), max(40, width - col - 2))
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
            text = wrap(help_text(f).replace("STAGE", name), width - 6)
            out.append(f"  {f.name} = {toml_value(getattr(sec(), f.name))}")
            out += [f"      {line}" for line in text]
    return "\n".join(out)


if __name__ == "__main__":
    print(render_defaults(), end="")

