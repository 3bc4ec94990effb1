"""Where the loss comes from (issue 41, step 1): the first token where a relaxed output leaves
what the target alone would have emitted, on problems `exact` solved and the relaxed arm did not.

Operational definition (docs/results/loss-classes/README.md): teacher-force the target and the
draft of the confirmatory evaluation over prompt + relaxed completion (+ the end-of-sequence
token where the row finished with "stop"), both at T = 1 with no top-k/top-p (the rows'
settings). The first deviation at threshold tau is the first emitted position whose token x has
p(x) < tau and q(x) >= p(x). At the appended end-of-sequence position x is the stop event:
p(x) = p(EOS set), q(x) = q(EOS set).

Resumable: one JSON line per scored (task, example, completion) in
docs/results/loss-classes/scored.jsonl; rerunning skips what is there. `--report` only reads the
cache and prints the tables.

    DIVERSED_DATA_DIR=../shared/data python benchmarks/loss_classes.py --minutes 50
    python benchmarks/loss_classes.py --report
"""

from __future__ import annotations

import argparse
import collections
import json
import keyword
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "docs/results/confirmatory"
OUT = ROOT / "docs/results/loss-classes"
CACHE = OUT / "scored.jsonl"
TASKS = ("gsm8k", "mbpp", "humaneval")
REFERENCE = "exact"  # the lossless arm every relaxed output is compared with
MAIN_ARMS = ("cascade:opt:0", "static:0.5")
EXTRA_ARMS = ("static:0.9",)
TAUS = (0.1, 0.05)
STOP_MASS = 0.5  # p(EOS) at least this at a deviation that goes on: "goes on where the target would stop"
CONTROL_PER_CELL = 12  # both-solved rows sampled per (task, arm) as the base rate
CONTROL_PER_CELL_EXTRA = 12  # the same for static:0.9
SAMPLE_SEED = 41
EXACT_NULL_PER_TASK = 8  # exact's own solved outputs per task, as a null for the definition
CLASSES = ("stop", "marker/format", "digit/operator", "code syntax/indent", "identifier", "prose", "no deviation")
FORBIDDEN_GSM8K = range(1200, 1319)  # held-out GSM8K test examples: never used


# ---------------------------------------------------------------- rows and the work list

def load_rows(task: str) -> dict[tuple[str, int], dict[str, dict]]:
    by: dict[tuple[str, int], dict[str, dict]] = collections.defaultdict(dict)
    for line in open(CONF / task / "rows.jsonl", encoding="utf-8"):
        row = json.loads(line)
        if task == "gsm8k":
            assert int(row["example_id"].split("-")[1]) not in FORBIDDEN_GSM8K, row["example_id"]
        by[(row["example_id"], row["seed"])][row["method"]] = row
    return by


def cells(task: str, by, arm: str) -> tuple[list, list]:
    """(wrong-vs-exact, both-solved) row pairs for one arm."""
    wrong, both = [], []
    for key in sorted(by):
        methods = by[key]
        if REFERENCE not in methods or arm not in methods or methods[REFERENCE]["score"] <= 0:
            continue
        (both if methods[arm]["score"] > 0 else wrong).append(methods[arm])
    return wrong, both


