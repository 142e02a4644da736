"""Specification of how cancelflow logs: silent unless enabled, from the real place, with
ids bound, routable to the standard library's logging, never with local variables."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from loguru import logger

import cancelflow
from cancelflow import CancellationRegistry, CancellationToken
from cancelflow._log import safe_log
from support import WAIT, LogCapture


@pytest.fixture
def stdlib_records() -> Iterator[list[logging.LogRecord]]:
    """What reaches the standard library's ``cancelflow`` logger through log_to_logging."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root = logging.getLogger()
    handler = Keep(level=logging.DEBUG)
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.DEBUG)
    sink_id = cancelflow.log_to_logging()
    try:
        yield records
    finally:
        logger.remove(sink_id)
        logger.disable("cancelflow")
        root.removeHandler(handler)
        root.setLevel(level)


#: a program's lines that make cancelflow log an error: a cancel callback that raises
_CALLBACK_ERROR = textwrap.dedent(
    """
    def fail():
        raise RuntimeError("boom")

    token = cancelflow.CancellationToken()
    token.on_cancel(fail)
    token.cancel("go")
    """
)


#: a program's first lines: import cancelflow, then put back the import hooks as they
#: were before, so that loguru, imported next, is imported past cancelflow's hook
_PAST_THE_HOOK = (
    "import sys\nsaved = list(sys.meta_path)\nimport cancelflow\nsys.meta_path[:] = saved\n"
)


def _run(program: str) -> subprocess.CompletedProcess[str]:
    """Run ``program`` in a fresh interpreter; it must succeed."""
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=WAIT
    )
    assert done.returncode == 0, done.stderr
    return done


