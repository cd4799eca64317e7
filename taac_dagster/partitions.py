"""Every asset is partitioned by competition track."""

from dagster import StaticPartitionsDefinition

from taac_dagster.tracks import TRACK_NAMES

track_partitions = StaticPartitionsDefinition(list(TRACK_NAMES))
