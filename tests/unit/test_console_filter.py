"""The console lines tuneloop's own stop causes, dropped; every other line passed on whole."""

from __future__ import annotations

import io
import sys

from tuneloop.control.console_filter import LineFilter, killed_serve_call, without_stop_noise, worker_startup_warning

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


STARTUP = ("\x1b[33m(raylet)\x1b[0m WARNING: 8 PYTHON worker processes have been started on node: 2273 with address: "
           "192.0.2.2, which is 4x the maximum expected startup concurrency (2). This could be a result of using a "
           "large number of actors, or due to tasks blocked in ray.get() calls")


def test_a_drivers_console_drops_the_raylets_startup_warnings_and_colours_no_log_file(monkeypatch):
    import os

    from tuneloop.control.console_filter import quiet_driver_console

    out = io.StringIO()  # not a terminal: a log file, a pipe
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setenv("RAY_COLOR_PREFIX", "unset")  # recorded, so the teardown puts back what was
    monkeypatch.delenv("RAY_COLOR_PREFIX")
    quiet_driver_console()
    quiet_driver_console()  # once is enough: not a filter of a filter
    assert isinstance(sys.stdout, LineFilter) and sys.stdout.stream is out
    print(STARTUP)
    print("(_train_job pid=5734) [tuneloop train] epoch 1/3 step 7/21 loss 0.69")
    print("(raylet) WARNING: something else")
    sys.stdout.close_pending()
    assert out.getvalue() == ("(_train_job pid=5734) [tuneloop train] epoch 1/3 step 7/21 loss 0.69\n"
                              "(raylet) WARNING: something else\n")
    assert os.environ["RAY_COLOR_PREFIX"] == "0"  # Ray reads it at every line it prints


def test_a_line_ray_wrote_into_keeps_its_start_and_a_flush_shows_a_prompt():
    """A print is two writes: Ray's thread between them made 'tuneloop ready at ...' one line
    with the raylet's warning, which was dropped whole."""
    out = io.StringIO()
    stream = LineFilter(out, worker_startup_warning)
    stream.write("tuneloop ready at http://127.0.0.1:8000")
    stream.write(STARTUP)
    stream.write("\n")
    stream.write("\n")
    assert out.getvalue().startswith("tuneloop ready at http://127.0.0.1:8000")
    stream.write("continue? [y/N] ")
    stream.flush()
    assert out.getvalue().endswith("continue? [y/N] ")
    assert worker_startup_warning(STARTUP) and worker_startup_warning(STARTUP.replace("\x1b[33m", "").replace(
        "\x1b[0m", ""))
