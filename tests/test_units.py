"""The unit runner: shared, separate-per-CFG-side and take-over modes, and its checks."""

from __future__ import annotations

import pytest

from diffusmith import BasePipeline, PipelineUnit
from diffusmith.pipelines.base import run_unit


class Double(PipelineUnit):
    def __init__(self):
        super().__init__(input_params=("x",), output_params=("y",))

    def process(self, pipe, x):
        return {"y": 2 * x}


class Shout(PipelineUnit):
    def __init__(self):
        super().__init__(input_params=("suffix",), input_params_posi={"text": "prompt"},
                         input_params_nega={"text": "negative_prompt"}, output_params=("emb",))

    def process(self, pipe, text, suffix):
        return {"emb": text.upper() + suffix}


class Swap(PipelineUnit):
    def __init__(self):
        super().__init__(take_over=True)

    def process(self, pipe, inputs_shared, inputs_posi, inputs_nega):
        return inputs_shared, inputs_nega, inputs_posi


def test_shared_mode():
    shared, posi, nega = run_unit(BasePipeline(), Double(), {"x": 3}, {}, {}, cfg=True)
    assert shared == {"x": 3, "y": 6} and posi == {} and nega == {}


@pytest.mark.parametrize("cfg", [True, False])
def test_separate_cfg_mode_runs_each_side(cfg):
    shared, posi, nega = run_unit(BasePipeline(), Shout(), {"suffix": "!"}, {"prompt": "cat"},
                                  {"negative_prompt": "dog"}, cfg=cfg)
    assert posi["emb"] == "CAT!"
    assert nega.get("emb") == ("DOG!" if cfg else None)
    assert "emb" not in shared


def test_take_over_mode():
    shared, posi, nega = run_unit(BasePipeline(), Swap(), {}, {"a": 1}, {"b": 2}, cfg=True)
    assert posi == {"b": 2} and nega == {"a": 1}


def test_missing_input_is_named():
    with pytest.raises(KeyError, match="Double reads x"):
        run_unit(BasePipeline(), Double(), {}, {}, {}, cfg=False)


def test_undeclared_output_is_refused():
    class Sloppy(Double):
        def process(self, pipe, x):
            return {"y": x, "z": x}

    with pytest.raises(KeyError, match="undeclared output"):
        run_unit(BasePipeline(), Sloppy(), {"x": 1}, {}, {}, cfg=False)


def test_pipeline_runs_units_in_order():
    pipe = BasePipeline()
    pipe.units = [Double(), Shout()]
    shared, posi, nega = pipe.run_units({"x": 1, "suffix": "?"}, {"prompt": "a"}, {"negative_prompt": "b"},
                                        cfg=False)
    assert shared["y"] == 2 and posi["emb"] == "A?" and "emb" not in nega
