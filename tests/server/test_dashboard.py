"""The dashboard in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`) driven by Selenium against a real `lmq serve`. Screenshots of
the job list and of a fit job's page are kept in test-artifacts/ (or
$LMQ_TEST_ARTIFACTS)."""

import json
import os
import shutil
import time
from datetime import datetime
from pathlib import Path

import pytest
from api_support import REPO, TEAM_A, TOKENS, ApiServer, generate_body, wait_for_job
from service_support import PROMPTS

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (apt-get install)"
)
ARTIFACTS = Path(os.environ.get("LMQ_TEST_ARTIFACTS") or REPO / "test-artifacts")


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def server(lmq_home, tiny_llama_preset, tmp_path):
    env = {"LMQ_HOME": str(lmq_home), "LMQ_PRESET_ROOTS": str(tiny_llama_preset.parent), "LMQ_API_TOKENS": TOKENS}
    server = ApiServer(env, tmp_path / "server.log")
    yield server
    server.stop()


def sign_in(browser, url: str, token: str) -> None:
    browser.get(url)
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "#token-form button").click()


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def progress_of(browser, job_id: str) -> float | None:
    """Read in one go in the page (the table is rebuilt at each refresh)."""
    progress = browser.execute_script(
        "const bar = document.querySelector(`tr[data-job='${arguments[0]}'] .bar`); return bar && bar.dataset.progress",
        job_id,
    )
    return None if progress is None else float(progress)


def data_of(browser, selector: str, name: str) -> list[str]:
    return browser.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((element) => element.dataset[arguments[1]])",
        selector, name,
    )


def test_progress_advances_live_the_loss_plot_has_each_step_and_tenants_see_their_own(
    server, browser, tiny_llama_preset
):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with server.client(TEAM_A) as client:
        fit = client.post("/v1/jobs", json={
            "kind": "fit", "preset": str(tiny_llama_preset), "output_preset": "dashboard-tuned",
            "training_data": [{"text": text} for text in PROMPTS * 2],
            "validation_data": [{"text": text} for text in PROMPTS[:2]],
            "hyperparameters": {"epochs": 2, "batch_size": 2, "sequence_length": 32},
        })
        assert fit.status_code == 202, fit.text
        prompts = [f"{prompt} {i}" for i in range(24) for prompt in PROMPTS]  # long enough to watch
        generate = client.post(
            "/v1/jobs", json=generate_body(tiny_llama_preset, prompts, max_length=48, micro_batch_size=1)
        )
        assert generate.status_code == 202, generate.text
        fit_id, generate_id = fit.json()["id"], generate.json()["id"]

        # The list, loaded once: the generate job's bar moves through values between 0 and 1 as it runs.
        sign_in(browser, f"{server.url}/dashboard", "tok-a")
        seen = set()
        deadline = time.monotonic() + 300
        while (status := client.get(f"/v1/jobs/{generate_id}").json()["status"]) not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, "the generate job did not finish"
            if (progress := progress_of(browser, generate_id)) is not None:
                seen.add(progress)
            time.sleep(0.1)
        assert status == "succeeded"
        assert len({p for p in seen if 0 < p < 1}) >= 2, seen
        wait_until(lambda: progress_of(browser, generate_id) == 1, 10, "a full bar")
        status_cell = f"tr[data-job='{generate_id}'] .status"
        wait_until(lambda: data_of(browser, status_cell, "state") == ["succeeded"], 10, "the success shown")
        browser.save_screenshot(str(ARTIFACTS / "dashboard-jobs.png"))
        # Its rate: the prompts it did per second between the times the API reports.
        job = client.get(f"/v1/jobs/{generate_id}").json()
        seconds = (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()
        shown = data_of(browser, f"tr[data-job='{generate_id}'] td[data-rate]", "rate")
        assert float(shown[0]) == pytest.approx(len(prompts) / seconds, rel=1e-2)
        assert set(data_of(browser, "tr.job", "job")) == {fit_id, generate_id}

        # The fit job's page: one point per step it logged, in step order.
        assert wait_for_job(client, fit_id, 300, [server.log])["status"] == "succeeded"
        steps = [e for e in client.get(f"/v1/jobs/{fit_id}/events").json()["events"] if e["type"] == "step"]
        browser.find_element(By.CSS_SELECTOR, f'a[href="/dashboard/jobs/{fit_id}"]').click()
        wait_until(lambda: data_of(browser, "#loss circle.step", "step"), 10, "the loss plot")
        assert len(steps) == 2 * len(PROMPTS)  # 2 epochs of 2 x 6 texts in batches of 2
        assert [int(step) for step in data_of(browser, "#loss circle.step", "step")] == [e["step"] for e in steps]
        losses = [float(loss) for loss in data_of(browser, "#loss circle.step", "loss")]
        assert losses == pytest.approx([e["loss"] for e in steps])
        assert browser.find_element(By.ID, "status").text == "succeeded"
        # Each epoch's checkpoint marked at its step, with its validation loss.
        epochs = [e for e in client.get(f"/v1/jobs/{fit_id}/events").json()["events"] if e["type"] == "epoch"]
        assert [e["step"] for e in epochs] == [6, 12]
        assert [int(step) for step in data_of(browser, "#loss line.checkpoint", "step")] == [6, 12]
        assert [int(step) for step in data_of(browser, "#loss circle.valid", "step")] == [6, 12]
        valid_losses = [float(loss) for loss in data_of(browser, "#loss circle.valid", "loss")]
        assert valid_losses == pytest.approx([e["val_loss"] for e in epochs])
        browser.save_screenshot(str(ARTIFACTS / "dashboard-fit-job.png"))

        # The preset it made, with its lineage; and the generate job's results preview.
        browser.get(f"{server.url}/dashboard")
        wait_until(lambda: data_of(browser, "tr.preset", "preset") == ["dashboard-tuned"], 10, "the preset")
        made_by = browser.find_element(By.CSS_SELECTOR, 'tr[data-preset="dashboard-tuned"] a').get_attribute("href")
        assert made_by.endswith(f"/dashboard/jobs/{fit_id}")
        assert float(data_of(browser, "tr.preset td[data-loss]", "loss")[0]) == pytest.approx(steps[-1]["loss"])
        browser.get(f"{server.url}/dashboard/jobs/{generate_id}")
        wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "tr.result"), 10, "the results preview")
        first = client.get(f"/v1/jobs/{generate_id}/results").text.splitlines()[:5]
        rows = browser.execute_script(
            "return [...document.querySelectorAll('tr.result')].map((row) => row.cells[1].textContent)"
        )
        assert rows == [json.loads(line)["output"] for line in first]

    # Another tenant, in a fresh tab session: none of team-a's jobs, and team-a's job page says it is not there.
    browser.delete_all_cookies()
    browser.execute_script("sessionStorage.clear()")
    sign_in(browser, f"{server.url}/dashboard", "tok-b")
    wait_until(lambda: browser.execute_script("return window.refresh !== undefined"), 10, "the script")
    time.sleep(1.5)  # a refresh or two
    assert data_of(browser, "tr.job", "job") == [] and data_of(browser, "tr.preset", "preset") == []
    sign_in(browser, f"{server.url}/dashboard/jobs/{fit_id}", "tok-b")
    error = wait_until(lambda: browser.find_element(By.ID, "error").text, 10, "an error")
    assert error == f"no job {fit_id!r}"
    assert browser.find_element(By.ID, "status").text == ""
