"""Training components: the one training loop (loop), RL maths (rl_math), rollouts and on-policy
batches, preference-pair batches, the SFT batches, and what the alignment stages share (alignment)."""