def work_list() -> list[tuple[int, str, dict]]:
    """(tier, task, row) in the order to score them: main arms' losses, their controls (sampled),
    exact's own solved outputs (sampled), then static:0.9's losses and controls (sampled)."""
    items = []
    for task in TASKS:
        by = load_rows(task)
        for arm in MAIN_ARMS + EXTRA_ARMS:
            wrong, both = cells(task, by, arm)
            extra = arm in EXTRA_ARMS
            items += [(3 if extra else 0, rank, task, row) for rank, row in enumerate(wrong)]
            rng = random.Random(f"{SAMPLE_SEED}:{task}:{arm}")  # one stream per cell: samples do not shift when another changes
            sample = list(rng.sample(range(len(both)), min(CONTROL_PER_CELL_EXTRA if extra else CONTROL_PER_CELL, len(both))))
            items += [(4 if extra else 1, rank, task, both[i]) for rank, i in enumerate(sample)]
        # null: exact's own (pure target) samples on solved problems, where every "deviation" is sampling noise
        solved = [m[REFERENCE] for k, m in sorted(by.items()) if REFERENCE in m and m[REFERENCE]["score"] > 0]
        rng = random.Random(f"{SAMPLE_SEED}:{task}:exact")
        items += [(2, rank, task, solved[i]) for rank, i in enumerate(rng.sample(range(len(solved)), min(EXACT_NULL_PER_TASK, len(solved))))]
    # losses task by task; samples (in their random draw order) round-robin over the cells, so a run cut short leaves every cell partly done
    items.sort(key=lambda item: (item[0], TASKS.index(item[2]), item[1]) if item[0] in (0, 3) else (item[0], item[1], TASKS.index(item[2])))
    return [(tier, task, row) for tier, _, task, row in items]


def completion_key(task: str, row: dict) -> str:
    return json.dumps([task, row["example_id"], row["completion"], row["finish_reason"]])


# ---------------------------------------------------------------- teacher forcing

