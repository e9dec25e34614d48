"""The model and what computes with it: the transformer, its losses, the generator and sampler, the BPE
tokenizer, the on-disk token shards and their encoder, and the reward model's scorer. No stage logic."""
