"""A recording stand-in for the `tensorrt` module: every attribute name the code touches
(read, set or called) is logged, so a test can check the names of a code path against a
TensorRT version's real bindings. `values` answers the few names whose result matters."""
import types


class Recorder:
    def __init__(self, log, values):
        object.__setattr__(self, "_log", log)
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        self._log.add(name)
        return self._values[name] if name in self._values else Recorder(self._log, self._values)

    def __setattr__(self, name, value):
        self._log.add(name)

    def __call__(self, *args, **kwargs):
        return Recorder(self._log, self._values)

    def __int__(self):
        return 0

    __index__ = __int__

    def __bool__(self):
        return True

    def __bytes__(self):
        return b"stub"

    def __iter__(self):
        return iter(())


def stub_tensorrt(version: str, values=None) -> tuple[types.ModuleType, set]:
    """-> (module, the set of names it has been asked for)."""
    log = set()
    root = Recorder(log, dict(values or {}))
    module = types.ModuleType("tensorrt")
    module.__version__ = version
    module.__getattr__ = root.__getattr__
    return module, log
