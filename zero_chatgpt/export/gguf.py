"""`zero-chatgpt export --format gguf --out model.gguf`: one file that llama.cpp runs (llama-cli,
llama-server, llama-cpp-python, and everything built on them).

Written with `gguf`, llama.cpp's own writer, the way llama.cpp's convert_hf_to_gguf.py writes an HF
Llama model: arch "llama", llama.cpp's tensor names, q/k rows permuted for its RoPE, the tokenizer as
byte-level BPE ("gpt2") behind the built-in pre-tokenizer "llama-bpe" (Llama 3's regex, which is ours),
every special token a control token, the ChatML template, and the [chat] sampling defaults as the
`general.sampling.*` keys llama.cpp reads. tests/export/test_gguf.py reads the file back, runs it in a NumPy
forward of llama.cpp's layout (logits within 1e-4 of ours) and, where llama-cpp-python is installed,
in llama.cpp itself.

Tensor types: f16 by default, f32 with --gguf-type f32; norms are f32 either way, as the converter
keeps them. f16 because it is what an unquantized GGUF usually is (the converter's long-standing
default; its newer `auto` picks bf16 for fp32 checkpoints like ours, and f16 keeps 3 more mantissa
bits than bf16) and because llama.cpp decodes f16 weights faster, half the bytes per token: an
88M-parameter model decoded 40 vs 25 tokens/s on one core, 68 vs 38 on two (2-core x86, llama.cpp of
llama-cpp-python 0.3.36). The cost is rounding: on the demo's GRPO model f16 moved logits by <= 7e-3
(of a range of 12.6) and changed no greedy token in 20 x 32. f32 is the trained weights exactly
(logits within 2e-5 of ours in llama.cpp with an f32 KV cache): for parity checks, and the best
input for llama-quantize.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np

from zero_chatgpt.core import checkpoint as ckpt
from zero_chatgpt.core import manifest
from zero_chatgpt.core.errors import UserError
from zero_chatgpt.export.common import file_marker, generation_settings, replaceable
from zero_chatgpt.model.tokenizer import DEFAULT_PATTERN, chat_template, load_tokenizer

GGUF_TYPES = ("f16", "f32")
DEFAULT_GGUF_TYPE = "f16"
PRE_TOKENIZER = "llama-bpe"    # llama.cpp's name for Llama 3's split regex (tokenizer.DEFAULT_PATTERN)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """q_proj / k_proj rows from transformers' RoPE layout to llama.cpp's.

    transformers rotates dimension i of a head with i + head_dim/2 ("rotate half"); llama.cpp's
    LLAMA_ROPE_TYPE_NORM rotates 2i with 2i+1. Reordering each head's output rows so that row i
    lands at 2i and row i + head_dim/2 at 2i+1 makes the two compute the same attention (scores
    are dot products, invariant under one permutation of both q and k). This is LlamaModel.permute
    of llama.cpp's convert_hf_to_gguf.py, called with n_head for q and n_head_kv for k."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_names(n_layers: int) -> dict[str, str]:
    """Our (LlamaForCausalLM) parameter names -> llama.cpp's GGUF tensor names, in the converter's order."""
    names = {"model.embed_tokens.weight": "token_embd.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(n_layers):
        names.update({f"model.layers.{i}.{ours}.weight": f"blk.{i}.{theirs}.weight" for ours, theirs in per_layer.items()})
    return {**names, "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_vocab(tokenizer_dir: Path, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) as llama.cpp's converter derives them from tokenizer.json (the file
    the HF export ships): the byte-level strings of the BPE vocabulary, every added token a control
    token (llama.cpp then never makes one out of plain text, and does not print it), merges as "a b".
    Rows the model has beyond the tokenizer (a larger init_from model) become unused [PADn] entries."""
    file = Path(tokenizer_dir) / "tokenizer.json"
    spec = json.loads(file.read_text(encoding="utf-8"))
    tokens: list[str | None] = [None] * n_vocab
    types = [int(gguf.TokenType.NORMAL)] * n_vocab
    for s, i in spec["model"]["vocab"].items():
        tokens[i] = s
    for t in spec["added_tokens"]:
        tokens[t["id"]] = t["content"]
        types[t["id"]] = int(gguf.TokenType.CONTROL)
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
            types[i] = int(gguf.TokenType.UNUSED)
    # tokenizers writes merges as "a b" or, since 0.20, as pairs; byte-level strings hold no space
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, types, merges


def export_gguf(model_dir: Path, tokenizer_dir: Path, out: Path, *, name: str, gguf_type: str = DEFAULT_GGUF_TYPE,
                sampling: dict | None = None) -> dict:
    """Write the GGUF file `out`; return what the summary table shows.

    Built beside `out` and renamed into place; `out` is replaced only when absent or an earlier export
    (unchanged, by the marker beside it: export.common.replaceable), never a file of the user's."""

    out = Path(out)
    if gguf_type not in GGUF_TYPES:
        raise UserError(f"--gguf-type {gguf_type}: choose one of {', '.join(GGUF_TYPES)}")
    why = replaceable(out, file=True)
    if why:
        raise UserError(why)
    cfg = ckpt.read_model_config(model_dir)
    if cfg.head != "lm":
        raise UserError(f"{model_dir}: a reward/value model (one score per position, not a language model); "
                        f"llama.cpp runs causal LMs only: export a pretrain, sft, ppo, dpo or grpo model")
    tok = load_tokenizer(tokenizer_dir)
    if tok.pattern != DEFAULT_PATTERN:
        raise UserError(f"{tokenizer_dir}: the tokenizer splits text with its own regex (tokenizer.pattern), and "
                        f"llama.cpp knows only its built-in ones, so it would tokenize differently: export "
                        f"--format hf, or retrain the tokenizer with tokenizer.pattern = \"\" (Llama 3's regex)")
    if cfg.vocab_size < tok.vocab_size:
        raise UserError(f"{model_dir}: model vocabulary {cfg.vocab_size} < tokenizer's {tok.vocab_size} ({tokenizer_dir}); "
                        f"export a model trained with this tokenizer")
    state = ckpt.read_model_state(model_dir)
    names = tensor_names(cfg.num_hidden_layers)
    if cfg.tie_word_embeddings:
        # llama.cpp reuses token_embd for the output when output.weight is absent: written once
        state.pop("lm_head.weight", None)
        names.pop("lm_head.weight")
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if sorted(state) != sorted(names):
        missing, extra = sorted(set(names) - set(state)), sorted(set(state) - set(names))
        raise UserError(f"{model_dir}: weights do not match its config.json (missing {missing[:4]}, unexpected "
                        f"{extra[:4]}); rerun the stage that wrote it")
    tokens, types, merges = gguf_vocab(tokenizer_dir, cfg.vocab_size)
    gen = generation_settings(sampling)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-export-{os.getpid()}")
    w = gguf.GGUFWriter(tmp, "llama")
    try:
        w.add_name(name)
        w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else gguf.LlamaFileType.ALL_F32))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_vocab_size(cfg.vocab_size)

        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(PRE_TOKENIZER)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        # No BOS is ever added (we train without one). bos still names a token, <|endoftext|>, the one
        # every packed pretraining document follows, because llama.cpp would otherwise default it to
        # id 11, an ordinary BPE piece. eos is <|im_end|>, as in the HF export's tokenizer_config and
        # first in its generation_config's stop ids; llama.cpp also stops at <|endoftext|> (it marks
        # both end-of-generation by their text).
        w.add_bos_token_id(tok.eot_id)
        w.add_eos_token_id(tok.im_end_id)
        w.add_eot_token_id(tok.im_end_id)
        w.add_pad_token_id(tok.pad_id)
        w.add_add_bos_token(False)
        w.add_add_eos_token(False)
        w.add_chat_template(chat_template(tok.default_system_prompt))

        # llama.cpp's defaults for this model (llama-cli, llama-server), as generation_config.json
        # is for HF: `zero-chatgpt chat`'s sampling. penalty_last_n -1 (the whole context) because
        # our penalty, like transformers', counts every token seen, prompt included; llama.cpp's
        # own default would count the last 64.
        w.add_sampling_temp(gen["temperature"])
        w.add_sampling_top_k(gen["top_k"])
        w.add_sampling_top_p(gen["top_p"])
        w.add_sampling_penalty_repeat(gen["repetition_penalty"])
        w.add_sampling_penalty_last_n(-1)

        n_params = 0
        for ours, theirs in names.items():
            a = state[ours].float().numpy()
            if ours.endswith("q_proj.weight"):
                a = permute_qk(a, cfg.num_attention_heads)
            elif ours.endswith("k_proj.weight"):
                a = permute_qk(a, cfg.num_key_value_heads)
            # 1-D tensors stay f32, as the converter keeps them (ggml's norm kernels want f32)
            w.add_tensor(theirs, a.astype(np.float16) if gguf_type == "f16" and a.ndim > 1 else a)
            n_params += a.size
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        _install(tmp, out, file_marker(out))
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return {"tensors": len(names), "params": n_params, "vocab": cfg.vocab_size, "bytes": out.stat().st_size,
            "tied": cfg.tie_word_embeddings}


def _install(tmp: Path, out: Path, marker: str) -> None:
    """Rename the finished `tmp` to `out`, after writing (atomically) the marker that vouches for it.
    In that order a kill between the two steps leaves, in the usual case of a new `out`, a marker
    for an absent file, which the next export simply replaces; the other order would leave an
    unmarked export that every later export refuses as the user's. Either way no file of the user's
    is ever taken for an export: the marker must match `out`'s size and hash."""
    desc = {out.name: {"size": tmp.stat().st_size, "xxh3_128": manifest.file_hash(tmp)}}
    part = f"{marker}.tmp{os.getpid()}"
    manifest.write(out.parent, desc, name=part)
    os.replace(out.parent / part, out.parent / marker)
    os.replace(tmp, out)
