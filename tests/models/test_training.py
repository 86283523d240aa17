"""Tiny end-to-end learning check: DeepFM learns a planted rule on CPU in a few seconds."""
from __future__ import annotations

import torch
from sklearn.metrics import roc_auc_score
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import models

KEYS = ["item", "noise1", "noise2"]
N_IDS = 40


def _batch(g: torch.Generator, batch: int) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    """One id per field; label = parity of the item id (noise fields carry no signal)."""
    ids = torch.randint(0, N_IDS, (len(KEYS), batch), generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=KEYS, values=ids.flatten(), lengths=torch.ones(len(KEYS) * batch, dtype=torch.long))
    return kjt, (ids[0] % 2).float()


def test_deepfm_learns_planted_parity(mk):
    torch.manual_seed(0)
    tables = mk.tables("deepfm", {k: 8 for k in KEYS}, sizes={k: N_IDS for k in KEYS})
    model = models.build_model(mk.cfg("deepfm"), tables, 0, device="cpu")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(200):
        kjt, labels = _batch(g, 128)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(torch.zeros(128, 0), kjt), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    kjt, labels = _batch(torch.Generator().manual_seed(99), 2048)
    with torch.no_grad():
        scores = model(torch.zeros(2048, 0), kjt)
    assert roc_auc_score(labels.numpy(), scores.numpy()) > 0.8
