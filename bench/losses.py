"""Peak memory and time of the token distillation objective: chunked vs materialised logits.

Each measurement runs in a fresh subprocess (the only honest way to read a peak RSS for torch,
whose allocations tracemalloc cannot see): the child builds its inputs, records ``ru_maxrss``,
runs forward + backward of the objective (one warm-up, then ``--repeats`` timed runs) and
reports the peak RSS above that baseline. Three paths, same inputs and same math
(hard CE + forward KL, ``kd_weight=0.5``, every token supervised):

* ``plain``     textbook autograd on full logits: ``F.cross_entropy`` + ``compute_divergence``
                (skipped where its ~12 fp32 ``(N, V)`` tensors would exceed ``--plain-max-gib``);
* ``reference`` ``token_objective`` on materialised ``(B, T, V)`` student and teacher logits;
* ``chunked``   ``token_objective_from_hidden`` from hidden states and output weights of both
                models; no ``(B, T, V)`` tensor exists.

Prints one JSON line per measurement, one per comparison, and a Markdown table at the end.
Ratios are measured in the same run, because the machine is shared and noisy.

    python bench/losses.py            # V in {32k, 128k} x T in {512, 2048}, B=2, H=256
    python bench/losses.py --quick    # small sizes, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("plain", "reference", "chunked")


def _rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Build inputs, run the objective, report time and peak memory. Runs in the subprocess."""
    import torch
    import torch.nn.functional as F

    from distil.losses.divergences import compute_divergence
    from distil.losses.objective import token_objective, token_objective_from_hidden

    torch.manual_seed(0)
    b, t, h, v = spec["batch"], spec["seq"], spec["hidden"], spec["vocab"]
    hidden = torch.randn(b, t, h).requires_grad_()
    weight = (torch.randn(v, h) * 0.05).requires_grad_()
    teacher_hidden = torch.randn(b, t, h)
    teacher_weight = torch.randn(v, h) * 0.05
    labels = torch.randint(0, v, (b, t))
    path = spec["path"]

    def step() -> float:
        hidden.grad = weight.grad = None
        if path == "chunked":
            out = token_objective_from_hidden(
                hidden,
                weight,
                None,
                labels,
                teacher_hidden=teacher_hidden,
                teacher_weight=teacher_weight,
                kd_weight=0.5,
                kd_temperature=1.0,
                chunked=True,
            )
            loss = out.loss
        else:
            logits = hidden @ weight.T  # (B, T, V)
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.T  # (B, T, V)
            if path == "reference":
                loss = token_objective(
                    logits, teacher_logits, labels, kd_weight=0.5, kd_temperature=1.0
                ).loss
            else:
                n = labels.numel()
                ce = F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), reduction="sum")
                kd = compute_divergence("forward_kl", logits, teacher_logits, reduction="sum")
                loss = (0.5 * ce + 0.5 * kd) / n
        loss.backward()
        return float(loss.detach())

    base = _rss_mib()
    value = step()  # warm-up (same computation, so it reaches the same peak)
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _rss_mib()
    return {
        "bench": "losses",
        **spec,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "time_s": statistics.median(times),
        "times_s": [round(x, 4) for x in times],
        "base_rss_mib": round(base, 1),
        "peak_rss_mib": round(peak, 1),
        "loss_peak_mib": round(peak - base, 1),
        "loss": value,
    }


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and parse its JSON line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        return {"bench": "losses", **spec, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plain_gib(batch: int, seq: int, vocab: int) -> float:
    """Rough peak of the plain path: about twelve fp32 (N, V) tensors (measured at V=32k)."""
    return 12 * batch * seq * vocab * 4 / 2**30


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| V | T | path | time fwd+bwd (s) | loss peak RSS (MiB) | memory / reference "
        "| time / reference | abs(loss − reference) |\n"
        "|---:|---:|---|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        if "skipped" in r or "error" in r:
            why = r.get("skipped") or r.get("error")
            lines.append(f"| {r['vocab']} | {r['seq']} | {r['path']} | – | – | – | – | {why} |")
            continue
        lines.append(
            f"| {r['vocab']} | {r['seq']} | {r['path']} | {r['time_s']:.3f} "
            f"| {r['loss_peak_mib']:.0f} | {r.get('memory_ratio', 1.0):.3f} "
            f"| {r.get('time_ratio', 1.0):.3f} | {r.get('loss_abs_diff', 0.0):.2e} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement")
    parser.add_argument("--plain-max-gib", type=float, default=8.0, help="skip plain above this")
    parser.add_argument("--out", type=Path, default=None, help="write losses.jsonl/.md here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(run_child(json.loads(args.child))))
        return

    if args.quick:
        grid, hidden, repeats = [(4096, 128), (8192, 256)], 64, args.repeats or 3
    else:
        grid = [(32_768, 512), (32_768, 2048), (131_072, 512), (131_072, 2048)]
        hidden, repeats = 256, args.repeats or 2
    rows: list[dict[str, Any]] = []
    for vocab, seq in grid:
        results: dict[str, dict[str, Any]] = {}
        for path in PATHS:
            spec = {"path": path, "vocab": vocab, "seq": seq, "batch": 2, "hidden": hidden}
            spec["repeats"] = repeats
            if path == "plain" and plain_gib(2, seq, vocab) > args.plain_max_gib:
                result = {
                    "bench": "losses",
                    **spec,
                    "skipped": f"est. {plain_gib(2, seq, vocab):.0f} GiB > {args.plain_max_gib:g}",
                }
            else:
                result = measure(spec)
            results[path] = result
            print(json.dumps(result), flush=True)
        ref = results["reference"]
        for r in results.values():
            if "time_s" in r and "time_s" in ref:
                r["memory_ratio"] = r["loss_peak_mib"] / ref["loss_peak_mib"]
                r["time_ratio"] = r["time_s"] / ref["time_s"]
                r["loss_abs_diff"] = abs(r["loss"] - ref["loss"])
            rows.append(r)
        chunked = results["chunked"]
        if "memory_ratio" in chunked:
            compare = {
                "bench": "losses",
                "compare": "chunked/reference",
                "vocab": vocab,
                "seq": seq,
                "memory_ratio": round(chunked["memory_ratio"], 4),
                "time_ratio": round(chunked["time_ratio"], 4),
                "loss_abs_diff": chunked["loss_abs_diff"],
            }
            print(json.dumps(compare), flush=True)
    md = table(rows)
    print()
    print(md)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "losses.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        (args.out / "losses.md").write_text(md)


if __name__ == "__main__":
    main()
