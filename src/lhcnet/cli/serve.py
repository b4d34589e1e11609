"""``lhcnet serve``: the web page and HTTP API on this computer (``pip install "lhcnet[serve]"``)."""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from .predict import positive_int

TOKEN_VARIABLE = "LHCNET_TOKEN"


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="web page and HTTP API for photos, videos and the webcam (local, offline)",
        description="Serve a web page (drop photos, or use the webcam) and an HTTP API "
                    "(/v1/predict, /v1/annotate, /v1/video; docs at /docs). Listens on 127.0.0.1 "
                    "only unless --host says otherwise. Needs: pip install 'lhcnet[serve]'.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this computer only; 0.0.0.0: "
                        "every network interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--model", help="model file (.safetensors or .onnx), or a bundled model by name: "
                   "default (the most accurate; the default) or lhcnet (the best LHC-Net)")
    p.add_argument("--detector", help="face detector name for Predictor, e.g. yunet, haar, none "
                                      "(default: the Predictor's default)")
    p.add_argument("--device", help="cpu, cuda, cuda:1... (default: cuda if available)")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="PyTorch or ONNX Runtime (pip install 'lhcnet[onnx]')")
    p.add_argument("--token", help=f"require 'Authorization: Bearer TOKEN' on every API request "
                                   f"(default: ${TOKEN_VARIABLE} if set, else no token)")
    p.add_argument("--max-upload-mb", type=positive_float, default=20.0, metavar="MB",
                   help="largest request body (default 20 MB); larger ones get 413")
    p.add_argument("--max-files", type=positive_int, default=16, metavar="N",
                   help="most images in one /v1/predict request (default 16)")
    p.add_argument("--max-video-frames", type=positive_int, default=300, metavar="N",
                   help="most frames read from one video (default 300)")
    p.add_argument("--timeout", type=positive_float, default=60.0, metavar="S",
                   help="seconds a request may take, upload included (default 60); then 504")
    p.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve import ServeSettings, create_app
    except ImportError as exc:
        print(f"lhcnet serve: error: it needs FastAPI and uvicorn, which are not installed "
              f"({exc.name or exc}): pip install 'lhcnet[serve]'", file=sys.stderr)
        return 2
    from ..predict import Predictor

    token = args.token or os.environ.get(TOKEN_VARIABLE) or None
    options = {} if args.detector is None else {"detector": args.detector}
    try:
        predictor = Predictor(args.model, args.device, backend=args.backend, **options)
    except ImportError as exc:  # the optional ONNX packages
        print(f"lhcnet serve: error: {exc}", file=sys.stderr)
        return 2
    settings = ServeSettings(token=token, max_upload_bytes=int(args.max_upload_mb * 1e6),
                             max_files=args.max_files, timeout_s=args.timeout,
                             max_video_frames=args.max_video_frames)
    if not is_loopback(args.host):
        print(f"lhcnet serve: warning: listening on {args.host}, so other computers on the network "
              f"can reach this server; " + ("they need the token." if token else
              "anyone who can reach it can use it: set --token."), file=sys.stderr)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"lhcnet serve: {predictor!r}\nlhcnet serve: open http://{shown}:{args.port}/"
          + ("#token=<token>" if token else "") + f"  (API docs: http://{shown}:{args.port}/docs)",
          file=sys.stderr, flush=True)
    uvicorn.run(create_app(predictor, settings), host=args.host, port=args.port, log_level="info",
                server_header=False)
    return 0
