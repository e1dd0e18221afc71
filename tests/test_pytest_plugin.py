"""The pytest plugin, used as users use it: a fresh test suite in a separate pytest run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SERVICE = """
    import os, sys, time
    import rpc

    registry = rpc.Registry()

    @registry.expose
    def add(x, y):
        return x + y

    @registry.expose
    def pid():
        return os.getpid()

    @registry.expose
    def complain(text):
        print("handler says:", text, file=sys.stderr, flush=True)
        return len(text)

    @registry.expose
    def crash():
        os._exit(3)
"""

USER_TESTS = """
    import pytest
    import rpc

    @pytest.mark.rpc_registry("myservice:registry")
    def test_client_from_marker(rpc_client):
        assert rpc_client.add(2, 3) == 5

    def test_server_factory_over_tcp(rpc_server):
        server = rpc_server("myservice:registry", workers=1, transport="tcp")
        assert isinstance(server.address, tuple)
        with server.client() as client:
            assert client.add(1, 2) == 3

    def test_two_servers_in_one_test(rpc_server):
        a, b = rpc_server("myservice:registry", workers=1), rpc_server("myservice:registry", workers=1)
        assert a.address != b.address and a.authkey != b.authkey
        with a.client() as ca, b.client() as cb:
            assert ca.pid() != cb.pid()

    def test_crashed_handlers_do_not_break_teardown(rpc_server):
        server = rpc_server("myservice:registry", workers=1)
        with server.client() as client:
            with pytest.raises(rpc.WorkerCrashed):
                client.crash()

    @pytest.mark.parametrize("n", range(4))
    def test_many_small_tests(rpc_server, n):
        with rpc_server("myservice:registry", workers=1).client() as client:
            assert client.add(n, n) == 2 * n
"""


@pytest.fixture
def suite(pytester):
    pytester.makepyfile(myservice=textwrap.dedent(SERVICE), test_user=textwrap.dedent(USER_TESTS))
    return pytester


def test_a_new_suite_passes_with_no_conftest_and_no_setup(suite):
    """Installing rpc is enough: the fixtures come from the pytest11 entry point."""
    result = suite.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=8)


def test_the_same_suite_passes_under_xdist(suite):
    result = suite.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=8)


def test_a_failing_test_shows_its_server_log(suite):
    suite.makepyfile(
        test_failing="""
        import pytest

        @pytest.mark.rpc_registry("myservice:registry", workers=1)
        def test_fails_on_purpose(rpc_client):
            rpc_client.complain("look here")
            assert rpc_client.add(1, 1) == 3
        """
    )
    result = suite.runpytest_subprocess("test_failing.py", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    output = result.stdout.str()
    assert "rpc server log" in output
    assert "handler says: look here" in output  # what the function printed in its handler
    assert "handler_started" in output  # the supervisor's own lines


def test_passing_tests_show_no_server_log(suite):
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=8)
    assert "rpc server log" not in result.stdout.str()


def test_shared_servers_serve_a_whole_module(suite):
    suite.makepyfile(
        test_shared="""
        import pytest

        @pytest.fixture(scope="module")
        def server(rpc_server_module):
            return rpc_server_module("myservice:registry", workers=1)

        pids = set()

        @pytest.mark.parametrize("n", range(3))
        def test_uses_the_module_server(server, rpc_server_module, n):
            assert rpc_server_module("myservice:registry", workers=1) is server
            with server.client() as client:
                pids.add(client.pid())
            assert len(pids) == 1

        def test_session_server(rpc_server_session):
            assert rpc_server_session("myservice:registry") is rpc_server_session("myservice:registry")
        """
    )
    result = suite.runpytest_subprocess("test_shared.py", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)


def test_a_server_that_cannot_start_says_why(suite):
    suite.makepyfile(
        test_broken="""
        def test_bad_registry(rpc_server):
            rpc_server("myservice:nothing_here")
        """
    )
    result = suite.runpytest_subprocess("test_broken.py", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    assert "StartupError" in result.stdout.str()
    assert "has no attribute 'nothing_here'" in result.stdout.str()


def test_rpc_client_without_a_registry_is_a_clear_usage_error(suite):
    suite.makepyfile(test_nothing="def test_needs_registry(rpc_client):\n    pass\n")
    result = suite.runpytest_subprocess("test_nothing.py", "-p", "no:cacheprovider")
    assert "rpc_client needs a registry" in result.stdout.str() + result.stderr.str()


REAPER = Path(__file__).with_name("reaper.py")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses Linux's child subreaper")
@pytest.mark.parametrize("extra", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_no_process_outlives_the_run(suite, extra):
    """Every process the run started (servers, handlers, forkservers) is gone when pytest exits.

    A subreaper adopts whatever pytest leaves behind, so leftovers can be counted.
    """
    env = {**os.environ, "PYTHONPATH": str(suite.path)}
    result = subprocess.run(
        [sys.executable, str(REAPER), "-p", "no:cacheprovider", "-q", *extra],
        cwd=suite.path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    if "8 passed" not in result.stdout:
        pytest.fail(f"the inner run failed:\n{result.stdout}\n{result.stderr}", pytrace=False)
    assert "ORPHANS: none" in result.stdout


# -- a project tested with plain `pytest` ------------------------------------------------

PROJECT_API = """
    import rpc

    registry = rpc.Registry()

    @registry.expose
    def add(x, y):
        return x + y
