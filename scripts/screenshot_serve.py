"""The screenshot of ``lmnet serve``'s page in the README (run by hand; needs the 'serve' extra,
playwright and Chromium):

    python scripts/screenshot_serve.py [--out docs/serve_page.jpg]

Starts the server on the shipped Kvasir-SEG model, uploads two sample images in headless Chromium,
and saves the page (JPEG) with the lesions outlined at half opacity.
"""
from __future__ import annotations

import argparse
import shutil
import threading
import time

import uvicorn
from playwright.sync_api import sync_playwright

from lmnet.data.sample import sample_images
from lmnet.deploy.loading import load_predictor
from lmnet.deploy.postprocess import PostProcess
from lmnet.engine.serve import create_app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/serve_page.jpg")
    args = ap.parse_args()
    app = create_app(load_predictor(None, "torch", "kvasir"), "kvasir",
                     default_post=PostProcess(tta="flips"))  # lmnet serve's default
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 900, "height": 700})
        page.goto(f"http://127.0.0.1:{port}/")
        page.set_input_files("#files", [str(p) for p in sample_images(2)])
        page.wait_for_function("document.querySelectorAll('canvas.overlay').length == 2", timeout=120_000)
        page.screenshot(path=args.out, full_page=True, type="jpeg", quality=80)
        browser.close()
    server.should_exit = True
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
