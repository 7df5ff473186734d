"""``lmnet serve``: the page and the HTTP API of :mod:`lmnet.engine.serve`."""
from __future__ import annotations

import argparse
import sys


def _card_summary(weights: str | None, checkpoint: str | None) -> str | None:
    """The first paragraph of a pretrained folder's model card, if there is one."""
    if weights is None:
        return None
    from lmnet.deploy.pretrained import resolve_pretrained

    card = resolve_pretrained(weights) / "README.md"
    if not card.is_file():
        return None
    body = [ln for ln in card.read_text().split("\n\n") if ln.strip() and not ln.lstrip().startswith(("#", "---", "<"))]
    return body[0].strip() if body else None


def run(args: argparse.Namespace) -> int:
    require_extra()
    import uvicorn

    from lmnet.deploy.loading import load_predictor
    from lmnet.deploy.postprocess import PostProcess
    from lmnet.engine.serve import ServeLimits, create_app

    if (args.run is None) == (args.weights is None):
        raise ValueError("give a run folder, checkpoint or exported file, or --weights NAME (not both)")
    if args.max_upload_mb <= 0 or args.workers < 1:
        raise ValueError("--max-upload-mb must be positive and --workers at least 1")
    predictor = load_predictor(args.run, args.engine, args.weights, "auto" if args.engine == "auto" else "fp32")
    name = args.weights or str(args.run)
    app = create_app(predictor, name, ServeLimits(args.max_upload_mb, args.max_pixels, workers=args.workers),
                     PostProcess(tta=args.tta), _card_summary(args.weights, args.run))
    print(f"{predictor.note}\nlmnet serve: {name} on http://{args.host}:{args.port}/ "
          f"(API: /api/predict, /api/model, /api/health, /openapi.json; Ctrl-C stops)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def require_extra() -> None:
    from lmnet._optional import require

    for module in ("fastapi", "uvicorn", "python_multipart"):
        require(module, "serve")


def register(sub: argparse._SubParsersAction) -> None:
    from lmnet.cli._flags import old_spelling
    from lmnet.deploy.loading import ENGINE_CHOICES
    from lmnet.deploy.postprocess import TTA_CHOICES

    p = sub.add_parser("serve", help="a local page and HTTP API for a trained model (the 'serve' extra)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", nargs="?", default=None,
                   help="run folder, checkpoint, or exported .onnx/.xml file")
    p.add_argument("--weights", default=None, metavar="NAME",
                   help="a pretrained model instead: a shipped name (kvasir), a folder or a Hub id")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    old_spelling(p, "--engine", "--backend", "engine", choices=ENGINE_CHOICES)
    p.add_argument("--backend", dest="engine", default="auto", choices=ENGINE_CHOICES,
                   help="auto: the fastest here, measured once (bf16 where it agrees); or one backend")
    p.add_argument("--tta", default="flips", choices=TTA_CHOICES,
                   help="the page's and the API's default test-time augmentation")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image accepted")
    p.add_argument("--workers", type=int, default=2, help="predictions prepared at once")
    p.set_defaults(func=run)
