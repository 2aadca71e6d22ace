"""Compression around distillation: pruning, quantisation, LoRA students, export, and the stage
runner that chains them (``prune -> distil -> quantise -> distil (QAT) -> export``).

Modules (each imported on its own; this package imports nothing heavy):

- ``lm_prune``: depth and width pruning of Llama-style causal LMs by calibration importance.
- ``cnn_prune``: output-channel pruning of CNN classifiers (own slicing, or torch-pruning).
- ``encoder``: width pruning of BERT-style sentence encoders (``narrow_encoder``).
- ``quantise``: torchao post-training int8 and quantisation-aware training, PT2E static int8.
- ``latency``: size on disk and latency (batch 1 / 64, eager / compiled, median and spread).
- ``lora``: LoRA students through peft.
- ``export``: safetensors folders and ONNX files checked with onnxruntime.
- ``config`` and ``pipeline``: the pipeline schema and its fingerprinted, resumable runner.
"""
