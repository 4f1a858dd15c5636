# The test driver of the `tests` validator. It runs inside the plugin's wasm sandbox (RustPython,
# the standard library frozen in): the project's files come in as `__qlayer_input__` (JSON), never
# from a disk, and the results go back as `__qlayer_output__` (JSON).
#
# It imports the project's modules from memory (a meta-path finder, as `python -m unittest` or
# pytest would find them from the project's root, `src/` or a test's own folder), collects
# unittest test cases and pytest-style test functions and classes, and runs each test with a
# time and a memory budget enforced by a trace function, so a test that loops or allocates
# without end fails on its own, named, while the others still run. Output is captured and capped.

import sys
import json
import time
import io
import types
import importlib.util
import linecache
import unittest
import _qlayer

_INPUT = json.loads(__qlayer_input__)
FILES = _INPUT["files"]
TESTS = _INPUT["tests"]
LIMITS = _INPUT["limits"]
ROOT = "/project/"
RESULTS = []
ROOTS = ["", "src/"]


def _rel(filename):
    """A traceback's file name as the project's path, or None for the standard library."""
    if isinstance(filename, str) and filename.startswith(ROOT) and filename[len(ROOT):] in FILES:
        return filename[len(ROOT):]
    return None


class _Loader:
    def __init__(self, path):
        self.path = path

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        if self.path is None:
            return
        source = FILES[self.path]
        module.__file__ = ROOT + self.path
        code = compile(source, ROOT + self.path, "exec")
        exec(code, module.__dict__)


class _Finder:
    """Finds the project's modules among its files."""

    def find_spec(self, name, path=None, target=None):
        rel = name.replace(".", "/")
        for root in ROOTS:
            init = root + rel + "/__init__.py"
            if init in FILES:
                spec = importlib.util.spec_from_loader(name, _Loader(init), origin=ROOT + init, is_package=True)
                spec.has_location = True
                return spec
            module = root + rel + ".py"
            if module in FILES:
                spec = importlib.util.spec_from_loader(name, _Loader(module), origin=ROOT + module)
                spec.has_location = True
                return spec
        for root in ROOTS:
            prefix = root + rel + "/"
            if any(p.startswith(prefix) and p.endswith(".py") for p in FILES):
                return importlib.util.spec_from_loader(name, _Loader(None), is_package=True)
        return None

    def invalidate_caches(self):
        pass


class _Budget(Exception):
    pass


class _Capped(io.TextIOBase):
    """A test's stdout or stderr: kept up to the output limit, the rest counted and dropped."""

    def __init__(self):
        self.parts = []
        self.size = 0
        self.dropped = 0

    def writable(self):
        return True

    def write(self, s):
        s = str(s)
        room = LIMITS["output_chars"] - self.size
        if room > 0:
            kept = s[:room]
            self.parts.append(kept)
            self.size += len(kept)
            self.dropped += len(s) - len(kept)
        else:
            self.dropped += len(s)
        return len(s)

    def text(self):
        out = "".join(self.parts)
        if self.dropped:
            out += "\n[%d more characters of output dropped]" % self.dropped
        return out


_state = {"deadline": 0.0, "ticks": 0, "stopped": None}


def _tracer(frame, event, arg):
    # Called for every new frame ("call") and, in the project's own frames, for every line: the
    # standard library's and this driver's frames are not traced line by line (a loop there
    # is bounded by the instance's limits), which keeps the budgets' cost low.
    if event == "call" and not frame.f_code.co_filename.startswith(ROOT):
        _count()
        return None
    _count()
    return _tracer


