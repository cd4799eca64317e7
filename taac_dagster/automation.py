"""Declarative automation of the chain below the raw data.

Each downstream asset is requested for a track when its inputs changed (an upstream
materialization with a new data version, e.g. a new raw dataset) or its own code version
changed, once nothing upstream is missing or running, and only when every blocking check on
its upstream assets passed: a dataset that fails its quality checks never reaches training.

Nothing runs until the automation sensor is turned on (UI: Automation -> taac_automation, or
``dagster sensor start taac_automation``); it is off by default.
"""

from dagster import AutomationCondition, AutomationConditionSensorDefinition, DefaultSensorStatus

AUTOMATION_SENSOR_NAME = "taac_automation"


def downstream_condition() -> AutomationCondition:
    inputs_or_code_changed = (
        AutomationCondition.newly_missing()
        | AutomationCondition.any_deps_updated()
        | AutomationCondition.code_version_changed()
    ).since_last_handled()  # type: ignore[misc]  # dagster types it for asset-or-check conditions only
    return (
        AutomationCondition.in_latest_time_window()
        & inputs_or_code_changed.with_label("inputs or code changed")
        & ~AutomationCondition.any_deps_missing()
        & ~AutomationCondition.any_deps_in_progress()
        & ~AutomationCondition.in_progress()
        & AutomationCondition.all_deps_blocking_checks_passed()
    ).with_label("eager, on code change, behind blocking checks")


automation_sensor = AutomationConditionSensorDefinition(
    AUTOMATION_SENSOR_NAME,
    target="*",
    default_status=DefaultSensorStatus.STOPPED,
    minimum_interval_seconds=60,
    description="Re-materializes each track's chain when its inputs or code change (off by default).",
)
