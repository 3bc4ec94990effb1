"""`diversed eval` and `diversed pareto` (docs/evaluation.md): thin over diversed.evaluate."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..calibration import batched_dtype
from ..errors import UserInputError
from ..engine import GenerationConfig
from ..evaluate.lockstep import DEFAULT_BATCH, lockstep_refusal
from ..evaluate import (DEFAULT_WEIGHTS, FRONT_JSON, FRONT_PLOT, SUMMARY_JSON, EngineRows, EvalSettings, LockstepRows, RowMaker,
                        check_settings, plot_front, run_eval, summary_markdown, theoretical_front)
from ..generation import MethodSpec, check_spec
from ..methods import METHODS, spec_syntax
from ..embedded import DEFAULT_DRAFT, DEFAULT_TARGET
from ..methods import needs_draft
from ..sampling import SamplingParams
from ..run_files import writable_folder
from ..runners import AUTO, batch_backend, get_backend
from ..sandbox import require_isolation
from ..tasks import TASKS, Example, Task, get_task
from .args import add_model_args, add_sampling_args, config_from_args, pair_from_args, proposer_from_args, resolve_backend

VLLM = "vllm"  # --engine: vLLM with the diversed plugin (integrations/vllm), in its own environment


def _parse_methods(text: str) -> list[MethodSpec]:
    """Method specs, validated (knobs, head files) before any model loads."""
    specs = [MethodSpec.parse(part) for part in text.split(",") if part.strip()]
    if not specs:
        raise UserInputError("--methods is empty")
    for spec in specs:
        check_spec(spec)
    return specs


def _parse_weights(text: str) -> list[float]:
    try:
        weights = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserInputError(f"--weights must be numbers separated by commas, got {text!r}") from None
    if not weights or any(not 0 <= w <= 1 for w in weights):
        raise UserInputError(f"--weights must be in [0, 1], got {text!r}")
    return weights


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return value


def _load(args: argparse.Namespace) -> tuple[Task, list[Example]]:
    task = get_task(args.task)
    return task, task.load(args.split, args.n, args.data_dir, offset=args.offset)


def cmd_eval(args: argparse.Namespace) -> int:
    task, examples = _load(args)
    if task.metric_name == "pass@1":
        require_isolation(args.unsafe_sandbox)  # before anything runs model-written code
    specs = _parse_methods(args.methods)
    config = config_from_args(args)  # validates the sampling options before the models load
    proposer = proposer_from_args(args)
    target, draft = args.target or DEFAULT_TARGET.name, (args.draft or DEFAULT_DRAFT.name) if proposer.needs_draft_model else proposer.name
    on_vllm = args.engine == VLLM
    if on_vllm:
        from ..integrations.vllm.launch import default_dtype

        backend, args.dtype = VLLM, args.dtype or default_dtype()
    else:
        args.lockstep = _lockstep_batch(args, config)
        if args.lockstep is not None and args.dtype is None:
            args.dtype, why = batched_dtype(args.device)
            if args.verbose:
                print(f"note: weights in {why}", file=sys.stderr)
        # Settles --backend auto (lockstep: on the batching backend) and the dtype, which the settings record.
        backend = resolve_backend(args, batched=args.lockstep is not None)
    settings = EvalSettings(
        task=task.name, split=args.split, target=target, draft=draft,
        dtype=args.dtype, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        draft_length=config.draft_length, max_new_tokens=args.max_new_tokens, seed=args.seed, raw=args.raw,
        draft_confidence=args.draft_confidence, prompt_version=task.prompt_version, backend=backend, proposer=config.proposer,
    )
    if on_vllm:
        _check_vllm_eval(args, specs, settings)  # before the folder records these settings
    out_dir = writable_folder(Path(args.out))  # fail before the (slow) model load
    check_settings(out_dir, settings)
    maker = _vllm_rows(args, settings) if on_vllm else _our_rows(args, specs)
    summary = run_eval(maker, task, examples, specs, settings, out_dir)
    print(summary_markdown(summary))
    print(f"rows, summary and plot in {out_dir}/", file=sys.stderr)
    return 0


def _lockstep_batch(args: argparse.Namespace, config: GenerationConfig) -> int | None:
    """Rows per lockstep step, or None for one timed generation at a time: `--lockstep`'s batch, or
    by default lockstep's own wherever it has the engine's law (lockstep.py)."""
    if args.sequential:
        if args.lockstep is not None:
            raise UserInputError("--sequential and --lockstep contradict each other; choose one")
        return None
    backend = batch_backend() if args.backend == AUTO else get_backend(args.backend)
    refusal = lockstep_refusal(backend, config)
    if args.lockstep is not None:
        if refusal is not None:
            raise UserInputError(refusal)
        return args.lockstep
    if refusal is not None:
        print(f"note: one generation at a time, timed (batched evaluation does not apply: {refusal})", file=sys.stderr)
        return None
    return DEFAULT_BATCH


def _our_rows(args: argparse.Namespace, specs: list[MethodSpec]) -> RowMaker:
    pair = pair_from_args(args, needs_draft=any(needs_draft(spec.method) for spec in specs))
    return EngineRows(pair) if args.lockstep is None else LockstepRows(pair, args.lockstep)


def _check_vllm_eval(args: argparse.Namespace, specs: list[MethodSpec], settings: EvalSettings) -> None:
    from ..integrations.vllm.evaluation import check_vllm_eval
    from ..integrations.vllm.launch import require_vllm

    if args.lockstep is not None:
        raise UserInputError("--lockstep is our engine's batching; vLLM batches by itself: drop --lockstep with --engine vllm")
    if not proposer_from_args(args).needs_draft_model:
        raise UserInputError("--engine vllm drafts with a draft model; --draft ngram runs on our engine")
    check_vllm_eval(specs, settings)
    require_vllm()


def _vllm_rows(args: argparse.Namespace, settings: EvalSettings) -> RowMaker:
    from ..integrations.vllm.evaluation import VllmRows

    return VllmRows(args.target, args.draft, args.dtype, settings.draft_length)


def cmd_pareto(args: argparse.Namespace) -> int:
    task, examples = _load(args)
    weights = _parse_weights(args.weights)
    params = SamplingParams(args.temperature, args.top_k, args.top_p)
    pair = pair_from_args(args)
    front = theoretical_front(pair, task, examples, params, weights, raw=args.raw)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / FRONT_JSON).write_text(json.dumps(front, indent=2) + "\n")
    summary_path = out_dir / SUMMARY_JSON
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    if summary is not None and summary.get("task") != task.name:
        print(f"note: {summary_path} is for task {summary.get('task')}; not plotting its points", file=sys.stderr)
        summary = None
    plot_front(front, out_dir / FRONT_PLOT, summary)
    print(f"mean TV(p, q) = {front['mean_tv']:.4f} over {front['positions']} positions of {front['n_examples']} examples")
    for point in front["front"]:
        print(f"w={point['w']:<5g} rejection {point['rejection']:.4f}  bias {point['bias']:.4f}")
    print(f"front in {out_dir / FRONT_JSON} and {out_dir / FRONT_PLOT}", file=sys.stderr)
    return 0


def _add_task_args(parser: argparse.ArgumentParser, default_n: int) -> None:
    group = parser.add_argument_group("task")
    group.add_argument("--task", required=True, choices=list(TASKS), help="benchmark (see docs/evaluation.md)")
    group.add_argument("--split", default="test", help="data split (default test)")
    group.add_argument("--n", type=int, default=default_n, help=f"N examples of the split, after --offset (default {default_n})")
    group.add_argument("--offset", type=int, default=0, help="skip the split's first OFFSET examples (default 0); rows keep their examples' ids and seeds")
    group.add_argument("--data-dir", help="folder with the task's JSONL files (default: $DIVERSED_DATA_DIR)")
    group.add_argument("--raw", action="store_true", help="plain-completion prompts instead of the chat template")
    group.add_argument("--out", required=True, help="output folder (rows, summary, plots); an eval run there resumes")


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `eval` and `pareto` to the `diversed` command line."""
    ev = subparsers.add_parser("eval", help="compare decoding methods on a task: quality, acceptance, speed")
    _add_task_args(ev, default_n=50)
    ev.add_argument("--methods", default="ar,exact,static:0.9,static:0.7", help=f"comma-separated: {', '.join(spec_syntax(m) for m in METHODS)}; trailing knobs may be left out (default %(default)s)")
    add_model_args(ev)
    add_sampling_args(ev)
    ev.add_argument("--unsafe-sandbox", action="store_true", help="run model-written code even where the sandbox cannot isolate it (docs/evaluation.md)")
    ev.add_argument("--lockstep", type=_positive_int, nargs="?", const=DEFAULT_BATCH, metavar="BATCH",
                    help=f"generate BATCH rows (default {DEFAULT_BATCH}) at a time in lockstep: the engine's law and counts, several times "
                         "faster; rows carry their share of batch time (torch, T > 0, fixed N). The default wherever it applies (docs/evaluation.md)")
    ev.add_argument("--sequential", action="store_true",
                    help="one generation at a time through the engine, each timed (the speed side of the Pareto plot); on any backend")
    ev.add_argument("--engine", choices=("diversed", VLLM), default="diversed",
                    help="diversed (default): this package's engine; vllm: vLLM with the diversed plugin, in vLLM's environment (docs/vllm.md)")
    # A fixed N by default: rows of different methods then compare at the same draft length.
    ev.set_defaults(handler=cmd_eval, max_new_tokens=256, seed=0, draft_length=5)

    pa = subparsers.add_parser("pareto", help="exact rejection/bias front of the static ensemble on reference texts")
    _add_task_args(pa, default_n=50)
    pa.add_argument("--weights", default=",".join(f"{w:g}" for w in DEFAULT_WEIGHTS), help="target weights w (default 0,0.1,...,1)")
    add_model_args(pa)
    group = pa.add_argument_group("distributions (processed as when decoding)")
    group.add_argument("--temperature", "-T", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--top-p", type=float, default=1.0)
    pa.set_defaults(handler=cmd_pareto)
