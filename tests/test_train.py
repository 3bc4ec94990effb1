"""Training the ensemble head (docs/method.md §5) on the tiny pair: objective, baseline, frozen models,
checkpoint/resume, direction of learning, and the saved head in use."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from diversed.cli import main
from diversed.engine import GenerationConfig
from diversed.errors import UserInputError
from diversed.generation import MethodSpec, encode_prompt, generate
from diversed.head import EnsembleHead, HeadConfig, load_head
from diversed.sampling import logits_to_probs, total_variation
from diversed.train import (
    LOG_FILE,
    RewardBaseline,
    Rollout,
    TrainSettings,
    checkpoint_paths,
    policy_loss,
    rollout,
    rollout_batch,
    seeded_generator,
    train_head,
)

from .conftest import SHARED_DATA

PROMPTS = ["hello there", "what is 2+2?", "write a poem", "abc def", "the quick brown fox", "count: 1 2 3", "why?", "say hi"]
SETTINGS = TrainSettings(task="tiny", prompts=4, epochs=2, batch_size=2, max_new_tokens=10, lr=0.05, warmup_steps=0, seed=0)


def identity(example: str) -> str:
    return example


def length_parity(example: str, completion: str) -> float:
    """A reward unrelated to w: some advantages are non-zero, with no preferred direction."""
    return float(len(completion) % 2)


def fixed_rollouts(pair, n: int = 4, tokens: int = 12) -> list[Rollout]:
    """Rollouts of the initial head (w = 0.5) to evaluate other heads' w on the same hidden states."""
    head = EnsembleHead(HeadConfig(pair.signature())).to(pair.device)
    generator = seeded_generator(123, "eval", 0, pair.device)
    return [rollout(pair, head, encode_prompt(pair, text), tokens, SETTINGS.sampling, generator) for text in PROMPTS[:n]]


def mean_w(head: EnsembleHead, rollouts: list[Rollout]) -> float:
    with torch.no_grad():
        return float(torch.cat([head(r.draft_hidden, r.target_hidden) for r in rollouts]).mean())


def read_log(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / LOG_FILE).read_text().splitlines()]


# ----------------------------------------------------------------------------- objective