def crop_to(cache, length: int) -> None:
    """Keep the first `length` positions of a DynamicCache (transformers 5 crops by a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


class Scorer:
    def __init__(self, dtype: str, chunk: int):
        import torch

        torch.set_num_threads(1)
        from diversed.models import load_pair

        self.torch = torch
        self.pair = load_pair(dtype=dtype, backend="torch")
        self.tok = self.pair.tokenizer
        self.eos = sorted(self.pair.eos_token_ids)
        self.V = self.pair.vocab_size
        self.chunk = chunk
        self.prefix: dict[str, tuple[list[int], object, object]] = {}

    def prompt_ids(self, task, example) -> list[int]:
        from diversed.generation import encode_prompt

        return encode_prompt(self.pair, task.prompt(example, raw=False), raw=False)

    def _forward(self, model, ids, cache, keep):
        torch = self.torch
        with torch.no_grad():
            out = model(torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=keep)
        return out.logits[0, :, : self.V].float(), out.past_key_values

    def start_prompt(self, task_name: str, common: list[int], ids: list[int]):
        """Caches over the prompt (sharing the task's common prefix) and the logits predicting the first token."""
        from transformers import DynamicCache

        if task_name not in self.prefix:
            caches = []
            for model in (self.pair.target, self.pair.draft):
                cache = DynamicCache()
                self._forward(model, common, cache, 1)
                caches.append(cache)
            self.prefix[task_name] = (common, *caches)
        common, tcache, dcache = self.prefix[task_name]
        assert ids[: len(common)] == common and len(ids) > len(common)
        last = []
        for model, cache in ((self.pair.target, tcache), (self.pair.draft, dcache)):
            crop_to(cache, len(common))
            logits, _ = self._forward(model, ids[len(common):], cache, 1)
            last.append(logits[-1])
        return tcache, dcache, len(ids), last[0], last[1]

    def score(self, state, toks: list[int], stop_at_eos_end: bool) -> dict:
        """Per emitted position: p(x), p(EOS), and q(x) where p(x) < max tau; stops after the
        first deviation at the smallest tau (it is at or after the larger tau's)."""
        torch = self.torch
        tcache, dcache, plen, t_prev, d_prev = state
        crop_to(tcache, plen)
        crop_to(dcache, plen)
        eos = torch.tensor(self.eos)
        n = len(toks)
        px, peos, qx = [], [], {}
        d_fed = 0  # completion tokens fed to the draft; d_prev predicts toks[d_fed]
        i, done = 0, False
        tmax, tmin = max(TAUS), min(TAUS)
        while i < n and not done:
            part = toks[i : i + self.chunk]
            logits, _ = self._forward(self.pair.target, part, tcache, 0)
            dists = torch.cat([t_prev[None], logits[:-1]])
            t_prev = logits[-1]
            probs = torch.softmax(dists, -1)
            pe = probs[:, eos].sum(-1)
            for k, t in enumerate(part):
                j = i + k
                is_end = stop_at_eos_end and j == n - 1
                px.append(float(pe[k]) if is_end else float(probs[k, t]))
                peos.append(float(pe[k]))
            cand = [i + k for k in range(len(part)) if px[i + k] < tmax]
            if cand:
                j = cand[-1]
                if j > d_fed:
                    dl, _ = self._forward(self.pair.draft, toks[d_fed:j], dcache, 0)
                    qd = torch.cat([d_prev[None], dl])  # predicting toks[d_fed .. j]
                    base = d_fed
                    d_prev, d_fed = dl[-1], j
                else:
                    qd, base = d_prev[None], j
                qprobs = torch.softmax(qd, -1)
                for c in cand:
                    if c < base:
                        continue
                    row = qprobs[c - base]
                    is_end = stop_at_eos_end and c == n - 1
                    qx[c] = float(row[eos].sum()) if is_end else float(row[toks[c]])
                if any(px[c] < tmin and qx[c] >= px[c] for c in cand):
                    done = True
            i += len(part)
        return {"n": n, "scored": len(px), "px": [round(v, 5) for v in px], "peos": [round(v, 5) for v in peos],
                "qx": {str(k): round(v, 5) for k, v in qx.items()}}


# ---------------------------------------------------------------- classification

MARKERS = re.compile(r"####|```(?:python)?|[Tt]he (?:final )?answer is|[Aa]nswer:|\\boxed")
ARITH = re.compile(r"^[\d\s.,+\-*/%=x×$()]+$")
NUMERIC = re.compile(r"^[\d\s.+\-*/%]+$")


def code_regions(text: str) -> list[tuple[int, int]]:
    """Character spans inside ``` fences (an unclosed fence runs to the end)."""
    spans, pos, inside, start = [], 0, False, 0
    for m in re.finditer(r"```[a-zA-Z]*\n?", text):
        if inside:
            spans.append((start, m.start()))
        else:
            start = m.end()
        inside = not inside
    if inside:
        spans.append((start, len(text)))
    return spans


def in_comment_or_docstring(code: str, at: int) -> bool:
    before = code[:at]
    if (before.count('"""') + before.count("'''")) % 2 == 1:
        return True
    line = before[before.rfind("\n") + 1 :]
    return "#" in line and line.count('"') % 2 == 0 and line.count("'") % 2 == 0


def classify(task: str, text: str, offsets: list[tuple[int, int]], toks: list[int], j: int, rec: dict, tok) -> str:
    n = rec["n"]
    if j >= len(offsets) or rec["peos"][j] >= STOP_MASS:  # the appended EOS, or going on where the target stops
        return "stop"
    a, b = offsets[j]
    piece = tok.decode([toks[j]])
    for m in MARKERS.finditer(text):
        if m.start() < b and a < m.end():
            return "marker/format"
    stripped = piece.strip()
    if task == "gsm8k":
        if stripped and ARITH.match(stripped) and re.search(r"[\d+\-*/=x×%]", stripped):
            return "digit/operator"
        return "prose"
    if not stripped:
        return "code syntax/indent"  # whitespace-only: newlines and indentation
    regions = code_regions(text)
    region = next(((s, e) for s, e in regions if s <= a < e), None)
    if region is None or in_comment_or_docstring(text[region[0] : region[1]], a - region[0]):
        return "prose"  # outside the code block, or inside a comment or docstring
    if stripped.startswith(("#", '"""', "'''")):
        return "prose"  # opening a comment or docstring: a choice to write prose
    if not stripped:
        return "code syntax/indent"
    if stripped.isdigit() and piece == stripped and a > 0 and re.match(r"\w", text[a - 1]):
        return "identifier"  # the digits of a name (list1)
    if NUMERIC.match(stripped) and (re.search(r"\d", stripped) or not text[:a].rstrip().endswith("import")):
        return "digit/operator"
    word = re.sub(r"\W", "", stripped)
    if word and not word.isdigit():
        return "code syntax/indent" if keyword.iskeyword(word) else "identifier"
    return "code syntax/indent"


def first_deviation(rec: dict, tau: float) -> int | None:
    for j, p in enumerate(rec["px"]):
        if p < tau and rec["qx"].get(str(j), -1.0) >= p:
            return j
    return None


# ---------------------------------------------------------------- main

def encode_completion(tok, row: dict, eos: int) -> tuple[list[int], list[tuple[int, int]], bool]:
    enc = tok(row["completion"], add_special_tokens=False, return_offsets_mapping=True)
    toks, offsets = list(enc.input_ids), [tuple(o) for o in enc.offset_mapping]
    ends = row["finish_reason"] == "stop"
    if ends:
        toks.append(eos)
    return toks, offsets, ends


def run(args) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from diversed.tasks import get_task

    OUT.mkdir(parents=True, exist_ok=True)
    done = set()
    if CACHE.exists():
        for line in open(CACHE, encoding="utf-8"):
            try:
                done.add(json.loads(line)["key"])
            except (json.JSONDecodeError, KeyError):
                pass
    items = [it for it in work_list() if it[0] <= args.max_tier]
    todo, seen = [], set(done)
    for tier, task, row in items:
        key = completion_key(task, row)
        if key not in seen:
            seen.add(key)
            todo.append((tier, task, row, key))
    print(f"{len(todo)} completions to score ({len(done)} cached)", file=sys.stderr)
    if not todo:
        return
    t0 = time.time()
    scorer = Scorer(args.dtype, args.chunk)
    print(f"models loaded in {time.time() - t0:.0f}s", file=sys.stderr)
    examples, commons = {}, {}
    for task_name in TASKS:
        settings = json.loads((CONF / task_name / "settings.json").read_text())
        task = get_task(task_name)
        assert not settings["raw"] and settings["temperature"] == 1.0 and settings["top_k"] == 0 and settings["top_p"] == 1.0
        assert getattr(task, "prompt_version", 1) == settings["prompt_version"], task_name
        needed = {row["example_id"] for _, t, row, _ in todo if t == task_name}
        if not needed:
            continue
        exs = {ex.id: ex for ex in task.load(split=settings["split"], data_dir=args.data_dir) if ex.id in needed}
        examples[task_name] = (task, {i: scorer.prompt_ids(task, e) for i, e in exs.items()})
        ids = list(examples[task_name][1].values())
        common = ids[0]
        for other in ids[1:]:
            k = 0
            while k < min(len(common), len(other)) and common[k] == other[k]:
                k += 1
            common = common[:k]
        commons[task_name] = common[:-1]
    state_for, n_done = None, 0
    with open(CACHE, "a", encoding="utf-8") as out:
        for tier, task_name, row, key in todo:
            if time.time() - t0 > args.minutes * 60:
                print("time budget reached; rerun to continue", file=sys.stderr)
                break
            task, prompts = examples[task_name]
            if state_for != (task_name, row["example_id"]):
                state = scorer.start_prompt(task_name, commons[task_name], prompts[row["example_id"]])
                state_for = (task_name, row["example_id"])
            toks, _, ends = encode_completion(scorer.tok, row, scorer.eos[0])
            rec = scorer.score(state, toks, ends)
            rec.update(key=key, task=task_name, example_id=row["example_id"], method=row["method"], tier=tier)
            out.write(json.dumps(rec) + "\n")
            out.flush()
            n_done += 1
            if n_done % 10 == 0:
                print(f"{n_done}/{len(todo)} in {time.time() - t0:.0f}s", file=sys.stderr)
    print(f"scored {n_done} in {time.time() - t0:.0f}s", file=sys.stderr)


def report(args) -> None:
    from transformers import AutoTokenizer

    sys.path.insert(0, str(ROOT / "src"))
    from diversed.embedded import DEFAULT_TARGET  # noqa: F401  (the tokenizer is the pair's)

    tok_dir = next((Path.home() / ".cache/diversed/tokenizers").glob("Qwen2.5-Coder-1.5B*"))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    recs = {}
    for line in open(CACHE, encoding="utf-8"):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        recs[rec["key"]] = rec
    examples_out = []
    # the control cells count only their seeded sample (not rows that merely share a cached completion)
    sampled = {(task, row["example_id"], row["method"]) for tier, task, row in work_list() if tier in (1, 2, 4)}
    for tau in TAUS:
        before_fence = collections.Counter()
        print(f"\n### threshold tau = {tau}\n")
        print("| task | arm | set | n (scored/all) | " + " | ".join(CLASSES) + " | median position | median p(x) |")
        print("|---|---|---|---|" + "---|" * len(CLASSES) + "---|---|")
        for task in TASKS:
            by = load_rows(task)
            for arm in args.arms.split(","):
                wrong, both = cells(task, by, arm) if arm != REFERENCE else ([], [m[REFERENCE] for m in by.values() if m[REFERENCE]["score"] > 0])
                for label, rows in (("lost", wrong), ("both solved", both)):
                    counts, pos, pvals, n = collections.Counter(), [], [], 0
                    for row in rows:
                        if label != "lost" and (task, row["example_id"], row["method"]) not in sampled:
                            continue
                        rec = recs.get(completion_key(task, row))
                        if rec is None:
                            continue
                        n += 1
                        j = first_deviation(rec, tau)
                        # a record cut short before any deviation cannot happen: scoring stops only after one
                        if j is None:
                            counts["no deviation"] += 1
                            continue
                        toks, offsets, _ = encode_completion(tok, row, eos)
                        cls = classify(task, row["completion"], offsets, toks, j, rec, tok)
                        counts[cls] += 1
                        pos.append(j)
                        pvals.append(rec["px"][j])
                        fence = row["completion"].find("```")
                        if task != "gsm8k" and j < len(offsets) and (fence < 0 or offsets[j][0] < fence):
                            before_fence[(task, arm, label)] += 1
                        if tau == 0.1 and label == "lost" and len(examples_out) < 400:
                            piece = "<EOS>" if j >= len(offsets) else tok.decode([toks[j]])
                            examples_out.append({"task": task, "arm": arm, "example_id": row["example_id"], "pos": j,
                                                 "class": cls, "token": piece, "p": rec["px"][j], "q": rec["qx"][str(j)],
                                                 "p_eos": rec["peos"][j], "context": row["completion"][max(0, (offsets[j][0] if j < len(offsets) else len(row["completion"])) - 60):(offsets[j][1] if j < len(offsets) else len(row["completion"]))]})
                    if not n:
                        continue
                    shares = " | ".join(f"{100 * counts[c] / n:.0f}%" for c in CLASSES)
                    med = sorted(pos)[len(pos) // 2] if pos else "-"
                    medp = f"{sorted(pvals)[len(pvals) // 2]:.3f}" if pvals else "-"
                    print(f"| {task} | {arm} | {label} | {n}/{len(rows)} | {shares} | {med} | {medp} |")
        if before_fence:
            print("\nCode tasks, first deviations before the first ``` of the output (prose where the code block would open): "
                  + ", ".join(f"{t} {a} {l}: {k}" for (t, a, l), k in sorted(before_fence.items())))
    if args.examples:
        with open(OUT / "deviations.jsonl", "w", encoding="utf-8") as f:
            for e in examples_out:
                f.write(json.dumps(e) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--chunk", type=int, default=24)
    ap.add_argument("--minutes", type=float, default=50.0, help="stop scoring after this long (resume later)")
    ap.add_argument("--max-tier", type=int, default=4, help="0 main arms' losses, 1 their controls, 2 exact's own solved outputs (null), 3 static:0.9 losses, 4 its controls")
    ap.add_argument("--arms", default=",".join(MAIN_ARMS + (REFERENCE,)), help="with --report: the arms to tabulate (exact: its own solved outputs, the null)")
    ap.add_argument("--report", action="store_true", help="only print the tables from the cache")
    ap.add_argument("--examples", action="store_true", help="with --report: write deviations.jsonl (lost rows, tau 0.1)")
    args = ap.parse_args()
    if args.report:
        report(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
