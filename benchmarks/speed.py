"""Speed benchmark: this engine vs Hugging Face assisted generation, one process, same prompts.

Loads the pair once and, prompt by prompt (methods interleaved so machine noise hits all of
them alike), times:

- `hf:ar`       target-only `generate` (Hugging Face)
- `hf:assisted` `generate(assistant_model=draft)`, lossless, N fixed
- `hf:static:W` the same with transformers' `assistant_ensemble_weight=W`
- `ar`, `exact`, `static:W`, `diversed:HEAD`, ... this engine (any `MethodSpec`)

and prints tokens/s, speedup vs `ar` (ours) and vs `hf:ar`, acceptance, mean accepted
length, and efficiency = measured speedup / the all-accepted ceiling (N+1) / (N c + v), where
c = draft step / target step and v = verify-(N+1) / one target step, measured in this run.
Hugging Face's acceptance is derived from its target-call count (rounds), so it is marked ≈.

    python benchmarks/speed.py --data-dir ../shared/data --prompts 6 --max-new-tokens 96 --temperature 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from diversed.engine import CachedModel, GenerationConfig
from diversed.generation import MethodSpec, encode_prompt, generate
from diversed.models import load_pair
from diversed.sampling import SamplingParams


def benchmark_prompts(data_dir: Path, count: int, tasks: tuple[str, ...] = ("gsm8k", "mbpp", "xsum")) -> list[str]:
    """A fixed prompt set cycling through the tasks' test splits, with each task's own chat prompt."""
    from diversed.tasks import get_task

    per_task = -(-count // len(tasks))
    prompts_by_task = [[get_task(name).prompt(example) for example in get_task(name).load("test", per_task, data_dir)] for name in tasks]
    mixed = [prompt for group in zip(*prompts_by_task) for prompt in group]
    return mixed[:count]


def measure_step_costs(pair, prompt_ids: list[int], n: int, repeats: int = 5) -> tuple[float, float]:
    """(c, v): draft step / target step, verify-(n+1) / target step, median over repeats."""
    def median_seconds(model, tokens: int) -> float:
        cached = CachedModel(model, pair.vocab_size)
        cached.feed(prompt_ids, 0)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            cached.feed(prompt_ids[-tokens:], tokens)
            times.append(time.perf_counter() - start)
            cached.rollback(len(prompt_ids))
        return statistics.median(times)

    with torch.inference_mode():
        target_step = median_seconds(pair.target, 1)
        draft_step = median_seconds(pair.draft, 1)
        verify = median_seconds(pair.target, n + 1)
    return draft_step / target_step, verify / target_step


class CallCounter:
    """Counts forward calls of a module (HF's first target call includes the prompt, so calls = rounds)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self._handle = module.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def close(self) -> None:
        self._handle.remove()


HF_DEFAULT_CONFIDENCE = 0.4  # transformers' default assistant_confidence_threshold


class HFVerificationCounter:
    """Counts drafted and accepted tokens of Hugging Face's sampled verification.

    With do_sample, transformers verifies each round in the module-level function
    `transformers.generation.utils._speculative_sampling` (lossless, or its static ensemble
    with `assistant_ensemble_weight`); wrapping it records (candidate_length, n_matches) per
    round without changing what it does. Greedy assisted decoding does not call it; then
    acceptance is derived from the number of target calls.
    """

    def __init__(self):
        import transformers.generation.utils as hf_utils

        self._module = hf_utils
        self._original = hf_utils._speculative_sampling
        self.drafted = self.accepted = self.rounds = self.longest_draft = 0

        def counted(candidate_input_ids, candidate_logits, candidate_length, new_logits, **kwargs):
            valid_tokens, n_matches = self._original(candidate_input_ids, candidate_logits, candidate_length, new_logits, **kwargs)
            self.rounds += 1
            self.drafted += int(candidate_length)
            self.accepted += int(n_matches)
            self.longest_draft = max(self.longest_draft, int(candidate_length))
            return valid_tokens, n_matches

        hf_utils._speculative_sampling = counted

    def close(self) -> None:
        self._module._speculative_sampling = self._original


def run_hf(pair, prompt_ids: list[int], method: str, args) -> dict:
    """One Hugging Face generate() call; returns tokens, seconds, target rounds and (when sampled) drafted/accepted."""
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.max_new_tokens,  # same length as our runs (no early EOS)
        do_sample=args.temperature > 0,
        top_k=None,
        top_p=None,
        repetition_penalty=None,
        pad_token_id=pair.tokenizer.pad_token_id or 0,
    )
    if args.temperature > 0:
        kwargs["temperature"] = args.temperature
    if method != "hf:ar":
        kwargs["assistant_model"] = pair.draft
        # transformers reads the draft length, its schedule and the confidence stop from the
        # *assistant's* generation_config (AssistedCandidateGenerator copies it); passed to
        # generate() they land in the target's and are ignored, leaving the defaults: up to 20
        # draft tokens with a 0.4 confidence stop. Set them where they are read.
        assistant = pair.draft.generation_config
        assistant.num_assistant_tokens = args.draft_length
        assistant.num_assistant_tokens_schedule = "constant"
        assistant.assistant_confidence_threshold = HF_DEFAULT_CONFIDENCE if args.hf_confidence_stop else 0.0
    if method.startswith("hf:static:"):
        kwargs["assistant_ensemble_weight"] = float(method.split(":")[2])
    ids = torch.tensor([prompt_ids], device=pair.device)
    torch.manual_seed(args.seed)
    counter, verification = CallCounter(pair.target), HFVerificationCounter()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            out = pair.target.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    finally:
        seconds = time.perf_counter() - start
        counter.close()
        verification.close()
    new_tokens = out.shape[1] - len(prompt_ids)
    counted = verification.rounds > 0
    return {
        "new_tokens": new_tokens,
        "seconds": seconds,
        "rounds": counter.calls,
        "drafted": verification.drafted if counted else None,
        "accepted": verification.accepted if counted else None,
        "verified_rounds": verification.rounds if counted else None,
        "longest_draft": verification.longest_draft if counted else None,
    }


