"""Scrape a live 2-rank training run over HTTP, rank by rank, while it trains.

The run is plain torchrun (the session fixture ``reference_run``, shared with the fault-tolerance
test); ``tests/deploy/test_torchx.py::test_local_cwd_two_rank_training`` covers the same through
``torchx run -s local_cwd`` with merged scrapes. Here each endpoint is checked on its own: rank r
answers on base + r with ``rank="r"`` series only, its examples counter grows between scrapes while
training, and rank 0 (only) exports the global validation AUC after the first evaluation.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

import pytest

from deploy.render_dashboard import parse_scrape, render

pytestmark = [pytest.mark.slow, pytest.mark.ops]

EXAMPLES = "tailrec_train_examples_total"
AUC_ALL = ("tailrec_eval_auc", frozenset({("rank", "0"), ("split", "valid"), ("bucket", "all")}))


def _value(sample: dict, name: str, rank: int) -> float | None:
    return sample.get((name, frozenset({("rank", str(rank))})))


def test_both_ranks_scraped_live(reference_run, tmp_path):
    job = reference_run
    per_rank = defaultdict(list)   # rank -> [(timestamp, parsed sample)]
    for ts, rank, text in job.scrapes:
        per_rank[rank].append((ts, parse_scrape(text)))
    assert set(per_rank) == {0, 1}, f"scraped ranks: {sorted(per_rank)}"
    for rank, samples in per_rank.items():
        labels = {dict(lbl).get("rank") for s in (x for _, x in samples) for (_, lbl) in s}
        assert labels == {str(rank)}, f"port base+{rank} served series of ranks {labels}"
        examples = [v for _, s in samples if (v := _value(s, EXAMPLES, rank)) is not None]
        growing = [b > a for a, b in zip(examples, examples[1:])]
        # counters never go back, and grow between scrapes taken while the rank trains
        assert all(b >= a for a, b in zip(examples, examples[1:])), examples
        assert sum(growing) >= 2, f"rank {rank}: examples counter over scrapes {examples}"
        assert examples[-1] <= 2 * 39 * 128 and examples[-1] % 128 == 0
    # global eval metrics: on rank 0 after the first evaluation, never on rank 1
    aucs = [s[AUC_ALL] for _, s in per_rank[0] if AUC_ALL in s]
    assert aucs and 0.5 < aucs[-1] <= 1.0, "rank 0 exports tailrec_eval_auc{split=valid,bucket=all}"
    assert not any(name == "tailrec_eval_auc" for _, s in per_rank[1] for (name, _) in s)

    _save_report(job, per_rank, tmp_path)


def _save_report(job, per_rank, tmp_path: Path) -> None:
    """With TAILREC_OPS_REPORT=DIR: a few scraped lines per rank, the JSONL scrapes, the dashboard."""
    from_env = os.environ.get("TAILREC_OPS_REPORT")
    if not from_env:
        return
    out = Path(from_env)
    out.mkdir(parents=True, exist_ok=True)
    wanted = re.compile(r"^(tailrec_(train_examples_total|train_steps_total|train_loss|dataloader_wait_seconds_total"
                        r"|train_step_duration_seconds_(count|sum)|eval_auc\{.*bucket=\"all\"|restarts"
                        r"|process_resident_memory_bytes|checkpoint_last_success|embedding_learning_rate"
                        r"|cfsgd_row_frequency|lexico_lambda\{.*percentile=\"p50\")).*")
    lines = ["# Live scrapes of a real 2-rank torchrun job (gloo, CPU), made by tests/deploy/test_live_scrape.py",
             f"# urls: {' '.join(job.urls)}", ""]
    for rank in (0, 1):
        # two scrapes per rank: one mid-training, and the last one (after evaluation for rank 0)
        texts = [t for _, r, t in job.scrapes if r == rank]
        mid = next((t for t in texts if re.search(r"^tailrec_train_examples_total\S* [1-9]", t, re.M)), texts[0])
        for label, text in (("mid-training", mid), ("last", texts[-1])):
            ts = next(ts for ts, r, t in job.scrapes if r == rank and t is text)
            lines.append(f"## GET {job.urls[rank]}  ({label}, t={ts:.1f})")
            lines += [ln for ln in text.splitlines() if wanted.match(ln)]
            lines.append("")
    (out / "live_scrape_2ranks.txt").write_text("\n".join(lines) + "\n")
    jsonl = job.scrapes_jsonl(out / "scrapes_2ranks.jsonl")
    render(str(jsonl), out / "dashboard.png")
