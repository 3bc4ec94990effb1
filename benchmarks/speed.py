"""Speed benchmark: every way to run the pair on this machine, one process, same prompts.

Loads each backend's pair once and, prompt by prompt (methods interleaved so machine noise
hits all of them alike), times:

- `llamacpp:ar`  llama-cpp-python's own `generate` on the same GGUF: the peer a CPU user picks
- `hf:ar`        target-only `generate` (Hugging Face)
- `hf:assisted`  `generate(assistant_model=draft)`, lossless, N fixed
- `hf:static:W`  the same with transformers' `assistant_ensemble_weight=W`
- `[BACKEND/]METHOD[@N]` this engine: any `MethodSpec` (ar, exact, static:0.9, ...), on
  `torch` or `llama.cpp` (default: --backend), with a fixed N or `auto` (default: --draft-length)
- `default`      what `diversed generate` does with no options (auto backend, auto N, default method)

It prints a header naming the CPU and its flags, each backend's measured c (draft step /
target step) and v(k) (k-token verification / target step), and per method: tokens/s,
speedup vs `ar` and vs `llamacpp:ar`, acceptance, mean accepted length, drafted per round,
rounds that drafted nothing (N = 0), efficiency (speedup / the all-accepted ceiling
(N+1) / (N c + v(N+1)), fixed N only) and the round-time split (draft / target forward /
other). Hugging Face's greedy acceptance is derived from its target-call count, marked ≈.

    python benchmarks/speed.py --data-dir ../shared/data --prompts 6 --max-new-tokens 96 --temperature 1 \
        --methods llamacpp:ar,default,llama.cpp/ar,llama.cpp/exact@auto,torch/ar,torch/static:0.9@5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from diversed.calibration import choose_backend, machine_summary, measure_seconds
from diversed.draft_length import parse_draft_length
from diversed.engine import GenerationConfig
from diversed.generation import MethodSpec, default_method, encode_prompt, generate
from diversed.embedded import DEFAULT_TARGET, gguf_path
from diversed.methods import AR
from diversed.models import load_pair, pair_specs
from diversed.runners import AUTO, Backend
from diversed.runners.hf import DEFAULT_DTYPE, TORCH
from diversed.runners.llamacpp import LLAMA_CPP
from diversed.sampling import SamplingParams


def benchmark_prompts(data_dir: Path, count: int, tasks: tuple[str, ...] = ("gsm8k", "mbpp", "xsum")) -> list[str]:
    """A fixed prompt set cycling through the tasks' test splits, with each task's own chat prompt."""
    from diversed.tasks import get_task

    per_task = -(-count // len(tasks))
    prompts_by_task = [[get_task(name).prompt(example) for example in get_task(name).load("test", per_task, data_dir)] for name in tasks]
    mixed = [prompt for group in zip(*prompts_by_task) for prompt in group]
    return mixed[:count]


def step_costs(pair, n_max: int) -> tuple[float, list[float]]:
    """(c, [v(1), ..., v(n_max + 1)]) of a pair, measured now."""
    seconds = measure_seconds(pair, n_max + 1)
    step = seconds["target_step"]
    return seconds["draft_step"] / step, [s / step for s in seconds["verify"]]


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


def run_llamacpp(llm, prompt_ids: list[int], args) -> dict:
    """llama-cpp-python's own generation loop (its C sampler), same length and sampling as ours."""
    llm.reset()  # no prompt-prefix reuse from the previous call: every method prefills its prompt
    started = time.perf_counter()
    tokens = 0
    # top_k 0, top_p 1 and min_p 0 switch its default filters off: plain temperature sampling, as ours.
    for _ in llm.generate(prompt_ids, temp=args.temperature, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        tokens += 1
        if tokens >= args.max_new_tokens:
            break
    return {"new_tokens": tokens, "seconds": time.perf_counter() - started, "rounds": tokens, "drafted": None, "accepted": None}


def run_ours(pair, prompt_ids: list[int], spec: MethodSpec, draft_length, args) -> dict:
    sampling = SamplingParams(args.temperature)
    # ignore_eos: every method produces the same number of tokens (as min_new_tokens does for HF).
    config = GenerationConfig(args.max_new_tokens, draft_length, sampling, args.seed, ignore_eos=True, max_draft_length=args.max_draft_length)
    m = generate(pair, prompt_ids, spec, config).metrics
    return {
        "new_tokens": m.new_tokens, "seconds": m.seconds, "rounds": m.rounds, "drafted": m.drafted, "accepted": m.accepted,
        "draft_seconds": m.draft_seconds, "target_seconds": m.target_seconds,
        "ar_rounds": m.rounds - (m.drafted_per_position[0] if m.drafted_per_position else 0),
    }


class Ours:
    """One of this engine's labels: `[BACKEND/]METHOD[@N]`, or `default`."""

    def __init__(self, label: str, args):
        self.label = label
        if label == "default":
            self.backend, self.spec, self.draft_length = AUTO, None, "auto"
            return
        backend, _, rest = label.rpartition("/")
        method, _, n = rest.partition("@")
        self.backend = backend or args.backend
        self.spec = MethodSpec.parse(method)
        self.draft_length = parse_draft_length(n or args.draft_length)

    def fixed_n(self) -> int | None:
        return None if self.draft_length == "auto" or self.spec is None or self.spec.method == AR else int(self.draft_length)


def summarize(label: str, runs: list[dict], baselines: dict[str, float], hf_n: int, fixed_n: int | None, costs) -> dict:
    """One table row. `baselines`: tokens/s of `ar` (same backend), `hf:ar`, `llamacpp:ar`."""
    tokens = sum(r["new_tokens"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    target_calls = sum(r["rounds"] for r in runs)
    drafted = None
    if all(r["drafted"] is not None for r in runs):  # counted: ours, or HF's sampled verification
        drafted = sum(r["drafted"] for r in runs)
        accepted = sum(r["accepted"] for r in runs)
        rounds = sum(r.get("verified_rounds") or r["rounds"] for r in runs)
        acceptance = accepted / drafted if drafted else None
        approx = ""
    else:  # HF greedy or AR: derive from target calls (each round drafts N, emits accepted + 1)
        rounds = target_calls
        accepted = tokens - rounds
        acceptance = accepted / (rounds * hf_n) if label.startswith("hf:") and label != "hf:ar" and rounds else None
        approx = "≈"
    tps = tokens / seconds
    ratio = lambda name: tps / baselines[name] if name in baselines else None  # noqa: E731
    row = {
        "method": label,
        "tokens_per_second": tps,
        "speedup_vs_ar": ratio("ar"),
        "speedup_vs_llamacpp_ar": ratio("llamacpp:ar"),
        "speedup_vs_hf_ar": ratio("hf:ar"),
        "acceptance_rate": acceptance,
        "mean_accepted_length": 1 + accepted / rounds if rounds and acceptance is not None else None,  # docs/method.md §6
        "drafted_per_round": drafted / rounds if approx == "" and rounds and drafted else None,
        "ar_rounds": sum(r.get("ar_rounds", 0) for r in runs) if "ar_rounds" in runs[0] else None,
        "target_calls": target_calls,
        "approx": approx,
    }
    if "draft_seconds" in runs[0]:
        draft_s, target_s = sum(r["draft_seconds"] for r in runs), sum(r["target_seconds"] for r in runs)
        row["split"] = {"draft": draft_s / seconds, "target": target_s / seconds, "other": max(0.0, 1 - (draft_s + target_s) / seconds)}
    if fixed_n is not None and costs is not None and row["speedup_vs_ar"] is not None and acceptance is not None:
        c, v = costs
        row["efficiency"] = row["speedup_vs_ar"] / ((fixed_n + 1) / (fixed_n * c + v[fixed_n]))
    return row


def load_pairs(args, ours: list[Ours]) -> dict[str, object]:
    """One pair per backend the labels need ("auto" settled by choose_backend, as the CLI does)."""
    pairs: dict[str, object] = {}
    target, draft = pair_specs(args.target, args.draft)
    for backend in dict.fromkeys(o.backend for o in ours):
        chosen, why = choose_backend(target, draft, args.dtype, args.device, backend)
        pair = load_pair(target, draft, args.dtype or DEFAULT_DTYPE, device=args.device, backend=chosen, reason=why)
        print(f"backend {backend}: {pair.backend.name} ({pair.backend_reason})", file=sys.stderr)
        pairs[backend] = pair
    return pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--tasks", default="gsm8k,mbpp,xsum", help="prompt sources, cycled (test splits)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--draft-length", default="5", help="N for labels without @N: an integer or auto")
    parser.add_argument("--max-draft-length", type=int, default=8, help="N_max of auto")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", help=f"torch weights (default {DEFAULT_DTYPE}); naming one makes auto choose torch")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps")
    parser.add_argument("--backend", default="auto", help="backend of labels without BACKEND/: auto, torch, llama.cpp")
    parser.add_argument("--target")
    parser.add_argument("--draft")
    parser.add_argument("--methods", default="llamacpp:ar,default,ar,exact,static:0.9")
    parser.add_argument("--hf-confidence-stop", action="store_true", help=f"let HF stop drafting below confidence {HF_DEFAULT_CONFIDENCE} (its default); off: HF drafts exactly N like ours")
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = parser.parse_args()

    labels = [m.strip() for m in args.methods.split(",") if m.strip()]
    ours = {label: Ours(label, args) for label in labels if not label.startswith(("hf:", "llamacpp:"))}
    needs_torch = any(label.startswith("hf:") for label in labels)
    pairs = load_pairs(args, list(ours.values()) + ([Ours("torch/ar", args)] if needs_torch else []))
    hf_pair = next((p for p in pairs.values() if p.backend is TORCH), None)
    llm = None
    if "llamacpp:ar" in labels:
        from llama_cpp import Llama

        from diversed.runners.llamacpp import default_threads

        path = gguf_path(args.target or DEFAULT_TARGET.name)
        threads = default_threads()
        llm = Llama(model_path=str(path), n_ctx=4096, n_threads=threads, n_threads_batch=threads, seed=args.seed, verbose=False)
    any_pair = next(iter(pairs.values()))
    prompts = [encode_prompt(any_pair, text) for text in benchmark_prompts(args.data_dir, args.prompts, tuple(args.tasks.split(",")))]
    for label, o in ours.items():
        if o.spec is None:
            o.spec = default_method(pairs[o.backend])[0]

    def run(label: str, prompt_ids: list[int], run_args) -> dict:
        if label == "llamacpp:ar":
            return run_llamacpp(llm, prompt_ids, run_args)
        if label.startswith("hf:"):
            return run_hf(hf_pair, prompt_ids, label, run_args)
        o = ours[label]
        return run_ours(pairs[o.backend], prompt_ids, o.spec, o.draft_length, run_args)

    # Warm-up: one short call of each kind so lazy initialisation (and calibration) is not timed.
    warm = argparse.Namespace(**{**vars(args), "max_new_tokens": 4, "draft_length": parse_draft_length(args.draft_length)})
    for label in labels:
        run(label, prompts[0], warm)
    measured: dict[Backend, tuple[float, list[float]]] = {}  # one measurement per resolved backend
    for pair in pairs.values():
        if pair.draft is not None and pair.backend not in measured:
            measured[pair.backend] = step_costs(pair, args.max_draft_length)
    costs = {label: measured[pair.backend] for label, pair in pairs.items() if pair.backend in measured}

    args.draft_length = parse_draft_length(args.draft_length)
    runs: dict[str, list[dict]] = {label: [] for label in labels}
    for index, prompt_ids in enumerate(prompts):
        for label in labels:
            result = run(label, prompt_ids, args)
            runs[label].append(result)
            print(f"prompt {index + 1}/{len(prompts)} {label:>24}: {result['new_tokens'] / result['seconds']:.2f} tok/s", file=sys.stderr)

    def tps(label: str) -> float:
        return sum(r["new_tokens"] for r in runs[label]) / sum(r["seconds"] for r in runs[label])

    shared = {b: tps(b) for b in ("hf:ar", "llamacpp:ar") if b in runs}
    ar_of_backend = {pairs[o.backend].backend: tps(label) for label, o in ours.items() if o.spec.method == AR}
    rows = []
    for label in labels:
        o = ours.get(label)
        backend = pairs[o.backend].backend if o else (TORCH if label.startswith("hf:") else LLAMA_CPP)
        baselines = {**shared, **({"ar": ar_of_backend[backend]} if backend in ar_of_backend else {})}
        if label.startswith("hf:") and "hf:ar" in shared:
            baselines["ar"] = shared["hf:ar"]
        hf_n = int(args.draft_length) if args.draft_length != "auto" else 5
        if o:
            fixed_n, pair_costs = o.fixed_n(), costs.get(o.backend)
        else:  # Hugging Face drafts a fixed N on the torch pair
            fixed_n = hf_n if label.startswith("hf:") and label != "hf:ar" else None
            pair_costs = next((costs[b] for b, p in pairs.items() if p.backend is TORCH and b in costs), None)
        rows.append(summarize(label, runs[label], baselines, hf_n, fixed_n, pair_costs))
    print(f"\n{machine_summary()}; torch {torch.__version__} ({torch.get_num_threads()} threads), {args.dtype or DEFAULT_DTYPE} for torch; "
          f"{len(prompts)} prompts x {args.max_new_tokens} tokens, T={args.temperature}")
    for backend, (c, v) in measured.items():
        print(f"{backend.name}: c = {c:.3f}, v(1..{len(v)}) = {', '.join(f'{x:.2f}' for x in v)}")
    print("| method | tok/s | vs ar | vs llamacpp:ar | vs hf:ar | acceptance | mean accepted length | drafted per round "
          "| N=0 rounds | efficiency | draft / target / other |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda x, spec: "–" if x is None else format(x, spec)  # noqa: E731
    for row in rows:
        split = row.get("split")
        split_text = f"{split['draft']:.0%} / {split['target']:.0%} / {split['other']:.1%}" if split else "–"
        print(
            f"| {row['method']} | {row['tokens_per_second']:.2f} | {fmt(row['speedup_vs_ar'], '.2f')}x | {fmt(row['speedup_vs_llamacpp_ar'], '.2f')}x "
            f"| {fmt(row['speedup_vs_hf_ar'], '.2f')}x | {row['approx']}{fmt(row['acceptance_rate'], '.1%')} "
            f"| {row['approx']}{fmt(row['mean_accepted_length'], '.2f')} | {fmt(row['drafted_per_round'], '.2f')} "
            f"| {fmt(row['ar_rounds'], 'd')} | {fmt(row.get('efficiency'), '.2f')} | {split_text} |"
        )
    if args.json:
        payload = {"machine": machine_summary(), "costs": {b.name: {"c": c, "v": v} for b, (c, v) in measured.items()},
                   "args": {k: str(val) for k, val in vars(args).items()}, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