def run_ours(pair, prompt_ids: list[int], spec: MethodSpec, args) -> dict:
    sampling = SamplingParams(args.temperature)
    # ignore_eos: every method produces the same number of tokens (as min_new_tokens does for HF).
    config = GenerationConfig(args.max_new_tokens, args.draft_length, sampling, args.seed, ignore_eos=True)
    result = generate(pair, prompt_ids, spec, config)
    m = result.metrics
    return {"new_tokens": m.new_tokens, "seconds": m.seconds, "rounds": m.rounds, "drafted": m.drafted, "accepted": m.accepted}


def summarize(label: str, runs: list[dict], baselines: dict[str, float], n: int, c: float, v: float) -> dict:
    tokens = sum(r["new_tokens"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    target_calls = sum(r["rounds"] for r in runs)
    if all(r["drafted"] is not None for r in runs):  # counted: ours, or HF's sampled verification
        drafted = sum(r["drafted"] for r in runs)
        accepted = sum(r["accepted"] for r in runs)
        rounds = sum(r.get("verified_rounds") or r["rounds"] for r in runs)
        acceptance = accepted / drafted if drafted else None
        approx = ""
    else:  # HF greedy or AR: derive from target calls (each round drafts N, emits accepted + 1)
        rounds = target_calls
        accepted = tokens - rounds
        acceptance = accepted / (rounds * n) if label != "hf:ar" and rounds else None
        approx = "≈"
    tps = tokens / seconds
    row = {
        "method": label,
        "tokens_per_second": tps,
        "speedup_vs_ar": tps / baselines["ar"] if "ar" in baselines else None,
        "speedup_vs_hf_ar": tps / baselines["hf:ar"] if "hf:ar" in baselines else None,
        "acceptance_rate": acceptance,
        "mean_accepted_length": 1 + accepted / rounds if rounds else None,  # SPEC §6
        "drafted_per_round": drafted / rounds if approx == "" and rounds and drafted else None,
        "target_calls": target_calls,
        "approx": approx,
    }
    if acceptance is not None and row["speedup_vs_ar"] is not None:
        row["efficiency"] = row["speedup_vs_ar"] / ((n + 1) / (n * c + v))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--tasks", default="gsm8k,mbpp,xsum", help="prompt sources, cycled (test splits)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--draft-length", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps")
    parser.add_argument("--target")
    parser.add_argument("--draft")
    parser.add_argument("--methods", default="hf:ar,hf:assisted,hf:static:0.7,ar,exact,static:0.7")
    parser.add_argument("--hf-confidence-stop", action="store_true", help=f"let HF stop drafting below confidence {HF_DEFAULT_CONFIDENCE} (its default); off: HF drafts exactly N like ours")
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = parser.parse_args()

    pair = load_pair(args.target, args.draft, args.dtype, device=args.device)
    prompts = [encode_prompt(pair, text) for text in benchmark_prompts(args.data_dir, args.prompts, tuple(args.tasks.split(",")))]
    labels = [m.strip() for m in args.methods.split(",") if m.strip()]
    specs = {label: MethodSpec.parse(label) for label in labels if not label.startswith("hf:")}
    # Warm-up: one short call of each kind so lazy initialisation is not timed.
    warm = argparse.Namespace(**{**vars(args), "max_new_tokens": 4})
    for label in labels:
        run_hf(pair, prompts[0], label, warm) if label.startswith("hf:") else run_ours(pair, prompts[0], specs[label], warm)
    c, v = measure_step_costs(pair, prompts[0], args.draft_length)

    runs: dict[str, list[dict]] = {label: [] for label in labels}
    for index, prompt_ids in enumerate(prompts):
        for label in labels:
            run = run_hf(pair, prompt_ids, label, args) if label.startswith("hf:") else run_ours(pair, prompt_ids, specs[label], args)
            runs[label].append(run)
            print(f"prompt {index + 1}/{len(prompts)} {label:>16}: {run['new_tokens'] / run['seconds']:.2f} tok/s", file=sys.stderr)

    baselines = {b: sum(r["new_tokens"] for r in runs[b]) / sum(r["seconds"] for r in runs[b]) for b in ("ar", "hf:ar") if b in runs}
    rows = [summarize(label, runs[label], baselines, args.draft_length, c, v) for label in labels]
    print(f"\n{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.dtype}; "
          f"{len(prompts)} prompts x {args.max_new_tokens} tokens, T={args.temperature}, N={args.draft_length}; c={c:.3f}, v={v:.3f}")
    print("| method | tok/s | speedup vs ar | speedup vs hf:ar | acceptance | mean accepted length | drafted per round | efficiency |")
    print("|---|---|---|---|---|---|---|---|")
    fmt = lambda x, spec: "–" if x is None else format(x, spec)  # noqa: E731
    for row in rows:
        print(
            f"| {row['method']} | {row['tokens_per_second']:.2f} | {fmt(row['speedup_vs_ar'], '.2f')}x | {fmt(row['speedup_vs_hf_ar'], '.2f')}x "
            f"| {row['approx']}{fmt(row['acceptance_rate'], '.1%')} | {row['approx']}{fmt(row['mean_accepted_length'], '.2f')} "
            f"| {fmt(row['drafted_per_round'], '.2f')} | {fmt(row.get('efficiency'), '.2f')} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"c": c, "v": v, "args": {k: str(val) for k, val in vars(args).items()}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
