"""Training steps that a Ctrl-C or a SIGTERM stops between, never inside."""
import signal
import threading

# The signals caught, each only while it has the handler a fresh `python` gives it
STOPS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


def between_steps(steps):
    """Yield from steps; a Ctrl-C (SIGINT) or a SIGTERM (`kill`, `timeout`, a cluster ending a job) raises
    KeyboardInterrupt only before the next step (or after the last), so the step in progress finishes and the script's
    handler saves a whole step. Python's own Ctrl-C can land anywhere, even inside a finalizer, where Python prints the
    exception and drops it, and training would go on; a SIGTERM would end the process without a save. A second signal
    raises at once. A signal whose handler is not the default (ignored, another program's), or any signal in another
    thread than the main one, is left alone."""
    caught = [s for s, default in STOPS.items() if signal.getsignal(s) is default]
    if threading.current_thread() is not threading.main_thread() or not caught:
        yield from steps
        return
    pressed = []

    def on_stop(signum, frame):
        pressed.append(signum)
        if len(pressed) > 1:
            raise KeyboardInterrupt

    for s in caught:
        signal.signal(s, on_stop)
    try:
        for step in steps:
            if pressed:
                raise KeyboardInterrupt
            yield step
        if pressed:
            raise KeyboardInterrupt
    finally:
        for s in caught:
            signal.signal(s, STOPS[s])
