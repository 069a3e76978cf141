"""Stand-in for ``edge-voice run`` in the sd_notify end-to-end test, until the daemon exists.

It follows the daemon's notify contract with the real Notifier and Watchdog:
STATUS=loading models → (audio input opened) READY=1 → WATCHDOG=1 while audio flows →
STATUS=mic lost on end of stream, reopen, STATUS=listening → on SIGTERM STOPPING=1, exit 0.

Audio is raw 16 kHz mono s16le read from ``--audio`` (a FIFO in the test): opening it blocks
until the test starts writing, so READY=1 cannot come before the input is open, and when the
test stops writing the audio loop blocks in read() exactly as a hung capture would.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

from edge.logs import MessageId, log_fields, setup_logging
from edge.systemd import Notifier, Status, Watchdog

_LOGGER = logging.getLogger("edge.standin")
CHUNK_BYTES = 640  # 20 ms of 16 kHz s16le mono


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--audio", required=True)
    parser.add_argument("--fallback", action="store_true", help="do not use systemd-python")
    parser.add_argument("--load-s", type=float, default=0.2)
    args = parser.parse_args(argv)

    setup_logging("info", "standin")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    notifier = Notifier(use_systemd_python=False if args.fallback else None)
    _LOGGER.info("notify backend: %s", notifier.backend)
    watchdog = Watchdog(notifier)

    notifier.status(Status.LOADING_MODELS)
    time.sleep(args.load_s)  # the daemon loads its models here
    _LOGGER.info("models loaded", extra=log_fields(message_id=MessageId.MODEL_LOADED))

    def audio_loop() -> None:
        first = True
        while not stop.is_set():
            with open(args.audio, "rb") as mic:  # blocks until the writer opens the FIFO
                if first:
                    notifier.ready()
                    watchdog.start()
                    _LOGGER.info("ready", extra=log_fields(message_id=MessageId.READY))
                    first = False
                else:
                    notifier.status(Status.LISTENING)
                    _LOGGER.info("audio input reopened", extra=log_fields(message_id=MessageId.MIC_RESTORED))
                while mic.read(CHUNK_BYTES):
                    watchdog.progress()
            notifier.status(Status.MIC_LOST)
            _LOGGER.warning("audio input ended", extra=log_fields(message_id=MessageId.MIC_LOST))

    threading.Thread(target=audio_loop, name="audio", daemon=True).start()
    while not stop.wait(0.1):
        pass
    notifier.stopping()
    watchdog.stop()
    _LOGGER.info("stopped", extra=log_fields(message_id=MessageId.STOPPED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
