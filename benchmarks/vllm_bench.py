"""vLLM with diversed's plugin on this machine: AR, exact and relaxed methods at 1 and 8 concurrent requests.

One process, vLLM's engine in-process (so the plugin's clock is readable here), the embedded
pair's bf16 copies under $DIVERSED_HOME/models. For each method and concurrency it prints
tokens/s, vLLM's acceptance (accepted / drafted tokens) and the plugin's share of the wall time
(seconds inside `verify_batch` / seconds generating; `exact` runs on vLLM's own kernels, so its
share is 0). Prompts: GSM8K test questions through the target's chat template.

Run from the vLLM environment (scripts/setup_vllm.sh):

    /work/venv-vllm/bin/python benchmarks/vllm_bench.py --data-dir ../shared/data --max-tokens 48 --temperature 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from diversed.integrations.vllm.launch import speculative_config
from diversed.integrations.vllm.requests import speculative_object, uses_vllm_rule
from diversed.methods import MethodSpec, needs_draft

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: the plugin's clock is ours to read

METHODS = ("ar", "exact", "static:0.9", "static:0.5", "cascade:opt:0")


def prompts(data_dir: Path, count: int, tokenizer) -> list[str]:
    rows = [json.loads(line) for line in (data_dir / "gsm8k_test.jsonl").read_text().splitlines()[:count]]
    return [tokenizer.apply_chat_template([{"role": "user", "content": row["question"]}], tokenize=False, add_generation_prompt=True) for row in rows]


def counters(llm) -> tuple[float, float]:
    values = {m.name: getattr(m, "value", 0) for m in llm.get_metrics()}
    return values.get("vllm:spec_decode_num_draft_tokens", 0), values.get("vllm:spec_decode_num_accepted_tokens", 0)


def run(llm, texts: list[str], label: str, concurrency: int, args) -> dict:
    from vllm import SamplingParams

    from diversed.integrations.vllm.verification import CLOCK

    spec = MethodSpec.parse(label)
    extra = None if not needs_draft(spec.method) or uses_vllm_rule(spec) else {"speculative": speculative_object(spec)}
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, ignore_eos=True, seed=None, extra_args=extra)
    drafted0, accepted0 = counters(llm)
    clock0, tokens, started = CLOCK.seconds, 0, time.perf_counter()
    for i in range(0, len(texts), concurrency):
        outputs = llm.generate(texts[i:i + concurrency], params, use_tqdm=False)
        tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
    wall = time.perf_counter() - started
    drafted, accepted = (a - b for a, b in zip(counters(llm), (drafted0, accepted0)))
    return {
        "method": label, "concurrency": concurrency, "tokens": tokens, "seconds": round(wall, 2), "tok_per_s": round(tokens / wall, 2),
        "acceptance": round(accepted / drafted, 3) if drafted else None, "drafted": int(drafted), "accepted": int(accepted),
        "plugin_share": round((CLOCK.seconds - clock0) / wall, 4),
    }


def engine(target: Path, draft: Path | None, args):
    from vllm import LLM

    speculative = None if draft is None else speculative_config(str(draft), args.k)
    return LLM(model=str(target), dtype=args.dtype, max_model_len=1024, seed=0, enforce_eager=True, max_num_seqs=8,
               kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)), generation_config="vllm", distributed_executor_backend="uni",
               disable_log_stats=False, speculative_config=speculative)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--prompts", type=int, default=8, help="prompts per configuration at concurrency > 1")
    parser.add_argument("--single-prompts", type=int, default=2, help="prompts per configuration at concurrency 1 (one at a time)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--k", type=int, default=3, help="num_speculative_tokens")
    parser.add_argument("--kv-cache-gib", type=float, default=0.5)
    parser.add_argument("--dtype", default="bfloat16",
                        help="vLLM's compute dtype; float32 on CPUs without AVX-512 BF16, where oneDNN has no bf16 matmul")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON lines here")
    args = parser.parse_args()

    import vllm
    from transformers import AutoTokenizer

    from diversed.embedded import DEFAULT_DRAFT, DEFAULT_TARGET, convert_embedded

    target, draft = convert_embedded(DEFAULT_TARGET), convert_embedded(DEFAULT_DRAFT)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    print(f"# vLLM {vllm.__version__}, CPU {cpu}, {os.cpu_count()} cores, T={args.temperature}, k={args.k}, {args.max_tokens} tokens, "
          f"{args.prompts} GSM8K prompts, {args.dtype}", flush=True)
    texts = prompts(args.data_dir, args.prompts, AutoTokenizer.from_pretrained(str(target)))
    methods = args.methods.split(",")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    rows = []
    for with_draft, chosen in ((False, [m for m in methods if not needs_draft(MethodSpec.parse(m).method)]), (True, [m for m in methods if needs_draft(MethodSpec.parse(m).method)])):
        if not chosen:
            continue
        llm = engine(target, draft if with_draft else None, args)
        run(llm, texts[:1], chosen[0], 1, argparse.Namespace(**{**vars(args), "max_tokens": 4}))  # warm-up
        for concurrency in concurrencies:
            for label in chosen:
                row = run(llm, texts[:args.single_prompts] if concurrency == 1 else texts, label, concurrency, args)
                rows.append(row)
                print(json.dumps(row), flush=True)
        del llm
    if args.out:
        args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
