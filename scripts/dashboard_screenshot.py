"""Screenshot of the dashboard during a bursty trace, for the README (docs/figures/dashboard.png).

    .venv/bin/python scripts/dashboard_screenshot.py [--out docs/figures/dashboard.png]

Serves four tiny random models (the test suite's, built from configs: no download) on two logical CPU devices
whose pools hold about two of them each, sends bursts of concurrent requests to a few models at a time with
short keep-alives (so instances start, scale to zero, stay retained and get evicted), and takes a headless
chromium screenshot in the middle of a burst. Needs chromium, chromium-driver and selenium (`make test` installs
them).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from serving import chat_model_dir, serving  # noqa: E402

from tangram.control import Deployment  # noqa: E402

MODELS = [("llama-chat", "llama", 1), ("llama-coder", "llama", 2), ("mistral-sum", "mistral", 3), ("opt-intent", "opt", 4)]


def main() -> None:
    """Run the trace and save the screenshot."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "figures" / "dashboard.png")
    ap.add_argument("--seconds", type=float, default=20.0, help="trace length before the screenshot")
    args = ap.parse_args()

    import openai
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    tmp = Path(tempfile.mkdtemp(prefix="tangram-shot-"))
    deps = [Deployment(name=n, checkpoint=str(chat_model_dir(tmp / n, arch, seed)), keep_alive_s=1.5,
                       max_instances=2, target_concurrency=4) for n, arch, seed in MODELS]
    with serving(deps) as probe:
        sizes = [d["bytes"] for d in probe.controller.status()["deployments"].values()]
    pool = int(sum(sorted(sizes)[-2:]) * 1.35)  # about two models (and their KV) per device
    with serving(deps, pool_bytes=pool, cpu_devices=2) as srv:
        opts = webdriver.ChromeOptions()
        opts.binary_location = "/usr/bin/chromium"
        for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1400,1250", "--force-device-scale-factor=1", f"--user-data-dir={tmp / 'profile'}"]:
            opts.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        stop, busy = threading.Event(), threading.Event()
        rng = random.Random(0)

        def ask(model: str) -> None:
            words = " ".join(f"w{rng.randint(5, 200)}" for _ in range(rng.randint(4, 40)))
            try:
                client.completions.create(model=model, prompt=words, max_tokens=rng.randint(128, 512), temperature=0)
            except openai.APIError as exc:
                print(f"{model}: {exc}", file=sys.stderr)

        def bursts() -> None:
            with ThreadPoolExecutor(12) as ex:
                while not stop.is_set():
                    hot = rng.sample([n for n, *_ in MODELS], rng.randint(1, 3))
                    busy.set()
                    list(ex.map(ask, [rng.choice(hot) for _ in range(rng.randint(4, 14))]))
                    busy.clear()
                    time.sleep(rng.uniform(0.3, 2.2))  # quiet gaps: instances scale to zero, weights stay retained

        try:
            driver.get(srv.url + "/dashboard#token=test-token")
            trace = threading.Thread(target=bursts, daemon=True)
            trace.start()
            time.sleep(args.seconds)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not driver.execute_script(  # the page shows requests in flight
                    "return [...document.querySelectorAll('.inst')].some(e => !/ 0 in flight/.test(e.textContent))"):
                time.sleep(0.05)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
            print(f"saved {args.out}")
        finally:
            stop.set()
            driver.quit()


if __name__ == "__main__":
    main()