def full_forward(pair, prompt: list[int], tokens: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Hidden states and processed probabilities of both models at each completion position, unbatched, no cache."""
    ids = torch.tensor([prompt + tokens])
    start, end = len(prompt) - 1, len(prompt) - 1 + len(tokens)
    hidden, probs = [], []
    for model in (pair.target, pair.draft):
        h = model.base_model(input_ids=ids).last_hidden_state[0, start:end]  # [T, H]
        hidden.append(h)
        probs.append(logits_to_probs(model.get_output_embeddings()(h)[:, : pair.vocab_size], SETTINGS.sampling))
    return hidden, probs


def test_batched_rollout_scalars_match_an_unbatched_full_forward(tiny_pair):
    """Left padding, per-row positions, the KV cache and rows leaving the batch at EOS change nothing:
    every kept per-token scalar equals the one of a plain forward over that prompt + completion."""
    prompts = [encode_prompt(tiny_pair, text) for text in PROMPTS]  # 8 prompts of different lengths
    assert len({len(p) for p in prompts}) > 4
    head = EnsembleHead(HeadConfig(tiny_pair.signature()))
    torch.nn.init.normal_(head.linear.weight, std=0.1)
    rollouts = rollout_batch(tiny_pair, head, prompts, 40, SETTINGS.sampling, seeded_generator(0, "t", 0))
    assert any(r.ended for r in rollouts) and not all(r.ended for r in rollouts)  # rows did leave the batch early
    for prompt, r in zip(prompts, rollouts):
        assert r.ended == (r.tokens[-1] in tiny_pair.eos_token_ids) and (r.ended or r.length == 40)
        hidden, (p, q) = full_forward(tiny_pair, prompt, r.tokens)
        y = torch.tensor(r.tokens).unsqueeze(-1)
        assert torch.allclose(r.p_token, p.gather(-1, y).squeeze(-1), atol=1e-5)
        assert torch.allclose(r.q_token, q.gather(-1, y).squeeze(-1), atol=1e-5)
        assert torch.allclose(r.tv, total_variation(p, q), atol=1e-5)
        assert torch.allclose(r.weights, head(hidden[1], hidden[0]), atol=1e-5)
        assert not r.draft_hidden.requires_grad and not r.draft_hidden.is_inference()


def test_grouped_rollouts_share_one_prefill_and_equal_repeated_prompts(tiny_pair):
    """repeats=K (one prefill, cache copied) samples exactly what K copies of the prompt would."""
    prompts = [encode_prompt(tiny_pair, "hello there"), encode_prompt(tiny_pair, "why?")]
    head = EnsembleHead(HeadConfig(tiny_pair.signature()))
    torch.nn.init.normal_(head.linear.weight, std=0.1)
    repeated = [ids for ids in prompts for _ in range(3)]
    plain = rollout_batch(tiny_pair, head, repeated, 12, SETTINGS.sampling, seeded_generator(5, "t", 0))
    grouped = rollout_batch(tiny_pair, head, prompts, 12, SETTINGS.sampling, seeded_generator(5, "t", 0), repeats=3)
    assert len(grouped) == 6
    assert len({tuple(r.tokens) for r in grouped[:3]}) > 1  # the samples of one prompt differ
    for a, b in zip(plain, grouped):
        assert a.tokens == b.tokens and a.ended == b.ended
        torch.testing.assert_close(a.p_token, b.p_token)
        torch.testing.assert_close(a.target_hidden, b.target_hidden)


def test_a_run_recorded_before_a_setting_existed_resumes_with_its_default(tiny_pair, tmp_path):
    train_head(tiny_pair, PROMPTS, identity, length_parity, SETTINGS, tmp_path, progress=False, stop_after=1)
    run = json.loads((tmp_path / "run.json").read_text())
    del run["settings"]["samples_per_prompt"]  # as written by a version without the setting
    (tmp_path / "run.json").write_text(json.dumps(run))
    train_head(tiny_pair, PROMPTS, identity, length_parity, SETTINGS, tmp_path, progress=False)
    with pytest.raises(UserInputError, match="samples_per_prompt: 1 there, 2 now"):
        train_head(tiny_pair, PROMPTS, identity, length_parity, replace(SETTINGS, samples_per_prompt=2), tmp_path, progress=False)


def test_group_training_logs_grouped_rewards(tiny_pair, tmp_path):
    settings = replace(SETTINGS, epochs=1, samples_per_prompt=3, baseline="group")
    train_head(tiny_pair, PROMPTS, identity, length_parity, settings, tmp_path, progress=False)
    rows = read_log(tmp_path)
    assert len(rows) == 2  # 4 prompts, 2 a step
    assert all(row["ended_with_eos"] <= 6 for row in rows)
    assert all(row["tokens"] > 12 for row in rows)  # 6 rollouts a step, not 2 (max 10 tokens each)


def test_batched_rollouts_sample_the_ensemble(tiny_pair):
    """Chi-square: first tokens of 4000 batched rollouts (one prompt repeated, so one distribution)
    follow v = w p + (1 - w) q with the head's w."""
    from scipy.stats import chisquare

    prompt = encode_prompt(tiny_pair, "hello there")
    head = EnsembleHead(HeadConfig(tiny_pair.signature()))
    torch.nn.init.normal_(head.linear.weight, std=0.1)
    rollouts = rollout_batch(tiny_pair, head, [prompt] * 4000, 1, SETTINGS.sampling, seeded_generator(1, "t", 0))
    (h_t, h_d), (p, q) = full_forward(tiny_pair, prompt, [0])
    w = head(h_d, h_t)[0]
    v = (w * p[0] + (1 - w) * q[0]).detach().double()
    v = v / v.sum()  # float32 rounding: chisquare wants totals that agree to 1e-8
    counts = torch.bincount(torch.tensor([r.tokens[0] for r in rollouts]), minlength=len(v)).double()
    support = v * 4000 >= 5
    observed = torch.cat([counts[support], counts[~support].sum().reshape(1)])
    expected = torch.cat([v[support], v[~support].sum().reshape(1)]) * 4000
    assert chisquare(observed, expected).pvalue > 1e-4


def test_acceptance_term_pushes_w_down_and_pg_term_follows_the_advantage(tiny_pair):
    """d loss / d w_t = [-A_b (p - q) / v - lam TV] / M: S is maximised (w down), L_pg raises log v(y)."""
    r = fixed_rollouts(tiny_pair, n=1)[0]
    head = EnsembleHead(HeadConfig(tiny_pair.signature()))
    terms = policy_loss(head, [r], torch.zeros(1), lam=1.0, normaliser=1.0)
    (grad_w,) = torch.autograd.grad(terms.loss, terms.weights)
    assert torch.allclose(grad_w, r.tv)  # positive: a descent step lowers every w_t in proportion to TV_t
    assert torch.allclose(terms.acceptance, (1 - 0.5 * r.tv).sum())
    terms = policy_loss(head, [r], torch.ones(1), lam=0.0, normaliser=1.0)
    (grad_w,) = torch.autograd.grad(terms.loss, terms.weights)
    v = 0.5 * (r.p_token + r.q_token)
    assert torch.allclose(grad_w, -(r.p_token - r.q_token) / v, atol=1e-6)


def one_minus_w_by_lambda(pair, out_dir, lams=(0.0, 10.0)) -> dict[float, float]:
    """Mean (1 - w) on fixed rollouts after one epoch at each lam (same init, seed and batches); heads in out_dir/lam*/head."""
    settings = replace(SETTINGS, epochs=1, lr=0.02)
    evaluation = fixed_rollouts(pair)
    one_minus_w = {}
    for lam in lams:
        head = train_head(pair, PROMPTS, identity, length_parity, replace(settings, lam=lam), out_dir / f"lam{lam}", progress=False)
        assert head.linear.weight.device == pair.device
        one_minus_w[lam] = 1 - mean_w(head, evaluation)
    return one_minus_w


def test_raising_lambda_lowers_w(tiny_pair, tmp_path):
    """Same init, seed and batches: a large lam ends with larger mean (1 - w) than lam = 0."""
    one_minus_w = one_minus_w_by_lambda(tiny_pair, tmp_path)
    assert one_minus_w[10.0] > one_minus_w[0.0] + 0.02, one_minus_w


# ----------------------------------------------------------------------------- baseline


def test_running_baseline_uses_past_batches_only():
    baseline = RewardBaseline("running", decay=0.9)
    first = torch.tensor([1.0, 0.0])
    assert baseline.current(first).tolist() == [0.5, 0.5]  # no history yet: the batch's own mean
    baseline.update(first)
    assert baseline.value == 0.5
    second = torch.tensor([1.0, 1.0])
    assert baseline.current(second).tolist() == [0.5, 0.5]  # not this batch's mean (1.0)
    baseline.update(second)
    assert baseline.value == pytest.approx(0.9 * 0.5 + 0.1 * 1.0)


def test_batch_baseline_centres_each_batch():
    baseline = RewardBaseline("batch")
    baseline.update(torch.tensor([5.0, 5.0]))
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert torch.all(baseline.current(rewards) == 0.25)
    assert float((rewards - baseline.current(rewards)).sum()) == 0.0


def test_group_baseline_is_the_mean_of_the_prompts_other_samples():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # two prompts, 4 samples each
    baseline = RewardBaseline("group").current(rewards, group_size=4)
    assert baseline.tolist() == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1 / 3, 1.0, 1.0, 1.0, 1.0])
    advantages = (rewards - baseline).reshape(2, 4)
    assert torch.allclose(advantages.sum(-1), torch.zeros(2), atol=1e-6)  # centred within each prompt
    assert torch.all(advantages[1] == 0)  # a prompt every sample solves teaches nothing about w