class TestSilentByDefault:
    def test_a_program_that_runs_pipelines_prints_nothing(self) -> None:
        """Test that a fresh program running a completed and a cancelled pipeline (which
        log at DEBUG and INFO when enabled) writes nothing to stderr or stdout."""
        program = textwrap.dedent(
            """
            import asyncio
            from cancelflow import PipelineExecutor, Node

            async def work(ctx):
                await asyncio.sleep(0)
                return 1

            async def main():
                executor = PipelineExecutor()
                await executor.run_pipeline("ok", [Node("a", work)])
                task = asyncio.ensure_future(
                    executor.run_pipeline("stop", [Node("b", work), Node("c", work, deps=["b"])])
                )
                await asyncio.sleep(0)  # let it register
                await executor.registry.cancel("stop", "enough")
                assert (await task).cancelled

            asyncio.run(main())
            """
        )
        done = subprocess.run(
            [sys.executable, "-c", program], capture_output=True, text=True, timeout=WAIT
        )
        assert done.returncode == 0, done.stderr
        assert (done.stdout, done.stderr) == ("", "")

    def test_importing_cancelflow_does_not_import_loguru(self) -> None:
        """Test that loguru (and the asyncio it imports) is not imported by cancelflow: a
        record logged where loguru was never imported could reach no sink."""
        done = _run("import sys, cancelflow; print('loguru' in sys.modules)")
        assert done.stdout == "False\n"

    @pytest.mark.parametrize("first", ["cancelflow", "loguru"])
    def test_records_stay_off_whichever_is_imported_first(self, first: str) -> None:
        """Test that a program importing loguru before or after cancelflow (loguru's
        default sink writes to stderr) sees nothing of a callback's error record."""
        second = "loguru" if first == "cancelflow" else "cancelflow"
        done = _run(f"import {first}, {second}\n{_CALLBACK_ERROR}")
        assert (done.stdout, done.stderr) == ("", "")

    def test_enable_after_importing_loguru_later_turns_the_records_on(self) -> None:
        """Test that ``logger.enable("cancelflow")`` works in a program that imports
        loguru after cancelflow (the library was silenced as loguru's module ran, before
        the application's call)."""
        program = (
            "import cancelflow\nfrom loguru import logger\n"
            f'logger.enable("cancelflow")\n{_CALLBACK_ERROR}'
        )
        done = _run(program)
        assert "raised" in done.stderr, done.stderr
        assert "RuntimeError: boom" in done.stderr

    def test_enable_after_a_probe_for_loguru_turns_the_records_on(self) -> None:
        """Test that asking whether loguru is installed (``importlib.util.find_spec``)
        before importing it leaves ``enable("cancelflow")`` working (regression: the
        probe used up the import hook, and the records were dropped for good)."""
        program = (
            "import importlib.util, cancelflow\n"
            "assert importlib.util.find_spec('loguru') is not None\n"
            "from loguru import logger\n"
            f'logger.enable("cancelflow")\n{_CALLBACK_ERROR}'
        )
        assert "RuntimeError: boom" in _run(program).stderr

    def test_enable_works_when_loguru_was_imported_past_the_hook(self) -> None:
        """Test that a program that put back ``sys.meta_path`` as it was before it
        imported cancelflow, then imports loguru and enables cancelflow, gets the records
        (regression: the first record disabled what the program had enabled)."""
        program = (
            f"{_PAST_THE_HOOK}from loguru import logger\n"
            f'logger.enable("cancelflow")\n{_CALLBACK_ERROR}'
        )
        assert "RuntimeError: boom" in _run(program).stderr

    def test_loguru_imported_past_the_hook_stays_silent(self) -> None:
        """Test that without ``enable``, a loguru imported past the hook sees nothing of
        cancelflow's records."""
        program = f"{_PAST_THE_HOOK}import loguru\n{_CALLBACK_ERROR}"
        done = _run(program)
        assert (done.stdout, done.stderr) == ("", "")

    def test_reloading_loguru_does_not_turn_the_records_on(self) -> None:
        """Test that ``importlib.reload(loguru)`` (a fresh logger with loguru's default
        stderr sink) does not make cancelflow print (regression: it logged to the new
        logger, never disabled)."""
        program = (
            f"import importlib, cancelflow, loguru\nimportlib.reload(loguru)\n{_CALLBACK_ERROR}"
        )
        done = _run(program)
        assert (done.stdout, done.stderr) == ("", "")

    def test_cancelflow_imports_where_loguru_is_blocked(self) -> None:
        """Test that ``import cancelflow`` works where loguru's import is blocked
        (``sys.modules["loguru"] = None``) and a record is dropped there (regression:
        AttributeError at import)."""
        program = f"import sys\nsys.modules['loguru'] = None\nimport cancelflow\n{_CALLBACK_ERROR}"
        done = _run(program)
        assert (done.stdout, done.stderr) == ("", "")

    def test_one_module_enabled_past_the_hook_stays_enabled(self) -> None:
        """Test that ``enable("cancelflow._token")`` on a loguru imported past the hook
        is kept when cancelflow adopts that loguru (regression: wiped by its disable)."""
        program = (
            f"{_PAST_THE_HOOK}from loguru import logger\n"
            f'logger.enable("cancelflow._token")\n{_CALLBACK_ERROR}'
        )
        assert "RuntimeError: boom" in _run(program).stderr

    def test_enable_after_reloading_loguru_turns_the_records_on(self) -> None:
        """Test that after ``importlib.reload(loguru)``, ``enable("cancelflow")`` on the
        new logger delivers the records (regression: they went to the old one)."""
        program = (
            "import importlib, cancelflow, loguru\nimportlib.reload(loguru)\n"
            f'loguru.logger.enable("cancelflow")\n{_CALLBACK_ERROR}'
        )
        assert "RuntimeError: boom" in _run(program).stderr

    def test_a_probed_spec_of_loguru_reads_its_data(self) -> None:
        """Test that loguru's spec found after cancelflow's import has a loader that
        answers what loguru's own does (``pkgutil.get_data``; regression: None)."""
        program = (
            "import cancelflow, importlib.util\n"
            "spec = importlib.util.find_spec('loguru')\n"
            "print(spec.loader.is_package('loguru'), spec.loader.get_data(spec.origin)[:0])"
        )
        assert _run(program).stdout == "True b''\n"

    def test_enabling_cancelflow_turns_the_records_on(self, logs: LogCapture) -> None:
        """Test that logger.enable("cancelflow") (what the logs fixture does) delivers the
        library's records."""
        token = CancellationToken()
        token.on_cancel(_raise)
        token.cancel("go")
        assert any("callback" in m for m in logs.messages("ERROR"))


def _raise() -> None:
    secret = "hunter2-local-value"
    raise RuntimeError(f"boom {len(secret)}")


