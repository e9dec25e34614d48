"""The config sections of the six trained stages: one base, TrainingSection (the training loop's keys, train/loop.py), and a subclass per stage with its own keys and defaults (as TRL has one config class per trainer)."""
from __future__ import annotations

from dataclasses import fields

from zero_chatgpt.core.schema import (
    GRPO_REWARDS,
    NEGATIVES,
    Choice,
    Each,
    Float,
    Frac,
    Free,
    Int,
    Section,
    again,
    key,
    preference_source,
    section,
    source_spec,
)


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
                        Each(source_spec, "FORMAT:PATH strings"))
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
class RMSection(TrainingSection):
    """The reward model: the SFT backbone + a scalar head, Bradley-Terry loss on preference pairs built from
    the RM part of the RL prompt pool (sft_data/rl.jsonl, rl_part = "rm"), or read from --source
    preference:FILE."""
    NAME = "rm"
    sources: list = key([], '["preference:PATH", ...] JSON lines {prompt, chosen, rejected}; empty = built from '
                            "the pool", Each(preference_source, "preference:PATH strings"))
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
