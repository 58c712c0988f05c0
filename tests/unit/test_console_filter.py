"""The console lines tuneloop's own stop causes, dropped; every other line passed on whole."""

from __future__ import annotations

import io
import sys

from tuneloop.control.console_filter import LineFilter, killed_serve_call, without_stop_noise

KILLED = ("\x1b[33m(raylet)\x1b[0m Task ServeController.graceful_shutdown failed. There are infinite retries "
          "remaining, so the task will be retried. Error: The actor is dead because it was killed by `ray.kill`.")


def test_only_the_calls_the_stop_killed_are_dropped_and_lines_are_judged_whole():
    out = io.StringIO()
    stream = LineFilter(out, killed_serve_call)
    stream.write("tuneloop: stopping\n")
    stream.write(KILLED[:40])  # Ray's thread writes a line in pieces: judged once it is whole
    stream.write(KILLED[40:] + "\n(raylet) Task Trainer.run failed: killed by `ray.kill`\npartial")
    stream.close_pending()
    assert out.getvalue() == "tuneloop: stopping\n(raylet) Task Trainer.run failed: killed by `ray.kill`\npartial"


def test_stdout_is_filtered_only_inside_the_stop(capsys):
    with without_stop_noise():
        print(KILLED)
        print("tuneloop: the local Ray stopped")
    print(KILLED)  # outside: printed as it is
    assert capsys.readouterr().out == f"tuneloop: the local Ray stopped\n{KILLED}\n"
    assert not isinstance(sys.stdout, LineFilter)
