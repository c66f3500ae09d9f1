"""Stop requests: SIGTERM / SIGINT set a flag the loop polls, so it can save and exit between steps."""

import signal
import threading
from types import FrameType


class StopRequest:
    """While active, SIGTERM and SIGINT set :attr:`requested` instead of killing the process.

    A second SIGINT (Ctrl-C twice) gets the default behaviour back: the process is interrupted at once.
    Handlers can only be installed from the main thread; elsewhere this never reports a request.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