class TestRecords:
    def test_a_record_names_the_module_and_function_that_logged_it(self, logs: LogCapture) -> None:
        """Test that a record's name, function and line are the caller's, not the wrapper's."""
        safe_log("INFO", "from the test")
        [record] = [r for r in logs.cancelflow() if r["message"] == "from the test"]
        assert record["name"] == __name__
        assert record["function"] == ("test_a_record_names_the_module_and_function_that_logged_it")

    def test_one_module_can_be_silenced(self, logs: LogCapture) -> None:
        """Test that disabling one module's records (the registry's) keeps the others."""
        logger.disable("cancelflow._registry")
        try:
            registry = CancellationRegistry()
            registry.register("p1")
            registry.unregister("p1")
            safe_log("INFO", "still here")
        finally:
            logger.enable("cancelflow._registry")
        names = {r["name"] for r in logs.cancelflow()}
        assert "cancelflow._registry" not in names
        assert __name__ in names

    def test_ids_are_bound(self, logs: LogCapture) -> None:
        """Test that the ids a record is about travel in its extra dict."""
        safe_log("INFO", "about a node", pipeline_id="p", node_id="n")
        [record] = [r for r in logs.cancelflow() if r["message"] == "about a node"]
        assert record["extra"]["pipeline_id"] == "p"
        assert record["extra"]["node_id"] == "n"

    def test_an_exception_is_logged_without_local_variables(self, logs: LogCapture) -> None:
        """Test that a callback's error, rendered by a loguru sink with diagnose=True
        (logger.add's default), shows its traceback but none of its local variables."""
        rendered: list[str] = []
        sink = logger.add(rendered.append, level="ERROR", diagnose=True, backtrace=True)
        try:
            token = CancellationToken()
            token.on_cancel(_raise)
            token.cancel("go")
        finally:
            logger.remove(sink)
        text = "".join(rendered)
        assert "RuntimeError: boom 19" in text
        assert "in _raise" in text  # the traceback is there
        assert "hunter2-local-value" not in text


class TestStandardLogging:
    def test_records_reach_logging_with_level_place_and_ids(
        self, stdlib_records: list[logging.LogRecord]
    ) -> None:
        """Test that log_to_logging sends each record to the logger named after its module,
        with its level, function, line and bound ids."""
        safe_log("WARNING", "to logging", pipeline_id="p7")
        [record] = [r for r in stdlib_records if r.getMessage() == "to logging"]
        assert record.name == __name__
        assert record.levelno == logging.WARNING
        assert record.funcName == "test_records_reach_logging_with_level_place_and_ids"
        assert record.pipeline_id == "p7"  # type: ignore[attr-defined]

    def test_an_error_arrives_with_exc_info(self, stdlib_records: list[logging.LogRecord]) -> None:
        """Test that a callback's error reaches logging with its exception as exc_info."""
        token = CancellationToken()
        token.on_cancel(_raise)
        token.cancel("go")
        errors = [r for r in stdlib_records if r.levelno == logging.ERROR]
        assert errors
        assert errors[0].exc_info is not None
        assert isinstance(errors[0].exc_info[1], RuntimeError)

    def test_a_library_module_logs_under_the_cancelflow_logger(
        self, stdlib_records: list[logging.LogRecord]
    ) -> None:
        """Test that a library module's record (the registry's) goes to a logger under
        "cancelflow", so configuring logging.getLogger("cancelflow") reaches it."""
        registry = CancellationRegistry()
        registry.register("p2")
        registry.unregister("p2")
        names = {r.name for r in stdlib_records}
        assert "cancelflow._registry" in names
        library = logging.getLogger("cancelflow")
        assert logging.getLogger("cancelflow._registry").parent is library


class TestWaveNumbersInText:
    def test_the_end_of_a_run_counts_waves_from_one(self, logs: LogCapture) -> None:
        """Test that the log line of a run's end says "in wave 1 of 2" for a run cancelled
        in its first wave (wave_num 0), never "wave 0/2"."""
        import asyncio

        from cancelflow import Node, NodeContext, PipelineExecutor

        started: list[asyncio.Event] = []

        async def first(ctx: NodeContext) -> None:
            started[0].set()
            await asyncio.Event().wait()

        async def second(ctx: NodeContext) -> None:
            return None

        async def main() -> None:
            started.append(asyncio.Event())
            async with PipelineExecutor(mode="interrupt") as executor:
                task = asyncio.ensure_future(
                    executor.run_pipeline("w", [Node("a", first), Node("b", second, deps=["a"])])
                )
                await started[0].wait()
                await executor.registry.cancel("w", "stop")
                assert (await task).wave_cancelled_at == 0

        asyncio.run(main())
        [line] = [m for m in logs.messages() if m.startswith("pipeline ended:")]
        assert line == "pipeline ended: cancelled in wave 1 of 2"
