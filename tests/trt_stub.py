"""A stand-in for the `tensorrt` module of one TensorRT version, so that the real Polygraphy
loaders and our TensorRT backend run without TensorRT or a GPU:

- a name exists (on the module, an enum or any object) only if that version's real
  Python bindings register it (their string table, read from the PyPI `*-bindings`
  wheel), else AttributeError, as the real module raises; every name asked for is logged;
- the builder, network, config, optimization profile, runtime, engine and execution
  context keep the state tests assert on: flags set and cleared, layer precisions and
  output types, profile shapes, the calibration profile, pool limits, DLA settings, the
  loggers handed to TensorRT;
- the ONNX parser makes layers from the file's nodes, named as TensorRT's parser names
  them (a node's first layer after the node, a second one `<node>_<n>`; from 8.6 every
  layer's metadata is '[ONNX Layer: <node>]').
"""
from __future__ import annotations

import itertools
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

WHEELS = {  # version -> the bindings wheel of that version on PyPI
    "8.6.1": "tensorrt-bindings==8.6.1",
    "10.3.0": "tensorrt-cu12-bindings==10.3.0",
    "10.13.3": "tensorrt-cu12-bindings==10.13.3.9",
    "11.4.0": "tensorrt-cu13-bindings==11.4.0.106",
}
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "tensorrt-bindings"

ENUMS = {
    "BuilderFlag": ["FP16", "INT8", "TF32", "BF16", "FP8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS",
                    "GPU_FALLBACK", "DIRECT_IO", "REFIT", "SPARSE_WEIGHTS", "DISABLE_TIMING_CACHE"],
    "NetworkDefinitionCreationFlag": ["EXPLICIT_BATCH", "STRONGLY_TYPED"],
    "DataType": ["FLOAT", "HALF", "INT8", "INT32", "INT64", "BOOL", "UINT8"],
    "MemoryPoolType": ["WORKSPACE", "DLA_MANAGED_SRAM", "DLA_LOCAL_DRAM", "DLA_GLOBAL_DRAM"],
    "DeviceType": ["GPU", "DLA"],
    "LayerType": ["CONVOLUTION", "MATRIX_MULTIPLY", "SOFTMAX", "SHAPE", "CONSTANT", "QUANTIZE", "DEQUANTIZE",
                  "ELEMENTWISE", "NORMALIZATION", "CAST", "SHUFFLE"],
    "TensorIOMode": ["NONE", "INPUT", "OUTPUT"],
    "ProfilingVerbosity": ["LAYER_NAMES_ONLY", "DETAILED", "NONE"],
    "TensorFormat": ["LINEAR"],
}
# ONNX element type -> TensorRT DataType name (float16 tensors are HALF, index tensors INT64 ...)
ONNX_TYPES = {1: "FLOAT", 10: "HALF", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 2: "UINT8"}


def bindings_strings(version: str) -> bytes:
    """The string table of `version`'s compiled bindings (its wheel fetched from PyPI once, into
    .cache/); the test skips where PyPI cannot be reached."""
    CACHE.mkdir(parents=True, exist_ok=True)
    pattern = f"*-{version.split('.')[0]}.{version.split('.')[1]}*.whl"
    found = sorted(CACHE.glob(pattern))
    if not found:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                   "--python-version", "3.11", "--platform", "manylinux_2_17_x86_64", "--platform",
                   "manylinux_2_28_x86_64", WHEELS[version], "-d", str(CACHE)]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
        found = sorted(CACHE.glob(pattern))
        if proc.returncode or not found:
            pytest.skip(f"cannot fetch {WHEELS[version]} from PyPI: {proc.stderr.strip()[-200:]}")
    with zipfile.ZipFile(found[0]) as wheel:
        return wheel.read(next(n for n in wheel.namelist() if n.endswith("tensorrt.so")))


def install(monkeypatch, trt):
    """Make `trt` the `tensorrt` that Polygraphy and our code import, for one test."""
    import polygraphy.backend.trt.util as polygraphy_util
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(polygraphy_util, "TRT_LOGGER", None)  # Polygraphy's process-wide logger: made anew
    for module in list(sys.modules.values()):  # Polygraphy's lazy imports keep the module they first found
        lazy = getattr(module, "trt", None) if (getattr(module, "__name__", "") or "").startswith("polygraphy") else None
        if type(lazy).__name__ == "LazyModule":
            object.__setattr__(lazy, "module", None)
    return trt


