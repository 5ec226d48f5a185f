"""Incremental detokenization (issue #18: replace hand-written pieces where a well-kept library
does the job), token by token over the demo tasks' answers on SmolLM2's tokenizer (plus text with
multi-byte characters, which byte-level BPE splits across tokens), measured in the same run:

- "offsets": vLLM's prefix/read offsets (`detokenize_incrementally`), which decode a window of
  ids per token; the engine's detokenizer ran this until it moved to DecodeStream. Kept here,
  and only here, as the baseline.
- "DecodeStream": `tokenizers`' own incremental decoder, bare.
- "IncrementalDetokenizer": the engine's (DecodeStream plus stop-string holdback; no stop here).

Each is checked against decoding the whole output at once; time per token, mean and p99 over
every token of every answer.

    python load_tests/bench_detokenizer.py        # ~30 s on 2 cores
Writes load_tests/results/detokenizer_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
UNICODE_TEXTS = ("Grüße aus Zürich: 東京は晴れ、気温は２５度です。😀👍 Ça va très bien, merci ! ",
                 "Ελληνικά και русский текст, emoji 🚀🎉 and math: ∑ x² ≤ ∞.")


def answers() -> list[str]:
    from inlaid_ray.demo.data import load_examples
    from inlaid_ray.demo.manifest import DEMO_CLUSTERS

    texts = [m["content"] for names in DEMO_CLUSTERS.values() for name in names
             for r in load_examples(name, "eval")[:50] for m in r["messages"] if m["role"] == "assistant"]
    return texts + [t * 4 for t in UNICODE_TEXTS]


def per_token_times(step, ids: list[int]) -> tuple[str, list[float]]:
    out, times = [], []
    for token in ids:
        start = time.perf_counter()
        piece = step(token)
        times.append(time.perf_counter() - start)
        if piece:
            out.append(piece)
    return "".join(out), times


class OffsetsDetokenizer:
    """vLLM's prefix/read-offset detokenization (the baseline): decode the ids since the last
    complete character, with the ids before them as left context, and keep the new suffix."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.prefix_offset, self.read_offset = tokenizer, [], 0, 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) if ids else ""

    def step(self, token: int) -> str:
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS)
    a = parser.parse_args()
    from tokenizers.decoders import DecodeStream

    from inlaid_ray.config import Settings
    from inlaid_ray.engine.detokenizer import IncrementalDetokenizer
    from inlaid_ray.model import load_tokenizer
    from inlaid_ray.model.prepare import prepare_smollm2

    tokenizer = load_tokenizer(prepare_smollm2(Settings.from_env().cache_dir))
    texts = answers()
    times: dict[str, list[float]] = {"offsets": [], "DecodeStream": [], "IncrementalDetokenizer": []}
    mismatches = {k: 0 for k in times}
    tokens = 0
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        tokens += len(ids)
        whole = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        offsets = OffsetsDetokenizer(tokenizer)
        text_offsets, t_offsets = per_token_times(offsets.step, ids)
        times["offsets"] += t_offsets
        mismatches["offsets"] += text_offsets != whole
        ours = IncrementalDetokenizer(tokenizer, prompt_token_ids=(), stop=())
        text_ours, t_ours = per_token_times(lambda t: ours.update([t])[0], ids)
        text_ours += ours.update([], final=True)[0]
        stream = DecodeStream(skip_special_tokens=True)
        text_lib, t_lib = per_token_times(lambda t: stream.step(tokenizer._tokenizer, t), ids)
        times["IncrementalDetokenizer"] += t_ours
        times["DecodeStream"] += t_lib
        mismatches["IncrementalDetokenizer"] += text_ours != whole
        mismatches["DecodeStream"] += text_lib != whole

    def summary(v: list[float]) -> dict[str, float]:
        us = np.asarray(v) * 1e6
        return {"mean_us": round(float(us.mean()), 2), "p50_us": round(float(np.percentile(us, 50)), 2),
                "p99_us": round(float(np.percentile(us, 99)), 2), "max_us": round(float(us.max()), 2)}

    result: dict[str, Any] = {
        "config": {"texts": len(texts), "tokens": tokens, "machine": {"cpus": 2, "platform": platform.platform()}},
        "per_token": {k: summary(v) for k, v in times.items()},
        "texts_differing_from_whole_decode": mismatches,
    }
    ratio = result["per_token"]["IncrementalDetokenizer"]["mean_us"] / result["per_token"]["offsets"]["mean_us"]
    result["ours_over_offsets_mean"] = round(ratio, 3)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "detokenizer_cpu.json").write_text(json.dumps(result, indent=1))
    for k, v in result["per_token"].items():
        print(f"{k:24s} mean {v['mean_us']:.1f} us, p99 {v['p99_us']:.1f} us per token; "
              f"{mismatches[k]} of {len(texts)} texts differ from the whole decode")
    print(f"IncrementalDetokenizer / offsets (mean per token): {ratio:.2f}x; wrote {a.out / 'detokenizer_cpu.json'}")


if __name__ == "__main__":
    main()
