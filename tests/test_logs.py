"""The library reports through logging (the ``llmft_utils`` logger), not print: shown on the current stdout at
INFO, silenced by a verbosity setting, and on non-main processes of a launch only from WARNING up."""
import inspect
import logging
import subprocess
import sys

import pytest

from llmft_utils import logs
from llmft_utils.study import cd_sweep, icl_sweep


@pytest.fixture(autouse=True)
def _restore_level():
    root = logging.getLogger(logs.ROOT)
    before = root.level
    yield
    root.setLevel(before)


def test_messages_reach_stdout_and_follow_the_verbosity(capsys, monkeypatch):
    log = logs.get("llmft_utils.something")
    log.info("hello info")
    assert capsys.readouterr().out == "hello info\n"
    logs.set_verbosity("WARNING")
    log.info("hidden")
    log.warning("shown warning")
    assert capsys.readouterr().out == "shown warning\n"
    logs.set_verbosity("info")
    monkeypatch.setenv("RANK", "1")  # a non-main process of a launch: warnings only
    log.info("rank 1 info")
    log.warning("rank 1 warning")
    assert capsys.readouterr().out == "rank 1 warning\n"
    with pytest.raises(ValueError, match="debug, info, warning, error"):
        logs.set_verbosity("loud")


def test_the_environment_sets_the_level_of_a_fresh_process():
    """``llmft-study -q`` exports LLMFT_VERBOSITY=warning for the notebook kernels it starts."""
    code = ("from llmft_utils import logs; l = logs.get('llmft_utils.x'); l.info('info line'); "
            "l.warning('warning line')")
    for level, want in (("warning", "warning line\n"), ("info", "info line\nwarning line\n")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**__import__("os").environ, logs.ENV: level}).stdout
        assert out == want


def test_sweeps_do_not_print():
    for fn in (icl_sweep.run_sweep, cd_sweep.run_cd_sweep):
        assert "print(" not in inspect.getsource(fn), fn.__name__
