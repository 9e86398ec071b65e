"""Training throughput of the DP engine against no DP and against the public ``dptrainer`` package.

    .venv/bin/python bench/train_throughput.py [--steps 60] [--warmup 10] [--threads 1]

One table, measured in one run on the same tiny presets, data (256 records, 32 tokens) and
logical batch (16 expected records per step): logical steps per second and peak memory for
no DP (a plain ``transformers.Trainer``, fixed batches of 16), dpft with Opacus hooks, dpft with
ghost clipping, and ``dptrainer`` 0.1.2 (hooks; install it with ``pip install --no-deps
dptrainer==0.1.2`` beside opacus 1.6.0, its own opacus pin is not installable), for GPT-2 and
Llama, LoRA and full fine-tuning.

Method: each configuration runs in a fresh subprocess. Steps per second counts optimizer
updates (``AdamW.step`` calls: one per logical step in all four trainers) after ``--warmup``
updates. Peak memory is the process's peak resident set size minus its resident set size just
before training starts (CPU: there is no allocator counter), so it includes the per-sample
gradients, activations and optimizer state that training adds. The DP runs use the RDP
accountant (PRV adds a per-chunk cost that says nothing about the mechanism).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("no_dp", "hooks", "ghost", "dptrainer")
MODELS = ("dpft/tiny-gpt2", "dpft/tiny-llama")
RECORDS = 256
BATCH = 16
SEQ = 32


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _stand_in_for_datasets() -> None:
    """``dptrainer`` imports ``datasets`` only for two ``isinstance`` checks; without the package
    installed, a module with those two classes stands in (nothing else of it is used here)."""
    import importlib.util
    import types

    if importlib.util.find_spec("datasets") is None and "datasets" not in sys.modules:
        stand_in = types.ModuleType("datasets")
        stand_in.Dataset = type("Dataset", (), {})
        stand_in.IterableDataset = type("IterableDataset", (), {})
        sys.modules["datasets"] = stand_in


def run_one(model_name: str, lora: bool, mode: str, steps: int, warmup: int, threads: int) -> dict:
    """Train one configuration in this process and return its measurements."""
    import resource
    import tempfile
    import warnings

    import torch
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    sys.path.insert(0, str(ROOT))
    from worker.engine import Hyperparameters, PrivacyArguments, TrainingConfig
    from worker.engine.run import build_trainer

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    update_times: list[float] = []
    original_step = torch.optim.AdamW.step

    def timed_step(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        result = original_step(self, *args, **kwargs)
        update_times.append(time.perf_counter())
        return result

    torch.optim.AdamW.step = timed_step
    records = [
        {"text": f"record {i}: the customer called on Monday about invoice {i * 7} and asked for a refund."}
        for i in range(RECORDS)
    ]
    config = TrainingConfig(
        base_model=model_name,
        task="causal_lm",
        privacy=PrivacyArguments(
            noise_multiplier=1.0,
            sampling_probability=BATCH / RECORDS,
            steps=steps,
            delta=1e-5,
            accountant="rdp",
            grad_sample_mode="ghost" if mode == "ghost" else "hooks",
        ),
        hyperparameters=Hyperparameters(batch_size=BATCH, micro_batch_size=2 * BATCH, max_seq_length=SEQ),
    )
    if not lora:
        config.lora = None
    output = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        trainer = build_trainer(config, records, output)
    except Exception as error:  # noqa: BLE001 - reported in the table
        return {"error": f"{type(error).__name__}: {error}"}
    if mode in ("no_dp", "dptrainer"):
        dp = trainer  # reuse its model, data and collator, then build the other trainer
        args = TrainingArguments(
            output_dir=str(output / mode),
            per_device_train_batch_size=BATCH,
            max_steps=steps,
            learning_rate=1e-3,
            max_grad_norm=0.0,
            logging_strategy="no",
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            remove_unused_columns=False,
        )
        common = {"model": dp.model, "train_dataset": dp.train_dataset, "data_collator": dp.data_collator}
        if mode == "no_dp":
            trainer = Trainer(args=args, **common)
        else:
            _stand_in_for_datasets()
            try:
                from dptrainer import DPTrainer as PublicDPTrainer
                from dptrainer import PrivacyArguments as PublicPrivacyArguments
            except ImportError:
                return {"error": "dptrainer not installed"}
            from worker.engine.data import Example

            args.max_steps = steps * 2  # it counts split physical batches as steps; stop on updates
            # Its Poisson loader inspects dataset rows as containers: give it dict rows.
            collate = dp.data_collator
            common["train_dataset"] = [{"input_ids": e.input_ids, "labels": e.labels} for e in dp.train_dataset]
            common["data_collator"] = lambda rows: collate([Example(r["input_ids"], r["labels"]) for r in rows])
            trainer = PublicDPTrainer(
                args=args,
                privacy_args=PublicPrivacyArguments(
                    noise_multiplier=1.0, per_sample_max_grad_norm=1.0, epsilon_log_mode="none"
                ),
                **common,
            )
    start_rss = _rss_mib()
    start_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        trainer.train()
    except Exception as error:  # noqa: BLE001 - reported in the table
        return {"error": f"{type(error).__name__}: {str(error)[:120]}"}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    measured = update_times[warmup:steps]
    if len(measured) < 2:
        return {"error": f"only {len(update_times)} optimizer updates"}
    return {
        "steps_per_s": (len(measured) - 1) / (measured[-1] - measured[0]),
        "peak_rss_mib": peak,
        "train_rss_mib": max(peak - start_rss, 0.0),
        "peak_before_mib": start_peak,
        "updates": len(update_times),
    }


def _median(results: list[dict]) -> dict:
    """Per-metric median over the rounds that succeeded (an error if none did)."""
    good = [result for result in results if "error" not in result]
    if not good:
        return results[-1]
    return {key: statistics.median(result[key] for result in good) for key in good[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="rounds over all configurations; medians are shown")
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "LORA", "MODE"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.one:
        model_name, lora, mode = options.one
        if lora not in ("lora", "full") or mode not in MODES:
            parser.error(f"--one MODEL {{lora,full}} {{{','.join(MODES)}}}; got {lora} {mode}")
        result = run_one(model_name, lora == "lora", mode, options.steps, options.warmup, options.threads)
        print(json.dumps(result))
        return

    configurations = [(model_name, lora, mode) for model_name in MODELS for lora in (True, False) for mode in MODES]
    samples: dict[tuple[str, bool, str], list[dict]] = {key: [] for key in configurations}
    # Rounds interleave the configurations, so that a burst of load on a shared machine hits
    # all of them rather than one; the median of the rounds is shown.
    for _ in range(options.repeat):
        for model_name, lora, mode in configurations:
            command = [
                sys.executable, __file__, "--steps", str(options.steps), "--warmup", str(options.warmup),
                "--threads", str(options.threads), "--one", model_name, "lora" if lora else "full", mode,
            ]  # fmt: skip
            completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
            lines = [line for line in completed.stdout.splitlines() if line.startswith('{"')]
            result = json.loads(lines[-1]) if lines else {"error": completed.stderr.strip()[-200:]}
            samples[(model_name, lora, mode)].append(result)
    rows = []
    for model_name in MODELS:
        for lora in (True, False):
            rows.append(
                (
                    model_name,
                    "LoRA" if lora else "full",
                    {mode: _median(samples[(model_name, lora, mode)]) for mode in MODES},
                )
            )

    print(
        f"logical batch {BATCH} (expected), {RECORDS} records of {SEQ} tokens, {options.steps} steps "
        f"({options.warmup} warm-up), {options.threads} thread(s), median of {options.repeat} rounds\n"
    )
    print(
        "| model | fine-tuning | trainer | steps/s | DP / no-DP step time | vs dptrainer | "
        "peak RSS (MiB) | training RSS (MiB) | training RSS / no DP |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for model_name, kind, results in rows:
        base = results["no_dp"]
        public = results["dptrainer"]
        for mode in MODES:
            result = results[mode]
            label = {"no_dp": "no DP", "hooks": "dpft hooks", "ghost": "dpft ghost", "dptrainer": "dptrainer 0.1.2"}
            if "error" in result:
                print(f"| {model_name} | {kind} | {label[mode]} | failed: {result['error'][:90]} | | | | | |")
                continue
            ratio = (
                f"{base['steps_per_s'] / result['steps_per_s']:.2f}x" if mode != "no_dp" and "error" not in base else ""
            )
            versus = (
                f"{result['steps_per_s'] / public['steps_per_s']:.2f}x"
                if mode in ("hooks", "ghost") and "error" not in public
                else ""
            )
            memory = (
                f"{result['train_rss_mib'] / base['train_rss_mib']:.2f}x"
                if mode != "no_dp" and "error" not in base and base["train_rss_mib"] > 0
                else ""
            )
            print(
                f"| {model_name} | {kind} | {label[mode]} | {result['steps_per_s']:.1f} | {ratio} | {versus} | "
                f"{result['peak_rss_mib']:.0f} | {result['train_rss_mib']:.1f} | {memory} |"
            )


if __name__ == "__main__":
    main()