def test_training_log_records_the_running_baseline(tiny_pair, tmp_path):
    train_head(tiny_pair, PROMPTS, identity, length_parity, replace(SETTINGS, epochs=1, baseline_decay=0.5), tmp_path, progress=False)
    rows = read_log(tmp_path)
    assert [row["step"] for row in rows] == [1, 2]
    assert rows[1]["baseline"] == pytest.approx(rows[0]["reward"])  # step 2 sees only step 1's rewards
    for key in ("reward", "mean_w", "acceptance_proxy", "rollout_s", "update_s", "step_s", "loss", "estimated_bias"):
        assert key in rows[0]


# ----------------------------------------------------------------------------- frozen models


def test_language_models_are_frozen(tiny_pair, tmp_path):
    models = (tiny_pair.target, tiny_pair.draft)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    train_head(tiny_pair, PROMPTS, identity, length_parity, replace(SETTINGS, epochs=1, lam=1.0), tmp_path, progress=False)
    for model, saved in zip(models, before):
        for param in model.parameters():
            assert param.grad is None and not param.requires_grad
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    checkpoint = torch.load(checkpoint_paths(tmp_path)[-1], weights_only=True)
    optimised = checkpoint["optimizer"]["param_groups"][0]["params"]
    assert len(optimised) == 2  # the head's weight and bias, nothing else


# ----------------------------------------------------------------------------- checkpoints


def test_two_half_runs_equal_one_full_run(tiny_pair, tmp_path):
    settings = replace(SETTINGS, lam=0.5)  # 2 epochs x 2 steps
    full = train_head(tiny_pair, PROMPTS, identity, length_parity, settings, tmp_path / "full", progress=False)
    half = train_head(tiny_pair, PROMPTS, identity, length_parity, settings, tmp_path / "half", progress=False, stop_after=1)
    assert not (tmp_path / "half" / "head.json").exists()  # not finished yet
    assert not torch.equal(half.linear.weight, full.linear.weight)
    resumed = train_head(tiny_pair, PROMPTS, identity, length_parity, settings, tmp_path / "half", progress=False)
    for name, tensor in full.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    timing = {"rollout_s", "reward_s", "update_s", "step_s", "rollout_tokens_per_s"}
    strip = lambda rows: [{k: v for k, v in row.items() if k not in timing} for row in rows]  # noqa: E731
    assert strip(read_log(tmp_path / "half")) == strip(read_log(tmp_path / "full"))


