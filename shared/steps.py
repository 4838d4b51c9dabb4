"""Training steps that a Ctrl-C stops between, never inside."""
import signal
import threading


def between_steps(steps):
    """Yield from steps; a Ctrl-C raises KeyboardInterrupt only before the next step (or after the last), so the
    step in progress finishes and the script's handler saves a whole step. Python's own Ctrl-C can land anywhere,
    even inside a finalizer, where Python prints the exception and drops it, and training would go on. A second
    Ctrl-C raises at once. Where Ctrl-C is not Python's default (ignored, or another thread), steps pass through."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield from steps
        return
    pressed = []

    def on_ctrl_c(signum, frame):
        pressed.append(signum)
        if len(pressed) > 1:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        for step in steps:
            if pressed:
                raise KeyboardInterrupt
            yield step
        if pressed:
            raise KeyboardInterrupt
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
