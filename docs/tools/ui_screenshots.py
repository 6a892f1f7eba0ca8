"""The screenshots of docs/ui.md, taken from a demo store by headless Chromium (Debian's package).

docs/ui.md shows the clicks that answer "which method kept more"; this script takes its pictures from a
real `secura demo` store, so they show what the code logs. Run it again whenever the logged keys, the
descriptions or the saved view change (pipelines/run_report.py, pipelines/ui_view.py), and commit the PNGs.

Needs, outside the project's dependencies (a docs tool):

    apt-get install -y chromium chromium-driver
    pip install selenium                    # into any environment that also has this project's
    secura demo --output-dir runs/demo      # a fresh demo store (`make demo`)
    python docs/tools/ui_screenshots.py --output-dir runs/demo

It serves the store with `mlflow ui` on a free localhost port (`secura ui`'s command line), opens the
experiment page (its description expanded), the first method run's overview and the saved view
"which method kept more" (`pipelines/ui_view.py`), and writes ``docs/ui/*.png``.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipelines.tracking import resolve_tracking_uri, ui_argv  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# Headless, offline and quiet: no GPU, no network of its own, no first-run or update machinery.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1"]
WINDOW = (1600, 1000)
SERVER_START_S = 90
PAGE_WAIT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(output_dir: Path, port: int) -> subprocess.Popen:
    """`secura ui`'s server for the store of ``output_dir``, once it answers."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(ui_argv(output_dir, port), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow ui exited with {server.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return server
        except OSError:
            time.sleep(1)
    os.killpg(server.pid, signal.SIGTERM)
    raise RuntimeError(f"mlflow ui did not answer on port {port} within {SERVER_START_S} s")


def demo_runs(uri: str) -> tuple[str, list]:
    """The demo's experiment id and its method runs (parents, SECURA first)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for experiment in client.search_experiments():
        summary = client.search_runs([experiment.experiment_id], "tags.`secura.kind` = 'demo'", max_results=1)
        if summary:
            runs = client.search_runs([experiment.experiment_id],
                                      f"tags.`secura.demo` = '{summary[0].data.tags['secura.demo']}'")
            parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags
                       and r.data.tags.get("secura.kind") != "demo"]
            parents.sort(key=lambda r: (r.data.tags.get("method") != "secura", r.info.start_time))
            return experiment.experiment_id, parents
    raise SystemExit(f"{uri}: no demo in this store (run `secura demo` first)")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='secura-ui-shots-')}")  # a fresh profile
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def wait_for_text(driver, text: str, timeout: float = PAGE_WAIT_S) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(expected_conditions.text_to_be_present_in_element((By.TAG_NAME, "body"),
                                                                                          text))


def click(driver, css: str, required: bool = True) -> None:
    """Click the displayed element ``css`` (the UI's own data-component-id or aria-label selectors)."""
    from selenium.webdriver.common.by import By

    found = [e for e in driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]
    if found:
        found[0].click()
        time.sleep(2)
    elif required:
        raise RuntimeError(f"no {css} on {driver.current_url} (did the MLflow UI change?)")


def show_more(driver) -> None:
    """A long description is folded after a few lines: open it."""
    from selenium.webdriver.common.by import By

    for element in driver.find_elements(By.XPATH, "//*[normalize-space(text())='Show more']"):
        if element.is_displayed():
            element.click()
            time.sleep(2)
            return
    raise RuntimeError(f"no 'Show more' under the description on {driver.current_url} (did the MLflow UI change?)")


def close_assistant(driver) -> None:
    """The assistant panel takes a third of the page and has nothing to do with the runs."""
    click(driver, '[data-component-id="mlflow.assistant.chat_panel.close"]', required=False)


def shoot(driver, path: Path, height: int | None = None) -> None:
    if height:
        driver.set_window_size(WINDOW[0], height)
        time.sleep(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    driver.set_window_size(*WINDOW)
    print(f"wrote {path}")


def take(output_dir: Path, out: Path) -> None:
    from pipelines.ui_view import view_link

    uri = resolve_tracking_uri(None, output_dir)
    experiment, parents = demo_runs(uri)
    port = free_port()
    server = serve(output_dir, port)
    root = f"http://127.0.0.1:{port}/"
    try:
        driver = browser()
    except Exception:
        os.killpg(server.pid, signal.SIGTERM)
        raise
    try:
        # click 1: the experiment; its description is the runs side by side
        driver.get(f"{root}#/experiments/{experiment}/runs")
        wait_for_text(driver, parents[0].info.run_name)
        close_assistant(driver)
        click(driver, '[data-component-id="mlflow.experiment.metadata_editor.expand_button"]')
        wait_for_text(driver, "Verdict")
        shoot(driver, out / "experiment.png", 900)

        # click 2: a run; its description is its report
        driver.get(f"{root}#/experiments/{experiment}/runs/{parents[0].info.run_id}")
        wait_for_text(driver, "Accuracy matrix")
        close_assistant(driver)
        show_more(driver)
        shoot(driver, out / "run-overview.png", 1250)

        # or: the saved view, stage by stage
        driver.get(root + view_link(experiment))
        wait_for_text(driver, "what was kept, stage by stage")
        close_assistant(driver)
        time.sleep(4)
        shoot(driver, out / "saved-view.png", 1500)
    finally:
        driver.quit()
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers: its own process group
        server.wait(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=str(ROOT / "runs" / "demo"), help="the demo's output dir")
    parser.add_argument("--out", default=str(ROOT / "docs" / "ui"), help="where the PNGs go")
    args = parser.parse_args(argv)
    take(Path(args.output_dir).resolve(), Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