class Names:
    """The names one TensorRT version registers, and the log of those asked for."""

    def __init__(self, version: str, strings: bytes):
        self.version, self.strings, self.used = version, strings, set()
        self._known: dict[str, bool] = {}  # a search of the whole table per name, once

    def allow(self, name: str) -> None:
        if name not in self._known:
            self._known[name] = f"{name}\0".encode() in self.strings
        if not self._known[name]:
            raise AttributeError(f"TensorRT {self.version} has no {name!r}")
        self.used.add(name)


class Checked:
    """Attribute reads and writes of the bindings' names go through `Names`."""

    _names: Names

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        self._names.allow(name)
        return Anything(self._names, name)

    def __setattr__(self, name, value):
        if not name.startswith("_"):
            self._names.allow(name)
        object.__setattr__(self, name, value)


class Anything(Checked):
    """What the stand-in does not model: any allowed attribute, callable, truthy."""

    def __init__(self, names, label=""):
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "_label", label)

    def __call__(self, *args, **kwargs):
        return Anything(self._names, self._label + "()")

    def __repr__(self):
        return f"<stub {self._label}>"


class Member:
    def __init__(self, kind, name, value):
        self.kind, self.name, self.value = kind, name, value

    def __int__(self):
        return self.value

    __index__ = __int__

    def __eq__(self, other):
        return isinstance(other, Member) and (self.kind, self.name) == (other.kind, other.name)

    def __hash__(self):
        return hash((self.kind, self.name))

    def __repr__(self):
        return f"{self.kind}.{self.name}"


class Enum:
    def __init__(self, names: Names, kind: str):
        self._names, self.kind = names, kind
        present = [n for n in ENUMS[kind] if f"{n}\0".encode() in names.strings]
        self.__members__ = {n: Member(kind, n, i) for i, n in enumerate(present)}

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        self._names.allow(name)
        return self.__members__.setdefault(name, Member(self.kind, name, len(self.__members__)))


class Tensor(Checked):
    def __init__(self, names, name, dtype, shape=()):
        for key, value in {"_names": names, "name": name, "dtype": dtype, "shape": tuple(shape),
                           "is_shape_tensor": False}.items():
            object.__setattr__(self, key, value)


class Layer(Checked):
    def __init__(self, names, trt, name, node, outputs, kind="ELEMENTWISE"):
        for key, value in {"_names": names, "_trt": trt, "name": name, "_outputs": outputs, "_node": node,
                           "output_types": {}, "type": getattr(trt.LayerType, kind)}.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_precision", None)

    @property
    def metadata(self):
        self._names.allow("metadata")  # ILayer.metadata exists from 8.6
        return f"[ONNX Layer: {self._node}]"

    @property
    def num_outputs(self):
        return len(self._outputs)

    def get_output(self, index):
        return self._outputs[index]

    @property
    def precision(self):
        return self._precision

    @precision.setter
    def precision(self, value):
        self._names.allow("precision")
        object.__setattr__(self, "_precision", value)

    @property
    def precision_is_set(self):
        return self._precision is not None

    def set_output_type(self, index, dtype):
        self._names.allow("set_output_type")
        self.output_types[index] = dtype


class Network(Checked):
    def __init__(self, names, trt, flags):
        for key, value in {"_names": names, "_trt": trt, "flags": flags, "layers": [], "inputs": [],
                           "outputs": []}.items():
            object.__setattr__(self, key, value)

    num_layers = property(lambda self: len(self.layers))
    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_layer(self, index):
        return self.layers[index]

    def get_input(self, index):
        return self.inputs[index]

    def get_output(self, index):
        return self.outputs[index]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)


