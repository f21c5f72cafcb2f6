"""The claims benchmark's arms are comparable: equal token budgets and identical hyperparameters but the loss terms."""

import sys

import pytest
from conftest import ROOT


sys.path.insert(0, str(ROOT / "benchmarks"))
import claims  # noqa: E402


LOSS_FIELDS = {"kd_loss_weight", "ce_loss_weight", "intermediate_layer_mapping"}
RUN_FIELDS = {"output_dir", "logging_dir", "run_name"}


def test_retraining_arms_differ_only_in_their_loss_terms(tmp_path):
    budget = claims.Budget.scaled(0.1)
    configs = {
        name: claims.retraining_config(budget, str(tmp_path / name), **loss) for name, loss in claims.LOSSES.items()
    }
    reference = {k: v for k, v in configs["kd"].to_dict().items() if k not in LOSS_FIELDS | RUN_FIELDS}
    for name, config in configs.items():
        rest = {k: v for k, v in config.to_dict().items() if k not in LOSS_FIELDS | RUN_FIELDS}
        assert rest == reference, name
        # Same steps x batch: every arm trains on the same number of tokens.
        assert config.max_steps * config.per_device_train_batch_size == budget.steps * budget.batch_size
    assert configs["ce"].kd_loss_weight == 0 and configs["ce"].ce_loss_weight == 1
    assert configs["kd+is"].intermediate_layer_mapping


def test_scale_multiplies_the_budget_and_explicit_values_win():
    base, big = claims.Budget(), claims.Budget.scaled(4)
    assert big.steps == 4 * base.steps and big.calibration_samples == 4 * base.calibration_samples
    assert big.tokens == 4 * base.tokens
    assert claims.Budget.scaled(4, steps=7).steps == 7
    assert claims.Budget.scaled(0.01).steps >= 2  # never fewer than two steps
    assert claims.Budget(steps=30, eval_points=5).eval_steps == [6, 12, 18, 24, 30]
    with pytest.raises(ValueError, match="--scale"):
        claims.Budget.scaled(0)


def test_claims_subset_is_validated():
    assert claims.parse_claims("c, a,c") == ["a", "c"]
    with pytest.raises(SystemExit, match="expected comma-separated letters"):
        claims.parse_claims("a,z")


def test_report_says_when_a_claim_did_not_hold():
    arm = {"before": 5.0, "after": 4.0, "parameters": 10, "curve": [[0, 5.0], [2, 4.0]]}
    results = {
        "budget": claims.asdict(claims.Budget()),
        "setup": {"teacher_parameters": 100, "teacher_loss": 3.0, "validation_samples": 4, "machine": "test"},
        "claims": {
            "c": {
                "title": "T",
                "expected": "E",
                "numbers": "kd 4.000",
                "held": False,
                "verdict": "not held",
                "arms": {"kd": arm},
                "comparisons": [
                    {"lower": "kd", "higher": "ce", "key": "after", "delta": -0.5, "noise": 0.1, "outcome": "not held"}
                ],
            },
            "i": {"status": "not run", "title": "Search", "reason": "search.py is not committed yet"},
        },
        "wall_seconds_all_claims": 1.0,
    }
    text = claims.render_markdown(results)
    assert "**c. T** — not held (expected: E): kd 4.000." in text
    assert "| kd | 10 | 5.000 | 4.000 " in text and "| **not held** |" in text
    assert "| c | " in text and "| kd | ce | after | -0.500 | 0.100 | not held |" in text
    assert "not run: search.py is not committed yet" in text