"""

PROJECT_TESTS = """
    def test_serve_by_import_string(rpc_server):
        with rpc_server("myapp.api:registry", workers=1).client() as client:
            assert client.add(2, 3) == 5
"""


def _plain_pytest(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """Run `pytest` as a user types it in the project folder: the folder is not on sys.path.

    (``runpytest_subprocess`` runs ``python -m pytest`` and puts the folder on PYTHONPATH,
    which hides exactly this.)
    """
    script = Path(sys.executable).with_name("pytest")
    command = [str(script)] if script.exists() else [sys.executable, "-P", "-m", "pytest"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [*command, "-p", "no:cacheprovider", *args],
        cwd=pytester.path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return pytest.RunResult(result.returncode, result.stdout.splitlines(), result.stderr.splitlines(), 0.0)


@pytest.fixture
def project(pytester):
    """myapp/api.py and tests/test_api.py, the layout of a new project."""
    pytester.mkpydir("myapp")
    pytester.path.joinpath("myapp", "api.py").write_text(textwrap.dedent(PROJECT_API))
    pytester.mkdir("tests")
    pytester.path.joinpath("tests", "test_api.py").write_text(textwrap.dedent(PROJECT_TESTS))
    return pytester


def test_plain_pytest_without_pythonpath_names_the_fix(project):
    result = _plain_pytest(project)
    result.assert_outcomes(failed=1)
    output = result.stdout.str()
    assert "No module named 'myapp'" in output
    assert 'pythonpath = ["."]' in output


def test_plain_pytest_with_pythonpath_serves_the_project(project):
    project.path.joinpath("pyproject.toml").write_text('[tool.pytest.ini_options]\npythonpath = ["."]\n')
    project.path.joinpath("tests", "test_api.py").write_text(
        textwrap.dedent(PROJECT_TESTS)
        + textwrap.dedent(
            """
            from myapp.api import registry

            def test_serve_the_registry_object(rpc_server):
                with rpc_server(registry, workers=1).client() as client:
                    assert client.add(1, 1) == 2
            """
        )
    )
    result = _plain_pytest(project)
    result.assert_outcomes(passed=2)


def test_handlers_see_sys_path_entries_added_after_the_first_server_started(project):
    """The forkserver's sys.path dates from its start; each handler gets the test process's."""
    project.path.joinpath("pyproject.toml").write_text('[tool.pytest.ini_options]\npythonpath = ["."]\n')
    project.path.joinpath("tests", "test_late.py").write_text(
        textwrap.dedent(
            """
            import textwrap

            def test_a_module_in_a_folder_added_later(rpc_server, monkeypatch, tmp_path):
                with rpc_server("myapp.api:registry", workers=1).client() as client:
                    assert client.add(2, 3) == 5  # the forkserver is running now
                (tmp_path / "generated.py").write_text(textwrap.dedent('''
                    import rpc
                    registry = rpc.Registry()
                    registry.expose(lambda: "late", name="late")
                '''))
                monkeypatch.syspath_prepend(str(tmp_path))
                with rpc_server("generated:registry", workers=1).client() as client:
                    assert client.late() == "late"
            """
        )
    )
    result = _plain_pytest(project, "tests/test_late.py")
    result.assert_outcomes(passed=1)
