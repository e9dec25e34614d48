"""The recipe's stages, one module each, in the order of core/registry.py: data, tokenizer, pretrain,
sft, rm, ppo, dpo, grpo, eval, report. Each is a thin `run_stage(ctx)` over the components in core/,
model/, data/, train/ and eval/; a stage imports no other stage."""