def _count():
    _state["ticks"] += 1
    if _state["ticks"] % 32 == 0:
        if time.monotonic() > _state["deadline"]:
            _state["stopped"] = "time"
            raise TimeoutError("stopped: the test ran past its time limit of %g s" % LIMITS["test_seconds"])
        if _qlayer.allocated() > LIMITS["memory_bytes"]:
            _state["stopped"] = "memory"
            raise MemoryError(
                "stopped: the test held more than its memory limit of %d MiB" % (LIMITS["memory_bytes"] // 1048576)
            )


def _where(tb):
    """The innermost frame of the traceback in one of the project's files: (path, line)."""
    found = (None, None)
    while tb is not None:
        rel = _rel(tb.tb_frame.f_code.co_filename)
        if rel is not None:
            found = (rel, tb.tb_lineno)
        tb = tb.tb_next
    return found


def _describe(exc):
    name = type(exc).__name__
    text = str(exc)
    text = text if len(text) <= 2000 else text[:2000] + "…"
    return "%s: %s" % (name, text) if text else name


def _record(test_id, outcome, path, line, message, output=""):
    RESULTS.append({"id": test_id, "outcome": outcome, "path": path, "line": line, "message": message, "output": output})


def _run_one(test_id, default_path, call):
    """Runs one test under the budgets, capturing its output; records what happened."""
    remaining = LIMITS["total_deadline"] - time.monotonic()
    if remaining <= 0:
        _record(test_id, "not-run", default_path, None, "not run: the tests' total time limit of %g s was used up" % LIMITS["total_seconds"])
        return
    out, err = _Capped(), _Capped()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    _state["deadline"] = time.monotonic() + min(LIMITS["test_seconds"], remaining)
    _state["ticks"] = 0
    _state["stopped"] = None
    failure = None
    skipped = None
    try:
        sys.settrace(_tracer)
        try:
            call()
        finally:
            sys.settrace(None)
    except unittest.SkipTest as e:
        skipped = str(e)
    except BaseException as e:  # a test's failure, whatever it raised, is the test's result
        failure = e
    finally:
        sys.stdout, sys.stderr = saved
    output = (out.text() + err.text())[-4000:]
    if skipped is not None:
        _record(test_id, "skipped", default_path, None, skipped)
        return
    if failure is None:
        _record(test_id, "passed", default_path, None, "", output)
        return
    path, line = _where(failure.__traceback__)
    stopped = _state["stopped"]
    if stopped == "time":
        outcome = "timeout"
    elif stopped == "memory" or isinstance(failure, MemoryError):
        outcome = "memory"
    elif isinstance(failure, AssertionError):
        outcome = "failed"
    else:
        outcome = "error"
    _record(test_id, outcome, path or default_path, line, _describe(failure), output)
    _release(failure)


def _release(exc):
    """Drops an exception's tracebacks: they hold the test's frames (and whatever it allocated)
    in a cycle with the frame that caught it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__context__ or exc.__cause__


def _unittest_cases(suite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _unittest_cases(item)
        else:
            yield item


class _CaseResult(unittest.TestResult):
    """Re-raises a unittest case's outcome so `_run_one` sees it as a pytest-style test's."""

    def __init__(self):
        super().__init__()
        self.raised = None

    def _keep(self, err):
        if self.raised is None:
            self.raised = err[1].with_traceback(err[2])

    def addFailure(self, test, err):
        self._keep(err)

    def addError(self, test, err):
        self._keep(err)

    def addSubTest(self, test, subtest, err):
        if err is not None:
            self._keep(err)

    def addUnexpectedSuccess(self, test):
        self._keep((AssertionError, AssertionError("unexpected success: the test is marked expectedFailure but passed"), None))

    def addSkip(self, test, reason):
        if self.raised is None:
            self.raised = unittest.SkipTest(reason)


def _run_case(case):
    result = _CaseResult()
    case.run(result)
    if result.raised is not None:
        raise result.raised


def _module_of(path):
    """The module name of a test file and the root it is imported from (as unittest and pytest do)."""
    parts = path[:-3].split("/")
    i = len(parts) - 1
    while i > 0 and "/".join(parts[:i]) + "/__init__.py" in FILES:
        i -= 1
    root = "/".join(parts[:i]) + "/" if i > 0 else ""
    return root, ".".join(parts[i:])


def _missing_requirement(exc):
    """The name of a module neither the project nor the sandbox's standard library has."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.split(".")[0]
        if _Finder().find_spec(top) is None:
            return exc.name
    return None


def _collect_and_run(path):
    root, name = _module_of(path)
    if root not in ROOTS:
        ROOTS.append(root)
    deadline = time.monotonic() + LIMITS["test_seconds"]
    _state["deadline"] = deadline
    _state["ticks"] = 0
    _state["stopped"] = None
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Capped(), _Capped()
    try:
        sys.settrace(_tracer)
        try:
            module = importlib.import_module(name)
        finally:
            sys.settrace(None)
    except BaseException as e:
        sys.stdout, sys.stderr = saved
        missing = _missing_requirement(e)
        if missing is not None:
            _record(path, "not-run", path, None,
                    "not run: it imports `%s`, which is neither in the project nor in the sandbox's standard library" % missing)
            _release(e)
            return
        where, line = _where(e.__traceback__)
        if isinstance(e, SyntaxError) and _rel(e.filename):
            where, line = _rel(e.filename), e.lineno
        _record(path, "error", where or path, line, "the test module could not be imported: " + _describe(e))
        _release(e)
        return
    finally:
        sys.stdout, sys.stderr = saved

    loader = unittest.TestLoader()
    for case in _unittest_cases(loader.loadTestsFromModule(module)):
        method = getattr(case, "_testMethodName", None)
        test_id = "%s::%s::%s" % (path, type(case).__name__, method) if method else "%s::%s" % (path, case.id())
        _run_one(test_id, path, lambda case=case: _run_case(case))

    # pytest-style: module-level `test*` functions and `Test*` classes that are not TestCases.
    for attr, value in list(vars(module).items()):
        if attr.startswith("test") and isinstance(value, types.FunctionType) and value.__module__ == module.__name__:
            _run_function(path, attr, value, None)
        elif (
            attr.startswith("Test")
            and isinstance(value, type)
            and not issubclass(value, unittest.TestCase)
            and value.__module__ == module.__name__
        ):
            for method in sorted(m for m in vars(value) if m.startswith("test") and callable(getattr(value, m))):
                _run_function(path, method, getattr(value, method), value)


def _run_function(path, name, func, cls):
    import inspect

    test_id = "%s::%s::%s" % (path, cls.__name__, name) if cls else "%s::%s" % (path, name)
    try:
        params = [
            p.name
            for p in inspect.signature(func).parameters.values()
            if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    if cls is not None:
        params = params[1:]
    if params:
        code = func.__code__
        _record(test_id, "not-run", _rel(code.co_filename) or path, code.co_firstlineno,
                "not run: it asks for pytest fixtures (%s), which the sandbox's runner does not provide" % ", ".join(params))
        return

    def call():
        if cls is None:
            func()
            return
        instance = cls()
        setup = getattr(instance, "setup_method", None)
        if setup is not None:
            setup(getattr(instance, name))
        try:
            getattr(instance, name)()
        finally:
            teardown = getattr(instance, "teardown_method", None)
            if teardown is not None:
                teardown(getattr(instance, name))

    _run_one(test_id, path, call)


def _main():
    LIMITS["total_deadline"] = time.monotonic() + LIMITS["total_seconds"]
    for path, source in FILES.items():
        linecache.cache[ROOT + path] = (len(source), None, source.splitlines(True), ROOT + path)
    sys.meta_path.insert(1, _Finder())
    for path in TESTS:
        _collect_and_run(path)


_main()
__qlayer_output__ = json.dumps({"results": RESULTS})
