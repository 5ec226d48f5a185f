"""`inlaid-ray compress` (inlaid_ray.compress.cli): PEFT adapters with different ranks and
target modules become a loadable cluster bank whose reconstructions have exactly the errors
the command reports, zero where an adapter adapts nothing, with the byte counts of the bank;
bad inputs stop with one clear error."""

from __future__ import annotations

import argparse
import json

import pytest

from inlaid_ray.config import Settings
from inlaid_ray.errors import AdapterError
from inlaid_ray.lora import LoRAAdapter, save_peft_adapter
from inlaid_ray.lora.cluster_bank import bank_size_report, load_cluster_banks
from inlaid_ray.compress.cli import add_compress_parser
from inlaid_ray.lora.synthetic import random_lora_adapter
from inlaid_ray.model.config import LINEAR_MODULES, ModelConfig


# name -> (rank, target modules)
ADAPTERS = {"qv": (2, ("q_proj", "v_proj")), "all_a": (3, LINEAR_MODULES), "all_b": (4, LINEAR_MODULES)}


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory) -> dict[str, tuple[object, LoRAAdapter]]:
    config = ModelConfig.from_dir(tiny_llama_dir)
    out = {}
    for seed, (name, (rank, modules)) in enumerate(ADAPTERS.items()):
        adapter = random_lora_adapter(config, name, rank, modules, seed, scale=2.0 / rank)
        d = tmp_path_factory.mktemp(name)
        save_peft_adapter(adapter, d)
        out[name] = (d, adapter)
    return out


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_compress_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compress", *argv])
    return args.func(args, Settings())


def test_writes_bank_with_the_reported_errors_and_sizes(tiny_llama_dir, adapter_dirs, tmp_path, capsys):
    specs = [f"{name}={d}" for name, (d, _) in adapter_dirs.items()]
    out, report = tmp_path / "bank", tmp_path / "report.json"
    rc = run_cli(["--base", str(tiny_llama_dir), "--adapters", *specs, "--rank", "4", "--clusters", "2",
                  "--out", str(out), "--report", str(report), "--threads", "1", "--max-iters", "20"])
    assert rc == 0
    config = ModelConfig.from_dir(tiny_llama_dir)
    banks = load_cluster_banks(out, model_config=config)
    rep = json.loads(report.read_text())
    printed = capsys.readouterr().out
    assert sorted(banks.adapters) == sorted(ADAPTERS) and rep["num_clusters"] == len(banks.clusters) == 2
    for name, (_, adapter) in adapter_dirs.items():
        errors = []
        for key in banks.module_keys:
            recon = banks.delta(name, key)
            if key not in adapter.weights:
                assert not recon.any(), f"{name} {key}: padded module must stay exactly zero"
                continue
            dense = adapter.delta_weight(*key)
            errors.append(float(((recon - dense).norm() / dense.norm()) ** 2))
        got = rep["adapters"][name]
        assert got["error"] == pytest.approx(sum(errors) / len(errors), rel=1e-3, abs=1e-6)
        assert got["max_module_error"] == pytest.approx(max(errors), rel=1e-3, abs=1e-6)
        assert got["modules"] == len(adapter.weights) and f"error {got['error']:.3e}" in printed
    size = bank_size_report(banks)
    assert rep["size"]["compressed_bytes"] == size["compressed_bytes"]
    raw_params = sum(f.a.numel() + f.b.numel() for _, a in adapter_dirs.values() for f in a.weights.values())
    assert size["raw_params"] == raw_params and f"{raw_params * 4:,} bytes" in printed
    assert f"{size['compressed_bytes']:,} bytes" in printed


def test_bad_inputs_stop_with_a_clear_error(tiny_llama_dir, adapter_dirs, tmp_path):
    dirs = {name: f"{name}={d}" for name, (d, _) in adapter_dirs.items()}
    base = ["--base", str(tiny_llama_dir), "--threads", "1"]
    with pytest.raises(AdapterError, match=r"rank 40 exceeds min\(d_in, d_out\)"):
        run_cli([*base, "--adapters", *dirs.values(), "--rank", "40", "--clusters", "1", "--out", str(tmp_path / "a")])
    with pytest.raises(AdapterError, match="'qv' does not adapt .*missing_modules='zero' pads"):
        run_cli([*base, "--adapters", *dirs.values(), "--rank", "2", "--clusters", "1", "--missing-modules", "error",
                 "--out", str(tmp_path / "b")])
    with pytest.raises(AdapterError, match="num_clusters 4 exceeds the number of adapters 3"):
        run_cli([*base, "--adapters", *dirs.values(), "--rank", "2", "--clusters", "4", "--out", str(tmp_path / "c")])
    with pytest.raises(SystemExit, match="given twice"):
        run_cli([*base, "--adapters", f"x={adapter_dirs['qv'][0]}", f"x={adapter_dirs['all_a'][0]}", "--rank", "2", "--out", str(tmp_path / "d")])
    (tmp_path / "exists").mkdir()
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        run_cli([*base, "--adapters", dirs["qv"], "--rank", "2", "--out", str(tmp_path / "exists")])
    with pytest.raises(SystemExit):  # argparse: no adapters, or a bad cluster count
        run_cli([*base, "--adapters", "--rank", "2", "--out", str(tmp_path / "e")])
    with pytest.raises(SystemExit):
        run_cli([*base, "--adapters", dirs["qv"], "--rank", "2", "--clusters", "0", "--out", str(tmp_path / "f")])
    assert not any((tmp_path / n).exists() for n in "abcdef")
