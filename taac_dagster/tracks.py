"""The two competition tracks and the rules that differ between them."""

from __future__ import annotations

from dataclasses import dataclass

from taac_dagster.errors import UnknownTrackError

EXPOSURE, CLICK, CONVERSION = 0, 1, 2


@dataclass(frozen=True)
class Track:
    name: str
    # Action types that may appear in the data.
    allowed_actions: tuple[int, ...]
    # Action types that count as a retrieval target, in priority order for the holdout:
    # the holdout target is the last event of the first type present.
    target_priority: tuple[int, ...]
    # Relevance weight per action type for the weighted metrics (10M only).
    relevance: dict[int, float]

    @property
    def weighted(self) -> bool:
        return CONVERSION in self.allowed_actions


TRACKS: dict[str, Track] = {
    "1M": Track(
        name="1M",
        allowed_actions=(EXPOSURE, CLICK),
        target_priority=(CLICK,),
        relevance={EXPOSURE: 0.0, CLICK: 1.0},
    ),
    "10M": Track(
        name="10M",
        allowed_actions=(EXPOSURE, CLICK, CONVERSION),
        target_priority=(CONVERSION, CLICK),
        relevance={EXPOSURE: 0.0, CLICK: 1.0, CONVERSION: 2.5},
    ),
}

TRACK_NAMES: tuple[str, ...] = tuple(TRACKS)


def get_track(name: str) -> Track:
    try:
        return TRACKS[name]
    except KeyError:
        raise UnknownTrackError(name, TRACK_NAMES) from None
