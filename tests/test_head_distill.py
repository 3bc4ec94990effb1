"""benchmarks/distill_head.py: a standardised logistic regression folded into an EnsembleHead gives
the regression's own probabilities through `EnsembleHead.forward`, and survives save/load."""

from __future__ import annotations

import numpy as np
import torch

from .conftest import import_benchmark


def test_folded_logistic_regression_is_the_same_function(tiny_pair, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from diversed.head import HeadConfig, load_head

    distill_head = import_benchmark("distill_head")
    signature = tiny_pair.signature()
    n_draft, n_target = signature.draft_hidden_size, signature.target_hidden_size
    rng = np.random.default_rng(0)
    # Features on different scales and offsets, so the standardisation matters in the folding.
    x = (rng.normal(size=(400, n_draft + n_target)) * rng.uniform(0.1, 5, n_draft + n_target) + rng.normal(0, 3, n_draft + n_target)).astype(np.float32)
    y = (x[:, 0] - 0.5 * x[:, -1] + rng.normal(size=400) > np.median(x[:, 0] - 0.5 * x[:, -1])).astype(int)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=1000)).fit(x, y)
    scaler, logreg = model.named_steps["standardscaler"], model.named_steps["logisticregression"]

    head = distill_head.fold_logistic(scaler.mean_, scaler.scale_, logreg.coef_, float(logreg.intercept_[0]), HeadConfig(signature, {"task": "test"}))
    expected = model.predict_proba(x)[:, 1]
    assert 0.05 < expected.std()  # the fitted function does vary, so the comparison means something
    with torch.no_grad():
        w = head(torch.from_numpy(x[:, :n_draft]), torch.from_numpy(x[:, n_draft:])).numpy()
    np.testing.assert_allclose(w, expected, atol=1e-5)

    head.save(tmp_path / "distilled")
    reloaded = load_head(tmp_path / "distilled", signature)
    with torch.no_grad():
        again = reloaded(torch.from_numpy(x[:, :n_draft]), torch.from_numpy(x[:, n_draft:])).numpy()
    np.testing.assert_array_equal(again, w)
