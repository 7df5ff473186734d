"""``lmnet serve``'s API with real HTTP requests against a server started here."""
from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="needs the 'serve' extra (fastapi, uvicorn, python-multipart)")
uvicorn = pytest.importorskip("uvicorn")

from lmnet.deploy.loading import load_predictor  # noqa: E402
from lmnet.deploy.postprocess import PostProcess, count_lesions  # noqa: E402
from lmnet.engine.serve import DISCLAIMER, ServeLimits, create_app  # noqa: E402


def _serve(app):
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    return srv, thread, srv.servers[0].sockets[0].getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    predictor = load_predictor(tiny_checkpoint, "torch")
    app = create_app(predictor, "tiny", ServeLimits(max_upload_mb=0.2, max_pixels=300_000, workers=2),
                     PostProcess(tta="hflip"))
    srv, thread, port = _serve(app)
    yield f"http://127.0.0.1:{port}", predictor
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def kvasir_server():
    """The shipped Kvasir-SEG model (it ships inside the package), so the page has a polyp to draw."""
    predictor = load_predictor(None, "torch", "kvasir")
    srv, thread, port = _serve(create_app(predictor, "kvasir"))
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.read()


def _post(url: str, data: bytes | None, filename: str = "x.png") -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    body = b""
    if data is not None:
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    else:
        body = f"--{boundary}--\r\n".encode()
    return _send(url, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def _send(url: str, body, headers: dict[str, str]) -> tuple[int, dict]:
    """POST ``body`` (bytes, or an iterable of chunks: sent chunked) as a browser would: on a
    keep-alive connection (urllib says ``Connection: close``, and a server that answers an
    oversized upload early then closes the socket under a client still sending)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.netloc, timeout=60)
    try:
        conn.request("POST", parts.path + (f"?{parts.query}" if parts.query else ""), body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _png(h: int, w: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _jpeg(h: int, w: int) -> bytes:
    return _png(h, w, fmt="JPEG")


def test_health_model_page_and_openapi(server):
    base, predictor = server
    assert json.loads(_get(base + "/api/health")[1]) == {"status": "ok"}
    info = json.loads(_get(base + "/api/model")[1])
    assert info["name"] == "tiny" and info["input_size"] == [3, 32, 32] and info["disclaimer"] == DISCLAIMER
    status, page = _get(base + "/")
    text = page.decode()
    assert status == 200 and "tiny" in text and DISCLAIMER in text and "32 x 32" in text
    assert "http://" not in text and "https://" not in text  # every asset served from here
    spec = json.loads(_get(base + "/openapi.json")[1])
    assert "/api/predict" in spec["paths"]


def test_predict_gives_the_mask_at_the_image_size(server):
    base, predictor = server
    status, body = _post(base + "/api/predict?tta=flips&min_lesion_pixels=3", _png(45, 61))
    assert status == 200, body
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
    assert mask.shape == (45, 61) and set(np.unique(mask)) <= {0, 255}
    assert body["width"] == 61 and body["height"] == 45
    assert body["lesion_pixels"] == int((mask > 0).sum())
    assert body["lesion_fraction"] == round(body["lesion_pixels"] / mask.size, 6)
    assert body["n_lesions"] == count_lesions(mask > 0)
    assert body["options"]["tta"] == ["identity", "hflip", "vflip", "hvflip"]
    assert body["options"]["min_lesion_pixels"] == 3
    # the same as the library's own prediction of that image
    from lmnet.data.io import read_image_bytes
    from lmnet.deploy.preprocess import preprocess

    post = PostProcess(tta="flips", min_pixels=3)
    image = read_image_bytes(_png(45, 61))
    cfg = predictor.cfg
    x = preprocess([image], cfg.image_size, cfg.mean, cfg.std)
    import torch

    with torch.inference_mode():
        expected = post.mask(post.probabilities(predictor.model, x, (45, 61))[0])
    assert ((mask > 0) == expected).all()
    _, default = _post(base + "/api/predict", _png(40, 40))
    assert default["options"]["tta"] == ["identity", "hflip"]  # the server's default


@pytest.mark.parametrize("data,status,words", [
    (b"", 400, "empty"),
    (b"this is not an image", 400, "not a readable image"),
    (_png(300, 300)[:400], 400, "not a readable image"),  # truncated
    (_jpeg(300, 300)[:len(_jpeg(300, 300)) // 2], 400, "not a readable image"),  # a truncated JPEG
    (_jpeg(300, 300)[:300], 400, "not a readable image"),  # cut inside the JPEG header
    (_png(1, 1), 400, "too small"),
    (None, 400, "no file"),
])
def test_bad_uploads_are_4xx_with_a_reason_and_the_server_goes_on(server, data, status, words):
    base, _ = server
    got, body = _post(base + "/api/predict", data)
    assert got == status and words in body["error"], body
    assert _post(base + "/api/predict", _png(40, 40))[0] == 200  # still serving


def test_size_limits(server):
    base, _ = server
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(buf, format="BMP")  # 480 kB
    got, body = _post(base + "/api/predict", buf.getvalue(), "big.bmp")
    assert got == 413 and "0.2 MB" in body["error"]
    buf = io.BytesIO()
    Image.new("RGB", (700, 700)).save(buf, format="PNG")  # small file, many pixels
    got, body = _post(base + "/api/predict", buf.getvalue())
    assert got == 413 and "490,000 pixels" in body["error"]
    got, body = _post(base + "/api/predict?threshold=2", _png(40, 40))
    assert got == 422 and "threshold" in body["error"]


def test_an_honest_content_length_over_the_limit_is_refused_before_the_body(server):
    """413 from the headers alone: the client sends no body at all and still gets the answer."""
    import http.client

    base, _ = server
    conn = http.client.HTTPConnection(base.removeprefix("http://"), timeout=30)
    try:
        conn.putrequest("POST", "/api/predict")
        conn.putheader("Content-Type", "multipart/form-data; boundary=b0undary")
        conn.putheader("Content-Length", str(50_000_000))  # 50 MB announced, none of it sent
        conn.endheaders()
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 413 and "0.2 MB" in body["error"] and "--max-upload-mb" in body["error"], body
    assert "50.0 MB" in body["error"]
    assert _get(base + "/api/health")[0] == 200  # still serving
    assert _post(base + "/api/predict", _png(40, 40))[0] == 200


def _chunked_post(url: str, chunks) -> tuple[int, dict]:
    """A multipart upload without Content-Length (Transfer-Encoding: chunked)."""
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()

    def body():
        yield head
        yield from chunks
        yield f"\r\n--{boundary}--\r\n".encode()

    return _send(url, body(), {"Content-Type": f"multipart/form-data; boundary={boundary}"})


def test_a_chunked_upload_is_read_in_memory_and_refused_past_the_limit(server):
    base, _ = server
    data = _png(40, 40)
    got, body = _chunked_post(base + "/api/predict", [data[i:i + 100] for i in range(0, len(data), 100)])
    assert got == 200 and body["width"] == 40, body

    def endless():  # 10 MB in 64 kB chunks, no length announced
        for _ in range(160):
            yield b"\0" * 65536

    got, body = _chunked_post(base + "/api/predict", endless())
    assert got == 413 and "0.2 MB" in body["error"], body
    assert _get(base + "/api/health")[0] == 200


def test_a_large_upload_is_parsed_in_memory_nothing_on_disk(tiny_checkpoint, tmp_path, monkeypatch):
    """A ~3 MB upload (over Starlette's 1 MB spooling threshold) under a 5 MB limit: answered,
    and no temporary file is made (the temporary folder stays empty; no tempfile call at all)."""
    import tempfile

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))
    made = []
    for fn in ("TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        real = getattr(tempfile, fn)

        def spy(*args, _real=real, _fn=fn, **kwargs):
            made.append(_fn)
            return _real(*args, **kwargs)

        monkeypatch.setattr(tempfile, fn, spy)
    predictor = load_predictor(tiny_checkpoint, "torch")
    srv, thread, port = _serve(create_app(predictor, "tiny", ServeLimits(max_upload_mb=5, max_pixels=2_000_000)))
    base = f"http://127.0.0.1:{port}"
    try:
        data = _png(1000, 1000, 3)  # noise: the PNG does not compress
        assert 2.5e6 < len(data) < 5e6
        got, body = _post(base + "/api/predict", data)
        assert got == 200 and body["width"] == 1000 and body["height"] == 1000, body
        assert made == [] and list(tmp.iterdir()) == []
        got, body = _post(base + "/api/predict", _png(1300, 1300, 4))  # 5.1 MB: over, refused
        assert got == 413 and "5 MB" in body["error"], body
        assert made == [] and list(tmp.iterdir()) == []
        assert _get(base + "/api/health")[0] == 200
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def test_concurrent_requests_all_answer(server):
    base, _ = server
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: _post(base + "/api/predict", _png(40 + i, 48, i)), range(6)))
    assert [s for s, _ in results] == [200] * 6
    assert [b["height"] for _, b in results] == [40 + i for i in range(6)]
    assert _get(base + "/api/health")[0] == 200


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow  # starts a browser
@pytest.mark.skipif(_chromium() is None, reason="needs Chromium (Debian: apt-get install chromium; "
                    ".ci/run installs it)")
def test_the_page_in_a_real_browser(kvasir_server, tmp_path):
    """Upload a sample polyp image, wait for the outline, move the slider, download the mask and
    check it against the API's."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (the 'test' extra)")
    from lmnet.data.sample import sample_images

    base = kvasir_server
    image = sample_images(1)[0]
    _, api = _post(base + "/api/predict?tta=flips", image.read_bytes(), image.name)
    expected = np.asarray(Image.open(io.BytesIO(base64.b64decode(api["mask_png"]))))
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(accept_downloads=True)
            page.goto(base + "/")
            assert DISCLAIMER in page.content()
            page.select_option("#tta", "flips")
            page.set_input_files("#files", str(image))
            page.wait_for_selector("canvas.overlay", timeout=60_000)
            status = page.inner_text(".status")
            assert f"{api['lesion_pixels']} pixels" in status and f"{api['n_lesions']} lesion" in status

            def canvas_sum() -> float:
                return page.evaluate("""() => { const c = document.querySelector('canvas.overlay');
                    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                    let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i] + 2 * d[i + 1]; return s; }""")

            page.select_option("#mode", "fill")
            page.eval_on_selector("#opacity", "e => { e.value = 0; e.dispatchEvent(new Event('input')); }")
            clear = canvas_sum()
            page.eval_on_selector("#opacity", "e => { e.value = 100; e.dispatchEvent(new Event('input')); }")
            strong = canvas_sum()
            assert expected.any() and strong != clear  # a lesion, and the slider changes how it is drawn
            with page.expect_download() as info:
                page.click("a.mask-download")
            saved = tmp_path / "mask.png"
            info.value.save_as(saved)
            assert (np.asarray(Image.open(saved)) == expected).all()
            shot = tmp_path / "serve_page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 1000
            import os

            if os.environ.get("LMNET_TEST_ARTIFACTS"):  # kept for whoever runs the suite
                out = os.path.join(os.environ["LMNET_TEST_ARTIFACTS"], "serve_page.png")
                os.makedirs(os.path.dirname(out), exist_ok=True)
                page.screenshot(path=out, full_page=True)
        finally:
            browser.close()


def test_a_slow_prediction_does_not_block_the_page(tiny_checkpoint):
    """Predictions run in worker threads: while one is stuck in the model, the page and health
    answer (the model is held until they have)."""
    predictor = load_predictor(tiny_checkpoint, "torch")
    started, release = threading.Event(), threading.Event()

    def slow(x):
        started.set()
        release.wait(60)
        return predictor.model(torch_from(x)).detach().numpy()

    def torch_from(x):
        import torch

        return torch.from_numpy(x)

    slow_predictor = predictor._replace(model=slow, engine="onnx")  # any callable backend
    srv, thread, port = _serve(create_app(slow_predictor, "slow"))
    base = f"http://127.0.0.1:{port}"
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(_post, base + "/api/predict", _png(40, 40))
            assert started.wait(30)
            assert _get(base + "/api/health")[0] == 200 and _get(base + "/")[0] == 200
            assert not pending.done()  # answered while the prediction is still inside the model
            release.set()
            assert pending.result()[0] == 200
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
