"""Exporting a trained model: what both formats share (common), Hugging Face (hf), GGUF for llama.cpp
(gguf), and the `export` command (command)."""
