"""llama.cpp's own HTTP server (the one inside xllamacpp) on 127.0.0.1, for the OpenAI backend's tests.

Run as ``python -m tests.chat.llama_server GGUF [--api-key KEY]``: it serves the GGUF on a free port,
prints its base address (``http://127.0.0.1:PORT``) on one stdout line once the model is loaded, and
stops when its stdin closes, so it never outlives the test process that started it. A subprocess, not a
thread: the server under test must not share the interpreter (or the GIL) with the client it answers.
"""

from __future__ import annotations

import argparse
import sys


def main() -> None:
    import xllamacpp as xlc

    parser = argparse.ArgumentParser()
    parser.add_argument("gguf")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args()
    params = xlc.CommonParams()
    params.model.path = args.gguf
    params.n_parallel = args.parallel
    params.n_ctx = 2048 * args.parallel
    params.cpuparams.n_threads = 1
    params.cpuparams_batch.n_threads = 1
    params.cpuparams.poll = 0  # no busy-waiting: the test machine's cores are shared
    params.cpuparams_batch.poll = 0
    params.endpoint_metrics = True
    params.offline = True
    params.verbosity = -1
    params.hostnames = ["127.0.0.1"]
    params.port = 0  # a free port, reported below
    if args.api_key:
        params.api_keys = [args.api_key]
    server = xlc.Server(params)
    print(server.listening_address, flush=True)
    sys.stdin.read()  # until the parent closes the pipe (or dies)
    del server


if __name__ == "__main__":
    main()
