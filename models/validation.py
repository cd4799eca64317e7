"""Validation figures of the encoder during training: HR@k, NDCG@k and the score on a split's
targets, ranked against the released candidate pool, next to the popularity ranking.
"""

from __future__ import annotations

import numpy as np
import torch

from models.baselines import popularity_order, popularity_topk
from models.data import Arrays, history_batch, released_mask, trim_padding
from models.encoder import Encoder
from models.metrics import retrieval_metrics
from models.runtime import to_device


@torch.no_grad()
def evaluate(
    model: Encoder,
    arrays: Arrays,
    index: np.ndarray,
    actions: tuple[int, ...],
    *,
    device: torch.device,
    split: str = "val",
    exclude_history: bool = True,
    k: int = 10,
    batch_size: int = 512,
) -> dict[str, float]:
    """HR@k / NDCG@k / score of the model on rows ``index`` of a split (``val``: validation
    targets, ``hold``: test targets) against the released candidate pool, with the report's
    history filter, next to the report's popularity ranking under the same filter."""
    was_training = model.training
    model.eval()
    # Users in order of history length, so that each trimmed chunk holds histories of one size.
    index = np.asarray(index)[np.argsort((history_batch(arrays, split, index)["items"] > 0).sum(1), kind="stable")]
    cand_rows = np.asarray(arrays.cand_rows).astype(np.int64)
    position = np.full(arrays.meta["num_item_rows"], -1, np.int64)
    position[cand_rows] = np.arange(len(cand_rows))
    targets = position[np.asarray(arrays.a[f"{split}_target"][index]).astype(np.int64)]
    # Ranked like the report: from the released pool only (the holdout targets the warehouse
    # added to the pool are not candidates, so validation is not flattered by them).
    released = released_mask(arrays)
    hidden = torch.from_numpy(np.flatnonzero(~released)).to(device) if released is not None else None
    keys = torch.cat([
        model.item_vectors(torch.from_numpy(cand_rows[i : i + 65_536]).to(device))
        for i in range(0, len(cand_rows), 65_536)
    ])
    chunk = max(1, min(batch_size, (1 << 26) // max(1, len(cand_rows))))
    topk, histories = [], []
    for i in range(0, len(index), chunk):
        batch = trim_padding(history_batch(arrays, split, index[i : i + chunk]))
        scores = model.user_vectors(to_device(batch, device), actions) @ keys.T
        if hidden is not None:
            scores[:, hidden] = -torch.inf
        history = position[batch["items"]]
        histories.append(np.pad(history, ((0, 0), (arrays.meta["max_len"] - history.shape[1], 0)), constant_values=-1))
        if exclude_history:
            rows, cols = np.nonzero(history >= 0)
            scores[torch.from_numpy(rows).to(device), torch.from_numpy(history[rows, cols]).to(device)] = -torch.inf
        topk.append(scores.topk(min(k, scores.shape[1]), dim=1).indices.cpu().numpy())
    model.train(was_training)
    result = retrieval_metrics(np.concatenate(topk), targets, k)
    popular = popularity_order(arrays, actions)
    if released is not None:
        popular = popular[released[popular]]
    exclude = np.concatenate(histories) if exclude_history else None
    pool = np.arange(len(cand_rows))
    baseline = retrieval_metrics(popularity_topk(popular, pool, len(targets), k, exclude=exclude), targets, k)
    result.update({f"popularity_{key}": value for key, value in baseline.items()})
    result["users"] = int(len(index))
    return result