class Parser(Checked):
    def __init__(self, names, trt, network, logger):
        for key, value in {"_names": names, "_trt": trt, "network": network, "num_errors": 0}.items():
            object.__setattr__(self, key, value)
        trt.loggers.append(logger)

    def parse_from_file(self, path):
        import onnx
        self._names.allow("parse_from_file")
        model = onnx.shape_inference.infer_shapes(onnx.load(path))
        types_ = {v.name: v.type.tensor_type.elem_type for v in
                  itertools.chain(model.graph.value_info, model.graph.input, model.graph.output)}
        types_.update({i.name: i.data_type for i in model.graph.initializer})
        dtype = self._trt.DataType
        int64 = "INT64" if "INT64" in dtype.__members__ else "INT32"  # before 10, the parser casts int64 down

        def of(name):
            kind = ONNX_TYPES.get(types_.get(name, 1), "FLOAT")
            return getattr(dtype, int64 if kind == "INT64" else kind)
        for value in model.graph.input:
            dims = [d.dim_value or -1 for d in value.type.tensor_type.shape.dim]
            self.network.inputs.append(Tensor(self._names, value.name, of(value.name), dims))
        counter = itertools.count(1)
        for node in model.graph.node:
            outputs = [Tensor(self._names, o, of(o)) for o in node.output]
            kind = {"Softmax": "SOFTMAX", "Conv": "CONVOLUTION", "MatMul": "MATRIX_MULTIPLY", "Cast": "CAST",
                    "QuantizeLinear": "QUANTIZE", "DequantizeLinear": "DEQUANTIZE",
                    "LayerNormalization": "NORMALIZATION"}.get(node.op_type, "ELEMENTWISE")
            self.network.layers.append(Layer(self._names, self._trt, node.name, node.name, outputs, kind))
            if node.op_type in ("Softmax", "LayerNormalization"):  # a node the parser makes two layers of
                self.network.layers.append(Layer(self._names, self._trt, f"{node.name}_{next(counter)}", node.name,
                                                 [Tensor(self._names, f"{node.name}:aux", dtype.FLOAT)], "SHUFFLE"))
        self.network.outputs.extend(Tensor(self._names, o.name, dtype.FLOAT) for o in model.graph.output)
        return True


class Profile(Checked):
    def __init__(self, names):
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "shapes", {})

    def set_shape(self, name, min, opt, max):
        self._names.allow("set_shape")
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

    def get_shape(self, name):
        return [list(s) for s in self.shapes[name]]

    def __bool__(self):
        return True


