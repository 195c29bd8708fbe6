"""A pf-serve app on 127.0.0.1 in a background thread (tests and benchmarks): uvicorn on a
socket bound to port 0, so the port is free by construction."""
from __future__ import annotations

import socket
import threading
import time


class ThreadedServer:
    def __init__(self, app, host: str = "127.0.0.1", start_timeout: float = 30.0):
        import uvicorn
        sock = socket.socket()
        sock.bind((host, 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        from pf_engine.serve.connections import guarded
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                                    http=guarded()))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