def test_resume_refuses_other_settings(tiny_pair, tmp_path):
    train_head(tiny_pair, PROMPTS, identity, length_parity, SETTINGS, tmp_path, progress=False, stop_after=1)
    with pytest.raises(UserInputError, match="lam: 0.1 there, 0.3 now"):
        train_head(tiny_pair, PROMPTS, identity, length_parity, replace(SETTINGS, lam=0.3), tmp_path, progress=False)


def test_bad_settings_are_user_errors():
    for bad in ({"temperature": 0.0}, {"batch_size": 0}, {"lam": -1.0}, {"baseline": "median"}, {"samples_per_prompt": 0}, {"baseline": "group"}):
        with pytest.raises(UserInputError):
            TrainSettings(**bad)


# ----------------------------------------------------------------------------- learning direction


def preference_reward(pair, prefer_draft: bool):
    """Fraction of completion tokens the preferred model gives more probability than the other (teacher-forced)."""

    def reward(example: str, completion: str) -> float:
        prompt = encode_prompt(pair, example)
        tokens = pair.tokenizer(completion, add_special_tokens=False).input_ids
        if not tokens:
            return 0.5
        ids = torch.tensor([prompt + tokens])
        start = len(prompt) - 1
        chosen = []
        with torch.no_grad():
            for model in (pair.target, pair.draft):
                logits = model(input_ids=ids).logits[0, start : start + len(tokens), : pair.vocab_size]  # [T, V]
                probs = logits_to_probs(logits, SETTINGS.sampling)
                chosen.append(probs.gather(-1, torch.tensor(tokens).unsqueeze(-1)).squeeze(-1))  # [T]
        p_y, q_y = chosen
        return float(((q_y > p_y) if prefer_draft else (p_y > q_y)).float().mean())

    return reward


@pytest.mark.parametrize("prefer_draft", [True, False], ids=["reward-favours-draft", "reward-favours-target"])
def test_training_moves_w_towards_the_rewarded_model(tiny_pair, tmp_path, prefer_draft):
    settings = replace(SETTINGS, prompts=8, epochs=2, batch_size=4, max_new_tokens=16, lam=0.0, lr=0.05)
    head = train_head(tiny_pair, PROMPTS, identity, preference_reward(tiny_pair, prefer_draft), settings, tmp_path, progress=False)
    w = mean_w(head, fixed_rollouts(tiny_pair))
    if prefer_draft:
        assert w < 0.45, w
    else:
        assert w > 0.55, w


# ----------------------------------------------------------------------------- the saved head


def test_saved_head_loads_and_generates(tiny_pair, tmp_path):
    train_head(tiny_pair, PROMPTS, identity, length_parity, replace(SETTINGS, epochs=1), tmp_path, progress=False)
    path = tmp_path / "head"
    head = load_head(path, tiny_pair.signature())
    assert head.config.extra["task"] == "tiny"
    assert head.config.extra["training"]["lam"] == SETTINGS.lam and head.config.extra["training"]["steps"] == 2
    assert "git_commit" in head.config.extra
    result = generate(tiny_pair, "hello", MethodSpec("diversed", head=str(path)), GenerationConfig(max_new_tokens=8, seed=0))
    assert result.method == f"diversed:{path}" and result.metrics.drafted > 0


# ----------------------------------------------------------------------------- command line


def test_cli_trains_on_gsm8k(capsys, tiny_model_dirs, tmp_path):
    if not (SHARED_DATA / "gsm8k_train.jsonl").is_file():
        pytest.skip("needs ../shared/data/gsm8k_train.jsonl")
    target, draft = tiny_model_dirs
    argv = ["train", "--task", "gsm8k", "--data-dir", str(SHARED_DATA), "--target", str(target), "--draft", str(draft),
            "--dtype", "float32", "--prompts", "2", "--batch-size", "2", "--epochs", "1", "--max-new-tokens", "4", "--out", str(tmp_path)]
    assert main(argv) == 0
    _, err = capsys.readouterr()
    assert "head saved to" in err
    assert load_head(tmp_path / "head").config.extra["task"] == "gsm8k"


@pytest.mark.parametrize(
    "extra, message",
    [(["--task", "humaneval"], "no train split"), (["--task", "gsm8k", "--temperature", "0"], "temperature must be > 0")],
)
def test_cli_user_errors_are_one_line(capsys, tmp_path, extra, message):
    code = main(["train", *extra, "--out", str(tmp_path)])
    _, err = capsys.readouterr()
    assert code == 2 and err.strip().startswith("error: ") and message in err and "Traceback" not in err
