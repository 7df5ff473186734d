"""``lmnet serve``: a local HTTP server for a trained model, with a page to look at predictions
and a JSON API for the software around it (FastAPI + uvicorn, the ``serve`` extra).

Routes: ``GET /`` (the page: no build step, no internet, every asset served from here),
``GET /api/health``, ``GET /api/model``, ``POST /api/predict`` (multipart field ``file``; query
``tta``, ``keep_largest``, ``min_lesion_pixels``, ``threshold``), ``GET /openapi.json``. The model
is loaded once; predictions run in a bounded pool of worker threads (the model itself one call at
a time), so the page and the health check answer while a slow request runs. Uploads are parsed and
decoded in memory, never spooled to disk (:func:`read_upload`): a request whose Content-Length is
over ``max_upload_mb`` is refused (413) from its headers alone, one without (chunked) as soon as
what has arrived passes the limit.

(No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations as types.)
"""

import base64
import io
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from lmnet._optional import require
from lmnet.data.io import read_image_bytes
from lmnet.deploy.backends import precision_context
from lmnet.deploy.loading import Predictor
from lmnet.deploy.postprocess import TTA_CHOICES, PostProcess, count_lesions
from lmnet.deploy.preprocess import preprocess

__all__ = ["ServeLimits", "create_app", "predict_bytes", "read_upload", "DISCLAIMER"]

DISCLAIMER = "Research use only: not a medical device. A clinician must check every output."

#: Room a multipart body may take beyond the image file itself (boundaries, part headers, a file
#: name, small form fields), before the request as a whole is over ``--max-upload-mb``.
MULTIPART_ALLOWANCE = 64 * 1024


@dataclass(frozen=True)
class ServeLimits:
    """What an upload may be: at most ``max_upload_mb`` megabytes and ``max_pixels`` pixels, at
    least ``min_side`` pixels a side; ``workers`` predictions at once (decoding, encoding)."""

    max_upload_mb: float = 20.0
    max_pixels: int = 40_000_000
    min_side: int = 8
    workers: int = 2