class Config(Checked):
    def __init__(self, names, trt):
        defaults = {trt.BuilderFlag.TF32} if "TF32" in trt.BuilderFlag.__members__ else set()
        for key, value in {"_names": names, "_trt": trt, "flags": defaults, "pools": {}, "profiles": [],
                           "calibration_profile": None, "_calibrator": None, "_timing": None}.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_attrs", {"DLA_core": -1, "default_device_type": trt.DeviceType.GPU})

    def set_flag(self, flag):
        self._names.allow("set_flag")
        self.flags.add(flag)

    def clear_flag(self, flag):
        self._names.allow("clear_flag")
        self.flags.discard(flag)

    def get_flag(self, flag):
        return flag in self.flags

    def set_memory_pool_limit(self, pool, size):
        self._names.allow("set_memory_pool_limit")
        self.pools[pool] = size

    def get_memory_pool_limit(self, pool):
        return self.pools.get(pool, 0)

    def add_optimization_profile(self, profile):
        self._names.allow("add_optimization_profile")
        self.profiles.append(profile)
        return len(self.profiles) - 1

    num_optimization_profiles = property(lambda self: len(self.profiles))

    def set_calibration_profile(self, profile):
        self._names.allow("set_calibration_profile")
        object.__setattr__(self, "calibration_profile", profile)
        return True

    def get_calibration_profile(self):
        return self.calibration_profile

    @property
    def int8_calibrator(self):
        self._names.allow("int8_calibrator")
        return self._calibrator

    @int8_calibrator.setter
    def int8_calibrator(self, value):
        self._names.allow("int8_calibrator")
        object.__setattr__(self, "_calibrator", value)

    def create_timing_cache(self, data):
        self._names.allow("create_timing_cache")
        return TimingCache(self._names, bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        self._names.allow("set_timing_cache")
        object.__setattr__(self, "_timing", cache)
        return True

    def get_timing_cache(self):
        self._names.allow("get_timing_cache")
        return self._timing

    def __getattr__(self, name):
        if name in self._attrs:
            self._names.allow(name)
            return self._attrs[name]
        return super().__getattr__(name)

    def __setattr__(self, name, value):
        self._names.allow(name)
        if isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
        else:
            self._attrs[name] = value


class HostMemory(bytes):
    def tobytes(self):
        return bytes(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class TimingCache(Checked):
    def __init__(self, names, data):
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "data", data)

    def serialize(self):
        self._names.allow("serialize")
        return HostMemory(self.data + b"+entries")

    def combine(self, other, ignore_mismatch):
        self._names.allow("combine")
        return True


class Builder(Checked):
    def __init__(self, names, trt, logger):
        for key, value in {"_names": names, "_trt": trt, "built": []}.items():
            object.__setattr__(self, key, value)
        trt.loggers.append(logger)

    def create_network(self, flags=0):
        self._names.allow("create_network")
        network = Network(self._names, self._trt, flags)
        self._trt.networks.append(network)
        return network

    def create_builder_config(self):
        self._names.allow("create_builder_config")
        config = Config(self._names, self._trt)
        self._trt.configs.append(config)
        return config

    def create_optimization_profile(self):
        self._names.allow("create_optimization_profile")
        return Profile(self._names)

    def build_serialized_network(self, network, config):
        """Calibrates as TensorRT does when INT8 is on and a calibrator set: the cache if it
        reads one, else batches until the calibrator says None, then writes the cache."""
        self._names.allow("build_serialized_network")
        self._trt.builds.append((network, config))
        calibrator = config._calibrator
        if calibrator is not None and self._trt.BuilderFlag.INT8 in config.flags:
            if calibrator.read_calibration_cache() is None:
                names = [network.get_input(i).name for i in range(network.num_inputs)]
                while (pointers := calibrator.get_batch(names)) is not None:
                    self._trt.calibration_batches += 1
                    if self._trt.on_calibration_batch:  # what TensorRT would read at those addresses
                        shapes = [config.calibration_profile.shapes[name][1] for name in names]
                        self._trt.on_calibration_batch(names, pointers, shapes)
                calibrator.write_calibration_cache(HostMemory(b"TRT-stub-EntropyCalibration2\n"))
        return HostMemory(b"serialized engine")

    @property
    def num_DLA_cores(self):
        self._names.allow("num_DLA_cores")
        return self._trt.dla_cores


class Engine(Checked):
    """An engine with images [B,3,H,W], mask [B,H,W] -> logits [B,N,K+1], boxes [B,N,4]."""

    def __init__(self, names, trt, spec):
        for key, value in {"_names": names, "_trt": trt, "spec": spec}.items():
            object.__setattr__(self, key, value)

    num_io_tensors = property(lambda self: 4)

    def get_tensor_name(self, index):
        return ["images", "mask", "logits", "boxes"][index]

    def get_tensor_mode(self, name):
        mode = self._trt.TensorIOMode
        return mode.INPUT if name in ("images", "mask") else mode.OUTPUT

    def get_tensor_shape(self, name):
        return (-1, *self.spec["shapes"][name]) if self.spec["dynamic"] else (self.spec["batch"], *self.spec["shapes"][name])

    def get_tensor_dtype(self, name):
        return self._trt.DataType.BOOL if name == "mask" else self._trt.DataType.FLOAT

    def get_tensor_format(self, name, profile=0):
        return self._trt.TensorFormat.LINEAR

    def is_shape_inference_io(self, name):
        return False

    def get_tensor_profile_shape(self, name, index):
        self._names.allow("get_tensor_profile_shape")
        return [(batch, *self.spec["shapes"][name]) for batch in self.spec["profile"]]

    def create_execution_context(self):
        self._names.allow("create_execution_context")
        return Context(self._names, self)


class Context(Checked):
    """Runs nothing; like TensorRT it asks an output allocator, where one is set, for each
    output's memory and reports the shapes (Polygraphy's TrtRunner works that way)."""

    def __init__(self, names, engine):
        for key, value in {"_names": names, "engine": engine, "shapes": {}, "addresses": {}, "runs": 0,
                           "allocators": {}, "active_optimization_profile": 0}.items():
            object.__setattr__(self, key, value)

    def get_tensor_address(self, name):
        return self.addresses.get(name, 0)

    def set_output_allocator(self, name, allocator):
        self.allocators[name] = allocator
        return True

    def set_input_shape(self, name, shape):
        self._names.allow("set_input_shape")
        low, _, high = self.engine.spec["profile"]
        if not low <= shape[0] <= high:
            return False  # as TensorRT: a shape outside the profile is refused, not raised
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        self._names.allow("get_tensor_shape")
        batch = self.shapes.get("images", (self.engine.spec["profile"][1],))[0]
        return (batch, *self.engine.spec["shapes"][name])

    def set_tensor_address(self, name, pointer):
        self._names.allow("set_tensor_address")
        self.addresses[name] = pointer
        return True

    def execute_async_v3(self, stream):
        self._names.allow("execute_async_v3")
        object.__setattr__(self, "runs", self.runs + 1)
        for name, allocator in self.allocators.items():
            shape = self.get_tensor_shape(name)
            self.addresses[name] = allocator.reallocate_output_async(name, 0, 4 * int(np.prod(shape)), 256, stream)
            allocator.notify_shape(name, shape)
        return True


class Runtime(Checked):
    def __init__(self, names, trt, logger):
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "_trt", trt)
        trt.loggers.append(logger)

    def deserialize_cuda_engine(self, data):
        self._names.allow("deserialize_cuda_engine")
        return Engine(self._names, self._trt, self._trt.engine_spec)


