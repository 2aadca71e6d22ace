"""Decoding loops of distil's own: plain and speculative, batched, for Hugging Face causal LMs."""