class UploadError(ValueError):
    """A request the server refuses, with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _png_base64(mask: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def predict_bytes(predictor: Predictor, data: bytes, post: PostProcess, limits: ServeLimits,
                  name: str = "upload", lock: Any = None) -> dict[str, Any]:
    """The lesion mask of one uploaded image file: the JSON the API answers (see the module).
    Raises :class:`UploadError` (4xx) for input the server refuses."""
    if not data:
        raise UploadError(400, "the upload is empty: send an image file in the field 'file'")
    if len(data) > limits.max_upload_mb * 1e6:
        raise UploadError(413, f"the upload is {len(data) / 1e6:.1f} MB, over the limit of "
                               f"{limits.max_upload_mb:g} MB (--max-upload-mb)")
    try:
        with Image.open(io.BytesIO(data)) as im:  # the header only: the size before decoding
            w, h = im.size
    except Exception:  # noqa: BLE001 - Pillow's many reasons all mean the same here
        w = h = None
    if w is not None and w * h > limits.max_pixels:
        raise UploadError(413, f"the image is {w} x {h} = {w * h:,} pixels, over the limit of "
                               f"{limits.max_pixels:,} (--max-pixels)")
    cfg = predictor.cfg
    try:
        image = read_image_bytes(data, cfg.in_channels, name)
    except (ValueError, OSError) as err:
        raise UploadError(400, f"not a readable image: {err}") from None
    height, width = image.shape[:2]
    if min(height, width) < limits.min_side:
        raise UploadError(400, f"the image is {width} x {height} pixels: too small to segment "
                               f"(at least {limits.min_side} x {limits.min_side})")
    x = preprocess([image], cfg.image_size, cfg.mean, cfg.std)
    autocast = predictor.precision if predictor.engine == "torch" else "fp32"
    with lock or threading.Lock(), precision_context(autocast):
        prob = post.probabilities(predictor.model, x, (height, width))[0]
    mask = post.mask(prob)
    area = int(mask.sum())
    return {"width": width, "height": height, "lesion_pixels": area,
            "lesion_fraction": round(area / mask.size, 6), "n_lesions": count_lesions(mask),
            "mask_png": _png_base64(mask), "options": post.describe()}


def _model_info(predictor: Predictor, name: str) -> dict[str, Any]:
    cfg = predictor.cfg
    return {"name": name, "model": cfg.model, "input_size": [cfg.in_channels, cfg.image_size, cfg.image_size],
            "n_classes": cfg.n_classes, "backend": predictor.engine, "precision": predictor.precision,
            "backend_note": predictor.note, "disclaimer": DISCLAIMER}


def create_app(predictor: Predictor, name: str = "model", limits: ServeLimits | None = None,
               default_post: PostProcess | None = None, card: str | None = None) -> Any:
    """The FastAPI application serving ``predictor`` (see the module for the routes)."""
    fastapi = require("fastapi", "serve")
    require("python_multipart", "serve")
    from anyio import CapacityLimiter, to_thread
    from fastapi import Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse

    limits = limits or ServeLimits()
    default_post = default_post or PostProcess()
    lock = threading.Lock()
    pool = CapacityLimiter(limits.workers)
    info = _model_info(predictor, name)
    info["card_summary"] = card
    app = fastapi.FastAPI(title="lmnet serve", version="1",
                          description=f"Lesion segmentation with {name}. {DISCLAIMER}")

    @app.exception_handler(UploadError)
    async def refused(request: Any, err: UploadError) -> Any:
        return JSONResponse({"error": str(err)}, status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Any, err: RequestValidationError) -> Any:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}" for e in err.errors()]
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return _PAGE.replace("{{NAME}}", _html(name)).replace(
            "{{SIZE}}", f"{predictor.cfg.image_size} x {predictor.cfg.image_size}").replace(
            "{{DISCLAIMER}}", DISCLAIMER).replace("{{TTA}}", default_post.tta)

    @app.get("/api/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/model")
    async def model_info() -> dict[str, Any]:
        return info

    # The body is read here, not by FastAPI (whose File() parameters spool to a temporary file
    # past 1 MB): the OpenAPI description of it is given by hand.
    upload_body = {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {"file": {"type": "string", "format": "binary",
                                "description": f"the image file, at most {limits.max_upload_mb:g} MB"}}}}}}

    @app.post("/api/predict", openapi_extra={"requestBody": upload_body})
    async def predict(request: Request,
                      tta: str = Query(default_post.tta, pattern="^(" + "|".join(TTA_CHOICES) + ")$"),
                      keep_largest: bool = Query(default_post.largest),
                      min_lesion_pixels: int = Query(default_post.min_pixels, ge=0),
                      threshold: float = Query(default_post.threshold, ge=0.0, le=1.0)) -> dict[str, Any]:
        data, filename = await read_upload(request, limits)
        post = PostProcess(tta, threshold, keep_largest, min_lesion_pixels)
        return await to_thread.run_sync(predict_bytes, predictor, data, post, limits,
                                        filename or "upload", lock, limiter=pool)

    return app


def _over_limit(limits: ServeLimits, size: float | None = None) -> UploadError:
    what = f"the upload is {size / 1e6:.1f} MB, over" if size else "the upload is over"
    return UploadError(413, f"{what} the limit of {limits.max_upload_mb:g} MB (--max-upload-mb)")


async def read_upload(request: Any, limits: ServeLimits, field: str = "file") -> tuple[bytes, str]:
    """The bytes and file name of the multipart/form-data field ``field`` of ``request`` (a
    Starlette request), parsed in memory as the body arrives: nothing is written to disk. Refused
    with :class:`UploadError`: 413 from the headers alone when the Content-Length is over
    ``limits.max_upload_mb`` (plus :data:`MULTIPART_ALLOWANCE`) and before more than that has been
    read otherwise; 400 for a body that is not multipart, is malformed, or has no field ``field``."""
    from python_multipart.multipart import MultipartParser, parse_options_header
    from starlette.requests import ClientDisconnect

    no_file = UploadError(400, f"no file: send the image as multipart form field '{field}'")
    kind, params = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data":
        raise no_file
    if not params.get(b"boundary"):
        raise UploadError(400, "malformed multipart body: the Content-Type has no boundary")
    file_limit = int(limits.max_upload_mb * 1e6)
    body_limit = file_limit + MULTIPART_ALLOWANCE
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise UploadError(400, f"the Content-Length {length!r} is not a number") from None
        if declared > body_limit:
            raise _over_limit(limits, declared)

    chunks: list[bytes] = []  # the data of the field, once found
    state = {"headers": [], "name": b"", "value": b"", "ours": False, "found": False, "size": 0,
             "filename": "", "ended": False}

    def header_end() -> None:
        state["headers"].append((state["name"].lower(), state["value"]))
        state["name"] = state["value"] = b""

    def headers_finished() -> None:
        disposition = dict(state["headers"]).get(b"content-disposition")
        state["headers"] = []
        _, options = parse_options_header(disposition)
        state["ours"] = options.get(b"name") == field.encode() and not state["found"]
        if state["ours"]:
            state["found"] = True
            state["filename"] = options.get(b"filename", b"").decode("utf-8", "replace")

    def part_data(data: bytes, start: int, end: int) -> None:
        if state["ours"]:
            state["size"] += end - start
            if state["size"] > file_limit:
                raise _over_limit(limits)
            chunks.append(data[start:end])

    def part_end() -> None:
        state["ours"] = False

    def ended() -> None:
        state["ended"] = True

    def keep(key: str):
        return lambda data, start, end: state.__setitem__(key, state[key] + data[start:end])

    parser = MultipartParser(params[b"boundary"], {
        "on_header_field": keep("name"), "on_header_value": keep("value"), "on_header_end": header_end,
        "on_headers_finished": headers_finished, "on_part_data": part_data, "on_part_end": part_end,
        "on_end": ended})
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:
                raise _over_limit(limits)
            parser.write(chunk)
        parser.finalize()
    except ClientDisconnect:
        raise UploadError(400, "the client went away before the upload ended") from None
    except ValueError as err:  # python-multipart's FormParserError and its kin
        if isinstance(err, UploadError):
            raise
        raise UploadError(400, f"malformed multipart body: {err}") from None
    if not state["found"]:
        raise no_file
    if not state["ended"]:
        raise UploadError(400, "malformed multipart body: it ends before its closing boundary")
    return b"".join(chunks), state["filename"]


def _html(text: str) -> str:
    import html

    return html.escape(text)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lmnet: {{NAME}}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;margin:1.5rem;max-width:70rem;color:#222}
 header p{margin:.2rem 0} .warn{color:#8a1c1c;font-weight:600}
 #drop{border:2px dashed #888;padding:1.5rem;text-align:center;border-radius:.5rem;margin:1rem 0}
 #drop.over{background:#eef}
 .item{border:1px solid #ccc;border-radius:.5rem;padding:.8rem;margin:.8rem 0}
 canvas{max-width:100%;height:auto;display:block;margin:.4rem 0}
 .controls label{margin-right:1rem} .err{color:#b00}
</style></head><body>
<header><h1>lmnet: {{NAME}}</h1>
<p>Input size {{SIZE}}; the lesion is drawn over each image.</p>
<p class="warn">{{DISCLAIMER}}</p></header>
<div id="drop">Drop images here, or <input type="file" id="files" accept="image/*" multiple></div>
<div class="controls">
 <label>Display <select id="mode"><option value="outline">outline</option><option value="fill">filled mask</option></select></label>
 <label>Opacity <input type="range" id="opacity" min="0" max="100" value="50"></label>
 <label>Test-time augmentation <select id="tta"><option>none</option><option>hflip</option><option>flips</option></select></label>
 <button id="csv" disabled>Download areas (CSV)</button>
</div>
<div id="results"></div>
<script>
const results=[]; const $=id=>document.getElementById(id);
$("tta").value="{{TTA}}";
function draw(r){const c=r.canvas,g=c.getContext("2d");g.drawImage(r.img,0,0);
 const a=$("opacity").value/100, fill=$("mode").value==="fill";
 const m=r.maskData, im=g.getImageData(0,0,c.width,c.height), d=im.data, w=c.width, h=c.height;
 for(let y=0;y<h;y++)for(let x=0;x<w;x++){const i=y*w+x; if(!m[i])continue;
  const edge=x==0||y==0||x==w-1||y==h-1||!m[i-1]||!m[i+1]||!m[i-w]||!m[i+w];
  if(fill||edge){const k=4*i, col=edge?[255,255,0]:[255,0,0], t=edge&&!fill?Math.max(a,.8):a;
   for(let j=0;j<3;j++)d[k+j]=(1-t)*d[k+j]+t*col[j];}}
 g.putImageData(im,0,0);}
function redraw(){results.forEach(draw);}
$("opacity").oninput=redraw; $("mode").onchange=redraw;
async function handle(file){const div=document.createElement("div");div.className="item";
 div.innerHTML="<b></b> <span class=status>predicting...</span>";div.querySelector("b").textContent=file.name;
 $("results").prepend(div);
 const form=new FormData();form.append("file",file);
 const resp=await fetch("/api/predict?tta="+$("tta").value,{method:"POST",body:form});
 const body=await resp.json();
 if(!resp.ok){div.querySelector(".status").outerHTML="<span class=err></span>";div.querySelector(".err").textContent=body.error||JSON.stringify(body);return;}
 const img=new Image(); img.src=URL.createObjectURL(file); await img.decode();
 const mimg=new Image(); mimg.src="data:image/png;base64,"+body.mask_png; await mimg.decode();
 const c=document.createElement("canvas"); c.width=body.width; c.height=body.height;
 const mc=document.createElement("canvas"); mc.width=body.width; mc.height=body.height;
 const mg=mc.getContext("2d"); mg.drawImage(mimg,0,0); const md=mg.getImageData(0,0,mc.width,mc.height).data;
 const mask=new Uint8Array(body.width*body.height); for(let i=0;i<mask.length;i++)mask[i]=md[4*i]>127?1:0;
 const r={name:file.name,img:img,canvas:c,maskData:mask,body:body}; results.push(r);
 div.querySelector(".status").textContent=`lesion: ${body.lesion_pixels} pixels (${(100*body.lesion_fraction).toFixed(2)} % of the image), ${body.n_lesions} lesion(s)`;
 c.className="overlay"; div.appendChild(c);
 const a=document.createElement("a"); a.textContent="Download mask (PNG)"; a.className="mask-download";
 a.href="data:image/png;base64,"+body.mask_png; a.download=file.name.replace(/\\.[^.]*$/,"")+"_mask.png"; div.appendChild(a);
 draw(r); $("csv").disabled=false;}
$("files").onchange=e=>[...e.target.files].forEach(handle);
const drop=$("drop"); drop.ondragover=e=>{e.preventDefault();drop.classList.add("over");};
drop.ondragleave=()=>drop.classList.remove("over");
drop.ondrop=e=>{e.preventDefault();drop.classList.remove("over");[...e.dataTransfer.files].forEach(handle);};
$("csv").onclick=()=>{const rows=["file,width,height,lesion_pixels,lesion_fraction,n_lesions"].concat(
 results.map(r=>[JSON.stringify(r.name),r.body.width,r.body.height,r.body.lesion_pixels,r.body.lesion_fraction,r.body.n_lesions].join(",")));
 const a=document.createElement("a");a.href=URL.createObjectURL(new Blob([rows.join("\\n")+"\\n"],{type:"text/csv"}));
 a.download="areas.csv";a.click();};
</script></body></html>
"""