def stub_tensorrt(version: str, strings: bytes, dla_cores: int = 0, engine_spec: dict | None = None):
    """A `tensorrt` module for `version` whose names are those in `strings`; its `.names.used`
    logs what was asked for, `.loggers` every logger handed to TensorRT, `.builds` every
    (network, config) built, `.created_loggers` every trt.Logger made."""
    names = Names(version, strings)
    trt = types.ModuleType("tensorrt")
    trt.__version__, trt.__file__ = version, "<stub>"
    trt.names, trt.dla_cores, trt.engine_spec = names, dla_cores, engine_spec
    trt.loggers, trt.created_loggers, trt.networks, trt.configs, trt.builds = [], [], [], [], []
    trt.calibration_batches, trt.on_calibration_batch = 0, None
    for kind in ENUMS:
        setattr(trt, kind, Enum(names, kind))
    aliases = {"float32": "FLOAT", "float16": "HALF", "int8": "INT8", "int32": "INT32", "int64": "INT64",
               "uint8": "UINT8", "bool": "BOOL"}  # the module's own names for DataType members
    for alias, member in aliases.items():
        if f"{alias}\0".encode() in strings and member in trt.DataType.__members__:
            setattr(trt, alias, trt.DataType.__members__[member])

    class Logger:
        WARNING, ERROR, INTERNAL_ERROR, INFO, VERBOSE = range(5)

        def __init__(self, *args):
            trt.created_loggers.append(self)

    class ILogger:
        def __init__(self):
            pass

    def base_class(name):  # an interface Python code subclasses
        return type(name, (), {"__init__": lambda self: None})
    trt.Logger, trt.ILogger = Logger, ILogger
    for name in ("IInt8EntropyCalibrator2", "IInt8LegacyCalibrator", "IInt8Calibrator", "IInt8EntropyCalibrator",
                 "IInt8MinMaxCalibrator", "IOutputAllocator", "IDebugListener"):
        if f"{name}\0".encode() in strings:
            setattr(trt, name, base_class(name))
    trt.Builder = lambda logger: Builder(names, trt, logger)
    trt.OnnxParser = lambda network, logger: Parser(names, trt, network, logger)
    trt.Runtime = lambda logger: Runtime(names, trt, logger)
    trt.init_libnvinfer_plugins = lambda logger, namespace: True
    trt.ICudaEngine, trt.IExecutionContext = Engine, Context

    def missing(name):
        if name.startswith("__"):  # the import machinery's probes
            raise AttributeError(name)
        names.allow(name)
        return Anything(names, name)
    trt.__getattr__ = missing
    return trt
