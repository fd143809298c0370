"""Per-sample difficulty scores for a curriculum (lmfleet.train.curriculum), computed before training: `length`
on the driver from the packed positions, `column:NAME` read from the packed column's files, `loss` by a proxy
model in one Ray task per packed shard."""

from __future__ import annotations

import numpy as np

from lmfleet.train.config import CurriculumConfig
from lmfleet.train.curriculum import length_scores


def shard_scores(packed: str, shard: dict, score: str, pad: int, proxy: str | None) -> np.ndarray:
    """The scores of one train shard's samples (a Ray task for `loss`: it loads the proxy model)."""
    from lmfleet.uri import local_copy

    root = local_copy(packed, "pretrain.data")
    tokens = np.load(root / shard["tokens"], mmap_mode="r")
    positions = np.load(root / shard["positions"], mmap_mode="r")
    if score == "length":
        return length_scores(np.asarray(tokens), np.asarray(positions), pad)
    import torch

    from lmfleet.model.export import load_model
    from lmfleet.train.data import load_batch
    from lmfleet.train.loss import per_sample_ce

    class Shard:  # load_batch's view of one shard
        def __getitem__(self, i):
            return tokens[i].astype(np.int64), positions[i].astype(np.int64)

    model = load_model(local_copy(proxy, "pretrain.curriculum.proxy")).eval()
    out = np.empty(len(tokens))
    with torch.no_grad():
        for start in range(0, len(tokens), 64):
            idx = np.arange(start, min(start + 64, len(tokens)))
            inputs, pos, targets = load_batch(Shard(), idx, pad, torch.device("cpu"))
            ce = per_sample_ce(model(inputs, pos), targets)
            out[idx] = (ce / (targets != -100).sum(dim=1).clamp(min=1)).numpy()
    return out


def column_scores(packed: str, shard: dict, name: str) -> np.ndarray:
    """The packed column `name` of one shard (data stage pack.columns): only its file is read, not the tokens."""
    import io

    from lmfleet import uri

    return np.load(io.BytesIO(uri.read_bytes(uri.join(packed, shard["columns"][name]))))


def compute_scores(packed: str, index: dict, cfg: CurriculumConfig, proxy: str | None) -> np.ndarray:
    """Every train sample's score, in global sample order (shards in the index's order); `loss`: one Ray task
    per shard."""
    shards = index["splits"]["train"]["shards"]
    if cfg.column is not None:
        parts = [column_scores(packed, s, cfg.column) for s in shards]
    elif cfg.score == "length":
        parts = [shard_scores(packed, s, "length", index["pad_id"], None) for s in shards]
    else:
        import ray

        task = ray.remote(num_cpus=1)(shard_scores)
        parts = ray.get([task.remote(packed, s, "loss", index["pad_id"], proxy) for s in shards])
    return np.concatenate(parts) if parts else np.empty(0)
