"""``python -m hub.server --root DIR [--host H] [--port N] [--token T]``: serve until interrupted.

The token may also come from ``LORA_HUB_TOKEN`` (keeps it out of ``ps``). The first line printed is
``serving <url>``, flushed, so a parent process can wait for it.
"""

from __future__ import annotations

import argparse
import os

from .app import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hub.server", description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder holding the repositories")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--token", default=os.environ.get("LORA_HUB_TOKEN"), help="token required for writes")
    parser.add_argument(
        "--lfs-threshold",
        type=int,
        default=None,
        metavar="BYTES",
        help="announce files this large as LFS (clients must set HF_HUB_DISABLE_XET=1)",
    )
    parser.add_argument("--max-upload-mb", type=float, default=1024.0, help="largest upload accepted")
    parser.add_argument("--log", action="store_true", help="log requests (method, path, status) to stderr")
    args = parser.parse_args(argv)
    server = serve(
        args.root,
        args.host,
        args.port,
        args.token,
        lfs_threshold=args.lfs_threshold,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        log=args.log,
    )
    print(f"serving {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
