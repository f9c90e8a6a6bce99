"""The model code on the real credit-risk sets (``make setup`` unpacks them into data/deb)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.risk.credit import CreditDataUnavailable, evaluate, load_credit, modeldata_dir
from services.risk.train import TrainConfig


@pytest.fixture(scope="module")
def folder() -> Path:
    try:
        return modeldata_dir()
    except CreditDataUnavailable as exc:
        pytest.fail(str(exc))


def test_reads_r_lazy_load_database(folder: Path) -> None:
    lending = load_credit("lending_club", folder)
    assert lending.shape == (9857, 23)
    assert (lending["Class"].astype(str) == "bad").sum() == 517
    credit = load_credit("credit_data", folder)
    assert credit.shape == (4454, 14)
    assert set(credit["Status"].astype(str)) == {"good", "bad"}


def test_model_code_on_real_labels(folder: Path) -> None:
    result = evaluate("credit_data", TrainConfig(trees=60, threads=1, progress=False), folder)
    assert result["auc"] > 0.75 and result["baseline_auc"] > 0.7
    assert 0 < result["test_fpr_at_threshold"] < 0.15  # threshold chosen on validation for 5%
    assert result["split"].startswith("stratified random")
