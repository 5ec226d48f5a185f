"""Bad inputs to the MLGPTQ driver fail fast with errors naming the offending value, before any
statistics or checkpoint are written: missing or empty calibration file, an adapter made for
another base, unsupported bits, a group size that does not divide an input dim, bad task specs."""

from __future__ import annotations

import argparse

import pytest

from inlaid_ray.errors import AdapterError, InvalidRequest
from inlaid_ray.quant.calibration import CalibrationConfig
from inlaid_ray.quant.cli import add_quantize_parser
from inlaid_ray.quant.incremental import TaskSource, quantize_base
from inlaid_ray.quant.mlgptq import MLGPTQConfig
from inlaid_ray.quant.quantizer import QuantGrid
from test_mlgptq_setup import GROUP_SIZE, make_peft_adapter, make_task_sources, write_tiny_base

CFG = MLGPTQConfig(grid=QuantGrid(bits=4, group_size=GROUP_SIZE), batch_tokens=96)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    base = write_tiny_base(root / "base")
    return root, base, make_task_sources(root, base, names=("qv",))


def _run(base, sources, tmp_path, cfg=CFG):
    quantize_base(base, sources, tmp_path / "out", cfg, CalibrationConfig(), tmp_path / "stats", progress=False)


def _nothing_written(tmp_path):
    assert not (tmp_path / "out").exists() and not (tmp_path / "stats").exists()


def test_missing_calibration_file(setup, tmp_path):
    _, base, (src,) = setup
    with pytest.raises(InvalidRequest, match=r"calibration file .*missing\.jsonl does not exist"):
        _run(base, [TaskSource("qv", src.adapter_dir, tmp_path / "missing.jsonl")], tmp_path)
    _nothing_written(tmp_path)


def test_empty_calibration_file(setup, tmp_path):
    _, base, (src,) = setup
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(InvalidRequest, match=r"empty\.jsonl is empty"):
        _run(base, [TaskSource("qv", src.adapter_dir, empty)], tmp_path)
    _nothing_written(tmp_path)


def test_adapter_for_another_base(setup, tmp_path):
    root, base, (src,) = setup
    other = write_tiny_base(tmp_path / "other", hidden_size=32, intermediate_size=48)
    adapter = make_peft_adapter(other, tmp_path / "other_adapter", 4, 8, ["q_proj"], seed=0)
    with pytest.raises(AdapterError, match=r"q_proj: lora_A \(4, 32\) .* expected \[r, 64\]"):
        _run(base, [TaskSource("qv", adapter, src.calibration)], tmp_path)
    _nothing_written(tmp_path)


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match=rf"bits={bits} is not supported; expected one of \(2, 3, 4, 8\)"):
        MLGPTQConfig(grid=QuantGrid(bits=bits))
    parser = argparse.ArgumentParser()
    add_quantize_parser(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["quantize", "--out", "x", "--bits", str(bits)])


def test_group_size_not_dividing_the_input_dim(setup, tmp_path):
    _, base, sources = setup
    cfg = MLGPTQConfig(grid=QuantGrid(bits=4, group_size=48))
    with pytest.raises(ValueError, match=r"group_size=48 does not divide the input dim d_in=64 of q_proj"):
        _run(base, sources, tmp_path, cfg)
    _nothing_written(tmp_path)


def test_bad_task_specs_and_duplicates(setup, tmp_path):
    _, base, (src,) = setup
    for spec in ("no_equals.jsonl", "name=adapter_without_calib", "=a:b.jsonl", "../x=a:b.jsonl"):
        with pytest.raises(ValueError, match="task"):
            TaskSource.parse(spec)
    with pytest.raises(InvalidRequest, match=r"task names must be unique, got \['qv', 'qv'\]"):
        _run(base, [src, src], tmp_path)
    with pytest.raises(ValueError, match="method='gptq'"):
        MLGPTQConfig(method="gptq")  # type: ignore[arg-type]
