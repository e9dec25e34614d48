"""Evaluation components: the metrics and the paired bootstrap, the held-out prompt sets, the pinyin and
everyday scorers. The eval stage that runs them is stages/eval.py."""
