"""Which rare movies the selective target domain T'_eta keeps, on a generated world with planted twins
and loners (docs/ALGORITHMS.md §5). Prints, per eta quantile, the share of twins, loners and the other
target ids kept, how well the score separates twins from the rest, and how often a twin's co-occurrence
neighbor is its planted parent.

    python reports/quality/selective_domain_demo.py --data runs/demo/dataset --planted runs/demo/raw/planted.json
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow.parquet as pq
from sklearn.metrics import roc_auc_score

from data.selective import selective_target_domain


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="converted dataset (tailrec convert output)")
    p.add_argument("--planted", required=True, help="planted.json written by the generator")
    p.add_argument("--feature", default="movie_id")
    p.add_argument("--source-frac", type=float, default=0.2)
    p.add_argument("--quantiles", default="0.2,0.5,0.8")
    a = p.parse_args()

    planted = json.load(open(a.planted))
    vocab = pq.read_table(f"{a.data}/vocab/{a.feature}.parquet", columns=["id", "value"]).to_pydict()
    index = {v: i for i, v in zip(vocab["id"], vocab["value"])}
    parent = {index[str(t)]: index[str(p)] for t, p in planted["twins"] if str(t) in index and str(p) in index}
    loners = {index[str(m)] for m in planted["loners"] if str(m) in index}

    dom = selective_target_domain(a.data, a.feature, a.source_frac, 0.2)
    tgt, scores, nbr = dom.target_ids, dom.scores, dom.neighbors
    group = np.array(["twin" if i in parent else "loner" if i in loners else "other" for i in tgt])
    print(f"{len(tgt)} target ids (source_frac {a.source_frac}): "
          + ", ".join(f"{g} {int((group == g).sum())}" for g in ("twin", "loner", "other")))
    print("median score: " + ", ".join(f"{g} {np.median(scores[group == g]):.3f}" for g in ("twin", "loner", "other")))
    print(f"AUC of the score, twins vs the other targets: {roc_auc_score(group == 'twin', scores):.3f}")
    twin_rows = np.flatnonzero(group == "twin")
    print(f"twins whose neighbor is their parent: {np.mean([nbr[r] == parent[tgt[r]] for r in twin_rows]):.2f}")
    print("\n| eta_quantile | eta | twins kept | loners kept | other targets kept |\n|---|---:|---:|---:|---:|")
    for q in (float(x) for x in a.quantiles.split(",")):
        eta = float(np.quantile(scores, q))
        kept = {g: float((scores[group == g] >= eta).mean()) for g in ("twin", "loner", "other")}
        print(f"| {q:g} | {eta:.3f} | {kept['twin']:.2f} | {kept['loner']:.2f} | {kept['other']:.2f} |")


if __name__ == "__main__":
    main()
