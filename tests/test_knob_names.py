"""One name per knob: the trainer arguments' names work everywhere a knob is set; the old spellings and training
knobs in adapter configs keep working for one release with a FutureWarning that names the new place."""

from __future__ import annotations

import inspect
import warnings

import pytest

import regtune
from regtune.regularizers import GLADRegularizer, GradientDropout, MaskScorePenalty


def _no_warning(build):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        return build()


def test_trainer_argument_names_are_the_regularizers_names():
    glad_args = {"glad_rho", "glad_lambda", "glad_share_dropout_masks"}
    assert glad_args <= {f.name for f in regtune.GLADTrainingArguments.__dataclass_fields__.values()}
    assert glad_args <= set(inspect.signature(GLADRegularizer).parameters)
    mask_args = {"score_l2_weight", "graddrop_lambda", "graddrop_temperature"}
    assert mask_args <= set(regtune.MaskTuningTrainingArguments.__dataclass_fields__)
    assert mask_args <= set(inspect.signature(MaskScorePenalty).parameters) | set(
        inspect.signature(GradientDropout).parameters
    )
    reg = _no_warning(lambda: GLADRegularizer(glad_rho=0.3, glad_lambda=0.2, glad_share_dropout_masks=False))
    assert (reg.glad_rho, reg.glad_lambda, reg.glad_share_dropout_masks) == (0.3, 0.2, False)
    assert _no_warning(lambda: MaskScorePenalty(score_l2_weight=1e-3)).score_l2_weight == 1e-3
    assert _no_warning(lambda: GradientDropout(0.3, graddrop_temperature=2.0)).graddrop_temperature == 2.0
    _no_warning(lambda: regtune.GLADConfig(r=4))  # defaults: nothing to warn about
    _no_warning(lambda: regtune.MaskTuningConfig())


@pytest.mark.parametrize(
    "old, new, match",
    [
        (lambda: GLADRegularizer(rho=0.3), lambda: GLADRegularizer(glad_rho=0.3), r"GLADRegularizer\(rho=\.\.\.\)"),
        (
            lambda: GLADRegularizer(share_dropout_masks=False),
            lambda: GLADRegularizer(glad_share_dropout_masks=False),
            "glad_share_dropout_masks",
        ),
        (lambda: MaskScorePenalty(weight=1e-3), lambda: MaskScorePenalty(1e-3), r"score_l2_weight=\.\.\."),
        (
            lambda: GradientDropout(temperature=2.0),
            lambda: GradientDropout(graddrop_temperature=2.0),
            "graddrop_temperature",
        ),
    ],
)
def test_old_spellings_warn_and_mean_the_same(old, new, match):
    with pytest.warns(FutureWarning, match=match):
        before = old()
    after = _no_warning(new)
    assert vars(before).keys() == vars(after).keys()
    for key, value in vars(after).items():
        if not key.startswith("_"):
            assert vars(before)[key] == value, key


def test_both_spellings_at_once_is_an_error():
    with pytest.raises(ValueError, match="`rho` is the deprecated spelling of `glad_rho`"):
        GLADRegularizer(glad_rho=0.1, rho=0.2)


def test_training_knobs_in_adapter_configs_warn_and_still_apply(tmp_path):
    with pytest.warns(FutureWarning, match=r"`rho` -> GLADTrainingArguments\(glad_rho=\)"):
        config = regtune.GLADConfig(r=4, rho=0.2, target_modules=["lin0"])
    assert config.glad_settings.rho == 0.2  # still the default the trainer takes, for one release
    with pytest.warns(FutureWarning, match=r"`graddrop_lambda` -> MaskTuningTrainingArguments\(graddrop_lambda=\)"):
        regtune.MaskTuningConfig(graddrop_lambda=0.3)
