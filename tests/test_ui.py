"""End to end through the Dagster UI, in a real browser.

The whole chain is materialized for the 1M track with the CLI (`dagster job execute`, as in the
README, plus the in-process executor), then `dagster dev` serves the project's workspace.yaml
on a free loopback port, against the same temporary DAGSTER_HOME, and Chromium (driven by Playwright) opens the asset graph, launches the
data job `taac_data` for partition 1M from the job page, waits for the run to succeed, reads
the `headline` table of `evaluation_report` (partition 1M) off the asset page, and checks that
a table's page shows its row count and columns and that the loss curve, the recall tuning and
the report's plots show as images in their materializations' metadata.

Screenshots of each step, the server's and the CLI's logs (and a Playwright trace when the test
fails) land in `test-artifacts/ui/` at the repository root, or in $TAAC_TEST_ARTIFACTS.

Skip it with `pytest -m "not ui"`. It skips itself only when Playwright or a Chromium binary is
missing (`.ci/run` installs both), and fails instead under CI (``CI=true``: tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail_in_ci
from tests.ui_support import CHROMIUM_ARGS, REPO_ROOT, DagsterDev, find_chromium, isolated_env, run_cli

pytestmark = [pytest.mark.ui, pytest.mark.slow]

# Read at import: conftest's autouse fixture removes every TAAC_* variable before each test.
ARTIFACTS = Path(os.environ.get("TAAC_TEST_ARTIFACTS") or REPO_ROOT / "test-artifacts" / "ui").resolve()
TRACK = "1M"
# Small and fast: 300 users, 800 items, 20 training steps, no validation during training.
SETTINGS = {
    "TAAC_SOURCE": "synthetic",
    "TAAC_SYNTHETIC__NUM_USERS": "300",
    "TAAC_SYNTHETIC__NUM_ITEMS": "800",
    "TAAC_TRAINING__MAX_STEPS": "20",
    "TAAC_TRAINING__VAL_USERS": "0",
    # An IVF index is tuned (nprobe climbs to the recall target), so its tuning plot shows.
    "TAAC_RETRIEVAL__INDEX": "ivf",
}
# The CLI pre-materialization runs every step in one process: the multiprocess executor would
# start a fresh Python per step (about a minute more on 2 cores). The run launched from the UI
# below keeps the job's default (multiprocess) executor.
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}


def _playwright():
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError as exc:
        skip_or_fail_in_ci(f"Playwright is not installed ({exc}); `pip install -e '.[test]'` brings it")
    return sync_playwright, expect


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        skip_or_fail_in_ci("no Chromium binary (/usr/bin/chromium or on PATH); `apt-get install chromium` (.ci/run does)")
    return path


@pytest.fixture(scope="module")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # Only what an earlier run of this test left (the folder may be shared through the env var).
    for pattern in ("[0-9][0-9]-*.png", "cli-*.log", "dagster-dev.log", "headline.txt", "trace.zip"):
        for old in ARTIFACTS.glob(pattern):
            old.unlink()
    return ARTIFACTS


@pytest.fixture(scope="module")
def dagster_ui(tmp_path_factory, artifacts, chromium):
    """The 1M chain materialized by the CLI, then `dagster dev` on the same instance."""
    _playwright()  # skip before spending minutes on a server nobody can look at
    root = tmp_path_factory.mktemp("ui")
    home = root / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("")
    work = root / "cwd"  # neither the checkout's .env nor its data/ are seen from here
    work.mkdir()
    env = isolated_env(home, {**SETTINGS, "TAAC_DATA_ROOT": str(root / "data")})

    # The storages are created once, before two processes open them at the same time.
    run_cli(["instance", "migrate"], env=env, cwd=work, log=artifacts / "cli-instance-migrate.log", timeout=120)
    # `dagster dev` starts (code server, webserver, daemon) while the CLI materializes the chain.
    server = DagsterDev(workspace=REPO_ROOT / "workspace.yaml", env=env, cwd=work, log=artifacts / "dagster-dev.log")
    try:
        run_config = root / "in_process.yaml"
        run_config.write_text(json.dumps(IN_PROCESS))  # JSON is YAML
        run_cli(
            ["job", "execute", "-m", "taac_dagster.definitions", "-j", "taac_main", "-c", str(run_config),
             "--tags", json.dumps({"dagster/partition": TRACK})],
            env=env, cwd=work, log=artifacts / "cli-taac_main.log", timeout=600,
        )
        server.wait_ready(timeout=120)
        server.graphql("mutation { setNuxSeen }")  # no "Join the Dagster community" dialog
        yield server
    finally:
        server.stop()


def test_materialize_from_ui_and_read_the_report(dagster_ui, chromium, artifacts):
    sync_playwright, expect = _playwright()
    url = dagster_ui.url
    step = iter(range(1, 100))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        context.tracing.start(screenshots=True, snapshots=True)
        page = context.new_page()
        page.set_default_timeout(30_000)
        # Should the community dialog show anyway (it is a per-instance flag), close it.
        page.add_locator_handler(
            page.get_by_text("Join the Dagster community"), lambda: page.get_by_role("button", name="Skip").click()
        )

        def shot(name: str) -> None:
            page.screenshot(path=str(artifacts / f"{next(step):02d}-{name}.png"))

        passed = False
        try:
            # 1. The asset graph: every group of the chain is on it.
            page.goto(f"{url}/asset-groups")
            expect(page.get_by_text("Global asset lineage")).to_be_visible()
            for group in ("data", "warehouse", "evaluation"):
                expect(page.get_by_role("button", name=re.compile(rf"\b{group}\b")).first).to_be_visible()
            shot("asset-graph")

            # 2. Jobs -> taac_data -> Materialize all..., partition 1M, launch.
            page.get_by_role("link", name=re.compile(r"\bJobs$")).first.click()
            # By its address: the row's accessible name also carries its icons ("taac_data info").
            page.locator('a[href$="/jobs/taac_data"]').first.click()
            expect(page).to_have_url(re.compile(r"/jobs/taac_data"))
            page.get_by_role("button", name=re.compile(r"\bMaterialize all")).click()
            dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize")
            expect(dialog).to_be_visible()
            dialog.get_by_text("Select a partition or create one").click()
            page.get_by_role("menuitem").filter(has=page.get_by_title(TRACK, exact=True)).click()
            page.keyboard.press("Escape")  # closes the partition picker, not the dialog
            expect(dialog.get_by_text("1 partition", exact=True)).to_be_visible()
            launch = dialog.get_by_role("button", name=re.compile(r"\bLaunch 1 run$"))
            expect(launch).to_be_enabled()
            shot("launch-dialog")
            launch.click()

            # 3. The toast links to the new run; follow it and wait for the run to end.
            view = page.get_by_role("link", name=re.compile(r"\bView$"))
            expect(view).to_have_attribute("href", re.compile(r"/runs/[0-9a-f-]{36}$"))
            run_id = view.get_attribute("href").rsplit("/", 1)[-1]
            shot("run-launched")
            view.click()
            expect(page).to_have_url(re.compile(rf"/runs/{run_id}"))
            started = time.monotonic()
            record = dagster_ui.wait_run(run_id, timeout=420)
            tags = {t["key"]: t["value"] for t in record["tags"]}
            assert record["status"] == "SUCCESS", f"run {run_id} ended {record['status']} (see {dagster_ui.log})"
            assert record["jobName"] == "taac_data" and tags.get("dagster/partition") == TRACK, record
            assert tags.get("dagster/from_ui") == "true", tags
            expect(page.get_by_text("Success", exact=True).first).to_be_visible()
            shot("run-succeeded")
            print(f"UI run {run_id} succeeded in about {time.monotonic() - started:.0f}s")

            # 4. evaluation_report, partition 1M: the headline table in its metadata.
            page.goto(f"{url}/assets/evaluation_report?view=partitions&partition={TRACK}")
            expect(page.get_by_text(TRACK, exact=True).first).to_be_visible()
            row = page.get_by_role("row").filter(has=page.get_by_role("cell", name="headline", exact=True))
            expect(row).to_be_visible()
            row.scroll_into_view_if_needed()
            shot("evaluation-report")
            show = row.get_by_text("[Show Markdown]")
            if show.count():  # long Markdown is behind a button that opens a dialog
                show.click()
                headline = page.get_by_role("dialog").last.inner_text()
                shot("evaluation-report-headline")
            else:
                headline = row.inner_text()
            (artifacts / "headline.txt").write_text(headline)
            assert "model" in headline, headline
            assert "score" in headline.lower(), headline

            # 5. Its lineage: the report sits downstream of the Faiss index.
            page.goto(f"{url}/assets/evaluation_report?view=lineage")
            expect(page.get_by_text("faiss_index", exact=True).first).to_be_visible()
            shot("evaluation-report-lineage")

            # 6. A table's page: its row count and columns (dagster/row_count, dagster/column_schema).
            page.goto(f"{url}/assets/events")
            expect(page.get_by_text("action_type_missing", exact=True).first).to_be_visible()
            expect(page.get_by_text(re.compile(r"^Row count$", re.I)).first).to_be_visible()
            shot("events-row-count-and-columns")

            # 7. The plots as images in the materialization metadata, partition 1M.
            def show_images(asset: str, entry: str, images: int) -> None:
                page.goto(f"{url}/assets/{asset}?view=partitions&partition={TRACK}")
                row = page.get_by_role("row").filter(has=page.get_by_role("cell", name=entry, exact=True))
                expect(row).to_be_visible()
                row.scroll_into_view_if_needed()
                show = row.get_by_text("[Show Markdown]")
                scope = row
                if show.count():
                    show.click()
                    scope = page.get_by_role("dialog").last
                pictures = scope.locator("img[src^='data:image/png;base64,']")
                expect(pictures).to_have_count(images)
                expect(pictures.first).to_be_visible()
                assert pictures.first.evaluate("img => img.naturalWidth") > 100, f"{asset} {entry}: the image did not load"
                shot(f"{asset}-{entry}")
                if show.count():
                    page.keyboard.press("Escape")

            show_images("encoder_checkpoint", "loss_curve_plot", 1)
            show_images("faiss_index", "recall_tuning", 1)
            show_images("evaluation_report", "plots", 2)
            passed = True
        finally:
            if not passed:
                try:
                    shot("failure")
                except Exception:  # noqa: BLE001 - the page may be gone; the trace still helps
                    pass
            context.tracing.stop(path=None if passed else str(artifacts / "trace.zip"))
            browser.close()
