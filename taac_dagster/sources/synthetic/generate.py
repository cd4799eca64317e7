"""``generate_dataset``: the whole dataset, from catalogue to ground truth, and its summary."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from taac_dagster import formats
from taac_dagster.settings import SyntheticSettings
from taac_dagster.sources.synthetic.catalogue import build_catalogue, embedding_dims
from taac_dagster.sources.synthetic.events import EventTally, click_model, event_blocks
from taac_dagster.sources.synthetic.ground_truth import GROUND_TRUTH_DIR, write_ground_truth
from taac_dagster.sources.synthetic.hub_layout import write_hub_layout
from taac_dagster.sources.synthetic.jsonl_layout import write_jsonl_layout
from taac_dagster.sources.synthetic.raw_ids import write_indexer
from taac_dagster.sources.synthetic.users import build_population
from taac_dagster.tracks import get_track


# --- Results ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticSummary:
    track: str
    format: str
    users: int
    items: int  # warm items (with a re-id)
    cold_items: int
    events: int
    clicks: int  # action_type 1
    conversions: int  # action_type 2
    candidates: int
    families: dict[int, int]  # family -> dim written
    bytes_written: int
    seconds: float
    users_with_target: int = 0
    forced_clicks: int = 0  # users whose only click was forced (see _force_one_click)

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")

    def to_metadata(self) -> dict[str, Any]:
        return {
            "track": self.track,
            "format": self.format,
            "users": self.users,
            "items": self.items,
            "cold_items": self.cold_items,
            "events": self.events,
            "clicks": self.clicks,
            "conversions": self.conversions,
            "candidates": self.candidates,
            "families": {str(f): d for f, d in self.families.items()},
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "events_per_second": round(self.events_per_second, 1),
            "users_with_target": self.users_with_target,
            "forced_clicks": self.forced_clicks,
        }


# --- Entry point -----------------------------------------------------------------------------
def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def generate_dataset(
    out_dir: Path, track: str, cfg: SyntheticSettings, families: Sequence[int]
) -> SyntheticSummary:
    """Write a synthetic dataset in ``cfg.format`` into ``out_dir`` (an existing empty folder;
    the caller makes the write atomic) and return what was written."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty: the generator writes into an empty folder")
    rules = get_track(track)
    dims = embedding_dims(families, cfg, track)

    catalogue = build_catalogue(cfg)
    population = build_population(cfg)
    clicks = click_model(cfg, population, rules)
    tally = EventTally(target_item=np.zeros(population.num_users, dtype=np.int64))
    blocks = event_blocks(catalogue, population, clicks, rules, cfg.seed, tally)
    if cfg.format == formats.HUB_FORMAT:
        pool = write_hub_layout(out_dir, blocks, catalogue, population, tally, cfg, dims)
    elif cfg.format == formats.JSONL_FORMAT:
        pool = write_jsonl_layout(out_dir, blocks, catalogue, population, tally, cfg, dims)
    else:
        raise ValueError(f"unknown synthetic format {cfg.format!r}")
    write_indexer(out_dir / "indexer.pkl", catalogue, population, cfg.seed)
    write_ground_truth(out_dir / GROUND_TRUTH_DIR, catalogue, population, clicks, cfg, track, dims)

    return SyntheticSummary(
        track=track,
        format=cfg.format,
        users=population.num_users,
        items=catalogue.num_warm,
        cold_items=catalogue.num_cold,
        events=tally.events,
        clicks=tally.clicks,
        conversions=tally.conversions,
        candidates=len(pool),
        families=dims,
        bytes_written=_folder_bytes(out_dir),
        seconds=time.perf_counter() - started,
        users_with_target=int((tally.target_item > 0).sum()),
        forced_clicks=tally.forced_clicks,
    )
