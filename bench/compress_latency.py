"""Benchmark: size on disk and CPU latency of the built-in LM teacher, float32 vs torchao int8.

Every variant is the same model (the ``lm_pretrain`` teacher, or a random model of its shape:
latency does not depend on the values), quantised with one of distil's schemes
(``distil.compress.quantise``), and for reference with torchao's ``Int8Tensor`` configs (the
ones QAT cannot produce). Each variant is saved as a Hugging Face folder (its safetensors bytes
are the size), then timed on one forward pass of ``batch x tokens`` random ids at batch 1 and 64,
eager and ``torch.compile``d, interleaved round by round (``distil.compress.latency``): median
and p10-p90 of the rounds, with the load average and this process's CPU time.

    python bench/compress_latency.py --teacher runs/lm-teacher --tokens 64 --repeats 10

One JSON line per measurement on stdout; ``bench/results/compress_latency.{jsonl,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent


def _teacher(folder: Path | None) -> tuple[Any, str]:
    from distil.models.lm import CausalLMSpec, build_causal_lm, load_causal_lm

    if folder is not None and (folder / "config.json").is_file():
        return load_causal_lm(folder).eval(), str(folder)
    spec = CausalLMSpec(
        num_layers=4,
        hidden_size=256,
        num_heads=4,
        intermediate_size=1024,
        vocab_size=8192,
        max_context=256,
    )
    return build_causal_lm(spec, seed=0).eval(), f"random model of the teacher's shape {spec}"


def _reference_configs() -> dict[str, Any]:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    return {
        "torchao Int8WeightOnlyConfig": Int8WeightOnlyConfig(),
        "torchao Int8DynamicActivationInt8WeightConfig": Int8DynamicActivationInt8WeightConfig(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from transformers import AutoModelForCausalLM, TorchAoConfig

    from distil.compress.latency import folder_bytes, latency_grid, load_average
    from distil.compress.quantise import QuantScheme, int4_kernel_report, save_quantised_hf

    wall0, cpu0 = time.perf_counter(), time.process_time()
    model, described = _teacher(args.teacher)
    variants: dict[str, Any] = {"float32": model}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        root = Path(tmp)
        model.save_pretrained(root / "float32")
        sizes["float32"] = folder_bytes(root / "float32", suffixes=[".safetensors"])
        for scheme in (
            QuantScheme.int8_weight_only,
            QuantScheme.int8_dynamic,
            QuantScheme.int8_dynamic_int4_weight,
        ):
            name = f"distil {scheme.value}"
            variants[name] = save_quantised_hf(model, scheme, root / scheme.value)
            sizes[name] = folder_bytes(root / scheme.value, suffixes=[".safetensors"])
        name = "distil int8_weight_only + LM head"
        variants[name] = save_quantised_hf(
            model, QuantScheme.int8_weight_only, root / "all", include_lm_head=True
        )
        sizes[name] = folder_bytes(root / "all", suffixes=[".safetensors"])
        for index, (name, config) in enumerate(_reference_configs().items()):
            folder = root / f"ref{index}"
            ref = AutoModelForCausalLM.from_pretrained(
                root / "float32", quantization_config=TorchAoConfig(config)
            ).eval()
            ref.save_pretrained(folder)
            variants[name] = ref
            sizes[name] = folder_bytes(folder, suffixes=[".safetensors"])

        def inputs(batch: int) -> dict[str, Any]:
            g = torch.Generator().manual_seed(batch)
            ids = torch.randint(0, int(model.config.vocab_size), (batch, args.tokens), generator=g)
            return {"input_ids": ids, "use_cache": False}

        rows = latency_grid(
            variants,
            inputs,
            batch_sizes=args.batches,
            compiled=[False] if args.no_compile else [False, True],
            warmup=args.warmup,
            repeats=args.repeats,
            threads=args.threads,
        )
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    fp32 = {
        (r["batch_size"], r["compiled"]): r["median_ms"] for r in rows if r["variant"] == "float32"
    }
    out_rows = []
    for r in rows:
        r = {
            **r,
            "weight_bytes": sizes[r["variant"]],
            "size_vs_float32": sizes[r["variant"]] / sizes["float32"],
            "latency_vs_float32_same_mode": r["median_ms"] / fp32[(r["batch_size"], r["compiled"])],
            "tokens": args.tokens,
        }
        out_rows.append(r)
        print(json.dumps(r))
    meta = {
        "model": described,
        "int4_kernels": int4_kernel_report(),
        "torch": torch.__version__,
        "wall_s": wall,
        "process_cpu_s": cpu,
        "load_average_end": list(load_average()),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(meta))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compress_latency.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in [*out_rows, meta])
    )
    lines = [
        "# Size and CPU latency: float32 vs int8 (torchao 0.18, torch 2.13 CPU)",
        "",
        f"Model: {described}. One forward pass of batch x {args.tokens} tokens, "
        f"{args.threads} thread(s), {args.repeats} interleaved rounds after {args.warmup} "
        "warm-up calls; median (p10-p90) ms. Modes: "
        + (
            "eager only (--no-compile)."
            if args.no_compile
            else "eager and torch.compile "
            "(static shapes; compilation happens in the warm-up calls)."
        ),
        f"Wall {wall:.0f} s, process CPU {cpu:.0f} s, load average at the end "
        f"{meta['load_average_end'][0]:.2f}.",
        "",
        "| variant | weight bytes | size vs fp32 | batch | mode | median ms (p10-p90) | vs fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in out_rows:
        lines.append(
            f"| {r['variant']} | {r['weight_bytes']:,} | {r['size_vs_float32']:.2f} | "
            f"{r['batch_size']} | {'compiled' if r['compiled'] else 'eager'} | "
            f"{r['median_ms']:.1f} ({r['p10_ms']:.1f}-{r['p90_ms']:.1f}) | "
            f"{r['latency_vs_float32_same_mode']:.2f}x |"
        )
    lines += ["", "int4 paths on this machine:", ""]
    lines += [f"- {name}: {status}" for name, status in meta["int4_kernels"].items()]
    (args.out / "compress_latency.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
